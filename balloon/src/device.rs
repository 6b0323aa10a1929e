//! The virtio-balloon device model: feature negotiation, queue roles, config space, and the
//! queue handlers that feed the [`Ledger`].

use crate::accounting::{AccountingSnapshot, InputErrors, Ledger, ResidencySample};
use crate::backend::{RamMap, ReclaimBackend, ResidencyProbe};
use crate::config::{mib_to_pages, BalloonConfig, ConfigSpace};
use crate::error::{BackendError, BalloonError};
use crate::hinting::{HintAction, HintMode, HintPassObserver, HintState, HintStatus, Hinting};
use crate::inflate::{parse_pfns, MAX_PFNS_PER_BUFFER};
use crate::reporting::{ReportOutcome, ReportedRange};
use crate::stats::{GuestStats, MAX_STATS_BYTES};
use crate::{
    MIB, PAGE_SIZE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_ID_BALLOON,
};
use std::sync::Arc;
use std::time::Duration;
use tidepool_virtio::{DeviceError, GuestMem, InterruptKind, InterruptSink, VirtioDevice};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryMmap};

/// What a queue is for. Linux numbers only the queues that exist: inflate 0, deflate 1, then
/// stats if negotiated, then free page hinting if negotiated, then reporting if negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// PFNs to take from the guest.
    Inflate,
    /// PFNs to give back.
    Deflate,
    /// The statistics buffer.
    Stats,
    /// Free page hints (command ids and hinted blocks).
    FreePageHint,
    /// Free page reports.
    Reporting,
}

/// The queues that exist for `features`, in index order.
pub fn queue_roles(features: u64) -> Vec<QueueRole> {
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if features & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        roles.push(QueueRole::Stats);
    }
    if features & (1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT) != 0 {
        roles.push(QueueRole::FreePageHint);
    }
    if features & (1 << VIRTIO_BALLOON_F_REPORTING) != 0 {
        roles.push(QueueRole::Reporting);
    }
    roles
}

struct Active {
    mem: GuestMem,
    queues: Vec<Queue>,
    roles: Vec<QueueRole>,
    interrupt: Arc<dyn InterruptSink>,
}

/// The virtio-balloon device.
pub struct Balloon {
    cfg: BalloonConfig,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    config: ConfigSpace,
    backend: Box<dyn ReclaimBackend>,
    ledger: Ledger,
    active: Option<Active>,
    /// Head index of the stats buffer the device holds.
    stats_held: Option<u16>,
    latest_stats: Option<GuestStats>,
    config_interrupts: u64,
    hinting: Hinting,
    /// Told when a hinting pass ends ([`Balloon::set_hint_observer`]).
    hint_observer: Option<Arc<dyn HintPassObserver>>,
    /// `passes_completed` when the observer was last told.
    hint_notified: u64,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("cfg", &self.cfg)
            .field("acked_features", &self.acked_features)
            .field("config", &self.config)
            .field("activated", &self.active.is_some())
            .field("stats_held", &self.stats_held)
            .finish_non_exhaustive()
    }
}

fn queue_err(e: virtio_queue::Error) -> DeviceError {
    DeviceError::Queue(e.to_string())
}

/// Read the device-readable part of a chain, up to `cap` bytes; device-writable descriptors
/// are counted as wrong-direction and skipped.
fn read_readable(
    mem: &GuestMemoryMmap<()>,
    chain: DescriptorChain<&GuestMemoryMmap<()>>,
    cap: usize,
    errors: &mut InputErrors,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut oversized = false;
    for desc in chain {
        if desc.is_write_only() {
            errors.wrong_direction += 1;
            continue;
        }
        let room = cap - out.len();
        let want = desc.len() as usize;
        if want > room {
            oversized = true;
        }
        let take = want.min(room);
        if take == 0 {
            continue;
        }
        let start = out.len();
        out.resize(start + take, 0);
        if mem.read_slice(&mut out[start..], desc.addr()).is_err() {
            errors.unreadable += 1;
            out.truncate(start);
        }
    }
    if oversized {
        errors.oversized += 1;
    }
    if out.is_empty() {
        errors.zero_length += 1;
    }
    out
}

