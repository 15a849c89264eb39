//! imds-broker: serves Entra workload-identity tokens on the Azure IMDS and App Service
//! managed-identity endpoints.
//!
//! Data flows one way: HTTP request → protocol adapter ([`protocol`]) → broker core
//! ([`broker`]: policy, cache, coalescing, refresh) → exchanger ([`exchange`]: Entra or the
//! emulator) → assertion source ([`assertion`]: the projected token file).

pub mod admin;
pub mod assertion;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod crypto;
pub mod doctor;
pub mod exchange;
pub mod inject;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod protocol;
pub mod serve;
pub mod values;
pub mod webhook;
