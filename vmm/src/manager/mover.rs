//! The daemon's compaction and NUMA rebalancing: [`VmPoolActions`] runs guest-mm's
//! `compact_until` and `migrate_misplaced` with a [`VmBlockMover`] over every VM's blocks.
//!
//! A round lists the VMs' blocks on their threads (no pool lock held), then runs the pool
//! operation. Moves of file-backed blocks need their VM quiesced; the first round refuses
//! them and names the VMs, and each such VM then gets a round of its own while quiesced
//! ([`VmPoolActions::quiesced`]: vCPUs paused on the VM thread, which then waits, and every
//! device transport's lock held, virtio-mem's giving the mover the hot-plug records). The
//! quiesce is taken before the zone lock, in the same order as a plug (transport, then zone).

use std::collections::BTreeMap;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Weak};
use std::time::Duration;

use guest_mm::compaction::compact_until;
use guest_mm::frame::{FrameId, NodeId};
use guest_mm::monitor::{Action, Thresholds};
use guest_mm::pool::Pool;

use super::VmManager;
use crate::devices::{lock, PoolMemoryBackend};
use crate::microvm::{LifecycleOp, VmLifecycle};
use crate::reclaim::monitor::{evaluate_pool, failed};
use crate::reclaim::{
    ActionError, ActionOutcome, MoveCounters, PhysicalMove, PoolActions, VmBlockMover, VmBlocks,
};

/// Longest time a VM stays quiesced for one round.
const QUIESCE_LIMIT: Duration = Duration::from_secs(10);
/// Most VMs quiesced (one after the other) for one compaction or rebalancing.
const MAX_QUIESCE_ROUNDS: usize = 4;

/// [`PoolActions`] of the daemon: guest-mm's decisions, compaction and rebalancing over the
/// VMs of a manager.
pub struct VmPoolActions {
    pool: Arc<Pool>,
    manager: Weak<VmManager>,
    counters: Arc<MoveCounters>,
    physical: PhysicalMove,
}

impl std::fmt::Debug for VmPoolActions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmPoolActions")
            .field("physical", &self.physical)
            .finish_non_exhaustive()
    }
}

impl VmPoolActions {
    /// Actions on `pool` (the pool `manager` allocates from), counting every move in
    /// `counters`.
    pub fn new(pool: Arc<Pool>, manager: Weak<VmManager>, counters: Arc<MoveCounters>) -> Self {
        VmPoolActions {
            pool,
            manager,
            counters,
            physical: PhysicalMove::for_host(),
        }
    }

