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
use std::sync::Arc;
use std::time::Duration;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The VMM.
    pub backend: Arc<dyn ApiBackend>,
    /// How long a handler waits for the backend before answering 504.
    pub timeout: Duration,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// Runs `f` against the backend on a blocking thread, so that a slow VM does not hold up
    /// the async workers. Answers `Timeout` when the backend takes longer than `self.timeout`
    /// (the call itself then still completes in the background).
    pub async fn call<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        F: FnOnce(&dyn ApiBackend) -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let backend = Arc::clone(&self.backend);
        let task = tokio::task::spawn_blocking(move || f(&*backend));
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
