//! clap definitions of the API commands and their pure conversions into requests.

use super::CliError;
use crate::client::Client;
use crate::server::{
    ClientTimeouts, ServeConfig, TcpConfig, DEFAULT_BACKEND_TIMEOUT, DEFAULT_BODY_LIMIT,
    DEFAULT_BODY_READ_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_INFLIGHT_PER_VM,
    DEFAULT_SOCKET_PATH,
};
use crate::types::*;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How the CLI reaches the daemon, and how it prints.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ConnectArgs {
    /// Unix socket of the daemon.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET_PATH)]
    pub socket: PathBuf,
    /// Talk to the daemon over loopback TCP instead of the socket (needs --token-file).
    #[arg(long, global = true, requires = "token_file")]
    pub tcp: Option<SocketAddr>,
    /// File holding the bearer token for --tcp.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of human-readable tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ConnectArgs {
    /// The client these arguments describe.
    pub fn client(&self) -> Result<Client, CliError> {
        match (&self.tcp, &self.token_file) {
            (Some(addr), Some(token)) => Ok(Client::tcp_with_token_file(*addr, token)?),
            (Some(_), None) => Err(CliError::Usage("--tcp needs --token-file".into())),
            (None, _) => Ok(Client::unix(&self.socket)),
        }
    }
}

/// A standalone parser for the API commands (the `tidepool` binary embeds [`ApiCommand`]
/// and [`ConnectArgs`] in its own parser; this one serves tests and tools).
#[derive(Debug, Clone, Parser)]
#[command(name = "tidepool", about = "Talk to a running Tidepool daemon")]
pub struct ApiCli {
    /// Connection and output options.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The command.
    #[command(subcommand)]
    pub command: ApiCommand,
}

/// The API commands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ApiCommand {
    /// Create, list, inspect, control and resize VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Balloon target and statistics.
    #[command(subcommand)]
    Balloon(BalloonCommand),
    /// Host memory per NUMA node.
    Host,
    /// The daemon's metrics (`GET /metrics`), printed as the OpenMetrics text it serves
    /// (`--json` does not change it).
    Metrics,
}

/// `vm ...` commands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum VmCommand {
    /// Create (and start) a VM.
    Create(Box<CreateArgs>),
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        /// VM id.
        id: String,
    },
    /// Stop and delete a VM.
    Delete {
        /// VM id.
        id: String,
    },
    /// Start a VM created with --no-start.
    Start {
        /// VM id.
        id: String,
    },
    /// Pause a running VM.
    Pause {
        /// VM id.
        id: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM id.
        id: String,
    },
    /// Stop a VM (it stays listed until deleted).
    Stop {
        /// VM id.
        id: String,
    },
    /// Show guest memory figures and resize progress.
    Memory {
        /// VM id.
        id: String,
    },
    /// Resize guest RAM to SIZE (total, e.g. 2G, 1536M, 1536) and wait until plugged.
    Resize {
        /// VM id.
        id: String,
        /// New total guest RAM (MiB unless suffixed with M, G or T).
        size: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Return right after the daemon accepted the resize.
        #[arg(long)]
        no_wait: bool,
    },
}

/// `balloon ...` commands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum BalloonCommand {
    /// Set the balloon target (memory taken from the guest).
    Set {
        /// VM id.
        id: String,
        /// Target size (MiB unless suffixed with M, G or T).
        size: String,
    },
    /// Show balloon sizes and guest statistics.
    Stats {
        /// VM id.
        id: String,
    },
}

/// Raw image privilege levels on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrivilegeArg {
    /// CPL0.
    Kernel,
    /// CPL3.
    User,
}

impl From<PrivilegeArg> for ImagePrivilege {
    fn from(p: PrivilegeArg) -> Self {
        match p {
            PrivilegeArg::Kernel => ImagePrivilege::Kernel,
            PrivilegeArg::User => ImagePrivilege::User,
        }
    }
}

/// Backing kinds on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackingArg {
    /// Private anonymous memory.
    Anonymous,
    /// memfd.
    Memfd,
    /// hugetlbfs.
    Hugetlbfs,
}

