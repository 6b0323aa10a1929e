//! The "tiny guest": a raw 64-bit image built in Rust with iced-x86 `code_asm`, entered straight
//! in long mode at CPL3 (where this host runs guest code natively), that talks to the VMM by
//! MMIO writes to an unmapped report window.
//!
//! Image layout in guest memory (from [`boot`]): GDT and TSS at 0x1000, PML4 at 0x2000, PDPT at
//! 0x3000, one page directory per GiB mapped from 0x4000, then the code, then a stack page.
//! The page tables identity-map `[0, map_end)` with 2 MiB pages, all with the U bit, where
//! `map_end` covers the VM's layout and the 32-bit hole (so the report window is mapped).
//!
//! Polled virtio drivers ([`virtio_mem_driver`], [`fpr_driver`], [`hint_driver`], built on
//! [`virtq`]) are steps too, as is [`hint_race`]'s writer that races the hinting driver from a
//! second vCPU; [`harness`] runs them against real device models through the virtio-mmio
//! transport.

pub mod boot;
pub mod fpr_density;
pub mod fpr_driver;
pub mod fpr_run;
pub mod harness;
pub mod hint_driver;
pub mod hint_race;
pub mod probe;
pub mod program;
pub mod run;
pub mod virtio_mem_driver;
pub mod virtq;
pub mod vmem_run;

use std::ops::Range;

pub use boot::{BootState, Privilege};
pub use program::{pattern, Step, Stride, REPORT_BASE, TAG_CHECKED, TAG_DONE, TAG_MISMATCHES};
pub use run::{
    measure_boot_phases, measure_create_to_first_run, run_tiny_guest, run_tiny_guest_on,
    run_tiny_guest_smp, BootPhases, GuestReport, ReportCollector, RunPhases, TinyRun,
};

use crate::memory::layout::{align_up, Layout, GIB, MMIO_HOLE_END};

/// Errors from building a tiny guest.
#[derive(Debug, thiserror::Error)]
pub enum TinyGuestError {
    /// The assembler refused the program.
    #[error("assembling the tiny guest failed: {0}")]
    Asm(#[from] iced_x86::IcedError),
    /// The image does not fit in low boot RAM.
    #[error("image [{start:#x}, {end:#x}) does not fit in low RAM ending at {ram_end:#x}")]
    TooBig {
        /// Image start.
        start: u64,
        /// Image end.
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// A pattern range is outside guest RAM or not 8-byte aligned.
    #[error("pattern range {0:x?} is not an 8-byte aligned range inside boot RAM or the hot-plug region")]
    BadRange(Range<u64>),
    /// A driver step's parameters do not fit the layout or the image.
    #[error("driver step: {0}")]
    BadDriver(String),
}

/// A raw guest image: bytes loaded at `load_addr`, plus the register state to start it.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// Guest-physical load address of `bytes`.
    pub load_addr: u64,
    /// The image (tables, code, stack page).
    pub bytes: Vec<u8>,
    /// Where and how vCPU 0 starts.
    pub boot: BootState,
    /// Where and how vCPUs 1, 2, ... start (one per [`TinyGuestBuilder::secondary`] program).
    pub secondary: Vec<BootState>,
}

impl GuestImage {
    /// Entry point.
    pub fn entry(&self) -> u64 {
        self.boot.rip
    }

    /// Boot state of every vCPU the image has a program for, vCPU 0 first.
    pub fn boot_states(&self) -> impl Iterator<Item = &BootState> {
        std::iter::once(&self.boot).chain(self.secondary.iter())
    }

    /// Guest-physical range the image occupies.
    pub fn range(&self) -> Range<u64> {
        self.load_addr..self.load_addr + self.bytes.len() as u64
    }
}

/// Builds a tiny guest for a layout.
#[derive(Clone, Debug)]
pub struct TinyGuestBuilder {
    layout: Layout,
    steps: Vec<Step>,
    secondary: Vec<Vec<Step>>,
    privilege: Privilege,
    cr4: u64,
}

/// Fixed size reserved for code: the image's extent must be known before assembling, because
/// pattern loops skip it.
const CODE_RESERVE: u64 = 0x4000;

impl TinyGuestBuilder {
    /// A builder with no steps, at CPL3.
    pub fn new(layout: &Layout) -> TinyGuestBuilder {
        TinyGuestBuilder {
            layout: layout.clone(),
            steps: Vec::new(),
            secondary: Vec::new(),
            privilege: Privilege::User,
            cr4: boot::CR4_PAE,
        }
    }

