//! [`DeviceBalloon`]: the [`BalloonHook`] over a VM's virtio-balloon device (phases 1 and 2).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use super::target::TargetError;
use super::window::BalloonHook;
use crate::devices::{lock, lock_live};
use crate::memory::MIB;
use crate::microvm::BalloonTransport;
use crate::swap::{HintEpoch, VmSwap};
use tidepool_balloon::{BalloonError, HintMode, HintPassObserver, HintState, ReportOnlyReason};

/// A hinting pass started under a hint epoch whose ranges were not discarded yet.
#[derive(Clone, Copy, Debug)]
struct ArmedPass {
    cmd_id: u32,
    epoch: HintEpoch,
}

/// The write-tracked discard of hinted pages, shared by the hook and the balloon device (as
/// its [`HintPassObserver`]), so that a pass's hints are discarded the moment the pass ends,
/// on the thread that processes the guest's STOP and before the guest can see DONE.
#[derive(Debug, Default)]
struct HintDiscard {
    /// The VM's swap, whose write tracking makes hinted pages discardable (none: hinting is
    /// report only).
    swap: Mutex<Option<Arc<VmSwap>>>,
    /// The pass whose hints may be discarded once it ends.
    armed: Mutex<Option<ArmedPass>>,
    /// Bytes discarded because of hints and not yet returned by `take_reported`.
    freed: Mutex<u64>,
}

impl HintDiscard {
    /// Pass `cmd_id` ended with `ranges` hinted: if it is the armed pass, discard its pages
    /// not written since the epoch began. Returns the bytes released (also added to `freed`).
    /// Called with the device locked (lock order: device, `armed`, the swap's locks).
    fn pass_ended(&self, cmd_id: u32, ranges: &[(u64, u64)]) -> u64 {
        let mut armed = lock(&self.armed);
        let Some(pass) = armed.take() else {
            return 0;
        };
        if pass.cmd_id != cmd_id {
            // A pass this hook did not arm replaced it: its hints are not ours to discard.
            return 0;
        }
        let Some(swap) = lock(&self.swap).clone() else {
            return 0;
        };
        let ranges: Vec<std::ops::Range<u64>> = ranges
            .iter()
            .map(|&(gpa, len)| gpa..gpa.saturating_add(len))
            .collect();
        match swap.hint_discard(pass.epoch, &ranges) {
            Ok(d) => {
                tracing::debug!(
                    cmd_id,
                    discarded = d.discarded_pages,
                    zero = d.zero_pages,
                    kept = d.kept_pages,
                    freed_slots = d.freed_slots,
                    "hinted pages discarded"
                );
                *lock(&self.freed) += d.discarded_bytes();
                d.discarded_bytes()
            }
            Err(e) => {
                tracing::warn!(error = %e, "hinted pages not discarded");
                0
            }
        }
    }
}

impl HintPassObserver for HintDiscard {
    fn pass_ended(&self, cmd_id: u32, ranges: &[(u64, u64)]) -> u64 {
        HintDiscard::pass_ended(self, cmd_id, ranges)
    }
}

/// A VM's balloon device as the engine uses it.
#[derive(Debug)]
pub struct DeviceBalloon {
    dev: BalloonTransport,
    /// `reported_bytes_total` at the last [`BalloonHook::take_reported`].
    seen_reported: Mutex<u64>,
    /// MiB the engine added to the balloon target and has not given back.
    engine_mib: Mutex<u64>,
    /// The VM's failed flag (see `MmioBus::mark_failed`): once set, a held device lock is
    /// not waited for and the hook answers [`TargetError::Gone`].
    failed: Arc<AtomicBool>,
    /// Hint discard state, also the device's hint pass observer.
    hints: Arc<HintDiscard>,
}

impl DeviceBalloon {
    /// The hook over `dev`. Reports that arrived before this call are not counted. Becomes
    /// the device's [`HintPassObserver`], so hinted pages are discarded as soon as a pass
    /// ends (once a swap is attached, [`DeviceBalloon::set_hint_swap`]).
    pub fn new(dev: BalloonTransport) -> Self {
        let hints = Arc::new(HintDiscard::default());
        let seen = {
            let mut t = lock(&dev);
            t.device_mut()
                .set_hint_observer(Arc::clone(&hints) as Arc<dyn HintPassObserver>);
            t.device().accounting().counters.reported_bytes_total
        };
        DeviceBalloon {
            dev,
            seen_reported: Mutex::new(seen),
            engine_mib: Mutex::new(0),
            failed: Arc::new(AtomicBool::new(false)),
            hints,
        }
    }