/// `vm create` options.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct CreateArgs {
    /// Read the whole request body (JSON) from this file instead of the options below.
    #[arg(long, conflicts_with_all = ["memory", "kernel", "image"])]
    pub config: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Boot RAM (e.g. 512M, 2G).
    #[arg(long, required_unless_present = "config")]
    pub memory: Option<String>,
    /// Kernel image; without it (and without --image) the built-in default guest boots.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// initramfs (with --kernel).
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (with --kernel).
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// Raw tiny-guest image file.
    #[arg(long, conflicts_with = "kernel", requires_all = ["load_addr", "entry"])]
    pub image: Option<PathBuf>,
    /// Load address of --image (decimal or 0x hex).
    #[arg(long, requires = "image")]
    pub load_addr: Option<String>,
    /// Entry point of --image (decimal or 0x hex).
    #[arg(long, requires = "image")]
    pub entry: Option<String>,
    /// Privilege --image starts at (`tidepool tiny-image` prints the one its image needs).
    #[arg(long, value_enum, default_value_t = PrivilegeArg::Kernel, requires = "image")]
    pub privilege: PrivilegeArg,
    /// virtio-mem hotplug region size (multiple of 128M).
    #[arg(long)]
    pub hotplug: Option<String>,
    /// virtio-mem block size.
    #[arg(long, default_value = "2M", requires = "hotplug")]
    pub hotplug_block: String,
    /// Add a virtio-balloon device.
    #[arg(long)]
    pub balloon: bool,
    /// Balloon: free page reporting (implies --balloon).
    #[arg(long)]
    pub free_page_reporting: bool,
    /// Balloon: deflate on OOM (implies --balloon).
    #[arg(long)]
    pub deflate_on_oom: bool,
    /// Balloon: free page hinting (implies --balloon). The daemon's reclaim engine starts the
    /// passes; hinted pages are discarded only with a swap file (docs/balloon.md).
    #[arg(long)]
    pub free_page_hinting: bool,
    /// Balloon: statistics interval in seconds (implies --balloon).
    #[arg(long)]
    pub stats_interval: Option<u32>,
    /// NUMA policy: local, preferred:N, interleave:N,M, bind:N,M.
    #[arg(long)]
    pub numa: Option<String>,
    /// Backing of guest RAM.
    #[arg(long, value_enum)]
    pub backing: Option<BackingArg>,
    /// Do not ask for transparent huge pages.
    #[arg(long)]
    pub no_thp: bool,
    /// Create without starting.
    #[arg(long)]
    pub no_start: bool,
}

/// Parses a size in MiB: a plain number is MiB; suffixes K (must give whole MiB), M/MiB,
/// G/GiB, T/TiB, case-insensitive.
pub fn parse_size_mib(s: &str) -> Result<u64, CliError> {
    let t = s.trim();
    let bad = || CliError::Usage(format!("invalid size {s:?}: use e.g. 512, 512M, 2G"));
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let mib = match unit {
        "" | "m" => Some(n),
        "k" => (n % 1024 == 0).then_some(n / 1024),
        "g" => n.checked_mul(1024),
        "t" => n.checked_mul(1024 * 1024),
        _ => None,
    };
    mib.ok_or_else(bad)
}

/// Parses an address in decimal or `0x` hex.
pub fn parse_addr(s: &str) -> Result<u64, CliError> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(&h.replace('_', ""), 16),
        None => t.replace('_', "").parse(),
    };
    r.map_err(|_| CliError::Usage(format!("invalid address {s:?}")))
}

