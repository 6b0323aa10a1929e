//! Probing this host's KVM instruction emulator: run one instruction at guest CPL0 (where the
//! host's `kvm_pvm` emulates) and see whether it completes, faults, or stops KVM with an
//! internal error. The tier-2 test `cpl0_probe` runs [`PROBES`] and checks that every
//! instruction whose CPUID feature Tidepool leaves visible works, i.e. that the deny list in
//! `kvm::cpuid` is complete for these instructions.

use std::time::Duration;

use iced_x86::code_asm::*;
use kvm_bindings::kvm_xcrs;
use vm_memory::{Bytes, GuestAddress};

use super::boot::{CR4_FSGSBASE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE, CR4_PKE};
use super::program::TAG_USER;
use super::run::{ReportCollector, RunError};
use super::{Privilege, Step, TinyGuestBuilder};
use crate::kvm::cpuid::{has_feature, is_denied, Reg};
use crate::kvm::{StopReason, VcpuError, Vm, VmConfig};
use crate::memory::MIB;

/// Scratch memory the probed instruction may use (`rdi` points here, `rsi` 4 KiB further).
pub const SCRATCH: u64 = 0x10_0000;

/// A CPUID feature bit: leaf, sub-leaf, register, bit.
pub type Feature = (u32, u32, Reg, u8);

/// One instruction to probe.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    /// Short name (the instruction).
    pub name: &'static str,
    /// The CPUID feature that announces it; None for baseline x86-64 instructions (including
    /// CX8, FXSR, SSE2, TSC, MSR and CLFLUSH, which every x86-64 CPU has).
    pub feature: Option<Feature>,
    /// Extra CR4 bits it needs (beyond OSFXSR|OSXMMEXCPT, always set).
    pub cr4: u64,
    /// XCR0 to set through KVM_SET_XCRS before running (needs CR4.OSXSAVE), if any.
    pub xcr0: Option<u64>,
    /// Emits the instruction (after the prologue has set `rdi`, `rsi`, zeroed `rax/rcx/rdx`).
    pub emit: fn(&mut CodeAssembler) -> Result<(), IcedError>,
    /// The instruction raises an exception by design (`int3`, `ud2`): working means
    /// [`ProbeOutcome::Faulted`] (the exception was delivered; with no IDT, a triple fault).
    pub expect_fault: bool,
}

impl Probe {
    /// Whether `outcome` is what a working emulator gives for this probe.
    pub fn works(&self, outcome: &ProbeOutcome) -> bool {
        if self.expect_fault {
            *outcome == ProbeOutcome::Faulted
        } else {
            *outcome == ProbeOutcome::Ran
        }
    }
}

/// Baseline x86-64 instructions (no CPUID bit can hide them) that this host's KVM cannot run at
/// guest CPL0, as found by the probe. What a Linux guest must do about each:
/// - `int3`: used when the kernel patches its own text (jump labels, static calls,
///   alternatives via `text_poke_bp`); the guest must avoid run-time text patching paths.
/// - `verw mem`: the MDS/TAA/RFDS/TSA "clear CPU buffers" sequence; the guest kernel must not
///   enable it (`mitigations=off`, or the per-bug options `mds=off tsx_async_abort=off
///   mmio_stale_data=off reg_file_data_sampling=off tsa=off`).
/// - `pxor`: SSE arithmetic (the emulator moves SSE registers but does not compute with them);
///   Linux uses it at CPL0 only between `kernel_fpu_begin/end` (RAID xor, SIMD crypto), so keep
///   such modules out of the guest.
pub const KNOWN_BASELINE_FAILURES: &[&str] = &["int3", "verw mem", "pxor"];

/// What happened when the instruction ran at CPL0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// It completed (the program went on to report done).
    Ran,
    /// KVM stopped with KVM_EXIT_INTERNAL_ERROR (emulation failure).
    EmulationFailure {
        /// KVM_INTERNAL_ERROR_* sub-error.
        suberror: u32,
    },
    /// It raised an exception (no IDT, so a triple fault: KVM_EXIT_SHUTDOWN).
    Faulted,
    /// The vCPU made no progress within the timeout and was kicked.
    Stalled,
    /// Anything else.
    Other(String),
}