    /// Discard hinted pages with `swap`'s write tracking from the next pass on (see
    /// `docs/balloon.md`, "Free page hinting"). Without it hinting stays report only, and the
    /// balloon's `HintStatus::mode` says why.
    pub fn set_hint_swap(&self, swap: Arc<VmSwap>) {
        *lock(&self.hints.swap) = Some(swap);
        if let Ok(mut t) = self.dev() {
            t.device_mut().set_hint_mode(HintMode::Discard);
        }
    }

    /// If the armed pass has ended without the device telling its observer (the host
    /// stopped it before the guest acknowledged it), settle it: discard its hinted pages that
    /// were not written since the epoch began. Called with the device locked, so no new pass
    /// can start meanwhile. Passes that end normally were settled by the observer already.
    fn settle(&self, b: &mut tidepool_balloon::Balloon) {
        let st = b.hinting();
        let Some(pass) = *lock(&self.hints.armed) else {
            return;
        };
        if st.pass_cmd_id == pass.cmd_id && !matches!(st.state, HintState::Done | HintState::Idle) {
            return;
        }
        let bytes = self.hints.pass_ended(st.pass_cmd_id, &b.hinted_ranges());
        b.note_hint_discarded(bytes);
    }

    /// Give up on the device (answer [`TargetError::Gone`]) instead of waiting for its lock
    /// once `failed` is set: the VM's `MmioBus::failed_flag`.
    pub fn with_failed(mut self, failed: Arc<AtomicBool>) -> Self {
        self.failed = failed;
        self
    }

    fn dev(
        &self,
    ) -> Result<
        MutexGuard<'_, tidepool_virtio::MmioTransport<tidepool_balloon::Balloon>>,
        TargetError,
    > {
        lock_live(&self.dev, &self.failed).ok_or(TargetError::Gone)
    }

    /// MiB of the balloon target the engine added and has not given back.
    pub fn engine_inflated_mib(&self) -> u64 {
        *lock(&self.engine_mib)
    }
}

impl BalloonHook for DeviceBalloon {
    fn inflate(&self, bytes: u64) -> Result<u64, TargetError> {
        let mut t = self.dev()?;
        let b = t.device_mut();
        if !tidepool_virtio::VirtioDevice::is_activated(&*b) {
            return Err(TargetError::Unsupported(
                "the guest's balloon driver is not up".into(),
            ));
        }
        // The guest has not met the last target yet (a slow driver, or one that never
        // inflates): ask for nothing more, so the engine does not count on memory that may
        // never come and goes on to the phases that free memory themselves.
        if b.actual_mib() < b.target_mib() {
            return Ok(0);
        }
        let ram_mib = b.accounting().assigned_bytes / MIB;
        let cur = b.target_mib();
        let add = bytes.div_ceil(MIB);
        let next = cur.saturating_add(add).min(ram_mib);
        if next <= cur {
            return Ok(0);
        }
        b.set_target_mib(next)
            .map_err(|e| TargetError::Failed(e.to_string()))?;
        *lock(&self.engine_mib) += next - cur;
        Ok((next - cur) * MIB)
    }

    fn deflate(&self, bytes: u64) -> Result<u64, TargetError> {
        let mut t = self.dev()?;
        let b = t.device_mut();
        let mut mine = lock(&self.engine_mib);
        // Whole MiB only, and never more than the engine added.
        let back = (bytes / MIB).min(*mine).min(b.target_mib());
        if back == 0 {
            return Ok(0);
        }
        b.set_target_mib(b.target_mib() - back)
            .map_err(|e| TargetError::Failed(e.to_string()))?;
        *mine -= back;
        Ok(back * MIB)
    }

    /// Newly reported bytes, plus the bytes discarded for a hinting pass that has ended.
    fn take_reported(&self) -> Result<u64, TargetError> {
        let mut t = self.dev()?;
        self.settle(t.device_mut());
        let total = t.device().accounting().counters.reported_bytes_total;
        let mut seen = lock(&self.seen_reported);
        let delta = total.saturating_sub(*seen);
        *seen = total;
        let hinted = std::mem::take(&mut *lock(&self.hints.freed));
        Ok(delta + hinted)
    }