impl Balloon {
    /// A balloon over the guest RAM `backend` owns.
    pub fn new(cfg: BalloonConfig, backend: Box<dyn ReclaimBackend>) -> Result<Self, BalloonError> {
        cfg.validate()?;
        let ram = RamMap::new(backend.guest_ram())
            .map_err(|e| BalloonError::InvalidConfig(format!("backend RAM map: {e}")))?;
        let avail_features = cfg.features();
        let queue_sizes = vec![cfg.queue_size; queue_roles(avail_features).len()];
        Ok(Balloon {
            cfg,
            avail_features,
            acked_features: 0,
            queue_sizes,
            config: ConfigSpace::default(),
            backend,
            hinting: Hinting::new(&ram),
            hint_observer: None,
            hint_notified: 0,
            ledger: Ledger::new(ram),
            active: None,
            stats_held: None,
            latest_stats: None,
            config_interrupts: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BalloonConfig {
        &self.cfg
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    /// The config space as the guest sees it.
    pub fn config_space(&self) -> ConfigSpace {
        self.config
    }

    /// The role of queue `index` under the negotiated features.
    pub fn queue_role(&self, index: usize) -> Option<QueueRole> {
        queue_roles(self.acked_features).get(index).copied()
    }

    /// Set the balloon target (memory to take from the guest) in MiB and raise a
    /// config-change interrupt if the driver is running. Before activation the driver reads
    /// the target when it probes.
    pub fn set_target_mib(&mut self, mib: u64) -> Result<(), BalloonError> {
        // The RAM the VM holds now: unplugged virtio-mem blocks cannot be ballooned.
        let ram_mib = (self.ledger.ram().total() - self.ledger.absent().bytes()) / MIB;
        let pages =
            mib_to_pages(mib)
                .filter(|_| mib <= ram_mib)
                .ok_or(BalloonError::TargetTooLarge {
                    target_mib: mib,
                    ram_mib,
                })?;
        self.config.num_pages = pages;
        if let Some(active) = &self.active {
            active
                .interrupt
                .signal(InterruptKind::ConfigChange)
                .map_err(|e| BalloonError::Interrupt(e.to_string()))?;
            self.config_interrupts += 1;
        }
        Ok(())
    }

    /// The balloon target in MiB.
    pub fn target_mib(&self) -> u64 {
        u64::from(self.config.num_pages) * PAGE_SIZE / MIB
    }

    /// The balloon size the guest reports (`actual`), in MiB.
    pub fn actual_mib(&self) -> u64 {
        u64::from(self.config.actual) * PAGE_SIZE / MIB
    }

    /// Config-change interrupts raised so far.
    pub fn config_interrupts(&self) -> u64 {
        self.config_interrupts
    }

    /// How often the VMM should call [`Self::request_stats`] (`None`: statistics disabled).
    pub fn stats_interval(&self) -> Option<Duration> {
        self.cfg
            .stats_enabled()
            .then(|| Duration::from_secs(u64::from(self.cfg.stats_interval_s)))
    }

    /// Change the statistics interval (0 stops periodic requests; the queue stays, since the
    /// feature was negotiated).
    pub fn set_stats_interval_s(&mut self, secs: u32) -> Result<(), BalloonError> {
        if !self.cfg.stats_enabled() && secs > 0 {
            return Err(BalloonError::StatsDisabled);
        }
        if secs > 0 {
            self.cfg.stats_interval_s = secs;
        }
        Ok(())
    }

    /// Ask the guest for fresh statistics by returning the buffer the device holds. Returns
    /// `Ok(false)` if no buffer is held (the guest has not primed the queue, or a request is
    /// already outstanding).
    pub fn request_stats(&mut self) -> Result<bool, BalloonError> {
        if !self.acked(VIRTIO_BALLOON_F_STATS_VQ) {
            return Err(BalloonError::StatsDisabled);
        }
        let active = self.active.as_mut().ok_or(BalloonError::NotActivated)?;
        let Some(head) = self.stats_held else {
            return Ok(false);
        };
        let idx = active
            .roles
            .iter()
            .position(|r| *r == QueueRole::Stats)
            .ok_or(BalloonError::StatsDisabled)?;
        let mem = active.mem.memory();
        let q = &mut active.queues[idx];
        q.add_used(&*mem, head, 0)
            .map_err(|e| BalloonError::Queue(e.to_string()))?;
        self.stats_held = None;
        if q.needs_notification(&*mem)
            .map_err(|e| BalloonError::Queue(e.to_string()))?
        {
            active
                .interrupt
                .signal(InterruptKind::UsedBuffer)
                .map_err(|e| BalloonError::Interrupt(e.to_string()))?;
        }
        Ok(true)
    }

    /// The latest statistics from the guest, if any arrived.
    pub fn latest_stats(&self) -> Option<&GuestStats> {
        self.latest_stats.as_ref()
    }

    /// Per-VM accounting.
    pub fn accounting(&self) -> AccountingSnapshot {
        self.ledger
            .snapshot(self.config.num_pages, self.config.actual)
    }

    /// The host-side ledger (page sets and counters).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The VMM unplugged `[gpa, gpa+len)` (a virtio-mem block left the VM, after its host
    /// memory was discarded), or the range is not plugged yet: the balloon forgets its pages
    /// (ballooned, reported, and hinted in the current pass), stops counting them as assigned,
    /// refuses guest input there (counted as `not_plugged`) and skips them in residency samples. Returns the ballooned
    /// and reported bytes that were cleared.
    pub fn ram_unplugged(&mut self, gpa: u64, len: u64) -> (u64, u64) {
        self.hinting.forget_range(gpa, len);
        self.ledger.forget_range(gpa, len)
    }

    /// The VMM plugged `[gpa, gpa+len)`: it is the VM's RAM again (fresh memory: nothing in it
    /// is ballooned or reported).
    pub fn ram_plugged(&mut self, gpa: u64, len: u64) {
        self.ledger.restore_range(gpa, len);
    }

    /// Start a free page hinting pass: write a fresh command id into the config and raise a
    /// config-change interrupt. The guest then hints free blocks on the hint queue, which are
    /// recorded and counted; the device never discards them itself (the VMM may, with write
    /// tracking armed before this call, see [`crate::hinting`]); when the
    /// guest ends the pass the device writes DONE so it gets its blocks back. Returns the id.
    ///
    /// Refused when the guest did not negotiate FREE_PAGE_HINT, before activation, and while a
    /// pass is requested, running or stopping.
    pub fn start_hinting(&mut self) -> Result<u32, BalloonError> {
        if !self.acked(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
            return Err(BalloonError::HintingDisabled);
        }
        if self.active.is_none() {
            return Err(BalloonError::NotActivated);
        }
        let state = self.hinting.state();
        if matches!(
            state,
            HintState::Requested | HintState::Running | HintState::Stopping
        ) {
            return Err(BalloonError::HintingBusy {
                cmd_id: self.hinting.status().pass_cmd_id,
            });
        }
        let id = self.hinting.begin();
        self.sync_cmd_id()?;
        Ok(id)
    }

    /// Ask the guest to stop the current pass (the config gets STOP). Returns whether a pass
    /// was requested or running. The guest's own STOP then ends the pass and gets a DONE.
    pub fn stop_hinting(&mut self) -> Result<bool, BalloonError> {
        if !self.acked(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
            return Err(BalloonError::HintingDisabled);
        }
        let changed = self.hinting.stop();
        if changed {
            self.sync_cmd_id()?;
        }
        Ok(changed)
    }

    /// Write DONE whatever the state, so that the guest frees every block it holds for
    /// hinting (a running pass is recorded as cut short).
    pub fn finish_hinting(&mut self) -> Result<(), BalloonError> {
        if !self.acked(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
            return Err(BalloonError::HintingDisabled);
        }
        let changed = self.hinting.finish();
        self.notify_pass_end();
        if changed {
            self.sync_cmd_id()?;
        }
        Ok(())
    }

    /// Tell `observer` whenever a hinting pass ends, before the guest can see the DONE that
    /// answers it (see [`HintPassObserver`]). Replaces any earlier observer.
    pub fn set_hint_observer(&mut self, observer: Arc<dyn HintPassObserver>) {
        self.hint_notified = self.hinting.status().passes_completed;
        self.hint_observer = Some(observer);
    }

    /// If a pass ended since the observer was last told, tell it (once per pass) and count
    /// what it released.
    fn notify_pass_end(&mut self) {
        let Some(obs) = &self.hint_observer else {
            return;
        };
        let s = self.hinting.status();
        if s.passes_completed == self.hint_notified {
            return;
        }
        self.hint_notified = s.passes_completed;
        let Some(pass) = s.last_pass else {
            return;
        };
        let bytes = obs.pass_ended(pass.cmd_id, &self.hinting.ranges());
        self.hinting.note_discarded(bytes);
    }

    /// Free page hinting figures.
    pub fn hinting(&self) -> HintStatus {
        self.hinting.status()
    }

    /// Ranges hinted free in the current or last pass, as `(gpa, len)` runs. They were free
    /// when hinted; the guest may have reused them since (see [`crate::hinting`]).
    pub fn hinted_ranges(&self) -> Vec<(u64, u64)> {
        self.hinting.ranges()
    }

    /// Record what the VMM does with hinted pages (shown in [`Balloon::hinting`]).
    pub fn set_hint_mode(&mut self, mode: HintMode) {
        self.hinting.set_mode(mode);
    }

    /// The VMM discarded `bytes` of host memory because of hints (write-tracked).
    pub fn note_hint_discarded(&mut self, bytes: u64) {
        self.hinting.note_discarded(bytes);
    }

    /// Copy the hinting command id into the config space and tell the guest.
    fn sync_cmd_id(&mut self) -> Result<(), BalloonError> {
        self.config.free_page_hint_cmd_id = self.hinting.status().config_cmd_id;
        if let Some(active) = &self.active {
            active
                .interrupt
                .signal(InterruptKind::ConfigChange)
                .map_err(|e| BalloonError::Interrupt(e.to_string()))?;
            self.config_interrupts += 1;
        }
        Ok(())
    }

    /// Estimate refaults of reported pages and measure resident guest RAM with `probe`
    /// (e.g. [`crate::MmapBackend`], which uses `mincore`).
    pub fn sample_residency(
        &mut self,
        probe: &dyn ResidencyProbe,
    ) -> Result<ResidencySample, BackendError> {
        self.ledger.sample_residency(probe)
    }

    /// The guest poisons free pages with a non-zero value (PAGE_POISON negotiated): its free
    /// pages must keep that content, so reported or hinted pages must not be discarded.
    pub fn poisoned(&self) -> bool {
        self.acked(VIRTIO_BALLOON_F_PAGE_POISON) && self.config.poison_val != 0
    }

    fn process_pfns(&mut self, idx: usize, inflate: bool) -> Result<(), DeviceError> {
        let deflate_on_oom = self.acked(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
        let target = self.config.num_pages;
        let active = self.active.as_mut().ok_or(DeviceError::NotActivated)?;
        let mem = active.mem.memory();
        let q = &mut active.queues[idx];
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let bytes = read_readable(
                &mem,
                chain,
                MAX_PFNS_PER_BUFFER * 4,
                &mut self.ledger.errors,
            );
            let pfns = parse_pfns(&bytes, &mut self.ledger);
            if inflate {
                self.ledger.inflate(self.backend.as_mut(), &pfns);
            } else {
                self.ledger.deflate(&pfns, target, deflate_on_oom);
            }
            q.add_used(&*mem, head, 0).map_err(queue_err)?;
            used = true;
        }
        if used && q.needs_notification(&*mem).map_err(queue_err)? {
            active.interrupt.signal(InterruptKind::UsedBuffer)?;
        }
        Ok(())
    }

    fn process_stats(&mut self, idx: usize) -> Result<(), DeviceError> {
        let active = self.active.as_mut().ok_or(DeviceError::NotActivated)?;
        let mem = active.mem.memory();
        let q = &mut active.queues[idx];
        let mut returned = false;
        while let Some(chain) = q.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let bytes = read_readable(&mem, chain, MAX_STATS_BYTES, &mut self.ledger.errors);
            let stats = GuestStats::parse(&bytes);
            self.ledger.errors.unknown_stat_tags += stats.unknown_tags;
            if stats.trailing_bytes > 0 {
                self.ledger.errors.trailing_bytes += 1;
            }
            self.ledger.count_stats_update();
            // An update without a single whole entry tells nothing: keep the last one.
            if bytes.len() >= crate::stats::STAT_ENTRY_SIZE {
                self.latest_stats = Some(stats);
            }
            // A driver sends one buffer and waits for it to come back; if it sends another,
            // return the older one so that nothing leaks.
            if let Some(old) = self.stats_held.replace(head) {
                self.ledger.errors.extra_stats_buffers += 1;
                q.add_used(&*mem, old, 0).map_err(queue_err)?;
                returned = true;
            }
        }
        if returned && q.needs_notification(&*mem).map_err(queue_err)? {
            active.interrupt.signal(InterruptKind::UsedBuffer)?;
        }
        Ok(())
    }

    fn process_reports(&mut self, idx: usize) -> Result<(), DeviceError> {
        let poisoned = self.poisoned();
        let active = self.active.as_mut().ok_or(DeviceError::NotActivated)?;
        let mem = active.mem.memory();
        let q = &mut active.queues[idx];
        let mut used = false;
        let mut ranges = Vec::with_capacity(32);
        while let Some(chain) = q.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            ranges.clear();
            for desc in chain {
                if !desc.is_write_only() {
                    self.ledger.errors.wrong_direction += 1;
                    continue;
                }
                ranges.push(ReportedRange {
                    gpa: desc.addr().0,
                    len: u64::from(desc.len()),
                });
            }
            let _: ReportOutcome = self.ledger.report(self.backend.as_mut(), &ranges, poisoned);
            q.add_used(&*mem, head, 0).map_err(queue_err)?;
            used = true;
        }
        if used && q.needs_notification(&*mem).map_err(queue_err)? {
            active.interrupt.signal(InterruptKind::UsedBuffer)?;
        }
        Ok(())
    }
}

impl Balloon {
    fn process_hints(&mut self, idx: usize) -> Result<(), DeviceError> {
        let active = self.active.as_mut().ok_or(DeviceError::NotActivated)?;
        let mem = active.mem.memory();
        let q = &mut active.queues[idx];
        let mut used = false;
        let mut done = false;
        let mut ranges = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            ranges.clear();
            for desc in chain {
                if desc.is_write_only() {
                    ranges.push(ReportedRange {
                        gpa: desc.addr().0,
                        len: u64::from(desc.len()),
                    });
                    continue;
                }
                // A command id: the first four bytes, little-endian.
                let mut b = [0u8; 4];
                let id = (desc.len() >= 4 && mem.read_slice(&mut b, desc.addr()).is_ok())
                    .then(|| u32::from_le_bytes(b));
                // Hints before the id belong to the state before it.
                self.hinting.on_hints(&mut self.ledger, &ranges);
                ranges.clear();
                if self.hinting.on_cmd(id) == HintAction::WriteDone {
                    done = true;
                }
            }
            self.hinting.on_hints(&mut self.ledger, &ranges);
            q.add_used(&*mem, head, 0).map_err(queue_err)?;
            used = true;
        }
        if used && q.needs_notification(&*mem).map_err(queue_err)? {
            active.interrupt.signal(InterruptKind::UsedBuffer)?;
        }
        drop(mem);
        if done {
            // Before DONE is visible: the observer's discard is over when the guest sees it.
            self.notify_pass_end();
            let active = self.active.as_ref().ok_or(DeviceError::NotActivated)?;
            self.config.free_page_hint_cmd_id = self.hinting.status().config_cmd_id;
            active.interrupt.signal(InterruptKind::ConfigChange)?;
            self.config_interrupts += 1;
        }
        Ok(())
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn num_queues_for(&self, acked: u64) -> usize {
        queue_roles(acked & self.avail_features).len()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config.driver_write(offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSink>,
    ) -> Result<(), DeviceError> {
        if self.active.is_some() {
            return Err(DeviceError::Activate("already activated".into()));
        }
        let roles = queue_roles(self.acked_features);
        if queues.len() != roles.len() {
            return Err(DeviceError::Activate(format!(
                "{} queues given, {} expected for features {:#x}",
                queues.len(),
                roles.len(),
                self.acked_features
            )));
        }
        let n = roles.len();
        self.active = Some(Active {
            mem,
            queues,
            roles,
            interrupt,
        });
        // The driver may have queued buffers before DRIVER_OK (Linux primes the stats queue
        // during probe): handle them now.
        for i in 0..n {
            if let Err(e) = self.process_queue(i) {
                // Undo what the queues before this one did (a held stats buffer, a hint command
                // id written into the config), as a reset does: the driver must reset before it
                // tries again, and its next attempt must not meet state from this one.
                let _ = self.reset();
                return Err(e);
            }
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        let active = self.active.as_ref().ok_or(DeviceError::NotActivated)?;
        let role = *active
            .roles
            .get(index)
            .ok_or(DeviceError::NoSuchQueue(index))?;
        match role {
            QueueRole::Inflate => self.process_pfns(index, true),
            QueueRole::Deflate => self.process_pfns(index, false),
            QueueRole::Stats => self.process_stats(index),
            QueueRole::FreePageHint => self.process_hints(index),
            QueueRole::Reporting => self.process_reports(index),
        }
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) -> Option<Vec<Queue>> {
        let active = self.active.take()?;
        // The driver starts over with an empty balloon: ballooned pages are the guest's again
        // (they stay discarded until touched). Reported pages stay discarded and tracked.
        self.ledger.reset_balloon();
        self.stats_held = None;
        self.hinting.reset();
        self.notify_pass_end();
        self.config.free_page_hint_cmd_id = self.hinting.status().config_cmd_id;
        self.config.actual = 0;
        self.config.poison_val = 0;
        self.acked_features = 0;
        Some(active.queues)
    }
}
