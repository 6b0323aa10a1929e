//! End to end: the real `tidepool serve` runs its pool monitor and reclaim engine; an
//! allocation failure in the pool (a VM that does not fit) is counted as a monitor trigger,
//! wakes the engine, and both show in `GET /metrics`. Skips without /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidepool_api::metrics::sample_value;
use tidepool_api::types::CreateVmRequest;
use tidepool_api::Client;
use tidepool_vmm::manager::images::idle_guest;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_ready(client: &Client, socket: &Path) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if socket.exists() && client.host().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("daemon not ready");
}

#[test]
fn allocation_failure_reaches_metrics_as_monitor_trigger() {
    if let Err(why) = tidepool_vmm::kvm::kvm_available() {
        eprintln!("skipping allocation_failure_reaches_metrics_as_monitor_trigger: {why}");
        return;
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("tidepool-reclaim-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let socket = dir.join("api.sock");
    let child = Command::new(BIN)
        .args(["serve", "--pool-mib", "128", "--socket"])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn tidepool serve");
    let _daemon = Daemon(Some(child));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = Client::unix(&socket).with_timeout(Duration::from_secs(30));
    rt.block_on(async {
        wait_ready(&client, &socket).await;
        let host = client.host().await.expect("host");
        if host.nodes.len() != 1 {
            eprintln!("skipping: the test sizes its VMs for a one-node pool");
            return;
        }
        // The reclaim figures are there from the start: the budget domain is the pool.
        let text = client.metrics().await.expect("metrics");
        for needle in [
            "tidepool_monitor_triggers_total{action=\"reclaim\"} 0",
            "tidepool_monitor_triggers_total{action=\"compact\"} 0",
            "tidepool_monitor_triggers_total{action=\"rebalance\"} 0",
            "tidepool_reclaim_phase_runs_total{phase=\"reported\"}",
            "tidepool_reclaim_phase_bytes_total{phase=\"swap_out\",kind=\"reclaimed\"}",
        ] {
            assert!(text.contains(needle), "{needle} not in:\n{text}");
        }
        let mut req = CreateVmRequest::with_memory(96);
        req.image = Some(idle_guest(96).expect("image"));
        let vm = client.create_vm(&req).await.expect("first VM fits");
        // 96 + 64 MiB > 128 MiB: the pool fails an allocation and the VM is refused.
        let mut req = CreateVmRequest::with_memory(64);
        req.image = Some(idle_guest(64).expect("image"));
        client
            .create_vm(&req)
            .await
            .expect_err("second VM does not fit");
        let t0 = Instant::now();
        let mut text = String::new();
        while t0.elapsed() < Duration::from_secs(15) {
            text = client.metrics().await.expect("metrics");
            let trig = sample_value(
                &text,
                "tidepool_monitor_triggers_total{action=\"reclaim\"} ",
            );
            let runs = sample_value(
                &text,
                "tidepool_reclaim_runs_total{trigger=\"alloc_failure\"} ",
            );
            if trig >= Some(1.0) && runs >= Some(1.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            sample_value(
                &text,
                "tidepool_monitor_triggers_total{action=\"reclaim\"} "
            ) >= Some(1.0),
            "no reclaim trigger in:\n{text}"
        );
        assert!(
            sample_value(
                &text,
                "tidepool_monitor_actions_total{action=\"reclaim\",outcome=\"engine_notified\"} "
            ) >= Some(1.0),
            "{text}"
        );
        assert!(
            sample_value(
                &text,
                "tidepool_reclaim_runs_total{trigger=\"alloc_failure\"} "
            ) >= Some(1.0),
            "engine did not run:\n{text}"
        );
        assert_eq!(
            sample_value(
                &text,
                "tidepool_reclaim_watermark_bytes{domain=\"budget\",mark=\"total\"} "
            ),
            Some((128u64 << 20) as f64)
        );
        client.delete_vm(&vm.id).await.expect("delete");
    });
    let _ = std::fs::remove_dir_all(&dir);
}
