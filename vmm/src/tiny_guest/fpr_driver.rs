//! A polled free-page-reporting driver for the tiny guest (virtio-balloon, runs at CPL3).
//!
//! It probes the balloon (device ID 5), accepts only VIRTIO_F_VERSION_1 and
//! VIRTIO_BALLOON_F_REPORTING, so the queues are inflate 0, deflate 1 and reporting 2, sets
//! all three up, and sets DRIVER_OK. Reports are chains of up to 32 device-writable
//! descriptors of 2 MiB each (order 9, as Linux reports on x86_64) on queue 2; the driver
//! notifies and polls the used ring for each chain.
//!
//! Three programs ([`FprProgram`]):
//! - [`FprProgram::TouchReportVerify`]: write every 4 KiB page of a range, report it as free,
//!   then read every page again and count the words that are not zero (a discarded page must
//!   read as zeros). With `wait_for_host`, the driver waits for mailbox value 1 before
//!   reporting and 2 before re-reading, so the host can measure residency in between.
//! - [`FprProgram::Phases`]: for the density benchmark, each phase touches the next window of
//!   a ring of windows and reports the previous window as free, with per-phase `rdtsc`
//!   deltas; after the last phase the last window is reported too.
//! - [`FprProgram::Density`]: the density benchmark's loop (see [`super::fpr_density`]): phases
//!   over a ring of RAM with a per-VM, per-phase pattern, each verifying the previous window
//!   before reporting it free, until the host writes the mailbox.

use std::ops::Range;

use iced_x86::code_asm::*;

use super::program::Step;
use super::virtq::{
    check_common, data_range_ok, emit_block_chains, emit_probe, report, wait_mailbox, BlockChains,
    Virtq, FEATURE_VERSION_1, TAG_DRIVER_FAILED,
};
use super::{GuestImage, TinyGuestBuilder, TinyGuestError};
use crate::memory::Layout;

/// virtio device ID of the balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// VIRTIO_BALLOON_F_REPORTING as a feature mask.
pub const FEATURE_REPORTING: u64 = 1 << 5;
/// Size of one reported block: 2 MiB (order 9).
pub const REPORT_BLOCK: u64 = 2 << 20;
/// Most blocks per report (Linux's PAGE_REPORTING_CAPACITY).
pub const REPORT_CAPACITY: u32 = 32;
/// Index of the reporting queue when only REPORTING is negotiated.
pub const REPORTING_QUEUE: u32 = 2;

/// Report tag: the range was written; the value is its length in bytes.
pub const TAG_FPR_TOUCHED: u64 = 50;
/// Report tag: the range was reported free and every chain came back; the value is bytes.
pub const TAG_FPR_REPORTED: u64 = 51;
/// Report tag: words that did not read as zero after the report.
pub const TAG_FPR_NONZERO: u64 = 52;
/// Report tag: words read after the report.
pub const TAG_FPR_CHECKED: u64 = 53;
/// Report tag: a phase ended; the value is the phase index.
pub const TAG_FPR_PHASE: u64 = 54;
/// Report tag: `rdtsc` cycles the phase spent touching its window.
pub const TAG_FPR_PHASE_TOUCH_TSC: u64 = 55;
/// Report tag: `rdtsc` cycles the phase spent reporting the previous window.
pub const TAG_FPR_PHASE_REPORT_TSC: u64 = 56;
/// Report tag: all phases are done (the last window reported too); the value is the phase
/// count.
pub const TAG_FPR_PHASES_DONE: u64 = 57;
/// Report tag: report chains submitted so far (just before [`TAG_FPR_REPORTED`] or
/// [`TAG_FPR_PHASES_DONE`]).
pub const TAG_FPR_CHAINS: u64 = 58;

