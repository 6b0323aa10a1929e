//! End to end: start the real `tidepool serve` binary on a temporary Unix socket, talk HTTP to
//! it with the API client (and once with the `tidepool vm` CLI), create a tiny-guest VM, read
//! its memory and the host figures, delete it, and check the pool is whole again. Skips with a
//! printed reason when /dev/kvm cannot be opened.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidepool_api::types::{CreateVmRequest, HotplugConfig, VmInfo, VmState};
use tidepool_api::{Client, ErrorKind};
use tidepool_vmm::manager::images::{idle_guest, virtio_mem_guest};

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

/// Kills the daemon if the test ends early.
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tmp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("tidepool-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

async fn wait_ready(client: &Client, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if socket.exists() && client.host().await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "daemon did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn serve_create_read_delete_pool_whole() {
    if let Err(why) = tidepool_vmm::kvm::kvm_available() {
        eprintln!("skipping serve_create_read_delete_pool_whole: {why}");
        return;
    }
    let dir = tmp_dir();
    let socket = dir.join("api.sock");
    let child = Command::new(BIN)
        .args(["serve", "--pool-mib", "512", "--socket"])
        .arg(&socket)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn tidepool serve");
    let mut daemon = Daemon(Some(child));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = Client::unix(&socket).with_timeout(Duration::from_secs(30));
    rt.block_on(async {
        wait_ready(&client, &socket).await;
        let host = client.host().await.expect("host");
        let nodes = host.nodes.len() as u64;
        assert!(nodes >= 1);
        assert_eq!(host.total_mib, 512 * nodes);
        assert_eq!(host.free_mib, host.total_mib);
        assert_eq!(host.vm_count, 0);

        let mut req = CreateVmRequest::with_memory(64);
        req.image = Some(idle_guest(64).expect("image"));
        req.hotplug = Some(HotplugConfig {
            region_mib: 128,
            block_mib: 2,
            memslots: Default::default(),
        });
        let vm = client.create_vm(&req).await.expect("create");
        assert_eq!(vm.state, VmState::Running);
        assert_eq!(vm.memory_mib, 64);

        let mem = client.get_memory(&vm.id).await.expect("memory");
        assert_eq!(mem.boot_mib, 64);
        assert_eq!(mem.region_mib, 128);
        assert_eq!(mem.plugged_mib, 64);
        assert_eq!(mem.requested_mib, 64);
        assert!(mem.resident_mib <= 64);

        let host = client.host().await.expect("host");
        assert_eq!(host.vm_count, 1);
        assert_eq!(host.free_mib, host.total_mib - 64);
        assert_eq!(host.assigned_mib, 64);

        // The resize needs the guest's virtio-mem driver, which the tiny guest lacks: 409.
        let e = client
            .resize_memory(&vm.id, 192)
            .await
            .expect_err("no driver");
        assert_eq!(e.kind(), Some(ErrorKind::Conflict));

        // A kernel that does not exist is a bad request; the built-in default guest is not
        // wired yet (501).
        let mut linux = CreateVmRequest::with_memory(64);
        linux.kernel = Some("/nonexistent/vmlinux".into());
        let e = client.create_vm(&linux).await.expect_err("linux");
        assert_eq!(e.kind(), Some(ErrorKind::BadRequest));
        let e = client
            .create_vm(&CreateVmRequest::with_memory(64))
            .await
            .expect_err("default guest");
        assert_eq!(e.kind(), Some(ErrorKind::Unsupported));

        // GET /metrics renders the VM's figures.
        let text = client.metrics().await.expect("metrics");
        let boot_line = format!(
            "tidepool_vm_memory_bytes{{vm=\"{}\",kind=\"boot\"}} {}",
            vm.id,
            64u64 << 20
        );
        assert!(text.contains(&boot_line), "{boot_line} not in:\n{text}");
        assert!(text.contains(&format!("tidepool_vm_vcpus{{vm=\"{}\"}} 1", vm.id)));

        // The CLI client subcommands reach the same daemon.
        let out = Command::new(BIN)
            .args(["vm", "list", "--json", "--socket"])
            .arg(&socket)
            .output()
            .expect("tidepool vm list");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: Vec<VmInfo> = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, vm.id);

        // A second VM made with the CLI from an image file.
        let image = dir.join("idle.img");
        let out = Command::new(BIN)
            .args(["tiny-image", "--memory-mib", "32", "--out"])
            .arg(&image)
            .output()
            .expect("tidepool tiny-image");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let args: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(args.len(), 6, "{text}");
        assert_eq!(args[4..], ["--privilege", "kernel"], "{text}");
        let out = Command::new(BIN)
            .args(["vm", "create", "--json", "--memory", "32M", "--image"])
            .arg(&image)
            .args(&args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .expect("tidepool vm create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let second: VmInfo = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(second.memory_mib, 32);
        assert_eq!(second.state, VmState::Running);
        let host = client.host().await.expect("host");
        assert_eq!(host.free_mib, host.total_mib - 96);
        client.delete_vm(&second.id).await.expect("delete second");

        // A third VM whose guest runs the polled virtio-mem driver: `tidepool vm resize`
        // returns once the guest has plugged the new total.
        let mut req = CreateVmRequest::with_memory(64);
        req.image = Some(virtio_mem_guest(64, 128).expect("image"));
        req.hotplug = Some(HotplugConfig {
            region_mib: 128,
            block_mib: 2,
            memslots: Default::default(),
        });
        let third = client.create_vm(&req).await.expect("create third");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client
            .get_memory(&third.id)
            .await
            .expect("memory")
            .resize
            .driver_ready
        {
            assert!(Instant::now() < deadline, "virtio-mem driver never came up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = Command::new(BIN)
            .args([
                "vm",
                "resize",
                &third.id,
                "96M",
                "--timeout",
                "60",
                "--json",
                "--socket",
            ])
            .arg(&socket)
            .output()
            .expect("tidepool vm resize");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mem = client.get_memory(&third.id).await.expect("memory");
        assert_eq!(mem.plugged_mib, 96);
        let host = client.host().await.expect("host");
        assert_eq!(host.free_mib, host.total_mib - 64 - 96);
        client.delete_vm(&third.id).await.expect("delete third");

        client.delete_vm(&vm.id).await.expect("delete");
        let e = client.get_vm(&vm.id).await.expect_err("deleted");
        assert_eq!(e.kind(), Some(ErrorKind::NotFound));
        let host = client.host().await.expect("host");
        assert_eq!(host.vm_count, 0);
        assert_eq!(host.free_mib, host.total_mib, "pool whole again");
    });

    // SIGTERM: the daemon shuts down cleanly.
    let mut child = daemon.0.take().expect("child");
    // SAFETY: kill(2) on the pid of a child we spawned and have not waited for.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("daemon did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "daemon exit status {status}");
    let _ = std::fs::remove_dir_all(&dir);
}
