//! vCPU threads that can be paused and resumed: each thread runs its vCPU with
//! [`Vcpu::run_until`], parks on a condition variable when asked to pause, and reports how
//! it ended (guest finished, guest crashed) on the VM's event channel.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::exits::GuestWake;
use crate::devices::lock;
use crate::kvm::vcpu::{install_kick_handler, kick_thread};
use crate::kvm::{ExitHandler, StopReason, Vcpu, VcpuError};

/// What a vCPU thread tells its VM.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The vCPU ended without being asked to: the guest finished or failed.
    Ended {
        /// vCPU id.
        id: u8,
        /// How.
        outcome: Result<StopReason, VcpuError>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

#[derive(Debug)]
struct Ctl {
    want: Want,
    parked: bool,
    ended: bool,
    exits: u64,
}

#[derive(Debug)]
struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// Set by the controller only; the thread only reads it.
    stop: AtomicBool,
}

/// A vCPU's thread.
#[derive(Debug)]
pub struct VcpuThread {
    id: u8,
    shared: Arc<Shared>,
    join: Option<JoinHandle<()>>,
    /// Woken with every kick: a vCPU asleep in a guest wait request is out of KVM_RUN,
    /// where the kick signal does not reach it.
    wake: Option<Arc<GuestWake>>,
}

/// A vCPU that did not park or end in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vCPU {id} did not {what} within {timeout:?}")]
pub struct VcpuStuck {
    /// vCPU id.
    pub id: u8,
    /// `pause` or `stop`.
    pub what: &'static str,
    /// How long it was given.
    pub timeout: Duration,
}

impl VcpuThread {
    /// Start `vcpu` running with `handler` on a new thread; `events` hears how it ends.
    pub fn spawn<H: ExitHandler + Send + 'static>(
        vcpu: Vcpu,
        handler: H,
        events: Sender<VcpuEvent>,
        name: &str,
    ) -> Result<VcpuThread, VcpuError> {
        install_kick_handler();
        let id = vcpu.id();
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Run,
                parked: false,
                ended: false,
                exits: 0,
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s2 = Arc::clone(&shared);
        let join = std::thread::Builder::new()
            .name(format!("{name}-vcpu{id}"))
            .spawn(move || thread_main(vcpu, handler, &s2, &events))
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuThread {
            id,
            shared,
            join: Some(join),
            wake: None,
        })
    }

    /// Wake `wake` whenever this thread is kicked (its exit handler sleeps there on guest
    /// wait requests).
    pub fn set_guest_wake(&mut self, wake: Arc<GuestWake>) {
        self.wake = Some(wake);
    }

    /// vCPU id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Exits seen so far (updated whenever the vCPU leaves its run loop).
    pub fn exits(&self) -> u64 {
        lock(&self.shared.ctl).exits
    }

    /// Whether the thread's run ended (finished, failed or stopped).
    pub fn has_ended(&self) -> bool {
        lock(&self.shared.ctl).ended
    }

    fn kick_until(
        &self,
        done: impl Fn(&Ctl) -> bool,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(), VcpuStuck> {
        let deadline = Instant::now() + timeout;
        let Some(j) = &self.join else { return Ok(()) };
        let mut g = lock(&self.shared.ctl);
        while !done(&g) && !j.is_finished() {
            if Instant::now() >= deadline {
                return Err(VcpuStuck {
                    id: self.id,
                    what,
                    timeout,
                });
            }
            // SAFETY: the thread has not been joined (we hold its JoinHandle), so its pthread_t
            // is valid.
            unsafe { kick_thread(j.as_pthread_t()) };
            if let Some(w) = &self.wake {
                w.wake();
            }
            g = self
                .shared
                .cv
                .wait_timeout(g, Duration::from_millis(1))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        Ok(())
    }

    /// Park the vCPU; returns once it is out of KVM_RUN (or has ended).
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuStuck> {
        {
            let mut g = lock(&self.shared.ctl);
            g.want = Want::Pause;
            self.shared.stop.store(true, Ordering::Release);
        }
        self.kick_until(|c| c.parked || c.ended, "pause", timeout)
    }

    /// Let a parked vCPU run again.
    pub fn resume(&self) {
        let mut g = lock(&self.shared.ctl);
        self.shared.stop.store(false, Ordering::Release);
        g.want = Want::Run;
        self.shared.cv.notify_all();
    }

    /// End the thread and join it.
    pub fn stop(mut self, timeout: Duration) -> Result<(), VcpuStuck> {
        {
            let mut g = lock(&self.shared.ctl);
            g.want = Want::Exit;
            self.shared.stop.store(true, Ordering::Release);
            self.shared.cv.notify_all();
        }
        self.kick_until(|c| c.ended, "stop", timeout)?;
        if let Some(j) = self.join.take() {
            // A panic in the thread was already reported as an event where possible.
            let _ = j.join();
        }
        Ok(())
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        if self.join.is_some() {
            {
                let mut g = lock(&self.shared.ctl);
                g.want = Want::Exit;
                self.shared.stop.store(true, Ordering::Release);
                self.shared.cv.notify_all();
            }
            if self
                .kick_until(|c| c.ended, "stop", Duration::from_secs(5))
                .is_ok()
            {
                if let Some(j) = self.join.take() {
                    let _ = j.join();
                }
            }
            // A thread that would not stop is left detached rather than blocking the caller.
        }
    }
}

fn thread_main<H: ExitHandler>(
    mut vcpu: Vcpu,
    mut handler: H,
    shared: &Shared,
    events: &Sender<VcpuEvent>,
) {
    let id = vcpu.id();
    let mut exits = 0u64;
    let mut first_run = None;
    loop {
        {
            let mut g = lock(&shared.ctl);
            loop {
                match g.want {
                    Want::Run => break,
                    Want::Exit => {
                        g.ended = true;
                        g.exits = exits;
                        shared.cv.notify_all();
                        return;
                    }
                    Want::Pause => {
                        g.parked = true;
                        shared.cv.notify_all();
                        g = shared.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
            g.parked = false;
        }
        let outcome = vcpu.run_until(&mut handler, &shared.stop, &mut exits, &mut first_run);
        {
            let mut g = lock(&shared.ctl);
            g.exits = exits;
            if matches!(outcome, Ok(StopReason::Kicked)) {
                // Asked to pause or exit: go round and look at `want`.
                continue;
            }
            g.ended = true;
            shared.cv.notify_all();
        }
        let _ = events.send(VcpuEvent::Ended { id, outcome });
        return;
    }
}
