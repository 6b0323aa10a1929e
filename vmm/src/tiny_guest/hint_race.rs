//! A second vCPU that writes hinted pages while the hinting driver's pass runs, to race the
//! host's write-tracked discard ([`crate::swap::VmSwap::hint_discard`]) from a real vCPU.
//!
//! [`HintRaceWriter`] runs at CPL3 on its own vCPU beside a [`HintDriver`]. It waits (guest
//! wait requests) until the driver publishes [`HintPhase::Acknowledged`] (the host began its
//! hint epoch before the guest could see the pass), then sweeps its target pages over and
//! over, writing into one word of each a value that is never repeated (`tag` | a sequence
//! number from 1). Page `i` belongs to group `i % 3` ([`WriterGroup`]): it is written while
//! the driver is before its STOP, before DONE, or in every sweep. The writer stops after a
//! whole sweep that began once the driver saw DONE.
//!
//! For every write it reads the driver's phase just before and just after the store and counts
//! the write in that window (or as straddling two), and the same for the first write to each
//! page, the only write that can meet a page still armed for the discard. Its table (guest
//! RAM, [`RaceTable`]) keeps each page's last value, the phases around that write and the
//! phase read just after the page's first write (an `mfence` orders each store before the
//! phase read that follows it). At the
//! end it reads every target page back against the table and reports the mismatches
//! ([`TAG_RACE_MISMATCHES`]); the host can read the same table and pages. Then it idles.

use std::ops::Range;

use iced_x86::code_asm::*;

use super::hint_driver::{HintDriver, HintPhase};
use super::program::Step;
use super::virtq::{emit_idle, overlaps, report};
use super::{GuestImage, TinyGuestBuilder, TinyGuestError};
use crate::memory::Layout;

const PAGE: u64 = 4096;
/// Phases a write can be counted in ([`HintPhase`] values 0..=4).
pub const WINDOWS: usize = 5;

/// Report tag: the writer gave up; 1: no pass began within its polls, 2: the driver never
/// reached DONE within `max_sweeps`.
pub const TAG_RACE_FAILED: u64 = 90;
/// Report tag: writes done.
pub const TAG_RACE_WRITES: u64 = 91;
/// Report tag: target pages whose word differs from the last value written there (must be 0).
pub const TAG_RACE_MISMATCHES: u64 = 92;
/// Report tag: target pages never written.
pub const TAG_RACE_UNWRITTEN: u64 = 93;
/// Report tag: target pages checked (after every other count).
pub const TAG_RACE_CHECKED: u64 = 94;

/// Table offsets: writes per window, then straddling ones by the window they began in; first
/// writes likewise; totals; the sweep loop's own variables.
const T_WRITES: i32 = 0x00;
const T_STRADDLED: i32 = 0x28;
const T_FIRST: i32 = 0x50;
const T_FIRST_STRADDLED: i32 = 0x78;
const T_TOTAL: i32 = 0xa0;
const T_SWEEPS: i32 = 0xa8;
const T_MISMATCHES: i32 = 0xb0;
const T_UNWRITTEN: i32 = 0xb8;
const T_SWEEP_PHASE: i32 = 0xc0;
const T_RUNS_LEFT: i32 = 0xc8;
const T_COUNTERS_END: i32 = 0x100;
/// Offset of the per-page entries (16 bytes each: last value, phases before | after << 8).
const T_ENTRIES: u64 = 0x1000;

/// Which windows a target page is written in (page `i` is in group `i % 3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterGroup {
    /// Written while the driver is before [`HintPhase::Stopping`]: the last write precedes the
    /// STOP, so the discard that follows must keep it.
    UntilStop = 0,
    /// Written while the driver is before [`HintPhase::Done`]: the last writes may meet the
    /// discard itself.
    UntilDone = 1,
    /// Written in every sweep, to the end (a whole sweep after DONE).
    ToTheEnd = 2,
}

impl WriterGroup {
    /// The group of target page `i`.
    pub fn of(i: u64) -> WriterGroup {
        match i % 3 {
            0 => WriterGroup::UntilStop,
            1 => WriterGroup::UntilDone,
            _ => WriterGroup::ToTheEnd,
        }
    }
}