/// The result of one probe.
#[derive(Clone, Debug)]
pub struct ProbeResult {
    /// The probe's name.
    pub name: &'static str,
    /// Whether KVM_GET_SUPPORTED_CPUID offers the feature (baseline instructions: true).
    pub offered: bool,
    /// Whether Tidepool's deny list names the feature.
    pub denied: bool,
    /// Whether a guest kernel of a Tidepool VM (filtered CPUID, CPL0) actually sees the feature
    /// (baseline instructions: true). On this host it can see a feature that is denied, or
    /// not even offered: see [`cpl0_cpuid`].
    pub visible: bool,
    /// What happened when the instruction ran at CPL0 (the feature bit forced on in the
    /// vCPU's CPUID so that KVM accepts the CR4/XCR0 bits it needs).
    pub outcome: ProbeOutcome,
}

/// CPUID as a Tidepool guest kernel sees it: the listed leaves, read by `cpuid` at CPL0 in a
/// VM whose vCPU has Tidepool's filtered CPUID. Returns EAX, EBX, ECX, EDX per leaf.
///
/// On this host (`kvm_pvm`) the answer is mostly the host CPU's, whatever KVM_SET_CPUID2 set:
/// only a few KVM-managed bits (leaf 1 ECX: CX16, x2APIC, TSC-deadline, hypervisor; the APIC
/// ID) follow the VMM's CPUID.
pub fn cpl0_cpuid(leaves: &[(u32, u32)]) -> Result<Vec<[u32; 4]>, RunError> {
    let vm = Vm::new(VmConfig::tiny(16 * MIB, 0))?;
    let mut b = TinyGuestBuilder::new(vm.window().layout()).privilege(Privilege::Kernel);
    for (i, (leaf, subleaf)) in leaves.iter().enumerate() {
        b = b.step(Step::ReportCpuid {
            leaf: *leaf,
            subleaf: *subleaf,
            tag: TAG_USER + 4 * i as u64,
        });
    }
    let image = b.step(Step::Done).build()?;
    let run = super::run_tiny_guest(&vm, &image, Duration::from_secs(10))?;
    run.summary.result?;
    let r = &run.summary.handler;
    let mut out = Vec::new();
    for i in 0..leaves.len() as u64 {
        let mut regs = [0u32; 4];
        for (j, reg) in regs.iter_mut().enumerate() {
            *reg = r.value(TAG_USER + 4 * i + j as u64).unwrap_or(0) as u32;
        }
        out.push(regs);
    }
    Ok(out)
}

const PCLMUL: Feature = (1, 0, Reg::Ecx, 1);
const SSSE3: Feature = (1, 0, Reg::Ecx, 9);
const CX16: Feature = (1, 0, Reg::Ecx, 13);
const SSE41: Feature = (1, 0, Reg::Ecx, 19);
const SSE42: Feature = (1, 0, Reg::Ecx, 20);
const MOVBE: Feature = (1, 0, Reg::Ecx, 22);
const POPCNT: Feature = (1, 0, Reg::Ecx, 23);
const AES: Feature = (1, 0, Reg::Ecx, 25);
const XSAVE: Feature = (1, 0, Reg::Ecx, 26);
const AVX: Feature = (1, 0, Reg::Ecx, 28);
const RDRAND: Feature = (1, 0, Reg::Ecx, 30);
const FSGSBASE: Feature = (7, 0, Reg::Ebx, 0);
const BMI1: Feature = (7, 0, Reg::Ebx, 3);
const BMI2: Feature = (7, 0, Reg::Ebx, 8);
const INVPCID: Feature = (7, 0, Reg::Ebx, 10);
const AVX512F: Feature = (7, 0, Reg::Ebx, 16);
const RDSEED: Feature = (7, 0, Reg::Ebx, 18);
const SMAP: Feature = (7, 0, Reg::Ebx, 20);
const CLFLUSHOPT: Feature = (7, 0, Reg::Ebx, 23);
const CLWB: Feature = (7, 0, Reg::Ebx, 24);
const SHA: Feature = (7, 0, Reg::Ebx, 29);
const PKU: Feature = (7, 0, Reg::Ecx, 3);
const GFNI: Feature = (7, 0, Reg::Ecx, 8);
const RDPID: Feature = (7, 0, Reg::Ecx, 22);
const ABM: Feature = (0x8000_0001, 0, Reg::Ecx, 5);
const RDTSCP: Feature = (0x8000_0001, 0, Reg::Edx, 27);
const XSAVEOPT: Feature = (0xd, 1, Reg::Eax, 0);
const LAHF: Feature = (0x8000_0001, 0, Reg::Ecx, 0);
const PREFETCHW: Feature = (0x8000_0001, 0, Reg::Ecx, 8);

