//! The CPUID a Tidepool guest sees: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), minus the
//! features this host's KVM cannot run at guest CPL0.
//!
//! The host's KVM (`kvm_pvm`) emulates guest CPL0 code instruction by instruction, and its
//! emulator does not know every instruction the CPU has. A feature the guest kernel sees, it
//! uses, and the first use at CPL0 ends in `KVM_EXIT_INTERNAL_ERROR`. So every feature whose
//! instructions the emulator cannot run is hidden here, in ONE list ([`DENY_LIST`]), each entry
//! with the reason. Whole leaves that only describe a hidden feature are zeroed
//! ([`ZEROED_LEAVES`]).
//!
//! Evidence: the tier-2 test `cpl0_probe` (`vmm/tests/tier2_probe.rs`, probes in
//! `tiny_guest::probe`) runs each instruction at CPL0 and fails if one a guest kernel can see
//! breaks without being named here. Entries marked "VEX" or "XSAVE-managed" are precautions
//! (the emulator decodes no VEX/EVEX at all, as the AVX, AVX-512, BMI probes show).
//!
//! **This host's limit.** Under `kvm_pvm`, `cpuid` at guest CPL0 answers mostly from the host
//! CPU: KVM_SET_CPUID2 controls only a few bits there (leaf 1 ECX: CX16, x2APIC, TSC-deadline,
//! hypervisor; the APIC ID), and at CPL3 `cpuid` runs natively. So most of this list does not
//! reach the guest by CPUID; [`linux_cmdline`] turns the same list into guest kernel
//! command-line options that make Linux ignore those features. On a host with hardware
//! virtualization CPL0 runs natively, the CPUID filter takes full effect, and the list only
//! costs the guest some optional instructions.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One hidden feature bit.
#[derive(Clone, Copy, Debug)]
pub struct DenyRule {
    /// CPUID leaf (EAX input).
    pub leaf: u32,
    /// Sub-leaf (ECX input).
    pub subleaf: u32,
    /// Output register.
    pub reg: Reg,
    /// Bit number.
    pub bit: u8,
    /// Feature name as Linux spells it in /proc/cpuinfo.
    pub name: &'static str,
    /// Why it is hidden.
    pub why: &'static str,
}

const fn deny(
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u8,
    name: &'static str,
    why: &'static str,
) -> DenyRule {
    DenyRule {
        leaf,
        subleaf,
        reg,
        bit,
        name,
        why,
    }
}

const PROBED: &str = "its instruction at CPL0 ends in KVM_EXIT_INTERNAL_ERROR on this host \
                      (tier-2 cpl0_probe)";

const VEX: &str = "VEX/EVEX-encoded, needs AVX state that XSAVE manages; hidden with XSAVE \
                   (the emulator decodes no VEX/EVEX instructions)";