/// The racing writer's parameters (a [`Step::HintRaceWriter`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HintRaceWriter {
    /// The driver's published phase ([`HintDriver::phase_addr`]).
    pub phase_addr: u64,
    /// Guest-physical address of the writer's table (page aligned, boot RAM,
    /// [`HintRaceWriter::table_len`] bytes).
    pub table: u64,
    /// First target page (page aligned). The targets are `runs` runs of `run_pages` pages,
    /// `stride` apart, the runs `run_step` apart: page `k` of run `j` is
    /// `first + j * run_step + k * stride`, target number `j * run_pages + k`.
    pub first: u64,
    /// Distance between target pages of a run (a multiple of 4 KiB below 2 GiB).
    pub stride: u64,
    /// Targets per run (at least 1).
    pub run_pages: u32,
    /// Distance between runs (at least `run_pages * stride`).
    pub run_step: u64,
    /// Runs (at least 1; at most 65536 targets in all).
    pub runs: u32,
    /// Offset of the written word in each page (8-byte aligned, below 4 KiB).
    pub word: u32,
    /// High bits of every value written (the low 40 bits must be zero): the values are
    /// `tag | n` for n = 1, 2, ...
    pub tag: u64,
    /// Guest wait (µs) between polls of the phase before the pass begins, and between idles at
    /// the end; 0: `pause`.
    pub wait_us: u32,
    /// Polls of the phase before the writer gives up waiting for a pass.
    pub wait_polls: u32,
    /// Most sweeps before the writer gives up waiting for DONE.
    pub max_sweeps: u32,
}

impl HintRaceWriter {
    /// A writer racing `driver`'s pass over the blocks it hints: in each, every `stride`-th
    /// page from `offset`, writing word 1 (the driver's own pattern is in word 0), its table
    /// at `table`.
    pub fn new(driver: &HintDriver, table: u64, offset: u64, stride: u64) -> HintRaceWriter {
        let per_run = driver.block.saturating_sub(offset).div_ceil(stride.max(1));
        HintRaceWriter {
            phase_addr: driver.phase_addr(),
            table,
            first: driver.data.start + offset,
            stride,
            run_pages: u32::try_from(per_run).unwrap_or(u32::MAX),
            run_step: driver.block * u64::from(driver.hint_every.max(1)),
            runs: u32::try_from(driver.hinted_blocks().len()).unwrap_or(u32::MAX),
            word: 8,
            tag: 1 << 40,
            wait_us: 500,
            wait_polls: 1 << 20,
            max_sweeps: 1 << 20,
        }
    }

    /// Number of target pages.
    pub fn pages(&self) -> u64 {
        u64::from(self.run_pages) * u64::from(self.runs)
    }

    /// Bytes of the table.
    pub fn table_len(&self) -> u64 {
        T_ENTRIES + 16 * self.pages()
    }

    /// Guest-physical address of target page `i`.
    pub fn target(&self, i: u64) -> u64 {
        let per = u64::from(self.run_pages.max(1));
        self.first + (i / per) * self.run_step + (i % per) * self.stride
    }

