//! An in-memory [`ApiBackend`] for testing the HTTP layer without a VMM.
//!
//! It is a test double, not a simulator of guests: it keeps VM records and enforces the same
//! rules a real backend must (state transitions through [`StateAction::apply`], resize limits,
//! "driver not ready" before the first start, balloon only with a balloon device). A resize
//! progresses by `step_mib` each time the VM's memory is read while it runs, so tests can
//! watch progress deterministically. [`MemBackend::hold`] blocks calls for one VM until
//! released, to show that a stuck VM does not block others.

use crate::backend::ApiBackend;
use crate::error::ApiError;
use crate::metrics::{DeviceMetrics, MetricsSnapshot, NamedCounter, NodeMetrics, VmMetrics};
use crate::types::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Debug, Clone)]
struct Vm {
    info: VmInfo,
    started: bool,
    plugged_mib: u64,
    requested_mib: u64,
    from_mib: u64,
    balloon_target_mib: u64,
    balloon_actual_mib: u64,
    resizes: u64,
}

impl Vm {
    fn region_mib(&self) -> u64 {
        self.info.hotplug.map_or(0, |h| h.region_mib)
    }

    fn memory(&self) -> MemoryInfo {
        let phase = if self.plugged_mib < self.requested_mib {
            ResizePhase::Plugging
        } else if self.plugged_mib > self.requested_mib {
            ResizePhase::Unplugging
        } else {
            ResizePhase::Idle
        };
        let error =
            (phase != ResizePhase::Idle && self.info.state != VmState::Running).then(|| {
                format!(
                    "VM is {}; the guest cannot plug or unplug",
                    self.info.state.as_str()
                )
            });
        MemoryInfo {
            boot_mib: self.info.memory_mib,
            region_mib: self.region_mib(),
            plugged_mib: self.plugged_mib,
            requested_mib: self.requested_mib,
            resident_mib: self.plugged_mib.saturating_sub(self.balloon_actual_mib),
            reported_mib: 0,
            ballooned_mib: self.balloon_actual_mib,
            refaulted_mib: 0,
            swapped_mib: 0,
            resize: ResizeStatus {
                phase,
                from_mib: self.from_mib,
                driver_ready: self.started && self.info.hotplug.is_some(),
                error,
            },
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    vms: BTreeMap<String, Vm>,
}

#[derive(Debug, Default)]
struct Gates {
    held: HashMap<String, bool>,
    waiting: HashMap<String, usize>,
}

/// The in-memory backend. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct MemBackend {
    inner: Arc<Mutex<Inner>>,
    gates: Arc<(Mutex<Gates>, Condvar)>,
    host_mib_per_node: u64,
    nodes: u32,
    step_mib: u64,
}

impl Default for MemBackend {
    fn default() -> Self {
        Self::new(2, 8192, 128)
    }
}

/// Releases a held VM when dropped.
#[derive(Debug)]
pub struct Hold {
    gates: Arc<(Mutex<Gates>, Condvar)>,
    id: String,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let (lock, cv) = &*self.gates;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        g.held.remove(&self.id);
        cv.notify_all();
    }
}

impl MemBackend {
    /// A host of `nodes` nodes of `mib_per_node` each; resizes advance `step_mib` per read.
    pub fn new(nodes: u32, mib_per_node: u64, step_mib: u64) -> Self {
        MemBackend {
            inner: Arc::default(),
            gates: Arc::default(),
            host_mib_per_node: mib_per_node,
            nodes: nodes.max(1),
            step_mib: step_mib.max(1),
        }
    }

    /// Blocks every call for VM `id` until the returned guard is dropped.
    pub fn hold(&self, id: &str) -> Hold {
        let (lock, _) = &*self.gates;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        g.held.insert(id.to_string(), true);
        Hold {
            gates: Arc::clone(&self.gates),
            id: id.to_string(),
        }
    }

