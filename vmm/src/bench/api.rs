//! `tidepool bench api`: REST API latency and throughput against the real daemon.
//!
//! The suite starts `tidepool serve` as a child process on a socket in a fresh temporary
//! directory, creates a tiny-guest VM through the API (64 MiB boot RAM, a 128 MiB virtio-mem
//! region, the guest running the polled virtio-mem driver so resizes are accepted and
//! followed), and drives the API from a second process, `tidepool loadgen` (see
//! [`super::loadgen`]), over the Unix socket:
//!
//! 1. `GET /v1/vms/{id}/memory`, open loop at 1,000 requests/s: `get_memory_p50_us`,
//!    `get_memory_p99_us` (latency from the scheduled send time; target p99 <= 1,000 µs).
//! 2. `PUT /v1/vms/{id}/memory` alternating between 96 and 128 MiB total, open loop at
//!    1,000 requests/s: `resize_p99_us` (the 202 answer, given right after the target is
//!    recorded; the guest keeps plugging and unplugging behind it). The guest's driver plugs
//!    like Linux onlines memory: it does not write what it plugs, so unplugged blocks (which
//!    the host discards) are not faulted in again. `resize_guest_plugs` and
//!    `resize_guest_unplugs` count the requests the device acknowledged meanwhile.
//! 3. The same against a second VM whose guest writes every page it plugs
//!    (`resize_touching_*`): a stress variant, each re-plug faulting its blocks back in. On a
//!    host that is itself a VM and reports free pages to its hypervisor at once, those blocks
//!    come back from the hypervisor and the whole host slows (BENCHMARKS.md, "api"), so its
//!    tail is reported beside, not instead of, phase 2's. Where the host's kernel publishes it,
//!    `*_host_reported_mib` says how much it reported during each phase.
//! 4. `GET /v1/vms/{id}/memory`, closed loop over 4 connections: `get_memory_max_rps`.
//!
//! Any failed request (I/O error, timeout, a status other than 200/202) fails the suite. The
//! daemon is stopped with SIGTERM (SIGKILL if it hangs) and the temporary directory, socket
//! included, is removed on every path out of the suite; the children also get a parent-death
//! signal, so they do not outlive a killed bench.

use super::loadgen::{LoadOp, LoadgenReport};
use super::{progress, BenchError, BenchOptions, Report};
use crate::kvm::kvm_available;
use crate::manager::images::virtio_mem_guest_with;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tidepool_api::metrics::sample_value;
use tidepool_api::server::DEFAULT_MAX_INFLIGHT_PER_VM;
use tidepool_api::types::{CreateVmRequest, HotplugConfig, MemoryInfo};
use tidepool_api::Client;

/// Boot RAM of the VM under test.
const BOOT_MIB: u64 = 64;
/// Its virtio-mem region.
const REGION_MIB: u64 = 128;
/// The two totals the resize phase alternates between.
const SIZES: [u64; 2] = [BOOT_MIB + 32, BOOT_MIB + REGION_MIB / 2];
/// Open-loop request rate.
const RATE: f64 = 1000.0;
/// Closed-loop connections for the saturation figure.
const SATURATION_CONNECTIONS: usize = 4;
/// Pool the daemon gets.
const POOL_MIB: u64 = 512;
/// How long the VM may take to come up or to settle after a resize.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

fn failed(e: impl ToString) -> BenchError {
    BenchError::Failed {
        suite: "api",
        reason: e.to_string(),
    }
}

