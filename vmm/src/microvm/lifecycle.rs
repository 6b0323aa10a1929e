//! The VM lifecycle state machine: Created → Running ⇄ Paused → Stopped, with typed errors for
//! forbidden transitions. A guest that ends on its own (finished, crashed) moves the VM to
//! Stopped with the cause kept. Deletion is allowed from every state.

use std::fmt;

/// Lifecycle state of a microVM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmLifecycle {
    /// Built, vCPUs not started.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs parked; devices and memory stay.
    Paused,
    /// vCPUs ended; terminal (delete it).
    Stopped(StopCause),
}

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The host asked for it.
    Requested,
    /// The guest ended its program (the tiny guest's done report, or HLT without irqchip).
    GuestFinished,
    /// The guest crashed (triple fault, emulation failure) or its vCPU failed.
    GuestFailed(String),
}

impl fmt::Display for VmLifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmLifecycle::Created => f.write_str("created"),
            VmLifecycle::Running => f.write_str("running"),
            VmLifecycle::Paused => f.write_str("paused"),
            VmLifecycle::Stopped(StopCause::Requested) => f.write_str("stopped"),
            VmLifecycle::Stopped(StopCause::GuestFinished) => {
                f.write_str("stopped (guest finished)")
            }
            VmLifecycle::Stopped(StopCause::GuestFailed(r)) => {
                write!(f, "stopped (guest failed: {r})")
            }
        }
    }
}

/// A lifecycle operation the host asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleOp {
    /// Created → Running.
    Start,
    /// Running → Paused.
    Pause,
    /// Paused → Running.
    Resume,
    /// Created | Running | Paused → Stopped.
    Stop,
}

impl fmt::Display for LifecycleOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LifecycleOp::Start => "start",
            LifecycleOp::Pause => "pause",
            LifecycleOp::Resume => "resume",
            LifecycleOp::Stop => "stop",
        })
    }
}

/// A transition the state machine forbids.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {op} a VM that is {from}")]
pub struct TransitionError {
    /// The operation asked for.
    pub op: LifecycleOp,
    /// The state the VM was in.
    pub from: VmLifecycle,
}

impl VmLifecycle {
    /// The state `op` leads to, or the error naming the forbidden transition.
    pub fn next(&self, op: LifecycleOp) -> Result<VmLifecycle, TransitionError> {
        use LifecycleOp as O;
        use VmLifecycle as S;
        match (op, self) {
            (O::Start, S::Created) | (O::Resume, S::Paused) => Ok(S::Running),
            (O::Pause, S::Running) => Ok(S::Paused),
            (O::Stop, S::Created | S::Running | S::Paused) => Ok(S::Stopped(StopCause::Requested)),
            _ => Err(TransitionError {
                op,
                from: self.clone(),
            }),
        }
    }

    /// Whether the VM is stopped (for any cause).
    pub fn is_stopped(&self) -> bool {
        matches!(self, VmLifecycle::Stopped(_))
    }

    /// Why the VM stopped, when it was not a request (the API's `stop_reason`).
    pub fn stop_reason(&self) -> Option<String> {
        match self {
            VmLifecycle::Stopped(StopCause::GuestFinished) => Some("guest finished".into()),
            VmLifecycle::Stopped(StopCause::GuestFailed(r)) => Some(format!("guest failed: {r}")),
            _ => None,
        }
    }

    /// The API's name of the state.
    pub fn api_state(&self) -> tidepool_api::types::VmState {
        use tidepool_api::types::VmState;
        match self {
            VmLifecycle::Created => VmState::Created,
            VmLifecycle::Running => VmState::Running,
            VmLifecycle::Paused => VmState::Paused,
            VmLifecycle::Stopped(_) => VmState::Stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_api::types::{StateAction, VmState};

    #[test]
    fn allowed_and_forbidden_transitions() {
        use LifecycleOp as O;
        use VmLifecycle as S;
        assert_eq!(S::Created.next(O::Start), Ok(S::Running));
        assert_eq!(S::Running.next(O::Pause), Ok(S::Paused));
        assert_eq!(S::Paused.next(O::Resume), Ok(S::Running));
        assert_eq!(
            S::Paused.next(O::Stop),
            Ok(S::Stopped(StopCause::Requested))
        );
        let e = S::Created.next(O::Pause).expect_err("pause of created");
        assert_eq!(e.from, S::Created);
        assert_eq!(e.to_string(), "cannot pause a VM that is created");
        assert!(S::Running.next(O::Start).is_err());
        assert!(S::Running.next(O::Resume).is_err());
        assert!(S::Paused.next(O::Pause).is_err());
        let failed = S::Stopped(StopCause::GuestFailed("triple fault".into()));
        for op in [O::Start, O::Pause, O::Resume, O::Stop] {
            assert!(failed.next(op).is_err(), "{op} from stopped");
        }
    }

    #[test]
    fn agrees_with_the_api_rules() {
        let states = [
            VmLifecycle::Created,
            VmLifecycle::Running,
            VmLifecycle::Paused,
            VmLifecycle::Stopped(StopCause::Requested),
        ];
        let ops = [
            (LifecycleOp::Start, StateAction::Start),
            (LifecycleOp::Pause, StateAction::Pause),
            (LifecycleOp::Resume, StateAction::Resume),
            (LifecycleOp::Stop, StateAction::Stop),
        ];
        for s in &states {
            for (op, action) in ops {
                let ours = s.next(op).ok().map(|n| n.api_state());
                let theirs: Option<VmState> = action.apply(s.api_state());
                assert_eq!(ours, theirs, "{op} from {s}");
            }
        }
    }
}