    /// Whether VM `id` is held.
    pub fn is_held(&self, id: &str) -> bool {
        let (lock, _) = &*self.gates;
        let g = lock.lock().unwrap_or_else(|p| p.into_inner());
        g.held.contains_key(id)
    }

    /// Number of calls for VM `id` currently blocked by a [`MemBackend::hold`].
    pub fn waiting(&self, id: &str) -> usize {
        let (lock, _) = &*self.gates;
        let g = lock.lock().unwrap_or_else(|p| p.into_inner());
        g.waiting.get(id).copied().unwrap_or(0)
    }

    fn wait_gate(&self, id: &str) {
        let (lock, cv) = &*self.gates;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        if !g.held.contains_key(id) {
            return;
        }
        *g.waiting.entry(id.to_string()).or_default() += 1;
        while g.held.contains_key(id) {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(n) = g.waiting.get_mut(id) {
            *n = n.saturating_sub(1);
        }
    }

    /// Memory figures and balloon target of VM `id` without advancing a resize (for tests
    /// that check a refused request changed nothing).
    pub fn peek(&self, id: &str) -> Option<(MemoryInfo, u64)> {
        self.lock()
            .vms
            .get(id)
            .map(|vm| (vm.memory(), vm.balloon_target_mib))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_vm<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Vm) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.wait_gate(id);
        let mut inner = self.lock();
        let vm = inner
            .vms
            .get_mut(id)
            .ok_or_else(|| ApiError::vm_not_found(id))?;
        f(vm)
    }

    fn total_mib(&self) -> u64 {
        self.host_mib_per_node.saturating_mul(u64::from(self.nodes))
    }
}

impl ApiBackend for MemBackend {
    fn host(&self) -> Result<HostInfo, ApiError> {
        let inner = self.lock();
        let assigned: u64 = inner.vms.values().map(|v| v.plugged_mib).sum();
        let resident: u64 = inner
            .vms
            .values()
            .filter(|v| v.started)
            .map(|v| v.plugged_mib.saturating_sub(v.balloon_actual_mib))
            .sum();
        let n = u64::from(self.nodes);
        let total = self.total_mib();
        let nodes = (0..self.nodes)
            .map(|node| {
                let a = assigned / n;
                let r = resident / n;
                NodeInfo {
                    node,
                    total_mib: self.host_mib_per_node,
                    free_mib: self.host_mib_per_node.saturating_sub(r),
                    assigned_mib: a,
                    resident_mib: ResidentByType {
                        unmovable_mib: 0,
                        movable_mib: r,
                        reclaimable_mib: 0,
                    },
                    fragmentation_index: 0.0,
                    thp_share: 0.0,
                    overcommit_ratio: ratio(a, self.host_mib_per_node),
                }
            })
            .collect::<Vec<_>>();
        Ok(HostInfo {
            free_mib: nodes.iter().map(|n| n.free_mib).sum(),
            assigned_mib: assigned,
            total_mib: total,
            overcommit_ratio: ratio(assigned, total),
            vm_count: u32::try_from(inner.vms.len()).unwrap_or(u32::MAX),
            nodes,
        })
    }

