//! `tidepool up` end to end: the README's first command, on this host (which picks nested mode
//! on a `kvm_pvm` host and direct mode on a real KVM).
//!
//! The test starts `tidepool up --socket <tmp>` in the background, waits for the socket, runs
//! `tidepool vm list` and `tidepool vm memory ID` against it, checks the default VM's figures
//! (512 MiB boot RAM, a 2 GiB virtio-mem region), resizes it to 1024 MiB through the socket
//! (the guest's virtio-mem driver plugs it), sends SIGTERM and checks that `up` stopped
//! cleanly: exit status 0, the socket removed, and no process left in the harness's group.
//! It skips (printing why) when the guest image cannot be had, or when nested mode is needed
//! and qemu-system-x86_64 is missing. `TIDEPOOL_BIN` picks the binary (default: a release
//! build through cargo).
//!
//! A second test runs direct mode on this host's KVM whatever it is, with the built-in tiny
//! guest (`tidepool up --tiny-guest`) instead of the stock kernel, which a host like CI's
//! cannot boot directly: the daemon in `up`'s own process, the default VM created through the
//! backend, the wait for the guest's virtio-mem driver, the banner, resizes through the
//! socket, and the clean stop (VM deleted, socket removed). What it cannot cover is the stock
//! kernel booting on the host's KVM (the console follower and its `/init` marker).

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tidepool_tests::{guest_image, on_path, tidepool_binary, workspace_root};
use tidepool_vmm::kvm::kvm_available;

fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists() || !Path::new("/dev/kvm").exists()
}

