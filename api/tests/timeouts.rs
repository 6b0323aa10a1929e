//! Clients that do not finish their requests, and token rotation, against a real server on
//! both listeners.
//!
//! The server's limits here are short (header 300 ms, body 300 ms); the tests only wait for
//! the server to act within a generous bound (10 s), so they check behaviour, not speed.

mod common;

use common::{Harness, TOKEN};
use std::time::Duration;
use tidepool_api::server::ClientTimeouts;
use tidepool_api::testing::MemBackend;
use tidepool_api::{Client, ClientError, ErrorKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const LIMITS: ClientTimeouts = ClientTimeouts {
    header_read: Duration::from_millis(300),
    body_read: Duration::from_millis(300),
};
/// How long a test waits for the server to act on a stalled client.
const PATIENCE: Duration = Duration::from_secs(10);

async fn harness() -> Harness {
    Harness::start_full(MemBackend::default(), Duration::from_secs(30), LIMITS).await
}

/// Everything the server sends until it closes the connection; `None` if it keeps the
/// connection open for longer than [`PATIENCE`].
async fn read_until_closed<S: AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, bytes: &str) {
    s.write_all(bytes.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
}

/// A request whose headers never end is cut off, without an answer, on both listeners; the
/// server keeps serving everyone else meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_headers_close_the_connection() {
    let h = harness().await;
    let mut unix = tokio::net::UnixStream::connect(&h.socket)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut tcp = tokio::net::TcpStream::connect(h.tcp_addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let partial = "GET /v1/host HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1";
    send(&mut unix, partial).await;
    send(&mut tcp, partial).await;
    // Other clients are served while the two stalled connections are open.
    h.unix.host().await.unwrap_or_else(|e| panic!("{e}"));
    h.tcp.host().await.unwrap_or_else(|e| panic!("{e}"));
    let u = read_until_closed(&mut unix).await;
    let t = read_until_closed(&mut tcp).await;
    assert!(
        u.is_some(),
        "the Unix listener kept a stalled connection open"
    );
    assert!(
        t.is_some(),
        "the TCP listener kept a stalled connection open"
    );
    // No request was ever complete, so nothing was answered with a success.
    for text in [u, t].into_iter().flatten() {
        assert!(!text.contains(" 200 "), "{text}");
    }
    h.stop().await;
}

/// A connection that sends nothing at all, or goes idle after a complete request, is closed
/// too: the header timeout also bounds the wait for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    let h = harness().await;
    let mut silent = tokio::net::UnixStream::connect(&h.socket)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_until_closed(&mut silent).await.as_deref(), Some(""));

    let mut idle = tokio::net::UnixStream::connect(&h.socket)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    send(
        &mut idle,
        "GET /v1/host HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    let text = read_until_closed(&mut idle)
        .await
        .unwrap_or_else(|| panic!("an idle keep-alive connection stayed open"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    h.stop().await;
}

/// A body that stops short of its Content-Length gets 408 and the connection is closed;
/// nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_bodies_get_408() {
    let h = harness().await;
    let before = h.unix.list_vms().await.unwrap_or_else(|e| panic!("{e}"));
    let partial = "POST /v1/vms HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                   Content-Length: 100\r\n\r\n{\"memory_mib\":";
    let mut unix = tokio::net::UnixStream::connect(&h.socket)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    send(&mut unix, partial).await;
    let text = read_until_closed(&mut unix)
        .await
        .unwrap_or_else(|| panic!("a stalled body kept the connection open"));
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");

    let mut tcp = tokio::net::TcpStream::connect(h.tcp_addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    send(
        &mut tcp,
        &partial.replace(
            "Host: localhost\r\n",
            &format!("Host: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"),
        ),
    )
    .await;
    let text = read_until_closed(&mut tcp)
        .await
        .unwrap_or_else(|| panic!("a stalled body kept the TCP connection open"));
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(
        h.unix.list_vms().await.unwrap_or_else(|e| panic!("{e}")),
        before
    );
    h.stop().await;
}

/// Without the token, a stalled body is not even waited for: 401 comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_checked_before_the_body_is_read() {
    let h = harness().await;
    let mut tcp = tokio::net::TcpStream::connect(h.tcp_addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    send(
        &mut tcp,
        "POST /v1/vms HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{",
    )
    .await;
    let text = read_until_closed(&mut tcp)
        .await
        .unwrap_or_else(|| panic!("the connection stayed open"));
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    h.stop().await;
}

fn status_kind(r: Result<tidepool_api::types::HostInfo, ClientError>) -> Option<ErrorKind> {
    match r {
        Ok(_) => None,
        Err(ClientError::Api { code, .. }) => ErrorKind::from_code(&code),
        Err(e) => panic!("transport error: {e}"),
    }
}

/// Rewriting the token file changes the token for the next request; an unusable file
/// refuses every TCP request until it is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_takes_effect_at_once() {
    let h = Harness::start().await;
    let file = h.dir.0.join("token");
    let new_token = "rotated-token-fedcba9876543210";
    let old = Client::tcp(h.tcp_addr, TOKEN);
    let new = Client::tcp(h.tcp_addr, new_token);
    assert_eq!(status_kind(old.host().await), None);
    assert_eq!(status_kind(new.host().await), Some(ErrorKind::Unauthorized));

    // Atomic replacement, as the docs advise.
    let tmp = h.dir.0.join("token.new");
    std::fs::write(&tmp, format!("{new_token}\n")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(&tmp, &file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status_kind(new.host().await), None);
    assert_eq!(status_kind(old.host().await), Some(ErrorKind::Unauthorized));

    // In-place rewrite (same inode) back to the old token.
    std::fs::write(&file, TOKEN).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status_kind(old.host().await), None);
    assert_eq!(status_kind(new.host().await), Some(ErrorKind::Unauthorized));

    // An unusable file fails closed, for every token; fixing it restores access.
    std::fs::write(&file, "short").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status_kind(old.host().await), Some(ErrorKind::Unauthorized));
    std::fs::remove_file(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status_kind(old.host().await), Some(ErrorKind::Unauthorized));
    std::fs::write(&file, TOKEN).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status_kind(old.host().await), None);
    // The Unix socket never needed the token.
    h.unix.host().await.unwrap_or_else(|e| panic!("{e}"));
    h.stop().await;
}
