//! Can this host's KVM run a stock Linux kernel? A stock kernel runs at CPL0 and needs
//! `int3` (text patching), `lock cmpxchg16b`, XSAVE and SSE arithmetic to work there. On a
//! `kvm_pvm` host, guest CPL0 code is emulated and some of these stop KVM with an internal
//! error; the probe runs them in tiny VMs (the tier-2 `cpl0_probe` machinery) and decides.

use std::time::Duration;

use crate::tiny_guest::probe::{run_probe, ProbeOutcome, PROBES};

/// Instructions a stock Linux guest kernel executes at CPL0 that the probe checks.
pub const STOCK_KERNEL_NEEDS: &[&str] = &["int3", "lock cmpxchg16b", "xrstor64", "pxor"];

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The host's KVM runs a stock kernel: run the daemon here.
    Capable,
    /// It cannot; the reasons, one per line.
    Incapable(Vec<String>),
    /// /dev/kvm cannot be used at all.
    NoKvm(String),
}

/// The evidence the decision is made from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// The loaded KVM vendor modules (`kvm_intel`, `kvm_amd`, `kvm_pvm`, ...).
    pub kvm_modules: Vec<String>,
    /// Probed instruction name and outcome (`Ok(true)`: works at CPL0).
    pub probes: Vec<(String, Result<bool, String>)>,
    /// Why /dev/kvm could not be opened, if it could not.
    pub open_error: Option<String>,
}

/// The pure decision.
pub fn decide(e: &Evidence) -> Verdict {
    if let Some(why) = &e.open_error {
        return Verdict::NoKvm(why.clone());
    }
    let mut reasons = Vec::new();
    if e.kvm_modules.iter().any(|m| m == "kvm_pvm") {
        reasons.push(
            "the KVM module is kvm_pvm: guest CPL0 code is emulated instruction by instruction"
                .to_string(),
        );
    }
    for (name, res) in &e.probes {
        match res {
            Ok(true) => {}
            Ok(false) => reasons.push(format!("`{name}` does not work at guest CPL0")),
            Err(why) => reasons.push(format!("`{name}` could not be probed: {why}")),
        }
    }
    if reasons.is_empty() {
        Verdict::Capable
    } else {
        Verdict::Incapable(reasons)
    }
}

/// The loaded KVM modules, from `/sys/module`.
pub fn kvm_modules() -> Vec<String> {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .iter()
        .filter(|m| std::path::Path::new("/sys/module").join(m).exists())
        .map(|m| m.to_string())
        .collect()
}

/// Gathers the evidence on this host: the modules, and each of [`STOCK_KERNEL_NEEDS`] run at
/// CPL0 (each probe takes one tiny VM and well under a second).
pub fn gather() -> Evidence {
    let mut e = Evidence {
        kvm_modules: kvm_modules(),
        ..Evidence::default()
    };
    if let Err(err) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        e.open_error = Some(format!("/dev/kvm: {err}"));
        return e;
    }
    for name in STOCK_KERNEL_NEEDS {
        let Some(p) = PROBES.iter().find(|p| p.name == *name) else {
            e.probes
                .push((name.to_string(), Err("no such probe".to_string())));
            continue;
        };
        let res = run_probe(p, Duration::from_secs(3))
            .map(|r| p.works(&r.outcome))
            .map_err(|err| err.to_string());
        e.probes.push((name.to_string(), res));
    }
    e
}

/// A one-line description of an outcome, for messages.
pub fn describe(o: &ProbeOutcome) -> String {
    match o {
        ProbeOutcome::Ran => "ran".into(),
        ProbeOutcome::Faulted => "faulted".into(),
        ProbeOutcome::Stalled => "stalled".into(),
        ProbeOutcome::EmulationFailure { suberror } => {
            format!("KVM emulation failure (suberror {suberror})")
        }
        ProbeOutcome::Other(s) => s.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(modules: &[&str], probes: &[(&str, Result<bool, &str>)]) -> Evidence {
        Evidence {
            kvm_modules: modules.iter().map(|s| s.to_string()).collect(),
            probes: probes
                .iter()
                .map(|(n, r)| (n.to_string(), r.map_err(|s| s.to_string())))
                .collect(),
            open_error: None,
        }
    }

    #[test]
    fn real_kvm_with_working_instructions_is_capable() {
        let e = ev(&["kvm_amd"], &[("int3", Ok(true)), ("pxor", Ok(true))]);
        assert_eq!(decide(&e), Verdict::Capable);
    }

    #[test]
    fn pvm_module_alone_is_incapable() {
        let e = ev(&["kvm_pvm"], &[("int3", Ok(true))]);
        match decide(&e) {
            Verdict::Incapable(r) => assert!(r[0].contains("kvm_pvm")),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_failing_or_unprobeable_instruction_is_incapable() {
        let e = ev(&["kvm_intel"], &[("int3", Ok(false)), ("pxor", Ok(true))]);
        match decide(&e) {
            Verdict::Incapable(r) => {
                assert_eq!(r.len(), 1);
                assert!(r[0].contains("int3"));
            }
            v => panic!("{v:?}"),
        }
        let e = ev(&["kvm_intel"], &[("xrstor64", Err("vm create failed"))]);
        assert!(matches!(decide(&e), Verdict::Incapable(_)));
    }

    #[test]
    fn no_kvm_wins() {
        let mut e = ev(&["kvm_pvm"], &[]);
        e.open_error = Some("/dev/kvm: permission denied".into());
        assert!(matches!(decide(&e), Verdict::NoKvm(_)));
    }

    #[test]
    fn every_needed_instruction_has_a_probe() {
        for n in STOCK_KERNEL_NEEDS {
            assert!(PROBES.iter().any(|p| p.name == *n), "{n}");
        }
    }
}
