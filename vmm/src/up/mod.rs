//! `tidepool up`: the daemon with an embedded default config, the default guest image
//! (built when missing), one default microVM, and instructions to resize it.
//!
//! 1. The config: [`config::DEFAULT_CONFIG`] (pool = half of host RAM, THP on, socket under
//!    the runtime directory, one 512 MiB VM with a 2 GiB virtio-mem region and a free page
//!    reporting balloon), overridden by `--config FILE` and flags.
//! 2. The guest image: `<cache>/tidepool/guest/current`, else the embedded
//!    `resources/guest/build.sh` is written out and run.
//! 3. The host's KVM is probed ([`probe`]); a `kvm_pvm` host, or one that cannot run a stock
//!    kernel's CPL0 instructions, gets nested mode.
//! 4. Direct mode ([`direct`]): the daemon in this process, the VM created through the same
//!    `ApiBackend` the API serves.
//! 5. Nested mode ([`nested`]): L1 under QEMU TCG runs `tidepool up --direct`, and the host's
//!    socket is relayed to it ([`relay`]).

pub mod config;
pub mod console;
pub mod daemon;
pub mod direct;
pub mod nested;
pub mod paths;
pub mod probe;
pub mod relay;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use clap::Args;

use config::{Mode, UpConfig};
use paths::GuestImage;

/// `tidepool up` options (flags override the config file, which overrides the embedded one).
#[derive(Debug, Clone, Default, Args)]
pub struct UpArgs {
    /// JSON file overriding any keys of the embedded default config (see --print-config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the effective config as JSON and exit.
    #[arg(long)]
    pub print_config: bool,
    /// API socket (default: $XDG_RUNTIME_DIR/tidepool/tidepool.sock, /run/tidepool as root,
    /// else /tmp/tidepool-$UID).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Pool size in MiB (default: half of host RAM).
    #[arg(long)]
    pub pool_mib: Option<u64>,
    /// Boot RAM of the default VM in MiB.
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// vCPUs of the default VM.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// virtio-mem region of the default VM in MiB (multiple of 128; 0: none).
    #[arg(long)]
    pub hotplug_mib: Option<u64>,
    /// Free block size the pool monitor compacts for, in MiB (power of two, 2..=1024; 2, the
    /// default: compaction never fires). Sets `daemon.compact_order_mib`.
    #[arg(long)]
    pub compact_order_mib: Option<u64>,
    /// Compact when the fragmentation index exceeds this, in (0, 1] (default 0.5). Sets
    /// `daemon.compact_threshold`.
    #[arg(long)]
    pub compact_threshold: Option<f64>,
    /// Nice value of the guests' threads, 0..=19 (default 5: below the daemon's API threads).
    /// Sets `daemon.guest_nice`.
    #[arg(long)]
    pub guest_nice: Option<i32>,
    /// Run the daemon in a nested L1 VM (QEMU TCG with emulated SVM), whatever the probe says.
    #[arg(long, conflicts_with = "direct")]
    pub nested: bool,
    /// Run the daemon here on this host's KVM, whatever the probe says.
    #[arg(long)]
    pub direct: bool,
    /// Use the guest image in this directory (vmlinux, initramfs.cpio.gz, cmdline) instead of
    /// the cached default (never builds).
    #[arg(long)]
    pub guest_dir: Option<PathBuf>,
    /// Do not install missing Debian packages or build the guest image; fail instead.
    #[arg(long)]
    pub no_build: bool,
    /// Print the guest's whole serial console (default: only its TIDEPOOL- markers), and in
    /// nested mode L1's whole console.
    #[arg(long)]
    pub console: bool,
    /// Run the default VM on the built-in tiny guest (its CPL3 virtio-mem driver follows
    /// resizes) instead of the stock kernel, in direct mode on this host's KVM: needs no
    /// guest image and no KVM able to run a stock kernel. For tests of direct mode on hosts
    /// like CI's, whose KVM cannot boot the stock guest.
    #[arg(long, hide = true, conflicts_with_all = ["nested", "guest_dir"])]
    pub tiny_guest: bool,
    /// Inside L1: also listen on this address for the host's relay.
    #[arg(long, hide = true, requires = "relay_token_file")]
    pub relay_listen: Option<SocketAddr>,
    /// Inside L1: the relay's token.
    #[arg(long, hide = true)]
    pub relay_token_file: Option<PathBuf>,
}

