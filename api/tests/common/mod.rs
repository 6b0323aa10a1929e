//! Shared helpers of the HTTP tests: a real server on a temporary Unix socket (and loopback
//! TCP), a real client, and a checker that validates every response against the OpenAPI spec.
#![allow(dead_code)]

use hyper::Method;
use serde_json::json;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tidepool_api::client::RawResponse;
use tidepool_api::server::{ClientTimeouts, ServeConfig, Server, TcpConfig};
use tidepool_api::testing::MemBackend;
use tidepool_api::types::VmInfo;
use tidepool_api::{ApiBackend, Client};

/// Per-VM in-flight limit of the test servers.
pub const MAX_INFLIGHT: usize = 4;
pub const TOKEN: &str = "test-token-0123456789abcdef";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "tp-api-{}-{}-{tag}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server with its backend and clients.
pub struct Harness {
    pub backend: MemBackend,
    pub unix: Client,
    pub tcp: Client,
    pub tcp_addr: std::net::SocketAddr,
    pub socket: PathBuf,
    pub spec: Spec,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tidepool_api::ServeError>>>,
    pub dir: TempDir,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(MemBackend::default(), Duration::from_secs(30)).await
    }

    pub async fn start_with(backend: MemBackend, backend_timeout: Duration) -> Harness {
        Self::start_full(backend, backend_timeout, ClientTimeouts::default()).await
    }

    pub async fn start_full(
        backend: MemBackend,
        backend_timeout: Duration,
        client_timeouts: ClientTimeouts,
    ) -> Harness {
        let dir = TempDir::new("srv");
        let socket = dir.0.join("api.sock");
        let token_file = dir.0.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap_or_else(|e| panic!("{e}"));
        let cfg = ServeConfig {
            socket_path: socket.clone(),
            tcp: Some(TcpConfig {
                addr: "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
                token_file,
            }),
            body_limit: 64 * 1024,
            backend_timeout,
            max_inflight_per_vm: MAX_INFLIGHT,
            client_timeouts,
        };
        let server =
            Server::bind(Arc::new(backend.clone()), cfg).unwrap_or_else(|e| panic!("bind: {e}"));
        let tcp_addr = server
            .tcp_addr()
            .unwrap_or_else(|| panic!("no TCP address"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Harness {
            backend,
            unix: Client::unix(&socket).with_timeout(Duration::from_secs(20)),
            tcp: Client::tcp(tcp_addr, TOKEN).with_timeout(Duration::from_secs(20)),
            tcp_addr,
            socket,
            spec: Spec::load(),
            stop: Some(tx),
            task: Some(task),
            dir,
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("server failed: {e}"),
                Err(e) => panic!("server task: {e}"),
            }
        }
    }

    /// Sends a raw request over the Unix socket and validates the response against the spec.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        template: &str,
        body: Option<&str>,
    ) -> RawResponse {
        let r = self
            .unix
            .send_raw(method.clone(), path, body.map(|b| b.as_bytes().to_vec()))
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        self.spec.check(&method, template, &r);
        r
    }

    /// Like [`Harness::snapshot`] but without asking about VM `skip` (which may be held).
    pub async fn snapshot_without(&self, skip: &str) -> Value {
        let mut out = Vec::new();
        for vm in self.backend.list_vms().unwrap_or_default() {
            if vm.id != skip {
                let mem = self.backend.peek(&vm.id);
                out.push(serde_json::json!({ "vm": vm, "memory": format!("{mem:?}") }));
            }
        }
        Value::Array(out)
    }

    /// The VM list (validated) plus each VM's memory and balloon figures read directly from
    /// the backend (without advancing a resize), to compare state before and after a request.
    pub async fn snapshot(&self) -> Value {
        let vms = self.raw(Method::GET, "/v1/vms", "/v1/vms", None).await;
        let list: Value = serde_json::from_slice(&vms.body).unwrap_or_default();
        let mut out = Vec::new();
        for vm in list.as_array().cloned().unwrap_or_default() {
            let id = vm["id"].as_str().unwrap_or_default().to_string();
            let mem = self.backend.peek(&id);
            out.push(serde_json::json!({ "vm": vm, "memory": format!("{mem:?}") }));
        }
        Value::Array(out)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The OpenAPI document, for validating responses.
pub struct Spec {
    pub doc: Value,
}

impl Spec {
    pub fn load() -> Spec {
        let doc = serde_json::from_str(&tidepool_api::openapi::spec_json())
            .unwrap_or_else(|e| panic!("spec is not JSON: {e}"));
        Spec { doc }
    }

    /// Checks that `r` is a response the spec documents for `method template`, and that its
    /// body validates against the documented schema.
    pub fn check(&self, method: &Method, template: &str, r: &RawResponse) {
        let m = method.as_str().to_ascii_lowercase();
        let op = &self.doc["paths"][template][&m];
        assert!(op.is_object(), "spec has no {m} {template}");
        let status = r.status.as_u16().to_string();
        let resp = &op["responses"][&status];
        assert!(
            resp.is_object(),
            "spec does not document HTTP {status} for {m} {template}; body: {}",
            String::from_utf8_lossy(&r.body)
        );
        let content = &resp["content"];
        let Some(content) = content.as_object() else {
            assert!(
                r.body.is_empty(),
                "{m} {template} {status} should have no body"
            );
            return;
        };
        let ctype = r
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let (declared, media) = content
            .iter()
            .find(|(k, _)| ctype.starts_with(k.as_str()))
            .unwrap_or_else(|| {
                panic!("{m} {template} {status}: content type {ctype:?} not in spec")
            });
        if declared != "application/json" {
            assert!(!r.body.is_empty());
            return;
        }
        let body: Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{m} {template} {status}: body is not JSON: {e}"));
        let mut schema = media["schema"].clone();
        if let Value::Object(o) = &mut schema {
            o.insert("components".into(), self.doc["components"].clone());
        }
        let validator = jsonschema::validator_for(&schema)
            .unwrap_or_else(|e| panic!("schema for {m} {template} {status}: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{m} {template} {status}: body {body} does not match the spec: {errors:?}"
        );
    }
}

/// Asserts that a response is a JSON error with the given status and code.
pub fn assert_error(r: &RawResponse, status: u16, code: &str) {
    assert_eq!(
        r.status.as_u16(),
        status,
        "body: {}",
        String::from_utf8_lossy(&r.body)
    );
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
    assert_eq!(v["code"], code, "body: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "body: {v}"
    );
}

/// method, path, path template, body, expected status, expected code.
pub type Case = (
    Method,
    String,
    &'static str,
    Option<String>,
    u16,
    &'static str,
);

pub fn hotplug_vm() -> String {
    json!({"vcpus": 2, "memory_mib": 512, "hotplug": {"region_mib": 1024, "block_mib": 2},
           "balloon": {"free_page_reporting": true, "stats_interval_s": 1}})
    .to_string()
}

pub async fn create(h: &Harness, body: &str) -> VmInfo {
    let r = h.raw(Method::POST, "/v1/vms", "/v1/vms", Some(body)).await;
    assert_eq!(
        r.status.as_u16(),
        201,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let info: VmInfo = r.json().unwrap_or_else(|e| panic!("{e}"));
    let loc = r.headers.get("location").and_then(|v| v.to_str().ok());
    assert_eq!(loc, Some(format!("/v1/vms/{}", info.id).as_str()));
    info
}
