//! Tier-2: probe this host's KVM emulator with single instructions at guest CPL0, and check
//! that every instruction a Tidepool guest kernel can see, and that the deny list does not
//! name, runs. Skips when /dev/kvm cannot be opened.

use std::time::Duration;

use tidepool_vmm::kvm::cpuid::{linux_cmdline, COVERED_BY_NOXSAVE, DENY_LIST};
use tidepool_vmm::kvm::kvm_available;
use tidepool_vmm::tiny_guest::probe::{run_probes, ProbeOutcome, KNOWN_BASELINE_FAILURES, PROBES};

#[test]
fn cpl0_probe() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let results = run_probes(PROBES, Duration::from_secs(3)).expect("probes ran");
    println!(
        "{:<24} {:>7} {:>6} {:>7}  outcome at CPL0",
        "instruction", "offered", "denied", "visible"
    );
    let mut unexpected = Vec::new();
    let mut denied_but_visible_and_broken = Vec::new();
    for (p, r) in PROBES.iter().zip(&results) {
        println!(
            "{:<24} {:>7} {:>6} {:>7}  {:?}",
            r.name, r.offered, r.denied, r.visible, r.outcome
        );
        let works = p.works(&r.outcome);
        if p.feature.is_none() && !works {
            if !KNOWN_BASELINE_FAILURES.contains(&r.name) {
                unexpected.push((r.name, r.outcome.clone()));
            }
        } else if r.visible && !works {
            if r.denied {
                denied_but_visible_and_broken.push(r.name);
                // The command-line workaround must name the feature.
                let (l, sl, reg, bit) = p.feature.expect("feature");
                let rule = DENY_LIST
                    .iter()
                    .find(|d| (d.leaf, d.subleaf, d.reg, d.bit) == (l, sl, reg, bit));
                let cmdline = linux_cmdline();
                // Leaf 0xD (XSAVE state, zeroed) and every feature that depends on XSAVE
                // (AVX and its family) are covered by `noxsave`.
                let noxsave = cmdline.starts_with("noxsave ");
                let covered = rule.is_some_and(|d| {
                    cmdline.contains(d.name) || (noxsave && COVERED_BY_NOXSAVE.contains(&d.name))
                }) || (l == 0xd && noxsave);
                assert!(covered, "{} not covered by {cmdline}", r.name);
            } else {
                unexpected.push((r.name, r.outcome.clone()));
            }
        }
    }
    let sanity = results.iter().find(|r| r.name.starts_with("ud2"));
    assert_eq!(sanity.map(|r| &r.outcome), Some(&ProbeOutcome::Faulted));
    println!(
        "denied, but still visible to the guest kernel on this host, and broken at CPL0 \
         (covered by the guest command line): {denied_but_visible_and_broken:?}"
    );
    println!("guest command line: {}", linux_cmdline());
    assert!(
        unexpected.is_empty(),
        "instructions a guest kernel can use but this KVM cannot run at CPL0, not covered by \
         the deny list or KNOWN_BASELINE_FAILURES: {unexpected:?}"
    );
}
