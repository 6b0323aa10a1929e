//! A polled free page hinting driver for the tiny guest (virtio-balloon, runs at CPL3).
//!
//! It fills a data range (one word per 4 KiB page, `pattern(gpa, seed)`), then probes the
//! balloon (device ID 5) accepting only VIRTIO_F_VERSION_1 and VIRTIO_BALLOON_F_FREE_PAGE_HINT,
//! so the queues are inflate 0, deflate 1 and free page hint 2. Filling first means the host
//! cannot start a pass (and arm its write tracking) before the data is in place.
//!
//! Then it plays one hinting pass the way Linux does (virtio 1.2+, 5.5.6.7): it polls
//! `free_page_hint_cmd_id` in the config space (idling with guest wait requests, or `pause`)
//! until the host writes a command id (2 or more); sends that id on the hint queue as a 4-byte
//! device-readable buffer; hints every `hint_every`-th block of `block` bytes of the data as
//! device-writable buffers (chains of up to 32); and ends with a STOP (id 0). It then treats
//! its blocks as its own again once the config holds DONE (1) or a newer pass's id.
//!
//! To race the host's discard, it rewrites some hinted pages (`pattern(gpa, rewrite_seed)`):
//! [`PageClass::RewrittenInPass`] pages after hinting and before its STOP (as Linux's
//! shrinker may take hinted blocks back mid-pass), [`PageClass::RewrittenAfterStop`] pages as
//! soon as its STOP came back, without waiting for DONE (concurrently with the host's discard
//! when the device runs on another thread). Optionally after waiting for mailbox value 1 it
//! checks every data page and reports the counts ([`TAG_HINT_ZERO`] and the rest): what the
//! host guarantees is that rewritten and never-hinted pages keep their data, and that a
//! hinted page nobody rewrote holds either zeros (discarded) or its old data (kept).
//!
//! The driver publishes where it is in the pass ([`HintPhase`], a `u64` in its scratch page)
//! so that another vCPU can write hinted pages at chosen moments
//! ([`super::hint_race::HintRaceWriter`]); `linger_us` holds it in the windows before the
//! hints and before the STOP.

use std::ops::Range;

use iced_x86::code_asm::*;

use super::fpr_driver::VIRTIO_ID_BALLOON;
use super::program::Step;
use super::virtq::{
    check_common, data_range_ok, emit_block_chains, emit_desc_static, emit_idle, emit_probe,
    emit_submit_and_wait, reg, report, wait_mailbox_idle, BlockChains, DriverFailure, Virtq,
    FEATURE_VERSION_1, TAG_DRIVER_FAILED,
};
use super::{GuestImage, TinyGuestBuilder, TinyGuestError};
use crate::memory::Layout;

/// VIRTIO_BALLOON_F_FREE_PAGE_HINT as a feature mask.
pub const FEATURE_FREE_PAGE_HINT: u64 = 1 << 3;
/// Index of the free page hint queue when only FREE_PAGE_HINT is negotiated.
pub const HINT_QUEUE: u32 = 2;
/// Linux hints blocks of order MAX_PAGE_ORDER (10 on x86-64): 4 MiB.
pub const HINT_BLOCK: u64 = 4 << 20;
/// Most blocks per hint chain.
pub const HINT_CHAIN_CAPACITY: u32 = 32;
/// Command id the driver sends to end its pass (VIRTIO_BALLOON_CMD_ID_STOP).
pub const CMD_ID_STOP: u32 = 0;
/// Command id the host writes when the blocks are the guest's again.
pub const CMD_ID_DONE: u32 = 1;

/// Offset of `free_page_hint_cmd_id` in the register window.
const CONFIG_CMD_ID: i32 = reg::CONFIG + 8;
/// Scratch offsets: the 4-byte command buffer, then the verify counters.
const CMD_BUF: i32 = 0x100;
const CNT_REWRITTEN: i32 = 0x200;
const CNT_ZERO: i32 = 0x208;
const CNT_OLD: i32 = 0x210;
const CNT_OTHER: i32 = 0x218;
const CNT_REWRITE_LOST: i32 = 0x220;
const CNT_KEPT_LOST: i32 = 0x228;
const CNT_CHECKED: i32 = 0x230;
/// Scratch offset of the published [`HintPhase`].
const PHASE: i32 = 0x300;
const PAGE: u64 = 4096;

