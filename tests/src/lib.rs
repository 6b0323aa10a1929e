//! Shared helpers for Tidepool's cross-crate integration tests: where the workspace and the
//! guest-image cache are, building the default guest image when it is missing, and the `tidepool`
//! binary (of the profile the tests were built with) that the stock-Linux (tier 3) tests run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Whether an executable called `name` is on `PATH`.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Tidepool's cache directory (`$XDG_CACHE_HOME/tidepool`, else `~/.cache/tidepool`).
pub fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("tidepool")
}

/// The default guest image directory, built with `resources/guest/build.sh` when it is missing.
/// `Err` says why it cannot be had here (the caller skips and prints it).
pub fn guest_image(root: &Path) -> Result<PathBuf, String> {
    let current = cache_root().join("guest").join("current");
    let ready = |d: &Path| {
        ["vmlinux", "initramfs.cpio.gz", "cmdline"]
            .iter()
            .all(|f| d.join(f).is_file())
    };
    if ready(&current) {
        return Ok(current);
    }
    eprintln!("guest image missing, running resources/guest/build.sh");
    let out = Command::new(root.join("resources/guest/build.sh"))
        .output()
        .map_err(|e| format!("cannot run resources/guest/build.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "resources/guest/build.sh failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    if ready(&current) {
        Ok(current)
    } else {
        Err(format!(
            "build.sh succeeded but {} is incomplete",
            current.display()
        ))
    }
}

/// The `tidepool` binary of the cargo profile this test was built with (the release profile
/// for `cargo test --release`, `target/ci/` for CI's `cargo test --profile ci`):
/// `TIDEPOOL_BIN` if set, else built with cargo next to this test binary.
///
/// The build selects what `cargo test --workspace` selects (every member, its binaries and
/// tests), so dependency features unify the same way and the build is a no-op right after
/// `cargo test --workspace`. Building only `-p tidepool-vmm --bin tidepool` would leave out
/// the dev-dependencies' features (jsonschema, proptest turn on features of syn, zerocopy,
/// regex-syntax and others), which recompiles the binary and much of its dependency tree.
pub fn tidepool_binary(root: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("TIDEPOOL_BIN") {
        return PathBuf::from(p);
    }
    // Test binaries run from `<target dir>/<profile dir>/deps/`.
    let exe = std::env::current_exe().expect("path of this test binary");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(name) => name.to_string(),
        None => panic!("no profile directory above {}", exe.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--profile",
            &profile,
            "--workspace",
            "--bins",
            "--tests",
        ])
        .status()
        .expect("run cargo build for the tidepool binary");
    assert!(
        status.success(),
        "cargo build of the tidepool binary failed"
    );
    let bin = profile_dir.join("tidepool");
    assert!(bin.is_file(), "{} missing after cargo build", bin.display());
    bin
}