/// Spawn `cmd` so that it receives `signal` when this thread's process dies.
fn spawn_tied(cmd: &mut Command, signal: libc::c_int) -> std::io::Result<Child> {
    let hook = move || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and is async-signal-safe, so it
        // may run between fork and exec.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) };
        if rc == -1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook only calls prctl(2), which allocates nothing and takes no locks.
    unsafe { cmd.pre_exec(hook) };
    cmd.spawn()
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Wait for `child` until `deadline`; `None` if it is still running then.
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon child process and its temporary directory (socket and log), both cleaned up on
/// drop.
#[derive(Debug)]
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(exe: &Path, guest_nice: Option<i32>) -> Result<Daemon, BenchError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("tidepool-bench-api-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| failed(format!("creating {}: {e}", dir.display())))?;
        let mut d = Daemon {
            child: None,
            socket: dir.join("api.sock"),
            log: dir.join("daemon.log"),
            dir,
        };
        let log = std::fs::File::create(&d.log)
            .map_err(|e| failed(format!("creating {}: {e}", d.log.display())))?;
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--pool-mib", &POOL_MIB.to_string(), "--socket"])
            .arg(&d.socket);
        if let Some(n) = guest_nice {
            cmd.args(["--guest-nice", &n.to_string()]);
        }
        cmd
            // The daemon's default level: every resize call is logged, as in production.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        d.child = Some(
            spawn_tied(&mut cmd, libc::SIGTERM)
                .map_err(|e| failed(format!("starting {} serve: {e}", exe.display())))?,
        );
        Ok(d)
    }

    /// The last lines of the daemon's log, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// An error if the daemon has exited.
    fn check_alive(&mut self) -> Result<(), BenchError> {
        let Some(c) = self.child.as_mut() else {
            return Err(failed("the daemon was already stopped"));
        };
        match c.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(s)) => Err(failed(format!(
                "the daemon exited ({s}); its log ends with:\n{}",
                self.log_tail()
            ))),
            Err(e) => Err(failed(format!("waiting for the daemon: {e}"))),
        }
    }

    /// SIGTERM, then wait for a clean exit (the daemon deletes its VMs and its socket).
    fn stop(&mut self) -> Result<(), BenchError> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        signal(&c, libc::SIGTERM);
        match wait_until(&mut c, Instant::now() + Duration::from_secs(30)) {
            Ok(Some(s)) if s.success() => Ok(()),
            Ok(Some(s)) => Err(failed(format!(
                "the daemon exited with {s} on SIGTERM; its log ends with:\n{}",
                self.log_tail()
            ))),
            Ok(None) | Err(_) => {
                let _ = c.kill();
                let _ = c.wait();
                Err(failed("the daemon did not stop within 30 s of SIGTERM"))
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGTERM);
            if !matches!(
                wait_until(&mut c, Instant::now() + Duration::from_secs(10)),
                Ok(Some(_))
            ) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A load generator child, killed if the suite leaves early.
struct LoadgenChild(Option<Child>);

impl Drop for LoadgenChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What to run in the load generator process.
struct Load<'a> {
    op: LoadOp,
    rate: Option<f64>,
    connections: usize,
    seconds: f64,
    vm: &'a str,
}

