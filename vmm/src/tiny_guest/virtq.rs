//! Code emitters shared by the tiny guest's polled virtio drivers: probing a virtio-mmio (v2)
//! device, negotiating features, placing split virtqueues in guest RAM, submitting one
//! descriptor chain and polling the used ring for it.
//!
//! Register convention inside a driver step: `r15` holds the device's MMIO base and `rbp` the
//! driver's scratch page (mailbox, request buffers, then one 4 KiB page per queue). `r10`,
//! `r11` and `r14` belong to the surrounding program and are never touched.
//!
//! Every register access is an MMIO exit to the VMM (the window is not backed by a memslot);
//! ring memory is plain guest RAM, read and written natively at CPL3.

use std::ops::Range;

use iced_x86::code_asm::*;

use super::program::{MAX_TAG, REPORT_BASE};
use crate::memory::{Layout, MMIO_HOLE_END, MMIO_HOLE_START};

/// "virt", little-endian: the virtio-mmio magic value.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Size of a virtio-mmio register window.
pub const MMIO_WINDOW: u64 = 0x1000;

/// virtio-mmio register offsets (virtio 1.2, 4.2.2).
pub mod reg {
    /// MagicValue.
    pub const MAGIC: i32 = 0x000;
    /// Version.
    pub const VERSION: i32 = 0x004;
    /// DeviceID.
    pub const DEVICE_ID: i32 = 0x008;
    /// DeviceFeatures.
    pub const DEVICE_FEATURES: i32 = 0x010;
    /// DeviceFeaturesSel.
    pub const DEVICE_FEATURES_SEL: i32 = 0x014;
    /// DriverFeatures.
    pub const DRIVER_FEATURES: i32 = 0x020;
    /// DriverFeaturesSel.
    pub const DRIVER_FEATURES_SEL: i32 = 0x024;
    /// QueueSel.
    pub const QUEUE_SEL: i32 = 0x030;
    /// QueueNumMax.
    pub const QUEUE_NUM_MAX: i32 = 0x034;
    /// QueueNum.
    pub const QUEUE_NUM: i32 = 0x038;
    /// QueueReady.
    pub const QUEUE_READY: i32 = 0x044;
    /// QueueNotify.
    pub const QUEUE_NOTIFY: i32 = 0x050;
    /// Status.
    pub const STATUS: i32 = 0x070;
    /// QueueDescLow (High at +4).
    pub const QUEUE_DESC: i32 = 0x080;
    /// QueueDriverLow (High at +4).
    pub const QUEUE_DRIVER: i32 = 0x090;
    /// QueueDeviceLow (High at +4).
    pub const QUEUE_DEVICE: i32 = 0x0a0;
    /// Start of the device-specific config space.
    pub const CONFIG: i32 = 0x100;
}

/// Device status bits.
mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 64;
}

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Avail-ring flag: the driver polls and wants no interrupts.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// VIRTIO_F_VERSION_1 as a feature mask.
pub const FEATURE_VERSION_1: u64 = 1 << 32;

/// Report tag: the driver gave up; the value is a [`DriverFailure`] code.
pub const TAG_DRIVER_FAILED: u64 = 32;
/// Report tag: the driver set DRIVER_OK; the value is the device status read back.
pub const TAG_DRIVER_READY: u64 = 33;

/// Where the tests put a driven device's virtio-mmio window: the page after the report
/// window, in the 32-bit hole.
pub const DEFAULT_MMIO_BASE: u64 = REPORT_BASE + 0x1000;
/// Default scratch address for a driver: 1 MiB, above any tiny guest image (which ends below
/// 0x30000 for layouts up to 16 GiB) and below the first 2 MiB boundary.
pub const DEFAULT_SCRATCH: u64 = 0x10_0000;

/// Offset in the scratch page of the host-to-guest mailbox (a `u64` the host writes through
/// guest memory; the driver polls it natively, without exits).
pub const MAILBOX_OFFSET: u64 = 0;
/// Largest queue size the drivers use: a queue's descriptors, avail and used rings fit one
/// 4 KiB page.
pub const MAX_QUEUE_SIZE: u16 = 64;

