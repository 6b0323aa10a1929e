//! Queue notifications through ioeventfds: one eventfd per queue, registered on the
//! transport's QueueNotify register with the queue index as datamatch, so a notify costs the
//! guest no exit to user space. One device thread per VM waits on all of them (epoll) and lets
//! the transport process the queue.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{lock, DeviceSetupError, MmioBus, SharedTransport};

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

/// The device thread of one VM. Dropping it stops and joins the thread.
#[derive(Debug)]
pub struct NotifyThread {
    stop: EventFd,
    join: Option<JoinHandle<()>>,
    stats: Arc<NotifierStats>,
    registered: usize,
}

const STOP_TOKEN: u64 = u64::MAX;

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
        let join = std::thread::Builder::new()
            .name(format!("{name}-dev"))
            .spawn(move || serve(epoll, stop2, sources, &stats2))
            .map_err(os("spawning the device thread"))?;
        Ok(NotifyThread {
            stop,
            join: Some(join),
            stats,
            registered,
        })
    }

    /// Number of ioeventfds registered.
    pub fn registered(&self) -> usize {
        self.registered
    }

    /// The thread's counters.
    pub fn stats(&self) -> &NotifierStats {
        &self.stats
    }
}

fn serve(epoll: Epoll, stop: EventFd, sources: Vec<Source>, stats: &NotifierStats) {
    let mut events = vec![EpollEvent::default(); sources.len() + 1];
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
            let Some(src) = usize::try_from(token).ok().and_then(|i| sources.get(i)) else {
                continue;
            };
            // The counter is reset by the read; several writes coalesce into one notify,
            // which processes everything the driver made available.
            if src.evt.read().is_err() {
                continue;
            }
            stats.notifies.fetch_add(1, Ordering::Relaxed);
            if lock(&src.transport).notify(src.queue).is_err() {
                stats.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for NotifyThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}