    /// The target pages in order, as guest-physical page addresses.
    pub fn targets(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.pages()).map(|i| self.target(i))
    }

    fn table_range(&self) -> Range<u64> {
        self.table..self.table + self.table_len()
    }

    /// Check the parameters against the layout and the image's range.
    pub(crate) fn check(&self, layout: &Layout, image: &Range<u64>) -> Result<(), String> {
        let ram = layout.boot_ram_ranges();
        let in_ram = |r: &Range<u64>| ram.iter().any(|m| m.start <= r.start && r.end <= m.end);
        if self.run_pages == 0 || self.runs == 0 || self.pages() > 1 << 16 {
            return Err(format!(
                "{} runs of {} target pages: must be 1..=65536 pages",
                self.runs, self.run_pages
            ));
        }
        if self.stride % PAGE != 0 || self.stride == 0 || self.stride >= 1 << 31 {
            return Err(format!(
                "stride {:#x} must be a multiple of 4 KiB below 2 GiB",
                self.stride
            ));
        }
        let run_len = u64::from(self.run_pages) * self.stride;
        if self.run_step % PAGE != 0 || (self.runs > 1 && self.run_step < run_len) {
            return Err(format!(
                "run step {:#x} must be page-aligned and leave the runs apart",
                self.run_step
            ));
        }
        if self.word % 8 != 0 || u64::from(self.word) >= PAGE || self.tag & ((1 << 40) - 1) != 0 {
            return Err("word must be an aligned offset in a page, tag clear of bit 0..40".into());
        }
        if self.phase_addr % 8 != 0 || !in_ram(&(self.phase_addr..self.phase_addr + 8)) {
            return Err(format!("phase word {:#x} not in RAM", self.phase_addr));
        }
        let table = self.table_range();
        if self.table % PAGE != 0 || !in_ram(&table) || overlaps(&table, image) {
            return Err(format!(
                "table {table:x?} must be page-aligned boot RAM clear of the image"
            ));
        }
        let last = self.target(self.pages() - 1);
        let span = self.first..last.saturating_add(PAGE);
        if self.first % PAGE != 0
            || !in_ram(&span)
            || overlaps(&span, image)
            || overlaps(&span, &table)
            || overlaps(&span, &(self.phase_addr..self.phase_addr + 8))
        {
            return Err(format!(
                "target pages {span:x?} must be boot RAM clear of the image, table and phase"
            ));
        }
        if self.wait_us > i32::MAX as u32 {
            return Err("wait_us must fit in 31 bits".into());
        }
        Ok(())
    }

    /// Emit the writer. Clobbers every register but r10, r11, r14.
    pub(crate) fn emit(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let mut park = a.create_label();
        a.mov(rbp, self.table)?;
        a.mov(r15, self.phase_addr)?;
        for off in (0..T_COUNTERS_END).step_by(8) {
            a.mov(qword_ptr(rbp + off), 0)?;
        }
        // Clear the entries (a value of 0 means "never written").
        let mut zero = a.create_label();
        a.lea(rdi, qword_ptr(rbp + T_ENTRIES as i32))?;
        a.mov(ecx, (self.pages() * 2) as u32)?;
        a.set_label(&mut zero)?;
        a.mov(qword_ptr(rdi), 0)?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(zero)?;

        // Wait for the pass: the host's epoch began before the guest could see it.
        let mut poll = a.create_label();
        let mut go = a.create_label();
        a.mov(r8d, self.wait_polls.max(1))?;
        a.set_label(&mut poll)?;
        a.mov(rax, qword_ptr(r15))?;
        a.cmp(rax, HintPhase::Acknowledged as i32)?;
        a.jae(go)?;
        emit_idle(a, self.wait_us)?;
        a.dec(r8d)?;
        a.jnz(poll)?;
        a.mov(eax, 1)?;
        report(a, TAG_RACE_FAILED, rax)?;
        a.jmp(park)?;
        a.set_label(&mut go)?;

        self.emit_sweeps(a, park)?;
        self.emit_check(a)?;

        a.set_label(&mut park)?;
        emit_idle(a, self.wait_us)?;
        a.jmp(park)
    }

    /// Sweep until a whole sweep began after DONE (or give up after `max_sweeps`). Registers:
    /// r12 the next value, r13 the run's first page, rbx sweeps left, rdi the page, rsi its
    /// entry, ecx pages left in the run, r9d the page's group, rax/r8 the phase before/after;
    /// the phase at the sweep's start and the runs left are in the table.
    fn emit_sweeps(&self, a: &mut CodeAssembler, park: CodeLabel) -> Result<(), IcedError> {
        let w = self.word as i32;
        let mut sweep = a.create_label();
        let mut page = a.create_label();
        let mut not_first_group = a.create_label();
        let mut write = a.create_label();
        let mut straddle = a.create_label();
        let mut record = a.create_label();
        let mut next = a.create_label();
        let mut no_wrap = a.create_label();
        let mut finished = a.create_label();
        let mut run = a.create_label();
        a.mov(r12, self.tag | 1)?;
        a.mov(ebx, self.max_sweeps.max(1))?;
        a.set_label(&mut sweep)?;
        a.mov(rax, qword_ptr(r15))?;
        a.mov(qword_ptr(rbp + T_SWEEP_PHASE), rax)?;
        a.mov(r13, self.first)?;
        a.lea(rsi, qword_ptr(rbp + T_ENTRIES as i32))?;
        a.xor(r9d, r9d)?;
        a.mov(qword_ptr(rbp + T_RUNS_LEFT), self.runs as i32)?;
        a.set_label(&mut run)?;
        a.mov(rdi, r13)?;
        a.mov(ecx, self.run_pages)?;

        a.set_label(&mut page)?;
        a.mov(rax, qword_ptr(r15))?;
        // The phase indexes the counters: keep it in range whatever the word holds.
        a.mov(r8d, (WINDOWS - 1) as u32)?;
        a.cmp(rax, r8)?;
        a.cmova(rax, r8)?;
        a.test(r9d, r9d)?;
        a.jnz(not_first_group)?;
        a.cmp(rax, HintPhase::Stopping as i32)?;
        a.jae(next)?;
        a.jmp(write)?;
        a.set_label(&mut not_first_group)?;
        a.cmp(r9d, WriterGroup::UntilDone as i32)?;
        a.jne(write)?;
        a.cmp(rax, HintPhase::Done as i32)?;
        a.jae(next)?;

        a.set_label(&mut write)?;
        a.mov(rdx, qword_ptr(rsi))?;
        a.mov(qword_ptr(rdi + w), r12)?;
        // The store is visible before the phase is read again.
        a.mfence()?;
        a.mov(r8, qword_ptr(r15))?;
        a.mov(qword_ptr(rsi), r12)?;
        a.inc(qword_ptr(rbp + T_TOTAL))?;
        a.cmp(rax, r8)?;
        a.jne(straddle)?;
        a.inc(qword_ptr(rbp + rax * 8 + T_WRITES))?;
        a.test(rdx, rdx)?;
        a.jnz(record)?;
        a.inc(qword_ptr(rbp + rax * 8 + T_FIRST))?;
        a.jmp(record)?;
        // Counted by the window it began in.
        a.set_label(&mut straddle)?;
        a.inc(qword_ptr(rbp + rax * 8 + T_STRADDLED))?;
        a.test(rdx, rdx)?;
        a.jnz(record)?;
        a.inc(qword_ptr(rbp + rax * 8 + T_FIRST_STRADDLED))?;
        // Phases: before | after << 8 | (the first write's after) << 16.
        a.set_label(&mut record)?;
        let mut later = a.create_label();
        let mut combine = a.create_label();
        a.test(rdx, rdx)?;
        a.jnz(later)?;
        a.mov(rdx, r8)?;
        a.shl(rdx, 16)?;
        a.jmp(combine)?;
        a.set_label(&mut later)?;
        a.mov(rdx, qword_ptr(rsi + 8))?;
        a.and(rdx, 0xff_0000)?;
        a.set_label(&mut combine)?;
        a.shl(r8, 8)?;
        a.or(r8, rax)?;
        a.or(r8, rdx)?;
        a.mov(qword_ptr(rsi + 8), r8)?;
        a.inc(r12)?;

        a.set_label(&mut next)?;
        a.add(rdi, self.stride as i32)?;
        a.add(rsi, 16)?;
        a.inc(r9d)?;
        a.cmp(r9d, 3)?;
        a.jb(no_wrap)?;
        a.xor(r9d, r9d)?;
        a.set_label(&mut no_wrap)?;
        a.dec(ecx)?;
        a.jnz(page)?;
        a.mov(rax, self.run_step)?;
        a.add(r13, rax)?;
        a.dec(qword_ptr(rbp + T_RUNS_LEFT))?;
        a.jnz(run)?;
        a.inc(qword_ptr(rbp + T_SWEEPS))?;
        a.mov(rax, qword_ptr(rbp + T_SWEEP_PHASE))?;
        a.cmp(rax, HintPhase::Done as i32)?;
        a.jae(finished)?;
        a.dec(ebx)?;
        a.jnz(sweep)?;
        a.mov(eax, 2)?;
        report(a, TAG_RACE_FAILED, rax)?;
        a.jmp(park)?;
        a.set_label(&mut finished)?;
        a.nop()
    }

    /// Read every target page back against its entry; report the counts.
    fn emit_check(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let w = self.word as i32;
        let mut run = a.create_label();
        let mut top = a.create_label();
        let mut written = a.create_label();
        let mut same = a.create_label();
        a.mov(r13, self.first)?;
        a.lea(rsi, qword_ptr(rbp + T_ENTRIES as i32))?;
        a.mov(ebx, self.runs)?;
        a.set_label(&mut run)?;
        a.mov(rdi, r13)?;
        a.mov(ecx, self.run_pages)?;
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.test(rax, rax)?;
        a.jnz(written)?;
        a.inc(qword_ptr(rbp + T_UNWRITTEN))?;
        a.set_label(&mut written)?;
        a.cmp(qword_ptr(rdi + w), rax)?;
        a.je(same)?;
        a.inc(qword_ptr(rbp + T_MISMATCHES))?;
        a.set_label(&mut same)?;
        a.add(rdi, self.stride as i32)?;
        a.add(rsi, 16)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(rax, self.run_step)?;
        a.add(r13, rax)?;
        a.dec(ebx)?;
        a.jnz(run)?;
        for (tag, off) in [
            (TAG_RACE_WRITES, T_TOTAL),
            (TAG_RACE_MISMATCHES, T_MISMATCHES),
            (TAG_RACE_UNWRITTEN, T_UNWRITTEN),
        ] {
            a.mov(rax, qword_ptr(rbp + off))?;
            report(a, tag, rax)?;
        }
        a.mov(eax, self.pages() as u32)?;
        report(a, TAG_RACE_CHECKED, rax)
    }
}

