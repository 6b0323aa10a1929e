//! A polled virtio-mem driver for the tiny guest (runs at CPL3, no interrupts).
//!
//! It probes the device (magic, version 2, device ID 24), accepts VIRTIO_F_VERSION_1 and
//! UNPLUGGED_INACCESSIBLE, sets up queue 0 and DRIVER_OK; sends UNPLUG_ALL if blocks are
//! still plugged from an earlier driver; then loops:
//!
//! - read `requested_size` and `plugged_size` from config space;
//! - below target: PLUG the next blocks above what is plugged (at most
//!   `blocks_per_request` per request), and on ACK write [`pattern`] to every `stride` of the
//!   new memory, read it back and report the mismatches (unless `touch_plugged` is off: then
//!   the new memory is left untouched, as Linux leaves memory it onlines);
//! - above target: UNPLUG the highest plugged blocks;
//! - NACK or BUSY: report it, pause, retry; ERROR: report it and stop (as Linux marks the
//!   device broken);
//! - at target: report [`TAG_VMEM_SETTLED`] once per new value and pause;
//! - every round starts by reading the mailbox (guest RAM, no exit): [`MAILBOX_STOP`] ends the
//!   loop, and the program goes on with its next step.
//!
//! A chain the device does not return within `poll_limit` polls ends the
//! driver with [`super::virtq::DriverFailure::QueueStalled`].
//!
//! Plugged memory is kept contiguous from the region's start, so `[addr, addr + plugged)` is
//! exactly what the driver plugged.
//!
//! [`pattern`]: super::program::pattern

use std::ops::Range;

use iced_x86::code_asm::*;

use super::program::{Step, Stride, TAG_WAIT};
use super::virtq::{
    check_common, emit_desc_static, emit_probe, emit_submit_and_wait, reg, report, spin, Virtq,
    DESC_F_NEXT, DESC_F_WRITE, FEATURE_VERSION_1, MAILBOX_OFFSET, TAG_DRIVER_FAILED,
};
use super::{GuestImage, TinyGuestBuilder, TinyGuestError};
use crate::memory::Layout;

/// virtio device ID of virtio-mem.
pub const VIRTIO_ID_MEM: u32 = 24;
/// VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE as a feature mask.
pub const FEATURE_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;

/// Report tag: a PLUG was acknowledged; the value is `plugged_size` read back after it.
pub const TAG_VMEM_PLUGGED: u64 = 40;
/// Report tag: an UNPLUG was acknowledged; the value is `plugged_size` read back after it.
pub const TAG_VMEM_UNPLUGGED: u64 = 41;
/// Report tag: words of newly plugged memory that did not read back their pattern.
pub const TAG_VMEM_MISMATCHES: u64 = 42;
/// Report tag: words of newly plugged memory written and checked.
pub const TAG_VMEM_CHECKED: u64 = 43;
/// Report tag: `plugged_size` reached `requested_size`; the value is the size (reported once
/// per new value).
pub const TAG_VMEM_SETTLED: u64 = 44;
/// Report tag: the device answered NACK; the value is the request's address.
pub const TAG_VMEM_NACK: u64 = 45;
/// Report tag: the device answered BUSY; the value is the request's address.
pub const TAG_VMEM_BUSY: u64 = 46;
/// Report tag: the device answered ERROR (or garbage); the value is the response type. The
/// driver stops.
pub const TAG_VMEM_ERROR: u64 = 47;
/// Report tag: the driver loop ended; the value is `plugged_size`.
pub const TAG_VMEM_EXIT: u64 = 48;
/// Report tag: UNPLUG_ALL at start-up was acknowledged; the value is the size it found
/// plugged.
pub const TAG_VMEM_UNPLUGGED_ALL: u64 = 49;

/// Mailbox value that ends the driver loop.
pub const MAILBOX_STOP: u64 = 1;

/// Request types and response codes (virtio 1.2, 5.15.6).
const REQ_PLUG: i32 = 0;
const REQ_UNPLUG: i32 = 1;
const REQ_UNPLUG_ALL: i32 = 2;
const RESP_ACK: i32 = 0;
const RESP_NACK: i32 = 1;
const RESP_BUSY: i32 = 2;