/// Errors of `tidepool up`.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A prerequisite is missing.
    #[error("{0}")]
    Missing(String),
    /// Anything that failed while running.
    #[error("{0}")]
    Failed(String),
}

impl UpArgs {
    /// The effective configuration: embedded, file, flags; validated.
    pub fn effective_config(&self) -> Result<UpConfig, UpError> {
        let mut c = match &self.config {
            Some(p) => UpConfig::from_file(p)?,
            None => UpConfig::embedded()?,
        };
        if let Some(s) = &self.socket {
            c.daemon.socket = Some(s.display().to_string());
        }
        if let Some(p) = self.pool_mib {
            c.daemon.pool_mib = Some(p);
        }
        if let Some(m) = self.memory_mib {
            c.vm.memory_mib = m;
        }
        if let Some(o) = self.compact_order_mib {
            c.daemon.compact_order_mib = o;
        }
        if let Some(t) = self.compact_threshold {
            c.daemon.compact_threshold = t;
        }
        if let Some(n) = self.guest_nice {
            c.daemon.guest_nice = n;
        }
        if let Some(v) = self.vcpus {
            c.vm.vcpus = v;
        }
        if let Some(h) = self.hotplug_mib {
            c.vm.hotplug_region_mib = h;
        }
        if self.nested {
            c.nested.mode = Mode::Nested;
        }
        if self.direct || self.tiny_guest {
            c.nested.mode = Mode::Direct;
        }
        c.validate()?;
        Ok(c)
    }
}

/// The socket path the config names, or the default for this process.
pub fn socket_path(c: &UpConfig) -> PathBuf {
    c.daemon
        .socket
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(paths::default_socket_here)
}

/// Whether `name` is an executable on PATH.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Runs the embedded `resources/ci/install-deps.sh` (installs only what is missing; needs
/// root or sudo for apt-get).
fn install_deps() -> Result<(), UpError> {
    let root = paths::materialize(paths::GUEST_SCRIPTS)
        .map_err(|e| UpError::Failed(format!("writing the embedded scripts: {e}")))?;
    let status = Command::new(root.join("ci/install-deps.sh"))
        .status()
        .map_err(|e| UpError::Failed(format!("running install-deps.sh: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(UpError::Missing(format!(
            "installing the Debian packages tidepool up needs failed ({status}); \
             run resources/ci/install-deps.sh as root"
        )))
    }
}

/// The guest image: `--guest-dir`, else the cached default, else built now.
pub fn ensure_guest(args: &UpArgs) -> Result<GuestImage, UpError> {
    if let Some(d) = &args.guest_dir {
        return GuestImage::open(d).ok_or_else(|| {
            UpError::Missing(format!(
                "{} lacks vmlinux, initramfs.cpio.gz or cmdline",
                d.display()
            ))
        });
    }
    let current = paths::guest_current();
    if let Some(g) = GuestImage::open(&current) {
        println!("guest image: {}", g.dir.display());
        return Ok(g);
    }
    if args.no_build {
        return Err(UpError::Missing(format!(
            "no guest image at {} (and --no-build): run resources/guest/build.sh",
            current.display()
        )));
    }
    println!(
        "guest image missing at {}: building it from Debian packages (kernel, busybox); \
         this takes a minute or two",
        current.display()
    );
    install_deps()?;
    let root = paths::materialize(paths::GUEST_SCRIPTS)
        .map_err(|e| UpError::Failed(format!("writing the embedded scripts: {e}")))?;
    let t0 = std::time::Instant::now();
    // build.sh logs its progress on stderr, which stays the terminal's.
    let status = Command::new(root.join("guest/build.sh"))
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| UpError::Failed(format!("running build.sh: {e}")))?;
    if !status.success() {
        return Err(UpError::Failed(format!(
            "building the guest image failed ({status}); see the [tidepool] lines above"
        )));
    }
    let g = GuestImage::open(&current).ok_or_else(|| {
        UpError::Failed(format!(
            "build.sh succeeded but {} is incomplete",
            current.display()
        ))
    })?;
    println!(
        "guest image built in {:.0} s: {}",
        t0.elapsed().as_secs_f64(),
        g.dir.display()
    );
    Ok(g)
}

