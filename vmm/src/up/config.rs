//! The configuration of `tidepool up`: an embedded default (JSON, [`DEFAULT_CONFIG`]), an
//! optional file that overrides any subset of its keys (`--config FILE`), then command-line
//! flags. Unknown keys are refused, and [`UpConfig::validate`] checks the result.

use serde::{Deserialize, Serialize};
use tidepool_api::types::{BackingConfig, BalloonConfig, CreateVmRequest, HotplugConfig};

/// The embedded default configuration (`vmm/src/up/default-config.json`).
///
/// - `daemon.socket`: null picks `$XDG_RUNTIME_DIR/tidepool/tidepool.sock` (or
///   `/run/tidepool/tidepool.sock` as root, else `/tmp/tidepool-$UID/tidepool.sock`).
/// - `daemon.pool_mib`: null sizes the pool at `pool_percent` of host RAM (50: half).
/// - `vm`: the default VM: 1 vCPU, 512 MiB boot RAM, a 2 GiB virtio-mem region of 2 MiB
///   blocks, a balloon with free page reporting, THP-backed RAM.
/// - `nested.mode`: `auto` (probe the host's KVM), `direct` or `nested`.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.json");

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON does not parse or has unknown keys or wrong types.
    #[error("{what}: {source}")]
    Parse {
        /// Which document.
        what: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The config file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// How `tidepool up` runs the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Probe the host's KVM and pick `direct` or `nested`.
    Auto,
    /// The daemon runs here, on this host's KVM.
    Direct,
    /// The daemon runs in an L1 VM (QEMU TCG with emulated SVM) and the API is relayed.
    Nested,
}

/// Daemon settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Unix socket path; None: the runtime directory (see [`super::paths::default_socket`]).
    pub socket: Option<String>,
    /// Pool size in MiB; None: `pool_percent` of host RAM.
    pub pool_mib: Option<u64>,
    /// Percentage of host RAM the pool gets when `pool_mib` is None.
    pub pool_percent: u8,
    /// Seconds the daemon waits for a VM's thread before answering 504.
    pub vm_timeout_s: u64,
    /// Free block size the pool monitor compacts for, in MiB (a power of two, 2..=1024; 2:
    /// one pool block, compaction never fires). See docs/reclaim.md.
    pub compact_order_mib: u64,
    /// Fragmentation index above which the monitor compacts, in (0, 1].
    pub compact_threshold: f64,
    /// Nice value of the guests' threads (vCPUs, devices), 0..=19: below the daemon's own
    /// threads so the API answers promptly while guests keep the cores busy.
    #[serde(default = "default_guest_nice")]
    pub guest_nice: i32,
}

fn default_guest_nice() -> i32 {
    crate::latency::DEFAULT_GUEST_NICE
}

/// The default VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs.
    pub vcpus: u32,
    /// Boot RAM in MiB.
    pub memory_mib: u64,
    /// virtio-mem region in MiB (0: no virtio-mem).
    pub hotplug_region_mib: u64,
    /// virtio-mem block size in MiB.
    pub hotplug_block_mib: u64,
    /// Attach a virtio-balloon.
    pub balloon: bool,
    /// Offer free page reporting on the balloon.
    pub free_page_reporting: bool,
    /// Offer DEFLATE_ON_OOM on the balloon.
    pub deflate_on_oom: bool,
    /// Balloon statistics interval in seconds (0: no stats queue).
    pub balloon_stats_interval_s: u32,
    /// Back guest RAM with transparent huge pages.
    pub thp: bool,
    /// Extra kernel command-line arguments (added to the guest image's `cmdline`).
    pub cmdline: Option<String>,
}

/// Nested-mode settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NestedConfig {
    /// auto, direct or nested.
    pub mode: Mode,
    /// L1 RAM in MiB; None: the VM's boot RAM + region + 1 GiB.
    pub l1_memory_mib: Option<u64>,
    /// Seconds to wait for L1 and the VM in it to come up.
    pub boot_timeout_s: u64,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpConfig {
    /// Daemon settings.
    pub daemon: DaemonConfig,
    /// The default VM.
    pub vm: VmConfig,
    /// Nested-mode settings.
    pub nested: NestedConfig,
}

/// Merges `over` into `base`: objects key by key, anything else replaced.
fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

impl UpConfig {
    /// The embedded default.
    pub fn embedded() -> Result<UpConfig, ConfigError> {
        serde_json::from_str(DEFAULT_CONFIG).map_err(|source| ConfigError::Parse {
            what: "the embedded default config".into(),
            source,
        })
    }

    /// The embedded default with `text` (a JSON object with any subset of the keys) laid over
    /// it; `what` names the document in errors.
    pub fn with_overrides(text: &str, what: &str) -> Result<UpConfig, ConfigError> {
        let parse = |source| ConfigError::Parse {
            what: what.to_string(),
            source,
        };
        let mut base: serde_json::Value =
            serde_json::from_str(DEFAULT_CONFIG).map_err(|source| ConfigError::Parse {
                what: "the embedded default config".into(),
                source,
            })?;
        let over: serde_json::Value = serde_json::from_str(text).map_err(parse)?;
        if !over.is_object() {
            return Err(ConfigError::Invalid(format!(
                "{what} must be a JSON object"
            )));
        }
        merge(&mut base, over);
        serde_json::from_value(base).map_err(parse)
    }