/// How many times a driver polls the used ring (with a `pause` between polls) before it gives
/// up on a chain with [`DriverFailure::QueueStalled`], by default. A poll took about 250 ns
/// here (2^16 in 17 ms), so this is about 8 s. The drivers' `poll_limit` field changes it.
pub const POLL_LIMIT: u32 = 1 << 25;

/// Why a driver gave up (the value of a [`TAG_DRIVER_FAILED`] report).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverFailure {
    /// MagicValue was not "virt".
    BadMagic = 1,
    /// Version was not 2.
    BadVersion = 2,
    /// DeviceID was not the expected device.
    WrongDevice = 3,
    /// The device does not offer a feature the driver requires.
    FeaturesMissing = 4,
    /// FEATURES_OK did not stick.
    FeaturesRejected = 5,
    /// A queue was already ready, or its QueueNumMax is below the driver's queue size.
    QueueUnavailable = 6,
    /// DRIVER_OK did not stick, or the device asked for a reset.
    DriverOkRejected = 7,
    /// The device did not return a submitted chain within the driver's poll limit.
    QueueStalled = 8,
    /// The host did not do what the driver waited for (start a hinting pass, answer its
    /// STOP) within the driver's poll limit.
    HostTimeout = 9,
}

impl DriverFailure {
    /// The failure for a reported code.
    pub fn from_code(code: u64) -> Option<DriverFailure> {
        use DriverFailure::*;
        [
            BadMagic,
            BadVersion,
            WrongDevice,
            FeaturesMissing,
            FeaturesRejected,
            QueueUnavailable,
            DriverOkRejected,
            QueueStalled,
            HostTimeout,
        ]
        .into_iter()
        .find(|f| *f as u64 == code)
    }
}

/// One split virtqueue, placed in one 4 KiB page at `page_off` from the scratch base:
/// descriptors at +0, the avail ring at +0x800, the used ring at +0xc00.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Virtq {
    /// Queue index.
    pub index: u32,
    /// Offset of the queue's page from the scratch base.
    pub page_off: i32,
    /// Queue size (power of two, at most [`MAX_QUEUE_SIZE`]).
    pub size: u16,
}

impl Virtq {
    /// The balloon drivers' three queues (inflate, deflate, and the third one: reporting or
    /// free page hinting), each of `size`, in the scratch pages after the mailbox page.
    pub fn balloon_queues(size: u16) -> [Virtq; 3] {
        [0, 1, 2].map(|i| Virtq {
            index: i,
            page_off: 0x1000 * (i as i32 + 1),
            size,
        })
    }

    /// Offset of descriptor `i` from the scratch base.
    pub fn desc(&self, i: i32) -> i32 {
        self.page_off + 16 * i
    }
    /// Offset of the avail ring.
    pub fn avail(&self) -> i32 {
        self.page_off + 0x800
    }
    /// Offset of the used ring.
    pub fn used(&self) -> i32 {
        self.page_off + 0xc00
    }
}

/// Checks common to the drivers' parameters, against the layout and the image's range.
pub(crate) fn check_common(
    layout: &Layout,
    image: &Range<u64>,
    mmio_base: u64,
    scratch: Range<u64>,
    queue_size: u16,
    min_queue_size: u16,
) -> Result<(), String> {
    let hole = MMIO_HOLE_START..MMIO_HOLE_END;
    let report = REPORT_BASE..REPORT_BASE + (MAX_TAG + 1) * 8;
    if mmio_base % MMIO_WINDOW != 0
        || !hole.contains(&mmio_base)
        || mmio_base + MMIO_WINDOW > hole.end
        || (mmio_base < report.end && report.start < mmio_base + MMIO_WINDOW)
    {
        return Err(format!(
            "MMIO window at {mmio_base:#x} must be 4 KiB aligned inside the 32-bit hole and \
             clear of the report window"
        ));
    }
    let low = layout.low_ram();
    if scratch.start % 4096 != 0 || scratch.start < low.start || scratch.end > low.end {
        return Err(format!(
            "scratch {scratch:x?} must be 4 KiB aligned inside low RAM {low:x?}"
        ));
    }
    if overlaps(&scratch, image) {
        return Err(format!(
            "scratch {scratch:x?} overlaps the image {image:x?}"
        ));
    }
    if !queue_size.is_power_of_two() || queue_size < min_queue_size || queue_size > MAX_QUEUE_SIZE {
        return Err(format!(
            "queue size {queue_size} must be a power of two in {min_queue_size}..={MAX_QUEUE_SIZE}"
        ));
    }
    Ok(())
}