/// Picks direct or nested mode, saying why on stdout; runs the KVM probe
/// ([`probe::gather`]) only when the config leaves the choice to it.
fn choose_mode(c: &UpConfig) -> Mode {
    let mut out = std::io::stdout().lock();
    decide_mode(c, probe::gather, &mut out)
}

/// The mode choice with the probe injected: a mode set in the config wins (and `probe` is
/// not run); otherwise `probe`'s evidence decides ([`probe::decide`]): a capable host runs
/// direct, any other runs nested, with the reasons written plainly to `out`.
pub fn decide_mode(
    c: &UpConfig,
    probe: impl FnOnce() -> probe::Evidence,
    out: &mut impl std::io::Write,
) -> Mode {
    match c.nested.mode {
        Mode::Direct => return Mode::Direct,
        Mode::Nested => return Mode::Nested,
        Mode::Auto => {}
    }
    // Messages only: a closed stdout must not change the choice.
    let _ = writeln!(
        out,
        "checking whether this host's KVM can run a stock Linux guest kernel..."
    );
    let evidence = probe();
    match probe::decide(&evidence) {
        probe::Verdict::Capable => {
            let _ = writeln!(
                out,
                "  yes: KVM modules {:?}, every probed CPL0 instruction works: running the \
                 daemon directly on this host's KVM",
                evidence.kvm_modules
            );
            Mode::Direct
        }
        probe::Verdict::Incapable(reasons) => {
            let _ = writeln!(
                out,
                "  no: this host's KVM cannot run the stock guest kernel:"
            );
            for r in reasons {
                let _ = writeln!(out, "    - {r}");
            }
            let _ = writeln!(
                out,
                "  so the daemon runs nested, inside an L1 VM under QEMU TCG with emulated SVM \
                 (a real KVM there), and this process relays its API socket (--direct overrides)"
            );
            Mode::Nested
        }
        probe::Verdict::NoKvm(why) => {
            let _ = writeln!(
                out,
                "  no usable /dev/kvm here ({why}): running nested under QEMU TCG"
            );
            Mode::Nested
        }
    }
}

