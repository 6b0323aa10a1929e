//! The API load generator behind the hidden `tidepool loadgen` subcommand: it runs in its own
//! process (so its CPU use and scheduling are not the daemon's), talks HTTP/1.1 with keep-alive
//! over the daemon's Unix socket, and prints one JSON [`LoadgenReport`].
//!
//! - Open loop (`--rate R`): request `i` is due at `start + i / R`. Each of `--connections`
//!   worker threads claims the next due request, sleeps until its time and sends it; latency is
//!   measured from the *scheduled* time to the end of the response, so a stalled server is
//!   charged for every request it delayed (no coordinated omission). With every worker busy, a
//!   due request waits for a free one and that wait counts too.
//! - Closed loop (no `--rate`): each worker sends its next request as soon as the previous one
//!   is answered; the figure is completed requests per second.

use super::latency::{Latencies, LatencySummary};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// How long one request may take before it counts as an error.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Which request the load generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadOp {
    /// `GET /v1/vms/{id}/memory` (expects 200).
    GetMemory,
    /// `PUT /v1/vms/{id}/memory`, cycling through `--sizes` (expects 202).
    Resize,
}

impl LoadOp {
    /// The `--op` value.
    pub fn as_arg(self) -> &'static str {
        match self {
            LoadOp::GetMemory => "get-memory",
            LoadOp::Resize => "resize",
        }
    }
}

/// Arguments of `tidepool loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// The daemon's Unix socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// The VM id the requests are for.
    #[arg(long)]
    pub vm: String,
    /// The request to send.
    #[arg(long, value_enum)]
    pub op: LoadOp,
    /// Total memory sizes in MiB a resize cycles through (request i asks for sizes[i % n]).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<u64>,
    /// Requests per second on a fixed schedule (open loop); without it, closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Connections, one worker thread each.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 5.0)]
    pub duration_s: f64,
}

/// What one load generator run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadgenReport {
    /// The request sent.
    pub op: LoadOp,
    /// `open` or `closed`.
    pub mode: String,
    /// Connections (worker threads).
    pub connections: usize,
    /// Scheduled rate (open loop only).
    pub target_rps: Option<f64>,
    /// Seconds from the first send to the last answer.
    pub elapsed_s: f64,
    /// Requests sent (answered or failed).
    pub requests: u64,
    /// Requests answered with the expected status.
    pub ok: u64,
    /// Requests that failed (I/O error, timeout, unexpected status).
    pub errors: u64,
    /// The first failure, for the error message.
    pub first_error: Option<String>,
    /// Successful requests per second over `elapsed_s`.
    pub achieved_rps: f64,
    /// Latency of the successful requests (open loop: from the scheduled send time).
    pub latency: LatencySummary,
    /// Open loop only: how late the sends left against their schedule (client-side lag,
    /// included in `latency`).
    pub send_lag: Option<LatencySummary>,
    /// Open loop only: latency from the actual send, without the lag (the figure a closed
    /// loop would see; for telling server time from client scheduling).
    pub from_send: Option<LatencySummary>,
}

/// Errors of the load generator itself (request failures are counted, not raised).
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// The arguments make no sense.
    #[error("invalid load generator arguments: {0}")]
    Args(String),
    /// A worker could not connect before the start.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not be started or panicked.
    #[error("load generator worker: {0}")]
    Worker(String),
}

/// One keep-alive HTTP/1.1 connection over a Unix socket.
#[derive(Debug)]
struct Conn {
    path: PathBuf,
    io: Option<BufReader<UnixStream>>,
    line: String,
    body: Vec<u8>,
}

impl Conn {
    fn new(path: &Path) -> Conn {
        Conn {
            path: path.to_path_buf(),
            io: None,
            line: String::new(),
            body: Vec::new(),
        }
    }

    fn connect(&mut self) -> std::io::Result<()> {
        let s = UnixStream::connect(&self.path)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        self.io = Some(BufReader::with_capacity(16 << 10, s));
        Ok(())
    }

    /// Send `req` (a whole request) and read the response; returns the status. The connection
    /// is dropped after an error or `Connection: close`, and made again on the next call.
    fn exchange(&mut self, req: &[u8]) -> Result<u16, String> {
        let r = self.exchange_inner(req);
        if r.is_err() {
            self.io = None;
        }
        r
    }

