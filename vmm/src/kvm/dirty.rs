//! KVM dirty logging over the VM's memslots: a minimal way to switch it on and to fetch (and
//! clear) the bitmap per slot, for working-set sampling.
//!
//! Only vCPU writes show in it: writes by VMM threads through the host mapping (device models)
//! do not. The swap's clean tracking therefore does not rely on it (it uses userfaultfd
//! write-protect, see `docs/swap.md`); this log serves estimates, where a missed device write
//! only makes a page look a little colder.

use std::ops::Range;
use std::sync::atomic::Ordering;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;

use super::{ioctl, KvmError, Vm};
use crate::memory::layout::MemslotSpec;
use crate::reclaim::{AccessHook, TargetError};

const PAGE: u64 = 4096;

impl Vm {
    pub(super) fn memslot_flags(&self) -> u32 {
        if self.dirty_logging.load(Ordering::Acquire) {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
    }

    /// Memslots registered now (boot RAM, and the hot-plug slots that exist).
    pub fn memslots(&self) -> Vec<MemslotSpec> {
        let hot = self.hotplug_slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = self.window.layout().boot_memslots();
        v.extend(hot.values().map(|(spec, _)| *spec));
        v
    }

    /// Switch dirty logging on or off for every memslot, present and future. Switching on
    /// starts with an empty log.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), KvmError> {
        // Hold the hot-plug lock so no slot is added or removed meanwhile.
        let hot = self.hotplug_slots.lock().unwrap_or_else(|e| e.into_inner());
        self.dirty_logging.store(on, Ordering::Release);
        let mut slots = self.window.layout().boot_memslots();
        slots.extend(hot.values().map(|(spec, _)| *spec));
        for spec in slots {
            self.set_memslot(spec, false)?;
        }
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(Ordering::Acquire)
    }

    /// Fetch and clear the dirty bitmap of one memslot: bit `i` of word `i / 64` set means the
    /// vCPUs wrote page `spec.gpa + i * 4096` since the previous fetch (or since logging was
    /// switched on).
    pub fn take_dirty_bitmap(&self, spec: MemslotSpec) -> Result<Vec<u64>, KvmError> {
        self.fd
            .get_dirty_log(spec.slot, spec.size as usize)
            .map_err(ioctl("KVM_GET_DIRTY_LOG"))
    }

    /// Fetch and clear the logs of every memslot, as coalesced guest-physical ranges of
    /// written 4 KiB pages.
    pub fn take_dirty_ranges(&self) -> Result<Vec<Range<u64>>, KvmError> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut slots = self.memslots();
        slots.sort_by_key(|s| s.gpa);
        for spec in slots {
            let bitmap = self.take_dirty_bitmap(spec)?;
            for (w, bits) in bitmap.iter().enumerate() {
                let mut b = *bits;
                while b != 0 {
                    let i = b.trailing_zeros() as u64;
                    b &= b - 1;
                    let gpa = spec.gpa + (w as u64 * 64 + i) * PAGE;
                    if gpa >= spec.gpa + spec.size {
                        break;
                    }
                    match out.last_mut() {
                        Some(r) if r.end == gpa => r.end = gpa + PAGE,
                        _ => out.push(gpa..gpa + PAGE),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The dirty log as the reclaim engine's access source (call [`Vm::set_dirty_logging`] first).
impl AccessHook for Vm {
    fn written_since_last(&self) -> Result<Vec<Range<u64>>, TargetError> {
        if !self.dirty_logging() {
            return Err(TargetError::Unsupported("dirty logging is off".into()));
        }
        self.take_dirty_ranges()
            .map_err(|e| TargetError::Failed(e.to_string()))
    }
}
