//! Where `tidepool up` puts things: the API socket, the cache, the guest image, and the
//! embedded copies of the shell scripts it runs (so it works from any checkout or install).

use std::path::{Path, PathBuf};

/// The socket's file name inside its directory.
pub const SOCKET_NAME: &str = "tidepool.sock";

/// The default socket path: `$XDG_RUNTIME_DIR/tidepool/tidepool.sock` when that variable is
/// an absolute path, else `/run/tidepool/tidepool.sock` for root, else
/// `/tmp/tidepool-$UID/tidepool.sock`.
pub fn default_socket(xdg_runtime_dir: Option<&str>, uid: u32) -> PathBuf {
    match xdg_runtime_dir {
        Some(d) if Path::new(d).is_absolute() => Path::new(d).join("tidepool").join(SOCKET_NAME),
        _ if uid == 0 => PathBuf::from("/run/tidepool").join(SOCKET_NAME),
        _ => PathBuf::from(format!("/tmp/tidepool-{uid}")).join(SOCKET_NAME),
    }
}

/// [`default_socket`] for this process.
pub fn default_socket_here() -> PathBuf {
    let xdg = std::env::var("XDG_RUNTIME_DIR").ok();
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    default_socket(xdg.as_deref(), uid)
}

/// The socket a client command uses: `given`, unless it is the `tidepool serve` default
/// (`/run/tidepool/api.sock`, i.e. no `--socket`), no socket is there, and `tidepool up`'s
/// default socket exists; then that one.
pub fn client_socket(given: &Path) -> PathBuf {
    choose_client_socket(given, &default_socket_here(), |p| p.exists())
}

