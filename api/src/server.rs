//! Listeners and the serve loop: a Unix socket created with mode 0600 (no token), and an
//! optional loopback-only TCP listener that requires `Authorization: Bearer <token>`.
//!
//! The token file is watched: every TCP request stats it (one `stat`, no read) and re-reads
//! it when its identity, size or times changed, so a rotated token takes effect with the next
//! request and the old one stops working. A file that becomes unreadable or invalid fails
//! closed (every TCP request gets 401) until it is fixed. Write a new token atomically
//! (a temporary file renamed over the old one), or a request that races the write may see
//! a half-written file and get 401.
//!
//! Both listeners enforce [`ClientTimeouts`] (see [`crate::conn`]).

use crate::backend::ApiBackend;
use crate::conn::{read_body_in_time, serve_listener, BodyRules};
pub use crate::conn::{ClientTimeouts, DEFAULT_BODY_READ_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT};
use crate::error::{ApiError, ErrorKind};
use crate::routes::{router, ApiState, InFlight};
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Default path of the daemon's Unix socket.
pub const DEFAULT_SOCKET_PATH: &str = "/run/tidepool/api.sock";
/// Default request body limit (1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;
/// Default number of backend calls per VM in flight.
pub const DEFAULT_MAX_INFLIGHT_PER_VM: usize = 8;
/// Default time a handler waits for the backend.
pub const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The optional TCP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// Address to listen on; must be a loopback address (port 0 picks a free port).
    pub addr: SocketAddr,
    /// File holding the bearer token (surrounding whitespace is ignored).
    pub token_file: PathBuf,
}

/// Server configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Path of the Unix socket.
    pub socket_path: PathBuf,
    /// Optional loopback TCP listener.
    pub tcp: Option<TcpConfig>,
    /// Largest request body accepted (413 above).
    pub body_limit: usize,
    /// How long a handler waits for the backend (504 after).
    pub backend_timeout: Duration,
    /// Backend calls per VM that may be in flight; more get 503 at once.
    pub max_inflight_per_vm: usize,
    /// How long clients get to send request headers and bodies.
    pub client_timeouts: ClientTimeouts,
}

impl ServeConfig {
    /// A config with only the Unix socket and default limits.
    pub fn unix(socket_path: impl Into<PathBuf>) -> Self {
        ServeConfig {
            socket_path: socket_path.into(),
            tcp: None,
            body_limit: DEFAULT_BODY_LIMIT,
            backend_timeout: DEFAULT_BACKEND_TIMEOUT,
            max_inflight_per_vm: DEFAULT_MAX_INFLIGHT_PER_VM,
            client_timeouts: ClientTimeouts::default(),
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another daemon answers on the socket.
    #[error("another daemon is listening on {0}")]
    AlreadyRunning(PathBuf),
    /// The socket path exists and is not a socket; it is left alone.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The TCP address is not a loopback address.
    #[error("refusing to listen on non-loopback address {0}: only loopback TCP is supported")]
    NonLoopback(SocketAddr),
    /// The token file is unusable.
    #[error("token file {path}: {reason}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}

/// Removes the socket file when the server stops, if it is still ours.
#[derive(Debug)]
struct SocketGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Binds the Unix socket at `path` with mode 0600, so that it is never reachable with wider
/// permissions: it is bound inside a fresh 0700 directory, chmod-ed, then renamed into place.
/// A stale socket file (nobody listening) is replaced; a live one is refused.
fn bind_unix(path: &Path) -> Result<(std::os::unix::net::UnixListener, SocketGuard), ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::AlreadyRunning(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing stale socket");
                std::fs::remove_file(path)
                    .map_err(io_err(format!("removing stale socket {}", path.display())))?;
            }
            Err(e) => {
                return Err(ServeError::Io {
                    context: format!("probing existing socket {}", path.display()),
                    source: e,
                })
            }
        },
        Ok(_) => return Err(ServeError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ServeError::Io {
                context: format!("checking {}", path.display()),
                source: e,
            })
        }
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.exists() {
        // A missing runtime directory is created private to the daemon's user.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(io_err(format!("creating {}", parent.display())))?;
    }
    let tmp_dir = parent.join(format!(
        ".tp{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp_dir)
        .map_err(io_err(format!("creating {}", tmp_dir.display())))?;
    let tmp_sock = tmp_dir.join("s");
    let result = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&tmp_sock)
            .map_err(io_err(format!("binding {}", tmp_sock.display())))?;
        std::fs::set_permissions(&tmp_sock, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod 0600 on the socket"))?;
        std::fs::rename(&tmp_sock, path)
            .map_err(io_err(format!("moving the socket to {}", path.display())))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp_sock);
    let _ = std::fs::remove_dir(&tmp_dir);
    let listener = result?;
    let meta =
        std::fs::symlink_metadata(path).map_err(io_err(format!("stat {}", path.display())))?;
    let guard = SocketGuard {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, guard))
}