/// What the driver does once the device is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FprProgram {
    /// Touch `range`, report it free, verify it reads as zeros (see the module docs).
    TouchReportVerify {
        /// 2 MiB-aligned range of boot RAM.
        range: Range<u64>,
        /// Wait for mailbox 1 before reporting and 2 before verifying.
        wait_for_host: bool,
    },
    /// `phases` phases over a ring of `windows` windows of `window` bytes from `base`.
    Phases {
        /// Start of the first window (2 MiB aligned).
        base: u64,
        /// Window size (a 2 MiB multiple).
        window: u64,
        /// Windows in the ring (at least 2, so the window touched is never the one reported).
        windows: u32,
        /// Number of phases.
        phases: u32,
    },
    /// The density benchmark's loop over a ring of RAM (see [`super::fpr_density`]): each
    /// phase touches the next `window` bytes with a per-phase pattern, verifies the previous
    /// window and reports it free, until the host writes the mailbox.
    Density {
        /// Start of the ring (2 MiB aligned).
        base: u64,
        /// End of the ring (2 MiB aligned); windows wrap round it.
        ring_end: u64,
        /// Bytes touched per phase (a 2 MiB multiple, at most half the ring).
        window: u64,
        /// Stop after this many phases even without the mailbox (0: only the mailbox stops).
        max_phases: u32,
    },
}

impl FprProgram {
    /// The guest RAM the program touches.
    pub fn range(&self) -> Range<u64> {
        match self {
            FprProgram::TouchReportVerify { range, .. } => range.clone(),
            FprProgram::Phases {
                base,
                window,
                windows,
                ..
            } => *base..base.saturating_add(window.saturating_mul(u64::from(*windows))),
            FprProgram::Density { base, ring_end, .. } => *base..*ring_end,
        }
    }
}

/// The polled free-page-reporting driver's parameters (a [`super::Step::FreePageReporting`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FprDriver {
    /// Guest-physical base of the balloon's virtio-mmio window.
    pub mmio_base: u64,
    /// Guest-physical address of the driver's four scratch pages in low RAM (mailbox, then
    /// one page per queue).
    pub scratch: u64,
    /// Size of each queue (power of two, 32..=64).
    pub queue_size: u16,
    /// Polls of the used ring before the driver gives up on a chain
    /// ([`super::virtq::DriverFailure::QueueStalled`]).
    pub poll_limit: u32,
    /// Pattern seed for touched pages (`pattern(gpa, seed)` in each page's first word).
    pub seed: u64,
    /// What to do.
    pub program: FprProgram,
}

