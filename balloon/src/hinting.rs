//! Free page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT, feature bit 3), host-started. The device
//! itself only records; discarding is the VMM's, with write tracking (see [`HintMode`]).
//!
//! The host starts a pass by writing a fresh command id into `free_page_hint_cmd_id` and
//! raising a config-change interrupt. A Linux driver then sends, on the hint queue, the id as a
//! 4-byte device-readable buffer, then free blocks it has taken off its free lists (order
//! `MAX_PAGE_ORDER`, 4 MiB on x86-64) as device-writable buffers, then
//! [`VIRTIO_BALLOON_CMD_ID_STOP`] when it runs out of free blocks or sees the id change. It
//! holds the hinted blocks until the host writes [`VIRTIO_BALLOON_CMD_ID_DONE`].
//!
//! Hints are only valid while the pass is current (the device ignores blocks sent under any
//! other id, as the spec requires) and only until the guest writes the page. Linux can give
//! hinted blocks back to its allocator before DONE (its shrinker does so under memory pressure)
//! without telling the host, so a hinted page may already hold new data when the host gets to
//! it. Discarding is therefore only safe with write tracking that covers the time from before
//! the pass starts to the discard (a KVM dirty log cleared before the pass and checked after the
//! discard could not tell a write just before the discard from one just after it, so it is not
//! enough either; a write-protect scheme or userfaultfd-wp is). The device itself **never
//! discards hinted memory**: it validates and records the hinted ranges of the current
//! pass and counts them, and writes DONE as soon as the guest ends a pass, so the guest gets its
//! blocks back at once. The reclaim engine can use the figures (how much of the guest is free
//! right now) and the ranges, which the VMM discards with its own write tracking when it has
//! it (the VMM swap's hint epochs, `vmm/src/swap/hint.rs`; the status then says
//! [`HintMode::Discard`] and counts [`HintStatus::discarded_bytes`]), and otherwise says why
//! not ([`HintMode::ReportOnly`]).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::accounting::{Ledger, PageSet};
use crate::backend::RamMap;
use crate::reporting::ReportedRange;

/// Command id the device writes to stop a pass, and the driver sends when a pass ends.
pub const VIRTIO_BALLOON_CMD_ID_STOP: u32 = 0;
/// Command id the device writes when the driver may free the hinted blocks.
pub const VIRTIO_BALLOON_CMD_ID_DONE: u32 = 1;
/// First command id this device hands out (ids below are reserved: STOP and DONE).
pub const FIRST_CMD_ID: u32 = 2;

/// Where the hinting protocol stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HintState {
    /// No pass; the config holds STOP (initially, or after a pass was stopped before the guest
    /// started it).
    #[default]
    Idle,
    /// A new id is in the config; the guest has not acknowledged it yet.
    Requested,
    /// The guest acknowledged the id and is sending hints.
    Running,
    /// The host wrote STOP during a running pass; waiting for the guest's STOP.
    Stopping,
    /// The config holds DONE: the guest may free every hinted block.
    Done,
}

/// Why hinted pages are not discarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportOnlyReason {
    /// The VMM has no write tracking for this VM's memory (no VMM swap: `--no-swap`, or a
    /// backing swap does not support), so a hinted page the guest reused could not be told
    /// from one still free.
    #[default]
    NoWriteTracking,
    /// Arming the write tracking before the last pass failed (that pass is report only).
    ArmFailed,
    /// The guest poisons free pages with a non-zero value: discarding would replace the
    /// poison with zeros.
    PagePoison,
}

/// What happens to hinted pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "reason")]
pub enum HintMode {
    /// Recorded and counted, never discarded.
    ReportOnly(ReportOnlyReason),
    /// The VMM write-protects guest RAM before each pass and discards hinted pages not
    /// written since.
    Discard,
}

impl Default for HintMode {
    fn default() -> Self {
        HintMode::ReportOnly(ReportOnlyReason::default())
    }
}

/// A finished pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PassSummary {
    /// Its command id.
    pub cmd_id: u32,
    /// Distinct bytes hinted during the pass.
    pub hinted_bytes: u64,
    /// Hint buffers received during the pass.
    pub hint_buffers: u64,
    /// From the guest's acknowledgement to its STOP (zero if it never acknowledged).
    pub duration: Duration,
    /// The host ended it with [`crate::Balloon::finish_hinting`] before the guest's STOP.
    pub cut_short: bool,
}

