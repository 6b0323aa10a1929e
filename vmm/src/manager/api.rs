//! [`ApiBackend`] for [`VmManager`]: thin mappings from API calls to commands on the VM
//! threads, and from typed errors to API error kinds (refusals are 409, unsupported features
//! 501, a VM that does not answer 504).

use tidepool_api::metrics::{DeviceMetrics, NamedCounter, NodeMetrics, VmMetrics};
use tidepool_api::types::{
    BalloonInfo, BalloonStats, CreateVmRequest, HostInfo, MemoryInfo, ResizePhase, ResizeStatus,
    StateAction, VmInfo,
};
use tidepool_api::{ApiBackend, ApiError, ErrorKind, MetricsSnapshot};
use tidepool_balloon::{BalloonError, StatTag};
use tidepool_hotplug::ResizeError;

use super::request::{config_from_request, info_from_request, RequestError};
use super::{ManagerError, VmManager};
use crate::hostpool::PoolError;
use crate::memory::MIB;
use crate::microvm::{BalloonFigures, LifecycleOp, MemoryFigures, Microvm, MicrovmError};

fn api_err(e: ManagerError) -> ApiError {
    let msg = e.to_string();
    let kind = match &e {
        ManagerError::NotFound(id) => return ApiError::vm_not_found(id),
        ManagerError::Timeout { .. } => ErrorKind::Timeout,
        ManagerError::Gone(_) | ManagerError::Spawn(_) => ErrorKind::Internal,
        ManagerError::Request(RequestError::Unsupported(_)) => ErrorKind::Unsupported,
        ManagerError::Request(_) | ManagerError::GuestNice(_) => ErrorKind::BadRequest,
        ManagerError::Vm(v) => vm_kind(v),
    };
    ApiError::new(kind, msg)
}

fn vm_kind(e: &MicrovmError) -> ErrorKind {
    match e {
        MicrovmError::Config(_) => ErrorKind::BadRequest,
        MicrovmError::Unsupported(_) => ErrorKind::Unsupported,
        MicrovmError::Pool(PoolError::OutOfMemory) => ErrorKind::Conflict,
        MicrovmError::Pool(PoolError::Policy(_)) => ErrorKind::BadRequest,
        MicrovmError::Transition(_) | MicrovmError::NoHotplug | MicrovmError::NoBalloon => {
            ErrorKind::Conflict
        }
        MicrovmError::Resize(ResizeError::Notify(_)) => ErrorKind::Internal,
        MicrovmError::Resize(_) => ErrorKind::Conflict,
        MicrovmError::Balloon(BalloonError::TargetTooLarge { .. }) => ErrorKind::Conflict,
        MicrovmError::Stuck(_) => ErrorKind::Timeout,
        _ => ErrorKind::Internal,
    }
}

fn memory_info(m: &MemoryFigures) -> MemoryInfo {
    let phase = if m.plugged < m.requested {
        ResizePhase::Plugging
    } else if m.plugged > m.requested {
        ResizePhase::Unplugging
    } else {
        ResizePhase::Idle
    };
    MemoryInfo {
        boot_mib: m.boot / MIB,
        region_mib: m.region / MIB,
        plugged_mib: m.plugged / MIB,
        requested_mib: m.requested / MIB,
        resident_mib: m.resident / MIB,
        reported_mib: m.reported / MIB,
        ballooned_mib: m.ballooned / MIB,
        refaulted_mib: m.refaulted / MIB,
        swapped_mib: 0,
        resize: ResizeStatus {
            phase,
            from_mib: m.resize_from / MIB,
            driver_ready: m.driver_ready,
            error: None,
        },
    }
}

