//! The daemon's swap: one [`SwapFile`] shared by all VMs (created on the first VM that needs
//! it), a [`VmSwap`] per VM, and the quiesce hook the zero-page split runs under.
//!
//! Default file: `swap` in the daemon's runtime directory (the API socket's directory). A
//! swap file on tmpfs/ramfs would keep the "swapped" pages in RAM, so such a directory is
//! replaced by `/var/tmp/tidepool-<uid>/` ([`ram_fallback_path`], logged). The file's
//! capacity defaults to the pool's total size; it is capped by the free space of its file
//! system (logged).

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tidepool_api::metrics::SwapMetrics;

use super::VmManager;
use crate::devices::{lock, MmioBus};
use crate::microvm::{LifecycleOp, VmLifecycle};
use crate::reclaim::TargetError;
use crate::swap::{SwapError, SwapFile, SwapFileConfig, VmSwap};

/// File name of the daemon's swap file.
pub const SWAP_FILE_NAME: &str = "swap";
/// Longest time the quiesce hook keeps a VM paused.
const QUIESCE_LIMIT: Duration = Duration::from_secs(30);
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Swap settings of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSwapConfig {
    /// Swap at all (phases 3-4). Off: those phases answer unsupported.
    pub enabled: bool,
    /// The file; `None`: [`SWAP_FILE_NAME`] in the runtime directory (moved to
    /// `/var/tmp/tidepool-<uid>` when that directory is tmpfs or ramfs).
    pub path: Option<PathBuf>,
    /// The daemon's runtime directory (the socket's); `None`: [`default_runtime_dir`].
    pub runtime_dir: Option<PathBuf>,
    /// Capacity in bytes; `None`: the pool's total size.
    pub max_bytes: Option<u64>,
}

impl Default for DaemonSwapConfig {
    fn default() -> Self {
        DaemonSwapConfig {
            enabled: true,
            path: None,
            runtime_dir: None,
            max_bytes: None,
        }
    }
}

