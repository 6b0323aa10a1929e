//! API errors: one typed error that carries its kind, rendered as JSON `{code, message}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What went wrong, in a form that picks the HTTP status. The backend chooses the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request body or a parameter is malformed or fails validation (400).
    BadRequest,
    /// Missing or wrong bearer token on the TCP listener (401).
    Unauthorized,
    /// Unknown VM id or route (404).
    NotFound,
    /// The HTTP method is not allowed on this route (405).
    MethodNotAllowed,
    /// The client did not send its whole request body in time (408).
    RequestTimeout,
    /// The request conflicts with the current state: forbidden state transition, resize refused
    /// ("driver not ready", "below boot RAM", ...) (409).
    Conflict,
    /// The request body is larger than the configured limit (413).
    PayloadTooLarge,
    /// The request body is not `application/json` (415).
    UnsupportedMediaType,
    /// Internal failure in the VMM (500).
    Internal,
    /// The feature exists in the API but is not implemented by this backend (501).
    Unsupported,
    /// Too many requests for this VM are still waiting for it (503).
    Busy,
    /// The VM did not answer in time (504).
    Timeout,
}

impl ErrorKind {
    /// The HTTP status for this kind.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The machine-readable `code` string used in the JSON body.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::Conflict => "conflict",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::Internal => "internal",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Busy => "busy",
            ErrorKind::Timeout => "timeout",
        }
    }

    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::BadRequest,
        ErrorKind::Unauthorized,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::RequestTimeout,
        ErrorKind::Conflict,
        ErrorKind::PayloadTooLarge,
        ErrorKind::UnsupportedMediaType,
        ErrorKind::Internal,
        ErrorKind::Unsupported,
        ErrorKind::Busy,
        ErrorKind::Timeout,
    ];

    /// Parses a `code` string back into a kind (used by the client).
    pub fn from_code(code: &str) -> Option<ErrorKind> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// An API error: a kind (which picks the status) and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", kind.code())]
pub struct ApiError {
    /// What kind of failure this is.
    pub kind: ErrorKind,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error of the given kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
    /// 400: malformed request or failed validation.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    /// 404: unknown VM id.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// 404 for a VM id, with a standard message.
    pub fn vm_not_found(id: &str) -> Self {
        Self::new(ErrorKind::NotFound, format!("no VM with id {id:?}"))
    }
    /// 409: conflicts with the current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    /// 500: internal failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// 501: not implemented by this backend.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    /// The JSON body for this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.kind.code().to_string(),
            message: self.message.clone(),
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Machine-readable error code, e.g. `not_found`, `conflict`, `bad_request`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.kind.status();
        let mut resp = (status, axum::Json(self.body())).into_response();
        if self.kind == ErrorKind::Unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.kind == ErrorKind::RequestTimeout {
            // The rest of the body may still come; the connection cannot be reused.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_statuses_are_distinct_classes() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_code(k.code()), Some(k));
            let json = serde_json::to_value(k).unwrap_or_default();
            assert_eq!(json, serde_json::Value::String(k.code().to_string()));
        }
        assert_eq!(ErrorKind::from_code("nope"), None);
        assert_eq!(ErrorKind::Conflict.status(), StatusCode::CONFLICT);
        assert_eq!(ErrorKind::PayloadTooLarge.status().as_u16(), 413);
    }

    #[test]
    fn display_contains_code_and_message() {
        let e = ApiError::conflict("driver not ready");
        assert_eq!(e.to_string(), "conflict: driver not ready");
        assert_eq!(e.body().code, "conflict");
    }
}
