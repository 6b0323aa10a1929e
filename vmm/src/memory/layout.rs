//! Guest-physical layout arithmetic: where boot RAM, the 32-bit MMIO hole, RAM above 4 GiB and
//! the hot-plug (virtio-mem) region sit, the e820 map the guest is told, and how RAM ranges are
//! cut into KVM memslots. Pure functions, no syscalls.

use std::ops::Range;

use super::MemoryError;

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;
/// Granule of placement: every block placed in or removed from the window is a multiple of this
/// (2 MiB, one x86-64 huge page and Linux's pageblock size).
pub const BLOCK_SIZE: u64 = 2 * MIB;
/// Size of one KVM memslot (and of one Linux memory block on x86-64 with < 64 GiB boot RAM).
pub const MEMSLOT_SIZE: u64 = 128 * MIB;
/// Start of the MMIO hole below 4 GiB (devices, LAPIC, IOAPIC, TSS pages live here).
pub const MMIO_HOLE_START: u64 = 3 * GIB;
/// End of the MMIO hole; RAM above the hole starts here.
pub const MMIO_HOLE_END: u64 = 4 * GIB;
/// End of conventional memory as told in the e820 map (`[0, 0x9fc00)` is RAM).
pub const E820_LOW_RAM_END: u64 = 0x9_fc00;
/// Start of RAM above the legacy hole (1 MiB).
pub const E820_HIGH_START: u64 = MIB;
/// Largest guest-physical address space Tidepool lays out (1 TiB): keeps memslot numbers
/// (gpa / 128 MiB) below 8192 and page tables of the tiny guest within one PDPT.
pub const MAX_GUEST_PHYS: u64 = 1 << 40;

/// What a guest-physical region is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// RAM present from boot (below the hole, and above 4 GiB when boot RAM exceeds 3 GiB).
    BootRam,
    /// The 32-bit MMIO hole: never RAM, never in a memslot.
    MmioHole,
    /// The hot-plug region (future virtio-mem device): reserved address space whose blocks are
    /// placed and removed at run time.
    Hotplug,
}

/// A guest-physical region of the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Kind of region.
    pub kind: RegionKind,
    /// Guest-physical range.
    pub range: Range<u64>,
}

/// Type of an e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM (e820 type 1).
    Ram,
    /// Reserved (e820 type 2).
    Reserved,
}

impl E820Kind {
    /// The numeric e820 type.
    pub fn code(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        }
    }
}

/// One e820 map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Kind,
}

/// One KVM memslot: slot number, guest-physical start and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemslotSpec {
    /// Slot number: `gpa / MEMSLOT_SIZE`, so a slot's number never changes.
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes (at most [`MEMSLOT_SIZE`]).
    pub size: u64,
}

/// What the VM's memory looks like; see [`Layout::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutConfig {
    /// Boot RAM in bytes (multiple of 2 MiB, at least 2 MiB).
    pub boot_ram: u64,
    /// Size of the hot-plug region in bytes (multiple of 128 MiB; 0 for none).
    pub hotplug_size: u64,
}

/// A VM's guest-physical layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    config: LayoutConfig,
    low_ram: Range<u64>,
    high_ram: Option<Range<u64>>,
    hotplug: Option<Range<u64>>,
}

/// Round `x` up to a multiple of `align` (a power of two); None on overflow.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(x.checked_add(align - 1)? & !(align - 1))
}

