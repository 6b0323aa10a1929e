//! Host-wide endpoints: `GET /v1/host`, `GET /metrics`, `GET /v1/openapi.json`.

use super::ApiState;
use crate::error::{ApiError, ErrorBody};
use crate::types::HostInfo;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Host memory per NUMA node.
#[utoipa::path(
    get,
    path = "/v1/host",
    tag = "host",
    responses(
        (status = 200, description = "Host memory figures", body = HostInfo),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn get_host(State(st): State<ApiState>) -> Result<Json<HostInfo>, ApiError> {
    st.call(|b| b.host()).await.map(Json)
}

/// Prometheus (OpenMetrics) text: pool, per-VM and per-device figures and the allocator
/// latency histogram.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "host",
    responses(
        (status = 200, description = "OpenMetrics text", body = String,
            content_type = "application/openmetrics-text"),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn metrics(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let snap = st.call(|b| b.metrics()).await?;
    let text = crate::metrics::render(&snap)
        .map_err(|e| ApiError::internal(format!("rendering metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "host",
    responses(
        (status = 200, description = "The OpenAPI document", body = Object),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
    )
)]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::spec_json(),
    )
        .into_response()
}
