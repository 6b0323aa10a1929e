//! The guest kernel command line: Tidepool's defaults, the options this host's KVM needs, and
//! the user's additions, in that order (a later option of the same name wins in Linux).

use crate::kvm::cpuid;

/// The most bytes (without the NUL) Tidepool writes; x86 Linux's `COMMAND_LINE_SIZE` is 2048.
pub const CMDLINE_MAX: usize = 2047;

/// What every Tidepool guest gets:
/// - `console=ttyS0`: the 16550 at 0x3f8 is the console;
/// - `reboot=t`: a reboot triple-faults, which ends the VM (KVM_EXIT_SHUTDOWN);
/// - `panic=-1`: a panic reboots at once, so it ends the VM too;
/// - `memhp_default_state=online_movable`: hot-plugged (virtio-mem) memory comes online movable
///   and can be unplugged again (the Debian kernel defaults to offline);
/// - `pci=off`: there is no PCI bus, so do not probe ports 0xcf8/0xcfc;
/// - `i8042.noaux i8042.nomux i8042.dumbkbd`: the i8042 is there for reset only.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 \
     memhp_default_state=online_movable pci=off i8042.noaux i8042.nomux i8042.dumbkbd";

/// Errors building a command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// The line is too long for the kernel.
    #[error("kernel command line is {0} bytes, the limit is {CMDLINE_MAX}")]
    TooLong(usize),
    /// The line contains a NUL or a newline.
    #[error("kernel command line contains a NUL or newline byte")]
    BadByte,
}

/// Whether to add the options that keep the guest kernel off instructions this host's KVM
/// cannot emulate at CPL0 ([`cpuid::linux_cmdline`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuWorkarounds {
    /// Add them when the host KVM is `kvm_pvm` (CPUID filtering does not reach CPL0 there).
    #[default]
    Auto,
    /// Always add them.
    On,
    /// Never add them.
    Off,
}

impl std::str::FromStr for CpuWorkarounds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CpuWorkarounds::Auto),
            "on" => Ok(CpuWorkarounds::On),
            "off" => Ok(CpuWorkarounds::Off),
            other => Err(format!("'{other}': expected auto, on or off")),
        }
    }
}

/// Whether the host's KVM module is `kvm_pvm` (guest CPL0 emulated, CPUID at CPL0 answered from
/// the host CPU).
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Build the command line: [`DEFAULT_CMDLINE`] (unless `defaults` is false), the CPU
/// work-around options when `workarounds` resolves to on (`is_pvm` is what
/// [`host_is_pvm`] said), then `extra`.
pub fn build(
    defaults: bool,
    workarounds: CpuWorkarounds,
    is_pvm: bool,
    extra: &str,
) -> Result<String, CmdlineError> {
    let mut parts: Vec<String> = Vec::new();
    if defaults {
        parts.push(DEFAULT_CMDLINE.to_string());
    }
    let add_cpu = match workarounds {
        CpuWorkarounds::Auto => is_pvm,
        CpuWorkarounds::On => true,
        CpuWorkarounds::Off => false,
    };
    if add_cpu {
        parts.push(cpuid::linux_cmdline());
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        parts.push(extra.to_string());
    }
    let line = parts.join(" ");
    if line.bytes().any(|b| b == 0 || b == b'\n' || b == b'\r') {
        return Err(CmdlineError::BadByte);
    }
    if line.len() > CMDLINE_MAX {
        return Err(CmdlineError::TooLong(line.len()));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_extra() {
        let c = build(
            true,
            CpuWorkarounds::Off,
            true,
            "  quiet tidepool.end=poweroff ",
        )
        .expect("cmdline");
        assert!(c.starts_with("console=ttyS0 reboot=t panic=-1 memhp_default_state=online_movable"));
        assert!(c.ends_with(" quiet tidepool.end=poweroff"));
        assert!(!c.contains("clearcpuid"));
        assert_eq!(
            build(false, CpuWorkarounds::Off, false, "a=b").as_deref(),
            Ok("a=b")
        );
    }

    #[test]
    fn workarounds_follow_the_host() {
        let pvm = build(true, CpuWorkarounds::Auto, true, "").expect("cmdline");
        assert!(pvm.contains(" noxsave clearcpuid="));
        let real = build(true, CpuWorkarounds::Auto, false, "").expect("cmdline");
        assert!(!real.contains("clearcpuid"));
        let forced = build(false, CpuWorkarounds::On, false, "").expect("cmdline");
        assert!(forced.starts_with("noxsave"));
        assert_eq!("on".parse(), Ok(CpuWorkarounds::On));
        assert!("maybe".parse::<CpuWorkarounds>().is_err());
    }

    #[test]
    fn bad_lines_are_refused() {
        assert_eq!(
            build(false, CpuWorkarounds::Off, false, "a\nb"),
            Err(CmdlineError::BadByte)
        );
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert_eq!(
            build(false, CpuWorkarounds::Off, false, &long),
            Err(CmdlineError::TooLong(CMDLINE_MAX + 1))
        );
    }
}