/// One target page's entry in the writer's table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaceEntry {
    /// The last value written (0: never written).
    pub value: u64,
    /// The driver's phase read just before that write.
    pub before: u64,
    /// The driver's phase read just after it.
    pub after: u64,
    /// The driver's phase read just after the page's first write.
    pub first_after: u64,
}

/// The writer's table as the host reads it from guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaceTable {
    /// Writes whose phase was the same before and after, by [`HintPhase`] value.
    pub writes: [u64; WINDOWS],
    /// Writes during which the phase changed, by the phase they began in.
    pub straddled: [u64; WINDOWS],
    /// First writes to a page, by window as `writes`.
    pub first: [u64; WINDOWS],
    /// First writes during which the phase changed, as `straddled`.
    pub first_straddled: [u64; WINDOWS],
    /// All writes.
    pub total: u64,
    /// Sweeps over the target pages.
    pub sweeps: u64,
    /// The guest's own read-back: pages without their last value.
    pub mismatches: u64,
    /// Pages never written.
    pub unwritten: u64,
    /// Per target page.
    pub entries: Vec<RaceEntry>,
}

impl RaceTable {
    /// Parse the table from its bytes ([`HintRaceWriter::table_len`] of them, or fewer:
    /// missing words read as 0).
    pub fn parse(bytes: &[u8]) -> RaceTable {
        let word = |off: u64| -> u64 {
            usize::try_from(off)
                .ok()
                .and_then(|o| bytes.get(o..o.checked_add(8)?))
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes)
        };
        let arr = |base: i32| std::array::from_fn(|w| word(base as u64 + 8 * w as u64));
        let n = (bytes.len() as u64).saturating_sub(T_ENTRIES) / 16;
        RaceTable {
            writes: arr(T_WRITES),
            straddled: arr(T_STRADDLED),
            first: arr(T_FIRST),
            first_straddled: arr(T_FIRST_STRADDLED),
            total: word(T_TOTAL as u64),
            sweeps: word(T_SWEEPS as u64),
            mismatches: word(T_MISMATCHES as u64),
            unwritten: word(T_UNWRITTEN as u64),
            entries: (0..n)
                .map(|i| {
                    let e = T_ENTRIES + 16 * i;
                    let p = word(e + 8);
                    RaceEntry {
                        value: word(e),
                        before: p & 0xff,
                        after: (p >> 8) & 0xff,
                        first_after: (p >> 16) & 0xff,
                    }
                })
                .collect(),
        }
    }
}

