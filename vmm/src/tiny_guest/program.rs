//! The tiny guest's program, assembled with iced-x86 `code_asm`: a list of [`Step`]s, each
//! emitting a short instruction sequence.
//!
//! Register use (callee state lives in registers; the program needs no stack):
//! `rbx` mismatches, `r13` words checked, `r10..r11` the image's own range (skipped by the
//! pattern loops so the program never overwrites its code or page tables), `r14` the report
//! base address.

use std::ops::Range;

use iced_x86::code_asm::*;

/// MMIO address of the report window, in the 32-bit hole where no memslot exists: a write to
/// `REPORT_BASE + 8 * tag` exits to the VMM with the written value.
pub const REPORT_BASE: u64 = 0xd000_0000;
/// Report tag: the program is done; the value is 0.
pub const TAG_DONE: u64 = 0;
/// Report tag: number of pattern mismatches found by a verify step.
pub const TAG_MISMATCHES: u64 = 1;
/// Report tag: number of words a verify step checked.
pub const TAG_CHECKED: u64 = 2;
/// Report tag: a request to wait, not a report. The value is the longest wait in
/// microseconds. A VMM that knows the tag (the microVM's exit handler) blocks the vCPU until
/// the host has news for the guest (a resize, a balloon target, a pause) or the time has
/// passed, and does not log it; one that does not know it logs a report and lets the guest
/// go on at once. Either way the guest must re-check its devices afterwards, so a wait is
/// only ever a cheaper poll: the way a CPL3 guest, which cannot `hlt`, idles without
/// holding a host CPU.
pub const TAG_WAIT: u64 = 8;
/// First tag free for [`Step::Report`] users.
pub const TAG_USER: u64 = 16;
/// Tags fit in one 4 KiB page of report addresses.
pub const MAX_TAG: u64 = 511;

/// Which words of a range the pattern touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stride {
    /// The first 8 bytes of every 2 MiB block.
    Block,
    /// The first 8 bytes of every 4 KiB page.
    Page,
}

impl Stride {
    /// Distance between touched words.
    pub fn bytes(self) -> u64 {
        match self {
            Stride::Block => 2 << 20,
            Stride::Page => 4096,
        }
    }
}

/// The pattern stored at guest-physical `gpa`: `gpa ^ seed`.
pub fn pattern(gpa: u64, seed: u64) -> u64 {
    gpa ^ seed
}

/// One step of the program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write `pattern(addr, seed)` at every `stride` in each range (skipping the image).
    Fill {
        /// Guest-physical ranges.
        ranges: Vec<Range<u64>>,
        /// Pattern seed.
        seed: u64,
        /// Touch every block or every page.
        stride: Stride,
    },
    /// Read the same words back, count mismatches, then report [`TAG_MISMATCHES`] and
    /// [`TAG_CHECKED`].
    Verify {
        /// Guest-physical ranges.
        ranges: Vec<Range<u64>>,
        /// Pattern seed.
        seed: u64,
        /// Touch every block or every page.
        stride: Stride,
    },
    /// Report `value` under `tag`.
    Report {
        /// Tag (at most [`MAX_TAG`]).
        tag: u64,
        /// Value.
        value: u64,
    },
    /// Execute `cpuid` with `leaf`/`subleaf` and report EAX, EBX, ECX, EDX under tags
    /// `tag`, `tag + 1`, `tag + 2`, `tag + 3` (shows what CPUID the guest really sees).
    ReportCpuid {
        /// EAX input.
        leaf: u32,
        /// ECX input.
        subleaf: u32,
        /// First of the four tags.
        tag: u64,
    },
    /// Execute `hlt` (at CPL3 without an IDT this triple-faults: KVM_EXIT_SHUTDOWN).
    Halt,
    /// Spin forever (for kick tests).
    Spin,
    /// Ask the VMM to block this vCPU for at most `us` microseconds ([`TAG_WAIT`]).
    Wait {
        /// Longest wait in microseconds.
        us: u32,
    },
    /// Raw instruction bytes (for probing the emulator).
    Raw(Vec<u8>),
    /// Report [`TAG_DONE`], then halt in case the VMM resumes the vCPU anyway.
    Done,
    /// A polled virtio-mem driver (clobbers every register but r10, r11, r14).
    VirtioMem(super::virtio_mem_driver::VirtioMemDriver),
    /// A polled free-page-reporting (virtio-balloon) driver (same register rule).
    FreePageReporting(super::fpr_driver::FprDriver),
    /// A polled free page hinting (virtio-balloon) driver (same register rule).
    FreePageHinting(super::hint_driver::HintDriver),
    /// A writer racing a hinting driver on another vCPU (same register rule; never ends).
    HintRaceWriter(super::hint_race::HintRaceWriter),
}