/// Every feature bit Tidepool hides, and why. This is the only place CPUID is filtered.
#[rustfmt::skip]
pub const DENY_LIST: &[DenyRule] = &[
    // Leaf 1, ECX.
    deny(1, 0, Reg::Ecx, 13, "cx16",
        "cmpxchg16b: a stock 6.1 kernel died with an emulation failure on `lock cmpxchg16b` at \
         CPL0 under this KVM (shared/NOTES.md); the tier-2 cpl0_probe confirms it \
         (KVM_EXIT_INTERNAL_ERROR)"),
    deny(1, 0, Reg::Ecx, 26, "xsave",
        "xsave/xrstor: the kernel's FPU init runs `xrstor` at CPL0, which this KVM cannot \
         emulate (KVM_EXIT_INTERNAL_ERROR, shared/NOTES.md); without XSAVE the kernel uses \
         fxsave/fxrstor, which the cpl0_probe shows working"),
    deny(1, 0, Reg::Ecx, 27, "osxsave", "mirrors CR4.OSXSAVE; meaningless without XSAVE"),
    deny(1, 0, Reg::Ecx, 1, "pclmulqdq", PROBED),
    deny(1, 0, Reg::Ecx, 9, "ssse3", PROBED),
    deny(1, 0, Reg::Ecx, 19, "sse4_1", PROBED),
    deny(1, 0, Reg::Ecx, 20, "sse4_2", PROBED),
    deny(1, 0, Reg::Ecx, 22, "movbe",
        "`movbe` at CPL0 raises #UD in this KVM's emulator even with the feature set \
         (tier-2 cpl0_probe)"),
    deny(1, 0, Reg::Ecx, 23, "popcnt", PROBED),
    deny(1, 0, Reg::Ecx, 25, "aes", PROBED),
    deny(1, 0, Reg::Ecx, 28, "avx", VEX),
    deny(1, 0, Reg::Ecx, 12, "fma", VEX),
    deny(1, 0, Reg::Ecx, 29, "f16c", VEX),
    // Leaf 7 sub-leaf 0, EBX.
    deny(7, 0, Reg::Ebx, 3, "bmi1", "`andn` (VEX) at CPL0: KVM_EXIT_INTERNAL_ERROR (tier-2 cpl0_probe)"),
    deny(7, 0, Reg::Ebx, 4, "hle", "TSX lock elision; transactional execution is not emulated"),
    deny(7, 0, Reg::Ebx, 5, "avx2", VEX),
    deny(7, 0, Reg::Ebx, 8, "bmi2", "`bzhi` (VEX) at CPL0: KVM_EXIT_INTERNAL_ERROR (tier-2 cpl0_probe)"),
    deny(7, 0, Reg::Ebx, 10, "invpcid", PROBED),
    deny(7, 0, Reg::Ebx, 11, "rtm", "xbegin/xend; transactional execution is not emulated"),
    deny(7, 0, Reg::Ebx, 16, "avx512f", VEX),
    deny(7, 0, Reg::Ebx, 17, "avx512dq", VEX),
    deny(7, 0, Reg::Ebx, 20, "smap",
        "`stac`/`clac` at CPL0: KVM_EXIT_INTERNAL_ERROR (tier-2 cpl0_probe); the kernel runs them \
         around every user copy"),
    deny(7, 0, Reg::Ebx, 21, "avx512ifma", VEX),
    deny(7, 0, Reg::Ebx, 24, "clwb",
        "offered by this host's KVM, but `clwb` at CPL0 ends in KVM_EXIT_INTERNAL_ERROR \
         (tier-2 cpl0_probe); Linux falls back to clflushopt, which works"),
    deny(7, 0, Reg::Ebx, 26, "avx512pf", VEX),
    deny(7, 0, Reg::Ebx, 27, "avx512er", VEX),
    deny(7, 0, Reg::Ebx, 28, "avx512cd", VEX),
    deny(7, 0, Reg::Ebx, 29, "sha_ni", PROBED),
    deny(7, 0, Reg::Ebx, 30, "avx512bw", VEX),
    deny(7, 0, Reg::Ebx, 31, "avx512vl", VEX),
    // Leaf 7 sub-leaf 0, ECX.
    deny(7, 0, Reg::Ecx, 1, "avx512vbmi", VEX),
    deny(7, 0, Reg::Ecx, 3, "pku",
        "protection keys: rdpkru/wrpkru and the PKRU XSAVE component; needs XSAVE"),
    deny(7, 0, Reg::Ecx, 4, "ospke", "mirrors CR4.PKE; hidden with PKU"),
    deny(7, 0, Reg::Ecx, 5, "waitpkg", "umonitor/umwait/tpause are not emulated"),
    deny(7, 0, Reg::Ecx, 6, "avx512_vbmi2", VEX),
    deny(7, 0, Reg::Ecx, 8, "gfni",
        "offered by this host's KVM, but `gf2p8mulb` at CPL0 ends in KVM_EXIT_INTERNAL_ERROR \
         (tier-2 cpl0_probe)"),
    deny(7, 0, Reg::Ecx, 9, "vaes", VEX),
    deny(7, 0, Reg::Ecx, 10, "vpclmulqdq", VEX),
    deny(7, 0, Reg::Ecx, 11, "avx512_vnni", VEX),
    deny(7, 0, Reg::Ecx, 12, "avx512_bitalg", VEX),
    deny(7, 0, Reg::Ecx, 14, "avx512_vpopcntdq", VEX),
    deny(7, 0, Reg::Ecx, 16, "la57",
        "5-level paging: keeps the guest on the 4-level tables the VMM and tiny guest use"),
    // Leaf 7 sub-leaf 0, EDX.
    deny(7, 0, Reg::Edx, 2, "avx512_4vnniw", VEX),
    deny(7, 0, Reg::Edx, 3, "avx512_4fmaps", VEX),
    deny(7, 0, Reg::Edx, 8, "avx512_vp2intersect", VEX),
    deny(7, 0, Reg::Edx, 22, "amx_bf16", "AMX tiles are XSAVE-managed state"),
    deny(7, 0, Reg::Edx, 23, "avx512_fp16", VEX),
    deny(7, 0, Reg::Edx, 24, "amx_tile", "AMX tiles are XSAVE-managed state"),
    deny(7, 0, Reg::Edx, 25, "amx_int8", "AMX tiles are XSAVE-managed state"),
    // Leaf 7 sub-leaf 1, EAX.
    deny(7, 1, Reg::Eax, 4, "avx_vnni", VEX),
    deny(7, 1, Reg::Eax, 5, "avx512_bf16", VEX),
    // Leaf 0x80000001, ECX (AMD).
    deny(0x8000_0001, 0, Reg::Ecx, 11, "xop", VEX),
    deny(0x8000_0001, 0, Reg::Ecx, 16, "fma4", VEX),
    // Leaf 0x80000001, EDX.
    deny(0x8000_0001, 0, Reg::Edx, 27, "rdtscp", PROBED),
];

