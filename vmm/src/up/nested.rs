//! Nested mode: L1 (the Debian cloud kernel under QEMU TCG with emulated AMD SVM, booted by
//! the embedded `resources/nested/run-l1.sh`) runs `tidepool up --direct` on its real KVM, and
//! this process exposes the API socket on the host and relays it ([`super::relay`]).
//!
//! L1 gets a virtio-net NIC on QEMU's user network with `restrict=on` (no way out) and one
//! `hostfwd` from a free port on the host's loopback to L1's own address, where the L1 relay
//! listens and checks each connection's token before splicing it to the daemon's socket.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::config::UpConfig;
use super::direct::{print_banner, GUEST_INIT_MARKER, READY_MARKER, STOPPED_MARKER};
use super::paths::{self, GuestImage};
use super::relay::{self, L1_ADDR, L1_RELAY_PORT};
use super::{UpArgs, UpError};

/// The API socket inside L1.
const L1_SOCKET: &str = "/run/tidepool/tidepool.sock";
/// The timeout given to the harness: `up` runs until stopped, so effectively none.
const HARNESS_TIMEOUT_S: u64 = 10 * 365 * 24 * 3600;

/// What the L1 watcher reports.
#[derive(Debug)]
enum Event {
    /// The harness logged L1's boot: seconds from QEMU start to L1's `/init`.
    Ready {
        id: String,
        create_ms: String,
    },
    GuestInit(String),
    Exited,
}

fn failed(what: &str, e: impl std::fmt::Display) -> UpError {
    UpError::Failed(format!("{what}: {e}"))
}

/// A free TCP port on the host's loopback (bound, read, released: QEMU binds it next).
fn free_port() -> Result<u16, UpError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| failed("finding a port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| failed("finding a port", e))
}

/// The value after `key` up to whitespace.
fn after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_once(key)
        .and_then(|(_, v)| v.split_whitespace().next())
}

/// The shell command L1 runs: bring up the NIC, then `tidepool up --direct` with the relay.
pub fn l1_command(pool_mib: u64) -> String {
    format!(
        "ip link set lo up && ip link set eth0 up && ip addr add {L1_ADDR}/24 dev eth0 && \
         exec ./tidepool up --direct --config up.json --guest-dir guest --socket {L1_SOCKET} \
         --pool-mib {pool_mib} --relay-listen {L1_ADDR}:{L1_RELAY_PORT} \
         --relay-token-file relay.token"
    )
}

fn spawn_l1(
    cfg: &UpConfig,
    guest: &GuestImage,
    work: &Path,
    host_port: u16,
    log: &Path,
) -> Result<Child, UpError> {
    let scripts = paths::materialize(paths::NESTED_SCRIPTS)
        .map_err(|e| failed("writing the embedded harness", e))?;
    let exe = std::env::current_exe().map_err(|e| failed("finding the tidepool binary", e))?;
    let l1_mem = cfg.l1_memory_mib();
    let pool_mib = l1_mem.saturating_sub(1024).max(cfg.vm.memory_mib);
    let nic = format!(
        "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{host_port}-{L1_ADDR}:{L1_RELAY_PORT}"
    );
    let mut cmd = Command::new(scripts.join("nested/run-l1.sh"));
    cmd.arg("-t")
        .arg(HARNESS_TIMEOUT_S.to_string())
        .arg("--log")
        .arg(log)
        .arg("--mem")
        .arg(l1_mem.to_string())
        .args([
            "--modules",
            "virtio_pci virtio_net",
            "--qemu-arg",
            "-nic",
            "--qemu-arg",
        ])
        .arg(nic)
        .arg("--binary")
        .arg(&exe)
        .arg("--file")
        .arg(format!("{}:guest/vmlinux", guest.vmlinux.display()))
        .arg("--file")
        .arg(format!(
            "{}:guest/initramfs.cpio.gz",
            guest.initramfs.display()
        ))
        .arg("--file")
        .arg(format!(
            "{}:guest/cmdline",
            guest.dir.join("cmdline").display()
        ))
        .arg("--file")
        .arg(format!("{}:up.json", work.join("up.json").display()))
        .arg("--file")
        .arg(format!(
            "{}:relay.token",
            work.join("relay.token").display()
        ))
        .args(["--", "sh", "-c"])
        .arg(l1_command(pool_mib))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group: the terminal's Ctrl-C reaches only this process, which then
        // stops L1 cleanly; the harness's `timeout --foreground` takes QEMU down with it.
        .process_group(0);
    cmd.spawn().map_err(|e| failed("starting run-l1.sh", e))
}