/// Report tag: the data range was filled; the value is its length in bytes.
pub const TAG_HINT_FILLED: u64 = 70;
/// Report tag: the driver acknowledged a pass; the value is its command id.
pub const TAG_HINT_CMD_ID: u64 = 71;
/// Report tag: bytes hinted (every hint chain came back).
pub const TAG_HINT_HINTED: u64 = 72;
/// Report tag: the pass is over for the guest (its STOP came back and the config holds DONE or
/// a newer id); the value is that config value.
pub const TAG_HINT_ENDED: u64 = 73;
/// Report tag: pages the driver rewrote (both sets).
pub const TAG_HINT_REWRITTEN: u64 = 74;
/// Report tag: hinted pages nobody rewrote that read as zero (discarded).
pub const TAG_HINT_ZERO: u64 = 75;
/// Report tag: hinted pages nobody rewrote that still hold their fill pattern (kept).
pub const TAG_HINT_OLD: u64 = 76;
/// Report tag: hinted pages nobody rewrote holding anything else (must be 0).
pub const TAG_HINT_OTHER: u64 = 77;
/// Report tag: rewritten pages without their new data (must be 0).
pub const TAG_HINT_REWRITE_LOST: u64 = 78;
/// Report tag: never-hinted pages without their fill pattern (must be 0).
pub const TAG_HINT_KEPT_LOST: u64 = 79;
/// Report tag: pages checked (after every other count).
pub const TAG_HINT_CHECKED: u64 = 80;

/// What the driver does with one data page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClass {
    /// Not hinted: keeps its fill pattern.
    Kept = 0,
    /// Hinted and never rewritten: zeros if the host discarded it, else its fill pattern.
    Hinted = 1,
    /// Hinted, then rewritten before the driver's STOP.
    RewrittenInPass = 2,
    /// Hinted, then rewritten right after the STOP came back, before DONE.
    RewrittenAfterStop = 3,
}

/// Page counts of one driver's data range, by class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HintPlan {
    /// Data pages.
    pub pages: u64,
    /// Hinted pages (all but [`PageClass::Kept`]).
    pub hinted: u64,
    /// [`PageClass::Hinted`] pages.
    pub untouched: u64,
    /// [`PageClass::RewrittenInPass`] pages.
    pub rewritten_in_pass: u64,
    /// [`PageClass::RewrittenAfterStop`] pages.
    pub rewritten_after_stop: u64,
}

/// The polled free page hinting driver's parameters (a [`Step::FreePageHinting`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HintDriver {
    /// Guest-physical base of the balloon's virtio-mmio window.
    pub mmio_base: u64,
    /// Guest-physical address of the driver's four scratch pages in low RAM (mailbox and
    /// counters, then one page per queue).
    pub scratch: u64,
    /// Size of each queue (power of two, 4..=64).
    pub queue_size: u16,
    /// Polls of the used ring before the driver gives up on a chain
    /// ([`DriverFailure::QueueStalled`]).
    pub poll_limit: u32,
    /// Polls of the config before the driver gives up waiting for the host's pass or its
    /// answer to STOP ([`DriverFailure::HostTimeout`]); one [`HintDriver::wait_us`] idle
    /// between polls.
    pub host_poll_limit: u32,
    /// Guest wait request (µs) between polls of the config and the mailbox; 0: `pause`.
    pub wait_us: u32,
    /// Fill pattern seed.
    pub seed: u64,
    /// Pattern seed of rewritten pages (differs from `seed`).
    pub rewrite_seed: u64,
    /// The data range (aligned to `block`, in boot RAM).
    pub data: Range<u64>,
    /// Hint block size (a power of two, 4 KiB to 1 GiB).
    pub block: u64,
    /// Hint blocks whose index in the data range is a multiple of this (1: all).
    pub hint_every: u32,
    /// In hinted blocks, page `i` with `i % stride == 0` is rewritten in the pass and with
    /// `i % stride == stride / 2` after the STOP; 0: nothing is rewritten (else at least 2).
    pub rewrite_stride: u32,
    /// Wait for mailbox value 1 before checking the data.
    pub wait_for_host: bool,
    /// Idle about this long (µs, guest wait requests; 0: none) after acknowledging a pass
    /// and again after its hints came back, before the STOP: widens the windows in which
    /// another vCPU can write hinted pages (see [`HintPhase`]).
    pub linger_us: u32,
}

