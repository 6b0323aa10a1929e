//! The CLI's run functions against a real server (Unix socket and TCP) and the in-memory
//! backend: tables, `--json`, and `vm resize` waiting for the guest or failing with a reason.

mod common;

use clap::Parser;
use common::Harness;
use std::time::Duration;
use tidepool_api::cli::{self, ApiCli, CliError, OutputOpts, ResizeWait};
use tidepool_api::types::*;
use tidepool_api::Client;

async fn run(client: &Client, json: bool, args: &[&str]) -> Result<String, CliError> {
    let cli = ApiCli::try_parse_from(std::iter::once("tidepool").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    let opts = OutputOpts {
        json: json || cli.connect.json,
        progress: false,
    };
    cli::run_with(&cli.command, client, opts, &mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_show_resize_balloon_delete() {
    let h = Harness::start().await;
    let c = &h.unix;
    let out = run(
        c,
        true,
        &[
            "vm",
            "create",
            "--memory",
            "512M",
            "--vcpus",
            "2",
            "--hotplug",
            "1G",
            "--balloon",
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let vm: VmInfo = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!((vm.vcpus, vm.memory_mib), (2, 512));

    let table = run(c, false, &["vm", "list"]).await.unwrap_or_default();
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains(&vm.id) && table.contains("running"),
        "{table}"
    );
    let json = run(c, false, &["--json", "vm", "list"])
        .await
        .unwrap_or_default();
    let list: Vec<VmInfo> = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(list, vec![vm.clone()]);
    let show = run(c, false, &["vm", "show", &vm.id])
        .await
        .unwrap_or_default();
    assert!(show.contains("1024 MiB region"), "{show}");

    // Resize waits until plugged == requested (the test backend plugs 128 MiB per poll).
    let out = run(c, true, &["vm", "resize", &vm.id, "1G"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let m: MemoryInfo = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!((m.plugged_mib, m.requested_mib), (1024, 1024));
    // A refused resize reports the daemon's reason.
    let e = run(c, false, &["vm", "resize", &vm.id, "256M"]).await;
    assert!(
        matches!(&e, Err(CliError::Client(err)) if err.to_string().contains("below boot RAM")),
        "{e:?}"
    );

    let out = run(c, false, &["balloon", "set", &vm.id, "128"])
        .await
        .unwrap_or_default();
    assert!(out.contains("target") && out.contains("128 MiB"), "{out}");
    let out = run(c, true, &["balloon", "stats", &vm.id])
        .await
        .unwrap_or_default();
    let s: BalloonStats = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(s.actual_mib, 128);

    let host = run(c, false, &["host"]).await.unwrap_or_default();
    assert!(host.starts_with("NODE") && host.contains("1 VMs"), "{host}");
    // `metrics` prints the OpenMetrics text as served, with or without --json.
    let served = c.metrics().await.unwrap_or_else(|e| panic!("{e}"));
    for json in [false, true] {
        let text = run(c, json, &["metrics"]).await.unwrap_or_default();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE tidepool_"), "{text}");
        assert_eq!(text.lines().count(), served.lines().count(), "{text}");
    }

    // Over TCP with the token, the same commands work.
    let out = run(&h.tcp, false, &["vm", "pause", &vm.id])
        .await
        .unwrap_or_default();
    assert!(out.contains("paused"), "{out}");
    let e = run(&h.tcp, false, &["vm", "pause", &vm.id]).await;
    assert!(
        matches!(&e, Err(CliError::Client(err)) if err.to_string().contains("conflict")),
        "{e:?}"
    );
    let out = run(c, false, &["vm", "delete", &vm.id])
        .await
        .unwrap_or_default();
    assert_eq!(out, format!("deleted {}\n", vm.id));
    let e = run(c, false, &["vm", "show", &vm.id]).await;
    assert!(e.is_err());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_of_a_paused_vm_times_out_with_the_reason() {
    let h = Harness::start().await;
    let mut req = CreateVmRequest::with_memory(512);
    req.hotplug = Some(HotplugConfig {
        region_mib: 1024,
        block_mib: 2,
        memslots: Default::default(),
    });
    let vm = h
        .unix
        .create_vm(&req)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    h.unix
        .set_state(&vm.id, StateAction::Pause)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let wait = ResizeWait {
        timeout: Duration::from_millis(300),
        poll: Duration::from_millis(50),
    };
    let r = cli::resize_and_wait(&h.unix, &vm.id, 1024, wait, false).await;
    match r {
        Err(CliError::ResizeTimeout {
            plugged_mib,
            requested_mib,
            reason,
            ..
        }) => {
            assert_eq!((plugged_mib, requested_mib), (512, 1024));
            assert!(reason.contains("paused"), "{reason}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Resumed, the same resize completes.
    h.unix
        .set_state(&vm.id, StateAction::Resume)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let wait = ResizeWait {
        timeout: Duration::from_secs(20),
        poll: Duration::from_millis(10),
    };
    let m = cli::resize_and_wait(&h.unix, &vm.id, 1024, wait, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.plugged_mib, 1024);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_daemon_is_a_connect_error() {
    let dir = common::TempDir::new("nodaemon");
    let client = Client::unix(dir.0.join("missing.sock"));
    let e = run(&client, false, &["vm", "list"]).await;
    assert!(
        matches!(
            &e,
            Err(CliError::Client(tidepool_api::ClientError::Connect { .. }))
        ),
        "{e:?}"
    );
}
