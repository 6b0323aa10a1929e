//! The density benchmark's guest loop ([`super::fpr_driver::FprProgram::Density`]), emitted by
//! the polled free-page-reporting driver at CPL3.
//!
//! The guest owns a ring `[base, ring_end)` of its RAM and works in phases until the host
//! writes a non-zero value to the driver's mailbox (or `max_phases` phases ran). Phase `k`:
//! 1. reports [`TAG_DENSITY_START`] (value `k`): the host notes the time and the vCPU
//!    thread's scheduler counters;
//! 2. touches the next `window` bytes of the ring (wrapping at `ring_end`), writing
//!    `gpa ^ phase_seed(seed, k)` in the first word of every 4 KiB page, then reports
//!    [`TAG_DENSITY_TOUCHED`] (value `k`);
//! 3. from phase 1 on, reads the previous window back against the previous phase's pattern,
//!    reports the mismatching pages ([`TAG_DENSITY_VERIFIED`]), then reports that window free
//!    on the reporting queue in chains of up to 32 blocks of 2 MiB;
//! 4. reports [`TAG_DENSITY_PHASE`] (value `k`): the host may pace the guest there.
//!
//! On stop it verifies and reports the last window touched too, then reports the chain count
//! ([`super::fpr_driver::TAG_FPR_CHAINS`]), the total of mismatching pages
//! ([`TAG_DENSITY_MISMATCHES`]) and the number of phases ([`TAG_DENSITY_DONE`]).
//!
//! Loop state lives in the mailbox page of the driver's scratch (offsets from
//! [`STATE_OFFSET`]); `rbx` counts phases, `r13` the current verify's mismatches, `r12` chains.

use iced_x86::code_asm::*;

use super::fpr_driver::TAG_FPR_CHAINS;
use super::virtq::{report, MAILBOX_OFFSET};

/// Report tag: a phase starts; the value is its index.
pub const TAG_DENSITY_START: u64 = 60;
/// Report tag: the phase's window is touched; the value is the phase index.
pub const TAG_DENSITY_TOUCHED: u64 = 61;
/// Report tag: the previous window was read back; the value is the pages whose first word did
/// not hold the pattern written to it.
pub const TAG_DENSITY_VERIFIED: u64 = 62;
/// Report tag: a phase ended (its previous window reported free); the value is its index.
pub const TAG_DENSITY_PHASE: u64 = 63;
/// Report tag: total mismatching pages over the run (sent once, at the end).
pub const TAG_DENSITY_MISMATCHES: u64 = 64;
/// Report tag: the loop stopped; the value is the number of phases run.
pub const TAG_DENSITY_DONE: u64 = 65;

/// Offset in the mailbox page where the loop keeps its state (clear of the mailbox word).
pub const STATE_OFFSET: i32 = 0x100;
const S_CUR: i32 = STATE_OFFSET;
const S_PREV: i32 = STATE_OFFSET + 8;
const S_SEED_CUR: i32 = STATE_OFFSET + 16;
const S_SEED_PREV: i32 = STATE_OFFSET + 24;
const S_TOTAL: i32 = STATE_OFFSET + 32;

/// Multiplier that spreads phase indices over the seed's bits.
const PHASE_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// The pattern seed of phase `phase` for a VM whose driver seed is `seed`: the first word of
/// each touched page at `gpa` holds `gpa ^ phase_seed(seed, phase)`.
pub fn phase_seed(seed: u64, phase: u64) -> u64 {
    seed ^ phase.wrapping_add(1).wrapping_mul(PHASE_MIX)
}

/// The loop's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DensityParams {
    pub base: u64,
    pub ring_end: u64,
    pub window: u64,
    pub max_phases: u32,
    pub seed: u64,
}

