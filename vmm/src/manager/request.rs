//! Turning an API request into a [`MicrovmConfig`]: pure checks of what this VMM supports,
//! each refusal a typed [`RequestError`] (unsupported features say so).

use tidepool_api::types::{
    BackingKind, BootSource, CreateVmRequest, ImagePrivilege, NumaConfig, NumaPolicy as ApiPolicy,
    VmInfo, VmState,
};

use guest_mm::frame::NodeId;
use guest_mm::policy::NumaPolicy;

use crate::devices::IrqMode;
use crate::memory::{BackingKind as MemKind, BackingSpec, MIB};
use crate::microvm::linux::LinuxImage;
use crate::microvm::{BalloonSpec, BootImage, HotplugSpec, MicrovmConfig};
use crate::tiny_guest::Privilege;

/// Largest raw image accepted from a file.
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// Why a request cannot become a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A feature this VMM does not provide (yet).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The request is inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// The image file could not be read.
    #[error("reading image {path}: {reason}")]
    Image {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
}

fn policy(numa: Option<&NumaConfig>) -> Result<NumaPolicy, RequestError> {
    let Some(n) = numa else {
        return Ok(NumaPolicy::Local);
    };
    let nodes: Result<Vec<NodeId>, RequestError> = n
        .nodes
        .iter()
        .map(|&x| {
            u16::try_from(x)
                .map(NodeId)
                .map_err(|_| RequestError::Invalid(format!("node {x} does not exist")))
        })
        .collect();
    let nodes = nodes?;
    Ok(match n.policy {
        ApiPolicy::Local => NumaPolicy::Local,
        ApiPolicy::Preferred => match nodes.as_slice() {
            [one] => NumaPolicy::Preferred(*one),
            _ => {
                return Err(RequestError::Invalid(
                    "the preferred policy takes exactly one node".into(),
                ))
            }
        },
        ApiPolicy::Interleave => NumaPolicy::Interleave(nodes),
        ApiPolicy::Bind => NumaPolicy::Bind(nodes),
    })
}

