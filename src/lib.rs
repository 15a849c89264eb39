//! imds-broker: serves Entra workload-identity tokens on the Azure IMDS and App Service
//! managed-identity endpoints.
//!
//! Data flows one way: HTTP request → protocol adapter ([`protocol`]) → broker core
//! ([`broker`]: policy, cache, coalescing, refresh) → exchanger ([`exchange`]: Entra or the
//! emulator) → assertion source ([`assertion`]: the projected token file).

pub mod admin;
pub mod assertion;
pub mod attest;
pub mod authority;
pub mod broker;
pub mod capped_read;
pub mod cli;
pub mod clock;
pub mod crypto;
pub mod doctor;
pub mod excerpt;
pub mod exchange;
#[doc(hidden)]
pub mod fuzzing;
pub mod inject;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod protocol;
pub mod serve;
pub mod values;
pub mod velero_env;
pub mod webhook;
