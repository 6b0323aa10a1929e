//! An async HTTP/1 client for the API, over the Unix socket or over loopback TCP with a bearer
//! token. One connection per request (the daemon is local; this keeps the client simple and
//! robust against daemon restarts).

use crate::error::{ErrorBody, ErrorKind};
use crate::types::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, LOCATION};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default time the client waits for one request.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect to the daemon.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// Socket path or address.
        target: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// HTTP-level failure.
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("bad request: {0}")]
    Request(String),
    /// The server answered with an error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The `code` of the error body.
        code: String,
        /// The `message` of the error body.
        message: String,
    },
    /// The response could not be decoded.
    #[error("unexpected response (HTTP {status}): {reason}")]
    Decode {
        /// HTTP status.
        status: u16,
        /// What was wrong.
        reason: String,
    },
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The token file could not be read.
    #[error("token file {path}: {reason}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ClientError {
    /// The error kind for errors the server answered.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api { code, .. } => ErrorKind::from_code(code),
            _ => None,
        }
    }
}

/// Where the daemon listens.
#[derive(Clone, PartialEq, Eq)]
pub enum Transport {
    /// Unix socket path.
    Unix(PathBuf),
    /// Loopback TCP with a bearer token.
    Tcp {
        /// Address.
        addr: SocketAddr,
        /// Bearer token (not printed by `Debug`).
        token: String,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Unix(p) => f.debug_tuple("Unix").field(p).finish(),
            Transport::Tcp { addr, .. } => f
                .debug_struct("Tcp")
                .field("addr", addr)
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

/// A raw HTTP response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl RawResponse {
    /// Decodes the body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Decode {
            status: self.status.as_u16(),
            reason: e.to_string(),
        })
    }

    /// Turns a non-`expected` status into [`ClientError::Api`] (or `Decode` when the body is
    /// not an error body).
    pub fn expect(self, expected: StatusCode) -> Result<RawResponse, ClientError> {
        if self.status == expected {
            return Ok(self);
        }
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(e) => Err(ClientError::Api {
                status: self.status.as_u16(),
                code: e.code,
                message: e.message,
            }),
            Err(_) => Err(ClientError::Decode {
                status: self.status.as_u16(),
                reason: format!(
                    "expected HTTP {expected}, body: {}",
                    String::from_utf8_lossy(&self.body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                ),
            }),
        }
    }
}

/// The 202 answer to a resize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeAccepted {
    /// The status link (`Location`).
    pub location: String,
    /// Memory figures right after the request.
    pub memory: MemoryInfo,
}

/// The API client.
#[derive(Debug, Clone)]
pub struct Client {
    transport: Transport,
    timeout: Duration,
}