/// Leaves zeroed entirely, and why.
pub const ZEROED_LEAVES: &[(u32, &str)] = &[(
    0xd,
    "XSAVE state enumeration (sizes, XCR0 bits, XSAVEOPT/XSAVEC/XSAVES in sub-leaf 1): \
     meaningless once XSAVE is hidden, and a guest must not find XSAVES there",
)];

/// Features Linux drops by itself with `noxsave`: everything that depends on XSAVE in its
/// `cpuid-deps` table (AVX and all that needs AVX state, AVX-512, AMX, PKU).
pub const COVERED_BY_NOXSAVE: &[&str] = &[
    "xsave",
    "osxsave",
    "avx",
    "fma",
    "f16c",
    "avx2",
    "avx512f",
    "avx512dq",
    "avx512ifma",
    "avx512pf",
    "avx512er",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512_vbmi2",
    "vaes",
    "vpclmulqdq",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "avx512_4vnniw",
    "avx512_4fmaps",
    "avx512_vp2intersect",
    "avx512_fp16",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
    "avx_vnni",
    "avx512_bf16",
    "xop",
    "fma4",
    "pku",
    "ospke",
];

/// Names the kernel itself uses at CPL0 (so they must survive the `clearcpuid=` length limit):
/// SMAP (stac/clac around user copies and at every exception entry), CX16 (SLUB's
/// cmpxchg16b), POPCNT (hweight alternatives), INVPCID (TLB flushes), WAITPKG (tpause in
/// delays), CLWB, LA57, RDTSCP, SSE4.2 (crc32c).
const KERNEL_USED_FIRST: &[&str] = &[
    "smap", "cx16", "popcnt", "invpcid", "waitpkg", "clwb", "la57", "rdtscp", "sse4_2",
];

/// The longest `clearcpuid=` argument Linux 6.1 reads: `cpu_parse_early_param` copies it into a
/// 128-byte buffer (and only the last `clearcpuid=` on the line counts), so names past 127
/// characters are silently ignored. Measured: with the whole deny list, `smap` fell past the
/// limit and the guest died on `clac` at its first exception entry.
pub const CLEARCPUID_MAX: usize = 127;

/// Guest Linux command-line options that keep a kernel off the features in [`DENY_LIST`] even
/// where CPUID filtering does not reach the guest (this host): `noxsave` (which also drops every
/// feature that depends on XSAVE, [`COVERED_BY_NOXSAVE`]) and one `clearcpuid=` with the other
/// names (accepted by name since Linux 5.19; it taints the kernel), the ones the kernel uses
/// itself first, cut to [`CLEARCPUID_MAX`] characters. Guest user space, which runs natively
/// here, still sees the host CPU's features.
pub fn linux_cmdline() -> String {
    let mut names: Vec<&str> = KERNEL_USED_FIRST.to_vec();
    for r in DENY_LIST {
        if !COVERED_BY_NOXSAVE.contains(&r.name) && !names.contains(&r.name) {
            names.push(r.name);
        }
    }
    let mut arg = String::new();
    for n in names {
        let extra = if arg.is_empty() { n.len() } else { n.len() + 1 };
        if arg.len() + extra > CLEARCPUID_MAX {
            break;
        }
        if !arg.is_empty() {
            arg.push(',');
        }
        arg.push_str(n);
    }
    format!("noxsave clearcpuid={arg}")
}

