//! Test support for imds-broker, compiled once for every integration test and example that
//! needs it: the fake Entra token endpoint, the service-account token issuer it trusts, a
//! throw-away PKI, a hostile authority (huge, slow or redirecting answers), a harness for
//! spawned processes, and fake Kubernetes API servers.
//!
//! The only fake of a real component is Entra ([`fake_entra`]); it verifies client assertions as
//! Entra does. The Kubernetes API server fakes stand in for the one endpoint the webhook reads
//! (ServiceAccounts, [`kube_api`]) and the pod list and watch of `imds-broker node`
//! ([`kube_pods`]); the cluster tests use a real kube-apiserver.

pub mod fake_entra;
pub mod hostile_authority;
pub mod issuer;
pub mod kube_api;
pub mod kube_pods;
pub mod pki;
pub mod process;