/// Emit the loop. `report_free` is the driver's routine reporting `[rdi, rsi)` free (clobbers
/// rax, rcx, rdx, rdi, r8).
pub(crate) fn emit_density(
    a: &mut CodeAssembler,
    p: DensityParams,
    report_free: CodeLabel,
) -> Result<(), IcedError> {
    let mut touch = a.create_label();
    let mut verify = a.create_label();
    let mut main = a.create_label();
    a.jmp(main)?;
    // A label needs its own instruction: each routine starts with a nop.
    a.set_label(&mut touch)?;
    a.nop()?;
    emit_touch_seeded(a)?;
    a.set_label(&mut verify)?;
    a.nop()?;
    emit_verify_seeded(a)?;

    a.set_label(&mut main)?;
    let mut top = a.create_label();
    let mut skip_prev = a.create_label();
    let mut no_wrap = a.create_label();
    let mut stop = a.create_label();
    let mut end = a.create_label();
    a.xor(ebx, ebx)?;
    a.mov(rax, p.base)?;
    a.mov(qword_ptr(rbp + S_CUR), rax)?;
    a.mov(qword_ptr(rbp + S_PREV), rax)?;
    a.mov(qword_ptr(rbp + S_TOTAL), 0)?;

    a.set_label(&mut top)?;
    a.mov(rax, qword_ptr(rbp + MAILBOX_OFFSET as i32))?;
    a.test(rax, rax)?;
    a.jnz(stop)?;
    if p.max_phases != 0 {
        a.cmp(rbx, p.max_phases as i32)?;
        a.jae(stop)?;
    }
    // seed_cur = seed ^ (phase + 1) * PHASE_MIX
    a.lea(rax, qword_ptr(rbx + 1))?;
    a.mov(rcx, PHASE_MIX)?;
    a.imul_2(rax, rcx)?;
    a.mov(rcx, p.seed)?;
    a.xor(rax, rcx)?;
    a.mov(qword_ptr(rbp + S_SEED_CUR), rax)?;
    report(a, TAG_DENSITY_START, rbx)?;
    emit_on_window(a, &p, S_CUR, touch, Some(S_SEED_CUR))?;
    report(a, TAG_DENSITY_TOUCHED, rbx)?;
    a.test(rbx, rbx)?;
    a.jz(skip_prev)?;
    emit_verify_and_free(a, &p, verify, report_free)?;
    a.set_label(&mut skip_prev)?;
    report(a, TAG_DENSITY_PHASE, rbx)?;
    // prev = cur, seed_prev = seed_cur, cur advances by one window round the ring.
    a.mov(rax, qword_ptr(rbp + S_CUR))?;
    a.mov(qword_ptr(rbp + S_PREV), rax)?;
    a.mov(rcx, qword_ptr(rbp + S_SEED_CUR))?;
    a.mov(qword_ptr(rbp + S_SEED_PREV), rcx)?;
    a.mov(rcx, p.window)?;
    a.add(rax, rcx)?;
    a.mov(rcx, p.ring_end)?;
    a.cmp(rax, rcx)?;
    a.jb(no_wrap)?;
    a.sub(rax, rcx)?;
    a.mov(rcx, p.base)?;
    a.add(rax, rcx)?;
    a.set_label(&mut no_wrap)?;
    a.mov(qword_ptr(rbp + S_CUR), rax)?;
    a.inc(rbx)?;
    a.jmp(top)?;

    a.set_label(&mut stop)?;
    a.test(rbx, rbx)?;
    a.jz(end)?;
    // The last window touched (now the previous one) is checked and goes back too.
    emit_verify_and_free(a, &p, verify, report_free)?;
    a.set_label(&mut end)?;
    report(a, TAG_FPR_CHAINS, r12)?;
    a.mov(rax, qword_ptr(rbp + S_TOTAL))?;
    report(a, TAG_DENSITY_MISMATCHES, rax)?;
    report(a, TAG_DENSITY_DONE, rbx)
}

/// Verify the previous window against its seed, add to the total, report the count, then
/// report the window free.
fn emit_verify_and_free(
    a: &mut CodeAssembler,
    p: &DensityParams,
    verify: CodeLabel,
    report_free: CodeLabel,
) -> Result<(), IcedError> {
    a.xor(r13d, r13d)?;
    emit_on_window(a, p, S_PREV, verify, Some(S_SEED_PREV))?;
    a.add(qword_ptr(rbp + S_TOTAL), r13)?;
    report(a, TAG_DENSITY_VERIFIED, r13)?;
    emit_on_window(a, p, S_PREV, report_free, None)
}

/// Call `routine(rdi, rsi)` over the window starting at the address in slot `start`, split in
/// two calls where it wraps at the ring's end; with `seed`, rdx holds that slot's value at each
/// call.
fn emit_on_window(
    a: &mut CodeAssembler,
    p: &DensityParams,
    start: i32,
    routine: CodeLabel,
    seed: Option<i32>,
) -> Result<(), IcedError> {
    let mut last = a.create_label();
    a.mov(rdi, qword_ptr(rbp + start))?;
    a.mov(rsi, rdi)?;
    a.mov(rax, p.window)?;
    a.add(rsi, rax)?;
    a.mov(rax, p.ring_end)?;
    a.cmp(rsi, rax)?;
    a.jbe(last)?;
    // [rdi, ring_end) now, [base, base + overflow) next.
    a.sub(rsi, rax)?;
    a.push(rsi)?;
    a.mov(rsi, rax)?;
    if let Some(s) = seed {
        a.mov(rdx, qword_ptr(rbp + s))?;
    }
    a.call(routine)?;
    a.pop(rsi)?;
    a.mov(rdi, p.base)?;
    a.add(rsi, rdi)?;
    a.set_label(&mut last)?;
    if let Some(s) = seed {
        a.mov(rdx, qword_ptr(rbp + s))?;
    }
    a.call(routine)
}

/// Routine: write `p ^ rdx` at the first word of every page p of [rdi, rsi). Clobbers rax, rdi.
pub(super) fn emit_touch_seeded(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut top)?;
    a.cmp(rdi, rsi)?;
    a.jae(done)?;
    a.mov(rax, rdi)?;
    a.xor(rax, rdx)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.add(rdi, 4096)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// Routine: r13 += pages p of [rdi, rsi) whose first word is not `p ^ rdx`. Clobbers rax, rdi.
fn emit_verify_seeded(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut ok = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut top)?;
    a.cmp(rdi, rsi)?;
    a.jae(done)?;
    a.mov(rax, rdi)?;
    a.xor(rax, rdx)?;
    a.cmp(qword_ptr(rdi), rax)?;
    a.je(ok)?;
    a.inc(r13)?;
    a.set_label(&mut ok)?;
    a.add(rdi, 4096)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.ret()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_seeds_differ_by_phase_and_vm() {
        assert_ne!(phase_seed(1, 0), phase_seed(1, 1));
        assert_ne!(phase_seed(1, 0), phase_seed(2, 0));
        assert_ne!(phase_seed(0, 0), 0, "phase 0 never writes plain gpa");
    }
}