const fn p(
    name: &'static str,
    feature: Option<Feature>,
    emit: fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Probe {
    Probe {
        name,
        feature,
        cr4: 0,
        xcr0: None,
        emit,
        expect_fault: false,
    }
}

const fn trap(name: &'static str, emit: fn(&mut CodeAssembler) -> Result<(), IcedError>) -> Probe {
    Probe {
        name,
        feature: None,
        cr4: 0,
        xcr0: None,
        emit,
        expect_fault: true,
    }
}

const fn px(
    name: &'static str,
    feature: Feature,
    cr4_bits: u64,
    xcr0: Option<u64>,
    emit: fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Probe {
    Probe {
        name,
        feature: Some(feature),
        cr4: cr4_bits,
        xcr0,
        emit,
        expect_fault: false,
    }
}

/// The instructions probed: what a Linux guest kernel runs at CPL0 (string ops, atomics, FPU
/// save/restore, user-copy guards, context-switch, MSR and TLB instructions, the crypto and
/// checksum instructions its boot-time self-tests use), and the VEX/EVEX families.
pub static PROBES: &[Probe] = &[
    p("nop", None, |a| a.nop()),
    trap("ud2 (sanity: must fault)", |a| a.ud2()),
    trap("int3", |a| a.int3()),
    p("cpuid", None, |a| a.cpuid()),
    p("rep movsb", None, |a| {
        a.mov(ecx, 64)?;
        a.rep().movsb()
    }),
    p("rep stosq", None, |a| {
        a.mov(ecx, 8)?;
        a.rep().stosq()
    }),
    p("lock xadd", None, |a| a.lock().xadd(qword_ptr(rdi), rax)),
    p("xchg mem", None, |a| a.xchg(qword_ptr(rdi), rax)),
    p("lock cmpxchg", None, |a| {
        a.lock().cmpxchg(qword_ptr(rdi), rbx)
    }),
    p("lock bts", None, |a| a.lock().bts(qword_ptr(rdi), rax)),
    p("pushfq/popfq", None, |a| {
        a.pushfq()?;
        a.popfq()
    }),
    p("cli/sti", None, |a| {
        a.cli()?;
        a.sti()?;
        a.nop()
    }),
    p("mov cr3 (reload)", None, |a| {
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)
    }),
    p("lidt", None, |a| a.lidt(ptr(rdi))),
    p("verw mem", None, |a| a.verw(word_ptr(rdi))),
    p("lfence/sfence", None, |a| {
        a.lfence()?;
        a.sfence()
    }),
    p("movnti", None, |a| a.movnti(qword_ptr(rdi), rax)),
    p("rdtsc", None, |a| a.rdtsc()),
    p("rdmsr APIC_BASE", None, |a| {
        a.mov(ecx, 0x1b)?;
        a.rdmsr()
    }),
    p("wrmsr KERNEL_GS_BASE", None, |a| {
        a.mov(ecx, 0xc000_0102u32)?;
        a.wrmsr()
    }),
    p("lahf", Some(LAHF), |a| a.lahf()),
    p("prefetchw", Some(PREFETCHW), |a| a.prefetchw(byte_ptr(rdi))),
    p("swapgs", None, |a| a.swapgs()),
    p("invlpg", None, |a| a.invlpg(byte_ptr(rdi))),
    p("mfence", None, |a| a.mfence()),
    p("wbinvd", None, |a| a.wbinvd()),
    p("lock cmpxchg8b", None, |a| {
        a.lock().cmpxchg8b(qword_ptr(rdi))
    }),
    p("lock cmpxchg16b", Some(CX16), |a| {
        a.lock().cmpxchg16b(xmmword_ptr(rdi))
    }),
    p("clflush", None, |a| a.clflush(byte_ptr(rdi))),
    p("fxsave64", None, |a| a.fxsave64(ptr(rdi))),
    p("fxrstor64", None, |a| {
        a.fxsave64(ptr(rdi))?;
        a.fxrstor64(ptr(rdi))
    }),
    p("movdqu", None, |a| {
        a.movdqu(xmm0, xmmword_ptr(rdi))?;
        a.movdqu(xmmword_ptr(rsi), xmm0)
    }),
    p("pxor", None, |a| a.pxor(xmm1, xmm0)),
    p("pclmulqdq", Some(PCLMUL), |a| a.pclmulqdq(xmm0, xmm1, 0)),
    p("pshufb", Some(SSSE3), |a| a.pshufb(xmm0, xmm1)),
    p("ptest", Some(SSE41), |a| a.ptest(xmm0, xmm1)),
    p("crc32", Some(SSE42), |a| a.crc32(rax, rbx)),
    p("movbe", Some(MOVBE), |a| a.movbe(rax, qword_ptr(rdi))),
    p("popcnt", Some(POPCNT), |a| a.popcnt(rax, rbx)),
    p("aesenc", Some(AES), |a| a.aesenc(xmm0, xmm1)),
    p("rdrand", Some(RDRAND), |a| a.rdrand(rax)),
    p("rdseed", Some(RDSEED), |a| a.rdseed(rax)),
    px("wrfsbase", FSGSBASE, CR4_FSGSBASE, None, |a| {
        a.wrfsbase(rax)
    }),
    p("andn (BMI1, VEX)", Some(BMI1), |a| a.andn(rax, rbx, rcx)),
    p("tzcnt", Some(BMI1), |a| a.tzcnt(rax, rbx)),
    p("bzhi (BMI2, VEX)", Some(BMI2), |a| a.bzhi(rax, rbx, rcx)),
    p("invpcid", Some(INVPCID), |a| {
        a.mov(eax, 2)?;
        a.invpcid(rax, xmmword_ptr(rdi))
    }),
    p("stac/clac", Some(SMAP), |a| {
        a.stac()?;
        a.clac()
    }),
    p("clflushopt", Some(CLFLUSHOPT), |a| {
        a.clflushopt(byte_ptr(rdi))
    }),
    p("clwb", Some(CLWB), |a| a.clwb(byte_ptr(rdi))),
    p("sha256rnds2", Some(SHA), |a| a.sha256rnds2(xmm1, xmm2)),
    p("gf2p8mulb", Some(GFNI), |a| a.gf2p8mulb(xmm0, xmm1)),
    p("rdpid", Some(RDPID), |a| a.rdpid(rax)),
    p("lzcnt", Some(ABM), |a| a.lzcnt(rax, rbx)),
    p("rdtscp", Some(RDTSCP), |a| a.rdtscp()),
    px("xgetbv", XSAVE, CR4_OSXSAVE, Some(3), |a| a.xgetbv()),
    px("xsetbv", XSAVE, CR4_OSXSAVE, Some(3), |a| {
        a.mov(eax, 3)?;
        a.xsetbv()
    }),
    px("xsave64", XSAVE, CR4_OSXSAVE, Some(3), |a| {
        a.mov(eax, 3)?;
        a.xsave64(ptr(rdi))
    }),
    px("xrstor64", XSAVE, CR4_OSXSAVE, Some(3), |a| {
        a.mov(eax, 3)?;
        a.xsave64(ptr(rdi))?;
        a.xrstor64(ptr(rdi))
    }),
    px("xsaveopt64", XSAVEOPT, CR4_OSXSAVE, Some(3), |a| {
        a.mov(eax, 3)?;
        a.xsaveopt64(ptr(rdi))
    }),
    px("vmovdqu ymm (AVX)", AVX, CR4_OSXSAVE, Some(7), |a| {
        a.vmovdqu(ymm0, ymmword_ptr(rdi))
    }),
    px(
        "vpxord zmm (AVX-512)",
        AVX512F,
        CR4_OSXSAVE,
        Some(0xe7),
        |a| a.vpxord(zmm0, zmm1, zmm2),
    ),
    px("rdpkru", PKU, CR4_PKE, None, |a| a.rdpkru()),
];

fn classify(result: &Result<StopReason, VcpuError>) -> ProbeOutcome {
    match result {
        Ok(StopReason::Handler) => ProbeOutcome::Ran,
        Ok(StopReason::Kicked) => ProbeOutcome::Stalled,
        Err(VcpuError::InternalError { suberror, .. }) => ProbeOutcome::EmulationFailure {
            suberror: *suberror,
        },
        Err(VcpuError::Shutdown { .. }) => ProbeOutcome::Faulted,
        other => ProbeOutcome::Other(format!("{other:?}")),
    }
}

/// The prologue and the probed instruction, position-independent.
fn probe_code(probe: &Probe) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(rdi, SCRATCH)?;
    a.mov(rsi, SCRATCH + 0x1000)?;
    a.xor(eax, eax)?;
    a.xor(ecx, ecx)?;
    a.xor(edx, edx)?;
    (probe.emit)(&mut a)?;
    a.assemble(0)
}

