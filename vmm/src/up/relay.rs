//! The API bridge of nested mode.
//!
//! ```text
//! host: tidepool up ── Unix socket (0600) ─┐
//!   client ──► host relay ──► 127.0.0.1:P (QEMU hostfwd, restrict=on)
//!                                 └──► L1 10.0.2.15:7070: L1 relay ──► daemon's Unix socket
//! ```
//!
//! QEMU's hostfwd port on the host's loopback is reachable by any local user, so every
//! connection starts with a preamble line `TIDEPOOL-RELAY <token> <API|STOP>\n`; the L1 relay
//! drops connections without the token (random, 32 hex digits, handed to L1 in its payload).
//! `API` connections are then spliced to the daemon's socket; `STOP` asks the `up` in L1 to
//! shut down cleanly. The daemon itself listens only on its Unix socket in L1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// The fixed port of the L1 relay on L1's user-network address.
pub const L1_RELAY_PORT: u16 = 7070;
/// L1's address on QEMU's user network.
pub const L1_ADDR: &str = "10.0.2.15";
const MAGIC: &str = "TIDEPOOL-RELAY";
const MAX_PREAMBLE: usize = 128;

/// What a connection asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Splice to the daemon's API.
    Api,
    /// Stop `tidepool up` in L1.
    Stop,
}

/// The preamble line for `req`.
pub fn preamble(token: &str, req: Request) -> String {
    let r = match req {
        Request::Api => "API",
        Request::Stop => "STOP",
    };
    format!("{MAGIC} {token} {r}\n")
}

