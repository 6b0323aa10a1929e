//! Host-side balloon configuration and the device's virtio config space.

use crate::error::BalloonError;
use crate::{
    MIB, PAGE_SIZE, REPORTING_MIN_QUEUE_SIZE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_F_VERSION_1,
};
use serde::{Deserialize, Serialize};

/// How the VMM configures a balloon device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Offer DEFLATE_ON_OOM: the guest may deflate without host permission when it runs out of
    /// memory (Linux releases 256 pages per OOM notification).
    pub deflate_on_oom: bool,
    /// Offer free page reporting (REPORTING): the guest reports free blocks, which the host
    /// discards.
    pub free_page_reporting: bool,
    /// Offer PAGE_POISON along with reporting, so guests with `init_on_free=1` or page poisoning
    /// keep free page reporting. Reports are not discarded while the guest's poison value is
    /// non-zero (a discarded page would read back as zeroes, not the poison pattern).
    pub page_poison: bool,
    /// Interval at which the VMM asks for fresh guest statistics; 0 disables statistics and the
    /// STATS_VQ feature is then not offered.
    pub stats_interval_s: u32,
    /// Maximum size of every queue (a power of two; at least 32 for the reporting queue).
    pub queue_size: u16,
    /// Offer free page hinting (FREE_PAGE_HINT): the host can start hinting passes. Report
    /// only: hinted pages are counted, never discarded (`crate::hinting`).
    #[serde(default)]
    pub free_page_hinting: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            deflate_on_oom: true,
            free_page_reporting: true,
            page_poison: true,
            stats_interval_s: 1,
            queue_size: 256,
            free_page_hinting: false,
        }
    }
}

impl BalloonConfig {
    /// Check the configuration.
    pub fn validate(&self) -> Result<(), BalloonError> {
        if !self.queue_size.is_power_of_two() {
            return Err(BalloonError::InvalidConfig(format!(
                "queue_size {} is not a power of two",
                self.queue_size
            )));
        }
        if self.free_page_reporting && self.queue_size < REPORTING_MIN_QUEUE_SIZE {
            return Err(BalloonError::InvalidConfig(format!(
                "queue_size {} is below the {} entries the Linux reporting queue needs",
                self.queue_size, REPORTING_MIN_QUEUE_SIZE
            )));
        }
        if self.page_poison && !self.free_page_reporting {
            return Err(BalloonError::InvalidConfig(
                "page_poison only makes sense with free_page_reporting".into(),
            ));
        }
        Ok(())
    }

    /// Whether the statistics queue is offered.
    pub fn stats_enabled(&self) -> bool {
        self.stats_interval_s > 0
    }

    /// The feature bits this configuration offers.
    pub fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1;
        if self.stats_enabled() {
            f |= 1 << VIRTIO_BALLOON_F_STATS_VQ;
        }
        if self.deflate_on_oom {
            f |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if self.free_page_hinting {
            f |= 1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT;
        }
        if self.free_page_reporting {
            f |= 1 << VIRTIO_BALLOON_F_REPORTING;
            if self.page_poison {
                f |= 1 << VIRTIO_BALLOON_F_PAGE_POISON;
            }
        }
        f
    }
}

/// Size of the balloon config space in bytes.
pub const CONFIG_SPACE_SIZE: usize = 16;
/// Offset of `num_pages` (device-written target, in 4 KiB pages).
pub const OFF_NUM_PAGES: usize = 0;
/// Offset of `actual` (driver-written current balloon size, in 4 KiB pages).
pub const OFF_ACTUAL: usize = 4;
/// Offset of `free_page_hint_cmd_id` (device-written: the hinting pass, STOP or DONE).
pub const OFF_CMD_ID: usize = 8;
/// Offset of `poison_val` (driver-written).
pub const OFF_POISON_VAL: usize = 12;

/// The 16-byte little-endian config space: `num_pages`, `actual`, `free_page_hint_cmd_id`,
/// `poison_val`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Target balloon size in 4 KiB pages (written by the host).
    pub num_pages: u32,
    /// Current balloon size in 4 KiB pages (written by the driver).
    pub actual: u32,
    /// Free page hint command id: 0 (STOP) until a pass starts, then the pass's id, STOP or
    /// DONE (1).
    pub free_page_hint_cmd_id: u32,
    /// The guest's page poison value (written by the driver when PAGE_POISON is negotiated).
    pub poison_val: u32,
}

impl ConfigSpace {
    fn to_bytes(self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        b[OFF_NUM_PAGES..OFF_NUM_PAGES + 4].copy_from_slice(&self.num_pages.to_le_bytes());
        b[OFF_ACTUAL..OFF_ACTUAL + 4].copy_from_slice(&self.actual.to_le_bytes());
        b[OFF_CMD_ID..OFF_CMD_ID + 4].copy_from_slice(&self.free_page_hint_cmd_id.to_le_bytes());
        b[OFF_POISON_VAL..OFF_POISON_VAL + 4].copy_from_slice(&self.poison_val.to_le_bytes());
        b
    }