impl Client {
    /// A client for the Unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Client {
            transport: Transport::Unix(path.into()),
            timeout: DEFAULT_CLIENT_TIMEOUT,
        }
    }

    /// A client for loopback TCP with `token`.
    pub fn tcp(addr: SocketAddr, token: impl Into<String>) -> Self {
        Client {
            transport: Transport::Tcp {
                addr,
                token: token.into(),
            },
            timeout: DEFAULT_CLIENT_TIMEOUT,
        }
    }

    /// A client for loopback TCP, reading the token from `token_file`.
    pub fn tcp_with_token_file(addr: SocketAddr, token_file: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(token_file).map_err(|e| ClientError::Token {
            path: token_file.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self::tcp(addr, text.trim()))
    }

    /// Sets the per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The transport.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Sends one request with an optional raw body (sent as `application/json`) and returns
    /// the raw response. Used by the typed methods and by tests that send malformed bodies.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost");
        if let Transport::Tcp { token, .. } = &self.transport {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let req = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let fut = async {
            match &self.transport {
                Transport::Unix(p) => {
                    let s = tokio::net::UnixStream::connect(p).await.map_err(|source| {
                        ClientError::Connect {
                            target: p.display().to_string(),
                            source,
                        }
                    })?;
                    exchange(TokioIo::new(s), req).await
                }
                Transport::Tcp { addr, .. } => {
                    let s = tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(|source| ClientError::Connect {
                            target: addr.to_string(),
                            source,
                        })?;
                    exchange(TokioIo::new(s), req).await
                }
            }
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        expected: StatusCode,
    ) -> Result<(T, HeaderMap), ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let resp = self.send_raw(method, path, body).await?.expect(expected)?;
        let v = resp.json()?;
        Ok((v, resp.headers))
    }

    fn vm_path(id: &str, tail: &str) -> Result<String, ClientError> {
        crate::validate::vm_id(id).map_err(|e| ClientError::Request(e.to_string()))?;
        Ok(format!("/v1/vms/{id}{tail}"))
    }

    /// `GET /v1/host`.
    pub async fn host(&self) -> Result<HostInfo, ClientError> {
        let r = self
            .call::<(), _>(Method::GET, "/v1/host", None, StatusCode::OK)
            .await?;
        Ok(r.0)
    }

    /// `POST /v1/vms`.
    pub async fn create_vm(&self, req: &CreateVmRequest) -> Result<VmInfo, ClientError> {
        let r = self
            .call(Method::POST, "/v1/vms", Some(req), StatusCode::CREATED)
            .await?;
        Ok(r.0)
    }

    /// `GET /v1/vms`.
    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        let r = self
            .call::<(), _>(Method::GET, "/v1/vms", None, StatusCode::OK)
            .await?;
        Ok(r.0)
    }

    /// `GET /v1/vms/{id}`.
    pub async fn get_vm(&self, id: &str) -> Result<VmInfo, ClientError> {
        let path = Self::vm_path(id, "")?;
        let r = self
            .call::<(), _>(Method::GET, &path, None, StatusCode::OK)
            .await?;
        Ok(r.0)
    }

    /// `DELETE /v1/vms/{id}`.
    pub async fn delete_vm(&self, id: &str) -> Result<(), ClientError> {
        let path = Self::vm_path(id, "")?;
        self.send_raw(Method::DELETE, &path, None)
            .await?
            .expect(StatusCode::NO_CONTENT)?;
        Ok(())
    }

    /// `PUT /v1/vms/{id}/state`.
    pub async fn set_state(&self, id: &str, action: StateAction) -> Result<VmInfo, ClientError> {
        let path = Self::vm_path(id, "/state")?;
        let r = self
            .call(
                Method::PUT,
                &path,
                Some(&StateRequest { action }),
                StatusCode::OK,
            )
            .await?;
        Ok(r.0)
    }

    /// `PUT /v1/vms/{id}/memory`: 202 with the status link.
    pub async fn resize_memory(
        &self,
        id: &str,
        requested_mib: u64,
    ) -> Result<ResizeAccepted, ClientError> {
        let path = Self::vm_path(id, "/memory")?;
        let (memory, headers) = self
            .call(
                Method::PUT,
                &path,
                Some(&ResizeRequest { requested_mib }),
                StatusCode::ACCEPTED,
            )
            .await?;
        let location = headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok(ResizeAccepted { location, memory })
    }

    /// `GET /v1/vms/{id}/memory`.
    pub async fn get_memory(&self, id: &str) -> Result<MemoryInfo, ClientError> {
        let path = Self::vm_path(id, "/memory")?;
        let r = self
            .call::<(), _>(Method::GET, &path, None, StatusCode::OK)
            .await?;
        Ok(r.0)
    }

    /// `PUT /v1/vms/{id}/balloon`.
    pub async fn set_balloon(&self, id: &str, target_mib: u64) -> Result<BalloonInfo, ClientError> {
        let path = Self::vm_path(id, "/balloon")?;
        let r = self
            .call(
                Method::PUT,
                &path,
                Some(&BalloonRequest { target_mib }),
                StatusCode::OK,
            )
            .await?;
        Ok(r.0)
    }

    /// `GET /v1/vms/{id}/balloon/stats`.
    pub async fn balloon_stats(&self, id: &str) -> Result<BalloonStats, ClientError> {
        let path = Self::vm_path(id, "/balloon/stats")?;
        let r = self
            .call::<(), _>(Method::GET, &path, None, StatusCode::OK)
            .await?;
        Ok(r.0)
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let r = self
            .send_raw(Method::GET, "/metrics", None)
            .await?
            .expect(StatusCode::OK)?;
        String::from_utf8(r.body.to_vec()).map_err(|e| ClientError::Decode {
            status: 200,
            reason: e.to_string(),
        })
    }

    /// `GET /v1/openapi.json`.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        let r = self
            .call::<(), _>(Method::GET, "/v1/openapi.json", None, StatusCode::OK)
            .await?;
        Ok(r.0)
    }
}

async fn exchange<I>(io: I, req: Request<Full<Bytes>>) -> Result<RawResponse, ClientError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    });
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    drop(sender);
    let _ = conn.await;
    Ok(RawResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}
