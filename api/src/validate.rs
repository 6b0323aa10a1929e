//! Pure validation of request bodies and ids. Runs before the backend is called, so a bad
//! request changes nothing. Each check has a unit test.

use crate::error::ApiError;
use crate::types::{
    BackingKind, BalloonRequest, CreateVmRequest, HotplugConfig, NumaConfig, NumaPolicy, RawImage,
    ResizeRequest,
};

/// Largest vCPU count accepted.
pub const MAX_VCPUS: u32 = 254;
/// Largest memory size accepted anywhere in the API (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Linux memory block size on x86_64 with less than 64 GiB of boot RAM; hotplug regions are
/// multiples of it.
pub const MEMORY_BLOCK_MIB: u64 = 128;
/// Longest kernel command line accepted.
pub const MAX_CMDLINE_LEN: usize = 4096;
/// Longest path accepted.
pub const MAX_PATH_LEN: usize = 4096;
/// Largest inline raw image accepted.
pub const MAX_INLINE_IMAGE: usize = 256 * 1024;
/// Longest VM id.
pub const MAX_ID_LEN: usize = 64;
/// Highest NUMA node id accepted.
pub const MAX_NUMA_NODE: u32 = 1023;
/// Longest balloon statistics interval.
pub const MAX_STATS_INTERVAL_S: u32 = 3600;

/// Why a request is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// Bad VM id.
    #[error("invalid VM id {0:?}: use 1-64 characters from [A-Za-z0-9_-]")]
    BadId(String),
    /// vCPU count out of range.
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u32),
    /// A memory size out of range or misaligned.
    #[error("{field} must be {rule}, got {value}")]
    Size {
        /// Field name.
        field: &'static str,
        /// The rule broken.
        rule: &'static str,
        /// The value given.
        value: u64,
    },
    /// A string field is empty, too long or contains NUL.
    #[error("{field} must be a non-empty string of at most {max} bytes without NUL")]
    BadString {
        /// Field name.
        field: &'static str,
        /// Maximum length.
        max: usize,
    },
    /// Two fields that exclude each other.
    #[error("{0} and {1} cannot be used together")]
    Exclusive(&'static str, &'static str),
    /// A field needs another one.
    #[error("{0} needs {1}")]
    Needs(&'static str, &'static str),
    /// Raw image problems.
    #[error("image: {0}")]
    Image(&'static str),
    /// NUMA problems.
    #[error("numa: {0}")]
    Numa(&'static str),
    /// Balloon stats interval too long.
    #[error("balloon.stats_interval_s must be at most {MAX_STATS_INTERVAL_S}, got {0}")]
    StatsInterval(u32),
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

/// A VM id: 1-64 characters from `[A-Za-z0-9_-]`.
pub fn vm_id(id: &str) -> Result<(), ValidationError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadId(id.chars().take(80).collect()))
    }
}

fn string(field: &'static str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > max || s.contains('\0') {
        return Err(ValidationError::BadString { field, max });
    }
    Ok(())
}

fn mib(field: &'static str, value: u64, min: u64) -> Result<(), ValidationError> {
    if value < min || value > MAX_MEMORY_MIB {
        return Err(ValidationError::Size {
            field,
            rule: "within the accepted range (see the API documentation)",
            value,
        });
    }
    Ok(())
}

fn hotplug(h: &HotplugConfig) -> Result<(), ValidationError> {
    if !h.block_mib.is_power_of_two() || h.block_mib < 2 || h.block_mib > MEMORY_BLOCK_MIB {
        return Err(ValidationError::Size {
            field: "hotplug.block_mib",
            rule: "a power of two between 2 and 128",
            value: h.block_mib,
        });
    }
    if h.region_mib == 0 || h.region_mib % MEMORY_BLOCK_MIB != 0 || h.region_mib > MAX_MEMORY_MIB {
        return Err(ValidationError::Size {
            field: "hotplug.region_mib",
            rule: "a non-zero multiple of 128 of at most 1048576",
            value: h.region_mib,
        });
    }
    Ok(())
}