/// Whether `data`, the memory a driver's program works on, is a non-empty range aligned to
/// `align` at both ends, inside one boot RAM range of `layout`, and clear of the `image` and
/// the driver's `scratch`.
pub(crate) fn data_range_ok(
    layout: &Layout,
    image: &Range<u64>,
    scratch: &Range<u64>,
    data: &Range<u64>,
    align: u64,
) -> bool {
    let in_ram = layout
        .boot_ram_ranges()
        .iter()
        .any(|m| m.start <= data.start && data.end <= m.end);
    !data.is_empty()
        && data.start % align == 0
        && data.end % align == 0
        && in_ram
        && !overlaps(data, image)
        && !overlaps(data, scratch)
}

/// Whether two ranges share a byte.
pub(crate) fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Report `value` under `tag` (r14 holds the report base).
pub(crate) fn report(
    a: &mut CodeAssembler,
    tag: u64,
    value: AsmRegister64,
) -> Result<(), IcedError> {
    a.mov(qword_ptr(r14 + (tag.min(MAX_TAG) * 8) as i32), value)
}

/// `mov dword [r15 + off], imm`.
fn mmio_write(a: &mut CodeAssembler, off: i32, value: u32) -> Result<(), IcedError> {
    a.mov(dword_ptr(r15 + off), value as i32)
}

/// `mov eax, dword [r15 + off]`.
fn mmio_read(a: &mut CodeAssembler, off: i32) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(r15 + off))
}

/// Load `code` into eax and jump to `fail` if the flags say `jump` (the mov keeps the flags).
fn fail_unless(
    a: &mut CodeAssembler,
    fail: CodeLabel,
    code: DriverFailure,
    jump: fn(&mut CodeAssembler, CodeLabel) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    a.mov(eax, code as u32)?;
    jump(a, fail)
}

/// Spin `spins` times on `pause` (clobbers ecx).
pub(crate) fn spin(a: &mut CodeAssembler, spins: u32) -> Result<(), IcedError> {
    let mut l = a.create_label();
    a.mov(ecx, spins.max(1))?;
    a.set_label(&mut l)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(l)
}

/// Wait until the mailbox holds at least `value` (clobbers rax, rcx).
pub(crate) fn wait_mailbox(a: &mut CodeAssembler, value: u64) -> Result<(), IcedError> {
    wait_mailbox_idle(a, value, 0)
}

/// Idle once between two polls: a guest wait request ([`super::program::TAG_WAIT`]) of
/// `wait_us` microseconds (the microVM blocks the vCPU until the host has news for the guest),
/// or with 0 a `pause`.
pub(crate) fn emit_idle(a: &mut CodeAssembler, wait_us: u32) -> Result<(), IcedError> {
    if wait_us == 0 {
        return a.pause();
    }
    // An immediate store; the value is sign-extended, so keep it below 2^31.
    let us = wait_us.min(i32::MAX as u32) as i32;
    a.mov(qword_ptr(r14 + (super::program::TAG_WAIT * 8) as i32), us)
}