    fn exchange_inner(&mut self, req: &[u8]) -> Result<u16, String> {
        if self.io.is_none() {
            self.connect().map_err(|e| format!("connect: {e}"))?;
        }
        let Some(io) = self.io.as_mut() else {
            return Err("no connection".into());
        };
        io.get_mut()
            .write_all(req)
            .map_err(|e| format!("write: {e}"))?;
        self.line.clear();
        io.read_line(&mut self.line)
            .map_err(|e| format!("read status: {e}"))?;
        let status = parse_status_line(&self.line)?;
        let mut length: Option<usize> = None;
        let mut close = false;
        loop {
            self.line.clear();
            let n = io
                .read_line(&mut self.line)
                .map_err(|e| format!("read header: {e}"))?;
            if n == 0 {
                return Err("connection closed inside the headers".into());
            }
            let h = self.line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(
                        value
                            .parse()
                            .map_err(|_| format!("bad Content-Length {value:?}"))?,
                    );
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(format!("unsupported Transfer-Encoding {value:?}"));
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                }
            }
        }
        let length = length.ok_or("response without Content-Length")?;
        self.body.resize(length, 0);
        io.read_exact(&mut self.body)
            .map_err(|e| format!("read body: {e}"))?;
        if close {
            self.io = None;
        }
        Ok(status)
    }
}

/// The status code of an `HTTP/1.x NNN reason` line.
fn parse_status_line(line: &str) -> Result<u16, String> {
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|s| s.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(format!("bad status line {:?}", line.trim_end())),
    }
}

/// The bytes of every distinct request the run sends, and the status each must get.
fn requests(args: &LoadgenArgs) -> Result<(Vec<Vec<u8>>, u16), LoadgenError> {
    tidepool_api::validate::vm_id(&args.vm).map_err(|e| LoadgenError::Args(e.to_string()))?;
    let path = format!("/v1/vms/{}/memory", args.vm);
    match args.op {
        LoadOp::GetMemory => Ok((
            vec![format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes()],
            200,
        )),
        LoadOp::Resize => {
            if args.sizes.is_empty() {
                return Err(LoadgenError::Args("a resize needs --sizes".into()));
            }
            let reqs = args
                .sizes
                .iter()
                .map(|mib| {
                    let body = format!("{{\"requested_mib\":{mib}}}");
                    format!(
                        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes()
                })
                .collect();
            Ok((reqs, 202))
        }
    }
}

/// Sleeps with a 1 µs timer slack instead of the default 50 µs, so sends leave on time.
fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack; no pointers involved.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
}

