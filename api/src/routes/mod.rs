//! HTTP handlers and the router. Handlers are thin: extract, validate, call the backend on a
//! blocking thread, render.

pub mod host;
pub mod memory;
pub mod vms;

use crate::backend::ApiBackend;
use crate::error::{ApiError, ErrorKind};
use crate::validate;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Key of host-wide calls (host, list, create, metrics) in the in-flight table.
const HOST_KEY: &str = "*host";

/// Limits how many backend calls per VM may be in flight. A stuck VM then ties up at most
/// that many blocking threads; further requests for it get 503 at once, and requests for
/// other VMs are unaffected.
#[derive(Debug)]
pub struct InFlight {
    max: usize,
    map: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl InFlight {
    /// A table allowing `max` calls per key.
    pub fn new(max: usize) -> Self {
        InFlight {
            max: max.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Semaphore>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_acquire(self: &Arc<Self>, key: &str) -> Option<InFlightGuard> {
        let sem = Arc::clone(
            self.lock()
                .entry(key.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.max))),
        );
        let permit = Arc::clone(&sem).try_acquire_owned().ok()?;
        Some(InFlightGuard {
            table: Arc::clone(self),
            key: key.to_string(),
            sem,
            permit: Some(permit),
        })
    }

    /// Number of keys with calls in flight (for tests).
    pub fn keys(&self) -> usize {
        self.lock().len()
    }
}

/// Holds one in-flight slot until the backend call returns; removes idle entries.
struct InFlightGuard {
    table: Arc<InFlight>,
    key: String,
    sem: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut map = self.table.lock();
        // Entries are cloned only under this lock: two references (the map's and ours) and
        // all permits back means nobody else uses it.
        if Arc::strong_count(&self.sem) == 2 && self.sem.available_permits() == self.table.max {
            map.remove(&self.key);
        }
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The VMM.
    pub backend: Arc<dyn ApiBackend>,
    /// How long a handler waits for the backend before answering 504.
    pub timeout: Duration,
    /// Per-VM limit of calls in flight.
    pub inflight: Arc<InFlight>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("timeout", &self.timeout)
            .field("inflight", &self.inflight)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// Runs a host-wide call (see [`ApiState::call_vm`]).
    pub async fn call<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        F: FnOnce(&dyn ApiBackend) -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        self.call_vm(HOST_KEY, f).await
    }

    /// Runs `f` against the backend on a blocking thread, so that a slow VM does not hold up
    /// the async workers. Answers `Busy` when too many calls for `vm` are already in flight,
    /// and `Timeout` when the backend takes longer than `self.timeout` (the call itself then
    /// still completes in the background and keeps its in-flight slot until it does).
    pub async fn call_vm<T, F>(&self, vm: &str, f: F) -> Result<T, ApiError>
    where
        F: FnOnce(&dyn ApiBackend) -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let guard = self.inflight.try_acquire(vm).ok_or_else(|| {
            ApiError::new(
                ErrorKind::Busy,
                format!("too many requests for {vm} are still waiting for it; try again later"),
            )
        })?;
        let backend = Arc::clone(&self.backend);
        let task = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            f(&*backend)
        });
        match tokio::time::timeout(self.timeout, task).await {
            Err(_) => Err(ApiError::new(
                ErrorKind::Timeout,
                format!("the VMM did not answer within {:?}", self.timeout),
            )),
            Ok(Err(join)) => Err(ApiError::internal(format!("backend call failed: {join}"))),
            Ok(Ok(result)) => result,
        }
    }
}

/// A JSON body extractor whose rejections are JSON `{code, message}` errors: syntax errors,
/// wrong types, unknown fields and numbers out of range are 400, a missing JSON content type
/// is 415, a body over the limit is 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

/// Maps axum's JSON rejection to an [`ApiError`].
pub fn json_rejection(rej: JsonRejection) -> ApiError {
    match rej {
        JsonRejection::JsonDataError(e) => {
            ApiError::bad_request(format!("invalid request body: {}", e.body_text()))
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::bad_request(format!("malformed JSON: {}", e.body_text()))
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            ErrorKind::UnsupportedMediaType,
            "expected Content-Type: application/json",
        ),
        other => {
            let status = other.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorKind::PayloadTooLarge, "request body too large")
            } else if status.is_server_error() {
                ApiError::internal(other.body_text())
            } else {
                ApiError::bad_request(other.body_text())
            }
        }
    }
}

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

/// The `{id}` path parameter, validated (400 for a malformed id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for VmId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        validate::vm_id(&id)?;
        Ok(VmId(id))
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        "method not allowed on this route",
    )
}

/// The router with every endpoint, a JSON 404/405 fallback and the body size limit.
pub fn router(state: ApiState, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/host", get(host::get_host))
        .route("/v1/vms", post(vms::create_vm).get(vms::list_vms))
        .route("/v1/vms/{id}", get(vms::get_vm).delete(vms::delete_vm))
        .route("/v1/vms/{id}/state", put(vms::set_state))
        .route(
            "/v1/vms/{id}/memory",
            put(memory::resize_memory).get(memory::get_memory),
        )
        .route("/v1/vms/{id}/balloon", put(memory::set_balloon))
        .route("/v1/vms/{id}/balloon/stats", get(memory::balloon_stats))
        .route("/metrics", get(host::metrics))
        .route("/v1/openapi.json", get(host::openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemBackend;

    fn state(max: usize) -> ApiState {
        ApiState {
            backend: Arc::new(MemBackend::default()),
            timeout: Duration::from_secs(30),
            inflight: Arc::new(InFlight::new(max)),
        }
    }

    #[tokio::test]
    async fn in_flight_entries_are_removed_when_idle() {
        let st = state(2);
        for id in ["vm-1", "vm-2", "vm-3"] {
            let r = st.call_vm(id, |b| b.list_vms()).await;
            assert!(r.is_ok());
        }
        assert_eq!(st.inflight.keys(), 0);
    }

    #[tokio::test]
    async fn in_flight_limit_is_per_key() {
        let st = state(1);
        let a = st.inflight.try_acquire("vm-1");
        assert!(a.is_some());
        assert!(st.inflight.try_acquire("vm-1").is_none());
        let err = st.call_vm("vm-1", |b| b.list_vms()).await;
        assert_eq!(err.map_err(|e| e.kind).err(), Some(ErrorKind::Busy));
        assert!(st.call_vm("vm-2", |b| b.list_vms()).await.is_ok());
        drop(a);
        assert!(st.call_vm("vm-1", |b| b.list_vms()).await.is_ok());
        assert_eq!(st.inflight.keys(), 0);
    }
}