    /// The VMs' blocks, listed on their threads.
    fn list(&self) -> Vec<VmBlocks> {
        let Some(m) = self.manager.upgrade() else {
            return Vec::new();
        };
        m.list()
            .iter()
            .filter_map(|info| match m.call(&info.id, |vm| VmBlocks::of(vm)) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(vm = %info.id, error = %e, "blocks not listed for moving");
                    None
                }
            })
            .collect()
    }

    /// Run `f` with VM `vm` quiesced: its vCPUs paused (by its thread, which then waits so no
    /// request can resume them) and every device transport's lock held; `f` gets the
    /// virtio-mem backend from the held transport.
    fn quiesced<R>(
        &self,
        vm: &VmBlocks,
        f: impl FnOnce(Option<&mut PoolMemoryBackend>) -> R,
    ) -> Result<R, String> {
        let m = self.manager.upgrade().ok_or("the manager is gone")?;
        let bus = m
            .call(&vm.id, |v| Arc::clone(v.bus()))
            .map_err(|e| e.to_string())?;
        let (paused_tx, paused_rx) = sync_channel::<Result<(), String>>(1);
        let (done_tx, done_rx) = sync_channel::<()>(1);
        m.post(&vm.id, move |v| {
            let we_paused = match v.state() {
                VmLifecycle::Running => match v.apply(LifecycleOp::Pause) {
                    Ok(_) => true,
                    Err(e) => {
                        let _ = paused_tx.send(Err(e.to_string()));
                        return;
                    }
                },
                // Created, paused or stopped: no vCPU runs.
                _ => false,
            };
            if paused_tx.send(Ok(())).is_ok() {
                // Done, or the mover's side ended: resume either way.
                let _ = done_rx.recv_timeout(QUIESCE_LIMIT);
            }
            if we_paused {
                if let Err(e) = v.apply(LifecycleOp::Resume) {
                    tracing::error!(vm = %v.id(), error = %e, "resume after moving blocks failed");
                }
            }
        })
        .map_err(|e| e.to_string())?;
        drop(m);
        match paused_rx.recv_timeout(QUIESCE_LIMIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("pause: {e}")),
            Err(_) => return Err("the VM thread did not pause".into()),
        }
        let r = {
            let mut mem = vm.hot.as_ref().map(|t| lock(t));
            let mem_ptr = vm
                .hot
                .as_ref()
                .map(|t| Arc::as_ptr(t) as *const () as usize);
            let _others: Vec<_> = bus
                .slots()
                .iter()
                .filter(|s| Some(Arc::as_ptr(&s.transport) as *const () as usize) != mem_ptr)
                .map(|s| lock(&s.transport))
                .collect();
            f(mem.as_mut().map(|g| g.device_mut().backend_mut()))
        };
        let _ = done_tx.send(());
        Ok(r)
    }

    /// Run `round` once with no VM quiesced, then once per VM it names (at most
    /// [`MAX_QUIESCE_ROUNDS`]) with that VM quiesced, until it reports success.
    ///
    /// `round` returns its outcome and the moves its mover deferred for want of a quiesce, by
    /// VM ([`VmBlockMover::deferred`], counted `deferred_to_quiesce`). A deferred move gets
    /// its final count here only when it stays undone: if the goal is still unmet at the end,
    /// the deferrals of VMs that got no quiesced round count as `refused_needs_quiesce`, those
    /// of VMs whose quiesce failed as `refused_quiesce_failed`. A VM that got its round has its
    /// moves counted there (`moved_copied`, `refused_*`); a goal reached makes the remaining
    /// deferrals moot (no refusal).
    fn rounds(
        &self,
        vms: &[VmBlocks],
        mut round: impl FnMut(
            VmBlockMover<'_>,
        ) -> Result<(ActionOutcome, BTreeMap<usize, u64>), ActionError>,
    ) -> Result<ActionOutcome, ActionError> {
        let node_of = |f: FrameId| -> Option<NodeId> { self.pool.node_of(f) };
        let new_mover = || VmBlockMover::new(vms, &node_of, &self.counters, self.physical);
        let (first, deferred) = round(new_mover())?;
        let mut out = first;
        let order: Vec<usize> = deferred.keys().copied().collect();
        // Deferred moves not yet settled, by VM.
        let mut pending = deferred;
        let mut quiesce_failed = 0u64;
        for vi in order.into_iter().take(MAX_QUIESCE_ROUNDS) {
            if out.succeeded {
                break;
            }
            let Some(vm) = vms.get(vi) else { continue };
            let n = pending.remove(&vi).unwrap_or(0);
            let r = self.quiesced(vm, |backend| round(new_mover().with_quiesced(vi, backend)));
            match r {
                Ok(r) => {
                    let (o, more) = r?;
                    out.frames_moved += o.frames_moved;
                    out.refused = o.refused;
                    out.succeeded = o.succeeded;
                    // Other VMs' moves this round deferred again.
                    for (v, m) in more {
                        if v != vi {
                            *pending.entry(v).or_insert(0) += m;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(vm = %vm.id, error = %e, "quiesce for moving blocks failed");
                    quiesce_failed += n.max(1);
                }
            }
        }
        if !out.succeeded {
            self.counters
                .add("refused_needs_quiesce", pending.values().sum());
            self.counters.add("refused_quiesce_failed", quiesce_failed);
        }
        Ok(out)
    }
}

impl PoolActions for VmPoolActions {
    fn evaluate(&self, th: &Thresholds) -> Result<(Vec<Action>, u64), ActionError> {
        evaluate_pool(&self.pool, th)
    }

    fn compact(&self, node: NodeId, order: u8) -> Result<ActionOutcome, ActionError> {
        let vms = self.list();
        self.rounds(&vms, |mut mover| {
            let r = self
                .pool
                .with_zone(node, |z| compact_until(z, order, &mut mover))
                .map_err(failed)?;
            Ok((
                ActionOutcome {
                    succeeded: r.succeeded(),
                    frames_moved: r.frames_moved,
                    refused: r.moves_refused,
                },
                mover.deferred(),
            ))
        })
    }

    fn rebalance(&self) -> Result<ActionOutcome, ActionError> {
        let vms = self.list();
        let mut out = ActionOutcome {
            succeeded: true,
            ..Default::default()
        };
        for (i, vm) in vms.iter().enumerate() {
            let blocks = vm.allocations();
            let o = self.rounds(&vms, |mut mover| {
                let st = self
                    .pool
                    .migrate_misplaced(&blocks, &vm.policy, &mut mover)
                    .map_err(failed)?;
                let wanted = mover
                    .deferred()
                    .into_iter()
                    .filter(|(w, _)| *w == i)
                    .collect();
                Ok((
                    ActionOutcome {
                        succeeded: st.mover_refused == 0 && st.no_room == 0,
                        frames_moved: st.moved_frames,
                        refused: st.mover_refused,
                    },
                    wanted,
                ))
            })?;
            out.frames_moved += o.frames_moved;
            out.refused += o.refused;
            out.succeeded &= o.succeeded;
        }
        Ok(out)
    }
}

#[cfg(test)]
#[path = "mover_tests.rs"]
mod tests;