/// Wait until the mailbox holds at least `value`, idling with [`emit_idle`] between polls
/// (clobbers rax, rcx).
pub(crate) fn wait_mailbox_idle(
    a: &mut CodeAssembler,
    value: u64,
    wait_us: u32,
) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut top)?;
    a.mov(rax, qword_ptr(rbp + MAILBOX_OFFSET as i32))?;
    a.mov(rcx, value)?;
    a.cmp(rax, rcx)?;
    a.jae(done)?;
    emit_idle(a, wait_us)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.nop()
}

/// Probe the device at `r15`, negotiate exactly `features`, set up `queues`, set DRIVER_OK and
/// report [`TAG_DRIVER_READY`]. On any failure: eax = [`DriverFailure`] code, jump to `fail`.
/// Clobbers rax, rcx, rdi.
pub(crate) fn emit_probe(
    a: &mut CodeAssembler,
    device_id: u32,
    features: u64,
    queues: &[Virtq],
    fail: CodeLabel,
) -> Result<(), IcedError> {
    mmio_read(a, reg::MAGIC)?;
    a.cmp(eax, MAGIC_VALUE as i32)?;
    fail_unless(a, fail, DriverFailure::BadMagic, CodeAssembler::jne)?;
    mmio_read(a, reg::VERSION)?;
    a.cmp(eax, 2)?;
    fail_unless(a, fail, DriverFailure::BadVersion, CodeAssembler::jne)?;
    mmio_read(a, reg::DEVICE_ID)?;
    a.cmp(eax, device_id as i32)?;
    fail_unless(a, fail, DriverFailure::WrongDevice, CodeAssembler::jne)?;
    // Reset, then ACKNOWLEDGE and DRIVER.
    mmio_write(a, reg::STATUS, 0)?;
    mmio_write(a, reg::STATUS, status::ACKNOWLEDGE)?;
    mmio_write(a, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER)?;
    // Every feature the driver needs must be offered; it accepts exactly those.
    for word in 0..2u32 {
        let want = (features >> (32 * word)) as u32;
        mmio_write(a, reg::DEVICE_FEATURES_SEL, word)?;
        mmio_read(a, reg::DEVICE_FEATURES)?;
        a.and(eax, want as i32)?;
        a.cmp(eax, want as i32)?;
        fail_unless(a, fail, DriverFailure::FeaturesMissing, CodeAssembler::jne)?;
        mmio_write(a, reg::DRIVER_FEATURES_SEL, word)?;
        mmio_write(a, reg::DRIVER_FEATURES, want)?;
    }
    let driver = status::ACKNOWLEDGE | status::DRIVER;
    mmio_write(a, reg::STATUS, driver | status::FEATURES_OK)?;
    mmio_read(a, reg::STATUS)?;
    a.test(eax, status::FEATURES_OK as i32)?;
    fail_unless(a, fail, DriverFailure::FeaturesRejected, CodeAssembler::je)?;
    for q in queues {
        emit_queue_setup(a, q, fail)?;
    }
    mmio_write(
        a,
        reg::STATUS,
        driver | status::FEATURES_OK | status::DRIVER_OK,
    )?;
    mmio_read(a, reg::STATUS)?;
    a.test(eax, status::NEEDS_RESET as i32)?;
    fail_unless(a, fail, DriverFailure::DriverOkRejected, CodeAssembler::jne)?;
    mmio_read(a, reg::STATUS)?;
    a.test(eax, status::DRIVER_OK as i32)?;
    fail_unless(a, fail, DriverFailure::DriverOkRejected, CodeAssembler::je)?;
    mmio_read(a, reg::STATUS)?;
    report(a, TAG_DRIVER_READY, rax)
}

