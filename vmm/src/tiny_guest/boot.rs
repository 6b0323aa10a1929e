//! The fixed part of a tiny guest image: GDT, TSS and identity page tables, and the register
//! state that enters 64-bit long mode directly (no real-mode code).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest-physical address of the 64-bit TSS (after the GDT, same page).
pub const TSS_ADDR: u64 = 0x1800;
/// Size of the TSS minus one.
pub const TSS_LIMIT: u32 = 0x67;
/// PML4 page.
pub const PML4_ADDR: u64 = 0x2000;
/// PDPT page.
pub const PDPT_ADDR: u64 = 0x3000;
/// First page directory; one 4 KiB PD per GiB mapped follows.
pub const PD_ADDR: u64 = 0x4000;

/// CR0: protection enable.
pub const CR0_PE: u64 = 1 << 0;
/// CR0: extension type (always 1).
pub const CR0_ET: u64 = 1 << 4;
/// CR0: native FPU error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension (needed for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4: OS supports fxsave/fxrstor (enables SSE).
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4: OS handles SIMD floating-point exceptions.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4: rd/wr{fs,gs}base enabled.
pub const CR4_FSGSBASE: u64 = 1 << 16;
/// CR4: xsave and XCR0 enabled.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4: protection keys enabled.
pub const CR4_PKE: u64 = 1 << 22;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS: reserved bit 1, always set.
pub const RFLAGS_FIXED: u64 = 1 << 1;
/// RFLAGS: I/O privilege level 3 (port I/O allowed at CPL3).
pub const RFLAGS_IOPL3: u64 = 3 << 12;

/// Page-table entry bits: present, writable, user.
const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
/// PD entry bit: this entry maps a 2 MiB page.
const PTE_HUGE: u64 = 1 << 7;

/// GDT slots. Selectors are `index * 8 | RPL`.
const GDT_KCODE: u16 = 1;
const GDT_KDATA: u16 = 2;
const GDT_UDATA: u16 = 3;
const GDT_UCODE: u16 = 4;
const GDT_TSS: u16 = 5; // 16-byte system descriptor, slots 5 and 6
const GDT_ENTRIES: u16 = 7;

/// Privilege level the guest program starts at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// CPL3: runs natively on this host. The default.
    User,
    /// CPL0: emulated here (~1 µs per instruction); for probing the emulator.
    Kernel,
}

/// A segment descriptor's fields, shared by the GDT bytes and the `kvm_segment` KVM is given,
/// so the two cannot disagree.
#[derive(Clone, Copy, Debug)]
struct Seg {
    index: u16,
    base: u64,
    limit: u32,
    /// Type field (4 bits).
    typ: u8,
    /// Descriptor type: 1 for code/data, 0 for system (TSS).
    s: u8,
    dpl: u8,
    l: u8,
    db: u8,
    g: u8,
}

impl Seg {
    const fn code64(index: u16, dpl: u8) -> Seg {
        Seg {
            index,
            base: 0,
            limit: 0xffff_ffff,
            typ: 0xb,
            s: 1,
            dpl,
            l: 1,
            db: 0,
            g: 1,
        }
    }
    const fn data(index: u16, dpl: u8) -> Seg {
        Seg {
            index,
            base: 0,
            limit: 0xffff_ffff,
            typ: 0x3,
            s: 1,
            dpl,
            l: 0,
            db: 1,
            g: 1,
        }
    }
    const fn tss() -> Seg {
        Seg {
            index: GDT_TSS,
            base: TSS_ADDR,
            limit: TSS_LIMIT,
            typ: 0xb,
            s: 0,
            dpl: 0,
            l: 0,
            db: 0,
            g: 0,
        }
    }

    fn selector(&self) -> u16 {
        (self.index << 3) | u16::from(self.dpl)
    }

    /// The low 8 bytes of the descriptor.
    fn descriptor(&self) -> u64 {
        let limit = if self.g == 1 {
            self.limit >> 12
        } else {
            self.limit
        };
        let access =
            u64::from(self.typ) | (u64::from(self.s) << 4) | (u64::from(self.dpl) << 5) | (1 << 7);
        let flags = (u64::from(self.l) << 1) | (u64::from(self.db) << 2) | (u64::from(self.g) << 3);
        (u64::from(limit) & 0xffff)
            | ((self.base & 0xff_ffff) << 16)
            | (access << 40)
            | ((u64::from(limit) >> 16 & 0xf) << 48)
            | (flags << 52)
            | ((self.base >> 24 & 0xff) << 56)
    }