/// `tidepool up`.
pub fn run(args: &UpArgs) -> Result<(), UpError> {
    let cfg = args.effective_config()?;
    if args.print_config {
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| UpError::Failed(format!("printing the config: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    let socket = socket_path(&cfg);
    if args.tiny_guest {
        println!("direct mode with the built-in tiny guest (no stock kernel)");
        return direct::run(args, &cfg, &socket, &direct::DefaultGuest::Tiny);
    }
    let mode = choose_mode(&cfg);
    if mode == Mode::Nested && !on_path("qemu-system-x86_64") {
        if args.no_build {
            return Err(UpError::Missing(
                "nested mode needs qemu-system-x86_64 (Debian package qemu-system-x86)".into(),
            ));
        }
        install_deps()?;
    }
    let guest = ensure_guest(args)?;
    match mode {
        Mode::Nested => nested::run(args, &cfg, &socket, &guest),
        _ => direct::run(args, &cfg, &socket, &direct::DefaultGuest::Linux(guest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        up: UpArgs,
    }

    #[test]
    fn flags_override_the_config() {
        let t = T::parse_from([
            "t",
            "--memory-mib",
            "1024",
            "--pool-mib",
            "4096",
            "--hotplug-mib",
            "0",
            "--nested",
            "--socket",
            "/tmp/x.sock",
        ]);
        let c = t.up.effective_config().unwrap();
        assert_eq!(c.vm.memory_mib, 1024);
        assert_eq!(c.daemon.pool_mib, Some(4096));
        assert_eq!(c.vm.hotplug_region_mib, 0);
        assert_eq!(c.nested.mode, Mode::Nested);
        assert_eq!(socket_path(&c), PathBuf::from("/tmp/x.sock"));
    }

    #[test]
    fn bad_flags_fail_validation() {
        let t = T::parse_from(["t", "--memory-mib", "513"]);
        assert!(matches!(t.up.effective_config(), Err(UpError::Config(_))));
        assert!(T::try_parse_from(["t", "--nested", "--direct"]).is_err());
    }

    fn auto() -> UpConfig {
        let c = T::parse_from(["t"]).up.effective_config().unwrap();
        assert_eq!(
            c.nested.mode,
            Mode::Auto,
            "the embedded config lets the probe decide"
        );
        c
    }

    fn evidence(modules: &[&str], probes: &[(&str, Result<bool, &str>)]) -> probe::Evidence {
        probe::Evidence {
            kvm_modules: modules.iter().map(|m| m.to_string()).collect(),
            probes: probes
                .iter()
                .map(|(n, r)| (n.to_string(), r.map_err(|e| e.to_string())))
                .collect(),
            open_error: None,
        }
    }

    fn decide_with(c: &UpConfig, e: probe::Evidence) -> (Mode, String, bool) {
        let mut out = Vec::new();
        let mut probed = false;
        let mode = decide_mode(
            c,
            || {
                probed = true;
                e
            },
            &mut out,
        );
        (mode, String::from_utf8(out).unwrap(), probed)
    }

    #[test]
    fn a_capable_probe_chooses_direct_mode() {
        let works: Vec<(&str, Result<bool, &str>)> = probe::STOCK_KERNEL_NEEDS
            .iter()
            .map(|n| (*n, Ok(true)))
            .collect();
        let (mode, out, probed) = decide_with(&auto(), evidence(&["kvm_intel"], &works));
        assert!(probed);
        assert_eq!(mode, Mode::Direct);
        assert!(out.contains("yes:"), "{out}");
        assert!(out.contains("kvm_intel"), "{out}");
        assert!(out.contains("directly on this host's KVM"), "{out}");
    }

    #[test]
    fn a_failing_probe_chooses_nested_mode_and_says_why() {
        let e = evidence(
            &["kvm_pvm"],
            &[
                ("int3", Ok(false)),
                ("pxor", Ok(true)),
                ("xrstor64", Err("KVM emulation failure (suberror 1)")),
            ],
        );
        let (mode, out, _) = decide_with(&auto(), e);
        assert_eq!(mode, Mode::Nested);
        assert!(
            out.contains("no: this host's KVM cannot run the stock guest kernel"),
            "{out}"
        );
        // Every reason on its own line, in words.
        assert!(out.contains("    - the KVM module is kvm_pvm"), "{out}");
        assert!(
            out.contains("    - `int3` does not work at guest CPL0"),
            "{out}"
        );
        assert!(
            out.contains("    - `xrstor64` could not be probed: KVM emulation failure"),
            "{out}"
        );
        assert!(
            !out.contains("pxor"),
            "working instructions are not reasons: {out}"
        );
        assert!(out.contains("runs nested"), "{out}");

        let mut e = evidence(&[], &[]);
        e.open_error = Some("/dev/kvm: No such file or directory".into());
        let (mode, out, _) = decide_with(&auto(), e);
        assert_eq!(mode, Mode::Nested);
        assert!(
            out.contains("no usable /dev/kvm here (/dev/kvm: No such file"),
            "{out}"
        );
    }

    #[test]
    fn a_mode_in_the_config_skips_the_probe() {
        for (flag, want) in [("--direct", Mode::Direct), ("--nested", Mode::Nested)] {
            let c = T::parse_from(["t", flag]).up.effective_config().unwrap();
            let (mode, out, probed) = decide_with(&c, evidence(&["kvm_pvm"], &[]));
            assert_eq!(mode, want);
            assert!(!probed, "{flag} must not run the probe");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn config_file_then_flags() {
        let p = std::env::temp_dir().join(format!("tp-up-cfg-{}.json", std::process::id()));
        std::fs::write(&p, r#"{"vm": {"memory_mib": 256, "vcpus": 2}}"#).unwrap();
        let t = T::parse_from(["t", "--config", p.to_str().unwrap(), "--vcpus", "1"]);
        let c = t.up.effective_config().unwrap();
        assert_eq!((c.vm.memory_mib, c.vm.vcpus), (256, 1));
        std::fs::remove_file(&p).unwrap();
        let t = T::parse_from(["t", "--config", "/nonexistent/tp.json"]);
        assert!(t.up.effective_config().is_err());
    }
}