fn balloon_stats(b: &BalloonFigures) -> BalloonStats {
    let mut s = BalloonStats::sizes_only(b.target_mib, b.actual_mib);
    if let Some(g) = &b.stats {
        // Linux sends swap, scan and reclaim amounts in bytes (pages_to_bytes), memory sizes
        // in bytes, and the rest as counts.
        let mib = |t: StatTag| g.get(t).map(|v| v / MIB);
        s.updated_unix_ms = Some(g.unix_ms);
        s.swap_in_bytes = g.get(StatTag::SwapIn);
        s.swap_out_bytes = g.get(StatTag::SwapOut);
        s.major_faults = g.get(StatTag::MajorFaults);
        s.minor_faults = g.get(StatTag::MinorFaults);
        s.free_mib = mib(StatTag::FreeMemory);
        s.total_mib = mib(StatTag::TotalMemory);
        s.available_mib = mib(StatTag::AvailableMemory);
        s.disk_caches_mib = mib(StatTag::DiskCaches);
        s.hugetlb_allocations = g.get(StatTag::HugetlbAllocations);
        s.hugetlb_failures = g.get(StatTag::HugetlbFailures);
        s.oom_kills = g.get(StatTag::OomKills);
        s.alloc_stalls = g.get(StatTag::AllocStalls);
        s.async_scan_bytes = g.get(StatTag::AsyncScans);
        s.direct_scan_bytes = g.get(StatTag::DirectScans);
        s.async_reclaim_bytes = g.get(StatTag::AsyncReclaims);
        s.direct_reclaim_bytes = g.get(StatTag::DirectReclaims);
        s.unknown_tags = Some(g.unknown_tags);
    }
    s
}

fn counters(pairs: &[(&str, u64)]) -> Vec<NamedCounter> {
    pairs
        .iter()
        .map(|(n, v)| NamedCounter {
            name: (*n).into(),
            value: *v,
        })
        .collect()
}

/// Per-VM numbers for `GET /metrics`, gathered on the VM's thread.
fn vm_metrics(vm: &mut Microvm) -> Result<(VmMetrics, Vec<DeviceMetrics>), MicrovmError> {
    let m = vm.memory()?;
    let id = vm.id().to_string();
    let state = vm.state().api_state().as_str().to_string();
    let exits = vm
        .exit_counters()
        .named()
        .into_iter()
        .map(|(n, v)| NamedCounter {
            name: n.into(),
            value: v,
        })
        .collect();
    let vmm = VmMetrics {
        id: id.clone(),
        state,
        vcpus: u32::from(vm.config().vcpus),
        boot_bytes: m.boot,
        plugged_bytes: m.plugged,
        requested_bytes: m.requested,
        resident_bytes: m.resident,
        reported_bytes: m.reported,
        ballooned_bytes: m.ballooned,
        refaulted_bytes: m.refaulted,
        exits,
    };
    let mut devices = Vec::new();
    // A failed VM's device held for good (see swap::guard) has no figures.
    if let Some(c) = vm
        .mem_device()
        .and_then(|dev| vm.bus().lock_live(dev).map(|t| t.device().counters()))
    {
        devices.push(DeviceMetrics {
            vm: id.clone(),
            device: "virtio-mem".into(),
            counters: counters(&[
                ("plug_acked", c.plug_acked),
                ("unplug_acked", c.unplug_acked),
                ("unplug_all_acked", c.unplug_all_acked),
                ("nack_over_requested", c.nack_over_requested),
                ("busy_backend", c.busy_backend),
                ("error_backend", c.error_backend),
                ("config_interrupts", c.config_interrupts),
            ]),
        });
    }
    if let Some((a, h)) = vm.balloon_device().and_then(|dev| {
        vm.bus()
            .lock_live(dev)
            .map(|t| (t.device().accounting(), t.device().hinting()))
    }) {
        let c = a.counters;
        devices.push(DeviceMetrics {
            vm: id,
            device: "virtio-balloon".into(),
            counters: counters(&[
                ("inflated_pages", c.inflated_pages),
                ("deflated_pages", c.deflated_pages),
                ("reports", c.reports),
                ("reported_bytes", c.reported_bytes_total),
                ("refaulted_bytes", c.refaulted_bytes_total),
                ("discard_failures", c.discard_failures),
                ("stats_updates", c.stats_updates),
                ("hint_passes_completed", h.passes_completed),
                ("hinted_bytes", h.hinted_bytes_total),
                ("hint_discarded_bytes", h.discarded_bytes),
            ]),
        });
    }
    Ok((vmm, devices))
}