/// Why the daemon runs without swap.
#[derive(Debug, thiserror::Error)]
pub enum DaemonSwapError {
    /// The directory cannot be created or inspected.
    #[error("swap directory {path:?}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file system has no room for even one block.
    #[error("swap directory {path:?} has only {free} bytes free")]
    NoSpace {
        /// The directory.
        path: PathBuf,
        /// Free bytes.
        free: u64,
    },
    /// Creating the file failed.
    #[error(transparent)]
    File(#[from] SwapError),
}

/// The default runtime directory of a daemon run by this user (where `tidepool up` puts its
/// socket).
pub fn default_runtime_dir() -> PathBuf {
    let sock = crate::up::paths::default_socket_here();
    sock.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn statfs(dir: &Path) -> Result<(i64, u64), std::io::Error> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs only writes the struct we pass; all-zero is a valid value for it.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `s` a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    let free = (s.f_bavail as u64).saturating_mul(s.f_bsize as u64);
    #[allow(clippy::unnecessary_cast)]
    Ok((s.f_type as i64, free))
}

/// Where the swap file goes when the daemon's runtime directory is in RAM (tmpfs, ramfs):
/// `/var/tmp/tidepool-<uid>/swap-<hash of the runtime directory>`. One daemon runs per
/// runtime directory (its socket is there), so daemons never share a file; a file left by a
/// daemon that crashed is reused by the next one in the same directory.
pub fn ram_fallback_path(runtime_dir: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    // FNV-1a, stable across runs and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in runtime_dir.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    PathBuf::from(format!("/var/tmp/tidepool-{uid}")).join(format!("{SWAP_FILE_NAME}-{h:016x}"))
}

/// Where the file goes and how large it may grow, checked against its directory.
fn plan(cfg: &DaemonSwapConfig, pool_bytes: u64) -> Result<SwapFileConfig, DaemonSwapError> {
    plan_with(cfg, pool_bytes, &statfs, &ram_fallback_path)
}

/// `(f_type, free bytes)` of a directory.
type FsProbe<'a> = dyn Fn(&Path) -> Result<(i64, u64), std::io::Error> + 'a;

/// [`plan`] with the file system probe (`(f_type, free bytes)` of a directory) and the
/// fallback for a runtime directory in RAM given (tests inject a tmpfs).
fn plan_with(
    cfg: &DaemonSwapConfig,
    pool_bytes: u64,
    statfs: &FsProbe<'_>,
    fallback: &dyn Fn(&Path) -> PathBuf,
) -> Result<SwapFileConfig, DaemonSwapError> {
    let mut path = cfg.path.clone().unwrap_or_else(|| {
        cfg.runtime_dir
            .clone()
            .unwrap_or_else(default_runtime_dir)
            .join(SWAP_FILE_NAME)
    });
    let dir_of = |p: &Path| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let mkdir = |d: &Path| {
        std::fs::create_dir_all(d).map_err(|source| DaemonSwapError::Dir {
            path: d.to_path_buf(),
            source,
        })
    };
    let mut dir = dir_of(&path);
    mkdir(&dir)?;
    let stat = |d: &Path| {
        statfs(d).map_err(|source| DaemonSwapError::Dir {
            path: d.to_path_buf(),
            source,
        })
    };
    let (mut fs, mut free) = stat(&dir)?;
    if cfg.path.is_none() && (fs == TMPFS_MAGIC || fs == RAMFS_MAGIC) {
        let alt = fallback(&dir);
        let alt_dir = dir_of(&alt);
        tracing::info!(runtime_dir = ?dir, swap = ?alt, "the runtime directory is in RAM (tmpfs): swap goes to disk instead");
        mkdir(&alt_dir)?;
        path = alt;
        dir = alt_dir;
        (fs, free) = stat(&dir)?;
    }
    if fs == TMPFS_MAGIC || fs == RAMFS_MAGIC {
        tracing::warn!(path = ?path, "the swap file is on tmpfs/ramfs: swapped pages stay in RAM");
    }
    let want = cfg.max_bytes.unwrap_or(pool_bytes);
    // Leave a tenth of the free space to everything else on that file system.
    let room = free - free / 10;
    if room < (2 << 20) {
        return Err(DaemonSwapError::NoSpace { path: dir, free });
    }
    let capacity = if want > room {
        tracing::warn!(path = ?path, wanted = want, capped = room, "swap file capped by the free space of its file system");
        room
    } else {
        want
    };
    Ok(SwapFileConfig::new(path, capacity))
}

/// The daemon's swap file, created on first use.
#[derive(Debug)]
pub(super) struct DaemonSwap {
    cfg: DaemonSwapConfig,
    pool_bytes: u64,
    /// `None`: not tried yet; `Some(None)`: failed (logged once).
    file: Mutex<Option<Option<Arc<SwapFile>>>>,
}

impl DaemonSwap {
    pub(super) fn new(cfg: DaemonSwapConfig, pool_bytes: u64) -> DaemonSwap {
        DaemonSwap {
            cfg,
            pool_bytes,
            file: Mutex::new(None),
        }
    }

    /// The file, created now if this is the first call.
    pub(super) fn file(&self) -> Option<Arc<SwapFile>> {
        if !self.cfg.enabled {
            return None;
        }
        let mut f = lock(&self.file);
        if let Some(done) = f.as_ref() {
            return done.clone();
        }
        let made = plan(&self.cfg, self.pool_bytes)
            .and_then(|c| SwapFile::create(c).map_err(DaemonSwapError::from));
        let r = match made {
            Ok(file) => {
                tracing::info!(path = ?file.path(), capacity = file.counters().slots_total as u64 * 4096, io = ?file.io_mode(), "swap file created");
                Some(Arc::new(file))
            }
            Err(e) => {
                tracing::error!(error = %e, "no swap: reclaim phases 3-4 answer unsupported");
                None
            }
        };
        *f = Some(r.clone());
        r
    }