/// Where the driver is in its pass, published as a `u64` at [`HintDriver::phase_addr`] (in
/// its scratch page) for another vCPU to read; it only grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HintPhase {
    /// No pass seen yet.
    Waiting = 0,
    /// The config holds the pass's id: the host began its hint epoch before writing it. The
    /// hints have not all come back yet.
    Acknowledged = 1,
    /// Every hint chain came back (the device recorded the hints); no STOP yet.
    Hinted = 2,
    /// The STOP is being submitted: from here until the guest sees DONE the host may be
    /// discarding the hinted pages.
    Stopping = 3,
    /// The config holds DONE (or a newer id): the host's discard is over.
    Done = 4,
}

impl HintPhase {
    /// The phase of a published value.
    pub fn from_value(v: u64) -> Option<HintPhase> {
        use HintPhase::*;
        [Waiting, Acknowledged, Hinted, Stopping, Done]
            .into_iter()
            .find(|p| *p as u64 == v)
    }
}

impl HintDriver {
    /// A driver over `data` hinting every other 4 MiB block, rewriting one page in 8 of each
    /// hinted block in each set, waiting for the host before it checks.
    pub fn new(mmio_base: u64, scratch: u64, data: Range<u64>) -> HintDriver {
        HintDriver {
            mmio_base,
            scratch,
            queue_size: 32,
            poll_limit: super::virtq::POLL_LIMIT,
            host_poll_limit: super::virtq::POLL_LIMIT,
            wait_us: 0,
            seed: 0x41a7_0000_0000_0000,
            rewrite_seed: 0x5e11_0000_0000_0000,
            data,
            block: HINT_BLOCK,
            hint_every: 2,
            rewrite_stride: 16,
            wait_for_host: true,
            linger_us: 0,
        }
    }

    /// Guest-physical address of the published [`HintPhase`] (a `u64`).
    pub fn phase_addr(&self) -> u64 {
        self.scratch + PHASE as u64
    }

    /// Guest-physical address of the mailbox.
    pub fn mailbox(&self) -> u64 {
        self.scratch + super::virtq::MAILBOX_OFFSET
    }

    /// The scratch pages the driver uses.
    pub fn scratch_range(&self) -> Range<u64> {
        self.scratch..self.scratch + 0x4000
    }

    fn queues(&self) -> [Virtq; 3] {
        Virtq::balloon_queues(self.queue_size)
    }

    /// What the driver does with the page at `gpa` (in the data range).
    pub fn class(&self, gpa: u64) -> PageClass {
        let off = gpa.saturating_sub(self.data.start);
        let block = off / self.block.max(1);
        if block % u64::from(self.hint_every.max(1)) != 0 {
            return PageClass::Kept;
        }
        let stride = u64::from(self.rewrite_stride);
        if stride == 0 {
            return PageClass::Hinted;
        }
        match ((off % self.block.max(1)) / PAGE) % stride {
            0 => PageClass::RewrittenInPass,
            r if r == stride / 2 => PageClass::RewrittenAfterStop,
            _ => PageClass::Hinted,
        }
    }

    /// The data range's pages by class.
    pub fn plan(&self) -> HintPlan {
        let mut p = HintPlan::default();
        for gpa in self.data.clone().step_by(PAGE as usize) {
            p.pages += 1;
            match self.class(gpa) {
                PageClass::Kept => continue,
                PageClass::Hinted => p.untouched += 1,
                PageClass::RewrittenInPass => p.rewritten_in_pass += 1,
                PageClass::RewrittenAfterStop => p.rewritten_after_stop += 1,
            }
            p.hinted += 1;
        }
        p
    }

    /// The hinted blocks, as guest-physical ranges.
    pub fn hinted_blocks(&self) -> Vec<Range<u64>> {
        let step = self.block * u64::from(self.hint_every.max(1));
        (self.data.start..self.data.end)
            .step_by(step.max(1) as usize)
            .map(|b| b..(b + self.block).min(self.data.end))
            .collect()
    }