/// Run every probe; `visible` comes from one [`cpl0_cpuid`] read.
pub fn run_probes(probes: &[Probe], timeout: Duration) -> Result<Vec<ProbeResult>, RunError> {
    let mut leaves: Vec<(u32, u32)> = probes
        .iter()
        .filter_map(|p| p.feature.map(|(l, s, _, _)| (l, s)))
        .collect();
    leaves.sort_unstable();
    leaves.dedup();
    let seen = cpl0_cpuid(&leaves)?;
    probes
        .iter()
        .map(|p| {
            let visible = p.feature.is_none_or(|(l, s, r, b)| {
                leaves
                    .iter()
                    .position(|x| *x == (l, s))
                    .and_then(|i| seen.get(i))
                    .is_some_and(|regs| regs[r as usize] & (1 << b) != 0)
            });
            run_probe(p, timeout).map(|mut res| {
                res.visible = visible;
                res
            })
        })
        .collect()
}

fn force_feature(cpuid: &mut [kvm_bindings::kvm_cpuid_entry2], (leaf, subleaf, reg, bit): Feature) {
    for e in cpuid
        .iter_mut()
        .filter(|e| e.function == leaf && e.index == subleaf)
    {
        let v = match reg {
            Reg::Eax => &mut e.eax,
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        };
        *v |= 1 << bit;
    }
}