/// Hinting figures for the VMM and the reclaim engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HintStatus {
    /// Protocol state.
    pub state: HintState,
    /// The value in `free_page_hint_cmd_id` now.
    pub config_cmd_id: u32,
    /// The id of the current or last pass (0 before the first).
    pub pass_cmd_id: u32,
    /// Distinct bytes hinted in the current or last pass.
    pub pass_hinted_bytes: u64,
    /// Passes the host started.
    pub passes_requested: u64,
    /// Passes the guest acknowledged.
    pub passes_started: u64,
    /// Passes that ended (guest STOP, or the host's DONE).
    pub passes_completed: u64,
    /// Bytes in valid hints, over the device's life.
    pub hinted_bytes_total: u64,
    /// Hint buffers accepted, over the device's life.
    pub hint_buffers: u64,
    /// Hint buffers ignored because no pass was running (stale or early).
    pub stale_hints: u64,
    /// Command ids from the guest that matched no pass (stale, or a STOP with none running).
    pub stale_cmd_ids: u64,
    /// Device-readable buffers too short to hold a command id.
    pub bad_cmd_buffers: u64,
    /// Whether hinted pages are discarded, and if not, why.
    pub mode: HintMode,
    /// Bytes of host memory the VMM released because of hints (write-tracked discard, see
    /// [`crate::Balloon::note_hint_discarded`]); 0 while the mode is report only.
    pub discarded_bytes: u64,
    /// The last finished pass.
    pub last_pass: Option<PassSummary>,
}

/// Told when a hinting pass ends: the guest's STOP, the host's
/// [`crate::Balloon::finish_hinting`] during a pass, or a device reset during one. This is how
/// the VMM discards hinted pages as soon as a pass ends (with its write tracking, see the
/// module docs) instead of at its next look at the device.
pub trait HintPassObserver: Send + Sync + std::fmt::Debug {
    /// Pass `cmd_id` ended with `ranges` (`(gpa, len)` runs) hinted. Called on the thread that
    /// processes the device (with the device borrowed, so under the transport's lock), before
    /// the DONE that answers a guest's STOP is written: a guest that reads DONE finds the
    /// observer's work done. Returns the bytes of host memory released because of the hints
    /// (added to [`HintStatus::discarded_bytes`]). It must not touch guest memory in a way
    /// that waits for the guest.
    fn pass_ended(&self, cmd_id: u32, ranges: &[(u64, u64)]) -> u64;
}

/// What a command or hint from the guest asks the device to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HintAction {
    /// Nothing visible to the guest.
    None,
    /// Write DONE into the config and raise a config-change interrupt.
    WriteDone,
}

/// The device-side hinting state.
#[derive(Debug)]
pub(crate) struct Hinting {
    ram: RamMap,
    status: HintStatus,
    next_id: u32,
    pass: PageSet,
    pass_buffers: u64,
    started_at: Option<Instant>,
}

impl Hinting {
    pub(crate) fn new(ram: &RamMap) -> Self {
        Hinting {
            ram: ram.clone(),
            status: HintStatus::default(),
            next_id: FIRST_CMD_ID,
            pass: PageSet::new(ram),
            pass_buffers: 0,
            started_at: None,
        }
    }

    pub(crate) fn status(&self) -> HintStatus {
        let mut s = self.status;
        s.pass_hinted_bytes = self.pass.bytes();
        s
    }

    pub(crate) fn state(&self) -> HintState {
        self.status.state
    }

    /// Hinted ranges of the current or last pass, as `(gpa, len)` runs.
    pub(crate) fn ranges(&self) -> Vec<(u64, u64)> {
        self.pass.runs()
    }

    /// Begin a pass: returns the id to write into the config.
    pub(crate) fn begin(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(FIRST_CMD_ID);
        self.pass = PageSet::new(&self.ram);
        self.pass_buffers = 0;
        self.started_at = None;
        self.status.state = HintState::Requested;
        self.status.pass_cmd_id = id;
        self.status.config_cmd_id = id;
        self.status.passes_requested += 1;
        id
    }

    /// The host asks the guest to stop. Returns whether the config must change to STOP.
    pub(crate) fn stop(&mut self) -> bool {
        match self.status.state {
            HintState::Requested => {
                // Not acknowledged yet: the pass never ran. If the guest had already started
                // it, its hints are now stale and its STOP gets a DONE (see `on_cmd`).
                self.status.state = HintState::Idle;
                self.status.config_cmd_id = VIRTIO_BALLOON_CMD_ID_STOP;
                true
            }
            HintState::Running => {
                self.status.state = HintState::Stopping;
                self.status.config_cmd_id = VIRTIO_BALLOON_CMD_ID_STOP;
                true
            }
            HintState::Idle | HintState::Stopping | HintState::Done => false,
        }
    }

