//! The real `tidepool serve` binary with its swap and reclaim flags (`--swap-path`,
//! `--swap-max-mib`, `--reclaim-budget-mib`, `--reclaim-phases`, `--no-swap`), and the default swap file of a
//! daemon whose socket directory is on tmpfs (`/dev/shm`): it goes to disk, under
//! `/var/tmp/tidepool-<uid>/`. The file is created with the first VM. Skips without /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidepool_api::types::CreateVmRequest;
use tidepool_api::Client;
use tidepool_vmm::manager::images::idle_guest;
use tidepool_vmm::manager::{ram_fallback_path, SWAP_FILE_NAME};

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
const MIB: u64 = 1 << 20;

/// Kills the daemon when the test ends.
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(socket: &Path, extra: &[&str]) -> Daemon {
    let child = Command::new(BIN)
        .args(["serve", "--pool-mib", "256", "--socket"])
        .arg(socket)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn tidepool serve");
    Daemon(Some(child))
}

fn fresh_dir(base: &Path, name: &str) -> PathBuf {
    let d = base.join(format!("tp-swapflags-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// Start the daemon, create one idle VM, run `check` with a client and the VM id, then
/// delete the VM.
fn with_daemon_and_vm<F, Fut>(socket: &Path, extra: &[&str], check: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let _daemon = start(socket, extra);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = Client::unix(socket).with_timeout(Duration::from_secs(60));
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(socket.exists() && client.host().await.is_ok()) {
            assert!(Instant::now() < deadline, "daemon did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut req = CreateVmRequest::with_memory(64);
        req.image = Some(idle_guest(64).expect("image"));
        let vm = client.create_vm(&req).await.expect("create");
        check(client.clone(), vm.id.clone()).await;
        client.delete_vm(&vm.id).await.expect("delete");
    });
}

/// Poll `GET /metrics` until it has `line` (the engine publishes its domains after a step).
async fn metrics_line(client: &Client, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = client.metrics().await.expect("metrics");
        if text.lines().any(|l| l == line) {
            return text;
        }
        assert!(Instant::now() < deadline, "{line} never in:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn swap_path_max_and_reclaim_budget_flags() {
    if let Err(why) = tidepool_vmm::kvm::kvm_available() {
        eprintln!("skipping swap_path_max_and_reclaim_budget_flags: {why}");
        return;
    }
    let dir = fresh_dir(&std::env::temp_dir(), "flags");
    let socket = dir.join("api.sock");
    let swap = dir.join("elsewhere").join("custom.swap");
    let swap_arg = swap.to_string_lossy().to_string();
    let swap2 = swap.clone();
    let dir2 = dir.clone();
    with_daemon_and_vm(
        &socket,
        &[
            "--swap-path",
            &swap_arg,
            "--swap-max-mib",
            "64",
            "--reclaim-budget-mib",
            "200",
        ],
        move |c2: Client, _id: String| async move {
            let text = metrics_line(
                &c2,
                &format!("tidepool_swap_file_bytes{{kind=\"capacity\"}} {}", 64 * MIB),
            )
            .await;
            assert!(swap2.is_file(), "the swap file is at --swap-path");
            assert!(
                !dir2.join(SWAP_FILE_NAME).exists(),
                "nothing at the default path"
            );
            metrics_line(
                &c2,
                &format!(
                    "tidepool_reclaim_watermark_bytes{{domain=\"budget\",mark=\"total\"}} {}",
                    200 * MIB
                ),
            )
            .await;
            drop(text);
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn no_swap_flag_makes_no_file() {
    if let Err(why) = tidepool_vmm::kvm::kvm_available() {
        eprintln!("skipping no_swap_flag_makes_no_file: {why}");
        return;
    }
    let dir = fresh_dir(&std::env::temp_dir(), "noswap");
    let socket = dir.join("api.sock");
    let dir2 = dir.clone();
    with_daemon_and_vm(
        &socket,
        &["--no-swap", "--reclaim-budget-mib", "100"],
        move |client: Client, id: String| async move {
            // Reclaim runs (its budget shows) but no swap file is made.
            let text = metrics_line(
                &client,
                &format!(
                    "tidepool_reclaim_watermark_bytes{{domain=\"budget\",mark=\"total\"}} {}",
                    100 * MIB
                ),
            )
            .await;
            assert!(
                !text.contains("tidepool_swap_file_bytes"),
                "no swap file figures:\n{text}"
            );
            assert!(!dir2.join(SWAP_FILE_NAME).exists());
            let mem = client.get_memory(&id).await.expect("memory");
            assert_eq!(mem.swapped_mib, 0);
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn socket_dir_on_tmpfs_puts_the_default_swap_file_on_disk() {
    if let Err(why) = tidepool_vmm::kvm::kvm_available() {
        eprintln!("skipping socket_dir_on_tmpfs_puts_the_default_swap_file_on_disk: {why}");
        return;
    }
    let shm = Path::new("/dev/shm");
    let is_tmpfs = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == "/dev/shm" && f[2] == "tmpfs"
        });
    if !is_tmpfs || !shm.is_dir() {
        eprintln!("skipping socket_dir_on_tmpfs_puts_the_default_swap_file_on_disk: /dev/shm is not tmpfs");
        return;
    }
    let dir = fresh_dir(shm, "tmpfs");
    let socket = dir.join("api.sock");
    let expected = ram_fallback_path(&dir);
    let _ = std::fs::remove_file(&expected);
    let dir2 = dir.clone();
    let exp2 = expected.clone();
    with_daemon_and_vm(
        &socket,
        &[],
        move |client: Client, _id: String| async move {
            metrics_line(&client, "tidepool_swap_file_bytes{kind=\"used\"} 0").await;
            assert!(exp2.is_file(), "the swap file is on disk at {exp2:?}");
            assert!(!dir2.join(SWAP_FILE_NAME).exists(), "no swap file on tmpfs");
        },
    );
    let _ = std::fs::remove_file(&expected);
    let _ = std::fs::remove_dir_all(dir);
}

/// Run `serve` with `flags`, which it must refuse before starting; returns its stderr.
fn refused(dir: &Path, flags: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .args(["serve", "--pool-mib", "64", "--socket"])
        .arg(dir.join("tp.sock"))
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tidepool serve");
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve {flags:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(!status.success(), "{flags:?}");
    err
}

/// `--compact-order-mib` and `--compact-threshold` are checked before the daemon starts: a
/// size that is not a power of two of at least 2 MiB, one above the allocator's largest block,
/// and a threshold outside (0, 1] each end `serve` with an error naming the problem.
#[test]
fn bad_compaction_flags_are_refused() {
    let dir = fresh_dir(&std::env::temp_dir(), "compact");
    for (flags, says) in [
        (["--compact-order-mib", "3"], "power of two"),
        (["--compact-order-mib", "2048"], "largest block"),
        (["--compact-threshold", "0"], "(0, 1]"),
    ] {
        let err = refused(&dir, &flags);
        assert!(err.contains(says), "{flags:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--reclaim-phases` takes the phases' metric names only: an unknown name, another spelling
/// and an empty list end `serve` before it starts, naming the bad value.
#[test]
fn bad_reclaim_phases_are_refused() {
    let dir = fresh_dir(&std::env::temp_dir(), "phases");
    for (list, bad) in [
        ("reported,hint", "\"hint\""),
        ("swap-out", "\"swap-out\""),
        ("", "\"\""),
    ] {
        let err = refused(&dir, &["--reclaim-phases", list]);
        assert!(
            err.contains("unknown reclaim phase") && err.contains(bad),
            "{list:?}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The counter `tidepool_reclaim_phase_calls_total` of `phase`, summed over its results.
fn phase_calls(text: &str, phase: &str) -> u64 {
    let head = format!("tidepool_reclaim_phase_calls_total{{phase=\"{phase}\",");
    text.lines()
        .filter(|l| l.starts_with(&head))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// `--reclaim-phases reported` with a budget the VM exceeds: the engine runs (watermark
/// trigger) and calls phase 1 only; the other phases are never called.
#[test]
fn reclaim_phases_flag_limits_the_engine() {
    if let Err(why) = tidepool_vmm::kvm::kvm_available() {
        eprintln!("skipping reclaim_phases_flag_limits_the_engine: {why}");
        return;
    }
    let dir = fresh_dir(&std::env::temp_dir(), "onlyreported");
    let socket = dir.join("api.sock");
    with_daemon_and_vm(
        &socket,
        &[
            "--no-swap",
            "--reclaim-budget-mib",
            "1",
            "--reclaim-phases",
            "reported,reported",
        ],
        move |client: Client, _id: String| async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let text = loop {
                let text = client.metrics().await.expect("metrics");
                if phase_calls(&text, "reported") >= 3 {
                    break text;
                }
                assert!(Instant::now() < deadline, "phase 1 never ran:\n{text}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            for phase in ["balloon", "drop_clean", "swap_out", "split_huge"] {
                assert_eq!(phase_calls(&text, phase), 0, "{phase} ran:\n{text}");
            }
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}