/// Zero the queue's page, mark the avail ring NO_INTERRUPT, and hand its addresses to the
/// device.
fn emit_queue_setup(a: &mut CodeAssembler, q: &Virtq, fail: CodeLabel) -> Result<(), IcedError> {
    a.lea(rdi, qword_ptr(rbp + q.page_off))?;
    a.mov(ecx, 512)?;
    a.xor(eax, eax)?;
    a.rep().stosq()?;
    a.mov(word_ptr(rbp + q.avail()), AVAIL_F_NO_INTERRUPT as i32)?;
    mmio_write(a, reg::QUEUE_SEL, q.index)?;
    mmio_read(a, reg::QUEUE_READY)?;
    a.test(eax, eax)?;
    fail_unless(a, fail, DriverFailure::QueueUnavailable, CodeAssembler::jne)?;
    mmio_read(a, reg::QUEUE_NUM_MAX)?;
    a.cmp(eax, i32::from(q.size))?;
    fail_unless(a, fail, DriverFailure::QueueUnavailable, CodeAssembler::jb)?;
    mmio_write(a, reg::QUEUE_NUM, u32::from(q.size))?;
    for (reg_off, area) in [
        (reg::QUEUE_DESC, q.desc(0)),
        (reg::QUEUE_DRIVER, q.avail()),
        (reg::QUEUE_DEVICE, q.used()),
    ] {
        a.lea(rax, qword_ptr(rbp + area))?;
        a.mov(dword_ptr(r15 + reg_off), eax)?;
        a.shr(rax, 32)?;
        a.mov(dword_ptr(r15 + reg_off + 4), eax)?;
    }
    mmio_write(a, reg::QUEUE_READY, 1)
}

/// Write descriptor `i` of `q`: buffer at `rbp + buf_off`, `len` bytes, `flags`, `next`.
pub(crate) fn emit_desc_static(
    a: &mut CodeAssembler,
    q: &Virtq,
    i: i32,
    buf_off: i32,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), IcedError> {
    a.lea(rax, qword_ptr(rbp + buf_off))?;
    a.mov(qword_ptr(rbp + q.desc(i)), rax)?;
    a.mov(dword_ptr(rbp + q.desc(i) + 8), len as i32)?;
    a.mov(word_ptr(rbp + q.desc(i) + 12), i32::from(flags))?;
    a.mov(word_ptr(rbp + q.desc(i) + 14), i32::from(next))
}

/// Make the chain starting at descriptor 0 available, notify the device, and poll the used
/// ring until the device returned it. One chain is in flight at a time, so "returned" means
/// the used index caught up with the avail index. Between polls the driver `pause`s, or with
/// `wait_us > 0` makes a guest wait request ([`super::program::TAG_WAIT`]) of that many
/// microseconds, which the microVM ends when the device signals its interrupt, so the vCPU
/// does not spin while a device thread works. After `poll_limit` polls: eax =
/// [`DriverFailure::QueueStalled`], jump to `fail`. Clobbers rax, rcx, rdx, r8.
pub(crate) fn emit_submit_and_wait(
    a: &mut CodeAssembler,
    q: &Virtq,
    poll_limit: u32,
    wait_us: u32,
    fail: CodeLabel,
) -> Result<(), IcedError> {
    let mut poll = a.create_label();
    let mut done = a.create_label();
    a.movzx(eax, word_ptr(rbp + q.avail() + 2))?;
    a.mov(ecx, eax)?;
    a.and(ecx, i32::from(q.size) - 1)?;
    a.mov(word_ptr(rbp + rcx * 2 + (q.avail() + 4)), 0)?;
    a.inc(eax)?;
    // x86 keeps stores in order: the ring entry is visible before the index.
    a.mov(word_ptr(rbp + q.avail() + 2), ax)?;
    mmio_write(a, reg::QUEUE_NOTIFY, q.index)?;
    a.mov(r8d, poll_limit.max(1))?;
    a.set_label(&mut poll)?;
    a.movzx(edx, word_ptr(rbp + q.used() + 2))?;
    a.cmp(dx, ax)?;
    a.je(done)?;
    if wait_us > 0 {
        // An immediate store: every other register is in use here. The value is
        // sign-extended, so keep it below 2^31.
        let us = wait_us.min(i32::MAX as u32) as i32;
        a.mov(qword_ptr(r14 + (super::program::TAG_WAIT * 8) as i32), us)?;
    } else {
        a.pause()?;
    }
    a.dec(r8d)?;
    a.jnz(poll)?;
    a.mov(eax, DriverFailure::QueueStalled as u32)?;
    a.jmp(fail)?;
    a.set_label(&mut done)?;
    a.nop()
}

