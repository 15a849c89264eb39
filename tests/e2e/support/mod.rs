//! Support for the end-to-end tests that is specific to this product: the broker (`serve`) and
//! the webhook as spawned processes, on testkit's process harness. Only integration tests see
//! the path of the built binary, so this lives here rather than in testkit.

pub mod broker;
pub mod webhook;

/// The `imds-broker` binary built for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_imds-broker");
