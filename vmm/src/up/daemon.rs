//! Building the daemon's [`VmManager`] (shared by `tidepool serve` and `tidepool up`).

use std::sync::Arc;
use std::time::Duration;

use guest_mm::slab::TypedSlab;
use guest_mm::topology::Topology;

use crate::hostpool::build_pool;
use crate::manager::{DaemonReclaimConfig, VmManager};

/// The host's NUMA topology; a single node of `MemTotal` when sysfs has none.
pub fn host_topology() -> Result<Topology, String> {
    match Topology::from_host() {
        Some(Ok(t)) => Ok(t),
        Some(Err(e)) => Err(format!("reading the host NUMA topology: {e}")),
        None => Ok(Topology::single(host_mem_bytes())),
    }
}

/// `MemTotal` from `/proc/meminfo`, in bytes (0 when unreadable).
pub fn host_mem_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// A manager over a pool of `pool_bytes_per_node` on each host node with memory (None: all
/// of each node's memory), with its reclaim engine and pool monitor running.
pub fn build_manager(
    pool_bytes_per_node: Option<u64>,
    vm_timeout: Duration,
) -> Result<Arc<VmManager>, String> {
    build_manager_with(
        pool_bytes_per_node,
        vm_timeout,
        DaemonReclaimConfig::default(),
    )
}

/// [`build_manager`] with reclaim settings (budget, swap file).
pub fn build_manager_with(
    pool_bytes_per_node: Option<u64>,
    vm_timeout: Duration,
    reclaim: DaemonReclaimConfig,
) -> Result<Arc<VmManager>, String> {
    let topo = host_topology()?;
    let nodes = u16::try_from(topo.len()).map_err(|_| "too many NUMA nodes".to_string())?;
    let pool = Arc::new(
        build_pool(topo, pool_bytes_per_node)
            .map_err(|e| format!("building the memory pool: {e}"))?,
    );
    let slab = TypedSlab::with_config("vm-block-records", |b| b.nodes(usize::from(nodes)))
        .map_err(|e| format!("building the block record slab: {e}"))?;
    let manager = Arc::new(VmManager::new(
        Arc::clone(&pool) as Arc<dyn crate::hostpool::FramePool>,
        slab,
        nodes,
        vm_timeout,
    ));
    manager
        .start_reclaim(pool, reclaim)
        .map_err(|e| format!("starting reclaim: {e}"))?;
    Ok(manager)
}

/// A manager whose pool holds `pool_mib` in total, split evenly over the nodes with memory,
/// with reclaim settings `reclaim`.
pub fn build_manager_total(
    pool_mib: u64,
    vm_timeout: Duration,
    reclaim: DaemonReclaimConfig,
) -> Result<Arc<VmManager>, String> {
    let topo = host_topology()?;
    let with_mem = topo.nodes().iter().filter(|n| n.has_memory).count().max(1) as u64;
    build_manager_with(Some((pool_mib << 20) / with_mem), vm_timeout, reclaim)
}