impl Layout {
    /// Lay out `boot_ram` bytes of RAM: up to 3 GiB from guest-physical 0, the rest from 4 GiB,
    /// then (if `hotplug_size > 0`) the hot-plug region at the next 128 MiB boundary.
    pub fn new(config: LayoutConfig) -> Result<Layout, MemoryError> {
        let LayoutConfig {
            boot_ram,
            hotplug_size,
        } = config;
        if boot_ram < BLOCK_SIZE || boot_ram % BLOCK_SIZE != 0 {
            return Err(MemoryError::BadSize {
                what: "boot RAM",
                size: boot_ram,
                align: BLOCK_SIZE,
            });
        }
        if hotplug_size % MEMSLOT_SIZE != 0 {
            return Err(MemoryError::BadSize {
                what: "hot-plug region",
                size: hotplug_size,
                align: MEMSLOT_SIZE,
            });
        }
        let low_end = boot_ram.min(MMIO_HOLE_START);
        let high_ram = (boot_ram > MMIO_HOLE_START)
            .then(|| MMIO_HOLE_END..MMIO_HOLE_END + (boot_ram - MMIO_HOLE_START));
        let ram_end = high_ram.as_ref().map_or(low_end, |r| r.end);
        let hotplug = if hotplug_size > 0 {
            let start = align_up(ram_end.max(MMIO_HOLE_END), MEMSLOT_SIZE).ok_or(
                MemoryError::TooLarge {
                    end: u64::MAX,
                    max: MAX_GUEST_PHYS,
                },
            )?;
            Some(start..start.saturating_add(hotplug_size))
        } else {
            None
        };
        let layout = Layout {
            config,
            low_ram: 0..low_end,
            high_ram,
            hotplug,
        };
        if layout.end() > MAX_GUEST_PHYS {
            return Err(MemoryError::TooLarge {
                end: layout.end(),
                max: MAX_GUEST_PHYS,
            });
        }
        Ok(layout)
    }

    /// The configuration this layout was made from.
    pub fn config(&self) -> LayoutConfig {
        self.config
    }

    /// Boot RAM below the hole, from 0.
    pub fn low_ram(&self) -> Range<u64> {
        self.low_ram.clone()
    }

    /// Boot RAM above 4 GiB, if boot RAM exceeds 3 GiB.
    pub fn high_ram(&self) -> Option<Range<u64>> {
        self.high_ram.clone()
    }

    /// The hot-plug region, if any.
    pub fn hotplug(&self) -> Option<Range<u64>> {
        self.hotplug.clone()
    }

    /// The boot RAM ranges (one or two).
    pub fn boot_ram_ranges(&self) -> Vec<Range<u64>> {
        let mut v = vec![self.low_ram.clone()];
        v.extend(self.high_ram.clone());
        v
    }

    /// End of the guest-physical space the window must cover. The hole is only included when
    /// something lies above it.
    pub fn end(&self) -> u64 {
        if let Some(h) = &self.hotplug {
            h.end
        } else if let Some(h) = &self.high_ram {
            h.end
        } else {
            self.low_ram.end
        }
    }

    /// All regions in address order. The hole appears when something lies above it.
    pub fn regions(&self) -> Vec<Region> {
        let mut v = vec![Region {
            kind: RegionKind::BootRam,
            range: self.low_ram.clone(),
        }];
        if self.end() > MMIO_HOLE_START {
            v.push(Region {
                kind: RegionKind::MmioHole,
                range: MMIO_HOLE_START..MMIO_HOLE_END,
            });
        }
        if let Some(r) = &self.high_ram {
            v.push(Region {
                kind: RegionKind::BootRam,
                range: r.clone(),
            });
        }
        if let Some(r) = &self.hotplug {
            v.push(Region {
                kind: RegionKind::Hotplug,
                range: r.clone(),
            });
        }
        v
    }

    /// The region kind at `gpa`, or None for addresses between regions or beyond the end.
    pub fn kind_at(&self, gpa: u64) -> Option<RegionKind> {
        self.regions()
            .into_iter()
            .find(|r| r.range.contains(&gpa))
            .map(|r| r.kind)
    }

    /// Check that `[gpa, gpa+len)` is block-aligned, non-empty and lies inside one RAM-capable
    /// region (boot RAM or hot-plug); returns that region's kind.
    pub fn check_block(&self, gpa: u64, len: u64) -> Result<RegionKind, MemoryError> {
        if len == 0 || gpa % BLOCK_SIZE != 0 || len % BLOCK_SIZE != 0 {
            return Err(MemoryError::Unaligned { gpa, len });
        }
        let end = gpa
            .checked_add(len)
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        self.regions()
            .into_iter()
            .find(|r| r.kind != RegionKind::MmioHole && r.range.start <= gpa && end <= r.range.end)
            .map(|r| r.kind)
            .ok_or(MemoryError::OutOfRange { gpa, len })
    }

