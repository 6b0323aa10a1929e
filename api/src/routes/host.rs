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
    st.call(|b| b.host()).await.map(|h| Json(finite_host(h)))
}

/// JSON has no NaN or infinity (serde_json would print `null`, which the schema forbids):
/// a backend's non-finite ratio is reported as 0.
fn finite_host(mut h: HostInfo) -> HostInfo {
    let fix = |v: &mut f64| {
        if !v.is_finite() {
            *v = 0.0;
        }
    };
    fix(&mut h.overcommit_ratio);
    for n in &mut h.nodes {
        fix(&mut n.fragmentation_index);
        fix(&mut n.thp_share);
        fix(&mut n.overcommit_ratio);
    }
    h
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_ratios_become_zero() {
        let h = HostInfo {
            nodes: vec![crate::types::NodeInfo {
                node: 0,
                total_mib: 0,
                free_mib: 0,
                assigned_mib: 0,
                resident_mib: Default::default(),
                fragmentation_index: f64::NAN,
                thp_share: f64::INFINITY,
                overcommit_ratio: 0.5,
            }],
            total_mib: 0,
            free_mib: 0,
            assigned_mib: 0,
            overcommit_ratio: f64::NAN,
            vm_count: 0,
        };
        let h = finite_host(h);
        assert_eq!(h.overcommit_ratio, 0.0);
        assert_eq!(h.nodes[0].fragmentation_index, 0.0);
        assert_eq!(h.nodes[0].thp_share, 0.0);
        assert_eq!(h.nodes[0].overcommit_ratio, 0.5);
    }
}
