//! Test support for imds-broker, compiled once for every integration test and example that
//! needs it: the fake Entra token endpoint, the service-account token issuer it trusts, a
//! throw-away PKI, a harness for spawned processes, and a fake Kubernetes API server.
//!
//! The only fake of a real component is Entra ([`fake_entra`]); it verifies client assertions as
//! Entra does. The Kubernetes API server fake ([`kube_api`]) stands in for the one endpoint the
//! webhook reads (ServiceAccounts); the cluster tests use a real kube-apiserver.

pub mod fake_entra;
pub mod issuer;
pub mod kube_api;
pub mod pki;
pub mod process;