/// Whether Tidepool hides feature bit `bit` of `reg` in leaf `leaf`/`subleaf` (by a
/// [`DENY_LIST`] rule or because the whole leaf is in [`ZEROED_LEAVES`]).
pub fn is_denied(leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> bool {
    ZEROED_LEAVES.iter().any(|(l, _)| *l == leaf)
        || DENY_LIST
            .iter()
            .any(|r| r.leaf == leaf && r.subleaf == subleaf && r.reg == reg && r.bit == bit)
}

/// Whether `cpuid` (as from KVM_GET_SUPPORTED_CPUID) has feature bit `bit` of `reg` in
/// `leaf`/`subleaf`.
pub fn has_feature(cpuid: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> bool {
    cpuid
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
        .is_some_and(|e| {
            let v = match reg {
                Reg::Eax => e.eax,
                Reg::Ebx => e.ebx,
                Reg::Ecx => e.ecx,
                Reg::Edx => e.edx,
            };
            v & (1 << bit) != 0
        })
}

/// CPUID.1:ECX bit 31, "running under a hypervisor". Set by [`filter_entries`]: Linux looks
/// for KVM's `KVMKVMKVM` leaves (0x40000000/0x40000001, kvm-clock) only when it is set, and a
/// KVM running nested (L1 under QEMU) leaves it clear in KVM_GET_SUPPORTED_CPUID
/// (docs/nested.md): without it the guest has no clocksource and its clock never advances.
pub const HYPERVISOR_BIT: u32 = 1 << 31;

/// CPUID.1:ECX bit 24, TSC-deadline timer mode of the local APIC. KVM emulates it whenever
/// `KVM_CAP_TSC_DEADLINE_TIMER` is present, but does not report it in
/// KVM_GET_SUPPORTED_CPUID; [`add_platform_features`] sets it.
pub const TSC_DEADLINE_BIT: u32 = 1 << 24;

/// Features the VMM's platform provides beyond what KVM_GET_SUPPORTED_CPUID reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlatformFeatures {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the in-kernel LAPIC emulates TSC-deadline mode.
    pub tsc_deadline: bool,
}

/// The additions to KVM's supported CPUID (the counterpart of [`DENY_LIST`]): the
/// TSC-deadline bit when the platform has it. The hypervisor bit is set by
/// [`filter_entries`] unconditionally.
pub fn add_platform_features(entries: &mut [kvm_cpuid_entry2], features: PlatformFeatures) {
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        if features.tsc_deadline {
            e.ecx |= TSC_DEADLINE_BIT;
        }
    }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Apply [`DENY_LIST`] and [`ZEROED_LEAVES`] to `entries`, and set the hypervisor bit.
pub fn filter_entries(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut() {
        if ZEROED_LEAVES.iter().any(|(leaf, _)| *leaf == e.function) {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
            continue;
        }
        let (function, index) = (e.function, e.index);
        for r in DENY_LIST
            .iter()
            .filter(|r| r.leaf == function && r.subleaf == index)
        {
            *reg_mut(e, r.reg) &= !(1u32 << r.bit);
        }
        if e.function == 1 {
            e.ecx |= HYPERVISOR_BIT;
        }
    }
}

/// Give `entries` the identity of vCPU `id`: initial APIC ID in leaf 1 EBX\[31:24\], x2APIC ID in
/// leaves 0xB and 0x1F EDX.
pub fn set_vcpu_id(entries: &mut [kvm_cpuid_entry2], id: u8) {
    for e in entries.iter_mut() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
}

/// The filtered CPUID for vCPU `id`, from KVM's supported set, with the platform's
/// additions.
pub fn guest_cpuid(supported: &CpuId, id: u8, features: PlatformFeatures) -> CpuId {
    let mut c = supported.clone();
    filter_entries(c.as_mut_slice());
    add_platform_features(c.as_mut_slice(), features);
    set_vcpu_id(c.as_mut_slice(), id);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn deny_list_is_well_formed() {
        for (i, r) in DENY_LIST.iter().enumerate() {
            assert!(r.bit < 32, "{}", r.name);
            assert!(!r.why.is_empty() && !r.name.is_empty());
            for other in &DENY_LIST[i + 1..] {
                assert!(
                    !(other.leaf == r.leaf
                        && other.subleaf == r.subleaf
                        && other.reg == r.reg
                        && other.bit == r.bit),
                    "duplicate rule {}",
                    r.name
                );
            }
        }
        for must in [
            "cx16", "xsave", "avx", "avx2", "avx512f", "clwb", "gfni", "popcnt", "smap",
        ] {
            assert!(DENY_LIST.iter().any(|r| r.name == must), "{must}");
        }
    }

    #[test]
    fn filter_clears_denied_bits_and_zeroes_leaves() {
        let mut v = vec![
            entry(1, 0),
            entry(7, 0),
            entry(7, 1),
            entry(0xd, 0),
            entry(0xd, 1),
            entry(0x8000_0001, 0),
            entry(0x4000_0000, 0),
        ];
        filter_entries(&mut v);
        // Leaf 1: CX16, XSAVE, OSXSAVE, AVX, FMA, F16C, SSE4.2, POPCNT gone; hypervisor bit
        // set; SSE3 (0) kept.
        for bit in [13, 26, 27, 28, 12, 29, 20, 23] {
            assert_eq!(v[0].ecx & (1 << bit), 0, "leaf1 ecx bit {bit}");
        }
        assert_ne!(v[0].ecx & 1, 0);
        assert_ne!(v[0].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(v[0].edx, u32::MAX);
        // Leaf 7.0: AVX2 and every AVX-512 bit gone; SMEP (7) kept.
        for bit in [5, 16, 17, 21, 26, 27, 28, 30, 31] {
            assert_eq!(v[1].ebx & (1 << bit), 0, "leaf7 ebx bit {bit}");
        }
        assert_ne!(v[1].ebx & (1 << 7), 0);
        // Leaf 7.1: AVX-VNNI gone; the sub-leaf-0 rules did not touch it.
        assert_eq!(v[2].eax & (1 << 4), 0);
        assert_eq!(v[2].ebx, u32::MAX);
        for e in &v[3..5] {
            assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
        }
        assert_eq!(v[5].ecx & (1 << 16), 0);
        // KVM's own leaves are passed through untouched (kvm-clock lives there).
        assert_eq!(v[6].eax, u32::MAX);
    }

    #[test]
    fn cmdline_covers_every_denied_feature_within_the_kernel_limit() {
        let c = linux_cmdline();
        let arg = c.strip_prefix("noxsave clearcpuid=").expect("prefix");
        assert!(arg.len() <= CLEARCPUID_MAX, "{} chars", arg.len());
        let named: Vec<&str> = arg.split(',').collect();
        for r in DENY_LIST {
            assert!(
                named.contains(&r.name) || COVERED_BY_NOXSAVE.contains(&r.name),
                "{} neither named nor covered by noxsave",
                r.name
            );
        }
        for must in KERNEL_USED_FIRST {
            assert!(named.contains(must), "{must}");
            assert!(
                DENY_LIST.iter().any(|r| r.name == *must),
                "{must} not denied"
            );
        }
        // Linux spells these with underscores; no name may contain a space or comma.
        assert!(DENY_LIST.iter().all(|r| !r.name.contains([' ', ','])));
    }

    #[test]
    fn platform_additions_set_tsc_deadline_only_when_present() {
        let mut v = vec![kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        }];
        filter_entries(&mut v);
        add_platform_features(&mut v, PlatformFeatures::default());
        assert_eq!(v[0].ecx, HYPERVISOR_BIT);
        add_platform_features(&mut v, PlatformFeatures { tsc_deadline: true });
        assert_eq!(v[0].ecx, HYPERVISOR_BIT | TSC_DEADLINE_BIT);
        // KVM's paravirt leaves survive the filter as KVM reported them.
        let mut kvm = vec![
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ebx: u32::from_le_bytes(*b"KVMK"),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0x0100_7efb,
                ..Default::default()
            },
        ];
        filter_entries(&mut kvm);
        add_platform_features(&mut kvm, PlatformFeatures { tsc_deadline: true });
        assert_eq!(kvm[0].eax, 0x4000_0001);
        assert_eq!(kvm[1].eax, 0x0100_7efb);
    }

    #[test]
    fn vcpu_id_goes_into_apic_id_fields() {
        let mut v = vec![entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(2, 0)];
        set_vcpu_id(&mut v, 3);
        assert_eq!(v[0].ebx >> 24, 3);
        assert_eq!(v[0].ebx & 0xff_ffff, 0xff_ffff);
        assert_eq!(v[1].edx, 3);
        assert_eq!(v[2].edx, 3);
        assert_eq!(v[3].edx, u32::MAX);
    }
}
