//! Queue notifications through ioeventfds: one eventfd per queue, registered on the
//! transport's QueueNotify register with the queue index as datamatch, so a notify costs the
//! guest no exit to user space. One device thread per VM waits on all of them (epoll) and lets
//! the transport process the queue.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{lock, lock_live, DeviceSetupError, MmioBus, SharedTransport};

/// Longest the VM's teardown waits for its device thread to end (it normally ends at once;
/// a thread parked by the swap fault guard is detached as soon as it is seen parked).
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// Counters of the device thread.
#[derive(Debug, Default)]
pub struct NotifierStats {
    /// Queue notifications delivered to a transport.
    pub notifies: AtomicU64,
    /// Notifications the transport refused (device not activated, no such queue, queue error).
    pub refused: AtomicU64,
}

struct Source {
    evt: EventFd,
    transport: SharedTransport,
    queue: u32,
}

/// Work handed to the device thread (see [`NotifyThread::post`]).
pub type DeviceWork = Box<dyn FnOnce() + Send>;

/// The device thread of one VM. Dropping it stops and joins the thread.
#[derive(Debug)]
pub struct NotifyThread {
    stop: EventFd,
    join: Option<JoinHandle<()>>,
    stats: Arc<NotifierStats>,
    registered: usize,
    /// The thread's id (0 until it started).
    tid: Arc<AtomicI32>,
    work_tx: Mutex<Sender<DeviceWork>>,
    work_evt: EventFd,
}

const STOP_TOKEN: u64 = u64::MAX;
const WORK_TOKEN: u64 = u64::MAX - 1;

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> DeviceSetupError {
    move |source| DeviceSetupError::Os { what, source }
}

impl NotifyThread {
    /// Register one ioeventfd per queue of every device on `bus` and start the thread.
    pub fn start(vm: &VmFd, bus: &MmioBus, name: &str) -> Result<NotifyThread, DeviceSetupError> {
        let epoll = Epoll::new().map_err(os("epoll_create"))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(os("eventfd"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(os("epoll_ctl"))?;
        let work_evt = EventFd::new(EFD_NONBLOCK).map_err(os("eventfd"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                work_evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, WORK_TOKEN),
            )
            .map_err(os("epoll_ctl"))?;
        let (work_tx, work_rx) = channel::<DeviceWork>();
        let work = (work_evt.try_clone().map_err(os("eventfd dup"))?, work_rx);
        let mut sources = Vec::new();
        for slot in bus.slots() {
            let pairs = lock(&slot.transport).ioeventfds(slot.base);
            for (addr, queue) in pairs {
                let evt = EventFd::new(EFD_NONBLOCK).map_err(os("eventfd"))?;
                vm.register_ioevent(&evt, &IoEventAddress::Mmio(addr), queue)
                    .map_err(|source| DeviceSetupError::Kvm {
                        what: "KVM_IOEVENTFD",
                        source,
                    })?;
                epoll
                    .ctl(
                        ControlOperation::Add,
                        evt.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, sources.len() as u64),
                    )
                    .map_err(os("epoll_ctl"))?;
                sources.push(Source {
                    evt,
                    transport: Arc::clone(&slot.transport),
                    queue,
                });
            }
        }
        let registered = sources.len();
        let stats = Arc::new(NotifierStats::default());
        let stats2 = Arc::clone(&stats);
        let stop2 = stop.try_clone().map_err(os("eventfd dup"))?;
        let failed = Arc::clone(bus.failed_flag());
        let tid = Arc::new(AtomicI32::new(0));
        let tid2 = Arc::clone(&tid);
        let join = std::thread::Builder::new()
            .name(format!("{name}-dev"))
            .spawn(move || {
                tid2.store(crate::swap::guard::gettid(), Ordering::Release);
                serve(epoll, stop2, work, sources, &stats2, &failed)
            })
            .map_err(os("spawning the device thread"))?;
        Ok(NotifyThread {
            stop,
            join: Some(join),
            stats,
            registered,
            tid,
            work_tx: Mutex::new(work_tx),
            work_evt,
        })
    }

    /// Number of ioeventfds registered.
    pub fn registered(&self) -> usize {
        self.registered
    }

    /// Run `work` on the device thread, after the notifications it is serving now. Device
    /// requests that touch guest memory (returning the balloon's stats buffer) go here, so
    /// the VM thread never touches guest memory: if that memory cannot be read back (a failed
    /// swap-in), the thread that touched it is parked for good (see `swap::guard`), and the VM
    /// thread must stay free to stop and delete the VM. `Err` gives the work back when the
    /// thread is gone.
    pub fn post(&self, work: DeviceWork) -> Result<(), DeviceWork> {
        lock(&self.work_tx).send(work).map_err(|e| e.0)?;
        let _ = self.work_evt.write(1);
        Ok(())
    }

    /// The thread's counters.
    pub fn stats(&self) -> &NotifierStats {
        &self.stats
    }
}

fn serve(
    epoll: Epoll,
    stop: EventFd,
    work: (EventFd, Receiver<DeviceWork>),
    sources: Vec<Source>,
    stats: &NotifierStats,
    failed: &AtomicBool,
) {
    let mut events = vec![EpollEvent::default(); sources.len() + 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "device thread: epoll_wait failed; notifications now go through MMIO exits only");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                let _ = stop.read();
                return;
            }
            if token == WORK_TOKEN {
                let _ = work.0.read();
                while let Ok(w) = work.1.try_recv() {
                    w();
                }
                continue;
            }
            let Some(src) = usize::try_from(token).ok().and_then(|i| sources.get(i)) else {
                continue;
            };
            // The counter is reset by the read; several writes coalesce into one notify,
            // which processes everything the driver made available.
            if src.evt.read().is_err() {
                continue;
            }
            stats.notifies.fetch_add(1, Ordering::Relaxed);
            // A failed VM's device whose lock is held for good (by a parked thread) is not
            // served any more.
            match lock_live(&src.transport, failed) {
                Some(mut t) => {
                    if t.notify(src.queue).is_err() {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Drop for NotifyThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        let Some(j) = self.join.take() else {
            return;
        };
        // Join, unless the thread was parked for good by the swap fault guard (it touched
        // guest memory whose swap-in failed): then it is left detached, never to run again.
        let deadline = Instant::now() + STOP_LIMIT;
        loop {
            if j.is_finished() {
                let _ = j.join();
                return;
            }
            let tid = self.tid.load(Ordering::Acquire);
            if crate::swap::guard::is_parked(tid) {
                tracing::warn!(
                    tid,
                    "device thread parked after a failed swap-in: left detached"
                );
                return;
            }
            if Instant::now() >= deadline {
                tracing::error!(tid, "device thread did not stop: left detached");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