    /// The file if it exists (never creates it).
    pub(super) fn existing(&self) -> Option<Arc<SwapFile>> {
        lock(&self.file).as_ref().and_then(|f| f.clone())
    }
}

/// File figures for `GET /metrics`.
pub(super) fn swap_metrics(file: &SwapFile) -> SwapMetrics {
    let c = file.counters();
    SwapMetrics {
        capacity_bytes: u64::from(c.slots_total) * 4096,
        used_bytes: u64::from(c.slots_used) * 4096,
        bytes_written: c.bytes_written,
        bytes_read: c.bytes_read,
        writes: c.writes,
        reads: c.reads,
        clusters: c.clusters,
        write_errors: c.write_errors,
        read_errors: c.read_errors,
        throttle_events: c.throttle_events,
        congested: c.congested,
    }
}

/// The quiesce hook of VM `id`: pauses its vCPUs on the VM thread (which then waits, so no
/// lifecycle request can resume them meanwhile) and holds every device transport's lock,
/// so the notifier thread cannot complete a request (write a used ring) during the scan.
pub(super) fn quiesce_hook(
    manager: Weak<VmManager>,
    id: String,
    bus: Arc<MmioBus>,
) -> Box<crate::reclaim::QuiesceFn> {
    Box::new(move |scan: &mut dyn FnMut()| {
        let m = manager.upgrade().ok_or(TargetError::Gone)?;
        let (paused_tx, paused_rx) = sync_channel::<Result<(), String>>(1);
        let (done_tx, done_rx) = sync_channel::<()>(1);
        m.post(&id, move |vm| {
            let we_paused = match vm.state() {
                VmLifecycle::Running => match vm.apply(LifecycleOp::Pause) {
                    Ok(_) => true,
                    Err(e) => {
                        let _ = paused_tx.send(Err(e.to_string()));
                        return;
                    }
                },
                // Created, paused, stopped, failed: no vCPU runs.
                _ => false,
            };
            if paused_tx.send(Ok(())).is_err() {
                // The engine gave up: fall through to resume.
            } else {
                // Ok or disconnected (the engine's closure ended or failed): resume either way.
                let _ = done_rx.recv_timeout(QUIESCE_LIMIT);
            }
            if we_paused {
                if let Err(e) = vm.apply(LifecycleOp::Resume) {
                    tracing::error!(vm = %vm.id(), error = %e, "resume after the zero-page scan failed");
                }
            }
        })
        .map_err(|e| TargetError::Failed(e.to_string()))?;
        drop(m);
        match paused_rx.recv_timeout(QUIESCE_LIMIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(TargetError::Failed(format!("pause: {e}"))),
            Err(_) => return Err(TargetError::Failed("the VM thread did not pause".into())),
        }
        {
            // A failed VM's device held for good (see swap::guard) ends the quiesce.
            let guards: Option<Vec<_>> = bus
                .slots()
                .iter()
                .map(|s| bus.lock_live(&s.transport))
                .collect();
            match guards {
                Some(_guards) => scan(),
                None => {
                    let _ = done_tx.send(());
                    return Err(TargetError::Gone);
                }
            }
        }
        let _ = done_tx.send(());
        Ok(())
    })
}

/// Error hook of a VM's swap, run on its fault handler thread the moment a swap-in failed,
/// before any faulting thread is woken (so it must not wait for anything): marks the VM's
/// devices failed (nobody waits for a device lock any more: the faulting thread may be a
/// device model that will be parked holding one, see `swap::guard`), publishes the failure
/// (the API reports the VM stopped with the reason at once) and asks the VM thread to stop
/// the vCPUs, set the state and leave the reclaim engine.
pub(super) fn failure_hook(
    vm_swap: &VmSwap,
    id: &str,
    bus: Arc<MmioBus>,
    published: Arc<Mutex<super::Published>>,
    manager: Weak<VmManager>,
) {
    let id = id.to_string();
    vm_swap.set_failure_hook(move |f| {
        bus.mark_failed();
        let reason = format!(
            "swap-in of guest page {:#x} failed: {}",
            f.gpa, f.error
        );
        tracing::error!(vm = %id, gpa = format_args!("{:#x}", f.gpa), error = %f.error, "swap-in failed: the VM cannot continue; stopping it");
        {
            let mut p = lock(&published);
            if p.failure.is_none() {
                p.failure = Some(reason.clone());
            }
        }
        let Some(m) = manager.upgrade() else {
            return;
        };
        let weak = manager.clone();
        let vm_id = id.clone();
        let posted = m.post(&id, move |vm| {
            vm.fail(&reason);
            if let Some(m) = weak.upgrade() {
                m.reclaim_detach(&vm_id);
            }
        });
        if let Err(e) = posted {
            tracing::warn!(vm = %id, error = %e, "cannot reach the VM thread to stop the failed VM");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_caps_by_free_space_and_reports_bad_dirs() {
        let dir = std::env::temp_dir().join(format!("tp-dswap-plan-{}", std::process::id()));
        let cfg = DaemonSwapConfig {
            enabled: true,
            path: Some(dir.join("sub").join("swap")),
            runtime_dir: None,
            max_bytes: Some(64 << 20),
        };
        let p = plan(&cfg, 1 << 30).expect("plan");
        assert_eq!(p.capacity, 64 << 20);
        assert!(dir.join("sub").is_dir(), "the directory is created");
        let huge = DaemonSwapConfig {
            max_bytes: Some(u64::MAX / 2),
            ..cfg.clone()
        };
        let p = plan(&huge, 1 << 30).expect("plan");
        assert!(p.capacity < u64::MAX / 2, "capped by free space");
        // A directory below a regular file cannot exist.
        std::fs::write(dir.join("file"), b"x").expect("file");
        let bad = DaemonSwapConfig {
            path: Some(dir.join("file").join("swap")),
            ..cfg
        };
        assert!(matches!(
            plan(&bad, 1 << 30),
            Err(DaemonSwapError::Dir { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_runtime_dir_in_ram_sends_the_default_file_to_disk() {
        let root = std::env::temp_dir().join(format!("tp-dswap-ram-{}", std::process::id()));
        let ram = root.join("run");
        let disk = root.join("disk");
        // The runtime directory reports tmpfs, everything else is the real file system.
        let fake = |d: &Path| -> Result<(i64, u64), std::io::Error> {
            let (fs, free) = statfs(d)?;
            Ok((if d.starts_with(&ram) { TMPFS_MAGIC } else { fs }, free))
        };
        let fallback = |rt: &Path| disk.join(ram_fallback_path(rt).file_name().unwrap_or_default());
        let cfg = DaemonSwapConfig {
            enabled: true,
            path: None,
            runtime_dir: Some(ram.clone()),
            max_bytes: Some(8 << 20),
        };
        let p = plan_with(&cfg, 1 << 30, &fake, &fallback).expect("plan");
        assert!(p.path.starts_with(&disk), "{:?}", p.path);
        assert!(disk.is_dir(), "the fallback directory is created");
        assert_eq!(p.capacity, 8 << 20);
        // Not on tmpfs: the default stays in the runtime directory.
        let on_disk = DaemonSwapConfig {
            runtime_dir: Some(root.join("rundisk")),
            ..cfg.clone()
        };
        let p = plan_with(&on_disk, 1 << 30, &fake, &fallback).expect("plan");
        assert_eq!(p.path, root.join("rundisk").join(SWAP_FILE_NAME));
        // An explicit path is kept even on tmpfs (with a warning).
        let explicit = DaemonSwapConfig {
            path: Some(ram.join("myswap")),
            ..cfg
        };
        let p = plan_with(&explicit, 1 << 30, &fake, &fallback).expect("plan");
        assert_eq!(p.path, ram.join("myswap"));
        // The real fallback: per user and per runtime directory, under /var/tmp.
        let a = ram_fallback_path(Path::new("/run/a"));
        let b = ram_fallback_path(Path::new("/run/b"));
        assert_ne!(a, b);
        assert_eq!(a, ram_fallback_path(Path::new("/run/a")));
        assert!(a.starts_with("/var/tmp"), "{a:?}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
