//! Error paths and access control of the REST API over a real Unix socket and real loopback
//! TCP: malformed bodies, unknown ids, forbidden transitions, tokens, socket mode, timeouts.
//! Every response is validated against the OpenAPI document, and refused requests change nothing.

mod common;

use common::{assert_error, create, hotplug_vm, Case, Harness, MAX_INFLIGHT, TOKEN};
use hyper::Method;
use serde_json::{json, Value};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;
use tidepool_api::server::{ServeConfig, Server, TcpConfig};
use tidepool_api::testing::MemBackend;
use tidepool_api::types::*;
use tidepool_api::{Client, ServeError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_json_4xx_and_change_nothing() {
    let h = Harness::start().await;
    let vm = create(&h, &hotplug_vm()).await;
    let vms = "/v1/vms";
    let mem = format!("/v1/vms/{}/memory", vm.id);
    let state = format!("/v1/vms/{}/state", vm.id);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            vms.into(),
            vms,
            Some("{".into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some("not json".into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some("{}".into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": 128, "colour": "red"}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": "128"}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": -1}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": 1e30}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": 18446744073709551616}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": 18446744073709551615}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": 128, "vcpus": 0}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": 128, "hotplug": {"region_mib": 100}}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": 128, "backing": {"kind": "tmpfs"}}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": 128, "balloon": {"extra": 1}}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(r#"{"memory_mib": 128, "numa": {"policy": "bind", "nodes": [7]}}"#.into()),
            409,
            "conflict",
        ),
        (
            Method::POST,
            vms.into(),
            vms,
            Some(format!(
                r#"{{"memory_mib": 128, "kernel": "{}"}}"#,
                "x".repeat(70_000)
            )),
            413,
            "payload_too_large",
        ),
        (
            Method::PUT,
            mem.clone(),
            "/v1/vms/{id}/memory",
            Some(r#"{"requested_mib": true}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            mem.clone(),
            "/v1/vms/{id}/memory",
            Some(r#"{"requested_mib": 1024, "now": true}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            mem.clone(),
            "/v1/vms/{id}/memory",
            Some(r#"{"requested_mib": 99999999999999999999}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            mem.clone(),
            "/v1/vms/{id}/memory",
            Some(r#"{"requested_mib": 0}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            state.clone(),
            "/v1/vms/{id}/state",
            Some(r#"{"action": "pause", "force": 1}"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            state.clone(),
            "/v1/vms/{id}/state",
            Some(r#"[]"#.into()),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            "/v1/vms/vm-999/memory".into(),
            "/v1/vms/{id}/memory",
            Some(r#"{"requested_mib": 1024}"#.into()),
            404,
            "not_found",
        ),
        (
            Method::PUT,
            "/v1/vms/vm-999/state".into(),
            "/v1/vms/{id}/state",
            Some(r#"{"action": "pause"}"#.into()),
            404,
            "not_found",
        ),
        (
            Method::DELETE,
            "/v1/vms/vm-999".into(),
            "/v1/vms/{id}",
            None,
            404,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/vms/bad%2Fid".into(),
            "/v1/vms/{id}",
            None,
            400,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/vms/vm-999/balloon/stats".into(),
            "/v1/vms/{id}/balloon/stats",
            None,
            404,
            "not_found",
        ),
    ];
    for (method, path, template, body, status, code) in cases {
        let before = h.snapshot().await;
        let r = h
            .raw(method.clone(), &path, template, body.as_deref())
            .await;
        assert_error(&r, status, code);
        assert_eq!(h.snapshot().await, before, "{method} {path} changed state");
    }
    // Unknown route and wrong method: JSON too.
    let r = h.unix.send_raw(Method::GET, "/v2/nothing", None).await;
    assert_error(&r.unwrap_or_else(|e| panic!("{e}")), 404, "not_found");
    let r = h.unix.send_raw(Method::PATCH, "/v1/vms", None).await;
    assert_error(
        &r.unwrap_or_else(|e| panic!("{e}")),
        405,
        "method_not_allowed",
    );
    assert_eq!(h.unix.list_vms().await.map(|v| v.len()).ok(), Some(1));
    h.stop().await;
}

/// An HTTP/1 connection over `stream` for requests built by hand (its connection task
/// spawned).
async fn http1_sender<S, B>(stream: S) -> hyper::client::conn::http1::SendRequest<B>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_content_type_is_415() {
    let h = Harness::start().await;
    // Build the request by hand: the client always sets the content type with a body.
    let stream = tokio::net::UnixStream::connect(&h.socket)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut sender = http1_sender(stream).await;
    let req = hyper::Request::post("/v1/vms")
        .header("host", "localhost")
        .body(http_body_util::Full::new(hyper::body::Bytes::from_static(
            br#"{"memory_mib": 128}"#,
        )))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = sender
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 415);
    assert_eq!(h.unix.list_vms().await.map(|v| v.len()).ok(), Some(0));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_requires_the_token_and_401_changes_nothing() {
    let h = Harness::start().await;
    let vm = create(&h, &hotplug_vm()).await;
    let body = br#"{"memory_mib": 128}"#.to_vec();
    for client in [
        Client::tcp(h.tcp_addr, "wrong-token-0123456789"),
        Client::tcp(h.tcp_addr, ""),
    ] {
        let before = h.snapshot().await;
        for (m, p, t, b) in [
            (
                Method::POST,
                "/v1/vms".to_string(),
                "/v1/vms",
                Some(body.clone()),
            ),
            (
                Method::DELETE,
                format!("/v1/vms/{}", vm.id),
                "/v1/vms/{id}",
                None,
            ),
            (Method::GET, "/v1/host".to_string(), "/v1/host", None),
            (Method::GET, "/metrics".to_string(), "/metrics", None),
        ] {
            let r = client
                .send_raw(m.clone(), &p, b)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            h.spec.check(&m, t, &r);
            assert_error(&r, 401, "unauthorized");
            assert_eq!(
                r.headers
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer")
            );
        }
        assert_eq!(h.snapshot().await, before);
    }
    // No Authorization header at all.
    let stream = tokio::net::TcpStream::connect(h.tcp_addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut sender = http1_sender(stream).await;
    let req = hyper::Request::delete(format!("/v1/vms/{}", vm.id))
        .header("host", "localhost")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = sender
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 401);
    assert!(h.unix.get_vm(&vm.id).await.is_ok());

    // With the token, TCP works like the socket.
    let created = h
        .tcp
        .create_vm(&CreateVmRequest::with_memory(256))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.tcp.list_vms().await.map(|v| v.len()).ok(), Some(2));
    h.tcp
        .delete_vm(&created.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(h.tcp.host().await.is_ok());
    let _ = TOKEN;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_is_0600_and_removed_on_shutdown() {
    let h = Harness::start().await;
    let meta = std::fs::metadata(&h.socket).unwrap_or_else(|e| panic!("{e}"));
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Nothing else was left in the directory (the private bind directory is gone).
    let names: Vec<String> = std::fs::read_dir(&h.dir.0)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut names = names;
    names.sort();
    assert_eq!(names, vec!["api.sock".to_string(), "token".to_string()]);

    // A second daemon on the same socket is refused while the first listens.
    let second = Server::bind(
        Arc::new(MemBackend::default()),
        ServeConfig::unix(&h.socket),
    );
    assert!(
        matches!(second, Err(ServeError::AlreadyRunning(_))),
        "{second:?}"
    );
    let socket = h.socket.clone();
    h.stop().await;
    assert!(!socket.exists(), "socket removed on graceful shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_tcp_is_refused() {
    let dir = common::TempDir::new("nonloop");
    let token = dir.0.join("token");
    let _ = std::fs::write(&token, TOKEN);
    for addr in ["0.0.0.0:0", "192.0.2.1:8080", "[::]:0"] {
        let cfg = ServeConfig {
            tcp: Some(TcpConfig {
                addr: addr.parse().unwrap_or_else(|e| panic!("{e}")),
                token_file: token.clone(),
            }),
            ..ServeConfig::unix(dir.0.join("s.sock"))
        };
        let r = Server::bind(Arc::new(MemBackend::default()), cfg);
        assert!(
            matches!(r, Err(ServeError::NonLoopback(_))),
            "{addr}: {r:?}"
        );
    }
    assert!(
        !dir.0.join("s.sock").exists(),
        "nothing bound after a refusal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_does_not_answer_gives_504() {
    let h = Harness::start_with(MemBackend::default(), Duration::from_millis(300)).await;
    let vm = create(&h, &hotplug_vm()).await;
    let hold = h.backend.hold(&vm.id);
    let r = h
        .raw(
            Method::GET,
            &format!("/v1/vms/{}", vm.id),
            "/v1/vms/{id}",
            None,
        )
        .await;
    drop(hold);
    assert_eq!(r.status.as_u16(), 504);
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
    assert_eq!(v["code"], "timeout");
    assert!(h.unix.get_vm(&vm.id).await.is_ok());
    h.stop().await;
}

#[test]
fn the_spec_checker_rejects_bodies_that_do_not_match() {
    let spec = common::Spec::load();
    let raw = |status: u16, body: Value| tidepool_api::client::RawResponse {
        status: hyper::StatusCode::from_u16(status).unwrap_or_default(),
        headers: {
            let mut h = hyper::HeaderMap::new();
            h.insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/json"),
            );
            h
        },
        body: hyper::body::Bytes::from(body.to_string()),
    };
    let good = json!({"id": "vm-1", "state": "running", "vcpus": 1, "memory_mib": 128,
                      "boot_source": "default_guest", "backing": {"kind": "anonymous", "thp": true}});
    spec.check(&Method::GET, "/v1/vms/{id}", &raw(200, good.clone()));
    let mut extra = good.clone();
    extra["surprise"] = json!(1);
    let mut wrong_type = good.clone();
    wrong_type["vcpus"] = json!("one");
    let mut bad_enum = good;
    bad_enum["state"] = json!("sleeping");
    for bad in [extra, wrong_type, bad_enum, json!({"code": "x"})] {
        let r = std::panic::catch_unwind(|| {
            spec.check(&Method::GET, "/v1/vms/{id}", &raw(200, bad.clone()))
        });
        assert!(r.is_err(), "checker accepted {bad}");
    }
    let r =
        std::panic::catch_unwind(|| spec.check(&Method::GET, "/v1/vms/{id}", &raw(418, json!({}))));
    assert!(r.is_err(), "undocumented status accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_vm_gets_503_beyond_its_in_flight_limit() {
    let h = Harness::start().await;
    let stuck = create(&h, &hotplug_vm()).await;
    let other = create(&h, &hotplug_vm()).await;
    let hold = h.backend.hold(&stuck.id);
    let mut pending = Vec::new();
    for _ in 0..MAX_INFLIGHT {
        let c = h.unix.clone();
        let id = stuck.id.clone();
        pending.push(tokio::spawn(async move { c.get_vm(&id).await }));
    }
    // Wait (bounded) until all of them are blocked inside the backend.
    let arrived = async {
        while h.backend.waiting(&stuck.id) < MAX_INFLIGHT {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    assert!(tokio::time::timeout(Duration::from_secs(20), arrived)
        .await
        .is_ok());
    let before = h.snapshot_without(&stuck.id).await;
    let r = h
        .raw(
            Method::PUT,
            &format!("/v1/vms/{}/state", stuck.id),
            "/v1/vms/{id}/state",
            Some(r#"{"action": "pause"}"#),
        )
        .await;
    assert_error(&r, 503, "busy");
    // Other VMs are served normally.
    assert!(h.unix.get_vm(&other.id).await.is_ok());
    assert_eq!(h.snapshot_without(&stuck.id).await, before);
    drop(hold);
    for p in pending {
        let r = tokio::time::timeout(Duration::from_secs(20), p).await;
        assert!(matches!(r, Ok(Ok(Ok(_)))), "{r:?}");
    }
    assert_eq!(
        h.unix.get_vm(&stuck.id).await.map(|v| v.state).ok(),
        Some(VmState::Running)
    );
    h.stop().await;
}