impl FprDriver {
    /// A driver with queue size 32 running `program`.
    pub fn new(mmio_base: u64, scratch: u64, program: FprProgram) -> FprDriver {
        FprDriver {
            mmio_base,
            scratch,
            queue_size: 32,
            poll_limit: super::virtq::POLL_LIMIT,
            seed: 0xf1ee_0000_0000_0000,
            program,
        }
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

    /// Check the parameters against the layout and the image's range.
    pub(crate) fn check(&self, layout: &Layout, image: &Range<u64>) -> Result<(), String> {
        check_common(
            layout,
            image,
            self.mmio_base,
            self.scratch_range(),
            self.queue_size,
            REPORT_CAPACITY as u16,
        )?;
        if let FprProgram::Phases {
            window,
            windows,
            phases,
            ..
        } = &self.program
        {
            if *window == 0 || *windows < 2 || *phases == 0 {
                return Err(
                    "phases need a non-empty window, at least 2 windows and 1 phase".into(),
                );
            }
        }
        if let FprProgram::Density {
            base,
            ring_end,
            window,
            max_phases,
        } = &self.program
        {
            let ring = ring_end.saturating_sub(*base);
            if *window == 0 || window.saturating_mul(2) > ring || *max_phases > i32::MAX as u32 {
                return Err(format!(
                    "density window {window:#x} must be non-empty and at most half the ring \
                     {ring:#x}, max_phases {max_phases} at most i32::MAX"
                ));
            }
        }
        let r = self.program.range();
        if !data_range_ok(layout, image, &self.scratch_range(), &r, REPORT_BLOCK) {
            return Err(format!(
                "range {r:x?} must be 2 MiB aligned boot RAM clear of the image and scratch"
            ));
        }
        if let FprProgram::Phases { window, .. } | FprProgram::Density { window, .. } =
            &self.program
        {
            if window % REPORT_BLOCK != 0 {
                return Err(format!("window {window:#x} is not a 2 MiB multiple"));
            }
        }
        Ok(())
    }

    /// Emit the driver. Registers: r15 MMIO base, rbp scratch; the routines take rdi..rsi.
    pub(crate) fn emit(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let queues = self.queues();
        let mut fail = a.create_label();
        let mut end = a.create_label();
        let mut main = a.create_label();
        let mut touch = a.create_label();
        let mut report_free = a.create_label();
        let mut count_nonzero = a.create_label();
        a.jmp(main)?;
        a.set_label(&mut touch)?;
        self.emit_touch(a)?;
        a.set_label(&mut report_free)?;
        a.nop()?;
        self.emit_report_free(a, &queues[REPORTING_QUEUE as usize], fail)?;
        a.set_label(&mut count_nonzero)?;
        emit_count_nonzero(a)?;

        a.set_label(&mut main)?;
        a.mov(r15, self.mmio_base)?;
        a.mov(rbp, self.scratch)?;
        // Chains submitted, kept in r12.
        a.xor(r12d, r12d)?;
        emit_probe(
            a,
            VIRTIO_ID_BALLOON,
            FEATURE_VERSION_1 | FEATURE_REPORTING,
            &queues,
            fail,
        )?;
        match &self.program {
            FprProgram::TouchReportVerify {
                range,
                wait_for_host,
            } => {
                let len = range.end - range.start;
                call_over(a, range, touch)?;
                a.mov(rax, len)?;
                report(a, TAG_FPR_TOUCHED, rax)?;
                if *wait_for_host {
                    wait_mailbox(a, 1)?;
                }
                call_over(a, range, report_free)?;
                report(a, TAG_FPR_CHAINS, r12)?;
                a.mov(rax, len)?;
                report(a, TAG_FPR_REPORTED, rax)?;
                if *wait_for_host {
                    wait_mailbox(a, 2)?;
                }
                call_over(a, range, count_nonzero)?;
                report(a, TAG_FPR_NONZERO, rax)?;
                report(a, TAG_FPR_CHECKED, rcx)?;
            }
            FprProgram::Phases {
                base,
                window,
                windows,
                phases,
            } => self.emit_phases(
                a,
                PhaseParams {
                    base: *base,
                    window: *window,
                    windows: *windows,
                    phases: *phases,
                },
                touch,
                report_free,
            )?,
            FprProgram::Density {
                base,
                ring_end,
                window,
                max_phases,
            } => super::fpr_density::emit_density(
                a,
                super::fpr_density::DensityParams {
                    base: *base,
                    ring_end: *ring_end,
                    window: *window,
                    max_phases: *max_phases,
                    seed: self.seed,
                },
                report_free,
            )?,
        }
        a.jmp(end)?;
        a.set_label(&mut fail)?;
        report(a, TAG_DRIVER_FAILED, rax)?;
        a.set_label(&mut end)?;
        a.nop()
    }

    /// Routine: write `pattern(p, seed)` at the first word of every page of [rdi, rsi).
    /// Clobbers rax, rdx, rdi.
    fn emit_touch(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.mov(rdx, self.seed)?;
        super::fpr_density::emit_touch_seeded(a)
    }

    /// Routine: report [rdi, rsi) free in chains of up to 32 blocks of 2 MiB on `q`, each
    /// submitted and waited for (see [`emit_block_chains`]).
    fn emit_report_free(
        &self,
        a: &mut CodeAssembler,
        q: &Virtq,
        fail: CodeLabel,
    ) -> Result<(), IcedError> {
        emit_block_chains(
            a,
            q,
            BlockChains {
                len: REPORT_BLOCK as u32,
                step: REPORT_BLOCK as u32,
                capacity: REPORT_CAPACITY,
                poll_limit: self.poll_limit,
            },
            fail,
        )
    }

    fn emit_phases(
        &self,
        a: &mut CodeAssembler,
        p: PhaseParams,
        touch: CodeLabel,
        report_free: CodeLabel,
    ) -> Result<(), IcedError> {
        let PhaseParams {
            base,
            window,
            windows,
            phases,
        } = p;
        let ring_end = base + window * u64::from(windows);
        let mut top = a.create_label();
        let mut first = a.create_label();
        let mut no_wrap = a.create_label();
        let mut done = a.create_label();
        // rbx: phase, r13: current window, r8: previous window, r9: tsc mark.
        a.xor(ebx, ebx)?;
        a.mov(r13, base)?;
        a.mov(r8, base)?;
        a.set_label(&mut top)?;
        a.cmp(ebx, phases as i32)?;
        a.jae(done)?;
        rdtsc_into(a, r9)?;
        window_args(a, r13, window)?;
        a.call(touch)?;
        rdtsc_into(a, rax)?;
        a.mov(rcx, rax)?;
        a.sub(rax, r9)?;
        a.mov(r9, rcx)?;
        report(a, TAG_FPR_PHASE_TOUCH_TSC, rax)?;
        a.test(ebx, ebx)?;
        a.jz(first)?;
        window_args(a, r8, window)?;
        a.push(r8)?;
        a.push(r9)?;
        a.call(report_free)?;
        a.pop(r9)?;
        a.pop(r8)?;
        a.set_label(&mut first)?;
        rdtsc_into(a, rax)?;
        a.sub(rax, r9)?;
        report(a, TAG_FPR_PHASE_REPORT_TSC, rax)?;
        report(a, TAG_FPR_PHASE, rbx)?;
        a.mov(r8, r13)?;
        a.mov(rax, window)?;
        a.add(r13, rax)?;
        a.mov(rax, ring_end)?;
        a.cmp(r13, rax)?;
        a.jb(no_wrap)?;
        a.mov(r13, base)?;
        a.set_label(&mut no_wrap)?;
        a.inc(ebx)?;
        a.jmp(top)?;
        a.set_label(&mut done)?;
        // The last window touched goes back too.
        window_args(a, r8, window)?;
        a.call(report_free)?;
        report(a, TAG_FPR_CHAINS, r12)?;
        report(a, TAG_FPR_PHASES_DONE, rbx)
    }
}

#[derive(Clone, Copy)]
struct PhaseParams {
    base: u64,
    window: u64,
    windows: u32,
    phases: u32,
}

/// Call `routine` over [range.start, range.end) (in rdi, rsi).
fn call_over(
    a: &mut CodeAssembler,
    range: &Range<u64>,
    routine: CodeLabel,
) -> Result<(), IcedError> {
    a.mov(rdi, range.start)?;
    a.mov(rsi, range.end)?;
    a.call(routine)
}

/// rdi = `start`, rsi = `start` + `window`: a routine's range over the window at `start`.
fn window_args(a: &mut CodeAssembler, start: AsmRegister64, window: u64) -> Result<(), IcedError> {
    a.mov(rdi, start)?;
    a.mov(rsi, window)?;
    a.add(rsi, start)
}

/// `reg = rdtsc` (edx:eax combined). Clobbers rax, rdx.
fn rdtsc_into(a: &mut CodeAssembler, reg: AsmRegister64) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    if reg != rax {
        a.mov(reg, rax)?;
    }
    Ok(())
}