/// Reads the harness's stderr (its own lines and L1's console) on a thread.
fn watch(child: &mut Child, all: bool, tx: mpsc::Sender<Event>) -> Result<(), UpError> {
    let err = child
        .stderr
        .take()
        .ok_or_else(|| UpError::Failed("no stderr pipe from run-l1.sh".into()))?;
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r');
            if let Some(rest) = line.strip_prefix(READY_MARKER) {
                let id = after(rest, "vm=").unwrap_or("?").to_string();
                let create_ms = after(rest, "create_ms=").unwrap_or("?").to_string();
                let _ = tx.send(Event::Ready { id, create_ms });
                continue;
            }
            if line.starts_with(GUEST_INIT_MARKER) {
                let _ = tx.send(Event::GuestInit(
                    after(line, "after=").unwrap_or("?").to_string(),
                ));
            }
            if all || interesting(line) {
                println!("  L1| {}", strip_escapes(line));
            }
        }
        let _ = tx.send(Event::Exited);
    });
    Ok(())
}

/// Removes terminal escape sequences (SeaBIOS clears the screen) and other control bytes.
pub fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ params final-byte, or ESC + one byte.
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

/// Whether an L1 console or harness line is worth showing without --console: not L1's
/// kernel log, firmware banners or QEMU's CPU-model warnings.
pub fn interesting(line: &str) -> bool {
    let l = strip_escapes(line);
    let t = l.trim();
    !(t.is_empty()
        || (t.starts_with('[') && t.as_bytes().get(1) == Some(&b' '))
        || t.contains("TCG doesn't support requested feature")
        || t.starts_with("SeaBIOS")
        || t.starts_with("iPXE")
        || t.starts_with("Press Ctrl-B")
        || t.starts_with("Booting from ROM")
        || t.starts_with("TIDEPOOL-L1-MODULE")
        || t.starts_with("TIDEPOOL-HOST-QEMU-EXIT"))
}

/// Stops the harness's process group (QEMU included).
fn kill_group(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the process group this process created for the harness.
        unsafe { libc::kill(-pid, libc::SIGTERM) };
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Runs nested mode until SIGINT/SIGTERM.
pub fn run(
    args: &UpArgs,
    cfg: &UpConfig,
    socket: &Path,
    guest: &GuestImage,
) -> Result<(), UpError> {
    let work = paths::cache_root()
        .join("up")
        .join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| failed("creating the work directory", e))?;
    let token = relay::new_token().map_err(|e| failed("making the relay token", e))?;
    let res = run_in(args, cfg, socket, guest, &work, &token);
    let _ = std::fs::remove_dir_all(&work);
    res
}

