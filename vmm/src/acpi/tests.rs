use super::*;

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn find(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

fn config() -> AcpiConfig {
    AcpiConfig {
        vcpus: 2,
        virtio_mmio: vec![
            VirtioMmioDevice {
                addr: 0xd000_0000,
                gsi: 5,
            },
            VirtioMmioDevice {
                addr: 0xd000_1000,
                gsi: 6,
            },
        ],
        numa: vec![],
    }
}

fn table<'a>(t: &'a AcpiTables, sig: &[u8; 4]) -> (u64, &'a [u8]) {
    t.blobs
        .iter()
        .find(|(_, b)| &b[..4] == sig)
        .map(|(a, b)| (*a, b.as_slice()))
        .unwrap_or_else(|| panic!("no {:?} table", std::str::from_utf8(sig)))
}

#[test]
fn every_table_checksums_to_zero_and_has_its_length() {
    let t = build(&config()).expect("tables");
    assert_eq!(t.rsdp_addr, RSDP_ADDR);
    let (addr, rsdp) = &t.blobs[0];
    assert_eq!(*addr, RSDP_ADDR);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(byte_sum(&rsdp[..20]), 0, "RSDP v1 checksum");
    assert_eq!(byte_sum(rsdp), 0, "RSDP extended checksum");
    for (addr, b) in &t.blobs[1..] {
        assert_eq!(u32_at(b, 4) as usize, b.len(), "length of {:?}", &b[..4]);
        assert_eq!(byte_sum(b), 0, "checksum of {:?}", &b[..4]);
        assert_eq!(&b[10..16], &OEM_ID);
        assert!(*addr >= RSDP_ADDR && addr + b.len() as u64 <= ACPI_AREA_END);
    }
    // No overlaps.
    let mut spans: Vec<(u64, u64)> = t
        .blobs
        .iter()
        .map(|(a, b)| (*a, a + b.len() as u64))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "{w:x?}");
    }
}

#[test]
fn rsdp_xsdt_fadt_dsdt_chain() {
    let t = build(&config()).expect("tables");
    let rsdp = &t.blobs[0].1;
    let (xsdt_addr, xsdt) = table(&t, b"XSDT");
    assert_eq!(u64_at(rsdp, 24), xsdt_addr);
    assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
    let (fadt_addr, fadt) = table(&t, b"FACP");
    let (madt_addr, _) = table(&t, b"APIC");
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(xsdt, o))
        .collect();
    assert_eq!(entries, vec![fadt_addr, madt_addr]);
    let (dsdt_addr, _) = table(&t, b"DSDT");
    // X_DSDT at offset 140; flags at 112 with HW_REDUCED_ACPI (bit 20).
    assert_eq!(u64_at(fadt, 140), dsdt_addr);
    assert_ne!(u32_at(fadt, 112) & (1 << 20), 0);
    // Sleep control register: GAS at 244, system I/O, 8 bits, port SLEEP_CONTROL_PORT;
    // sleep status at 256.
    assert_eq!(fadt[244], 1);
    assert_eq!(fadt[245], 8);
    assert_eq!(u64_at(fadt, 248), u64::from(SLEEP_CONTROL_PORT));
    assert_eq!(u64_at(fadt, 260), u64::from(SLEEP_STATUS_PORT));
}

