//! Shared helpers for Tidepool's cross-crate integration tests.