/// Reads and checks the bearer token file.
pub fn read_token(path: &Path) -> Result<String, ServeError> {
    let err = |reason: String| ServeError::Token {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "token file is readable by group or others");
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("empty token".into()));
    }
    if token.len() < 16 {
        return Err(err("token shorter than 16 characters".into()));
    }
    if token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(err("token must be printable ASCII without spaces".into()));
    }
    Ok(token.to_string())
}

/// What identifies one version of the token file: a change in any field means it was
/// rewritten, replaced or moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

#[derive(Debug)]
struct CachedToken {
    stamp: Option<FileStamp>,
    /// The token, or why the file is unusable (then every request is refused).
    token: Result<Arc<str>, String>,
}

/// The bearer token of the TCP listener, re-read whenever its file changes (checked with one
/// `stat` per request).
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<CachedToken>,
}

impl TokenFile {
    /// Reads the token file; an unusable file is an error at start.
    pub fn open(path: &Path) -> Result<TokenFile, ServeError> {
        let stamp = std::fs::metadata(path).ok().map(|m| FileStamp::of(&m));
        let token = read_token(path)?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            cached: Mutex::new(CachedToken {
                stamp,
                token: Ok(token.into()),
            }),
        })
    }

    /// The current token, re-read if the file changed since the last call; `Err` says why
    /// the file is unusable now.
    pub fn current(&self) -> Result<Arc<str>, String> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| FileStamp::of(&m));
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if stamp.is_none() || c.stamp != stamp {
            let token = read_token(&self.path)
                .map(Arc::from)
                .map_err(|e| e.to_string());
            match &token {
                Ok(_) if c.stamp.is_some() => {
                    tracing::info!(path = %self.path.display(), "token file changed; token reloaded")
                }
                Ok(_) => {}
                Err(e) if c.token.is_ok() || c.stamp != stamp => {
                    tracing::warn!(error = %e, "token file unusable; refusing TCP requests until it is fixed")
                }
                Err(_) => {}
            }
            c.stamp = stamp;
            c.token = token;
        }
        c.token.clone()
    }

    /// Whether `presented` is the current token (false while the file is unusable).
    pub fn accepts(&self, presented: &str) -> bool {
        self.current()
            .is_ok_and(|t| constant_time_eq(presented.as_bytes(), t.as_bytes()))
    }
}

/// Compares in time independent of where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn require_token(State(token): State<Arc<TokenFile>>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .is_some_and(|t| token.accepts(t));
    if !ok {
        tracing::warn!(path = %req.uri().path(), "rejected TCP request without a valid token");
        return ApiError::new(ErrorKind::Unauthorized, "missing or wrong bearer token")
            .into_response();
    }
    next.run(req).await
}

/// A bound server, ready to run. Binding and running are separate so that callers (and
/// tests) learn the TCP port before serving.
#[derive(Debug)]
pub struct Server {
    unix: tokio::net::UnixListener,
    guard: SocketGuard,
    tcp: Option<(tokio::net::TcpListener, Arc<TokenFile>)>,
    state: ApiState,
    body_limit: usize,
    timeouts: ClientTimeouts,
}

