//! VM lifecycle endpoints: create, list, show, delete, state.

use super::{ApiJson, ApiState, VmId};
use crate::error::{ApiError, ErrorBody};
use crate::types::{CreateVmRequest, StateRequest, VmInfo};
use crate::validate;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Creates a VM (and starts it unless `start` is false).
#[utoipa::path(
    post,
    path = "/v1/vms",
    tag = "vms",
    request_body = CreateVmRequest,
    responses(
        (status = 201, description = "VM created; `Location` names it", body = VmInfo,
            headers(("Location" = String, description = "Path of the new VM"))),
        (status = 400, description = "Malformed or invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 409, description = "Cannot create (e.g. not enough memory)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
        (status = 501, description = "Unsupported configuration", body = ErrorBody),
    )
)]
pub async fn create_vm(
    State(st): State<ApiState>,
    ApiJson(req): ApiJson<CreateVmRequest>,
) -> Result<Response, ApiError> {
    validate::create_vm(&req)?;
    let (vcpus, memory_mib) = (req.vcpus, req.memory_mib);
    let info = st.call(move |b| b.create_vm(req)).await.inspect_err(|e| {
        tracing::warn!(error = %e, vcpus, memory_mib, "vm create refused");
    })?;
    tracing::info!(vm_id = %info.id, vcpus, memory_mib, state = info.state.as_str(), "vm created");
    let location = format!("/v1/vms/{}", info.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(info),
    )
        .into_response())
}

/// Lists all VMs.
#[utoipa::path(
    get,
    path = "/v1/vms",
    tag = "vms",
    responses(
        (status = 200, description = "All VMs", body = Vec<VmInfo>),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn list_vms(State(st): State<ApiState>) -> Result<Json<Vec<VmInfo>>, ApiError> {
    st.call(|b| b.list_vms()).await.map(Json)
}

/// Shows one VM.
#[utoipa::path(
    get,
    path = "/v1/vms/{id}",
    tag = "vms",
    params(("id" = String, Path, description = "VM id")),
    responses(
        (status = 200, description = "The VM", body = VmInfo),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn get_vm(State(st): State<ApiState>, VmId(id): VmId) -> Result<Json<VmInfo>, ApiError> {
    st.call_vm(&id.clone(), move |b| b.get_vm(&id))
        .await
        .map(Json)
}

/// Stops (if needed) and deletes a VM.
#[utoipa::path(
    delete,
    path = "/v1/vms/{id}",
    tag = "vms",
    params(("id" = String, Path, description = "VM id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn delete_vm(State(st): State<ApiState>, VmId(id): VmId) -> Result<StatusCode, ApiError> {
    let id2 = id.clone();
    st.call_vm(&id, move |b| b.delete_vm(&id2))
        .await
        .inspect_err(|e| tracing::warn!(vm_id = %id, error = %e, "vm delete refused"))?;
    tracing::info!(vm_id = %id, "vm deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Lifecycle transition: `start` (created -> running), `pause` (running -> paused),
/// `resume` (paused -> running), `stop` (created|running|paused -> stopped).
#[utoipa::path(
    put,
    path = "/v1/vms/{id}/state",
    tag = "vms",
    params(("id" = String, Path, description = "VM id")),
    request_body = StateRequest,
    responses(
        (status = 200, description = "The VM after the transition", body = VmInfo),
        (status = 400, description = "Malformed body or id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (TCP only)", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 409, description = "Transition not allowed from the current state", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn set_state(
    State(st): State<ApiState>,
    VmId(id): VmId,
    ApiJson(req): ApiJson<StateRequest>,
) -> Result<Json<VmInfo>, ApiError> {
    let id2 = id.clone();
    let action = req.action;
    let info = st
        .call_vm(&id, move |b| b.set_state(&id2, action))
        .await
        .inspect_err(|e| {
            tracing::warn!(vm_id = %id, action = action.as_str(), error = %e, "vm state change refused");
        })?;
    tracing::info!(vm_id = %id, action = action.as_str(), state = info.state.as_str(), "vm state changed");
    Ok(Json(info))
}