    fn create_vm(&self, req: CreateVmRequest) -> Result<VmInfo, ApiError> {
        let mut inner = self.lock();
        let assigned: u64 = inner.vms.values().map(|v| v.plugged_mib).sum();
        if assigned.saturating_add(req.memory_mib) > self.total_mib().saturating_mul(2) {
            return Err(ApiError::conflict(format!(
                "not enough host memory: {assigned} MiB assigned of {} MiB (overcommit limit 2)",
                self.total_mib()
            )));
        }
        if let Some(n) = &req.numa {
            if let Some(bad) = n.nodes.iter().find(|&&x| x >= self.nodes) {
                return Err(ApiError::conflict(format!("host has no NUMA node {bad}")));
            }
        }
        inner.next_id += 1;
        let id = format!("vm-{}", inner.next_id);
        let boot_source = if req.image.is_some() {
            BootSource::RawImage
        } else if req.kernel.is_some() {
            BootSource::Kernel
        } else {
            BootSource::DefaultGuest
        };
        let info = VmInfo {
            id: id.clone(),
            state: if req.start {
                VmState::Running
            } else {
                VmState::Created
            },
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            boot_source,
            kernel: req.kernel,
            hotplug: req.hotplug,
            balloon: req.balloon,
            numa: req.numa,
            backing: req.backing.unwrap_or_default(),
            stop_reason: None,
        };
        inner.vms.insert(
            id,
            Vm {
                info: info.clone(),
                started: req.start,
                plugged_mib: req.memory_mib,
                requested_mib: req.memory_mib,
                from_mib: req.memory_mib,
                balloon_target_mib: 0,
                balloon_actual_mib: 0,
                resizes: 0,
            },
        );
        Ok(info)
    }

    fn list_vms(&self) -> Result<Vec<VmInfo>, ApiError> {
        Ok(self.lock().vms.values().map(|v| v.info.clone()).collect())
    }

    fn get_vm(&self, id: &str) -> Result<VmInfo, ApiError> {
        self.with_vm(id, |vm| Ok(vm.info.clone()))
    }