    /// Check the parameters against the layout and the image's range.
    pub(crate) fn check(&self, layout: &Layout, image: &Range<u64>) -> Result<(), String> {
        check_common(
            layout,
            image,
            self.mmio_base,
            self.scratch_range(),
            self.queue_size,
            4,
        )?;
        let d = &self.data;
        if !self.block.is_power_of_two() || !(PAGE..=1 << 30).contains(&self.block) {
            return Err(format!(
                "block {:#x} must be a power of two from 4 KiB to 1 GiB",
                self.block
            ));
        }
        if !data_range_ok(layout, image, &self.scratch_range(), d, self.block) {
            return Err(format!(
                "data {d:x?} must be block-aligned boot RAM clear of the image and scratch"
            ));
        }
        let step = self.block.saturating_mul(u64::from(self.hint_every));
        if self.hint_every == 0 || step > u64::from(u32::MAX) {
            return Err(format!(
                "hint_every {} must be at least 1 with block × hint_every below 4 GiB",
                self.hint_every
            ));
        }
        let stride = u64::from(self.rewrite_stride);
        if self.rewrite_stride == 1 || stride > self.block / PAGE {
            return Err(format!(
                "rewrite stride {stride} must be 0 or 2..={}",
                self.block / PAGE
            ));
        }
        if self.seed == self.rewrite_seed
            || self.wait_us > i32::MAX as u32
            || self.linger_us > i32::MAX as u32
        {
            return Err("seeds must differ and wait_us and linger_us fit in 31 bits".into());
        }
        Ok(())
    }

    /// Emit the driver. Registers: r15 MMIO base, rbp scratch, rbx the pass's id.
    pub(crate) fn emit(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let q = self.queues()[HINT_QUEUE as usize];
        let mut fail = a.create_label();
        let mut end = a.create_label();
        let mut main = a.create_label();
        let mut classify = a.create_label();
        let mut rewrite = a.create_label();
        let mut verify = a.create_label();
        let mut hint_chains = a.create_label();
        a.jmp(main)?;
        a.set_label(&mut classify)?;
        self.emit_classify(a)?;
        a.set_label(&mut rewrite)?;
        self.emit_rewrite(a, classify)?;
        a.set_label(&mut verify)?;
        self.emit_verify(a, classify)?;
        a.set_label(&mut hint_chains)?;
        a.nop()?;
        emit_block_chains(
            a,
            &q,
            BlockChains {
                len: self.block as u32,
                step: (self.block * u64::from(self.hint_every)) as u32,
                capacity: HINT_CHAIN_CAPACITY,
                poll_limit: self.poll_limit,
            },
            fail,
        )?;

        a.set_label(&mut main)?;
        a.mov(r15, self.mmio_base)?;
        a.mov(rbp, self.scratch)?;
        for off in [
            CNT_REWRITTEN,
            CNT_ZERO,
            CNT_OLD,
            CNT_OTHER,
            CNT_REWRITE_LOST,
            CNT_KEPT_LOST,
            CNT_CHECKED,
            PHASE,
        ] {
            a.mov(qword_ptr(rbp + off), 0)?;
        }
        // Fill first: the host can only start a pass once the driver is up.
        self.emit_fill(a)?;
        a.mov(rax, self.data.end - self.data.start)?;
        report(a, TAG_HINT_FILLED, rax)?;
        emit_probe(
            a,
            VIRTIO_ID_BALLOON,
            FEATURE_VERSION_1 | FEATURE_FREE_PAGE_HINT,
            &self.queues(),
            fail,
        )?;
        a.xor(r12d, r12d)?;
        // A pass: the config holds an id of 2 or more.
        self.emit_poll_cmd_id(a, fail, |a, got| {
            a.cmp(eax, 2)?;
            a.jae(got)
        })?;
        a.mov(ebx, eax)?;
        self.set_phase(a, HintPhase::Acknowledged)?;
        report(a, TAG_HINT_CMD_ID, rbx)?;
        // Acknowledge it: the id as a device-readable buffer.
        a.mov(dword_ptr(rbp + CMD_BUF), ebx)?;
        emit_desc_static(a, &q, 0, CMD_BUF, 4, 0, 0)?;
        emit_submit_and_wait(a, &q, self.poll_limit, 0, fail)?;
        self.linger(a)?;
        a.mov(rdi, self.data.start)?;
        a.mov(rsi, self.data.end)?;
        a.call(hint_chains)?;
        self.set_phase(a, HintPhase::Hinted)?;
        let hinted: u64 = self.hinted_blocks().iter().map(|r| r.end - r.start).sum();
        a.mov(rax, hinted)?;
        report(a, TAG_HINT_HINTED, rax)?;
        a.mov(r13d, PageClass::RewrittenInPass as u32)?;
        a.call(rewrite)?;
        self.linger(a)?;
        // STOP, then take the blocks back at once for the second set.
        self.set_phase(a, HintPhase::Stopping)?;
        a.mov(dword_ptr(rbp + CMD_BUF), CMD_ID_STOP as i32)?;
        emit_desc_static(a, &q, 0, CMD_BUF, 4, 0, 0)?;
        emit_submit_and_wait(a, &q, self.poll_limit, 0, fail)?;
        a.mov(r13d, PageClass::RewrittenAfterStop as u32)?;
        a.call(rewrite)?;
        // The pass is over once the config holds neither STOP nor its own id.
        self.emit_poll_cmd_id(a, fail, |a, got| {
            let mut not_yet = a.create_label();
            a.test(eax, eax)?;
            a.jz(not_yet)?;
            a.cmp(eax, ebx)?;
            a.jne(got)?;
            a.set_label(&mut not_yet)?;
            a.nop()
        })?;
        self.set_phase(a, HintPhase::Done)?;
        report(a, TAG_HINT_ENDED, rax)?;
        a.mov(rax, qword_ptr(rbp + CNT_REWRITTEN))?;
        report(a, TAG_HINT_REWRITTEN, rax)?;
        if self.wait_for_host {
            wait_mailbox_idle(a, 1, self.wait_us)?;
        }
        a.call(verify)?;
        for (tag, off) in [
            (TAG_HINT_ZERO, CNT_ZERO),
            (TAG_HINT_OLD, CNT_OLD),
            (TAG_HINT_OTHER, CNT_OTHER),
            (TAG_HINT_REWRITE_LOST, CNT_REWRITE_LOST),
            (TAG_HINT_KEPT_LOST, CNT_KEPT_LOST),
            (TAG_HINT_CHECKED, CNT_CHECKED),
        ] {
            a.mov(rax, qword_ptr(rbp + off))?;
            report(a, tag, rax)?;
        }
        a.jmp(end)?;
        a.set_label(&mut fail)?;
        report(a, TAG_DRIVER_FAILED, rax)?;
        a.set_label(&mut end)?;
        a.nop()
    }