/// Scratch offsets: the request (24 bytes) and the response (10 bytes).
const REQ_OFF: i32 = 0x100;
const RESP_OFF: i32 = 0x140;
/// Config-space offsets.
const CFG_BLOCK_SIZE: i32 = reg::CONFIG;
const CFG_ADDR: i32 = reg::CONFIG + 16;
const CFG_PLUGGED: i32 = reg::CONFIG + 40;
const CFG_REQUESTED: i32 = reg::CONFIG + 48;

/// The polled virtio-mem driver's parameters (a [`super::Step::VirtioMem`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioMemDriver {
    /// Guest-physical base of the device's virtio-mmio window (in the 32-bit hole).
    pub mmio_base: u64,
    /// Guest-physical address of the driver's two scratch pages in low RAM (mailbox and
    /// buffers, then the queue).
    pub scratch: u64,
    /// Size of queue 0 (power of two, at most 64).
    pub queue_size: u16,
    /// Polls of the used ring before the driver gives up on a chain
    /// ([`super::virtq::DriverFailure::QueueStalled`]).
    pub poll_limit: u32,
    /// Most blocks per PLUG/UNPLUG request.
    pub blocks_per_request: u16,
    /// Pattern seed for newly plugged memory.
    pub seed: u64,
    /// Which words of newly plugged memory to write and check.
    pub stride: Stride,
    /// Write and check newly plugged memory at all. Off, the driver only plugs: like a Linux
    /// guest, which hands onlined memory to its page allocator without writing it, so the
    /// host faults nothing in until the guest uses it. No [`TAG_VMEM_MISMATCHES`] or
    /// [`TAG_VMEM_CHECKED`] reports then.
    pub touch_plugged: bool,
    /// `pause` iterations between polls of an idle device and after NACK/BUSY (when
    /// `idle_wait_us` is 0).
    pub poll_spins: u32,
    /// If non-zero, idle (and back off after NACK/BUSY) with a [`TAG_WAIT`] request of this
    /// many microseconds instead of spinning: the VMM blocks the vCPU until a resize or
    /// the time is up, so an idle driver holds no host CPU. The used ring is then polled
    /// between waits of at most 1 ms that the device's interrupt ends, and `poll_limit`
    /// counts those waits.
    pub idle_wait_us: u32,
}

impl VirtioMemDriver {
    /// A driver for the device at `mmio_base` with scratch pages at `scratch`: queue size 32,
    /// one block per request, every page of plugged memory written and checked, 20,000 pauses
    /// between idle polls.
    pub fn new(mmio_base: u64, scratch: u64) -> VirtioMemDriver {
        VirtioMemDriver {
            mmio_base,
            scratch,
            queue_size: 32,
            poll_limit: super::virtq::POLL_LIMIT,
            blocks_per_request: 1,
            seed: 0x5eed_0000_0000_0000,
            stride: Stride::Page,
            touch_plugged: true,
            poll_spins: 20_000,
            idle_wait_us: 0,
        }
    }

    /// Guest-physical address of the mailbox (write [`MAILBOX_STOP`] to end the loop).
    pub fn mailbox(&self) -> u64 {
        self.scratch + MAILBOX_OFFSET
    }

    /// The scratch pages the driver uses.
    pub fn scratch_range(&self) -> Range<u64> {
        self.scratch..self.scratch + 0x2000
    }

    fn queue(&self) -> Virtq {
        Virtq {
            index: 0,
            page_off: 0x1000,
            size: self.queue_size,
        }
    }

    /// Check the parameters against the layout and the image's range.
    pub(crate) fn check(&self, layout: &Layout, image: &Range<u64>) -> Result<(), String> {
        check_common(
            layout,
            image,
            self.mmio_base,
            self.scratch_range(),
            self.queue_size,
            2,
        )?;
        if self.blocks_per_request == 0 || self.poll_spins == 0 {
            return Err("blocks_per_request and poll_spins must be non-zero".into());
        }
        Ok(())
    }

