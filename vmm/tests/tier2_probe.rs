//! Tier-2: probe this host's KVM emulator with single instructions at guest CPL0, and check
//! that every instruction Tidepool's CPUID leaves visible runs. Skips when /dev/kvm cannot be
//! opened.

use std::time::Duration;

use tidepool_vmm::kvm::kvm_available;
use tidepool_vmm::tiny_guest::probe::{run_probe, KNOWN_BASELINE_FAILURES, PROBES};

#[test]
fn cpl0_probe() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    // The sanity probe must fault, or the classification is meaningless.
    assert!(PROBES.iter().any(|p| p.expect_fault));
    let mut broken_but_visible = Vec::new();
    println!(
        "{:<24} {:>7} {:>6}  outcome at CPL0",
        "instruction", "offered", "hidden"
    );
    for p in PROBES {
        let r = run_probe(p, Duration::from_secs(3)).expect("probe ran");
        println!(
            "{:<24} {:>7} {:>6}  {:?}",
            r.name, r.offered, r.hidden, r.outcome
        );
        let works = r.outcome.as_ref().is_some_and(|o| p.works(o));
        if r.offered && !r.hidden && !works {
            if p.feature.is_none() && KNOWN_BASELINE_FAILURES.contains(&r.name) {
                println!("    known: baseline instruction, cannot be hidden by CPUID");
            } else {
                broken_but_visible.push((r.name, r.outcome));
            }
        }
        if r.offered && r.hidden {
            println!("    hidden by the deny list; works at CPL0: {works}");
        }
    }
    assert!(
        broken_but_visible.is_empty(),
        "instructions guests can see but this KVM cannot run at CPL0: {broken_but_visible:?}"
    );
}
