//! Tier 3: the stock Debian cloud kernel (the default guest) booted by Tidepool's own VMM on a
//! real KVM, inside a nested L1 (QEMU TCG with emulated SVM, `resources/nested/run-l1.sh`).
//!
//! The test builds the guest image (`resources/guest/build.sh`) if it is missing, finds or
//! builds the release `tidepool` binary, runs `tidepool run --kernel vmlinux --initrd ...
//! --memory-mib 512` in L1 and checks that the guest reached its `/init`, reported a MemTotal
//! plausible for 512 MiB and powered off through ACPI. It prints the L1 boot time and the L2
//! time to `/init`. It skips (printing why) when qemu-system-x86_64 is missing or the guest
//! image cannot be built here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(name);
            f.is_file()
        })
    })
}

fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("tidepool")
}

/// The guest image directory, built when missing; Err says why it cannot be had here.
fn guest_image(root: &Path) -> Result<PathBuf, String> {
    let current = cache_root().join("guest").join("current");
    let ready = |d: &Path| d.join("vmlinux").is_file() && d.join("initramfs.cpio.gz").is_file();
    if ready(&current) {
        return Ok(current);
    }
    eprintln!("nested_boot: guest image missing, running resources/guest/build.sh");
    let out = Command::new(root.join("resources/guest/build.sh"))
        .output()
        .map_err(|e| format!("cannot run resources/guest/build.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "resources/guest/build.sh failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    if ready(&current) {
        Ok(current)
    } else {
        Err(format!(
            "build.sh succeeded but {} is incomplete",
            current.display()
        ))
    }
}

/// The release `tidepool` binary: `TIDEPOOL_BIN` if set, else built with cargo (a no-op when
/// it is fresh; `cargo test --workspace --release` has built it already).
fn tidepool_binary(root: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("TIDEPOOL_BIN") {
        return PathBuf::from(p);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "tidepool-vmm",
            "--bin",
            "tidepool",
        ])
        .status()
        .expect("run cargo build for the tidepool binary");
    assert!(
        status.success(),
        "cargo build of the tidepool binary failed"
    );
    let bin = target.join("release").join("tidepool");
    assert!(bin.is_file(), "{} missing after cargo build", bin.display());
    bin
}

/// The value after `key` in the first line containing it, up to whitespace.
fn value_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v))
        .and_then(|v| v.split_whitespace().next())
}

#[test]
fn stock_debian_kernel_boots_to_init_in_nested_kvm() {
    let root = workspace_root();
    if !on_path("qemu-system-x86_64") {
        eprintln!("SKIP nested_boot: qemu-system-x86_64 is not installed (resources/ci/install-deps.sh installs it)");
        return;
    }
    let guest = match guest_image(&root) {
        Ok(g) => g,
        Err(why) => {
            eprintln!("SKIP nested_boot: no guest image: {why}");
            return;
        }
    };
    let bin = tidepool_binary(&root);
    let log = std::env::temp_dir().join(format!("tidepool-nested-boot-{}.log", std::process::id()));
    let t0 = Instant::now();
    let out = Command::new(root.join("resources/nested/run-l1.sh"))
        .args(["-q", "-t", "240", "--log"])
        .arg(&log)
        .arg("--binary")
        .arg(&bin)
        .arg("--file")
        .arg(guest.join("vmlinux"))
        .arg("--file")
        .arg(guest.join("initramfs.cpio.gz"))
        .args([
            "--",
            "./tidepool",
            "run",
            "--kernel",
            "vmlinux",
            "--initrd",
            "initramfs.cpio.gz",
            "--memory-mib",
            "512",
            "--timeout-s",
            "150",
            "--cmdline",
            "tidepool.end=poweroff",
            "--mark",
            "TIDEPOOL-INIT-START",
            "--mark",
            "TIDEPOOL-MEMTOTAL-KB",
        ])
        .output()
        .expect("run resources/nested/run-l1.sh");
    let wall = t0.elapsed();
    let serial = std::fs::read(&log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let harness = String::from_utf8_lossy(&out.stderr).into_owned();
    let tail: String = serial
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        out.status.success(),
        "nested run failed ({}); harness: {harness}\nserial tail:\n{tail}",
        out.status
    );
    let _ = std::fs::remove_file(&log);

    assert!(
        serial.contains("TIDEPOOL-INIT-START"),
        "the L2 guest never reached /init:\n{tail}"
    );
    let mem_kb: u64 = value_after(&serial, "TIDEPOOL-MEMTOTAL-KB ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal line:\n{tail}"));
    // 512 MiB of boot RAM minus the kernel image and reservations: a stock 6.1 kernel reports
    // about 470-490 MiB. More than 512 MiB, or less than 400 MiB, means the e820 map is wrong.
    assert!(
        (400 * 1024..=512 * 1024).contains(&mem_kb),
        "MemTotal {mem_kb} kB is not plausible for 512 MiB"
    );
    assert!(
        serial.contains("TIDEPOOL-RUN end=PowerOff"),
        "the guest did not power off through ACPI S5:\n{tail}"
    );
    let l2_uptime = value_after(&serial, "TIDEPOOL-INIT-START uptime=").unwrap_or("?");
    let l2_wall = value_after(&serial, "TIDEPOOL-RUN-MARK TIDEPOOL-INIT-START ").unwrap_or("?");
    let l1_uptime = value_after(&serial, "TIDEPOOL-L1-INIT uptime=").unwrap_or("?");
    let l1_wall = value_after(&harness, "init after ").unwrap_or("?");
    let setup_ms = value_after(&serial, "setup_ms=").unwrap_or("?");
    eprintln!(
        "nested_boot: L1 boot to /init {l1_wall} wall ({l1_uptime}s L1 uptime); \
         L2 (Tidepool, PVH vmlinux, 512 MiB) to /init {l2_wall}s from `tidepool run` start \
         ({l2_uptime}s L2 uptime, VM set-up {setup_ms} ms); MemTotal {mem_kb} kB; \
         whole test {:.1}s",
        wall.as_secs_f64()
    );
}