/// A two-vCPU tiny guest (for `layout`): vCPU 0 runs `driver` and then reports done, vCPU 1
/// runs `writer`.
pub fn hint_race_program(
    layout: &Layout,
    driver: HintDriver,
    writer: HintRaceWriter,
) -> Result<GuestImage, TinyGuestError> {
    TinyGuestBuilder::new(layout)
        .step(Step::FreePageHinting(driver))
        .step(Step::Done)
        .secondary(vec![Step::HintRaceWriter(writer)])
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MIB;
    use crate::tiny_guest::tests::layout;
    use crate::tiny_guest::virtq::{DEFAULT_MMIO_BASE, DEFAULT_SCRATCH};

    fn pair() -> (HintDriver, HintRaceWriter) {
        let d = HintDriver::new(DEFAULT_MMIO_BASE, DEFAULT_SCRATCH, 16 * MIB..48 * MIB);
        let w = HintRaceWriter::new(&d, 4 * MIB, 4096, 4 * 4096);
        (d, w)
    }

    #[test]
    fn writer_layout_and_groups() {
        let (d, w) = pair();
        // Every other 4 MiB block of 16..48 MiB is hinted: 4 runs of 256 pages.
        assert_eq!((w.runs, w.run_pages, w.run_step), (4, 256, 8 * MIB));
        assert_eq!(w.pages(), 1024);
        assert_eq!(w.table_len(), 0x1000 + 1024 * 16);
        assert_eq!(w.target(1), 16 * MIB + 5 * 4096);
        assert_eq!(w.target(256), 24 * MIB + 4096);
        assert_eq!(w.targets().last(), Some(44 * MIB - 3 * 4096));
        assert_eq!(w.phase_addr, DEFAULT_SCRATCH + 0x300);
        assert_eq!(
            [0, 1, 2, 3].map(WriterGroup::of),
            [
                WriterGroup::UntilStop,
                WriterGroup::UntilDone,
                WriterGroup::ToTheEnd,
                WriterGroup::UntilStop
            ]
        );
        let img = hint_race_program(&layout(64), d, w).expect("build");
        assert_eq!(img.secondary.len(), 1);
        assert_eq!(HintPhase::from_value(3), Some(HintPhase::Stopping));
        assert_eq!(HintPhase::from_value(5), None);
    }

    #[test]
    fn bad_writers_are_refused() {
        let l = layout(64);
        let bad = |f: &dyn Fn(&mut HintRaceWriter)| {
            let (d, mut w) = pair();
            f(&mut w);
            matches!(
                hint_race_program(&l, d, w),
                Err(TinyGuestError::BadDriver(_))
            )
        };
        assert!(!bad(&|_| {}));
        assert!(bad(&|w| w.run_pages = 0));
        assert!(bad(&|w| w.run_step = 4096), "runs overlap");
        assert!(bad(&|w| w.stride = 4096 + 8), "stride not page multiple");
        assert!(bad(&|w| w.word = 4));
        assert!(bad(&|w| w.tag = 7), "tag overlaps the sequence bits");
        assert!(bad(&|w| w.table = 0x1000), "table over the image");
        assert!(bad(&|w| w.table = 16 * MIB), "table over the targets");
        assert!(bad(&|w| w.first = 60 * MIB), "targets beyond RAM");
        assert!(
            bad(&|w| w.phase_addr = 16 * MIB + 4096 + 16),
            "phase among the targets"
        );
    }

    #[test]
    fn table_parses() {
        let mut b = vec![0u8; 0x1000 + 32];
        let put = |b: &mut Vec<u8>, off: usize, v: u64| {
            b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(&mut b, 0x10, 5); // writes in window 2
        put(&mut b, 0x28 + 0x18, 1); // straddled from window 3
        put(&mut b, 0x50 + 0x18, 2); // first writes in window 3
        put(&mut b, 0xa0, 9);
        put(&mut b, 0x1010, 0x77);
        put(&mut b, 0x1018, 3 | 4 << 8 | 2 << 16);
        let t = RaceTable::parse(&b);
        assert_eq!(t.writes, [0, 0, 5, 0, 0]);
        assert_eq!(t.first, [0, 0, 0, 2, 0]);
        assert_eq!((t.straddled, t.total), ([0, 0, 0, 1, 0], 9));
        assert_eq!(t.entries.len(), 2);
        assert_eq!(
            t.entries[1],
            RaceEntry {
                value: 0x77,
                before: 3,
                after: 4,
                first_after: 2
            }
        );
    }
}