    /// Publish `phase` at [`HintDriver::phase_addr`].
    fn set_phase(&self, a: &mut CodeAssembler, phase: HintPhase) -> Result<(), IcedError> {
        a.mov(qword_ptr(rbp + PHASE), phase as i32)
    }

    /// Idle about `linger_us` (none if 0): two guest waits, since the first ends at once when
    /// the device raised an interrupt since the last wait (it did, for the chain just
    /// returned), as a VMM that does not know wait requests ends both at once.
    fn linger(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        if self.linger_us == 0 {
            return Ok(());
        }
        emit_idle(a, self.linger_us)?;
        emit_idle(a, self.linger_us)
    }

    /// Write `pattern(gpa, seed)` into the first word of every data page. Clobbers rax, rcx,
    /// rdi, rsi.
    fn emit_fill(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let mut top = a.create_label();
        let mut done = a.create_label();
        a.mov(rdi, self.data.start)?;
        a.mov(rsi, self.data.end)?;
        a.mov(rcx, self.seed)?;
        a.set_label(&mut top)?;
        a.cmp(rdi, rsi)?;
        a.jae(done)?;
        a.mov(rax, rdi)?;
        a.xor(rax, rcx)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.add(rdi, PAGE as i32)?;
        a.jmp(top)?;
        a.set_label(&mut done)?;
        a.nop()
    }

    /// Poll the config's command id into eax until `found` jumps to the label it is given,
    /// idling between polls; after `host_poll_limit` polls fail with
    /// [`DriverFailure::HostTimeout`]. Clobbers rax, r8.
    fn emit_poll_cmd_id(
        &self,
        a: &mut CodeAssembler,
        fail: CodeLabel,
        found: impl Fn(&mut CodeAssembler, CodeLabel) -> Result<(), IcedError>,
    ) -> Result<(), IcedError> {
        let mut top = a.create_label();
        let mut got = a.create_label();
        a.mov(r8d, self.host_poll_limit.max(1))?;
        a.set_label(&mut top)?;
        a.mov(eax, dword_ptr(r15 + CONFIG_CMD_ID))?;
        found(a, got)?;
        emit_idle(a, self.wait_us)?;
        a.dec(r8d)?;
        a.jnz(top)?;
        a.mov(eax, DriverFailure::HostTimeout as u32)?;
        a.jmp(fail)?;
        a.set_label(&mut got)?;
        a.nop()
    }