#[test]
fn dsdt_has_lnro0005_devices_with_their_resources() {
    let t = build(&config()).expect("tables");
    let (_, dsdt) = table(&t, b"DSDT");
    // Two devices named by _HID "LNRO0005" (AML string prefix 0x0d).
    let hid = find(dsdt, b"\x0dLNRO0005\x00");
    assert_eq!(hid.len(), 2);
    for (i, d) in config().virtio_mmio.iter().enumerate() {
        // Memory32Fixed: 0x86, length 9, read-write, base, 0x1000.
        let mut mem = vec![0x86, 9, 0, 1];
        mem.extend_from_slice(&(d.addr as u32).to_le_bytes());
        mem.extend_from_slice(&0x1000u32.to_le_bytes());
        let at = find(dsdt, &mem);
        assert_eq!(at.len(), 1, "device {i} window");
        // Extended interrupt right after: 0x89, length 6, flags consumer|edge|shared, 1 IRQ.
        let mut irq = vec![0x89, 6, 0, 0b1011, 1];
        irq.extend_from_slice(&d.gsi.to_le_bytes());
        assert_eq!(
            &dsdt[at[0] + mem.len()..at[0] + mem.len() + irq.len()],
            &irq[..]
        );
        assert_eq!(find(dsdt, dsdt::device_name(i).as_bytes()).len(), 1);
    }
    assert_eq!(find(dsdt, b"_SB_").len(), 1);
    // COM1: PNP0501 (EISA id 0x0105d041 as a DWord), IO 0x3f8 x8, IRQ 4 exclusive.
    assert_eq!(find(dsdt, b"COM1").len(), 1);
    assert_eq!(find(dsdt, b"\x0c\x41\xd0\x05\x01").len(), 1);
    assert_eq!(find(dsdt, b"\x47\x01\xf8\x03\xf8\x03\x00\x08").len(), 1);
    assert_eq!(find(dsdt, b"\x89\x06\x00\x03\x01\x04\x00\x00\x00").len(), 1);
    assert_eq!(find(dsdt, b"_CCA").len(), 2);
    // \_S5_ package { 5, 0 }: NameOp, "_S5_", PackageOp, len, 2 elements, BytePrefix 5, Zero.
    assert_eq!(find(dsdt, b"\x08_S5_\x12\x05\x02\x0a\x05\x00").len(), 1);
}

#[test]
fn madt_lists_every_vcpu_the_ioapic_and_lint1_nmi() {
    let mut c = config();
    c.vcpus = 3;
    let t = build(&c).expect("tables");
    let (_, madt) = table(&t, b"APIC");
    assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
    let mut o = 44;
    let mut lapics = Vec::new();
    let mut ioapic = None;
    let mut nmi = None;
    while o < madt.len() {
        let (typ, len) = (madt[o], madt[o + 1] as usize);
        match typ {
            0 => lapics.push((madt[o + 2], madt[o + 3], u32_at(madt, o + 4))),
            1 => ioapic = Some((madt[o + 2], u32_at(madt, o + 4), u32_at(madt, o + 8))),
            4 => nmi = Some((madt[o + 2], madt[o + 5])),
            other => panic!("unexpected MADT entry type {other}"),
        }
        assert!(len > 0);
        o += len;
    }
    assert_eq!(o, madt.len());
    assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
    assert_eq!(ioapic, Some((3, IOAPIC_ADDR, 0)));
    assert_eq!(nmi, Some((0xff, 1)));
}

#[test]
fn srat_only_when_asked() {
    let t = build(&config()).expect("tables");
    assert!(t.blobs.iter().all(|(_, b)| &b[..4] != b"SRAT"));
    let mut c = config();
    c.numa = vec![
        NumaMemory {
            base: 0,
            size: 512 << 20,
            proximity: 0,
            hotplug: false,
        },
        NumaMemory {
            base: 4 << 30,
            size: 1 << 30,
            proximity: 1,
            hotplug: true,
        },
    ];
    let t = build(&c).expect("tables");
    let (srat_addr, srat) = table(&t, b"SRAT");
    let (_, xsdt) = table(&t, b"XSDT");
    assert_eq!(u64_at(xsdt, 36 + 16), srat_addr);
    assert_eq!(u32_at(srat, 36), 1);
    // Two LAPIC affinity entries (16 bytes), then two memory entries (40 bytes).
    assert_eq!(srat.len(), 48 + 2 * 16 + 2 * 40);
    let m1 = 48 + 32 + 40;
    assert_eq!(srat[m1], 1);
    assert_eq!(u32_at(srat, m1 + 2), 1);
    assert_eq!(u64_at(srat, m1 + 8), 4 << 30);
    assert_eq!(u64_at(srat, m1 + 16), 1 << 30);
    assert_eq!(u32_at(srat, m1 + 28), 0b11);
}

#[test]
fn bad_configs_are_refused() {
    let mut c = config();
    c.virtio_mmio[0].gsi = 4;
    assert!(matches!(
        build(&c),
        Err(AcpiError::BadDevice { gsi: 4, .. })
    ));
    let mut c = config();
    c.virtio_mmio[1].addr = 0xd000_0800;
    assert!(matches!(build(&c), Err(AcpiError::BadDevice { .. })));
    let mut c = config();
    c.virtio_mmio[1].addr = 0xffff_f000 + 0x1000;
    assert!(matches!(build(&c), Err(AcpiError::BadDevice { .. })));
    c.vcpus = 0;
    assert_eq!(build(&c), Err(AcpiError::NoVcpus));
}