    /// Run at this privilege instead of CPL3.
    pub fn privilege(mut self, p: Privilege) -> Self {
        self.privilege = p;
        self
    }

    /// Also set these CR4 bits (e.g. [`boot::CR4_OSFXSR`] for SSE) at entry.
    pub fn cr4(mut self, bits: u64) -> Self {
        self.cr4 |= bits;
        self
    }

    /// Append a step.
    pub fn step(mut self, s: Step) -> Self {
        self.steps.push(s);
        self
    }

    /// Add a program for one more vCPU (vCPU 1 for the first call, and so on). Each program has
    /// its own code area and stack page; all share the tables and report window.
    pub fn secondary(mut self, steps: Vec<Step>) -> Self {
        self.secondary.push(steps);
        self
    }

    /// Append "fill every block (or page) of all boot RAM with `pattern(gpa, seed)`, read it
    /// back, report mismatches and words checked".
    pub fn pattern_test(self, seed: u64, stride: Stride) -> Self {
        let ranges = self.layout.boot_ram_ranges();
        self.step(Step::Fill {
            ranges: ranges.clone(),
            seed,
            stride,
        })
        .step(Step::Verify {
            ranges,
            seed,
            stride,
        })
    }

    /// The guest-physical end of the identity map: the layout and the 32-bit hole, rounded
    /// to 1 GiB.
    pub fn map_end(&self) -> u64 {
        align_up(self.layout.end().max(MMIO_HOLE_END), GIB).unwrap_or(MMIO_HOLE_END)
    }