    /// Routine: eax = the [`PageClass`] of the page at rdi (as [`HintDriver::class`]).
    /// Clobbers rax, rcx, rdx, r9.
    fn emit_classify(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let mut kept = a.create_label();
        let mut in_pass = a.create_label();
        let mut after_stop = a.create_label();
        let mut hinted = a.create_label();
        a.mov(rax, rdi)?;
        a.mov(rcx, self.data.start)?;
        a.sub(rax, rcx)?;
        a.xor(edx, edx)?;
        a.mov(rcx, self.block)?;
        a.div(rcx)?;
        a.mov(r9, rdx)?;
        a.xor(edx, edx)?;
        a.mov(ecx, self.hint_every.max(1))?;
        a.div(rcx)?;
        a.test(rdx, rdx)?;
        a.jnz(kept)?;
        if self.rewrite_stride == 0 {
            a.jmp(hinted)?;
        } else {
            a.mov(rax, r9)?;
            a.shr(rax, 12)?;
            a.xor(edx, edx)?;
            a.mov(ecx, self.rewrite_stride)?;
            a.div(rcx)?;
            a.test(rdx, rdx)?;
            a.jz(in_pass)?;
            a.cmp(rdx, (self.rewrite_stride / 2) as i32)?;
            a.je(after_stop)?;
        }
        for (label, class) in [
            (&mut hinted, PageClass::Hinted),
            (&mut kept, PageClass::Kept),
            (&mut in_pass, PageClass::RewrittenInPass),
            (&mut after_stop, PageClass::RewrittenAfterStop),
        ] {
            a.set_label(label)?;
            a.mov(eax, class as u32)?;
            a.ret()?;
        }
        Ok(())
    }

    /// Routine: rewrite every data page of class r13d with `pattern(gpa, rewrite_seed)`,
    /// counting them. Clobbers rax, rcx, rdx, rdi, rsi, r9.
    fn emit_rewrite(&self, a: &mut CodeAssembler, classify: CodeLabel) -> Result<(), IcedError> {
        let mut top = a.create_label();
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.mov(rdi, self.data.start)?;
        a.set_label(&mut top)?;
        a.mov(rsi, self.data.end)?;
        a.cmp(rdi, rsi)?;
        a.jae(done)?;
        a.call(classify)?;
        a.cmp(eax, r13d)?;
        a.jne(next)?;
        a.mov(rax, rdi)?;
        a.mov(rcx, self.rewrite_seed)?;
        a.xor(rax, rcx)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.inc(qword_ptr(rbp + CNT_REWRITTEN))?;
        a.set_label(&mut next)?;
        a.add(rdi, PAGE as i32)?;
        a.jmp(top)?;
        a.set_label(&mut done)?;
        a.ret()
    }