#[derive(Debug, Default)]
struct WorkerResult {
    latencies: Latencies,
    lag: Latencies,
    from_send: Latencies,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

impl WorkerResult {
    fn fail(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

struct Plan {
    reqs: Vec<Vec<u8>>,
    expect: u16,
    rate: Option<f64>,
    duration: Duration,
    total: u64,
    next: AtomicU64,
    start_gate: Barrier,
}

fn worker(mut conn: Conn, plan: &Plan, start: Instant) -> WorkerResult {
    tighten_timer_slack();
    // A latency-sensitive client asks for the same short scheduler slice as the daemon's API
    // threads, so a send due while the guest's threads hold the cores is not queued behind
    // them for a whole slice (best effort; see `crate::latency`).
    let _ = crate::latency::set_thread_slice(crate::latency::API_SLICE_NS);
    let mut out = WorkerResult {
        latencies: Latencies::with_capacity(4096),
        ..WorkerResult::default()
    };
    plan.start_gate.wait();
    let end = start + plan.duration;
    loop {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        let req = &plan.reqs[(i % plan.reqs.len() as u64) as usize];
        let (from, sent) = match plan.rate {
            Some(rate) => {
                if i >= plan.total {
                    break;
                }
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let sent = Instant::now();
                out.lag.record(sent.saturating_duration_since(due));
                (due, sent)
            }
            None => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                (now, now)
            }
        };
        match conn.exchange(req) {
            Ok(s) if s == plan.expect => {
                let done = Instant::now();
                out.latencies.record(done.saturating_duration_since(from));
                if plan.rate.is_some() {
                    out.from_send.record(done.saturating_duration_since(sent));
                }
                out.ok += 1;
                out.last_done = Some(done);
            }
            Ok(s) => {
                let body = String::from_utf8_lossy(&conn.body);
                out.fail(format!(
                    "HTTP {s} (expected {}): {}",
                    plan.expect,
                    body.chars().take(200).collect::<String>()
                ));
            }
            Err(e) => out.fail(e),
        }
    }
    out
}

/// Run the load described by `args` and measure it.
pub fn run_loadgen(args: &LoadgenArgs) -> Result<LoadgenReport, LoadgenError> {
    if args.connections == 0 || args.connections > 256 {
        return Err(LoadgenError::Args("--connections must be 1..=256".into()));
    }
    if !(args.duration_s.is_finite() && args.duration_s > 0.0 && args.duration_s <= 3600.0) {
        return Err(LoadgenError::Args(
            "--duration-s must be in (0, 3600]".into(),
        ));
    }
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0 && r <= 1e6) {
            return Err(LoadgenError::Args("--rate must be in (0, 1e6]".into()));
        }
    }
    let (reqs, expect) = requests(args)?;
    let duration = Duration::from_secs_f64(args.duration_s);
    let total = args
        .rate
        .map_or(0, |r| (r * args.duration_s).round() as u64);
    // Connect every worker before the clock starts, so no request pays for a connect.
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let mut c = Conn::new(&args.socket);
        c.connect().map_err(|source| LoadgenError::Connect {
            path: args.socket.clone(),
            source,
        })?;
        conns.push(c);
    }
    let plan = Arc::new(Plan {
        reqs,
        expect,
        rate: args.rate,
        duration,
        total,
        next: AtomicU64::new(0),
        start_gate: Barrier::new(args.connections + 1),
    });
    // Start slightly in the future so every worker is parked on its first due time.
    let start = Instant::now() + Duration::from_millis(20);
    let mut handles = Vec::with_capacity(args.connections);
    for (n, conn) in conns.into_iter().enumerate() {
        let plan = Arc::clone(&plan);
        let h = std::thread::Builder::new()
            .name(format!("loadgen-{n}"))
            .spawn(move || worker(conn, &plan, start))
            .map_err(|e| LoadgenError::Worker(e.to_string()))?;
        handles.push(h);
    }
    plan.start_gate.wait();
    let mut all = WorkerResult::default();
    for h in handles {
        let r = h
            .join()
            .map_err(|_| LoadgenError::Worker("a worker panicked".into()))?;
        all.latencies.merge(r.latencies);
        all.lag.merge(r.lag);
        all.from_send.merge(r.from_send);
        all.ok += r.ok;
        all.errors += r.errors;
        if all.first_error.is_none() {
            all.first_error = r.first_error;
        }
        all.last_done = all.last_done.max(r.last_done);
    }
    let elapsed = all
        .last_done
        .map_or(duration, |d| d.saturating_duration_since(start))
        .max(Duration::from_millis(1));
    Ok(LoadgenReport {
        op: args.op,
        mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        connections: args.connections,
        target_rps: args.rate,
        elapsed_s: elapsed.as_secs_f64(),
        requests: all.ok + all.errors,
        ok: all.ok,
        errors: all.errors,
        first_error: all.first_error,
        achieved_rps: all.ok as f64 / elapsed.as_secs_f64(),
        latency: all.latencies.summary(),
        send_lag: args.rate.map(|_| all.lag.summary()),
        from_send: args.rate.map(|_| all.from_send.summary()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 202 Accepted\r\n"), Ok(202));
        assert_eq!(parse_status_line("HTTP/1.0 200 OK"), Ok(200));
        assert!(parse_status_line("SPDY 200").is_err());
        assert!(parse_status_line("").is_err());
        assert!(parse_status_line("HTTP/1.1 abc").is_err());
    }

    #[test]
    fn resize_requests_cycle_sizes_and_carry_a_json_body() {
        let args = LoadgenArgs {
            socket: "/nonexistent".into(),
            vm: "vm1".into(),
            op: LoadOp::Resize,
            sizes: vec![96, 128],
            rate: Some(1000.0),
            connections: 1,
            duration_s: 1.0,
        };
        let (reqs, expect) = requests(&args).expect("requests");
        assert_eq!(expect, 202);
        assert_eq!(reqs.len(), 2);
        let text = String::from_utf8(reqs[1].clone()).expect("utf8");
        assert!(text.starts_with("PUT /v1/vms/vm1/memory HTTP/1.1\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"requested_mib\":128}"));
        assert!(text.contains("Content-Length: 21\r\n"));
        let mut bad = args.clone();
        bad.sizes.clear();
        assert!(matches!(requests(&bad), Err(LoadgenError::Args(_))));
        bad.vm = "../x".into();
        assert!(matches!(requests(&bad), Err(LoadgenError::Args(_))));
    }

    #[test]
    fn a_missing_socket_is_a_connect_error() {
        let args = LoadgenArgs {
            socket: std::env::temp_dir().join("tidepool-loadgen-no-such.sock"),
            vm: "vm1".into(),
            op: LoadOp::GetMemory,
            sizes: vec![],
            rate: None,
            connections: 1,
            duration_s: 0.1,
        };
        assert!(matches!(
            run_loadgen(&args),
            Err(LoadgenError::Connect { .. })
        ));
    }

    #[test]
    fn open_and_closed_loops_against_a_real_server() {
        use tidepool_api::testing::MemBackend;
        use tidepool_api::types::{CreateVmRequest, HotplugConfig};
        use tidepool_api::{ApiBackend, ServeConfig, Server};

        let dir = std::env::temp_dir().join(format!("tidepool-loadgen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("api.sock");
        let backend = MemBackend::default();
        let mut req = CreateVmRequest::with_memory(256);
        req.hotplug = Some(HotplugConfig {
            region_mib: 256,
            block_mib: 2,
            memslots: Default::default(),
        });
        let vm = backend.create_vm(req).expect("create");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt
            .block_on(async {
                Server::bind(
                    Arc::new(backend.clone()) as Arc<dyn ApiBackend>,
                    ServeConfig::unix(&socket),
                )
            })
            .expect("bind");
        let served = rt.spawn(server.run(async {
            let _ = stop_rx.await;
        }));

        // Open loop: exactly rate x duration requests, every one answered and timed.
        let mut args = LoadgenArgs {
            socket: socket.clone(),
            vm: vm.id.clone(),
            op: LoadOp::GetMemory,
            sizes: vec![],
            rate: Some(200.0),
            connections: 2,
            duration_s: 0.25,
        };
        let r = run_loadgen(&args).expect("open loop");
        assert_eq!(
            (r.mode.as_str(), r.requests, r.ok, r.errors),
            ("open", 50, 50, 0)
        );
        assert_eq!(r.latency.count, 50);
        assert_eq!(r.send_lag.map(|l| l.count), Some(50));
        assert_eq!(r.from_send.map(|l| l.count), Some(50));
        assert!(r.latency.p50_us > 0.0 && r.latency.p99_us >= r.latency.p50_us);

        // Resizes alternate between the sizes; the 50th (index 49) asks for the second.
        args.op = LoadOp::Resize;
        args.sizes = vec![256 + 128, 256 + 256];
        let r = run_loadgen(&args).expect("resize loop");
        assert_eq!((r.requests, r.errors), (50, 0), "{:?}", r.first_error);
        assert_eq!(
            backend.get_memory(&vm.id).expect("memory").requested_mib,
            512
        );

        // Closed loop: back to back until the time is up.
        args.op = LoadOp::GetMemory;
        args.rate = None;
        args.duration_s = 0.2;
        let r = run_loadgen(&args).expect("closed loop");
        assert_eq!((r.mode.as_str(), r.errors), ("closed", 0));
        assert!(r.ok > 0 && r.achieved_rps > 0.0);
        assert!(r.send_lag.is_none() && r.from_send.is_none());

        // Failures are counted with the first reason, not raised.
        args.vm = "vm999".into();
        args.rate = Some(100.0);
        args.duration_s = 0.1;
        let r = run_loadgen(&args).expect("404 loop");
        assert_eq!((r.requests, r.ok, r.errors), (10, 0, 10));
        assert!(
            r.first_error.as_deref().unwrap_or("").contains("HTTP 404"),
            "{:?}",
            r.first_error
        );

        let _ = stop_tx.send(());
        rt.block_on(served).expect("join").expect("server");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