    /// The host writes DONE (whatever the state). Returns whether the config changes.
    pub(crate) fn finish(&mut self) -> bool {
        if matches!(self.status.state, HintState::Running | HintState::Stopping) {
            self.complete(true);
        }
        let changed = self.status.config_cmd_id != VIRTIO_BALLOON_CMD_ID_DONE;
        self.status.state = HintState::Done;
        self.status.config_cmd_id = VIRTIO_BALLOON_CMD_ID_DONE;
        changed
    }

    fn complete(&mut self, cut_short: bool) {
        self.status.passes_completed += 1;
        self.status.last_pass = Some(PassSummary {
            cmd_id: self.status.pass_cmd_id,
            hinted_bytes: self.pass.bytes(),
            hint_buffers: self.pass_buffers,
            duration: self.started_at.map(|t| t.elapsed()).unwrap_or_default(),
            cut_short,
        });
    }

    /// A command id the guest sent (a device-readable buffer); `None` if it was too short.
    pub(crate) fn on_cmd(&mut self, id: Option<u32>) -> HintAction {
        let Some(id) = id else {
            self.status.bad_cmd_buffers += 1;
            return HintAction::None;
        };
        let state = self.status.state;
        if id == VIRTIO_BALLOON_CMD_ID_STOP {
            return match state {
                HintState::Running | HintState::Stopping => {
                    self.complete(false);
                    self.status.state = HintState::Done;
                    self.status.config_cmd_id = VIRTIO_BALLOON_CMD_ID_DONE;
                    HintAction::WriteDone
                }
                HintState::Idle => {
                    // A pass the host stopped before seeing it start: the guest holds its
                    // blocks until DONE, so give them back.
                    self.status.stale_cmd_ids += 1;
                    self.status.state = HintState::Done;
                    self.status.config_cmd_id = VIRTIO_BALLOON_CMD_ID_DONE;
                    HintAction::WriteDone
                }
                // An older pass's STOP while a new one waits: the new pass's DONE will free
                // those blocks; writing DONE now would cancel the request.
                HintState::Requested | HintState::Done => {
                    self.status.stale_cmd_ids += 1;
                    HintAction::None
                }
            };
        }
        if state == HintState::Requested && id == self.status.pass_cmd_id {
            self.status.state = HintState::Running;
            self.status.passes_started += 1;
            self.started_at = Some(Instant::now());
        } else {
            self.status.stale_cmd_ids += 1;
        }
        HintAction::None
    }

    /// Hinted blocks (device-writable buffers of one chain): recorded if the pass is running,
    /// after the same checks as reports (counted in the ledger's input errors); ignored (and
    /// counted stale) otherwise.
    pub(crate) fn on_hints(&mut self, ledger: &mut Ledger, ranges: &[ReportedRange]) {
        if ranges.is_empty() {
            return;
        }
        if self.status.state != HintState::Running {
            self.status.stale_hints += ranges.len() as u64;
            return;
        }
        for (gpa, len) in ledger.validate_report(ranges) {
            self.pass.insert(gpa, len);
            self.status.hinted_bytes_total += len;
            self.status.hint_buffers += 1;
            self.pass_buffers += 1;
        }
    }

    /// `[gpa, gpa+len)` left the VM: hints there no longer name the VM's RAM, so they are
    /// dropped from the pass (and never reach the pass observer, which may discard).
    pub(crate) fn forget_range(&mut self, gpa: u64, len: u64) {
        self.pass.remove(gpa, len);
    }

    /// The VMM's hint mode (see [`HintMode`]).
    pub(crate) fn set_mode(&mut self, mode: HintMode) {
        self.status.mode = mode;
    }

    /// The VMM discarded `bytes` because of hints.
    pub(crate) fn note_discarded(&mut self, bytes: u64) {
        self.status.discarded_bytes += bytes;
    }

    /// Device reset: the driver forgets its pass (and frees its blocks); so does the device.
    pub(crate) fn reset(&mut self) {
        if matches!(self.status.state, HintState::Running | HintState::Stopping) {
            self.complete(true);
        }
        self.status.state = HintState::Idle;
        self.status.config_cmd_id = VIRTIO_BALLOON_CMD_ID_STOP;
    }
}