    fn delete_vm(&self, id: &str) -> Result<(), ApiError> {
        self.wait_gate(id);
        self.lock()
            .vms
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| ApiError::vm_not_found(id))
    }

    fn set_state(&self, id: &str, action: StateAction) -> Result<VmInfo, ApiError> {
        self.with_vm(id, |vm| {
            let next = action.apply(vm.info.state).ok_or_else(|| {
                ApiError::conflict(format!(
                    "cannot {} a VM that is {}",
                    action.as_str(),
                    vm.info.state.as_str()
                ))
            })?;
            vm.info.state = next;
            if next == VmState::Running {
                vm.started = true;
            }
            Ok(vm.info.clone())
        })
    }

    fn resize_memory(&self, id: &str, requested_mib: u64) -> Result<MemoryInfo, ApiError> {
        self.with_vm(id, |vm| {
            let Some(h) = vm.info.hotplug else {
                return Err(ApiError::conflict("VM has no hotplug region"));
            };
            if vm.info.state == VmState::Stopped {
                return Err(ApiError::conflict("VM is stopped"));
            }
            if !vm.started {
                return Err(ApiError::conflict(
                    "virtio-mem driver not ready: the VM has not been started",
                ));
            }
            let boot = vm.info.memory_mib;
            if requested_mib < boot {
                return Err(ApiError::conflict(format!(
                    "requested {requested_mib} MiB is below boot RAM ({boot} MiB)"
                )));
            }
            if requested_mib > boot + h.region_mib {
                return Err(ApiError::conflict(format!(
                    "requested {requested_mib} MiB is above boot RAM plus the hotplug region ({} MiB)",
                    boot + h.region_mib
                )));
            }
            if (requested_mib - boot) % h.block_mib != 0 {
                return Err(ApiError::conflict(format!(
                    "requested size minus boot RAM must be a multiple of the block size ({} MiB)",
                    h.block_mib
                )));
            }
            vm.from_mib = vm.plugged_mib;
            vm.requested_mib = requested_mib;
            vm.resizes += 1;
            Ok(vm.memory())
        })
    }

    fn get_memory(&self, id: &str) -> Result<MemoryInfo, ApiError> {
        let step = self.step_mib;
        self.with_vm(id, |vm| {
            if vm.info.state == VmState::Running {
                if vm.plugged_mib < vm.requested_mib {
                    vm.plugged_mib = (vm.plugged_mib + step).min(vm.requested_mib);
                } else if vm.plugged_mib > vm.requested_mib {
                    vm.plugged_mib = vm.plugged_mib.saturating_sub(step).max(vm.requested_mib);
                }
            }
            Ok(vm.memory())
        })
    }

    fn set_balloon(&self, id: &str, target_mib: u64) -> Result<BalloonInfo, ApiError> {
        self.with_vm(id, |vm| {
            if vm.info.balloon.is_none() {
                return Err(ApiError::conflict("VM has no balloon device"));
            }
            if target_mib >= vm.plugged_mib {
                return Err(ApiError::conflict(format!(
                    "balloon target {target_mib} MiB must be below guest RAM ({} MiB)",
                    vm.plugged_mib
                )));
            }
            vm.balloon_target_mib = target_mib;
            Ok(BalloonInfo {
                target_mib,
                actual_mib: vm.balloon_actual_mib,
            })
        })
    }

    fn balloon_stats(&self, id: &str) -> Result<BalloonStats, ApiError> {
        self.with_vm(id, |vm| {
            if vm.info.balloon.is_none() {
                return Err(ApiError::conflict("VM has no balloon device"));
            }
            if vm.info.state == VmState::Running {
                vm.balloon_actual_mib = vm.balloon_target_mib;
            }
            let mut s = BalloonStats::sizes_only(vm.balloon_target_mib, vm.balloon_actual_mib);
            if vm.info.balloon.is_some_and(|b| b.stats_interval_s > 0) && vm.started {
                // An idle guest that never swapped or reclaimed, as a 6.12 kernel reports it.
                let total = vm.plugged_mib.saturating_sub(vm.balloon_actual_mib);
                s.updated_unix_ms = Some(1);
                s.total_mib = Some(total);
                s.free_mib = Some(total);
                s.available_mib = Some(total);
                s.disk_caches_mib = Some(0);
                for v in [
                    &mut s.swap_in_bytes,
                    &mut s.swap_out_bytes,
                    &mut s.major_faults,
                    &mut s.minor_faults,
                    &mut s.hugetlb_allocations,
                    &mut s.hugetlb_failures,
                    &mut s.oom_kills,
                    &mut s.alloc_stalls,
                    &mut s.async_scan_bytes,
                    &mut s.direct_scan_bytes,
                    &mut s.async_reclaim_bytes,
                    &mut s.direct_reclaim_bytes,
                    &mut s.unknown_tags,
                ] {
                    *v = Some(0);
                }
            }
            Ok(s)
        })
    }

    fn metrics(&self) -> Result<MetricsSnapshot, ApiError> {
        let host = self.host()?;
        let inner = self.lock();
        Ok(MetricsSnapshot {
            nodes: host
                .nodes
                .iter()
                .map(|n| NodeMetrics {
                    node: n.node,
                    total_bytes: n.total_mib << 20,
                    free_bytes: n.free_mib << 20,
                    assigned_bytes: n.assigned_mib << 20,
                    resident_movable_bytes: n.resident_mib.movable_mib << 20,
                    ..Default::default()
                })
                .collect(),
            pool_events: Vec::new(),
            vms: inner
                .vms
                .values()
                .map(|v| VmMetrics {
                    id: v.info.id.clone(),
                    state: v.info.state.as_str().to_string(),
                    vcpus: v.info.vcpus,
                    boot_bytes: v.info.memory_mib << 20,
                    plugged_bytes: v.plugged_mib << 20,
                    requested_bytes: v.requested_mib << 20,
                    ballooned_bytes: v.balloon_actual_mib << 20,
                    ..Default::default()
                })
                .collect(),
            devices: inner
                .vms
                .values()
                .filter(|v| v.info.hotplug.is_some())
                .map(|v| DeviceMetrics {
                    vm: v.info.id.clone(),
                    device: "virtio-mem".into(),
                    counters: vec![NamedCounter {
                        name: "resize_requests".into(),
                        value: v.resizes,
                    }],
                })
                .collect(),
            alloc_latency: Default::default(),
            ..Default::default()
        })
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}