    fn word(b: &[u8; CONFIG_SPACE_SIZE], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    /// Read `data.len()` bytes at `offset`; bytes beyond the config space read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.to_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| bytes.get(o).copied())
                .unwrap_or(0);
        }
    }

    /// A driver write at `offset`: only the bytes of `actual` and `poison_val` change; writes to
    /// `num_pages`, the command id, or beyond the space are ignored. Returns which driver-owned
    /// fields the write touched.
    pub fn driver_write(&mut self, offset: u64, data: &[u8]) -> ConfigWrite {
        let mut bytes = self.to_bytes();
        let mut touched = ConfigWrite::default();
        for (i, v) in data.iter().enumerate() {
            let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
            else {
                continue;
            };
            if (OFF_ACTUAL..OFF_ACTUAL + 4).contains(&o) {
                bytes[o] = *v;
                touched.actual = true;
            } else if (OFF_POISON_VAL..OFF_POISON_VAL + 4).contains(&o) {
                bytes[o] = *v;
                touched.poison_val = true;
            }
        }
        self.actual = Self::word(&bytes, OFF_ACTUAL);
        self.poison_val = Self::word(&bytes, OFF_POISON_VAL);
        touched
    }
}

/// Which driver-owned config fields a write touched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigWrite {
    /// `actual` changed (possibly partially).
    pub actual: bool,
    /// `poison_val` changed (possibly partially).
    pub poison_val: bool,
}

/// Convert a balloon target in MiB to 4 KiB pages, refusing what does not fit `num_pages`.
pub fn mib_to_pages(mib: u64) -> Option<u32> {
    mib.checked_mul(MIB / PAGE_SIZE)
        .and_then(|p| u32::try_from(p).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_offers_expected_features() {
        let c = BalloonConfig::default();
        c.validate().unwrap();
        let f = c.features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & (1 << VIRTIO_BALLOON_F_STATS_VQ), 0);
        assert_ne!(f & (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM), 0);
        assert_ne!(f & (1 << VIRTIO_BALLOON_F_REPORTING), 0);
        assert_ne!(f & (1 << VIRTIO_BALLOON_F_PAGE_POISON), 0);
        // Never offered: MUST_TELL_HOST (0), FREE_PAGE_HINT (3).
        assert_eq!(f & 0b1001, 0);
    }

    #[test]
    fn invalid_configs_are_refused() {
        let mut c = BalloonConfig {
            queue_size: 16,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        c.queue_size = 100;
        assert!(c.validate().is_err());
        c.queue_size = 64;
        c.validate().unwrap();
        c.free_page_reporting = false;
        assert!(c.validate().is_err(), "poison without reporting");
        c.page_poison = false;
        c.queue_size = 16;
        c.validate().unwrap();
    }

    #[test]
    fn config_space_rw_rules() {
        let mut s = ConfigSpace {
            num_pages: 0x1234_5678,
            ..Default::default()
        };
        let mut b = [0u8; 16];
        s.read(0, &mut b);
        assert_eq!(&b[0..4], &0x1234_5678u32.to_le_bytes());
        // The driver cannot write num_pages or the command id.
        let w = s.driver_write(0, &[0xff; 4]);
        assert_eq!(w, ConfigWrite::default());
        s.driver_write(8, &[0xff; 4]);
        assert_eq!(s.num_pages, 0x1234_5678);
        assert_eq!(s.free_page_hint_cmd_id, 0);
        // A full write of actual, then a partial byte write.
        assert!(s.driver_write(4, &77u32.to_le_bytes()).actual);
        assert_eq!(s.actual, 77);
        s.driver_write(5, &[1]);
        assert_eq!(s.actual, 77 + 256);
        // A write spanning actual and the command id only updates actual.
        s.driver_write(6, &[0, 0, 9, 9]);
        assert_eq!(s.actual, 77 + 256);
        assert!(s.driver_write(12, &0xaaaa_aaaau32.to_le_bytes()).poison_val);
        assert_eq!(s.poison_val, 0xaaaa_aaaa);
        // Out-of-range reads are zero, writes are ignored, huge offsets do not overflow.
        let mut b = [0xffu8; 4];
        s.read(14, &mut b);
        assert_eq!(b, [0xaa, 0xaa, 0, 0]);
        s.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        s.driver_write(u64::MAX - 1, &[1, 2, 3]);
        s.driver_write(16, &[1, 2, 3]);
        assert_eq!(s.actual, 77 + 256);
    }

    #[test]
    fn mib_conversion() {
        assert_eq!(mib_to_pages(1), Some(256));
        assert_eq!(mib_to_pages(0), Some(0));
        assert_eq!(mib_to_pages(16 * 1024 * 1024), None);
        assert_eq!(mib_to_pages(u64::MAX), None);
    }
}