/// Parses a preamble line (without its newline) against `token`.
pub fn parse_preamble(line: &str, token: &str) -> Option<Request> {
    let mut it = line.split(' ');
    if it.next()? != MAGIC {
        return None;
    }
    let t = it.next()?;
    if t.len() != token.len() || !constant_time_eq(t.as_bytes(), token.as_bytes()) {
        return None;
    }
    let req = match it.next()? {
        "API" => Request::Api,
        "STOP" => Request::Stop,
        _ => return None,
    };
    it.next().is_none().then_some(req)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random token (32 hex digits from `/dev/urandom`).
pub fn new_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    let mut f = std::fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Reads the preamble line byte by byte (so nothing after it is consumed), within 5 s.
async fn read_preamble(s: &mut TcpStream) -> Option<String> {
    let read = async {
        let mut line = Vec::with_capacity(64);
        loop {
            let b = s.read_u8().await.ok()?;
            if b == b'\n' {
                return String::from_utf8(line).ok();
            }
            if line.len() >= MAX_PREAMBLE {
                return None;
            }
            line.push(b);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

/// The L1 side: accepts on `listener`, checks each preamble, splices `API` connections to
/// `daemon` and sends on `stop` for `STOP`. Runs until the task is dropped.
pub async fn serve_l1(
    listener: TcpListener,
    daemon: PathBuf,
    token: String,
    stop: tokio::sync::mpsc::Sender<()>,
) {
    loop {
        let Ok((mut tcp, peer)) = listener.accept().await else {
            continue;
        };
        let daemon = daemon.clone();
        let token = token.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            match read_preamble(&mut tcp)
                .await
                .and_then(|l| parse_preamble(&l, &token))
            {
                Some(Request::Api) => match UnixStream::connect(&daemon).await {
                    Ok(mut unix) => {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "relay: daemon socket unreachable"),
                },
                Some(Request::Stop) => {
                    let _ = tcp.write_all(b"stopping\n").await;
                    let _ = stop.send(()).await;
                }
                None => tracing::warn!(%peer, "relay: connection without a valid preamble dropped"),
            }
        });
    }
}

/// The host side: accepts on `listener` (the host's API socket) and forwards each connection
/// to `target` with the API preamble. Runs until the task is dropped.
pub async fn serve_host(listener: UnixListener, target: SocketAddr, token: String) {
    loop {
        let Ok((mut unix, _)) = listener.accept().await else {
            continue;
        };
        let token = token.clone();
        tokio::spawn(async move {
            match TcpStream::connect(target).await {
                Ok(mut tcp) => {
                    if tcp
                        .write_all(preamble(&token, Request::Api).as_bytes())
                        .await
                        .is_ok()
                    {
                        let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "relay: L1 unreachable"),
            }
        });
    }
}

/// Sends `STOP` to the L1 relay through `target`; true when L1 acknowledged.
pub async fn send_stop(target: SocketAddr, token: &str) -> bool {
    let go = async {
        let mut tcp = TcpStream::connect(target).await.ok()?;
        tcp.write_all(preamble(token, Request::Stop).as_bytes())
            .await
            .ok()?;
        let mut buf = [0u8; 9];
        tcp.read_exact(&mut buf).await.ok()?;
        (&buf == b"stopping\n").then_some(())
    };
    tokio::time::timeout(Duration::from_secs(10), go)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Errors binding the host's socket.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process answers on it.
    #[error("another daemon is listening on {0}")]
    AlreadyRunning(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; remove it or choose another --socket")]
    NotASocket(PathBuf),
    /// I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Binds a Unix socket at `path` for the host side of the bridge: the parent is created
/// 0700 when missing, a stale socket is replaced, a live one refused, and the socket is made
/// 0600 before anyone is accepted.
pub fn bind_host_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, BindError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let io = |what: String| move |source| BindError::Io { what, source };
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::AlreadyRunning(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?;
        }
        Ok(_) => return Err(BindError::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    // Bind under a 0077 umask so the socket is never wider than 0600, then make sure.
    // SAFETY: umask only changes this process's file-creation mask; restored right after.
    let old = unsafe { libc::umask(0o077) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = bound.map_err(io(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", path.display())))?;
    l.set_nonblocking(true)
        .map_err(io("setting the socket non-blocking".into()))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trip() {
        let t = "0123456789abcdef0123456789abcdef";
        let p = preamble(t, Request::Api);
        assert_eq!(parse_preamble(p.trim_end(), t), Some(Request::Api));
        let p = preamble(t, Request::Stop);
        assert_eq!(parse_preamble(p.trim_end(), t), Some(Request::Stop));
    }

    #[test]
    fn bad_preambles_are_refused() {
        let t = "0123456789abcdef0123456789abcdef";
        for l in [
            "",
            "GET / HTTP/1.1",
            "TIDEPOOL-RELAY 0123456789abcdef0123456789abcdee API",
            "TIDEPOOL-RELAY short API",
            "TIDEPOOL-RELAY 0123456789abcdef0123456789abcdef DANCE",
            "TIDEPOOL-RELAY 0123456789abcdef0123456789abcdef API extra",
        ] {
            assert_eq!(parse_preamble(l, t), None, "{l}");
        }
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn relays_splice_and_check_tokens() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = std::env::temp_dir().join(format!("tp-relay-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let daemon_path = dir.join("d").join("daemon.sock");
            let host_path = dir.join("h").join("host.sock");
            // A fake "daemon": echoes one line back in upper case.
            let daemon = UnixListener::from_std(bind_host_socket(&daemon_path).unwrap()).unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = daemon.accept().await {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64];
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        let _ = s.write_all(&buf[..n].to_ascii_uppercase()).await;
                    });
                }
            });
            let token = new_token().unwrap();
            let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let l1_addr = l1.local_addr().unwrap();
            let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(serve_l1(l1, daemon_path.clone(), token.clone(), stop_tx));
            let host = UnixListener::from_std(bind_host_socket(&host_path).unwrap()).unwrap();
            tokio::spawn(serve_host(host, l1_addr, token.clone()));
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&host_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            assert!(matches!(
                bind_host_socket(&host_path),
                Err(BindError::AlreadyRunning(_))
            ));

            let mut c = UnixStream::connect(&host_path).await.unwrap();
            c.write_all(b"hello").await.unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"HELLO");

            // Without the token, L1 drops the connection and never reaches the daemon.
            let mut bad = TcpStream::connect(l1_addr).await.unwrap();
            bad.write_all(b"TIDEPOOL-RELAY 00000000000000000000000000000000 API\nhello")
                .await
                .unwrap();
            let mut out = Vec::new();
            let _ = bad.read_to_end(&mut out).await;
            assert!(out.is_empty());

            assert!(send_stop(l1_addr, &token).await);
            assert!(stop_rx.recv().await.is_some());
            let _ = std::fs::remove_dir_all(&dir);
        });
    }
}