    /// The embedded default, overridden by the file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<UpConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::with_overrides(&text, &path.display().to_string())
    }

    /// Checks ranges the API would refuse later, so `up` fails before it starts anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let d = &self.daemon;
        if d.pool_mib.is_none() && !(1..=100).contains(&d.pool_percent) {
            return bad(format!(
                "daemon.pool_percent must be 1..=100, not {}",
                d.pool_percent
            ));
        }
        if d.pool_mib == Some(0) {
            return bad("daemon.pool_mib must be positive".into());
        }
        if d.vm_timeout_s == 0 {
            return bad("daemon.vm_timeout_s must be positive".into());
        }
        if let Err(e) = crate::reclaim::MonitorConfig::default()
            .set_compaction(Some(d.compact_order_mib), Some(d.compact_threshold))
        {
            return bad(format!("daemon.compact_*: {e}"));
        }
        if !crate::latency::GUEST_NICE_RANGE.contains(&d.guest_nice) {
            return bad(format!(
                "daemon.guest_nice must be 0..=19, not {}",
                d.guest_nice
            ));
        }
        let v = &self.vm;
        if v.vcpus == 0 || v.vcpus > 64 {
            return bad(format!("vm.vcpus must be 1..=64, not {}", v.vcpus));
        }
        if v.memory_mib < 64 || v.memory_mib % 2 != 0 {
            return bad(format!(
                "vm.memory_mib must be even and at least 64 (a Linux guest), not {}",
                v.memory_mib
            ));
        }
        if v.hotplug_region_mib % 128 != 0 {
            return bad(format!(
                "vm.hotplug_region_mib must be a multiple of 128, not {}",
                v.hotplug_region_mib
            ));
        }
        let b = v.hotplug_block_mib;
        if !(2..=128).contains(&b) || !b.is_power_of_two() {
            return bad(format!(
                "vm.hotplug_block_mib must be a power of two in 2..=128, not {b}"
            ));
        }
        if !v.balloon && (v.free_page_reporting || v.deflate_on_oom) {
            return bad("vm.free_page_reporting and vm.deflate_on_oom need vm.balloon".into());
        }
        if let Some(pool) = d.pool_mib {
            if pool < v.memory_mib {
                return bad(format!(
                    "daemon.pool_mib ({pool}) is smaller than the VM's boot RAM ({})",
                    v.memory_mib
                ));
            }
        }
        if self.nested.boot_timeout_s < 10 {
            return bad("nested.boot_timeout_s must be at least 10".into());
        }
        if let Some(l1) = self.nested.l1_memory_mib {
            if l1 < v.memory_mib + 512 {
                return bad(format!(
                    "nested.l1_memory_mib ({l1}) must exceed the VM's boot RAM by 512 MiB"
                ));
            }
        }
        Ok(())
    }

    /// Pool size in MiB for a host with `host_mib` of RAM.
    pub fn pool_mib(&self, host_mib: u64) -> u64 {
        self.daemon
            .pool_mib
            .unwrap_or(host_mib * u64::from(self.daemon.pool_percent) / 100)
    }

    /// L1 RAM in nested mode.
    pub fn l1_memory_mib(&self) -> u64 {
        self.nested
            .l1_memory_mib
            .unwrap_or(self.vm.memory_mib + self.vm.hotplug_region_mib + 1024)
    }

    /// The create request for the default VM booting `kernel` with `initrd` and the image's
    /// command line `image_cmdline` (plus `vm.cmdline`).
    pub fn create_request(
        &self,
        kernel: &str,
        initrd: &str,
        image_cmdline: &str,
    ) -> CreateVmRequest {
        let v = &self.vm;
        let mut req = CreateVmRequest::with_memory(v.memory_mib);
        req.vcpus = v.vcpus;
        req.kernel = Some(kernel.to_string());
        req.initrd = Some(initrd.to_string());
        let cmdline = match &v.cmdline {
            Some(extra) if !extra.trim().is_empty() => {
                format!("{} {}", image_cmdline.trim(), extra.trim())
            }
            _ => image_cmdline.trim().to_string(),
        };
        req.cmdline = (!cmdline.is_empty()).then_some(cmdline);
        if v.hotplug_region_mib > 0 {
            req.hotplug = Some(HotplugConfig {
                region_mib: v.hotplug_region_mib,
                block_mib: v.hotplug_block_mib,
                memslots: Default::default(),
            });
        }
        if v.balloon {
            req.balloon = Some(BalloonConfig {
                free_page_reporting: v.free_page_reporting,
                deflate_on_oom: v.deflate_on_oom,
                stats_interval_s: v.balloon_stats_interval_s,
                free_page_hinting: false,
            });
        }
        req.backing = Some(BackingConfig {
            thp: v.thp,
            ..BackingConfig::default()
        });
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults() {
        let c = UpConfig::embedded().unwrap();
        c.validate().unwrap();
        assert_eq!(c.daemon.socket, None);
        assert_eq!(c.daemon.pool_percent, 50);
        assert_eq!(c.pool_mib(24 * 1024), 12 * 1024);
        assert_eq!(c.vm.vcpus, 1);
        assert_eq!(c.vm.memory_mib, 512);
        assert_eq!(c.vm.hotplug_region_mib, 2048);
        assert_eq!(c.vm.hotplug_block_mib, 2);
        assert!(c.vm.balloon && c.vm.free_page_reporting && c.vm.thp);
        assert_eq!(c.nested.mode, Mode::Auto);
        assert_eq!(c.l1_memory_mib(), 512 + 2048 + 1024);
    }

    #[test]
    fn partial_override_keeps_other_defaults() {
        let c = UpConfig::with_overrides(
            r#"{"daemon": {"pool_mib": 4096}, "vm": {"memory_mib": 1024}, "nested": {"mode": "nested"}}"#,
            "test",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.pool_mib(24 * 1024), 4096);
        assert_eq!(c.vm.memory_mib, 1024);
        assert_eq!(c.vm.hotplug_region_mib, 2048);
        assert_eq!(c.nested.mode, Mode::Nested);
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused() {
        let e = UpConfig::with_overrides(r#"{"vm": {"memroy_mib": 1024}}"#, "f.json").unwrap_err();
        assert!(e.to_string().contains("memroy_mib"), "{e}");
        assert!(UpConfig::with_overrides(r#"{"vm": {"vcpus": "two"}}"#, "f").is_err());
        assert!(UpConfig::with_overrides(r#"{"nested": {"mode": "sideways"}}"#, "f").is_err());
        assert!(UpConfig::with_overrides("[1]", "f").is_err());
        assert!(UpConfig::with_overrides("{", "f").is_err());
    }

    #[test]
    fn validation_errors() {
        let cases = [
            r#"{"vm": {"memory_mib": 511}}"#,
            r#"{"vm": {"vcpus": 0}}"#,
            r#"{"vm": {"hotplug_region_mib": 100}}"#,
            r#"{"vm": {"hotplug_block_mib": 3}}"#,
            r#"{"vm": {"balloon": false}}"#,
            r#"{"daemon": {"pool_percent": 0}}"#,
            r#"{"daemon": {"pool_mib": 256}}"#,
            r#"{"daemon": {"compact_order_mib": 3}}"#,
            r#"{"daemon": {"compact_order_mib": 1}}"#,
            r#"{"daemon": {"compact_order_mib": 2048}}"#,
            r#"{"daemon": {"compact_threshold": 0.0}}"#,
            r#"{"daemon": {"compact_threshold": 1.5}}"#,
            r#"{"daemon": {"guest_nice": -1}}"#,
            r#"{"daemon": {"guest_nice": 20}}"#,
            r#"{"nested": {"l1_memory_mib": 600}}"#,
        ];
        for c in cases {
            let cfg = UpConfig::with_overrides(c, "t").unwrap();
            assert!(cfg.validate().is_err(), "{c} should be invalid");
        }
        let ok = UpConfig::with_overrides(
            r#"{"vm": {"balloon": false, "free_page_reporting": false, "deflate_on_oom": false, "hotplug_region_mib": 0}}"#,
            "t",
        )
        .unwrap();
        ok.validate().unwrap();
        let compact = UpConfig::with_overrides(
            r#"{"daemon": {"compact_order_mib": 128, "compact_threshold": 0.3}}"#,
            "t",
        )
        .unwrap();
        compact.validate().unwrap();
        let nice = UpConfig::with_overrides(r#"{"daemon": {"guest_nice": 0}}"#, "t").unwrap();
        nice.validate().unwrap();
        assert_eq!(nice.daemon.guest_nice, 0);
        assert_eq!(
            UpConfig::embedded().unwrap().daemon.guest_nice,
            crate::latency::DEFAULT_GUEST_NICE
        );
    }

    #[test]
    fn create_request_matches_config() {
        let c = UpConfig::with_overrides(r#"{"vm": {"cmdline": "quiet"}}"#, "t").unwrap();
        let r = c.create_request("/g/vmlinux", "/g/initramfs.cpio.gz", "console=ttyS0\n");
        assert_eq!(r.memory_mib, 512);
        assert_eq!(r.kernel.as_deref(), Some("/g/vmlinux"));
        assert_eq!(r.cmdline.as_deref(), Some("console=ttyS0 quiet"));
        let h = r.hotplug.unwrap();
        assert_eq!((h.region_mib, h.block_mib), (2048, 2));
        assert!(r.balloon.unwrap().free_page_reporting);
        assert!(r.backing.unwrap().thp);
        assert!(r.start);
    }
}