    fn check_ranges(&self, image: &Range<u64>) -> Result<(), TinyGuestError> {
        let mut ram = self.layout.boot_ram_ranges();
        ram.extend(self.layout.hotplug());
        let ok = |r: &Range<u64>| {
            r.start % 8 == 0
                && r.start <= r.end
                && ram.iter().any(|m| m.start <= r.start && r.end <= m.end)
        };
        for s in self.steps.iter().chain(self.secondary.iter().flatten()) {
            match s {
                Step::Fill { ranges, .. } | Step::Verify { ranges, .. } => {
                    if let Some(bad) = ranges.iter().find(|r| !ok(r)) {
                        return Err(TinyGuestError::BadRange(bad.clone()));
                    }
                }
                Step::VirtioMem(d) => d
                    .check(&self.layout, image)
                    .map_err(TinyGuestError::BadDriver)?,
                Step::FreePageReporting(d) => d
                    .check(&self.layout, image)
                    .map_err(TinyGuestError::BadDriver)?,
                Step::FreePageHinting(d) => d
                    .check(&self.layout, image)
                    .map_err(TinyGuestError::BadDriver)?,
                Step::HintRaceWriter(w) => w
                    .check(&self.layout, image)
                    .map_err(TinyGuestError::BadDriver)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Assemble the image.
    pub fn build(self) -> Result<GuestImage, TinyGuestError> {
        let map_end = self.map_end();
        let load_addr = boot::GDT_ADDR;
        let code_base = boot::PD_ADDR + boot::pd_count(map_end) * 0x1000;
        // One code area plus stack page per program.
        let area = CODE_RESERVE + 0x1000;
        let programs: Vec<&Vec<Step>> = std::iter::once(&self.steps)
            .chain(self.secondary.iter())
            .collect();
        let end = code_base + area * programs.len() as u64;
        self.check_ranges(&(load_addr..end))?;
        let ram_end = self.layout.low_ram().end;
        if end > ram_end {
            return Err(TinyGuestError::TooBig {
                start: load_addr,
                end,
                ram_end,
            });
        }
        let mut bytes = vec![0u8; (end - load_addr) as usize];
        boot::write_tables(&mut bytes, load_addr, map_end);
        let mut states = Vec::new();
        for (i, steps) in programs.into_iter().enumerate() {
            let code_addr = code_base + area * i as u64;
            let stack_top = code_addr + area;
            let code = program::assemble(steps, code_addr, load_addr..end)?;
            if code.len() as u64 > CODE_RESERVE {
                return Err(TinyGuestError::TooBig {
                    start: code_addr,
                    end: code_addr + code.len() as u64,
                    ram_end: code_addr + CODE_RESERVE,
                });
            }
            let off = (code_addr - load_addr) as usize;
            bytes[off..off + code.len()].copy_from_slice(&code);
            states.push(BootState {
                rip: code_addr,
                rsp: stack_top,
                rflags: boot::RFLAGS_FIXED | boot::RFLAGS_IOPL3,
                privilege: self.privilege,
                cr4: self.cr4,
            });
        }
        let boot = states.remove(0);
        Ok(GuestImage {
            load_addr,
            bytes,
            boot,
            secondary: states,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{LayoutConfig, MIB};

    /// A layout of `mib` MiB of boot RAM and no hot-plug region (shared with the drivers'
    /// tests).
    pub(super) fn layout(mib: u64) -> Layout {
        Layout::new(LayoutConfig {
            boot_ram: mib * MIB,
            hotplug_size: 0,
        })
        .expect("layout")
    }

    #[test]
    fn image_layout_and_entry() {
        let img = TinyGuestBuilder::new(&layout(256))
            .pattern_test(7, Stride::Block)
            .step(Step::Done)
            .build()
            .expect("build");
        assert_eq!(img.load_addr, 0x1000);
        // 4 PDs for [0, 4 GiB), code after them.
        assert_eq!(img.entry(), 0x8000);
        assert_eq!(img.range().end, 0x8000 + CODE_RESERVE + 0x1000);
        assert_eq!(img.boot.rsp, img.range().end);
        assert_eq!(img.boot.rflags & boot::RFLAGS_IOPL3, boot::RFLAGS_IOPL3);
        // The code starts with `mov r10, imm64` (REX.WB B8+r) loading the image start.
        let off = (img.entry() - img.load_addr) as usize;
        assert_eq!(&img.bytes[off..off + 2], &[0x49, 0xba]);
        assert_eq!(&img.bytes[off + 2..off + 10], &0x1000u64.to_le_bytes());
        // Page tables are in place.
        let pml4 = (boot::PML4_ADDR - img.load_addr) as usize;
        assert_eq!(img.bytes[pml4], 0x07);
    }

    #[test]
    fn secondary_programs_get_their_own_code_and_stack() {
        let img = TinyGuestBuilder::new(&layout(64))
            .step(Step::Done)
            .secondary(vec![Step::Spin])
            .secondary(vec![Step::Halt])
            .build()
            .expect("build");
        let states: Vec<_> = img.boot_states().collect();
        assert_eq!(states.len(), 3);
        let area = CODE_RESERVE + 0x1000;
        assert_eq!(states[1].rip, states[0].rip + area);
        assert_eq!(states[2].rip, states[0].rip + 2 * area);
        assert_eq!(states[2].rsp, img.range().end);
        // Each program's code begins with the same prologue.
        for st in &states {
            let off = (st.rip - img.load_addr) as usize;
            assert_eq!(&img.bytes[off..off + 2], &[0x49, 0xba]);
        }
    }

    #[test]
    fn bad_ranges_and_tiny_ram_are_refused() {
        let l = layout(64);
        let r = TinyGuestBuilder::new(&l)
            .step(Step::Fill {
                ranges: std::iter::once(0..128 * MIB).collect(),
                seed: 0,
                stride: Stride::Page,
            })
            .build();
        assert!(matches!(r, Err(TinyGuestError::BadRange(_))));
        // 2 MiB of RAM is enough for the image.
        assert!(TinyGuestBuilder::new(&layout(2))
            .step(Step::Done)
            .build()
            .is_ok());
    }

    #[test]
    fn pattern_is_gpa_xor_seed() {
        assert_eq!(pattern(0x20_0000, 0xff), 0x20_00ff);
        assert_eq!(Stride::Page.bytes(), 4096);
        assert_eq!(Stride::Block.bytes(), 2 * MIB);
    }
}
