//! Serving accepted connections. The server drives hyper itself (rather than `axum::serve`,
//! which offers no timeouts) so that clients cannot hold resources forever:
//!
//! - **Headers.** Every connection has a header read timeout ([`ClientTimeouts::header_read`]):
//!   from the moment the server waits for a request, also between keep-alive requests, the
//!   client must send a complete request head within it, or the connection is closed (the
//!   slowloris attack: open connections and never finish their headers).
//! - **Bodies.** `read_body_in_time` reads a request body completely, within
//!   [`ClientTimeouts::body_read`] and the body limit, before the handler runs; a body that
//!   does not arrive in time gets 408 and the connection is closed.
//!
//! Graceful shutdown: on the stop signal the listener stops accepting, every connection
//! finishes the request it is serving and closes, and `serve_listener` returns when all
//! are gone.

use crate::error::{ApiError, ErrorKind};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// Default [`ClientTimeouts::header_read`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ClientTimeouts::body_read`].
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long clients get to send what they send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// From when the server waits for a request (a new connection, or an idle keep-alive
    /// one) to the end of that request's headers; the connection is closed after it.
    pub header_read: Duration,
    /// From the end of the headers to the end of the body; 408 after it.
    pub body_read: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            header_read: DEFAULT_HEADER_READ_TIMEOUT,
            body_read: DEFAULT_BODY_READ_TIMEOUT,
        }
    }
}

/// What `read_body_in_time` enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyRules {
    /// Largest body (413 above).
    pub max_bytes: usize,
    /// Time for the whole body (408 after).
    pub timeout: Duration,
}

/// Middleware: buffer the request body within the time and size limits, then run the
/// handler with the buffered body. Requests without a body pass straight through.
pub(crate) async fn read_body_in_time(
    State(rules): State<BodyRules>,
    req: Request,
    next: Next,
) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let limited = Limited::new(body, rules.max_bytes);
    match tokio::time::timeout(rules.timeout, limited.collect()).await {
        Err(_) => {
            tracing::warn!(path = %parts.uri.path(), "request body did not arrive in time");
            ApiError::new(
                ErrorKind::RequestTimeout,
                format!("the request body did not arrive within {:?}", rules.timeout),
            )
            .into_response()
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            ApiError::new(ErrorKind::PayloadTooLarge, "request body too large").into_response()
        }
        Ok(Err(e)) => {
            ApiError::bad_request(format!("reading the request body: {e}")).into_response()
        }
        Ok(Ok(collected)) => {
            next.run(Request::from_parts(parts, Body::from(collected.to_bytes())))
                .await
        }
    }
}

/// A listener the server accepts connections from.
pub(crate) trait Accept {
    /// The connection type.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Accept one connection.
    fn accept_io(&self) -> impl std::future::Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&self) -> io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&self) -> io::Result<Self::Io> {
        let (s, _) = self.accept().await?;
        // Small JSON answers should not wait for Nagle.
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

/// Whether an accept error is about one connection (go on at once) rather than the process
/// (too many open files: back off a little).
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Serve `app` on `listener` until `stop` turns true, then wait for open connections to
/// finish their current request.
pub(crate) async fn serve_listener<L: Accept>(
    listener: L,
    app: Router,
    timeouts: ClientTimeouts,
    mut stop: watch::Receiver<bool>,
) {
    // Every connection task holds a receiver; `closed()` resolves when all are gone.
    let (all_closed_tx, all_closed_rx) = watch::channel(());
    loop {
        let io = tokio::select! {
            r = listener.accept_io() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let io = match io {
            Ok(io) => io,
            Err(e) if per_connection(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let svc = TowerToHyperService::new(app.clone());
        let mut stop = stop.clone();
        let held = all_closed_rx.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.header_read);
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            let mut conn = std::pin::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(held);
        });
    }
    drop(listener);
    drop(all_closed_rx);
    all_closed_tx.closed().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_finite_and_short() {
        let t = ClientTimeouts::default();
        assert!(t.header_read > Duration::ZERO && t.header_read <= Duration::from_secs(60));
        assert!(t.body_read > Duration::ZERO && t.body_read <= Duration::from_secs(60));
    }

    #[test]
    fn accept_errors_are_classified() {
        assert!(per_connection(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        assert!(!per_connection(&io::Error::from_raw_os_error(libc::EMFILE)));
    }
}