    /// The e820 map for this layout: `[0, 0x9fc00)` RAM, the legacy area up to 1 MiB reserved,
    /// RAM from 1 MiB to the end of low RAM, and RAM above 4 GiB. The hot-plug region is left
    /// out (the virtio-mem driver adds it).
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut v = Vec::new();
        let low_end = self.low_ram.end;
        v.push(E820Entry {
            addr: 0,
            size: E820_LOW_RAM_END.min(low_end),
            kind: E820Kind::Ram,
        });
        if low_end > E820_LOW_RAM_END {
            v.push(E820Entry {
                addr: E820_LOW_RAM_END,
                size: E820_HIGH_START.min(low_end) - E820_LOW_RAM_END,
                kind: E820Kind::Reserved,
            });
        }
        if low_end > E820_HIGH_START {
            v.push(E820Entry {
                addr: E820_HIGH_START,
                size: low_end - E820_HIGH_START,
                kind: E820Kind::Ram,
            });
        }
        if let Some(r) = &self.high_ram {
            v.push(E820Entry {
                addr: r.start,
                size: r.end - r.start,
                kind: E820Kind::Ram,
            });
        }
        v
    }

    /// The memslots covering boot RAM (hot-plug slots are added as blocks are placed).
    pub fn boot_memslots(&self) -> Vec<MemslotSpec> {
        self.boot_ram_ranges()
            .into_iter()
            .flat_map(split_memslots)
            .collect()
    }
}

/// Cut a guest-physical range into memslots at [`MEMSLOT_SIZE`] boundaries. Each slot's number
/// is its 128 MiB index, so two ranges never share a number unless they share a 128 MiB chunk.
pub fn split_memslots(range: Range<u64>) -> Vec<MemslotSpec> {
    let mut v = Vec::new();
    let mut gpa = range.start;
    while gpa < range.end {
        let chunk_end = (gpa / MEMSLOT_SIZE + 1) * MEMSLOT_SIZE;
        let end = chunk_end.min(range.end);
        v.push(MemslotSpec {
            slot: memslot_of(gpa),
            gpa,
            size: end - gpa,
        });
        gpa = end;
    }
    v
}

