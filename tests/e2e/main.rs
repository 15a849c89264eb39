//! The end-to-end and integration tests, one binary: each module was a test binary of its own,
//! and every test binary links all dependencies again (time and disk). Modules share `support`
//! (the broker and webhook processes) and the `testkit` crate (fake Entra, issuer, PKI, process
//! harness, fake Kubernetes API server). Run one module with, e.g.,
//! `cargo test --test e2e webhook_golden::`.
//!
//! `tests/rust_sdk_app_service.rs` stays a binary of its own: it sets process-wide environment
//! variables for the Azure SDK.

mod broker;
mod doctor_e2e;
mod entra_bounds;
mod fake_entra_selftest;
mod flags_documented;
mod hostile;
mod inject_cli;
mod node_mode;
mod node_watch;
mod support;
mod transparent_netns;
mod webhook_e2e;
mod webhook_golden;
mod webhook_hostile;
mod webhook_identity;