fn image(img: &RawImage, memory_mib: u64) -> Result<(), ValidationError> {
    let len = match (&img.path, &img.inline) {
        (Some(_), Some(_)) => return Err(ValidationError::Exclusive("image.path", "image.inline")),
        (None, None) => return Err(ValidationError::Image("give path or inline")),
        (Some(p), None) => {
            string("image.path", p, MAX_PATH_LEN)?;
            None
        }
        (None, Some(bytes)) => {
            if bytes.is_empty() || bytes.len() > MAX_INLINE_IMAGE {
                return Err(ValidationError::Image(
                    "inline must hold between 1 byte and 256 KiB",
                ));
            }
            Some(bytes.len() as u64)
        }
    };
    let mem_bytes = memory_mib << 20;
    if img.entry < img.load_addr {
        return Err(ValidationError::Image("entry lies below load_addr"));
    }
    if img.load_addr >= mem_bytes || img.entry >= mem_bytes {
        return Err(ValidationError::Image(
            "load_addr and entry must lie in boot RAM",
        ));
    }
    if let Some(len) = len {
        let end = img.load_addr.saturating_add(len);
        if end > mem_bytes {
            return Err(ValidationError::Image("image does not fit in boot RAM"));
        }
        if img.entry >= end {
            return Err(ValidationError::Image("entry lies outside the image"));
        }
    }
    Ok(())
}

fn numa(n: &NumaConfig) -> Result<(), ValidationError> {
    if n.nodes.iter().any(|&x| x > MAX_NUMA_NODE) {
        return Err(ValidationError::Numa("node id out of range"));
    }
    let mut sorted = n.nodes.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != n.nodes.len() {
        return Err(ValidationError::Numa("duplicate node"));
    }
    match n.policy {
        NumaPolicy::Local if !n.nodes.is_empty() => {
            Err(ValidationError::Numa("local takes no nodes"))
        }
        NumaPolicy::Preferred if n.nodes.len() != 1 => {
            Err(ValidationError::Numa("preferred takes exactly one node"))
        }
        NumaPolicy::Interleave | NumaPolicy::Bind if n.nodes.is_empty() => Err(
            ValidationError::Numa("interleave and bind need at least one node"),
        ),
        _ => Ok(()),
    }
}

/// Validates a `POST /v1/vms` body.
pub fn create_vm(r: &CreateVmRequest) -> Result<(), ValidationError> {
    if r.vcpus == 0 || r.vcpus > MAX_VCPUS {
        return Err(ValidationError::Vcpus(r.vcpus));
    }
    mib("memory_mib", r.memory_mib, 2)?;
    if r.memory_mib % 2 != 0 {
        return Err(ValidationError::Size {
            field: "memory_mib",
            rule: "a multiple of 2",
            value: r.memory_mib,
        });
    }
    if let Some(k) = &r.kernel {
        string("kernel", k, MAX_PATH_LEN)?;
    }
    if let Some(i) = &r.initrd {
        string("initrd", i, MAX_PATH_LEN)?;
        if r.kernel.is_none() {
            return Err(ValidationError::Needs("initrd", "kernel"));
        }
    }
    if let Some(c) = &r.cmdline {
        if c.len() > MAX_CMDLINE_LEN || c.contains('\0') {
            return Err(ValidationError::BadString {
                field: "cmdline",
                max: MAX_CMDLINE_LEN,
            });
        }
        if r.kernel.is_none() {
            return Err(ValidationError::Needs("cmdline", "kernel"));
        }
    }
    if let Some(img) = &r.image {
        if r.kernel.is_some() {
            return Err(ValidationError::Exclusive("image", "kernel"));
        }
        image(img, r.memory_mib)?;
    }
    if let Some(h) = &r.hotplug {
        hotplug(h)?;
        if r.memory_mib.saturating_add(h.region_mib) > MAX_MEMORY_MIB {
            return Err(ValidationError::Size {
                field: "memory_mib + hotplug.region_mib",
                rule: "at most 1048576",
                value: r.memory_mib.saturating_add(h.region_mib),
            });
        }
    }
    if let Some(b) = &r.balloon {
        if b.stats_interval_s > MAX_STATS_INTERVAL_S {
            return Err(ValidationError::StatsInterval(b.stats_interval_s));
        }
    }
    if let Some(n) = &r.numa {
        numa(n)?;
    }
    if let Some(b) = &r.backing {
        if b.kind == BackingKind::Hugetlbfs && b.thp {
            return Err(ValidationError::Exclusive("backing.kind=hugetlbfs", "thp"));
        }
    }
    Ok(())
}

