//! tidepool-api: Tidepool's REST API.
//!
//! - [`serve`] / [`server::Server`]: the axum server on a Unix socket (mode 0600) and optionally on
//!   loopback TCP with a bearer token.
//! - [`ApiBackend`]: the trait the VMM implements; the API never depends on the VMM.
//! - [`types`]: request and response bodies; [`validate`]: pure validation.
//! - [`openapi`]: the OpenAPI document generated from the handlers (checked in at
//!   `resources/openapi.json`; regenerate with `UPDATE_OPENAPI=1 cargo test -p tidepool-api`).
//! - [`client`]: an async HTTP/1 client over the Unix socket or TCP.
//! - [`cli`]: clap subcommands and their run functions, for the `tidepool` binary.
//! - [`testing`]: an in-memory backend for tests of the HTTP layer.

pub mod backend;
pub mod cli;
pub mod client;
pub mod conn;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod server;
pub mod testing;
pub mod types;
pub mod validate;

pub use backend::ApiBackend;

pub use client::{Client, ClientError};
pub use error::{ApiError, ErrorBody, ErrorKind};
pub use metrics::MetricsSnapshot;
pub use server::{serve, ClientTimeouts, ServeConfig, ServeError, Server, TcpConfig};