    /// Emit the driver. Registers: r15 MMIO base, rbp scratch, r12 region address, r13 block
    /// size, r9 log2(block size), rbx the last settled size reported.
    pub(crate) fn emit(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let q = self.queue();
        let mut fail = a.create_label();
        let mut exit = a.create_label();
        let mut end = a.create_label();
        let mut main = a.create_label();
        a.mov(r15, self.mmio_base)?;
        a.mov(rbp, self.scratch)?;
        emit_probe(
            a,
            VIRTIO_ID_MEM,
            FEATURE_VERSION_1 | FEATURE_UNPLUGGED_INACCESSIBLE,
            &[q],
            fail,
        )?;
        // The two descriptors never change: request (device-readable), response (writable).
        emit_desc_static(a, &q, 0, REQ_OFF, 24, DESC_F_NEXT, 1)?;
        emit_desc_static(a, &q, 1, RESP_OFF, 10, DESC_F_WRITE, 0)?;
        a.mov(r12, qword_ptr(r15 + CFG_ADDR))?;
        a.mov(r13, qword_ptr(r15 + CFG_BLOCK_SIZE))?;
        a.bsf(r9, r13)?;
        a.mov(rbx, u64::MAX)?;
        // Blocks left plugged by an earlier driver: unplug them all first.
        a.mov(rax, qword_ptr(r15 + CFG_PLUGGED))?;
        a.test(rax, rax)?;
        a.jz(main)?;
        a.push(rax)?;
        self.emit_request(a, &q, REQ_UNPLUG_ALL, None, fail)?;
        a.pop(rdi)?;
        a.movzx(eax, word_ptr(rbp + RESP_OFF))?;
        a.cmp(eax, RESP_ACK)?;
        a.jne(exit)?;
        report(a, TAG_VMEM_UNPLUGGED_ALL, rdi)?;
        a.set_label(&mut main)?;
        a.nop()?;
        self.emit_loop(a, &q, exit, fail)?;
        a.set_label(&mut exit)?;
        a.mov(rax, qword_ptr(r15 + CFG_PLUGGED))?;
        report(a, TAG_VMEM_EXIT, rax)?;
        a.jmp(end)?;
        a.set_label(&mut fail)?;
        report(a, TAG_DRIVER_FAILED, rax)?;
        a.set_label(&mut end)?;
        a.nop()
    }

    /// Fill the request (type; address in rdi and block count in rax unless `None`), clear
    /// the response type, submit, wait. Clobbers rax, rcx, rdx.
    fn emit_request(
        &self,
        a: &mut CodeAssembler,
        q: &Virtq,
        typ: i32,
        range: Option<()>,
        fail: CodeLabel,
    ) -> Result<(), IcedError> {
        a.mov(word_ptr(rbp + REQ_OFF), typ)?;
        if range.is_some() {
            a.mov(qword_ptr(rbp + REQ_OFF + 8), rdi)?;
            a.mov(word_ptr(rbp + REQ_OFF + 16), ax)?;
        } else {
            a.mov(qword_ptr(rbp + REQ_OFF + 8), 0)?;
            a.mov(word_ptr(rbp + REQ_OFF + 16), 0)?;
        }
        a.mov(word_ptr(rbp + RESP_OFF), 0xffff)?;
        emit_submit_and_wait(a, q, self.poll_limit, self.queue_wait_us(), fail)
    }

    fn emit_loop(
        &self,
        a: &mut CodeAssembler,
        q: &Virtq,
        exit: CodeLabel,
        fail: CodeLabel,
    ) -> Result<(), IcedError> {
        let mut top = a.create_label();
        let mut grow = a.create_label();
        let mut shrink = a.create_label();
        let mut idle = a.create_label();
        let mut poll = a.create_label();
        // The mailbox is checked natively on every round, so the host can end the loop
        // while the driver retries too.
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(rbp + MAILBOX_OFFSET as i32))?;
        a.cmp(rax, MAILBOX_STOP as i32)?;
        a.je(exit)?;
        a.mov(rsi, qword_ptr(r15 + CFG_REQUESTED))?;
        a.mov(rdx, qword_ptr(r15 + CFG_PLUGGED))?;
        a.cmp(rdx, rsi)?;
        a.jb(grow)?;
        a.ja(shrink)?;
        // At target: report once per value, then wait.
        a.set_label(&mut idle)?;
        a.cmp(rbx, rdx)?;
        a.je(poll)?;
        a.mov(rbx, rdx)?;
        report(a, TAG_VMEM_SETTLED, rdx)?;
        a.set_label(&mut poll)?;
        self.emit_idle(a)?;
        a.jmp(top)?;