impl ApiBackend for VmManager {
    fn host(&self) -> Result<HostInfo, ApiError> {
        self.host_info()
            .map(|(h, _)| h)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))
    }

    fn create_vm(&self, req: CreateVmRequest) -> Result<VmInfo, ApiError> {
        let id = self.next_id();
        let config =
            config_from_request(&id, &req, self.irq_mode()).map_err(|e| api_err(e.into()))?;
        let info = info_from_request(&id, &req);
        self.create(config, info, req.start).map_err(api_err)
    }

    fn list_vms(&self) -> Result<Vec<VmInfo>, ApiError> {
        Ok(self.list())
    }

    fn get_vm(&self, id: &str) -> Result<VmInfo, ApiError> {
        self.info(id).map_err(api_err)
    }

    fn delete_vm(&self, id: &str) -> Result<(), ApiError> {
        self.delete(id).map_err(api_err)
    }

    fn set_state(&self, id: &str, action: StateAction) -> Result<VmInfo, ApiError> {
        let op = match action {
            StateAction::Start => LifecycleOp::Start,
            StateAction::Pause => LifecycleOp::Pause,
            StateAction::Resume => LifecycleOp::Resume,
            StateAction::Stop => LifecycleOp::Stop,
        };
        self.call(id, move |vm| vm.apply(op).map(|_| ()))
            .map_err(api_err)?
            .map_err(|e| api_err(e.into()))?;
        self.info(id).map_err(api_err)
    }

    fn resize_memory(&self, id: &str, requested_mib: u64) -> Result<MemoryInfo, ApiError> {
        let total = requested_mib
            .checked_mul(MIB)
            .ok_or_else(|| ApiError::bad_request("requested_mib overflows"))?;
        // Not through the VM thread: the target is set and the guest told from here, and the
        // 202 carries the current resize figures with the VM's last memory sample.
        let m = self.resize(id, total).map_err(api_err)?;
        Ok(self.with_swap_figures(id, memory_info(&m)))
    }

    fn resize_memory_now(
        &self,
        id: &str,
        requested_mib: u64,
    ) -> Option<Result<MemoryInfo, ApiError>> {
        // `resize_memory` waits for nothing (no VM thread, no device lock, no guest).
        Some(self.resize_memory(id, requested_mib))
    }

    fn get_memory(&self, id: &str) -> Result<MemoryInfo, ApiError> {
        let m = self
            .call(id, |vm| vm.memory())
            .map_err(api_err)?
            .map_err(|e| api_err(e.into()))?;
        self.store_memory_sample(id, m);
        Ok(self.with_swap_figures(id, memory_info(&m)))
    }

    fn set_balloon(&self, id: &str, target_mib: u64) -> Result<BalloonInfo, ApiError> {
        let b = self
            .call(id, move |vm| vm.set_balloon(target_mib))
            .map_err(api_err)?
            .map_err(|e| api_err(e.into()))?;
        Ok(BalloonInfo {
            target_mib: b.target_mib,
            actual_mib: b.actual_mib,
        })
    }

    fn balloon_stats(&self, id: &str) -> Result<BalloonStats, ApiError> {
        let b = self
            .call(id, |vm| vm.balloon())
            .map_err(api_err)?
            .map_err(|e| api_err(e.into()))?;
        Ok(balloon_stats(&b))
    }

    fn metrics(&self) -> Result<MetricsSnapshot, ApiError> {
        let (host, figures) = self
            .host_info()
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        let nodes = host
            .nodes
            .iter()
            .zip(figures.nodes.iter())
            .map(|(h, f)| NodeMetrics {
                node: h.node,
                total_bytes: f.total_bytes,
                free_bytes: f.free_bytes,
                assigned_bytes: h.assigned_mib * MIB,
                resident_unmovable_bytes: h.resident_mib.unmovable_mib * MIB,
                resident_movable_bytes: h.resident_mib.movable_mib * MIB,
                resident_reclaimable_bytes: 0,
                fragmentation_index: h.fragmentation_index,
                thp_share: h.thp_share,
            })
            .collect();
        let mut vms = Vec::new();
        let mut devices = Vec::new();
        for info in self.list() {
            // A VM that does not answer is left out of this scrape rather than failing it.
            match self.call(&info.id, vm_metrics) {
                Ok(Ok((v, d))) => {
                    vms.push(v);
                    devices.extend(d);
                    if let Some(s) = self.vm_swap(&info.id) {
                        devices.push(vm_swap_metrics(&info.id, &s));
                    }
                }
                Ok(Err(e)) => tracing::warn!(vm = %info.id, error = %e, "metrics failed"),
                Err(e) => tracing::warn!(vm = %info.id, error = %e, "metrics skipped"),
            }
        }
        let (monitor_triggers, monitor_actions, reclaim) = self.reclaim_metrics();
        Ok(MetricsSnapshot {
            nodes,
            pool_events: counters(&[
                ("alloc", figures.allocs),
                ("free", figures.frees),
                ("alloc_failure", figures.alloc_failures),
            ]),
            vms,
            devices,
            alloc_latency: Default::default(),
            monitor_triggers,
            monitor_actions,
            reclaim,
            swap: self.swap_file_metrics(),
        })
    }
}