/// What [`emit_block_chains`] hands to the device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockChains {
    /// Bytes per descriptor (one block).
    pub len: u32,
    /// Distance between the starts of consecutive blocks (`len`: every block of the range).
    pub step: u32,
    /// Most descriptors per chain (also bounded by the queue size).
    pub capacity: u32,
    /// Polls of the used ring per chain before giving up.
    pub poll_limit: u32,
}

/// Routine: hand the blocks of [rdi, rsi) (one every `c.step` bytes, `c.len` bytes each) to
/// the device as device-writable buffers, in chains of up to `c.capacity` descriptors on `q`,
/// each submitted and waited for (free page reports, free page hints). Counts chains in r12.
/// Clobbers rax, rcx, rdx, rdi, r8. A stalled queue jumps to `fail` (leaving the return
/// address on the stack; the step ends).
pub(crate) fn emit_block_chains(
    a: &mut CodeAssembler,
    q: &Virtq,
    c: BlockChains,
    fail: CodeLabel,
) -> Result<(), IcedError> {
    let mut chain = a.create_label();
    let mut add = a.create_label();
    let mut close = a.create_label();
    let mut done = a.create_label();
    let capacity = c.capacity.clamp(1, u32::from(q.size)) as i32;
    a.set_label(&mut chain)?;
    a.cmp(rdi, rsi)?;
    a.jae(done)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut add)?;
    // Descriptor rcx: rdi, len, device-writable, next rcx + 1.
    a.mov(eax, ecx)?;
    a.shl(eax, 4)?;
    a.mov(qword_ptr(rbp + rax + q.desc(0)), rdi)?;
    a.mov(dword_ptr(rbp + rax + (q.desc(0) + 8)), c.len as i32)?;
    a.mov(
        word_ptr(rbp + rax + (q.desc(0) + 12)),
        i32::from(DESC_F_WRITE | DESC_F_NEXT),
    )?;
    a.lea(edx, dword_ptr(rcx + 1))?;
    a.mov(word_ptr(rbp + rax + (q.desc(0) + 14)), dx)?;
    a.mov(eax, c.step)?;
    a.add(rdi, rax)?;
    a.inc(ecx)?;
    a.cmp(ecx, capacity)?;
    a.jae(close)?;
    a.cmp(rdi, rsi)?;
    a.jb(add)?;
    a.set_label(&mut close)?;
    // The last descriptor ends the chain.
    a.lea(eax, dword_ptr(rcx - 1))?;
    a.shl(eax, 4)?;
    a.mov(
        word_ptr(rbp + rax + (q.desc(0) + 12)),
        i32::from(DESC_F_WRITE),
    )?;
    emit_submit_and_wait(a, q, c.poll_limit, 0, fail)?;
    a.inc(r12)?;
    a.jmp(chain)?;
    a.set_label(&mut done)?;
    a.ret()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_failure_codes_round_trip() {
        for c in 1..=9 {
            let f = DriverFailure::from_code(c).expect("known code");
            assert_eq!(f as u64, c);
        }
        assert_eq!(DriverFailure::from_code(0), None);
        assert_eq!(DriverFailure::from_code(10), None);
    }

    #[test]
    fn queue_page_layout_fits_one_page() {
        let q = Virtq {
            index: 2,
            page_off: 0x3000,
            size: MAX_QUEUE_SIZE,
        };
        let n = i32::from(q.size);
        assert_eq!(q.desc(0), 0x3000);
        assert!(q.desc(n) <= q.avail());
        // flags, idx, ring[n], used_event
        assert!(q.avail() + 6 + 2 * n <= q.used());
        // flags, idx, ring[n] of 8 bytes, avail_event
        assert!(q.used() + 6 + 8 * n <= q.page_off + 0x1000);
        assert_eq!(q.avail() % 2, 0);
        assert_eq!(q.used() % 4, 0);
    }
}
