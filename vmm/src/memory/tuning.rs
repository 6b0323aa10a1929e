//! Host-wide memory settings that a benchmark or test may change for a while, opt-in only:
//! `shmem_enabled` (so memfd mappings with `MADV_HUGEPAGE` get huge pages) and
//! `vm.nr_hugepages` (hugetlbfs pages). Each change is a [`HostSetting`] guard that writes the
//! previous value back when dropped, so the host is restored on success, on error and on panic.
//! The daemon itself never changes them.

use std::path::{Path, PathBuf};

use super::backing::SHMEM_ENABLED;

/// `vm.nr_hugepages`.
pub const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// A host setting changed until this guard is dropped (or [`HostSetting::restore`]d).
#[derive(Debug)]
pub struct HostSetting {
    path: PathBuf,
    previous: String,
    restored: bool,
}

impl HostSetting {
    /// Write `value` to `path`, remembering `previous` (the value to write back).
    fn change(path: &Path, previous: String, value: &str) -> std::io::Result<HostSetting> {
        std::fs::write(path, value)?;
        Ok(HostSetting {
            path: path.to_owned(),
            previous,
            restored: false,
        })
    }

    /// The value that will be written back.
    pub fn previous(&self) -> &str {
        &self.previous
    }

    /// Write the previous value back now.
    pub fn restore(mut self) -> std::io::Result<()> {
        self.restored = true;
        std::fs::write(&self.path, &self.previous)
    }
}

impl Drop for HostSetting {
    fn drop(&mut self) {
        if !self.restored {
            if let Err(e) = std::fs::write(&self.path, &self.previous) {
                tracing::error!(path = %self.path.display(), previous = %self.previous, error = %e,
                    "could not restore a host memory setting");
            }
        }
    }
}

/// The selected word of a sysfs choice file (`always [never] advise` gives `never`).
pub fn selected(choices: &str) -> Option<&str> {
    let start = choices.find('[')? + 1;
    let end = start + choices[start..].find(']')?;
    Some(&choices[start..end])
}

/// Set `shmem_enabled` to `advise` (root only) until the guard drops. Host-wide: every shmem
/// and memfd mapping with `MADV_HUGEPAGE` on this host may then get huge pages.
pub fn shmem_thp_advise() -> std::io::Result<HostSetting> {
    let now = std::fs::read_to_string(SHMEM_ENABLED)?;
    let previous = selected(&now)
        .ok_or_else(|| std::io::Error::other(format!("cannot parse {SHMEM_ENABLED}: {now:?}")))?
        .to_owned();
    HostSetting::change(Path::new(SHMEM_ENABLED), previous, "advise")
}

/// Free hugetlbfs pages of the default size (`HugePages_Free` in /proc/meminfo).
pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Raise `vm.nr_hugepages` by `extra` (root only) until the guard drops. Returns the guard and
/// the number of free huge pages afterwards (the kernel may find fewer than asked for).
pub fn reserve_hugepages(extra: u64) -> std::io::Result<(HostSetting, u64)> {
    let previous = std::fs::read_to_string(NR_HUGEPAGES)?.trim().to_owned();
    let now: u64 = previous
        .parse()
        .map_err(|_| std::io::Error::other(format!("cannot parse {NR_HUGEPAGES}: {previous:?}")))?;
    let guard = HostSetting::change(
        Path::new(NR_HUGEPAGES),
        previous,
        &(now + extra).to_string(),
    )?;
    Ok((guard, free_hugepages()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_word_of_a_choice_file() {
        assert_eq!(
            selected("always within_size advise [never] deny force\n"),
            Some("never")
        );
        assert_eq!(selected("[always] madvise never"), Some("always"));
        assert_eq!(selected("no brackets"), None);
    }
}