fn image(req: &CreateVmRequest) -> Result<BootImage, RequestError> {
    if let Some(kernel) = &req.kernel {
        if req.image.is_some() {
            return Err(RequestError::Invalid(
                "`kernel` and `image` are exclusive".into(),
            ));
        }
        for p in std::iter::once(kernel).chain(req.initrd.iter()) {
            let meta = std::fs::metadata(p).map_err(|e| RequestError::Image {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            if !meta.is_file() {
                return Err(RequestError::Image {
                    path: p.clone(),
                    reason: "not a regular file".into(),
                });
            }
        }
        return Ok(BootImage::Linux(LinuxImage {
            kernel: kernel.into(),
            initrd: req.initrd.as_ref().map(Into::into),
            cmdline: req.cmdline.clone(),
        }));
    }
    let Some(img) = &req.image else {
        return Err(RequestError::Unsupported(
            "the built-in default guest is not wired yet: give a `kernel` (and `initrd`) or a \
             raw `image`"
                .into(),
        ));
    };
    let bytes = match (&img.inline, &img.path) {
        (Some(b), None) => b.clone(),
        (None, Some(p)) => {
            let err = |reason: String| RequestError::Image {
                path: p.clone(),
                reason,
            };
            let meta = std::fs::metadata(p).map_err(|e| err(e.to_string()))?;
            if meta.len() > MAX_IMAGE_BYTES {
                return Err(err(format!("larger than {MAX_IMAGE_BYTES} bytes")));
            }
            std::fs::read(p).map_err(|e| err(e.to_string()))?
        }
        _ => {
            return Err(RequestError::Invalid(
                "image needs exactly one of `path` and `inline`".into(),
            ))
        }
    };
    Ok(BootImage::Raw {
        bytes,
        load_addr: img.load_addr,
        entry: img.entry,
        privilege: match img.privilege {
            ImagePrivilege::Kernel => Privilege::Kernel,
            ImagePrivilege::User => Privilege::User,
        },
    })
}

/// The VM configuration for `req` under id `id`, with interrupts as `irq` says.
pub fn config_from_request(
    id: &str,
    req: &CreateVmRequest,
    irq: IrqMode,
) -> Result<MicrovmConfig, RequestError> {
    let b = req.backing.unwrap_or_default();
    let backing = BackingSpec {
        kind: match b.kind {
            BackingKind::Anonymous => MemKind::Anonymous,
            BackingKind::Memfd => MemKind::Memfd,
            BackingKind::Hugetlbfs => MemKind::Hugetlbfs,
        },
        thp: b.thp,
    };
    backing
        .validate()
        .map_err(|e| RequestError::Unsupported(e.to_string()))?;
    let vcpus = u8::try_from(req.vcpus)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| RequestError::Invalid(format!("{} vCPUs", req.vcpus)))?;
    let boot_ram = req
        .memory_mib
        .checked_mul(MIB)
        .ok_or_else(|| RequestError::Invalid("memory_mib overflows".into()))?;
    let hotplug = req.hotplug.map(|h| HotplugSpec {
        region_size: h.region_mib.saturating_mul(MIB),
        block_size: h.block_mib.saturating_mul(MIB),
        memslots: match h.memslots {
            tidepool_api::types::MemslotStrategy::Eager => crate::kvm::HotplugMemslots::Eager,
            tidepool_api::types::MemslotStrategy::Lazy => crate::kvm::HotplugMemslots::Lazy,
        },
    });
    let balloon = req.balloon.map(|b| BalloonSpec {
        free_page_reporting: b.free_page_reporting,
        deflate_on_oom: b.deflate_on_oom,
        stats_interval_s: b.stats_interval_s,
        free_page_hinting: b.free_page_hinting,
    });
    Ok(MicrovmConfig {
        id: id.into(),
        vcpus,
        boot_ram,
        hotplug,
        balloon,
        policy: policy(req.numa.as_ref())?,
        irq,
        image: image(req)?,
        backing,
        pool_files: None,
    })
}

/// The API's description of a VM made from `req`.
pub fn info_from_request(id: &str, req: &CreateVmRequest) -> VmInfo {
    VmInfo {
        id: id.into(),
        state: VmState::Created,
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        boot_source: if req.image.is_some() {
            BootSource::RawImage
        } else if req.kernel.is_some() {
            BootSource::Kernel
        } else {
            BootSource::DefaultGuest
        },
        kernel: req.kernel.clone(),
        hotplug: req.hotplug,
        balloon: req.balloon,
        numa: req.numa.clone(),
        backing: req.backing.unwrap_or_default(),
        stop_reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_api::types::{BackingConfig, HotplugConfig, RawImage};

    fn raw() -> CreateVmRequest {
        let mut r = CreateVmRequest::with_memory(64);
        r.image = Some(RawImage {
            path: None,
            inline: Some(vec![0xf4]),
            load_addr: 0x1000,
            entry: 0x1000,
            privilege: ImagePrivilege::User,
        });
        r
    }

    #[test]
    fn raw_image_request_becomes_a_config() {
        let mut r = raw();
        r.hotplug = Some(HotplugConfig {
            region_mib: 256,
            block_mib: 2,
            memslots: Default::default(),
        });
        let c = config_from_request("vm1", &r, IrqMode::Irqfd).expect("config");
        assert_eq!(c.boot_ram, 64 * MIB);
        assert_eq!(c.hotplug.map(|h| h.region_size), Some(256 * MIB));
        assert_eq!(
            c.hotplug.map(|h| h.memslots),
            Some(crate::kvm::HotplugMemslots::Eager),
            "eager is the default"
        );
        let body = r#"{"region_mib": 256, "memslots": "lazy"}"#;
        r.hotplug = Some(serde_json::from_str(body).expect("hotplug body"));
        let lazy = config_from_request("vm1", &r, IrqMode::Irqfd).expect("config");
        assert_eq!(
            lazy.hotplug.map(|h| h.memslots),
            Some(crate::kvm::HotplugMemslots::Lazy)
        );
        assert!(
            serde_json::from_str::<HotplugConfig>(r#"{"region_mib": 256, "memslots": "x"}"#)
                .is_err()
        );
        assert!(matches!(
            c.image,
            BootImage::Raw {
                load_addr: 0x1000,
                privilege: Privilege::User,
                ..
            }
        ));
        assert_eq!(c.policy, NumaPolicy::Local);
        let info = info_from_request("vm1", &r);
        assert_eq!(info.boot_source, BootSource::RawImage);
    }

    #[test]
    fn kernel_requests_become_linux_and_the_default_guest_is_unsupported() {
        let dir = std::env::temp_dir().join(format!("tp-req-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let kernel = dir.join("vmlinux");
        let _ = std::fs::write(&kernel, b"not really a kernel");
        let mut r = raw();
        r.image = None;
        r.kernel = Some(kernel.display().to_string());
        r.cmdline = Some("quiet".into());
        let c = config_from_request("a", &r, IrqMode::Irqfd).expect("linux");
        match c.image {
            BootImage::Linux(l) => {
                assert_eq!(l.kernel, kernel);
                assert_eq!(l.cmdline.as_deref(), Some("quiet"));
            }
            other => panic!("expected Linux, got {other:?}"),
        }
        r.initrd = Some(dir.join("missing.cpio").display().to_string());
        assert!(matches!(
            config_from_request("a", &r, IrqMode::Irqfd),
            Err(RequestError::Image { .. })
        ));
        r.kernel = None;
        r.initrd = None;
        assert!(matches!(
            config_from_request("a", &r, IrqMode::Irqfd),
            Err(RequestError::Unsupported(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn backing_policy_and_image_checks() {
        let mut r = raw();
        r.backing = Some(BackingConfig {
            kind: BackingKind::Memfd,
            thp: true,
        });
        let c = config_from_request("a", &r, IrqMode::Irqfd).expect("memfd");
        assert_eq!(
            c.backing,
            BackingSpec {
                kind: MemKind::Memfd,
                thp: true
            }
        );
        r.backing = Some(BackingConfig {
            kind: BackingKind::Anonymous,
            thp: false,
        });
        let c = config_from_request("a", &r, IrqMode::Irqfd).expect("anonymous 4 KiB");
        assert!(!c.backing.thp);
        // hugetlbfs pages are huge already: THP on top is refused with a clear error.
        r.backing = Some(BackingConfig {
            kind: BackingKind::Hugetlbfs,
            thp: true,
        });
        assert!(matches!(
            config_from_request("a", &r, IrqMode::Irqfd),
            Err(RequestError::Unsupported(_))
        ));
        let mut r = raw();
        r.numa = Some(NumaConfig {
            policy: ApiPolicy::Preferred,
            nodes: vec![0, 1],
        });
        assert!(matches!(
            config_from_request("a", &r, IrqMode::Irqfd),
            Err(RequestError::Invalid(_))
        ));
        r.numa = Some(NumaConfig {
            policy: ApiPolicy::Bind,
            nodes: vec![1],
        });
        let c = config_from_request("a", &r, IrqMode::Irqfd).expect("bind");
        assert_eq!(c.policy, NumaPolicy::Bind(vec![NodeId(1)]));
        let mut r = raw();
        if let Some(img) = r.image.as_mut() {
            img.inline = None;
            img.path = Some("/nonexistent/tidepool-image".into());
        }
        assert!(matches!(
            config_from_request("a", &r, IrqMode::Irqfd),
            Err(RequestError::Image { .. })
        ));
    }
}