impl VmManager {
    /// `info` with VM `id`'s swap figures: swapped out now, and swap-ins as refaults.
    fn with_swap_figures(&self, id: &str, mut info: MemoryInfo) -> MemoryInfo {
        if let Some(s) = self.vm_swap(id) {
            let c = s.counters();
            info.swapped_mib = c.swapped_bytes / MIB;
            info.refaulted_mib += c.swapped_in_pages * 4096 / MIB;
        }
        info
    }
}

/// A VM's swap counters, as the `swap` device of that VM in `GET /metrics`.
fn vm_swap_metrics(id: &str, s: &crate::swap::VmSwap) -> DeviceMetrics {
    let c = s.counters();
    DeviceMetrics {
        vm: id.to_string(),
        device: "swap".into(),
        counters: counters(&[
            ("swapped_bytes", c.swapped_bytes),
            ("clean_bytes", c.clean_bytes),
            ("swapped_out_pages", c.swapped_out_pages),
            ("swapped_in_pages", c.swapped_in_pages),
            ("dropped_clean_pages", c.dropped_clean_pages),
            ("written_pages", c.written_pages),
            ("redirtied_pages", c.redirtied_pages),
            ("missing_faults", c.missing_faults),
            ("wp_faults", c.wp_faults),
            ("swap_in_errors", c.swap_in_errors),
            ("hint_discarded_pages", c.hint_discarded_pages),
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_balloon::stats::encode;
    use tidepool_balloon::GuestStats;

    #[test]
    fn every_stat_tag_maps_to_its_field_with_linux_units() {
        // Tags 0..=15 with distinct values (bytes where Linux sends bytes), plus two tags
        // this daemon does not know.
        let mut entries: Vec<(u16, u64)> = (0..16u16)
            .map(|t| (t, (u64::from(t) + 1) * MIB + u64::from(t)))
            .collect();
        entries.push((16, 1));
        entries.push((999, 2));
        let b = BalloonFigures {
            target_mib: 8,
            actual_mib: 4,
            stats: Some(GuestStats::parse(&encode(&entries))),
        };
        let s = balloon_stats(&b);
        let raw = |t: u64| (t + 1) * MIB + t;
        assert_eq!((s.target_mib, s.actual_mib), (8, 4));
        assert!(s.updated_unix_ms.is_some_and(|ms| ms > 0));
        // Swap amounts are bytes, passed through (no guess at the guest's page size).
        assert_eq!(s.swap_in_bytes, Some(raw(0)));
        assert_eq!(s.swap_out_bytes, Some(raw(1)));
        assert_eq!(s.major_faults, Some(raw(2)));
        assert_eq!(s.minor_faults, Some(raw(3)));
        // Memory sizes in MiB, rounded down.
        assert_eq!(s.free_mib, Some(5));
        assert_eq!(s.total_mib, Some(6));
        assert_eq!(s.available_mib, Some(7));
        assert_eq!(s.disk_caches_mib, Some(8));
        assert_eq!(s.hugetlb_allocations, Some(raw(8)));
        assert_eq!(s.hugetlb_failures, Some(raw(9)));
        assert_eq!(s.oom_kills, Some(raw(10)));
        assert_eq!(s.alloc_stalls, Some(raw(11)));
        assert_eq!(s.async_scan_bytes, Some(raw(12)));
        assert_eq!(s.direct_scan_bytes, Some(raw(13)));
        assert_eq!(s.async_reclaim_bytes, Some(raw(14)));
        assert_eq!(s.direct_reclaim_bytes, Some(raw(15)));
        assert_eq!(s.unknown_tags, Some(2));
    }

    #[test]
    fn an_older_guest_leaves_newer_fields_absent() {
        let b = BalloonFigures {
            target_mib: 0,
            actual_mib: 0,
            stats: Some(GuestStats::parse(&encode(&[(0, 4096), (4, 64 * MIB)]))),
        };
        let s = balloon_stats(&b);
        assert_eq!(s.swap_in_bytes, Some(4096));
        assert_eq!(s.free_mib, Some(64));
        assert_eq!(s.oom_kills, None);
        assert_eq!(s.direct_reclaim_bytes, None);
        assert_eq!(s.unknown_tags, Some(0));
        let none = balloon_stats(&BalloonFigures {
            target_mib: 1,
            actual_mib: 1,
            stats: None,
        });
        assert_eq!(none, BalloonStats::sizes_only(1, 1));
    }
}
