//! The checked-in OpenAPI document must match the one generated from the handlers.
//! Regenerate with `UPDATE_OPENAPI=1 cargo test -p tidepool-api --test openapi`.

use std::path::PathBuf;

fn checked_in_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/openapi.json")
}

#[test]
fn openapi_is_up_to_date() {
    let generated = tidepool_api::openapi::spec_json();
    let path = checked_in_path();
    if std::env::var_os("UPDATE_OPENAPI").is_some_and(|v| v == "1") {
        if let Err(e) = std::fs::write(&path, &generated) {
            panic!("cannot write {}: {e}", path.display());
        }
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is out of date; regenerate it with `UPDATE_OPENAPI=1 cargo test -p tidepool-api --test openapi`",
        path.display()
    );
}

#[test]
fn spec_names_every_route_and_schema() {
    let spec: serde_json::Value =
        serde_json::from_str(&tidepool_api::openapi::spec_json()).unwrap_or_default();
    let paths = &spec["paths"];
    for (p, m) in [
        ("/v1/host", "get"),
        ("/v1/vms", "post"),
        ("/v1/vms", "get"),
        ("/v1/vms/{id}", "get"),
        ("/v1/vms/{id}", "delete"),
        ("/v1/vms/{id}/state", "put"),
        ("/v1/vms/{id}/memory", "put"),
        ("/v1/vms/{id}/memory", "get"),
        ("/v1/vms/{id}/balloon", "put"),
        ("/v1/vms/{id}/balloon/stats", "get"),
        ("/metrics", "get"),
        ("/v1/openapi.json", "get"),
    ] {
        assert!(paths[p][m].is_object(), "missing {m} {p}");
    }
    assert_eq!(
        spec["components"]["schemas"]["CreateVmRequest"]["additionalProperties"],
        serde_json::Value::Bool(false),
        "unknown fields are rejected, and the spec says so"
    );
}
