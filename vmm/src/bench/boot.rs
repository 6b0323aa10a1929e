//! `tidepool bench boot`: how fast a VM starts and what each idle VM costs the VMM.
//!
//! - `create_to_first_instruction_ms`: from the start of VM creation to the vCPU's first
//!   `KVM_RUN`, with the tiny guest (median of several runs). No same-run baseline exists; the
//!   anchor is Firecracker's promise of an API socket in <= 8 CPU ms.
//! - `vmm_overhead_mib_per_vm`: with 20 idle tiny-guest VMs alive at once, (process RSS - guest
//!   memory touched) / 20. Guest memory touched is measured with `mincore` over each VM's
//!   window. `vmm_marginal_mib_per_vm` subtracts the RSS the process had before the VMs.
//! - With `--linux` only ([`linux`]): `linux_boot_to_init_s`, the stock Debian guest under
//!   `tidepool run` from its start to `/init`; measured in the nested L1 when this host's KVM
//!   cannot run a stock kernel (`linux_boot_nested` = 1, plus `l1_boot_s`).

pub mod linux;

use super::{progress, BenchError, BenchOptions, Report};
use crate::kvm::{kvm_available, Vm, VmConfig};
use crate::memory::{LayoutConfig, MIB};
use crate::tiny_guest::{measure_boot_phases, run_tiny_guest, Privilege, Step, TinyGuestBuilder};
use std::sync::{Arc, Barrier};
use std::time::Duration;

fn failed(e: impl ToString) -> BenchError {
    BenchError::Failed {
        suite: "boot",
        reason: e.to_string(),
    }
}

/// Resident set size of this process in bytes, from /proc/self/statm.
pub fn process_rss_bytes() -> Result<u64, BenchError> {
    let statm = std::fs::read_to_string("/proc/self/statm").map_err(failed)?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| failed("cannot parse /proc/self/statm"))?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * u64::try_from(page).unwrap_or(4096))
}

/// How long the idle VMs stay up while the sample is taken.
const IDLE_FOR: Duration = Duration::from_secs(2);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run the suite.
pub fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    kvm_available().map_err(|why| failed(format!("/dev/kvm is not usable: {why}")))?;
    let mut r = Report::default();
    let runs = if opts.quick { 9 } else { 31 };

    progress(&format!("create to first KVM_RUN, {runs} runs"));
    let mut totals = Vec::new();
    let mut vm_new = Vec::new();
    for _ in 0..runs {
        let p = measure_boot_phases().map_err(failed)?;
        totals.push(p.total.as_secs_f64() * 1e3);
        vm_new.push(p.vm.total().as_secs_f64() * 1e3);
    }
    r.add(
        "create_to_first_instruction_ms",
        median(totals.clone()),
        "ms, median (target <= 5; anchor: Firecracker's <= 8 CPU ms to API socket)",
    );
    r.add(
        "create_to_first_instruction_min_ms",
        totals.iter().copied().fold(f64::INFINITY, f64::min),
        "ms, best run",
    );
    r.add(
        "vm_new_ms",
        median(vm_new),
        "ms of that in Vm::new (VM fd, irqchip, window, memslots)",
    );

    const VMS: usize = 20;
    progress(&format!("{VMS} idle tiny-guest VMs at once"));
    let before = process_rss_bytes()?;
    let created = Arc::new(Barrier::new(VMS + 1));
    let mut threads = Vec::new();
    for _ in 0..VMS {
        let created = created.clone();
        threads.push(std::thread::spawn(move || -> Result<u64, String> {
            let vm = Vm::new(VmConfig {
                layout: LayoutConfig {
                    boot_ram: 64 * MIB,
                    hotplug_size: 0,
                },
                platform: true,
                hotplug_memslots: crate::kvm::HotplugMemslots::default(),
            })
            .map_err(|e| e.to_string())?;
            // Idle for real: `hlt` at CPL0 with interrupts off parks the vCPU inside KVM (the
            // in-kernel irqchip), so its thread sleeps until the VMM kicks it at the timeout.
            let image = TinyGuestBuilder::new(vm.window().layout())
                .privilege(Privilege::Kernel)
                .step(Step::Halt)
                .build()
                .map_err(|e| e.to_string())?;
            created.wait();
            let run = run_tiny_guest(&vm, &image, IDLE_FOR).map_err(|e| e.to_string())?;
            if !run.kicked {
                return Err(format!(
                    "idle VM stopped by itself: {:?}",
                    run.summary.result
                ));
            }
            vm.window()
                .resident_bytes(0, vm.window().layout().low_ram().end)
                .map_err(|e| e.to_string())
        }));
    }
    created.wait();
    // Sample while every vCPU sits in its in-kernel HLT.
    std::thread::sleep(IDLE_FOR / 2);
    let with_vms = process_rss_bytes()?;
    let mut touched = 0;
    for t in threads {
        touched += t
            .join()
            .map_err(|_| failed("VM thread panicked"))?
            .map_err(failed)?;
    }
    let mib = (1u64 << 20) as f64;
    let overhead = with_vms.saturating_sub(touched) as f64 / VMS as f64 / mib;
    let marginal =
        with_vms.saturating_sub(touched).saturating_sub(before) as f64 / VMS as f64 / mib;
    r.add(
        "vmm_overhead_mib_per_vm",
        overhead,
        "MiB, (RSS - guest touched) / 20 (target <= 2; Firecracker <= 5)",
    );
    r.add(
        "vmm_marginal_mib_per_vm",
        marginal,
        "MiB, the same minus the RSS before the VMs",
    );
    r.add(
        "guest_touched_mib_per_vm",
        touched as f64 / VMS as f64 / mib,
        "MiB of guest RAM resident per VM",
    );
    if opts.linux && !opts.quick {
        linux::measure(&mut r)?;
    }
    Ok(r)
}
