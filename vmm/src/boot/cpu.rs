//! vCPU state for a Linux boot: FPU, MSRs (MTRR default type write-back), local APIC LINT0
//! as ExtINT and LINT1 as NMI, and for the BSP the registers of the chosen entry.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};

use super::{Entry, BOOT_GDT_ADDR, BOOT_STACK, PML4_ADDR};
use crate::kvm::Vcpu;

/// MSR IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// Its value: MTRRs enabled (bit 11), default type write-back (6).
pub const MTRR_DEF_TYPE_WB: u64 = (1 << 11) | 6;
/// MSR IA32_MISC_ENABLE.
pub const MSR_MISC_ENABLE: u32 = 0x1a0;
/// Fast-string enable bit of IA32_MISC_ENABLE.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// LAPIC LVT delivery mode ExtINT.
pub const LINT_EXTINT: u32 = 7;
/// LAPIC LVT delivery mode NMI.
pub const LINT_NMI: u32 = 4;
/// LAPIC register offsets.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    /// An ioctl failed.
    #[error("vCPU {id}: {what} failed: {source}")]
    Ioctl {
        /// vCPU id.
        id: u8,
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("vCPU {id}: KVM set {set} of {wanted} MSRs")]
    Msrs {
        /// vCPU id.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
}

fn seg(selector: u16, typ: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: typ,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Fill `sregs` for `entry`.
pub(crate) fn entry_sregs(sregs: &mut kvm_sregs, entry: &Entry) {
    let data = seg(0x18, 0x3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // A TSS for the task register (VM entry needs a usable, busy TSS); the kernel loads its own.
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    match entry {
        Entry::Pvh { .. } => {
            sregs.cs = seg(0x20, 0xb, 0, 1);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        Entry::Linux64 { .. } => {
            sregs.cs = seg(0x10, 0xb, 1, 0);
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
}

/// The general registers for `entry`.
pub(crate) fn entry_regs(entry: &Entry) -> kvm_regs {
    match *entry {
        Entry::Pvh { rip, start_info } => kvm_regs {
            rip,
            rbx: start_info,
            rflags: 2,
            ..Default::default()
        },
        Entry::Linux64 { rip, zero_page } => kvm_regs {
            rip,
            rsi: zero_page,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rflags: 2,
            ..Default::default()
        },
    }
}

/// Set `reg`'s delivery mode in a `kvm_lapic_state` register array.
pub(crate) fn set_lvt_mode(regs: &mut [std::os::raw::c_char], reg: usize, mode: u32) {
    let Some(bytes) = regs.get_mut(reg..reg + 4) else {
        return;
    };
    let mut v = [0u8; 4];
    for (d, s) in v.iter_mut().zip(bytes.iter()) {
        *d = *s as u8;
    }
    let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
    for (d, s) in bytes.iter_mut().zip(val.to_le_bytes()) {
        *d = s as std::os::raw::c_char;
    }
}

/// Set up vCPU `vcpu` for a Linux boot. The BSP (`bsp == true`) gets the entry registers; the
/// other vCPUs stay in their reset state and wait for INIT/SIPI from the guest, but get the
/// same FPU, MSRs and LAPIC LVTs.
pub fn setup_vcpu(vcpu: &Vcpu, entry: &Entry, bsp: bool) -> Result<(), CpuSetupError> {
    let id = vcpu.id();
    let fd = vcpu.fd();
    let err = |what| move |source| CpuSetupError::Ioctl { id, what, source };

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;

    let entries = [
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_DEF_TYPE_WB,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuSetupError::Msrs {
        id,
        set: 0,
        wanted: entries.len(),
    })?;
    let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuSetupError::Msrs {
            id,
            set,
            wanted: entries.len(),
        });
    }

    let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT0, LINT_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT1, LINT_NMI);
    fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;

    if bsp {
        let mut sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        entry_sregs(&mut sregs, entry);
        fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
        fd.set_regs(&entry_regs(entry))
            .map_err(err("KVM_SET_REGS"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_entry_is_32bit_flat_without_paging() {
        let e = Entry::Pvh {
            rip: 0x100_0850,
            start_info: 0x6000,
        };
        let mut s = kvm_sregs::default();
        entry_sregs(&mut s, &e);
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l), (0x20, 1, 0));
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cr0 & CR0_PE, CR0_PE);
        assert_eq!(s.efer, 0);
        let r = entry_regs(&e);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0850, 0x6000, 2));
    }

    #[test]
    fn linux64_entry_is_long_mode_with_zero_page_in_rsi() {
        let e = Entry::Linux64 {
            rip: 0x100_0000,
            zero_page: 0x7000,
        };
        let mut s = kvm_sregs::default();
        entry_sregs(&mut s, &e);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x10, 1, 0));
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        let r = entry_regs(&e);
        assert_eq!((r.rip, r.rsi, r.rsp), (0x100_0000, 0x7000, BOOT_STACK));
    }

    #[test]
    fn lvt_delivery_mode_is_replaced() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        // Masked (bit 16) with some mode already set.
        regs[0x352] = 1;
        regs[0x351] = 0x05;
        set_lvt_mode(&mut regs, APIC_LVT_LINT0, LINT_EXTINT);
        assert_eq!(regs[0x351] as u8, 0x07);
        assert_eq!(regs[0x352], 1);
        set_lvt_mode(&mut regs, APIC_LVT_LINT1, LINT_NMI);
        assert_eq!(regs[0x361] as u8, 0x04);
        assert_eq!(MTRR_DEF_TYPE_WB, 0x806);
    }
}