    /// Routine: check every data page against its class, counting into the scratch
    /// counters. Clobbers rax, rcx, rdx, rdi, rsi, r9.
    fn emit_verify(&self, a: &mut CodeAssembler, classify: CodeLabel) -> Result<(), IcedError> {
        let mut top = a.create_label();
        let mut next = a.create_label();
        let mut done = a.create_label();
        let mut kept = a.create_label();
        let mut untouched = a.create_label();
        let mut nonzero = a.create_label();
        let mut other = a.create_label();
        let count = |a: &mut CodeAssembler, off: i32| a.inc(qword_ptr(rbp + off));
        a.mov(rdi, self.data.start)?;
        a.set_label(&mut top)?;
        a.mov(rsi, self.data.end)?;
        a.cmp(rdi, rsi)?;
        a.jae(done)?;
        count(a, CNT_CHECKED)?;
        a.call(classify)?;
        a.mov(r9, qword_ptr(rdi))?;
        a.cmp(eax, PageClass::Hinted as u32)?;
        a.je(untouched)?;
        a.cmp(eax, PageClass::Kept as u32)?;
        a.je(kept)?;
        // Rewritten: the new data.
        a.mov(rax, rdi)?;
        a.mov(rcx, self.rewrite_seed)?;
        a.xor(rax, rcx)?;
        a.cmp(r9, rax)?;
        a.je(next)?;
        count(a, CNT_REWRITE_LOST)?;
        a.jmp(next)?;
        // Never hinted: the fill pattern.
        a.set_label(&mut kept)?;
        a.mov(rax, rdi)?;
        a.mov(rcx, self.seed)?;
        a.xor(rax, rcx)?;
        a.cmp(r9, rax)?;
        a.je(next)?;
        count(a, CNT_KEPT_LOST)?;
        a.jmp(next)?;
        // Hinted, never rewritten: zeros or the fill pattern.
        a.set_label(&mut untouched)?;
        a.test(r9, r9)?;
        a.jnz(nonzero)?;
        count(a, CNT_ZERO)?;
        a.jmp(next)?;
        a.set_label(&mut nonzero)?;
        a.mov(rax, rdi)?;
        a.mov(rcx, self.seed)?;
        a.xor(rax, rcx)?;
        a.cmp(r9, rax)?;
        a.jne(other)?;
        count(a, CNT_OLD)?;
        a.jmp(next)?;
        a.set_label(&mut other)?;
        count(a, CNT_OTHER)?;
        a.set_label(&mut next)?;
        a.add(rdi, PAGE as i32)?;
        a.jmp(top)?;
        a.set_label(&mut done)?;
        a.ret()
    }
}

/// A tiny guest (for `layout`) that runs `driver` and then reports done.
pub fn hint_program(layout: &Layout, driver: HintDriver) -> Result<GuestImage, TinyGuestError> {
    TinyGuestBuilder::new(layout)
        .step(Step::FreePageHinting(driver))
        .step(Step::Done)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MIB;
    use crate::tiny_guest::tests::layout;
    use crate::tiny_guest::virtq::{DEFAULT_MMIO_BASE, DEFAULT_SCRATCH};

    #[test]
    fn plan_and_classes() {
        let d = HintDriver::new(DEFAULT_MMIO_BASE, DEFAULT_SCRATCH, 16 * MIB..48 * MIB);
        let img = hint_program(&layout(64), d.clone()).expect("build");
        assert!(img.range().end <= DEFAULT_SCRATCH);
        // 8 blocks of 4 MiB, every other one hinted; 1024 pages per block, 64 of them in each
        // rewrite set.
        assert_eq!(d.hinted_blocks().len(), 4);
        assert_eq!(d.hinted_blocks()[1], 24 * MIB..28 * MIB);
        let p = d.plan();
        assert_eq!(p.pages, 8192);
        assert_eq!(p.hinted, 4096);
        assert_eq!((p.rewritten_in_pass, p.rewritten_after_stop), (256, 256));
        assert_eq!(p.untouched, 4096 - 512);
        assert_eq!(d.class(16 * MIB), PageClass::RewrittenInPass);
        assert_eq!(d.class(16 * MIB + 8 * 4096), PageClass::RewrittenAfterStop);
        assert_eq!(d.class(16 * MIB + 4096), PageClass::Hinted);
        assert_eq!(d.class(20 * MIB), PageClass::Kept);
    }

    #[test]
    fn bad_drivers_are_refused() {
        let l = layout(64);
        let bad = |f: &dyn Fn(&mut HintDriver)| {
            let mut d = HintDriver::new(DEFAULT_MMIO_BASE, DEFAULT_SCRATCH, 16 * MIB..48 * MIB);
            f(&mut d);
            matches!(hint_program(&l, d), Err(TinyGuestError::BadDriver(_)))
        };
        assert!(!bad(&|_| {}));
        assert!(bad(&|d| d.data = 0..8 * MIB), "covers the image");
        assert!(bad(&|d| d.data = 18 * MIB..48 * MIB), "not block aligned");
        assert!(bad(&|d| d.data = 48 * MIB..128 * MIB), "outside RAM");
        assert!(bad(&|d| d.block = 3 * 4096), "block not a power of two");
        assert!(bad(&|d| d.hint_every = 0));
        assert!(bad(&|d| d.rewrite_stride = 1));
        assert!(bad(&|d| d.rewrite_stride = 2048), "stride beyond a block");
        assert!(bad(&|d| d.rewrite_seed = d.seed));
        assert!(!bad(&|d| d.rewrite_stride = 0));
    }
}
