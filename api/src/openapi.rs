//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` annotations.
//!
//! A copy is checked in at `resources/openapi.json`; the test `openapi_is_up_to_date` fails
//! when it differs. Regenerate it with `UPDATE_OPENAPI=1 cargo test -p tidepool-api --test openapi`.

use crate::error::{ErrorBody, ErrorKind};
use crate::routes::{host, memory, vms};
use crate::types::*;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

/// Adds the bearer scheme used by the TCP listener.
#[derive(Debug)]
struct BearerOnTcp;

impl Modify for BearerOnTcp {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "Required on the TCP listener only; the Unix socket (mode 0600) needs no token.",
                        ))
                        .build(),
                ),
            );
        }
    }
}

/// Documents the 503 and 504 every backend-calling operation can answer, once for all.
#[derive(Debug)]
struct BackendBusyOrLate;

fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

impl Modify for BackendBusyOrLate {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let busy = error_response("Too many requests for this VM are waiting for it");
        let late = error_response("The VMM did not answer in time");
        for (path, item) in openapi.paths.paths.iter_mut() {
            if path == "/v1/openapi.json" {
                continue;
            }
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                let r = &mut op.responses.responses;
                r.insert("503".to_string(), busy.clone().into());
                r.insert("504".to_string(), late.clone().into());
            }
        }
    }
}

/// The API document.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Tidepool API",
        description = "REST API of the Tidepool microVM monitor. Served on a Unix socket (mode 0600, \
                       no token) and optionally on loopback TCP with `Authorization: Bearer <token>`. \
                       Every error is JSON `{code, message}`. Sizes are in MiB.",
    ),
    paths(
        host::get_host,
        vms::create_vm,
        vms::list_vms,
        vms::get_vm,
        vms::delete_vm,
        vms::set_state,
        memory::resize_memory,
        memory::get_memory,
        memory::set_balloon,
        memory::balloon_stats,
        host::metrics,
        host::openapi,
    ),
    components(schemas(
        ErrorBody, ErrorKind, HostInfo, NodeInfo, ResidentByType, CreateVmRequest, RawImage,
        ImagePrivilege,
        HotplugConfig, BalloonConfig, NumaConfig, NumaPolicy, BackingConfig, BackingKind,
        VmInfo, VmState, BootSource, StateAction, StateRequest, ResizeRequest, ResizePhase,
        ResizeStatus, MemoryInfo, BalloonRequest, BalloonInfo, BalloonStats,
    )),
    modifiers(&BearerOnTcp, &BackendBusyOrLate),
    security((), ("bearer" = [])),
    tags(
        (name = "host", description = "Host memory, metrics and this document"),
        (name = "vms", description = "VM lifecycle"),
        (name = "memory", description = "Guest memory: virtio-mem resize and balloon"),
    )
)]
pub struct ApiDoc;

/// The document as a value.
pub fn spec() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty-printed JSON with a trailing newline (the checked-in form).
pub fn spec_json() -> String {
    let mut s = spec()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}