        // Below target: plug n = min(blocks_per_request, (requested - plugged) / block) blocks
        // at addr + plugged.
        a.set_label(&mut grow)?;
        a.mov(rax, rsi)?;
        a.sub(rax, rdx)?;
        a.lea(rdi, qword_ptr(r12 + rdx))?;
        self.emit_count(a)?;
        a.jz(idle)?;
        self.emit_op(a, q, REQ_PLUG, [top, exit, fail], true)?;

        // Above target: unplug n = min(blocks_per_request, (plugged - requested) / block)
        // blocks just below addr + plugged.
        a.set_label(&mut shrink)?;
        a.mov(rax, rdx)?;
        a.sub(rax, rsi)?;
        self.emit_count(a)?;
        a.jz(idle)?;
        a.lea(rdi, qword_ptr(r12 + rdx))?;
        a.sub(rdi, rsi)?;
        self.emit_op(a, q, REQ_UNPLUG, [top, exit, fail], false)
    }

    /// The guest wait between polls of the used ring: none when the driver spins, else
    /// at most 1 ms (the device's interrupt ends it).
    fn queue_wait_us(&self) -> u32 {
        self.idle_wait_us.min(1000)
    }

    /// Wait before the next poll: a [`TAG_WAIT`] request, or `poll_spins` pauses. Clobbers
    /// rax, ecx.
    fn emit_idle(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        if self.idle_wait_us > 0 {
            a.mov(eax, self.idle_wait_us)?;
            report(a, TAG_WAIT, rax)
        } else {
            spin(a, self.poll_spins)
        }
    }

    /// rax = min(rax >> r9, blocks_per_request) blocks; rsi = their length. Sets ZF if none.
    fn emit_count(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.mov(ecx, r9d)?;
        a.shr(rax, cl)?;
        a.mov(r8d, u32::from(self.blocks_per_request))?;
        a.cmp(rax, r8)?;
        a.cmova(rax, r8)?;
        a.mov(rsi, rax)?;
        a.shl(rsi, cl)?;
        a.test(rax, rax)
    }

    /// Send a PLUG or UNPLUG of rax blocks at rdi (rsi bytes) and handle the answer.
    fn emit_op(
        &self,
        a: &mut CodeAssembler,
        q: &Virtq,
        typ: i32,
        [top, exit, fail]: [CodeLabel; 3],
        plug: bool,
    ) -> Result<(), IcedError> {
        let mut not_ack = a.create_label();
        let mut busy = a.create_label();
        let mut retry = a.create_label();
        let mut error = a.create_label();
        a.push(rdi)?;
        a.push(rsi)?;
        self.emit_request(a, q, typ, Some(()), fail)?;
        a.pop(rsi)?;
        a.pop(rdi)?;
        a.movzx(eax, word_ptr(rbp + RESP_OFF))?;
        a.cmp(eax, RESP_ACK)?;
        a.jne(not_ack)?;
        if plug {
            if self.touch_plugged {
                self.emit_fill_verify(a)?;
            }
            a.mov(rax, qword_ptr(r15 + CFG_PLUGGED))?;
            report(a, TAG_VMEM_PLUGGED, rax)?;
        } else {
            a.mov(rax, qword_ptr(r15 + CFG_PLUGGED))?;
            report(a, TAG_VMEM_UNPLUGGED, rax)?;
        }
        a.jmp(top)?;
        a.set_label(&mut not_ack)?;
        a.cmp(eax, RESP_NACK)?;
        a.jne(busy)?;
        report(a, TAG_VMEM_NACK, rdi)?;
        a.jmp(retry)?;
        a.set_label(&mut busy)?;
        a.cmp(eax, RESP_BUSY)?;
        a.jne(error)?;
        report(a, TAG_VMEM_BUSY, rdi)?;
        a.set_label(&mut retry)?;
        self.emit_idle(a)?;
        a.jmp(top)?;
        // ERROR or an unknown answer: the device is broken for this driver.
        a.set_label(&mut error)?;
        report(a, TAG_VMEM_ERROR, rax)?;
        a.jmp(exit)
    }

    /// Write `pattern(p, seed)` at every stride of [rdi, rdi + rsi), read it back, report
    /// mismatches and words checked. Clobbers rax, rcx, rdx, rdi, rsi, r8.
    fn emit_fill_verify(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let stride = self.stride.bytes() as i32;
        let mut fill = a.create_label();
        let mut check = a.create_label();
        let mut ok = a.create_label();
        a.mov(r8, self.seed)?;
        a.lea(rdx, qword_ptr(rdi + rsi))?;
        a.mov(rcx, rdi)?;
        a.set_label(&mut fill)?;
        a.mov(rax, rcx)?;
        a.xor(rax, r8)?;
        a.mov(qword_ptr(rcx), rax)?;
        a.add(rcx, stride)?;
        a.cmp(rcx, rdx)?;
        a.jb(fill)?;
        // rsi: mismatches, rcx: words checked.
        a.xor(esi, esi)?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut check)?;
        a.mov(rax, rdi)?;
        a.xor(rax, r8)?;
        a.inc(rcx)?;
        a.cmp(qword_ptr(rdi), rax)?;
        a.je(ok)?;
        a.inc(rsi)?;
        a.set_label(&mut ok)?;
        a.add(rdi, stride)?;
        a.cmp(rdi, rdx)?;
        a.jb(check)?;
        report(a, TAG_VMEM_MISMATCHES, rsi)?;
        report(a, TAG_VMEM_CHECKED, rcx)
    }
}