/// Validates a `PUT /v1/vms/{id}/memory` body. State-dependent limits (boot RAM, region size,
/// block alignment) are the backend's to check.
pub fn resize(r: &ResizeRequest) -> Result<(), ValidationError> {
    mib("requested_mib", r.requested_mib, 2)
}

/// Validates a `PUT /v1/vms/{id}/balloon` body.
pub fn balloon(r: &BalloonRequest) -> Result<(), ValidationError> {
    mib("target_mib", r.target_mib, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{BackingConfig, BalloonConfig, ImagePrivilege};

    fn base() -> CreateVmRequest {
        CreateVmRequest::with_memory(256)
    }

    #[test]
    fn ids() {
        assert!(vm_id("vm-1").is_ok());
        assert!(vm_id("A_b-9").is_ok());
        assert!(vm_id(&"a".repeat(64)).is_ok());
        assert!(vm_id("").is_err());
        assert!(vm_id(&"a".repeat(65)).is_err());
        assert!(vm_id("a/b").is_err());
        assert!(vm_id("..").is_err());
        assert!(vm_id("é").is_err());
    }

    #[test]
    fn vcpus_and_memory() {
        assert!(create_vm(&base()).is_ok());
        let mut r = base();
        r.vcpus = 0;
        assert_eq!(create_vm(&r), Err(ValidationError::Vcpus(0)));
        r.vcpus = MAX_VCPUS + 1;
        assert!(create_vm(&r).is_err());
        let mut r = base();
        r.memory_mib = 0;
        assert!(create_vm(&r).is_err());
        r.memory_mib = 3;
        assert!(create_vm(&r).is_err());
        r.memory_mib = MAX_MEMORY_MIB + 2;
        assert!(create_vm(&r).is_err());
        r.memory_mib = u64::MAX;
        assert!(create_vm(&r).is_err());
    }

    #[test]
    fn boot_source_rules() {
        let mut r = base();
        r.initrd = Some("/i".into());
        assert_eq!(
            create_vm(&r),
            Err(ValidationError::Needs("initrd", "kernel"))
        );
        r.kernel = Some("/k".into());
        assert!(create_vm(&r).is_ok());
        r.cmdline = Some("console=ttyS0".into());
        assert!(create_vm(&r).is_ok());
        r.cmdline = Some("x".repeat(MAX_CMDLINE_LEN + 1));
        assert!(create_vm(&r).is_err());
        r.cmdline = Some("a\0b".into());
        assert!(create_vm(&r).is_err());
        let mut r = base();
        r.kernel = Some(String::new());
        assert!(create_vm(&r).is_err());
        let mut r = base();
        r.cmdline = Some("quiet".into());
        assert!(create_vm(&r).is_err());
    }

    #[test]
    fn raw_images() {
        let img = |path: Option<&str>, inline: Option<Vec<u8>>, load: u64, entry: u64| RawImage {
            path: path.map(str::to_string),
            inline,
            load_addr: load,
            entry,
            privilege: ImagePrivilege::User,
        };
        let mut r = base();
        r.image = Some(img(None, Some(vec![0xf4; 16]), 0x10000, 0x10000));
        assert!(create_vm(&r).is_ok());
        r.image = Some(img(Some("/x"), None, 0x10000, 0x10004));
        assert!(create_vm(&r).is_ok());
        r.image = Some(img(Some("/x"), Some(vec![1]), 0, 0));
        assert!(create_vm(&r).is_err());
        r.image = Some(img(None, None, 0, 0));
        assert!(create_vm(&r).is_err());
        r.image = Some(img(None, Some(vec![]), 0, 0));
        assert!(create_vm(&r).is_err());
        r.image = Some(img(None, Some(vec![1; 16]), 0x1000, 0x0fff));
        assert!(create_vm(&r).is_err());
        r.image = Some(img(None, Some(vec![1; 16]), 0x1000, 0x1010));
        assert!(create_vm(&r).is_err(), "entry past the image end");
        r.image = Some(img(
            None,
            Some(vec![1; 16]),
            (256 << 20) - 8,
            (256 << 20) - 8,
        ));
        assert!(create_vm(&r).is_err(), "image past the end of RAM");
        r.image = Some(img(Some("/x"), None, u64::MAX, u64::MAX));
        assert!(create_vm(&r).is_err());
        r.image = Some(img(Some("/x"), None, 0, 0));
        r.kernel = Some("/k".into());
        assert!(create_vm(&r).is_err());
    }

    #[test]
    fn hotplug_rules() {
        let mut r = base();
        r.hotplug = Some(HotplugConfig {
            region_mib: 1024,
            block_mib: 2,
            memslots: Default::default(),
        });
        assert!(create_vm(&r).is_ok());
        for (region, block) in [(100, 2), (0, 2), (1024, 3), (1024, 256), (1024, 1)] {
            r.hotplug = Some(HotplugConfig {
                region_mib: region,
                block_mib: block,
                memslots: Default::default(),
            });
            assert!(create_vm(&r).is_err(), "{region} {block}");
        }
        r.hotplug = Some(HotplugConfig {
            region_mib: MAX_MEMORY_MIB,
            block_mib: 2,
            memslots: Default::default(),
        });
        assert!(create_vm(&r).is_err(), "boot + region above the maximum");
    }

    #[test]
    fn numa_rules() {
        let n = |policy, nodes: &[u32]| NumaConfig {
            policy,
            nodes: nodes.to_vec(),
        };
        assert!(numa(&n(NumaPolicy::Local, &[])).is_ok());
        assert!(numa(&n(NumaPolicy::Local, &[0])).is_err());
        assert!(numa(&n(NumaPolicy::Preferred, &[1])).is_ok());
        assert!(numa(&n(NumaPolicy::Preferred, &[0, 1])).is_err());
        assert!(numa(&n(NumaPolicy::Interleave, &[0, 1])).is_ok());
        assert!(numa(&n(NumaPolicy::Interleave, &[])).is_err());
        assert!(numa(&n(NumaPolicy::Bind, &[0, 0])).is_err());
        assert!(numa(&n(NumaPolicy::Bind, &[MAX_NUMA_NODE + 1])).is_err());
    }

    #[test]
    fn balloon_and_backing_rules() {
        let mut r = base();
        r.balloon = Some(BalloonConfig {
            free_page_reporting: true,
            deflate_on_oom: true,
            stats_interval_s: 5,
            free_page_hinting: false,
        });
        assert!(create_vm(&r).is_ok());
        r.balloon = Some(BalloonConfig {
            stats_interval_s: MAX_STATS_INTERVAL_S + 1,
            ..BalloonConfig::default()
        });
        assert!(create_vm(&r).is_err());
        let mut r = base();
        r.backing = Some(BackingConfig {
            kind: BackingKind::Hugetlbfs,
            thp: true,
        });
        assert!(create_vm(&r).is_err());
        r.backing = Some(BackingConfig {
            kind: BackingKind::Hugetlbfs,
            thp: false,
        });
        assert!(create_vm(&r).is_ok());
    }

    #[test]
    fn resize_and_balloon_bodies() {
        assert!(resize(&ResizeRequest { requested_mib: 512 }).is_ok());
        assert!(resize(&ResizeRequest { requested_mib: 0 }).is_err());
        assert!(resize(&ResizeRequest {
            requested_mib: MAX_MEMORY_MIB + 1
        })
        .is_err());
        assert!(balloon(&BalloonRequest { target_mib: 0 }).is_ok());
        assert!(balloon(&BalloonRequest {
            target_mib: u64::MAX
        })
        .is_err());
    }

    #[test]
    fn errors_become_400() {
        let e: ApiError = ValidationError::Vcpus(0).into();
        assert_eq!(e.kind, crate::error::ErrorKind::BadRequest);
        assert!(e.message.contains("vcpus"));
    }
}
