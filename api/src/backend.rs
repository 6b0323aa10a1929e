//! The trait through which the API talks to the VMM.
//!
//! The VMM implements [`ApiBackend`]; the API crate does not depend on the VMM. Every method is
//! blocking and is called from `tokio::task::spawn_blocking`, so a slow or stuck VM never blocks
//! requests for other VMs. An implementation typically sends a command to the VM's own thread
//! and waits for the reply. Request bodies reach the backend only after they passed
//! [`crate::validate`]; the backend checks what depends on state (409 conflicts, 404 ids).

use crate::error::ApiError;
use crate::metrics::MetricsSnapshot;
use crate::types::{
    BalloonInfo, BalloonStats, CreateVmRequest, HostInfo, MemoryInfo, StateAction, VmInfo,
};

/// Operations the REST API needs from the VMM.
pub trait ApiBackend: Send + Sync + 'static {
    /// Host memory figures.
    fn host(&self) -> Result<HostInfo, ApiError>;
    /// Create (and, when `req.start`, start) a VM. The request is already validated.
    fn create_vm(&self, req: CreateVmRequest) -> Result<VmInfo, ApiError>;
    /// All VMs.
    fn list_vms(&self) -> Result<Vec<VmInfo>, ApiError>;
    /// One VM; `ErrorKind::NotFound` for an unknown id.
    fn get_vm(&self, id: &str) -> Result<VmInfo, ApiError>;
    /// Stop (if needed) and remove a VM.
    fn delete_vm(&self, id: &str) -> Result<(), ApiError>;
    /// Lifecycle transition; `ErrorKind::Conflict` when [`StateAction::apply`] forbids it.
    fn set_state(&self, id: &str, action: StateAction) -> Result<VmInfo, ApiError>;
    /// Set the requested total guest RAM. Returns at once with the new figures; the guest
    /// plugs or unplugs asynchronously. `Conflict` for "driver not ready", "below boot RAM",
    /// "above the hotplug region" and the like.
    fn resize_memory(&self, id: &str, requested_mib: u64) -> Result<MemoryInfo, ApiError>;
    /// [`ApiBackend::resize_memory`] for a backend that records a resize without blocking:
    /// the handler calls this first, on the async worker itself, so an implementation must
    /// not wait for the VM's thread, the guest, or any lock that is held across slow work.
    /// `None` (the default) sends the call to a blocking thread through
    /// [`ApiBackend::resize_memory`] instead.
    fn resize_memory_now(
        &self,
        _id: &str,
        _requested_mib: u64,
    ) -> Option<Result<MemoryInfo, ApiError>> {
        None
    }
    /// Guest memory figures and resize progress.
    fn get_memory(&self, id: &str) -> Result<MemoryInfo, ApiError>;
    /// Set the balloon target.
    fn set_balloon(&self, id: &str, target_mib: u64) -> Result<BalloonInfo, ApiError>;
    /// Balloon sizes and guest statistics.
    fn balloon_stats(&self, id: &str) -> Result<BalloonStats, ApiError>;
    /// Numbers for `GET /metrics`; the API renders them as Prometheus text.
    fn metrics(&self) -> Result<MetricsSnapshot, ApiError>;
}
