//! Test support shared by the integration tests (each test binary includes it with `mod support;`).
#![allow(dead_code)]

pub mod broker;
pub mod fake_entra;
pub mod issuer;
pub mod tls;
