//! The process's one crypto library, ring: TLS to Entra and the API server (through reqwest),
//! the webhook's TLS server and the emulator's signatures. One provider keeps the binary, and
//! so each pod's resident memory, small (bench/RESULTS.md).

use rustls::crypto::CryptoProvider;
use std::sync::Arc;

/// The rustls provider for TLS configs built here (the webhook server).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring rustls's process-wide default, which reqwest (built with `rustls-no-provider`)
/// requires before any client is built. Idempotent; every HTTPS client constructor calls it.
pub fn install_default() {
    if CryptoProvider::get_default().is_none() {
        // Losing a race to another thread installing the same provider is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