/// The memslot number holding `gpa`.
pub fn memslot_of(gpa: u64) -> u32 {
    // MAX_GUEST_PHYS / MEMSLOT_SIZE = 8192 fits in u32; larger gpas are refused by Layout.
    u32::try_from(gpa / MEMSLOT_SIZE).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(boot_ram: u64, hotplug_size: u64) -> Layout {
        Layout::new(LayoutConfig {
            boot_ram,
            hotplug_size,
        })
        .expect("valid layout")
    }

    #[test]
    fn small_vm_has_only_low_ram() {
        let l = layout(256 * MIB, 0);
        assert_eq!(l.low_ram(), 0..256 * MIB);
        assert_eq!(l.high_ram(), None);
        assert_eq!(l.hotplug(), None);
        assert_eq!(l.end(), 256 * MIB);
        assert_eq!(l.regions().len(), 1);
        assert_eq!(l.kind_at(MMIO_HOLE_START), None);
    }

    #[test]
    fn large_vm_splits_around_the_hole() {
        let l = layout(4 * GIB, 0);
        assert_eq!(l.low_ram(), 0..3 * GIB);
        assert_eq!(l.high_ram(), Some(4 * GIB..5 * GIB));
        assert_eq!(l.end(), 5 * GIB);
        let kinds: Vec<_> = l.regions().iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                RegionKind::BootRam,
                RegionKind::MmioHole,
                RegionKind::BootRam
            ]
        );
        assert_eq!(l.kind_at(3 * GIB + 5), Some(RegionKind::MmioHole));
        assert_eq!(l.kind_at(4 * GIB), Some(RegionKind::BootRam));
    }

    #[test]
    fn exactly_three_gib_has_no_high_ram() {
        let l = layout(3 * GIB, 0);
        assert_eq!(l.high_ram(), None);
        assert_eq!(l.end(), 3 * GIB);
    }

    #[test]
    fn hotplug_region_sits_above_4g_aligned() {
        let l = layout(256 * MIB, GIB);
        assert_eq!(l.hotplug(), Some(4 * GIB..5 * GIB));
        // Hole is reported because something lies above it.
        assert!(l.regions().iter().any(|r| r.kind == RegionKind::MmioHole));
        let l = layout(3 * GIB + 2 * MIB, 128 * MIB);
        assert_eq!(l.high_ram(), Some(4 * GIB..4 * GIB + 2 * MIB));
        assert_eq!(l.hotplug(), Some(4 * GIB + 128 * MIB..4 * GIB + 256 * MIB));
        assert_eq!(l.hotplug().map(|h| h.start % MEMSLOT_SIZE), Some(0));
    }

    #[test]
    fn bad_sizes_are_refused() {
        for (b, h) in [(0, 0), (MIB, 0), (3 * MIB, 0), (2 * MIB, MIB)] {
            assert!(matches!(
                Layout::new(LayoutConfig {
                    boot_ram: b,
                    hotplug_size: h
                }),
                Err(MemoryError::BadSize { .. })
            ));
        }
        assert!(matches!(
            Layout::new(LayoutConfig {
                boot_ram: 2 * MIB,
                hotplug_size: MAX_GUEST_PHYS
            }),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn e820_small_and_large() {
        let l = layout(256 * MIB, GIB);
        let e = l.e820();
        assert_eq!(
            e,
            [
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: MIB - 0x9fc00,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: MIB,
                    size: 255 * MIB,
                    kind: E820Kind::Ram
                },
            ]
        );
        let l = layout(8 * GIB, 0);
        let e = l.e820();
        assert_eq!(e.len(), 4);
        assert_eq!(
            e[3],
            E820Entry {
                addr: 4 * GIB,
                size: 5 * GIB,
                kind: E820Kind::Ram
            }
        );
        let ram: u64 = e
            .iter()
            .filter(|x| x.kind == E820Kind::Ram)
            .map(|x| x.size)
            .sum();
        assert_eq!(ram, 8 * GIB - (MIB - 0x9fc00));
    }

    #[test]
    fn memslot_splitting() {
        assert_eq!(
            split_memslots(0..256 * MIB),
            [
                MemslotSpec {
                    slot: 0,
                    gpa: 0,
                    size: 128 * MIB
                },
                MemslotSpec {
                    slot: 1,
                    gpa: 128 * MIB,
                    size: 128 * MIB
                },
            ]
        );
        // Unaligned ends are cut at the boundary, never crossing it.
        let s = split_memslots(100 * MIB..300 * MIB);
        assert_eq!(
            s.iter()
                .map(|m| (m.slot, m.gpa, m.size))
                .collect::<Vec<_>>(),
            [
                (0, 100 * MIB, 28 * MIB),
                (1, 128 * MIB, 128 * MIB),
                (2, 256 * MIB, 44 * MIB)
            ]
        );
        assert!(split_memslots(5..5).is_empty());
        // A 4 GiB VM needs few slots: 24 below the hole and 8 above.
        let l = layout(4 * GIB, 0);
        let slots = l.boot_memslots();
        assert_eq!(slots.len(), 32);
        assert_eq!(slots[24].slot, 32); // 4 GiB / 128 MiB
        let total: u64 = slots.iter().map(|s| s.size).sum();
        assert_eq!(total, 4 * GIB);
        let mut nums: Vec<_> = slots.iter().map(|s| s.slot).collect();
        nums.dedup();
        assert_eq!(nums.len(), 32);
    }

    #[test]
    fn check_block_rules() {
        let l = layout(256 * MIB, GIB);
        assert_eq!(l.check_block(0, 2 * MIB).ok(), Some(RegionKind::BootRam));
        assert_eq!(
            l.check_block(4 * GIB, 128 * MIB).ok(),
            Some(RegionKind::Hotplug)
        );
        assert!(matches!(
            l.check_block(MIB, 2 * MIB),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            l.check_block(0, 0),
            Err(MemoryError::Unaligned { .. })
        ));
        // Crossing the end of boot RAM, in the hole, beyond the end.
        assert!(l.check_block(254 * MIB, 4 * MIB).is_err());
        assert!(l.check_block(MMIO_HOLE_START, 2 * MIB).is_err());
        assert!(l.check_block(5 * GIB, 2 * MIB).is_err());
        assert!(l.check_block(u64::MAX - 2 * MIB + 1, 2 * MIB).is_err());
    }

    #[test]
    fn align_up_works() {
        assert_eq!(align_up(0, 4096), Some(0));
        assert_eq!(align_up(1, 4096), Some(4096));
        assert_eq!(align_up(u64::MAX, 4096), None);
    }
}
