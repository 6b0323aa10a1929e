//! Memory endpoints: resize (virtio-mem), memory figures, balloon.

use super::{ApiJson, ApiState, VmId};
use crate::error::{ApiError, ErrorBody};
use crate::types::{BalloonInfo, BalloonRequest, BalloonStats, MemoryInfo, ResizeRequest};
use crate::validate;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Sets the requested total guest RAM. Asynchronous: answers 202 at once, with `Location`
/// pointing at `GET /v1/vms/{id}/memory`, where the progress shows.
#[utoipa::path(
    put,
    path = "/v1/vms/{id}/memory",
    tag = "memory",
    params(("id" = String, Path, description = "VM id")),
    request_body = ResizeRequest,
    responses(
        (status = 202, description = "Resize accepted; poll `Location`", body = MemoryInfo,
            headers(("Location" = String, description = "Status link: GET /v1/vms/{id}/memory"))),
        (status = 400, description = "Malformed body or id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 409, description = "Refused: driver not ready, below boot RAM, above the region, ...", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn resize_memory(
    State(st): State<ApiState>,
    VmId(id): VmId,
    ApiJson(req): ApiJson<ResizeRequest>,
) -> Result<Response, ApiError> {
    validate::resize(&req)?;
    let requested = req.requested_mib;
    let id2 = id.clone();
    // A backend that records the target without blocking answers here, on the async worker
    // (no thread hand-off); otherwise the call goes to a blocking thread like every other.
    let now = st.backend.resize_memory_now(&id, requested);
    let result = match now {
        Some(r) => r,
        None => {
            st.call_vm(&id, move |b| b.resize_memory(&id2, requested))
                .await
        }
    };
    let info = result.inspect_err(|e| {
        tracing::warn!(vm_id = %id, requested_mib = requested, error = %e, "resize refused");
    })?;
    tracing::info!(
        vm_id = %id,
        requested_mib = requested,
        plugged_mib = info.plugged_mib,
        "resize accepted"
    );
    let location = format!("/v1/vms/{id}/memory");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(info),
    )
        .into_response())
}

/// Guest memory figures and resize progress.
#[utoipa::path(
    get,
    path = "/v1/vms/{id}/memory",
    tag = "memory",
    params(("id" = String, Path, description = "VM id")),
    responses(
        (status = 200, description = "Memory figures", body = MemoryInfo),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn get_memory(
    State(st): State<ApiState>,
    VmId(id): VmId,
) -> Result<Json<MemoryInfo>, ApiError> {
    st.call_vm(&id.clone(), move |b| b.get_memory(&id))
        .await
        .map(Json)
}

/// Sets the balloon target.
#[utoipa::path(
    put,
    path = "/v1/vms/{id}/balloon",
    tag = "memory",
    params(("id" = String, Path, description = "VM id")),
    request_body = BalloonRequest,
    responses(
        (status = 200, description = "Balloon target set", body = BalloonInfo),
        (status = 400, description = "Malformed body or id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 409, description = "No balloon device, or target above guest RAM", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn set_balloon(
    State(st): State<ApiState>,
    VmId(id): VmId,
    ApiJson(req): ApiJson<BalloonRequest>,
) -> Result<Json<BalloonInfo>, ApiError> {
    validate::balloon(&req)?;
    let target = req.target_mib;
    let id2 = id.clone();
    let info = st
        .call_vm(&id, move |b| b.set_balloon(&id2, target))
        .await
        .inspect_err(|e| {
            tracing::warn!(vm_id = %id, target_mib = target, error = %e, "balloon target refused");
        })?;
    tracing::info!(vm_id = %id, target_mib = target, actual_mib = info.actual_mib, "balloon target set");
    Ok(Json(info))
}

/// Balloon sizes and the guest's last statistics.
#[utoipa::path(
    get,
    path = "/v1/vms/{id}/balloon/stats",
    tag = "memory",
    params(("id" = String, Path, description = "VM id")),
    responses(
        (status = 200, description = "Balloon statistics", body = BalloonStats),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 409, description = "No balloon device", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn balloon_stats(
    State(st): State<ApiState>,
    VmId(id): VmId,
) -> Result<Json<BalloonStats>, ApiError> {
    st.call_vm(&id.clone(), move |b| b.balloon_stats(&id))
        .await
        .map(Json)
}