/// Run `probe` at CPL0 in a fresh 16 MiB VM, with KVM's supported CPUID plus the probe's
/// feature (and XSAVE, when the probe needs CR4.OSXSAVE) forced on. `visible` is left true;
/// [`run_probes`] fills it in.
pub fn run_probe(probe: &Probe, timeout: Duration) -> Result<ProbeResult, RunError> {
    let vm = Vm::new(VmConfig::tiny(16 * MIB, 0))?;
    let mut cpuid = vm.supported_cpuid().clone();
    let offered = probe
        .feature
        .is_none_or(|(l, s, r, b)| has_feature(cpuid.as_slice(), l, s, r, b));
    let denied = probe
        .feature
        .is_some_and(|(l, s, r, b)| is_denied(l, s, r, b));
    if let Some(f) = probe.feature {
        force_feature(cpuid.as_mut_slice(), f);
    }
    if probe.cr4 & CR4_OSXSAVE != 0 {
        force_feature(cpuid.as_mut_slice(), XSAVE);
    }
    let code = probe_code(probe).map_err(super::TinyGuestError::from)?;
    let image = TinyGuestBuilder::new(vm.window().layout())
        .privilege(Privilege::Kernel)
        .cr4(CR4_OSFXSR | CR4_OSXMMEXCPT | probe.cr4)
        .step(Step::Raw(code))
        .step(Step::Done)
        .build()?;
    let mem = vm.window().guest_memory()?;
    mem.write_slice(&image.bytes, GuestAddress(image.load_addr))
        .map_err(|e| RunError::Load {
            addr: image.load_addr,
            reason: e.to_string(),
        })?;
    drop(mem);
    let vcpu = vm.create_vcpu_with_cpuid(0, &cpuid)?;
    let mut sregs = vcpu.sregs()?;
    image.boot.apply_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&image.boot.regs())?;
    if let Some(xcr0) = probe.xcr0 {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = xcr0;
        vcpu.fd()
            .set_xcrs(&xcrs)
            .map_err(|source| VcpuError::Setup {
                id: 0,
                what: "KVM_SET_XCRS",
                source,
            })?;
    }
    let handle = vcpu.spawn(ReportCollector::default())?;
    let (summary, _kicked) = handle.join_timeout(timeout)?;
    Ok(ProbeResult {
        name: probe.name,
        offered,
        denied,
        visible: true,
        outcome: classify(&summary.result),
    })
}