/// [`client_socket`] with the `up` socket and the existence test given.
pub fn choose_client_socket(
    given: &Path,
    up_socket: &Path,
    exists: impl Fn(&Path) -> bool,
) -> PathBuf {
    let serve_default = Path::new(tidepool_api::server::DEFAULT_SOCKET_PATH);
    if given == serve_default && !exists(given) && exists(up_socket) {
        up_socket.to_path_buf()
    } else {
        given.to_path_buf()
    }
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/tidepool`, as the scripts compute it.
pub fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("tidepool")
}

/// The files of a built guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The directory.
    pub dir: PathBuf,
    /// The ELF kernel (PVH entry).
    pub vmlinux: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// The kernel command line the image expects.
    pub cmdline: String,
}

impl GuestImage {
    /// The image in `dir`, if its files are all there.
    pub fn open(dir: &Path) -> Option<GuestImage> {
        let vmlinux = dir.join("vmlinux");
        let initramfs = dir.join("initramfs.cpio.gz");
        if !vmlinux.is_file() || !initramfs.is_file() {
            return None;
        }
        let cmdline = std::fs::read_to_string(dir.join("cmdline")).ok()?;
        Some(GuestImage {
            dir: dir.to_path_buf(),
            vmlinux,
            initramfs,
            cmdline: cmdline.trim().to_string(),
        })
    }
}

/// The default guest's directory, `<cache>/guest/current`.
pub fn guest_current() -> PathBuf {
    cache_root().join("guest").join("current")
}

/// One embedded script file: its path under `resources/` and its text.
pub type Embedded = (&'static str, &'static str);

/// The guest builder and what it reads (`resources/guest/build.sh` runs from this tree).
pub const GUEST_SCRIPTS: &[Embedded] = &[
    (
        "guest/build.sh",
        include_str!("../../../resources/guest/build.sh"),
    ),
    ("guest/init", include_str!("../../../resources/guest/init")),
    (
        "guest/tp-mem.c",
        include_str!("../../../resources/guest/tp-mem.c"),
    ),
    (
        "lib/debian-kernel.sh",
        include_str!("../../../resources/lib/debian-kernel.sh"),
    ),
    (
        "ci/install-deps.sh",
        include_str!("../../../resources/ci/install-deps.sh"),
    ),
];

/// The nested harness and what it reads.
pub const NESTED_SCRIPTS: &[Embedded] = &[
    (
        "nested/run-l1.sh",
        include_str!("../../../resources/nested/run-l1.sh"),
    ),
    (
        "nested/l1-init",
        include_str!("../../../resources/nested/l1-init"),
    ),
    (
        "lib/debian-kernel.sh",
        include_str!("../../../resources/lib/debian-kernel.sh"),
    ),
];

/// Writes `files` under `<cache>/up/resources-<hash>/` (executable, so scripts run) and
/// returns that `resources` directory. The same contents give the same directory, so
/// re-running writes nothing new; the scripts' own cache keys hash the same bytes as in the
/// source tree.
pub fn materialize(files: &[Embedded]) -> std::io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (p, t) in files {
        p.hash(&mut h);
        t.hash(&mut h);
    }
    let root = cache_root()
        .join("up")
        .join(format!("resources-{:016x}", h.finish()));
    for (rel, text) in files {
        let dest = root.join(rel);
        if std::fs::read_to_string(&dest).is_ok_and(|t| t == *text) {
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &dest)?;
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_prefers_the_runtime_dir() {
        assert_eq!(
            default_socket(Some("/run/user/1000"), 1000),
            PathBuf::from("/run/user/1000/tidepool/tidepool.sock")
        );
        // root with a runtime dir still uses it
        assert_eq!(
            default_socket(Some("/run/user/0"), 0),
            PathBuf::from("/run/user/0/tidepool/tidepool.sock")
        );
    }

    #[test]
    fn socket_fallbacks() {
        assert_eq!(
            default_socket(None, 0),
            PathBuf::from("/run/tidepool/tidepool.sock")
        );
        assert_eq!(
            default_socket(None, 1000),
            PathBuf::from("/tmp/tidepool-1000/tidepool.sock")
        );
        // empty or relative XDG_RUNTIME_DIR is ignored (the spec says so)
        assert_eq!(
            default_socket(Some(""), 1000),
            PathBuf::from("/tmp/tidepool-1000/tidepool.sock")
        );
        assert_eq!(
            default_socket(Some("rel/dir"), 0),
            PathBuf::from("/run/tidepool/tidepool.sock")
        );
    }

    #[test]
    fn clients_fall_back_to_the_up_socket() {
        let serve = Path::new(tidepool_api::server::DEFAULT_SOCKET_PATH);
        let up = Path::new("/run/user/1/tidepool/tidepool.sock");
        let only_up = |p: &Path| p == up;
        assert_eq!(choose_client_socket(serve, up, only_up), up);
        // a daemon at the serve default wins
        assert_eq!(choose_client_socket(serve, up, |_| true), serve);
        // no up socket either: keep the default (the error names it)
        assert_eq!(choose_client_socket(serve, up, |_| false), serve);
        // an explicit --socket is never replaced
        let mine = Path::new("/tmp/x.sock");
        assert_eq!(choose_client_socket(mine, up, only_up), mine);
    }

    #[test]
    fn guest_image_needs_all_files() {
        let d = std::env::temp_dir().join(format!("tp-up-guest-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert!(GuestImage::open(&d).is_none());
        std::fs::write(d.join("vmlinux"), b"x").unwrap();
        std::fs::write(d.join("initramfs.cpio.gz"), b"x").unwrap();
        assert!(GuestImage::open(&d).is_none(), "cmdline missing");
        std::fs::write(d.join("cmdline"), "console=ttyS0\n").unwrap();
        let g = GuestImage::open(&d).unwrap();
        assert_eq!(g.cmdline, "console=ttyS0");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn embedded_scripts_are_the_tree_s() {
        assert!(GUEST_SCRIPTS[0].1.starts_with("#!/usr/bin/env bash"));
        assert!(NESTED_SCRIPTS[0].1.contains("--qemu-arg"));
    }
}
