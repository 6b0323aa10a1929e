//! The REST API over a real Unix socket and real loopback TCP, with the real client, against
//! the in-memory backend. Every response is validated against the OpenAPI document.

mod common;

use common::{assert_error, create, hotplug_vm, Harness};
use hyper::Method;
use serde_json::{json, Value};
use std::time::Duration;
use tidepool_api::types::*;
use tidepool_api::ErrorKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_show_delete_over_unix_socket() {
    let h = Harness::start().await;
    let a = create(&h, &hotplug_vm()).await;
    assert_eq!(a.state, VmState::Running);
    assert_eq!(a.vcpus, 2);
    assert_eq!(a.boot_source, BootSource::DefaultGuest);
    let b = create(
        &h,
        &json!({"memory_mib": 64, "start": false,
                "image": {"inline": [0xf4, 0x90], "load_addr": 4096, "entry": 4096}})
        .to_string(),
    )
    .await;
    assert_eq!(b.state, VmState::Created);
    assert_eq!(b.boot_source, BootSource::RawImage);

    let list = h.raw(Method::GET, "/v1/vms", "/v1/vms", None).await;
    let list: Vec<VmInfo> = list.json().unwrap_or_default();
    assert_eq!(list.len(), 2);

    let show = h
        .raw(
            Method::GET,
            &format!("/v1/vms/{}", a.id),
            "/v1/vms/{id}",
            None,
        )
        .await;
    assert_eq!(show.json::<VmInfo>().ok(), Some(a.clone()));

    // The typed client sees the same.
    assert_eq!(h.unix.get_vm(&a.id).await.ok(), Some(a.clone()));
    assert_eq!(h.unix.list_vms().await.map(|v| v.len()).ok(), Some(2));

    let host = h.raw(Method::GET, "/v1/host", "/v1/host", None).await;
    let host: HostInfo = host.json().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.vm_count, 2);
    assert_eq!(host.assigned_mib, 512 + 64);
    assert_eq!(host.nodes.len(), 2);

    let del = h
        .raw(
            Method::DELETE,
            &format!("/v1/vms/{}", a.id),
            "/v1/vms/{id}",
            None,
        )
        .await;
    assert_eq!(del.status.as_u16(), 204);
    let gone = h
        .raw(
            Method::GET,
            &format!("/v1/vms/{}", a.id),
            "/v1/vms/{id}",
            None,
        )
        .await;
    assert_error(&gone, 404, "not_found");
    let again = h
        .raw(
            Method::DELETE,
            &format!("/v1/vms/{}", a.id),
            "/v1/vms/{id}",
            None,
        )
        .await;
    assert_error(&again, 404, "not_found");
    assert_eq!(h.unix.list_vms().await.map(|v| v.len()).ok(), Some(1));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_transitions_and_forbidden_ones() {
    let h = Harness::start().await;
    let vm = create(&h, &json!({"memory_mib": 128, "start": false}).to_string()).await;
    let path = format!("/v1/vms/{}/state", vm.id);
    let t = "/v1/vms/{id}/state";
    let put = |action: &'static str| {
        let h = &h;
        let path = path.clone();
        async move {
            h.raw(
                Method::PUT,
                &path,
                t,
                Some(&json!({ "action": action }).to_string()),
            )
            .await
        }
    };
    // created: pause and resume are forbidden.
    for action in ["pause", "resume"] {
        let before = h.snapshot().await;
        assert_error(&put(action).await, 409, "conflict");
        assert_eq!(h.snapshot().await, before);
    }
    let r = put("start").await;
    assert_eq!(
        r.json::<VmInfo>().map(|v| v.state).ok(),
        Some(VmState::Running)
    );
    assert_error(&put("start").await, 409, "conflict");
    assert_error(&put("resume").await, 409, "conflict");
    let r = put("pause").await;
    assert_eq!(
        r.json::<VmInfo>().map(|v| v.state).ok(),
        Some(VmState::Paused)
    );
    assert_error(&put("pause").await, 409, "conflict");
    let r = put("resume").await;
    assert_eq!(
        r.json::<VmInfo>().map(|v| v.state).ok(),
        Some(VmState::Running)
    );
    let r = put("stop").await;
    assert_eq!(
        r.json::<VmInfo>().map(|v| v.state).ok(),
        Some(VmState::Stopped)
    );
    for action in ["start", "pause", "resume", "stop"] {
        assert_error(&put(action).await, 409, "conflict");
    }
    let r = put("explode").await;
    assert_error(&r, 400, "bad_request");
    // The typed client maps the error.
    let e = h.unix.set_state(&vm.id, StateAction::Pause).await;
    assert!(
        matches!(e, Err(ref e) if e.kind() == Some(ErrorKind::Conflict)),
        "{e:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_is_accepted_with_202_and_progress_shows() {
    let h = Harness::start().await;
    let vm = create(&h, &hotplug_vm()).await;
    let path = format!("/v1/vms/{}/memory", vm.id);
    let t = "/v1/vms/{id}/memory";
    let r = h
        .raw(Method::PUT, &path, t, Some(r#"{"requested_mib": 1024}"#))
        .await;
    assert_eq!(r.status.as_u16(), 202);
    assert_eq!(
        r.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(path.as_str())
    );
    let m: MemoryInfo = r.json().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.requested_mib, 1024);
    assert_eq!(m.plugged_mib, 512);
    assert_eq!(m.resize.phase, ResizePhase::Plugging);
    let mut seen = vec![m.plugged_mib];
    for _ in 0..100 {
        let r = h.raw(Method::GET, &path, t, None).await;
        let m: MemoryInfo = r.json().unwrap_or_else(|e| panic!("{e}"));
        seen.push(m.plugged_mib);
        if m.plugged_mib == m.requested_mib {
            assert_eq!(m.resize.phase, ResizePhase::Idle);
            break;
        }
    }
    assert_eq!(seen.last(), Some(&1024));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    // Shrink back with the typed client.
    let acc = h
        .unix
        .resize_memory(&vm.id, 512)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(acc.location, path);
    assert_eq!(acc.memory.resize.phase, ResizePhase::Unplugging);
    // Refusals: below boot RAM, above the region, misaligned: 409 and nothing changes.
    for body in [
        r#"{"requested_mib": 256}"#,
        r#"{"requested_mib": 4096}"#,
        r#"{"requested_mib": 513}"#,
    ] {
        let before = h.snapshot().await;
        let r = h.raw(Method::PUT, &path, t, Some(body)).await;
        assert_error(&r, 409, "conflict");
        assert_eq!(h.snapshot().await, before);
    }
    // A VM never started has no driver yet.
    let cold = create(
        &h,
        &json!({"memory_mib": 256, "start": false, "hotplug": {"region_mib": 128}}).to_string(),
    )
    .await;
    let r = h
        .raw(
            Method::PUT,
            &format!("/v1/vms/{}/memory", cold.id),
            t,
            Some(r#"{"requested_mib": 384}"#),
        )
        .await;
    assert_error(&r, 409, "conflict");
    let msg: Value = serde_json::from_slice(&r.body).unwrap_or_default();
    assert!(msg["message"]
        .as_str()
        .unwrap_or_default()
        .contains("driver not ready"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balloon_set_and_stats() {
    let h = Harness::start().await;
    let vm = create(&h, &hotplug_vm()).await;
    let r = h
        .raw(
            Method::PUT,
            &format!("/v1/vms/{}/balloon", vm.id),
            "/v1/vms/{id}/balloon",
            Some(r#"{"target_mib": 100}"#),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(
        r.json::<BalloonInfo>().map(|b| b.target_mib).ok(),
        Some(100)
    );
    let r = h
        .raw(
            Method::GET,
            &format!("/v1/vms/{}/balloon/stats", vm.id),
            "/v1/vms/{id}/balloon/stats",
            None,
        )
        .await;
    let s: BalloonStats = r.json().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((s.target_mib, s.actual_mib), (100, 100));
    assert_eq!(s.total_mib, Some(412));
    // Every tag Linux 6.12 sends has a field (validated against the spec by `raw`).
    assert_eq!(s.swap_in_bytes, Some(0));
    assert_eq!(s.direct_reclaim_bytes, Some(0));
    assert_eq!(s.oom_kills, Some(0));
    let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    assert!(json.get("swap_in_pages").is_none(), "{json}");
    // Above guest RAM: 409. No balloon device: 409.
    let before = h.snapshot().await;
    let r = h
        .raw(
            Method::PUT,
            &format!("/v1/vms/{}/balloon", vm.id),
            "/v1/vms/{id}/balloon",
            Some(r#"{"target_mib": 4096}"#),
        )
        .await;
    assert_error(&r, 409, "conflict");
    assert_eq!(h.snapshot().await, before);
    let plain = create(&h, r#"{"memory_mib": 128}"#).await;
    let e = h.unix.balloon_stats(&plain.id).await;
    assert!(
        matches!(e, Err(ref e) if e.kind() == Some(ErrorKind::Conflict)),
        "{e:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_openapi_are_served() {
    let h = Harness::start().await;
    let vm = create(&h, &hotplug_vm()).await;
    let _ = h.unix.resize_memory(&vm.id, 640).await;
    let r = h.raw(Method::GET, "/metrics", "/metrics", None).await;
    let text = String::from_utf8_lossy(&r.body);
    for needle in [
        "tidepool_pool_memory_bytes{node=\"0\",kind=\"total\"}",
        &format!("tidepool_vm_memory_bytes{{vm=\"{}\",kind=\"requested\"}} {}", vm.id, 640u64 << 20),
        &format!("tidepool_device_events_total{{vm=\"{}\",device=\"virtio-mem\",event=\"resize_requests\"}} 1", vm.id),
        "tidepool_pool_alloc_latency_seconds_count 0",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let doc = h.unix.openapi().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(doc, h.spec.doc);
    let r = h
        .raw(Method::GET, "/v1/openapi.json", "/v1/openapi.json", None)
        .await;
    assert_eq!(r.status.as_u16(), 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_resizes_across_five_vms() {
    let h = Harness::start().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(create(&h, &hotplug_vm()).await.id);
    }
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        for j in 0..2u64 {
            let client = if j == 0 {
                h.unix.clone()
            } else {
                h.tcp.clone()
            };
            let id = id.clone();
            let target = 512 + 128 * (i as u64 + 1) + 2 * j;
            tasks.push(tokio::spawn(async move {
                (id.clone(), target, client.resize_memory(&id, target).await)
            }));
        }
    }
    let mut accepted = std::collections::HashMap::<String, Vec<u64>>::new();
    for t in tasks {
        let (id, target, r) = t.await.unwrap_or_else(|e| panic!("{e}"));
        let acc = r.unwrap_or_else(|e| panic!("resize {id} to {target}: {e}"));
        assert_eq!(acc.location, format!("/v1/vms/{id}/memory"));
        accepted.entry(id).or_default().push(target);
    }
    assert_eq!(accepted.values().map(Vec::len).sum::<usize>(), 10);
    for id in &ids {
        let mut last = None;
        for _ in 0..100 {
            let r = h
                .raw(
                    Method::GET,
                    &format!("/v1/vms/{id}/memory"),
                    "/v1/vms/{id}/memory",
                    None,
                )
                .await;
            let m: MemoryInfo = r.json().unwrap_or_else(|e| panic!("{e}"));
            if m.plugged_mib == m.requested_mib {
                last = Some(m.requested_mib);
                break;
            }
        }
        let last = last.unwrap_or_else(|| panic!("{id} never converged"));
        assert!(
            accepted[id].contains(&last),
            "{id}: {last} not among {:?}",
            accepted[id]
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_vm_does_not_block_other_vms() {
    let h = Harness::start().await;
    let stuck = create(&h, &hotplug_vm()).await;
    let other = create(&h, &hotplug_vm()).await;
    let hold = h.backend.hold(&stuck.id);
    let client = h.unix.clone();
    let stuck_id = stuck.id.clone();
    let pending = tokio::spawn(async move { client.get_vm(&stuck_id).await });
    let pending_resize = {
        let client = h.tcp.clone();
        let id = stuck.id.clone();
        tokio::spawn(async move { client.resize_memory(&id, 640).await })
    };
    // Requests for the other VM and host-wide ones complete while the stuck VM blocks.
    // (The outer timeout only turns a hang into a failure.)
    let guard = Duration::from_secs(20);
    let work = async {
        for _ in 0..5 {
            h.unix
                .get_vm(&other.id)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            h.unix
                .resize_memory(&other.id, 640)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            h.tcp
                .get_memory(&other.id)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            h.unix
                .set_state(&other.id, StateAction::Pause)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            h.unix
                .set_state(&other.id, StateAction::Resume)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            h.unix.list_vms().await.unwrap_or_else(|e| panic!("{e}"));
        }
    };
    assert!(
        tokio::time::timeout(guard, work).await.is_ok(),
        "other VM's requests blocked"
    );
    assert!(
        !pending.is_finished(),
        "the stuck VM's request cannot have completed"
    );
    assert!(h.backend.is_held(&stuck.id));
    drop(hold);
    let got = tokio::time::timeout(guard, pending).await;
    let got = got
        .unwrap_or_else(|_| panic!("stuck request never completed"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.map(|v| v.id).ok(), Some(stuck.id.clone()));
    let resized = tokio::time::timeout(guard, pending_resize).await;
    assert!(matches!(resized, Ok(Ok(Ok(_)))), "{resized:?}");
    h.stop().await;
}