/// Run `tidepool loadgen` for `load` and parse its report; failed requests fail the suite.
fn run_load(exe: &Path, socket: &Path, load: &Load<'_>) -> Result<LoadgenReport, BenchError> {
    let mut cmd = Command::new(exe);
    cmd.arg("loadgen")
        .arg("--socket")
        .arg(socket)
        .args(["--vm", load.vm])
        .args(["--op", load.op.as_arg()])
        .args(["--connections", &load.connections.to_string()])
        .args(["--duration-s", &load.seconds.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(r) = load.rate {
        cmd.args(["--rate", &r.to_string()]);
    }
    if load.op == LoadOp::Resize {
        let sizes: Vec<String> = SIZES.iter().map(u64::to_string).collect();
        cmd.args(["--sizes", &sizes.join(",")]);
    }
    let child = spawn_tied(&mut cmd, libc::SIGKILL)
        .map_err(|e| failed(format!("starting the load generator: {e}")))?;
    let mut guard = LoadgenChild(Some(child));
    let Some(c) = guard.0.as_mut() else {
        return Err(failed("load generator vanished"));
    };
    let deadline = Instant::now() + Duration::from_secs_f64(load.seconds + 60.0);
    let status = wait_until(c, deadline)
        .map_err(|e| failed(format!("waiting for the load generator: {e}")))?
        .ok_or_else(|| failed("the load generator did not finish within its time + 60 s"))?;
    // The report is small, so it fits in the pipe and reading after the exit cannot block.
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = c.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = c.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    if !status.success() {
        return Err(failed(format!(
            "the load generator failed ({status}): {}",
            err.trim()
        )));
    }
    let report: LoadgenReport = serde_json::from_str(&out)
        .map_err(|e| failed(format!("load generator output: {e}: {out}")))?;
    if report.errors > 0 {
        return Err(failed(format!(
            "{} of {} {} requests failed; first: {}",
            report.errors,
            report.requests,
            load.op.as_arg(),
            report.first_error.as_deref().unwrap_or("?")
        )));
    }
    if report.ok == 0 {
        return Err(failed(format!("no {} request succeeded", load.op.as_arg())));
    }
    Ok(report)
}

async fn wait_ready(client: &Client, daemon: &mut Daemon) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        daemon.check_alive()?;
        if client.host().await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "the daemon did not answer within 30 s; its log ends with:\n{}",
                daemon.log_tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Poll `GET /memory` until `done` holds.
async fn wait_memory(
    client: &Client,
    id: &str,
    what: &str,
    done: impl Fn(&MemoryInfo) -> bool,
) -> Result<MemoryInfo, BenchError> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let m = client.get_memory(id).await.map_err(failed)?;
        if done(&m) {
            return Ok(m);
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "{what}: not done within {SETTLE_TIMEOUT:?} (plugged {} of {} MiB, driver ready {})",
                m.plugged_mib, m.requested_mib, m.resize.driver_ready
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resize to `total` MiB and wait until the guest has plugged exactly that.
async fn settle(client: &Client, id: &str, total: u64) -> Result<(), BenchError> {
    client.resize_memory(id, total).await.map_err(failed)?;
    wait_memory(client, id, "settling the resize", |m| {
        m.requested_mib == total && m.plugged_mib == total
    })
    .await
    .map(|_| ())
}

/// Create a VM under test and bring it to `SIZES[0]`; returns its id. Its guest writes every
/// page it plugs if `touch_plugged`.
async fn prepare_vm(client: &Client, touch_plugged: bool) -> Result<String, BenchError> {
    let mut req = CreateVmRequest::with_memory(BOOT_MIB);
    req.image = Some(virtio_mem_guest_with(BOOT_MIB, REGION_MIB, touch_plugged).map_err(failed)?);
    req.hotplug = Some(HotplugConfig {
        region_mib: REGION_MIB,
        block_mib: 2,
        memslots: Default::default(),
    });
    let vm = client.create_vm(&req).await.map_err(failed)?;
    wait_memory(client, &vm.id, "the guest's virtio-mem driver", |m| {
        m.resize.driver_ready
    })
    .await?;
    settle(client, &vm.id, SIZES[0]).await?;
    Ok(vm.id)
}

fn add_latency(r: &mut Report, prefix: &str, rep: &LoadgenReport, what: &str, p99_note: &str) {
    let l = &rep.latency;
    r.add(
        &format!("{prefix}_p50_us"),
        l.p50_us,
        &format!("us, {what}, median"),
    );
    r.add(&format!("{prefix}_p99_us"), l.p99_us, p99_note);
    r.add(&format!("{prefix}_p999_us"), l.p999_us, "us, p99.9");
    if let Some(s) = rep.from_send {
        r.add(
            &format!("{prefix}_sent_p99_us"),
            s.p99_us,
            "us, p99 from the actual send (without the load generator's lag)",
        );
    }
    r.add(&format!("{prefix}_max_us"), l.max_us, "us, slowest request");
    r.add(
        &format!("{prefix}_requests"),
        rep.requests as f64,
        &format!("requests at {RATE:.0}/s over {:.1} s", rep.elapsed_s),
    );
    r.add(
        &format!("{prefix}_errors"),
        rep.errors as f64,
        "failed requests (must be 0)",
    );
}

/// The p99 note of the figures the target applies to.
const TARGET_NOTE: &str = "us, p99 (target <= 1,000)";

/// What a resize phase needs: the binary (for the load generator), the daemon and a client.
struct ResizePhase<'a> {
    exe: &'a Path,
    daemon: &'a mut Daemon,
    client: &'a Client,
    rt: &'a tokio::runtime::Runtime,
    seconds: f64,
}

impl ResizePhase<'_> {
    /// PUT /memory on `vm` alternating between [`SIZES`] at [`RATE`], figures under `prefix`
    /// (the p99 described by `p99_note`); then wait until the guest settles at `SIZES[0]`.
    /// Returns the load generator's p99 send lag (0 if it had none).
    fn run(
        &mut self,
        r: &mut Report,
        vm: &str,
        prefix: &str,
        guest: &str,
        p99_note: &str,
    ) -> Result<f64, BenchError> {
        self.daemon.check_alive()?;
        progress(&format!(
            "PUT /memory alternating {} and {} MiB ({guest}), open loop at {RATE:.0}/s for {} s",
            SIZES[0], SIZES[1], self.seconds
        ));
        let before = self.rt.block_on(plug_counts(self.client, vm))?;
        let reported_before = host_reported_kib();
        let rep = run_load(
            self.exe,
            &self.daemon.socket,
            &Load {
                op: LoadOp::Resize,
                rate: Some(RATE),
                connections: DEFAULT_MAX_INFLIGHT_PER_VM,
                seconds: self.seconds,
                vm,
            },
        )?;
        let after = self.rt.block_on(plug_counts(self.client, vm))?;
        if let (Some(a), Some(b)) = (reported_before, host_reported_kib()) {
            r.add(
                &format!("{prefix}_host_reported_mib"),
                b.saturating_sub(a) as f64 / 1024.0,
                "MiB this host's kernel reported free to its own hypervisor during the phase",
            );
        }
        add_latency(
            r,
            prefix,
            &rep,
            &format!("PUT /memory to its 202, {guest}"),
            p99_note,
        );
        r.add(
            &format!("{prefix}_guest_plugs"),
            after.0.saturating_sub(before.0) as f64,
            "PLUG requests (up to 8 MiB each) the device acknowledged during the phase",
        );
        r.add(
            &format!("{prefix}_guest_unplugs"),
            after.1.saturating_sub(before.1) as f64,
            "UNPLUG requests the device acknowledged during the phase",
        );
        // The guest kept chasing the targets; it must still settle afterwards.
        progress(&format!(
            "waiting for the guest to settle at {} MiB",
            SIZES[0]
        ));
        self.rt.block_on(settle(self.client, vm, SIZES[0]))?;
        Ok(rep.send_lag.map_or(0.0, |l| l.p99_us))
    }
}

/// Where a kernel that is itself a guest and reports free pages to its hypervisor (virtio-balloon
/// free page reporting) counts what it reported, on kernels that publish it.
const HOST_REPORTED_KIB: &str = "/sys/module/page_reporting/parameters/reported_kib";

/// KiB this host's kernel has reported free to its hypervisor so far, if it says.
fn host_reported_kib() -> Option<u64> {
    std::fs::read_to_string(HOST_REPORTED_KIB)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The VM's virtio-mem `plug_acked` and `unplug_acked` counters, from `/metrics`.
async fn plug_counts(client: &Client, vm: &str) -> Result<(u64, u64), BenchError> {
    let text = client.metrics().await.map_err(failed)?;
    let count = |event: &str| {
        let line = format!(
            "tidepool_device_events_total{{vm=\"{vm}\",device=\"virtio-mem\",event=\"{event}\"}} "
        );
        sample_value(&text, &line)
            .map(|v| v as u64)
            .ok_or_else(|| failed(format!("/metrics has no virtio-mem {event} for {vm}")))
    };
    Ok((count("plug_acked")?, count("unplug_acked")?))
}

/// The 1-minute load average from /proc/loadavg (NaN if unreadable).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Run the suite.
pub fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    kvm_available().map_err(|why| failed(format!("/dev/kvm is not usable: {why}")))?;
    let exe = std::env::current_exe()
        .map_err(|e| failed(format!("cannot find the tidepool binary: {e}")))?;
    let seconds = if opts.quick { 5.0 } else { 20.0 };
    let open_connections = DEFAULT_MAX_INFLIGHT_PER_VM;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_1m = load_average();

    progress("starting tidepool serve on a temporary socket");
    let mut daemon = Daemon::start(&exe, opts.guest_nice)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("async runtime: {e}")))?;
    let client = Client::unix(&daemon.socket).with_timeout(Duration::from_secs(30));
    rt.block_on(wait_ready(&client, &mut daemon))?;
    progress(&format!(
        "creating a tiny-guest VM ({BOOT_MIB} MiB + {REGION_MIB} MiB virtio-mem) and plugging to {} MiB",
        SIZES[0]
    ));
    let vm = rt.block_on(prepare_vm(&client, false))?;

    let mut r = Report::default();
    progress(&format!(
        "GET /memory, open loop at {RATE:.0}/s for {seconds} s"
    ));
    let get = run_load(
        &exe,
        &daemon.socket,
        &Load {
            op: LoadOp::GetMemory,
            rate: Some(RATE),
            connections: open_connections,
            seconds,
            vm: &vm,
        },
    )?;
    add_latency(
        &mut r,
        "get_memory",
        &get,
        "GET /memory from its scheduled time",
        TARGET_NOTE,
    );

    let mut phase = ResizePhase {
        exe: &exe,
        daemon: &mut daemon,
        client: &client,
        rt: &rt,
        seconds,
    };
    let resize_lag = phase.run(
        &mut r,
        &vm,
        "resize",
        "a guest that plugs like Linux",
        TARGET_NOTE,
    )?;
    progress("creating a second VM whose guest writes every page it plugs");
    let toucher = rt.block_on(prepare_vm(&client, true))?;
    let touching_lag = phase.run(
        &mut r,
        &toucher,
        "resize_touching",
        "a guest that writes every page it plugs",
        "us, p99 (stress variant; the target applies to resize_p99_us)",
    )?;
    rt.block_on(client.delete_vm(&toucher)).map_err(failed)?;

    progress(&format!(
        "GET /memory, closed loop over {SATURATION_CONNECTIONS} connections for {seconds} s"
    ));
    let sat = run_load(
        &exe,
        &daemon.socket,
        &Load {
            op: LoadOp::GetMemory,
            rate: None,
            connections: SATURATION_CONNECTIONS,
            seconds,
            vm: &vm,
        },
    )?;
    r.add(
        "get_memory_max_rps",
        sat.achieved_rps,
        &format!("requests/s, closed loop, {SATURATION_CONNECTIONS} connections, {cpus} CPUs"),
    );
    r.add(
        "get_memory_max_rps_p50_us",
        sat.latency.p50_us,
        "us, median latency at saturation",
    );
    r.add(
        "get_memory_max_rps_requests",
        sat.requests as f64,
        &format!("requests over {:.1} s", sat.elapsed_s),
    );
    r.add(
        "get_memory_max_rps_errors",
        sat.errors as f64,
        "failed requests (must be 0)",
    );
    let lag = get
        .send_lag
        .map_or(0.0, |l| l.p99_us)
        .max(resize_lag)
        .max(touching_lag);
    r.add(
        "loadgen_send_lag_p99_us",
        lag,
        "us, p99 of how late the load generator sent (included in the latencies)",
    );
    r.add(
        "cpus",
        cpus as f64,
        "CPUs shared by daemon, guest vCPU and load generator",
    );
    r.add(
        "host_load_1m",
        load_1m,
        "1-minute load average when the suite started (other work skews the tails)",
    );
    r.add(
        "guest_nice",
        f64::from(
            opts.guest_nice
                .unwrap_or(crate::latency::DEFAULT_GUEST_NICE),
        ),
        "nice value of the guest's threads (the daemon's threads run at 0)",
    );

    rt.block_on(client.delete_vm(&vm)).map_err(failed)?;
    daemon.stop()?;
    Ok(r)
}