/// Routine: rax = pages of [rdi, rsi) whose first word is not zero, rcx = pages read.
/// Clobbers rdi.
fn emit_count_nonzero(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut zero = a.create_label();
    let mut done = a.create_label();
    a.xor(eax, eax)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut top)?;
    a.cmp(rdi, rsi)?;
    a.jae(done)?;
    a.inc(rcx)?;
    a.cmp(qword_ptr(rdi), 0)?;
    a.je(zero)?;
    a.inc(rax)?;
    a.set_label(&mut zero)?;
    a.add(rdi, 4096)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// A tiny guest (for `layout`) that runs `driver` and then reports done.
pub fn fpr_program(layout: &Layout, driver: FprDriver) -> Result<GuestImage, TinyGuestError> {
    TinyGuestBuilder::new(layout)
        .step(Step::FreePageReporting(driver))
        .step(Step::Done)
        .build()
}

/// Where [`fpr_phases_program`] puts its ring of windows: from 2 MiB, above the image and
/// the driver's scratch pages.
pub const PHASES_BASE: u64 = REPORT_BLOCK;

/// The density benchmark's guest: `phases` phases over a ring of `windows` windows of
/// `window_mib` MiB from [`PHASES_BASE`]; each phase touches its window and reports the
/// previous one free, with per-phase `rdtsc` reports ([`TAG_FPR_PHASE_TOUCH_TSC`],
/// [`TAG_FPR_PHASE_REPORT_TSC`], [`TAG_FPR_PHASE`]) and the host's arrival times. The driver
/// uses [`super::virtq::DEFAULT_SCRATCH`]; the balloon's window is at `mmio_base`.
pub fn fpr_phases_program(
    layout: &Layout,
    mmio_base: u64,
    window_mib: u64,
    windows: u32,
    phases: u32,
) -> Result<(GuestImage, FprDriver), TinyGuestError> {
    let driver = FprDriver::new(
        mmio_base,
        super::virtq::DEFAULT_SCRATCH,
        FprProgram::Phases {
            base: PHASES_BASE,
            window: window_mib.saturating_mul(1 << 20),
            windows,
            phases,
        },
    );
    Ok((fpr_program(layout, driver.clone())?, driver))
}