fn report(a: &mut CodeAssembler, tag: u64, value: AsmRegister64) -> Result<(), IcedError> {
    // Tags are bounded by MAX_TAG so the displacement fits.
    a.mov(qword_ptr(r14 + (tag * 8) as i32), value)
}

fn pattern_loop(
    a: &mut CodeAssembler,
    ranges: &[Range<u64>],
    seed: u64,
    stride: Stride,
    verify: bool,
) -> Result<(), IcedError> {
    a.mov(r12, seed)?;
    a.mov(r9, stride.bytes())?;
    for r in ranges {
        let mut top = a.create_label();
        let mut write = a.create_label();
        let mut next = a.create_label();
        let mut end = a.create_label();
        a.mov(rdi, r.start)?;
        a.mov(r8, r.end)?;
        a.set_label(&mut top)?;
        a.cmp(rdi, r8)?;
        a.jae(end)?;
        // Skip the image: [r10, r11).
        a.cmp(rdi, r10)?;
        a.jb(write)?;
        a.cmp(rdi, r11)?;
        a.jb(next)?;
        a.set_label(&mut write)?;
        a.mov(rax, rdi)?;
        a.xor(rax, r12)?;
        if verify {
            let mut ok = a.create_label();
            a.inc(r13)?;
            a.cmp(qword_ptr(rdi), rax)?;
            a.je(ok)?;
            a.inc(rbx)?;
            a.set_label(&mut ok)?;
            // A label needs an instruction after it.
            a.nop()?;
        } else {
            a.mov(qword_ptr(rdi), rax)?;
        }
        a.set_label(&mut next)?;
        a.add(rdi, r9)?;
        a.jmp(top)?;
        a.set_label(&mut end)?;
        a.nop()?;
    }
    Ok(())
}

/// Assemble `steps` to run at `ip`, skipping `[image.start, image.end)` in pattern loops.
pub fn assemble(steps: &[Step], ip: u64, image: Range<u64>) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(r10, image.start)?;
    a.mov(r11, image.end)?;
    a.mov(r14, REPORT_BASE)?;
    for step in steps {
        match step {
            Step::Fill {
                ranges,
                seed,
                stride,
            } => pattern_loop(&mut a, ranges, *seed, *stride, false)?,
            Step::Verify {
                ranges,
                seed,
                stride,
            } => {
                a.xor(rbx, rbx)?;
                a.xor(r13, r13)?;
                pattern_loop(&mut a, ranges, *seed, *stride, true)?;
                report(&mut a, TAG_MISMATCHES, rbx)?;
                report(&mut a, TAG_CHECKED, r13)?;
            }
            Step::Report { tag, value } => {
                a.mov(rax, *value)?;
                report(&mut a, (*tag).min(MAX_TAG), rax)?;
            }
            Step::ReportCpuid { leaf, subleaf, tag } => {
                a.mov(eax, *leaf)?;
                a.mov(ecx, *subleaf)?;
                a.cpuid()?;
                let t = (*tag).min(MAX_TAG - 3);
                report(&mut a, t, rax)?;
                report(&mut a, t + 1, rbx)?;
                report(&mut a, t + 2, rcx)?;
                report(&mut a, t + 3, rdx)?;
            }
            Step::Halt => a.hlt()?,
            Step::Spin => {
                let mut l = a.create_label();
                a.set_label(&mut l)?;
                a.pause()?;
                a.jmp(l)?;
            }
            Step::Wait { us } => {
                a.mov(eax, *us)?;
                report(&mut a, TAG_WAIT, rax)?;
            }
            Step::Raw(bytes) => a.db(bytes)?,
            Step::Done => {
                a.xor(rax, rax)?;
                report(&mut a, TAG_DONE, rax)?;
                a.hlt()?;
            }
            Step::VirtioMem(d) => d.emit(&mut a)?,
            Step::FreePageReporting(d) => d.emit(&mut a)?,
            Step::FreePageHinting(d) => d.emit(&mut a)?,
            Step::HintRaceWriter(w) => w.emit(&mut a)?,
        }
    }
    a.assemble(ip)
}