fn run_in(
    args: &UpArgs,
    cfg: &UpConfig,
    socket: &Path,
    guest: &GuestImage,
    work: &Path,
    token: &str,
) -> Result<(), UpError> {
    use std::os::unix::fs::OpenOptionsExt;
    let write_private = |name: &str, text: &str| -> Result<(), UpError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(work.join(name))
            .map_err(|e| failed("writing the L1 payload", e))?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .map_err(|e| failed("writing the L1 payload", e))
    };
    // L1 gets the same config (its VM settings), forced direct, socket and pool set by flags.
    let cfg_json =
        serde_json::to_string_pretty(cfg).map_err(|e| failed("serialising the config", e))?;
    write_private("up.json", &cfg_json)?;
    write_private("relay.token", token)?;
    let host_port = free_port()?;
    let log: PathBuf = paths::cache_root().join("up").join("l1-serial.log");
    println!(
        "booting L1 (QEMU TCG, -cpu EPYC,+svm, {} MiB) with tidepool and the guest image; \
         L1 serial log: {}",
        cfg.l1_memory_mib(),
        log.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| failed("starting the async runtime", e))?;
    // SIGINT/SIGTERM from here on: while L1 boots, stop it; later, stop it cleanly.
    let (sig_tx, sig_rx) = mpsc::channel::<()>();
    let (sig_tx2, mut sig_rx2) = tokio::sync::mpsc::channel::<()>(1);
    rt.spawn(async move {
        tidepool_api::server::shutdown_signal().await;
        let _ = sig_tx.send(());
        let _ = sig_tx2.send(()).await;
    });
    let t0 = Instant::now();
    let mut child = spawn_l1(cfg, guest, work, host_port, &log)?;
    let (tx, rx) = mpsc::channel();
    watch(&mut child, args.console, tx)?;

    // Wait for the VM in L1, or L1's end, or the boot timeout, or a signal.
    let limit = Duration::from_secs(cfg.nested.boot_timeout_s);
    let (id, create_ms) = loop {
        if sig_rx.try_recv().is_ok() {
            println!("interrupted while L1 was booting: stopping QEMU");
            kill_group(&child);
            let _ = wait_exit(&mut child, Duration::from_secs(15));
            return Err(UpError::Failed("interrupted before the VM came up".into()));
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Ready { id, create_ms }) => break (id, create_ms),
            Ok(Event::Exited) => {
                let _ = child.wait();
                return Err(UpError::Failed(format!(
                    "L1 stopped before the VM came up; serial log: {}",
                    log.display()
                )));
            }
            Ok(Event::GuestInit(_)) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(UpError::Failed("lost the L1 watcher".into()))
            }
        }
        if t0.elapsed() > limit {
            kill_group(&child);
            let _ = wait_exit(&mut child, Duration::from_secs(10));
            return Err(UpError::Failed(format!(
                "L1 did not bring the VM up within {} s (nested.boot_timeout_s); serial log: {}",
                limit.as_secs(),
                log.display()
            )));
        }
    };
    let ready_s = t0.elapsed().as_secs_f64();
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], host_port));
    let listener = relay::bind_host_socket(socket).map_err(|e| failed("binding the socket", e))?;
    let _guard = rt.enter();
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|e| failed("registering the socket", e))?;
    let relay_task = rt.spawn(relay::serve_host(listener, target, token.to_string()));
    println!(
        "nested mode: L1 booted and VM {id} was created {ready_s:.1} s after QEMU started \
         (create {create_ms} ms inside L1)."
    );
    println!(
        "  This is slower than a real KVM host, honestly: L1 runs under QEMU TCG (every L1 \
         instruction emulated, the daemon included) and the guest runs on L1's KVM over \
         emulated SVM, so every guest exit and first-touch page fault goes through the \
         emulator (first touch measured here at about 140 MiB/s in the guest, against \
         0.3-6.4 GiB/s on the host). Memory figures (vm memory, host) are L1's."
    );
    print_banner(socket, &id, cfg.vm.memory_mib, cfg.vm.hotplug_region_mib);

    // Run until a signal or L1's end.
    let l1_ended = rt.block_on(async {
        let (etx, mut erx) = tokio::sync::mpsc::channel::<bool>(4);
        std::thread::spawn(move || {
            while let Ok(ev) = rx.recv() {
                match ev {
                    Event::GuestInit(after) => {
                        println!("the guest reached /init {after} after its creation (nested)")
                    }
                    Event::Exited => {
                        let _ = etx.blocking_send(true);
                        return;
                    }
                    Event::Ready { .. } => {}
                }
            }
        });
        tokio::select! {
            _ = sig_rx2.recv() => false,
            _ = erx.recv() => true,
        }
    });
    relay_task.abort();
    let _ = std::fs::remove_file(socket);
    if l1_ended {
        let _ = child.wait();
        return Err(UpError::Failed(format!(
            "L1 stopped unexpectedly; serial log: {}",
            log.display()
        )));
    }
    println!("stopping: asking tidepool in L1 to delete VM {id} and shut down");
    let asked = rt.block_on(relay::send_stop(target, token));
    if !asked || !wait_exit(&mut child, Duration::from_secs(60)) {
        println!("L1 did not stop by itself; stopping QEMU");
        kill_group(&child);
        let _ = wait_exit(&mut child, Duration::from_secs(15));
    }
    let clean = std::fs::read_to_string(&log).is_ok_and(|l| l.contains(STOPPED_MARKER));
    println!(
        "stopped{}; socket {} removed",
        if clean {
            " cleanly (VM deleted in L1, L1 powered off)"
        } else {
            ""
        },
        socket.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_command_sets_up_the_nic_then_runs_up_direct() {
        let c = l1_command(2560);
        assert!(c.starts_with("ip link set lo up"));
        assert!(c.contains("ip addr add 10.0.2.15/24 dev eth0"));
        assert!(c.contains("./tidepool up --direct"));
        assert!(c.contains("--relay-listen 10.0.2.15:7070"));
        assert!(c.contains("--pool-mib 2560"));
    }

    #[test]
    fn console_filtering() {
        assert_eq!(
            strip_escapes("\u{1b}c\u{1b}[?7l\u{1b}[2JTIDEPOOL-L1-INIT uptime=1"),
            "TIDEPOOL-L1-INIT uptime=1"
        );
        assert!(interesting("TIDEPOOL-L1-KVM ok"));
        assert!(interesting("[tidepool] booting L1"));
        assert!(!interesting("[    1.930674] reboot: Power down"));
        assert!(!interesting(
            "qemu-system-x86_64: warning: TCG doesn't support requested feature: x"
        ));
        assert!(!interesting("\u{1b}[0mSeaBIOS (version 1.16.2)"));
        assert!(!interesting("   "));
    }

    #[test]
    fn free_ports_are_loopback_ports() {
        assert!(free_port().unwrap() > 0);
    }
}