/// Parses `local`, `preferred:N`, `interleave:N,M`, `bind:N,M`.
pub fn parse_numa(s: &str) -> Result<NumaConfig, CliError> {
    let bad = || {
        CliError::Usage(format!(
            "invalid --numa {s:?}: use local, preferred:N, interleave:N,M or bind:N,M"
        ))
    };
    let (name, nodes) = match s.split_once(':') {
        Some((n, rest)) => (n, Some(rest)),
        None => (s, None),
    };
    let policy = match name {
        "local" => NumaPolicy::Local,
        "preferred" => NumaPolicy::Preferred,
        "interleave" => NumaPolicy::Interleave,
        "bind" => NumaPolicy::Bind,
        _ => return Err(bad()),
    };
    let nodes = match nodes {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|n| n.trim().parse::<u32>().map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(NumaConfig { policy, nodes })
}

fn absolute(p: &Path) -> Result<String, CliError> {
    let abs = std::path::absolute(p)
        .map_err(|e| CliError::Usage(format!("bad path {}: {e}", p.display())))?;
    abs.to_str()
        .map(str::to_string)
        .ok_or_else(|| CliError::Usage(format!("path {} is not UTF-8", abs.display())))
}

impl CreateArgs {
    /// The request these options describe (paths made absolute, since the daemon's working
    /// directory differs). Reads `--config` when given.
    pub fn to_request(&self) -> Result<CreateVmRequest, CliError> {
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("reading {}: {e}", path.display())))?;
            return serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())));
        }
        let memory = self
            .memory
            .as_deref()
            .ok_or_else(|| CliError::Usage("--memory is required".into()))?;
        let mut req = CreateVmRequest::with_memory(parse_size_mib(memory)?);
        req.vcpus = self.vcpus;
        req.kernel = self.kernel.as_deref().map(absolute).transpose()?;
        req.initrd = self.initrd.as_deref().map(absolute).transpose()?;
        req.cmdline = self.cmdline.clone();
        if let Some(image) = &self.image {
            let field = |v: &Option<String>, name: &str| {
                v.as_deref()
                    .ok_or_else(|| CliError::Usage(format!("--image needs --{name}")))
                    .and_then(parse_addr)
            };
            req.image = Some(RawImage {
                path: Some(absolute(image)?),
                inline: None,
                load_addr: field(&self.load_addr, "load-addr")?,
                entry: field(&self.entry, "entry")?,
                privilege: self.privilege.into(),
            });
        }
        if let Some(region) = &self.hotplug {
            req.hotplug = Some(HotplugConfig {
                region_mib: parse_size_mib(region)?,
                block_mib: parse_size_mib(&self.hotplug_block)?,
                memslots: Default::default(),
            });
        }
        if self.balloon
            || self.free_page_reporting
            || self.deflate_on_oom
            || self.free_page_hinting
            || self.stats_interval.is_some()
        {
            req.balloon = Some(BalloonConfig {
                free_page_reporting: self.free_page_reporting,
                deflate_on_oom: self.deflate_on_oom,
                stats_interval_s: self.stats_interval.unwrap_or(0),
                free_page_hinting: self.free_page_hinting,
            });
        }
        req.numa = self.numa.as_deref().map(parse_numa).transpose()?;
        if self.backing.is_some() || self.no_thp {
            let kind = match self.backing.unwrap_or(BackingArg::Anonymous) {
                BackingArg::Anonymous => BackingKind::Anonymous,
                BackingArg::Memfd => BackingKind::Memfd,
                BackingArg::Hugetlbfs => BackingKind::Hugetlbfs,
            };
            req.backing = Some(BackingConfig {
                kind,
                thp: !self.no_thp && kind != BackingKind::Hugetlbfs,
            });
        }
        req.start = !self.no_start;
        Ok(req)
    }
}

/// Options of the `serve` entry point, for the `tidepool` binary.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ServeArgs {
    /// Unix socket to create (mode 0600).
    #[arg(long, default_value = DEFAULT_SOCKET_PATH)]
    pub socket: PathBuf,
    /// Also listen on this loopback TCP address (needs --token-file).
    #[arg(long, requires = "token_file")]
    pub tcp: Option<SocketAddr>,
    /// File holding the bearer token for --tcp.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = DEFAULT_BODY_LIMIT)]
    pub body_limit: usize,
    /// Seconds a request waits for the VMM before answering 504.
    #[arg(long, default_value_t = DEFAULT_BACKEND_TIMEOUT.as_secs())]
    pub backend_timeout: u64,
    /// Requests per VM that may wait for it at once; more get 503.
    #[arg(long, default_value_t = DEFAULT_MAX_INFLIGHT_PER_VM)]
    pub max_inflight_per_vm: usize,
    /// Seconds a client gets to send a request's headers (also the idle keep-alive limit);
    /// the connection is closed after it.
    #[arg(long, default_value_t = DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    pub header_timeout: u64,
    /// Seconds a client gets to send a request's body after its headers; 408 after it.
    #[arg(long, default_value_t = DEFAULT_BODY_READ_TIMEOUT.as_secs())]
    pub body_timeout: u64,
}

impl ServeArgs {
    /// The server configuration.
    pub fn to_config(&self) -> Result<ServeConfig, CliError> {
        let tcp = match (&self.tcp, &self.token_file) {
            (Some(addr), Some(token_file)) => Some(TcpConfig {
                addr: *addr,
                token_file: token_file.clone(),
            }),
            (Some(_), None) => return Err(CliError::Usage("--tcp needs --token-file".into())),
            (None, _) => None,
        };
        Ok(ServeConfig {
            socket_path: self.socket.clone(),
            tcp,
            body_limit: self.body_limit,
            backend_timeout: Duration::from_secs(self.backend_timeout.max(1)),
            max_inflight_per_vm: self.max_inflight_per_vm,
            client_timeouts: ClientTimeouts {
                header_read: Duration::from_secs(self.header_timeout.max(1)),
                body_read: Duration::from_secs(self.body_timeout.max(1)),
            },
        })
    }
}