/// A tiny guest (for `layout`) that runs `driver` and then reports done: the host changes
/// the device's `requested_size` while it runs and ends it through [`VirtioMemDriver::mailbox`]
/// with [`MAILBOX_STOP`].
pub fn virtio_mem_program(
    layout: &Layout,
    driver: VirtioMemDriver,
) -> Result<GuestImage, TinyGuestError> {
    TinyGuestBuilder::new(layout)
        .step(Step::VirtioMem(driver))
        .step(Step::Done)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{LayoutConfig, MIB};
    use crate::tiny_guest::virtq::DEFAULT_MMIO_BASE;

    fn layout() -> Layout {
        Layout::new(LayoutConfig {
            boot_ram: 128 * MIB,
            hotplug_size: 512 * MIB,
        })
        .expect("layout")
    }

    #[test]
    fn driver_assembles_and_fits() {
        let d = VirtioMemDriver::new(DEFAULT_MMIO_BASE, super::super::virtq::DEFAULT_SCRATCH);
        let img = virtio_mem_program(&layout(), d.clone()).expect("build");
        assert!(img.range().end <= d.scratch);
        assert_eq!(d.mailbox(), d.scratch);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let l = layout();
        let base = VirtioMemDriver::new(DEFAULT_MMIO_BASE, 0x10_0000);
        let cases = [
            VirtioMemDriver {
                mmio_base: 0x10_0000,
                ..base.clone()
            },
            VirtioMemDriver {
                mmio_base: crate::tiny_guest::REPORT_BASE,
                ..base.clone()
            },
            VirtioMemDriver {
                scratch: 0x8000,
                ..base.clone()
            },
            VirtioMemDriver {
                scratch: 128 * MIB,
                ..base.clone()
            },
            VirtioMemDriver {
                queue_size: 48,
                ..base.clone()
            },
            VirtioMemDriver {
                queue_size: 128,
                ..base.clone()
            },
            VirtioMemDriver {
                blocks_per_request: 0,
                ..base.clone()
            },
        ];
        for d in cases {
            let r = virtio_mem_program(&l, d.clone());
            assert!(
                matches!(r, Err(TinyGuestError::BadDriver(_))),
                "{d:?} accepted"
            );
        }
    }
}