/// The density benchmark's guest: the [`FprProgram::Density`] loop over the ring from
/// [`PHASES_BASE`] to the end of the boot RAM range holding it, `window_mib` MiB a phase, page
/// patterns seeded with `seed` (a per-VM value; see [`super::fpr_density::phase_seed`]).
pub fn fpr_density_program(
    layout: &Layout,
    mmio_base: u64,
    window_mib: u64,
    max_phases: u32,
    seed: u64,
) -> Result<(GuestImage, FprDriver), TinyGuestError> {
    let ring_end = layout
        .boot_ram_ranges()
        .iter()
        .find(|r| r.start <= PHASES_BASE && PHASES_BASE < r.end)
        .map(|r| r.end - r.end % REPORT_BLOCK)
        .ok_or_else(|| TinyGuestError::BadDriver("no boot RAM at the ring's base".into()))?;
    let mut driver = FprDriver::new(
        mmio_base,
        super::virtq::DEFAULT_SCRATCH,
        FprProgram::Density {
            base: PHASES_BASE,
            ring_end,
            window: window_mib.saturating_mul(1 << 20),
            max_phases,
        },
    );
    driver.seed = seed;
    Ok((fpr_program(layout, driver.clone())?, driver))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MIB;
    use crate::tiny_guest::tests::layout;
    use crate::tiny_guest::virtq::{DEFAULT_MMIO_BASE, DEFAULT_SCRATCH};

    #[test]
    fn programs_assemble() {
        let d = FprDriver::new(
            DEFAULT_MMIO_BASE,
            DEFAULT_SCRATCH,
            FprProgram::TouchReportVerify {
                range: 64 * MIB..128 * MIB,
                wait_for_host: true,
            },
        );
        let img = fpr_program(&layout(256), d).expect("build");
        assert!(img.range().end <= DEFAULT_SCRATCH);
        let (_, d) =
            fpr_phases_program(&layout(256), DEFAULT_MMIO_BASE, 64, 3, 10).expect("phases");
        assert_eq!(d.program.range(), PHASES_BASE..PHASES_BASE + 192 * MIB);
        let (_, d) =
            fpr_density_program(&layout(256), DEFAULT_MMIO_BASE, 64, 0, 7).expect("density");
        assert_eq!(d.program.range(), PHASES_BASE..256 * MIB);
        assert_eq!(d.seed, 7);
        assert!(matches!(
            fpr_density_program(&layout(256), DEFAULT_MMIO_BASE, 192, 0, 7),
            Err(TinyGuestError::BadDriver(_))
        ));
    }

    #[test]
    fn bad_programs_are_refused() {
        let l = layout(256);
        let bad = |program: FprProgram| {
            let d = FprDriver::new(DEFAULT_MMIO_BASE, DEFAULT_SCRATCH, program);
            matches!(fpr_program(&l, d), Err(TinyGuestError::BadDriver(_)))
        };
        let trv = |range: Range<u64>| FprProgram::TouchReportVerify {
            range,
            wait_for_host: false,
        };
        assert!(bad(trv(0..64 * MIB)), "covers the image and scratch");
        assert!(bad(trv(64 * MIB + 4096..128 * MIB)), "misaligned");
        assert!(bad(trv(128 * MIB..512 * MIB)), "outside RAM");
        assert!(bad(trv(64 * MIB..64 * MIB)), "empty");
        let ph = |window: u64, windows: u32, phases: u32| FprProgram::Phases {
            base: PHASES_BASE,
            window,
            windows,
            phases,
        };
        assert!(bad(ph(64 * MIB, 1, 4)), "one window");
        assert!(bad(ph(64 * MIB, 2, 0)), "no phase");
        assert!(bad(ph(3 * MIB, 2, 1)), "window not a 2 MiB multiple");
        assert!(bad(ph(128 * MIB, 2, 1)), "ring beyond RAM");
        assert!(!bad(ph(64 * MIB, 2, 1)));
        // The reporting queue must hold a full report.
        let mut d = FprDriver::new(DEFAULT_MMIO_BASE, DEFAULT_SCRATCH, ph(64 * MIB, 2, 1));
        d.queue_size = 16;
        assert!(matches!(
            fpr_program(&l, d),
            Err(TinyGuestError::BadDriver(_))
        ));
    }
}