    fn kvm(&self) -> kvm_segment {
        kvm_segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector(),
            type_: self.typ,
            present: 1,
            dpl: self.dpl,
            db: self.db,
            s: self.s,
            l: self.l,
            g: self.g,
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

/// Register state that starts a vCPU in 64-bit mode at `rip`.
#[derive(Clone, Debug)]
pub struct BootState {
    /// Entry point.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// Initial RFLAGS.
    pub rflags: u64,
    /// Privilege the code runs at.
    pub privilege: Privilege,
    /// CR4 (at least [`CR4_PAE`]).
    pub cr4: u64,
}

impl BootState {
    /// Fill `sregs` (as read from the vCPU, so KVM-owned fields like the APIC base stay) with
    /// long-mode control registers, the GDT, the TSS and the code/stack segments.
    pub fn apply_sregs(&self, sregs: &mut kvm_sregs) {
        let (code, data) = match self.privilege {
            Privilege::User => (Seg::code64(GDT_UCODE, 3), Seg::data(GDT_UDATA, 3)),
            Privilege::Kernel => (Seg::code64(GDT_KCODE, 0), Seg::data(GDT_KDATA, 0)),
        };
        sregs.cs = code.kvm();
        let d = data.kvm();
        sregs.ds = d;
        sregs.es = d;
        sregs.fs = d;
        sregs.gs = d;
        sregs.ss = d;
        sregs.tr = Seg::tss().kvm();
        sregs.ldt = kvm_segment {
            unusable: 1,
            type_: 2,
            present: 1,
            ..Default::default()
        };
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = GDT_ENTRIES * 8 - 1;
        // No IDT: any exception ends in a triple fault, i.e. KVM_EXIT_SHUTDOWN.
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = self.cr4 | CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    }

    /// General registers: rip, rsp, rflags; everything else zero.
    pub fn regs(&self) -> kvm_regs {
        kvm_regs {
            rip: self.rip,
            rsp: self.rsp,
            rflags: self.rflags,
            ..Default::default()
        }
    }
}

/// Number of page directories needed to identity-map `[0, map_end)` (1 GiB each).
pub fn pd_count(map_end: u64) -> u64 {
    map_end.div_ceil(1 << 30).max(1)
}

/// Write the GDT, TSS and page tables into `img`, which holds guest memory from `base`
/// (`base <= GDT_ADDR`). Identity-maps `[0, map_end)` with 2 MiB pages, all with the U bit.
pub fn write_tables(img: &mut [u8], base: u64, map_end: u64) {
    let mut put = |gpa: u64, v: u64| {
        let off = (gpa - base) as usize;
        if let Some(dst) = img.get_mut(off..off + 8) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    };
    let segs = [
        Seg::code64(GDT_KCODE, 0),
        Seg::data(GDT_KDATA, 0),
        Seg::data(GDT_UDATA, 3),
        Seg::code64(GDT_UCODE, 3),
        Seg::tss(),
    ];
    for s in segs {
        put(GDT_ADDR + u64::from(s.index) * 8, s.descriptor());
    }
    // Upper half of the 16-byte TSS descriptor: base bits 63:32.
    put(GDT_ADDR + u64::from(GDT_TSS + 1) * 8, TSS_ADDR >> 32);
    let flags = PTE_PRESENT | PTE_WRITE | PTE_USER;
    put(PML4_ADDR, PDPT_ADDR | flags);
    for i in 0..pd_count(map_end) {
        let pd = PD_ADDR + i * 0x1000;
        put(PDPT_ADDR + i * 8, pd | flags);
        for j in 0..512u64 {
            let addr = (i << 30) + (j << 21);
            put(pd + j * 8, addr | flags | PTE_HUGE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_architecture() {
        // Well-known encodings of flat 64-bit code and data descriptors.
        assert_eq!(Seg::code64(1, 0).descriptor(), 0x00af_9b00_0000_ffff);
        assert_eq!(Seg::data(2, 0).descriptor(), 0x00cf_9300_0000_ffff);
        assert_eq!(Seg::code64(4, 3).descriptor(), 0x00af_fb00_0000_ffff);
        assert_eq!(Seg::data(3, 3).descriptor(), 0x00cf_f300_0000_ffff);
        assert_eq!(Seg::code64(4, 3).selector(), 0x23);
        assert_eq!(Seg::data(3, 3).selector(), 0x1b);
        let tss = Seg::tss().descriptor();
        assert_eq!(tss & 0xffff, 0x67);
        assert_eq!((tss >> 16) & 0xff_ffff, TSS_ADDR);
        assert_eq!((tss >> 40) & 0xff, 0x8b);
    }

    #[test]
    fn tables_identity_map_with_user_bit() {
        let base = 0x1000;
        let map_end = 4u64 << 30;
        let mut img = vec![0u8; (PD_ADDR + pd_count(map_end) * 0x1000 - base) as usize];
        write_tables(&mut img, base, map_end);
        let get = |gpa: u64| {
            let o = (gpa - base) as usize;
            u64::from_le_bytes(img[o..o + 8].try_into().expect("8 bytes"))
        };
        assert_eq!(get(PML4_ADDR), PDPT_ADDR | 7);
        assert_eq!(get(PDPT_ADDR + 3 * 8), (PD_ADDR + 0x3000) | 7);
        // The 2 MiB page mapping 3 GiB + 2 MiB.
        let e = get(PD_ADDR + 0x3000 + 8);
        assert_eq!(e, ((3 << 30) + (2 << 20)) | 0x87);
        assert_eq!(pd_count(1), 1);
        assert_eq!(pd_count(map_end + 1), 5);
    }
}
