//! `tidepool bench boot --linux`: the stock Debian guest (`<cache>/guest/current`, built with
//! the embedded `resources/guest/build.sh` when missing) booted by `tidepool run` (this very
//! executable) to its `/init`.
//!
//! When the host's KVM can run a stock kernel (the `tidepool up` probe says so) the runner is
//! started here; otherwise (`kvm_pvm`, or no usable /dev/kvm) inside the nested L1 with the
//! embedded `resources/nested/run-l1.sh`, the same way `resources/nested/tier3-memory.sh` does.
//! The figure is the runner's own `TIDEPOOL-RUN-MARK TIDEPOOL-INIT-START <s>` line (seconds of
//! wall time from the start of `tidepool run`), see `docs/boot.md`.

use super::super::{progress, BenchError, Report};
use crate::up::paths::{self, GuestImage};
use crate::up::probe;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn failed(e: impl ToString) -> BenchError {
    BenchError::Failed {
        suite: "boot",
        reason: e.to_string(),
    }
}

/// Guest RAM of the measured boot, as in the tier-3 check.
const MEMORY_MIB: &str = "512";

/// What one Linux boot gave.
#[derive(Debug, Clone, PartialEq)]
pub struct LinuxBoot {
    /// Wall seconds from the start of `tidepool run` to the guest's `/init`.
    pub to_init_s: f64,
    /// The guest's own uptime when `/init` started, if it printed it.
    pub guest_uptime_s: Option<f64>,
}

/// The first whitespace-delimited word after `key` on any line, as a number.
fn number_after(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v))
        .and_then(|v| v.split_whitespace().next())
        .map(|v| v.trim_end_matches('s'))
        .and_then(|v| v.parse().ok())
        .filter(|v: &f64| v.is_finite())
}

/// Parses `tidepool run` output (console and summary, in any order): the
/// `TIDEPOOL-RUN-MARK TIDEPOOL-INIT-START <s>` line and the guest's
/// `TIDEPOOL-INIT-START uptime=<s>` line. `None` when `/init` was never reached.
pub fn parse_run_output(text: &str) -> Option<LinuxBoot> {
    Some(LinuxBoot {
        to_init_s: number_after(text, "TIDEPOOL-RUN-MARK TIDEPOOL-INIT-START ")?,
        guest_uptime_s: number_after(text, "TIDEPOOL-INIT-START uptime="),
    })
}

/// The L1 boot time (wall seconds from QEMU's start to L1's `/init`) from `run-l1.sh`'s
/// summary line on stderr (`... init after <s>s wall ...`).
pub fn parse_l1_boot(harness_stderr: &str) -> Option<f64> {
    number_after(harness_stderr, "init after ")
}

/// `tidepool run` arguments: the image's full paths (`in_dir`), or bare file names as in the
/// L1's `/payload`.
fn run_args(g: &GuestImage, in_dir: bool) -> Vec<String> {
    let name = |p: &Path| {
        if in_dir {
            p.display().to_string()
        } else {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        }
    };
    vec![
        "run".into(),
        "--kernel".into(),
        name(&g.vmlinux),
        "--initrd".into(),
        name(&g.initramfs),
        "--memory-mib".into(),
        MEMORY_MIB.into(),
        "--timeout-s".into(),
        "150".into(),
        "--cmdline".into(),
        "tidepool.end=poweroff".into(),
        "--mark".into(),
        "TIDEPOOL-INIT-START".into(),
    ]
}

/// The cached guest image, built now (progress on stderr) when missing.
fn guest_image() -> Result<GuestImage, BenchError> {
    let current = paths::guest_current();
    if let Some(g) = GuestImage::open(&current) {
        return Ok(g);
    }
    progress(&format!(
        "no guest image at {}: building it with resources/guest/build.sh (a minute or two)",
        current.display()
    ));
    let root = paths::materialize(paths::GUEST_SCRIPTS)
        .map_err(|e| failed(format!("writing the embedded guest scripts: {e}")))?;
    // build.sh's stdout goes to stderr too, so that `--json` stdout stays one object.
    let status = Command::new(root.join("guest/build.sh"))
        .stdout(Stdio::from(
            std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| failed(format!("duplicating stderr: {e}")))?,
        ))
        .status()
        .map_err(|e| failed(format!("cannot run guest/build.sh: {e}")))?;
    if !status.success() {
        return Err(failed(format!(
            "the stock Debian guest image cannot be had: resources/guest/build.sh failed \
             ({status}); see its output above"
        )));
    }
    GuestImage::open(&current).ok_or_else(|| {
        failed(format!(
            "build.sh succeeded but {} is incomplete",
            current.display()
        ))
    })
}

fn this_binary() -> Result<PathBuf, BenchError> {
    std::env::current_exe().map_err(|e| failed(format!("cannot find this executable: {e}")))
}

/// Boots the guest with `tidepool run` here.
fn direct(g: &GuestImage) -> Result<LinuxBoot, BenchError> {
    let out = Command::new(this_binary()?)
        .args(run_args(g, true))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("cannot start tidepool run: {e}")))?;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_run_output(&text).ok_or_else(|| {
        failed(format!(
            "tidepool run ({}) never reached the guest's /init; last output:\n{}",
            out.status,
            tail(&text, 20)
        ))
    })
}