impl Server {
    /// Binds the listeners. Must be called inside a tokio runtime.
    pub fn bind(backend: Arc<dyn ApiBackend>, cfg: ServeConfig) -> Result<Server, ServeError> {
        let tcp = match &cfg.tcp {
            None => None,
            Some(t) => {
                if !t.addr.ip().is_loopback() {
                    return Err(ServeError::NonLoopback(t.addr));
                }
                let token = TokenFile::open(&t.token_file)?;
                let l = std::net::TcpListener::bind(t.addr)
                    .map_err(io_err(format!("binding {}", t.addr)))?;
                l.set_nonblocking(true)
                    .map_err(io_err("setting the TCP listener non-blocking"))?;
                let l = tokio::net::TcpListener::from_std(l)
                    .map_err(io_err("registering the TCP listener"))?;
                Some((l, Arc::new(token)))
            }
        };
        let (unix, guard) = bind_unix(&cfg.socket_path)?;
        unix.set_nonblocking(true)
            .map_err(io_err("setting the Unix listener non-blocking"))?;
        let unix = tokio::net::UnixListener::from_std(unix)
            .map_err(io_err("registering the Unix listener"))?;
        Ok(Server {
            unix,
            guard,
            tcp,
            state: ApiState {
                backend,
                timeout: cfg.backend_timeout,
                inflight: Arc::new(InFlight::new(cfg.max_inflight_per_vm)),
            },
            body_limit: cfg.body_limit,
            timeouts: cfg.client_timeouts,
        })
    }

    /// The Unix socket path.
    pub fn socket_path(&self) -> &Path {
        &self.guard.path
    }

    /// The bound TCP address, if TCP is enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
    /// and removes the socket file.
    pub async fn run<F>(self, shutdown: F) -> Result<(), ServeError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Server {
            unix,
            guard,
            tcp,
            state,
            body_limit,
            timeouts,
        } = self;
        let rules = BodyRules {
            max_bytes: body_limit,
            timeout: timeouts.body_read,
        };
        let app = router(state, body_limit)
            .layer(middleware::from_fn_with_state(rules, read_body_in_time));
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        });
        tracing::info!(socket = %guard.path.display(), "API listening on Unix socket");
        let unix_srv = serve_listener(unix, app.clone(), timeouts, rx.clone());
        match tcp {
            None => unix_srv.await,
            Some((listener, token)) => {
                if let Ok(a) = listener.local_addr() {
                    tracing::info!(addr = %a, "API listening on TCP (bearer token required)");
                }
                // The token is checked before anything else, the body included.
                let tcp_app = app.layer(middleware::from_fn_with_state(token, require_token));
                let tcp_srv = serve_listener(listener, tcp_app, timeouts, rx.clone());
                tokio::join!(unix_srv, tcp_srv);
            }
        }
        drop(guard);
        Ok(())
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down the API server");
}

/// Binds and serves until SIGINT/SIGTERM, with graceful shutdown.
pub async fn serve(backend: Arc<dyn ApiBackend>, cfg: ServeConfig) -> Result<(), ServeError> {
    Server::bind(backend, cfg)?.run(shutdown_signal()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tp-srv-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::create_dir_all(&d);
        d
    }

    #[test]
    fn token_file_rules() {
        let d = tmp("token");
        let p = d.join("t");
        let _ = std::fs::write(&p, "  0123456789abcdef0123\n");
        assert_eq!(read_token(&p).ok().as_deref(), Some("0123456789abcdef0123"));
        let _ = std::fs::write(&p, "short");
        assert!(read_token(&p).is_err());
        let _ = std::fs::write(&p, "\n");
        assert!(read_token(&p).is_err());
        let _ = std::fs::write(&p, "0123456789 abcdef0123");
        assert!(read_token(&p).is_err());
        assert!(read_token(&d.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let d = tmp("notsock");
        let p = d.join("api.sock");
        let _ = std::fs::write(&p, "data");
        assert!(matches!(bind_unix(&p), Err(ServeError::NotASocket(_))));
        assert!(p.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn stale_socket_replaced_live_socket_refused() {
        let d = tmp("stale");
        let p = d.join("api.sock");
        // A socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&p));
        assert!(p.exists());
        let (live, guard) = match bind_unix(&p) {
            Ok(v) => v,
            Err(e) => panic!("stale socket not replaced: {e}"),
        };
        let mode = std::fs::metadata(&p).map(|m| m.mode() & 0o777).unwrap_or(0);
        assert_eq!(mode, 0o600);
        assert!(matches!(bind_unix(&p), Err(ServeError::AlreadyRunning(_))));
        drop(live);
        drop(guard);
        assert!(!p.exists(), "guard removes the socket");
        let _ = std::fs::remove_dir_all(&d);
    }
}
