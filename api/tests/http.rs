//! The REST API over a real Unix socket and real loopback TCP, with the real client, against
//! the in-memory backend. Every response is validated against the OpenAPI document.

mod common;

use common::{assert_error, create, hotplug_vm, Harness};
use hyper::Method;
use serde_json::{json, Value};
use std::future::Future;
use std::time::Duration;
use tidepool_api::client::RawResponse;
use tidepool_api::types::*;
use tidepool_api::ErrorKind;

/// `method /v1/vms/{id}{sub}` with `body`, validated against the spec's `/v1/vms/{id}{sub}`.
async fn on_vm(
    h: &Harness,
    method: Method,
    id: &str,
    sub: &str,
    body: Option<&str>,
) -> RawResponse {
    let path = format!("/v1/vms/{id}{sub}");
    h.raw(method, &path, &format!("/v1/vms/{{id}}{sub}"), body)
        .await
}

/// Awaits `request` and asserts that it was refused with 409 conflict and changed no VM.
async fn assert_conflict_changes_nothing(h: &Harness, request: impl Future<Output = RawResponse>) {
    let before = h.snapshot().await;
    assert_error(&request.await, 409, "conflict");
    assert_eq!(h.snapshot().await, before);
}

/// A typed client call failed with a conflict.
fn assert_client_conflict<T: std::fmt::Debug>(r: &Result<T, tidepool_api::client::ClientError>) {
    assert!(
        matches!(r, Err(e) if e.kind() == Some(ErrorKind::Conflict)),
        "{r:?}"
    );
}

/// The VM in a state change's response is in `state`.
fn assert_state(r: &RawResponse, state: VmState) {
    assert_eq!(r.json::<VmInfo>().map(|v| v.state).ok(), Some(state));
}

/// Reads VM `id`'s memory (at most 100 times) until the plugged size reaches the requested
/// one; every reading, the last one converged unless all 100 were not.
async fn memory_until_converged(h: &Harness, id: &str) -> Vec<MemoryInfo> {
    let mut readings = Vec::new();
    for _ in 0..100 {
        let r = on_vm(h, Method::GET, id, "/memory", None).await;
        let m: MemoryInfo = r.json().unwrap_or_else(|e| panic!("{e}"));
        let done = m.plugged_mib == m.requested_mib;
        readings.push(m);
        if done {
            break;
        }
    }
    readings
}

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

    let show = on_vm(&h, Method::GET, &a.id, "", None).await;
    assert_eq!(show.json::<VmInfo>().ok(), Some(a.clone()));

    // The typed client sees the same.
    assert_eq!(h.unix.get_vm(&a.id).await.ok(), Some(a.clone()));
    assert_eq!(h.unix.list_vms().await.map(|v| v.len()).ok(), Some(2));

    let host = h.raw(Method::GET, "/v1/host", "/v1/host", None).await;
    let host: HostInfo = host.json().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.vm_count, 2);
    assert_eq!(host.assigned_mib, 512 + 64);
    assert_eq!(host.nodes.len(), 2);

    let del = on_vm(&h, Method::DELETE, &a.id, "", None).await;
    assert_eq!(del.status.as_u16(), 204);
    let gone = on_vm(&h, Method::GET, &a.id, "", None).await;
    assert_error(&gone, 404, "not_found");
    let again = on_vm(&h, Method::DELETE, &a.id, "", None).await;
    assert_error(&again, 404, "not_found");
    assert_eq!(h.unix.list_vms().await.map(|v| v.len()).ok(), Some(1));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_transitions_and_forbidden_ones() {
    let h = Harness::start().await;
    let vm = create(&h, &json!({"memory_mib": 128, "start": false}).to_string()).await;
    let put = |action: &'static str| {
        let (h, id) = (&h, vm.id.clone());
        async move {
            let body = json!({ "action": action }).to_string();
            on_vm(h, Method::PUT, &id, "/state", Some(&body)).await
        }
    };
    // created: pause and resume are forbidden.
    for action in ["pause", "resume"] {
        assert_conflict_changes_nothing(&h, put(action)).await;
    }
    assert_state(&put("start").await, VmState::Running);
    assert_error(&put("start").await, 409, "conflict");
    assert_error(&put("resume").await, 409, "conflict");
    assert_state(&put("pause").await, VmState::Paused);
    assert_error(&put("pause").await, 409, "conflict");
    assert_state(&put("resume").await, VmState::Running);
    assert_state(&put("stop").await, VmState::Stopped);
    for action in ["start", "pause", "resume", "stop"] {
        assert_error(&put(action).await, 409, "conflict");
    }
    let r = put("explode").await;
    assert_error(&r, 400, "bad_request");
    // The typed client maps the error.
    assert_client_conflict(&h.unix.set_state(&vm.id, StateAction::Pause).await);
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
    let readings = memory_until_converged(&h, &vm.id).await;
    let last = readings.last().filter(|m| m.plugged_mib == m.requested_mib);
    assert_eq!(last.map(|m| m.resize.phase), Some(ResizePhase::Idle));
    let seen: Vec<u64> = std::iter::once(m.plugged_mib)
        .chain(readings.iter().map(|m| m.plugged_mib))
        .collect();
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
        assert_conflict_changes_nothing(&h, h.raw(Method::PUT, &path, t, Some(body))).await;
    }
    // A VM never started has no driver yet.
    let cold = create(
        &h,
        &json!({"memory_mib": 256, "start": false, "hotplug": {"region_mib": 128}}).to_string(),
    )
    .await;
    let body = r#"{"requested_mib": 384}"#;
    let r = on_vm(&h, Method::PUT, &cold.id, "/memory", Some(body)).await;
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
    let body = r#"{"target_mib": 100}"#;
    let r = on_vm(&h, Method::PUT, &vm.id, "/balloon", Some(body)).await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(
        r.json::<BalloonInfo>().map(|b| b.target_mib).ok(),
        Some(100)
    );
    let r = on_vm(&h, Method::GET, &vm.id, "/balloon/stats", None).await;
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
    let big = r#"{"target_mib": 4096}"#;
    assert_conflict_changes_nothing(&h, on_vm(&h, Method::PUT, &vm.id, "/balloon", Some(big)))
        .await;
    let plain = create(&h, r#"{"memory_mib": 128}"#).await;
    assert_client_conflict(&h.unix.balloon_stats(&plain.id).await);
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
        let last = memory_until_converged(&h, id)
            .await
            .pop()
            .filter(|m| m.plugged_mib == m.requested_mib)
            .map(|m| m.requested_mib)
            .unwrap_or_else(|| panic!("{id} never converged"));
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