    /// Start a pass when the guest negotiated FREE_PAGE_HINT. With the VM's swap attached
    /// ([`DeviceBalloon::set_hint_swap`]) a new hint epoch is armed first (all guest RAM
    /// write-protected), and once the pass ends its hinted pages not written since are
    /// discarded (counted by the next `take_reported`). Without it the pass is report only.
    /// Nothing is promised up front (the guest decides how much it hints).
    fn start_hinting(&self) -> Result<u64, TargetError> {
        let mut t = self.dev()?;
        let b = t.device_mut();
        self.settle(b);
        let swap = lock(&self.hints.swap).clone();
        let idle = !matches!(
            b.hinting().state,
            HintState::Requested | HintState::Running | HintState::Stopping
        );
        let negotiated =
            b.acked_features() & (1 << tidepool_balloon::VIRTIO_BALLOON_F_FREE_PAGE_HINT) != 0;
        // Arm only when a pass can start now (under the device lock, so none starts
        // meanwhile): the epoch must begin before the pass whose hints it covers.
        let can_start = idle && negotiated && tidepool_virtio::VirtioDevice::is_activated(&*b);
        if can_start && swap.is_some() && b.poisoned() {
            b.set_hint_mode(HintMode::ReportOnly(ReportOnlyReason::PagePoison));
        }
        let epoch = match (&swap, can_start && !b.poisoned()) {
            (Some(s), true) => match s.hint_arm(s.hint_range()) {
                Ok(a) => {
                    b.set_hint_mode(HintMode::Discard);
                    Some(a.epoch)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "hint epoch not armed: this pass is report only");
                    b.set_hint_mode(HintMode::ReportOnly(ReportOnlyReason::ArmFailed));
                    None
                }
            },
            _ => None,
        };
        match b.start_hinting() {
            Ok(id) => {
                tracing::debug!(
                    cmd_id = id,
                    armed = epoch.is_some(),
                    "free page hinting pass started"
                );
                *lock(&self.hints.armed) = epoch.map(|epoch| ArmedPass { cmd_id: id, epoch });
                Ok(0)
            }
            // A pass is still running: nothing new to start.
            Err(BalloonError::HintingBusy { .. }) => Ok(0),
            Err(BalloonError::HintingDisabled) => Err(TargetError::Unsupported(
                "the guest did not negotiate free page hinting".into(),
            )),
            Err(BalloonError::NotActivated) => Err(TargetError::Unsupported(
                "the guest's balloon driver is not up".into(),
            )),
            Err(e) => Err(TargetError::Failed(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestWindow, Layout, LayoutConfig};
    use crate::tiny_guest::harness::NoIrq;
    use std::sync::Arc;
    use tidepool_balloon::{Balloon, BalloonConfig, MmapBackend};
    use tidepool_virtio::MmioTransport;
    use vm_memory::GuestMemoryAtomic;

    #[test]
    fn balloon_hook_before_the_driver_is_up() {
        let layout = Layout::new(LayoutConfig {
            boot_ram: 32 * MIB,
            hotplug_size: 0,
        })
        .expect("layout");
        let window = Arc::new(GuestWindow::new(layout).expect("window"));
        let mem = (*window.guest_memory().expect("view")).clone();
        let backend = MmapBackend::with_ram(&mem, &[(0, 32 * MIB)]).expect("backend");
        let balloon = Balloon::new(BalloonConfig::default(), Box::new(backend)).expect("balloon");
        let t = MmioTransport::new(
            Box::new(balloon),
            GuestMemoryAtomic::new(mem),
            Arc::new(NoIrq::default()),
        )
        .expect("transport");
        let hook = DeviceBalloon::new(Arc::new(std::sync::Mutex::new(t)));
        assert_eq!(
            hook.dev().expect("dev").device().hinting().mode,
            HintMode::ReportOnly(ReportOnlyReason::NoWriteTracking),
            "no swap attached: report only, with the reason"
        );
        let path = std::env::temp_dir().join(format!("tidepool-hint-hook-{}", std::process::id()));
        let file = Arc::new(
            crate::swap::SwapFile::create(crate::swap::SwapFileConfig::new(path, 8 * MIB))
                .expect("swap file"),
        );
        let swap = Arc::new(VmSwap::new(Arc::clone(&window), file).expect("vm swap"));
        hook.set_hint_swap(Arc::clone(&swap));
        assert_eq!(
            hook.dev().expect("dev").device().hinting().mode,
            HintMode::Discard
        );
        assert!(matches!(
            hook.inflate(4 * MIB),
            Err(TargetError::Unsupported(_))
        ));
        assert_eq!(hook.take_reported(), Ok(0));
        assert!(matches!(
            hook.start_hinting(),
            Err(TargetError::Unsupported(_))
        ));
        assert_eq!(hook.deflate(4 * MIB), Ok(0), "nothing the engine added");
        assert_eq!(hook.engine_inflated_mib(), 0);
        assert!(
            lock(&hook.hints.armed).is_none(),
            "no pass could start: nothing armed, no write protection left behind"
        );
        assert_eq!(swap.counters().wp_faults, 0);
    }
}