/// Boots the guest with `tidepool run` inside the nested L1; also returns the L1 boot time.
fn nested(g: &GuestImage) -> Result<(LinuxBoot, Option<f64>), BenchError> {
    if !crate::up::on_path("qemu-system-x86_64") {
        return Err(failed(
            "this host's KVM cannot run the stock guest kernel, and the nested L1 needs \
             qemu-system-x86_64, which is not installed (resources/ci/install-deps.sh installs it)",
        ));
    }
    let root = paths::materialize(paths::NESTED_SCRIPTS)
        .map_err(|e| failed(format!("writing the embedded nested scripts: {e}")))?;
    let log = std::env::temp_dir().join(format!("tidepool-bench-linux-{}.log", std::process::id()));
    let out = Command::new(root.join("nested/run-l1.sh"))
        .args(["-q", "-t", "540", "--log"])
        .arg(&log)
        .arg("--binary")
        .arg(this_binary()?)
        .arg("--file")
        .arg(&g.vmlinux)
        .arg("--file")
        .arg(&g.initramfs)
        .arg("--")
        .arg("./tidepool")
        .args(run_args(g, false))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("cannot start nested/run-l1.sh: {e}")))?;
    let serial = std::fs::read(&log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let harness = String::from_utf8_lossy(&out.stderr).into_owned();
    let boot = parse_run_output(&serial).ok_or_else(|| {
        failed(format!(
            "the L2 guest never reached /init in the nested L1 (run-l1.sh {}); harness:\n{}\n\
             serial tail:\n{}",
            out.status,
            tail(&harness, 10),
            tail(&serial, 30)
        ))
    })?;
    let _ = std::fs::remove_file(&log);
    Ok((boot, parse_l1_boot(&harness)))
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Measures one boot and adds its figures to `r`.
pub fn measure(r: &mut Report) -> Result<(), BenchError> {
    let guest = guest_image()?;
    progress("checking whether this host's KVM can run the stock guest kernel");
    let verdict = probe::decide(&probe::gather());
    let (boot, l1) = match verdict {
        probe::Verdict::Capable => {
            progress("stock Debian guest under tidepool run, directly");
            (direct(&guest)?, None)
        }
        probe::Verdict::Incapable(reasons) => {
            progress(&format!(
                "this host's KVM cannot run it ({}): measuring inside the nested L1",
                reasons.join("; ")
            ));
            let (b, l1) = nested(&guest)?;
            (b, Some(l1))
        }
        probe::Verdict::NoKvm(why) => {
            progress(&format!(
                "no usable /dev/kvm ({why}): measuring inside the nested L1"
            ));
            let (b, l1) = nested(&guest)?;
            (b, Some(l1))
        }
    };
    r.add(
        "linux_boot_to_init_s",
        boot.to_init_s,
        "s, stock Debian guest (512 MiB), tidepool run start to /init (wall)",
    );
    if let Some(u) = boot.guest_uptime_s {
        r.add(
            "linux_guest_uptime_at_init_s",
            u,
            "s, guest uptime at /init",
        );
    }
    r.add(
        "linux_boot_nested",
        if l1.is_some() { 1.0 } else { 0.0 },
        "1: measured inside the nested L1 (QEMU TCG + emulated SVM)",
    );
    if let Some(Some(s)) = l1 {
        r.add("l1_boot_s", s, "s, nested L1 boot to its /init (wall)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_runner_mark_and_guest_uptime() {
        let text = "[    0.000000] Linux version 6.1.0\n\
                    TIDEPOOL-INIT-START uptime=1.74\n\
                    TIDEPOOL-RUN end=PowerOff format=Elf wall_s=4.301\n\
                    TIDEPOOL-RUN-MARK TIDEPOOL-INIT-START 4.042\n";
        let b = parse_run_output(text).expect("parsed");
        assert_eq!(b.to_init_s, 4.042);
        assert_eq!(b.guest_uptime_s, Some(1.74));
    }

    #[test]
    fn serial_prefixes_and_missing_uptime() {
        let text = "\x1b[0m[  5.1] x TIDEPOOL-RUN-MARK TIDEPOOL-INIT-START 2.5\r\n";
        let b = parse_run_output(text).expect("parsed");
        assert_eq!(b.to_init_s, 2.5);
        assert_eq!(b.guest_uptime_s, None);
    }

    #[test]
    fn no_mark_means_no_figure() {
        assert_eq!(parse_run_output("TIDEPOOL-INIT-START uptime=1.0\n"), None);
        assert_eq!(
            parse_run_output("TIDEPOOL-RUN-MARK TIDEPOOL-INIT-START nan?\n"),
            None
        );
    }

    #[test]
    fn parses_the_l1_summary() {
        let s = "[tidepool] L1 summary: init after 2.31s wall (guest uptime 1.9s), \
                 /dev/kvm present, total 9.8s, qemu exit 0\n";
        assert_eq!(parse_l1_boot(s), Some(2.31));
        assert_eq!(parse_l1_boot("nothing"), None);
    }

    #[test]
    fn nested_args_use_payload_names() {
        let g = GuestImage {
            dir: "/c/g".into(),
            vmlinux: "/c/g/vmlinux".into(),
            initramfs: "/c/g/initramfs.cpio.gz".into(),
            cmdline: String::new(),
        };
        let a = run_args(&g, false);
        assert_eq!(
            a[..5],
            [
                "run",
                "--kernel",
                "vmlinux",
                "--initrd",
                "initramfs.cpio.gz"
            ]
        );
        assert_eq!(run_args(&g, true)[2], "/c/g/vmlinux");
    }
}