/// Runs `tidepool ARGS --socket SOCK --json` and parses its stdout.
fn cli_json(bin: &Path, sock: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin)
        .args(args)
        .arg("--socket")
        .arg(sock)
        .arg("--json")
        .output()
        .expect("run the tidepool CLI");
    assert!(
        out.status.success(),
        "tidepool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tidepool {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn group_alive(pgid: u32) -> bool {
    Command::new("kill")
        .args(["-0", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn read_log(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

#[test]
fn tidepool_up_serves_the_default_vm_and_cleans_up() {
    let root = workspace_root();
    let nested = kvm_is_pvm();
    if nested && !on_path("qemu-system-x86_64") {
        eprintln!("SKIP up: this host needs nested mode and qemu-system-x86_64 is not installed (resources/ci/install-deps.sh installs it)");
        return;
    }
    if let Err(why) = guest_image(&workspace_root()) {
        eprintln!("SKIP up: no guest image: {why}");
        return;
    }
    let bin = tidepool_binary(&root);
    let dir = std::env::temp_dir().join(format!("tidepool-up-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock = dir.join("run").join("tidepool.sock");
    let log_path = dir.join("up.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let t0 = Instant::now();
    let mut cmd = Command::new(&bin);
    cmd.arg("up")
        .arg("--socket")
        .arg(&sock)
        .arg("--no-build")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log);
    // A process group of its own, so the test can check nothing is left behind.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut up = cmd.spawn().expect("start tidepool up");
    let pgid = up.id();

    // Wait for the socket (L1 boot and VM creation in nested mode).
    let ready_limit = Duration::from_secs(180);
    while !sock.exists() {
        if let Ok(Some(status)) = up.try_wait() {
            panic!(
                "tidepool up exited early ({status}):\n{}",
                read_log(&log_path)
            );
        }
        if t0.elapsed() > ready_limit {
            let _ = signal(pgid, "-TERM");
            let _ = wait_child(&mut up, Duration::from_secs(30));
            panic!("no socket after {ready_limit:?}:\n{}", read_log(&log_path));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let ready = t0.elapsed();

    let list = cli_json(&bin, &sock, &["vm", "list"]);
    let vms = list.as_array().expect("vm list is an array");
    assert_eq!(vms.len(), 1, "one default VM: {list}");
    let id = vms[0]["id"].as_str().expect("vm id").to_string();
    assert_eq!(vms[0]["memory_mib"], 512, "{list}");
    assert_eq!(vms[0]["state"], "running", "{list}");
    let mem = cli_json(&bin, &sock, &["vm", "memory", &id]);
    assert_eq!(mem["boot_mib"], 512, "{mem}");
    assert_eq!(mem["region_mib"], 2048, "{mem}");
    assert!(
        mem["plugged_mib"].as_u64().is_some_and(|p| p >= 512),
        "{mem}"
    );

    // `up` announces the VM once the guest's virtio-mem driver is up, so a resize works now.
    let resize = Command::new(&bin)
        .args(["vm", "resize", &id, "1024", "--timeout", "90", "--socket"])
        .arg(&sock)
        .output()
        .expect("run tidepool vm resize");
    assert!(
        resize.status.success(),
        "vm resize failed: {}\n{}",
        String::from_utf8_lossy(&resize.stderr),
        read_log(&log_path)
    );
    let mem = cli_json(&bin, &sock, &["vm", "memory", &id]);
    assert_eq!(mem["plugged_mib"], 1024, "{mem}");
    assert_eq!(mem["requested_mib"], 1024, "{mem}");

    let out = read_log(&log_path);
    assert!(
        out.contains(&format!(
            "tidepool vm resize --socket {} {id}",
            sock.display()
        )),
        "{out}"
    );
    if nested {
        assert!(out.contains("cannot run the stock guest kernel"), "{out}");
        assert!(out.contains("nested mode:"), "{out}");
    }

    assert!(signal(up.id(), "-TERM"), "SIGTERM to tidepool up");
    let status = wait_child(&mut up, Duration::from_secs(90));
    let out = read_log(&log_path);
    let Some(status) = status else {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status();
        panic!("tidepool up did not stop within 90 s:\n{out}");
    };
    assert!(status.success(), "tidepool up exited with {status}:\n{out}");
    assert!(!sock.exists(), "the socket was not removed");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !group_alive(pgid),
        "processes left in tidepool up's group:\n{out}"
    );
    if nested {
        assert!(out.contains("stopped cleanly"), "{out}");
    } else {
        assert!(out.contains(&format!("deleted VM {id}")), "{out}");
    }
    eprintln!(
        "up: {} mode, socket ready after {:.1} s, whole test {:.1} s",
        if nested { "nested" } else { "direct" },
        ready.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `tidepool vm resize ID MIB` against `sock` and checks the guest reached it.
fn resize_to(bin: &Path, sock: &Path, id: &str, mib: u64, log: &Path) {
    let out = Command::new(bin)
        .args([
            "vm",
            "resize",
            id,
            &mib.to_string(),
            "--timeout",
            "60",
            "--socket",
        ])
        .arg(sock)
        .output()
        .expect("run tidepool vm resize");
    assert!(
        out.status.success(),
        "vm resize to {mib} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        read_log(log)
    );
    let mem = cli_json(bin, sock, &["vm", "memory", id]);
    assert_eq!(mem["plugged_mib"], mib, "{mem}");
    assert_eq!(mem["requested_mib"], mib, "{mem}");
}

#[test]
fn tidepool_up_direct_mode_runs_the_tiny_guest() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP up --tiny-guest: /dev/kvm is not usable: {why}");
        return;
    }
    let root = workspace_root();
    let bin = tidepool_binary(&root);
    let dir = std::env::temp_dir().join(format!("tidepool-up-tiny-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock = dir.join("run").join("tidepool.sock");
    let log_path = dir.join("up.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut cmd = Command::new(&bin);
    cmd.args(["up", "--tiny-guest", "--no-build", "--pool-mib", "1024"])
        .args(["--memory-mib", "64", "--hotplug-mib", "256", "--socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut up = cmd.spawn().expect("start tidepool up --tiny-guest");
    let pgid = up.id();
    let t0 = Instant::now();
    // `up` prints the banner once the guest's driver is up, so resizes work after it.
    while !read_log(&log_path).contains("tidepool is up") {
        if let Ok(Some(status)) = up.try_wait() {
            panic!(
                "tidepool up exited early ({status}):\n{}",
                read_log(&log_path)
            );
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = signal(pgid, "-TERM");
            let _ = wait_child(&mut up, Duration::from_secs(30));
            panic!("no banner after 120 s:\n{}", read_log(&log_path));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = read_log(&log_path);
    assert!(
        out.contains("direct mode with the built-in tiny guest"),
        "{out}"
    );
    assert!(out.contains("driver is up"), "{out}");

    let list = cli_json(&bin, &sock, &["vm", "list"]);
    let vms = list.as_array().expect("vm list is an array");
    assert_eq!(vms.len(), 1, "one default VM: {list}");
    let id = vms[0]["id"].as_str().expect("vm id").to_string();
    assert_eq!(vms[0]["state"], "running", "{list}");
    assert_eq!(vms[0]["boot_source"], "raw_image", "{list}");
    let mem = cli_json(&bin, &sock, &["vm", "memory", &id]);
    assert_eq!(
        (mem["boot_mib"].as_u64(), mem["region_mib"].as_u64()),
        (Some(64), Some(256)),
        "{mem}"
    );
    assert!(
        out.contains(&format!(
            "tidepool vm resize --socket {} {id}",
            sock.display()
        )),
        "{out}"
    );
    // Grow and shrink through the socket; the CPL3 driver plugs and unplugs.
    resize_to(&bin, &sock, &id, 192, &log_path);
    resize_to(&bin, &sock, &id, 64, &log_path);
    let host = cli_json(&bin, &sock, &["host"]);
    assert_eq!(host["vm_count"], 1, "{host}");

    assert!(signal(up.id(), "-TERM"), "SIGTERM to tidepool up");
    let status = wait_child(&mut up, Duration::from_secs(60));
    let out = read_log(&log_path);
    let Some(status) = status else {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status();
        panic!("tidepool up did not stop within 60 s:\n{out}");
    };
    assert!(status.success(), "tidepool up exited with {status}:\n{out}");
    assert!(out.contains(&format!("deleted VM {id}")), "{out}");
    assert!(!sock.exists(), "the socket was not removed");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!group_alive(pgid), "processes left in the group:\n{out}");
    eprintln!(
        "up --tiny-guest: whole test {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
