//! The webhook's serving certificate: loaded from PEM files and swapped in place when the
//! files change on disk (cert-manager renews them; kubelet updates the mounted Secret).
//!
//! Change detection compares file contents on a timer rather than using inotify: a Secret
//! volume is updated by an atomic symlink swap that some watchers miss, and two small files
//! read every few seconds cost nothing. A pair that does not load (a half-written file, a key
//! that does not match the certificate) keeps the previous certificate in service.
//!
//! The leaf's notAfter is read at each load, for the certificate-expiry metric: a
//! certificate nobody renews (the manual-TLS path) would otherwise be noticed only when the API
//! server starts refusing it.

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Result of one reload check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded,
    /// The files changed but did not load; the previous certificate is still served.
    Failed,
}

/// A certificate resolver whose certificate can be replaced while serving.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Served>,
    /// Raw bytes of the pair last seen on disk (loaded or not), to detect changes.
    seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

/// The certificate in service and its leaf's notAfter (Unix seconds; None if unreadable).
struct Served {
    key: Arc<CertifiedKey>,
    not_after: Option<i64>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair; fails (with the file names) if it cannot be used.
    pub fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<Self> {
        let provider = crate::crypto::provider();
        let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
        let key = certified_key(&cert_pem, &key_pem, &provider).with_context(|| {
            format!(
                "cannot use the TLS certificate {} with the key {}",
                cert_path.display(),
                key_path.display()
            )
        })?;
        Ok(ReloadingCert {
            current: RwLock::new(served(key, cert_path)),
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider,
            seen: Mutex::new((cert_pem, key_pem)),
        })
    }

    /// notAfter of the leaf certificate in service, in Unix seconds; None when it could not be
    /// read (rustls serves certificates without reading their validity).
    pub fn not_after(&self) -> Option<i64> {
        self.current.read().ok().and_then(|c| c.not_after)
    }

    /// Re-reads the files and swaps the certificate if they changed and load.
    pub fn reload_if_changed(&self) -> Reload {
        let (cert_pem, key_pem) = match read_pair(&self.cert_path, &self.key_path) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the TLS files; keeping the current certificate");
                return Reload::Failed;
            }
        };
        let Ok(mut seen) = self.seen.lock() else {
            return Reload::Failed;
        };
        if seen.0 == cert_pem && seen.1 == key_pem {
            return Reload::Unchanged;
        }
        let result = certified_key(&cert_pem, &key_pem, &self.provider);
        *seen = (cert_pem, key_pem);
        match result {
            Ok(key) => {
                let served = served(key, &self.cert_path);
                if let Ok(mut current) = self.current.write() {
                    *current = served;
                }
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                Reload::Reloaded
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), cert = %self.cert_path.display(),
                    "changed TLS files do not load; keeping the current certificate");
                Reload::Failed
            }
        }
    }

    /// The rustls server configuration serving this certificate (HTTP/1.1 only).
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Checks for changes every `interval` until `shutdown` fires, reporting each change.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: crate::listener::Shutdown,
        on_change: impl Fn(Reload) + Send + 'static,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate; the files were just loaded
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.wait() => return,
            }
            let this = self.clone();
            let outcome = tokio::task::spawn_blocking(move || this.reload_if_changed())
                .await
                .unwrap_or(Reload::Failed);
            if outcome != Reload::Unchanged {
                on_change(outcome);
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.key.clone())
    }
}

fn served(key: CertifiedKey, cert_path: &Path) -> Served {
    let not_after = key
        .end_entity_cert()
        .map_err(anyhow::Error::from)
        .and_then(|leaf| not_after(leaf))
        .inspect_err(|e| {
            tracing::warn!(error = %format!("{e:#}"), cert = %cert_path.display(),
                "cannot read the TLS certificate's expiry (notAfter); it is served, but the \
                 expiry metric reads 0 until a certificate with a readable one is loaded")
        })
        .ok();
    Served {
        key: Arc::new(key),
        not_after,
    }
}

/// The notAfter of a DER certificate, in Unix seconds.
pub fn not_after(der: &[u8]) -> anyhow::Result<i64> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).context("not a DER X.509 certificate")?;
    let at = cert
        .tbs_certificate()
        .validity()
        .not_after
        .to_unix_duration();
    i64::try_from(at.as_secs()).context("notAfter out of range")
}

fn read_pair(cert_path: &Path, key_path: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let cert = std::fs::read(cert_path)
        .with_context(|| format!("cannot read the TLS certificate {}", cert_path.display()))?;
    let key = std::fs::read(key_path)
        .with_context(|| format!("cannot read the TLS key {}", key_path.display()))?;
    Ok((cert, key))
}

fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("invalid PEM certificate")?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in the PEM file");
    let key = PrivateKeyDer::from_pem_slice(key_pem).context("invalid PEM private key")?;
    CertifiedKey::from_der(chain, key, provider).context("the key does not fit the certificate")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn served(r: &ReloadingCert) -> Vec<u8> {
        r.current.read().unwrap().key.cert[0].to_vec()
    }

    /// A self-signed pair whose notAfter is `not_after` (Unix seconds).
    fn pair_until(name: &str, not_after: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn the_served_leafs_not_after_is_read_at_load_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        // 2031-01-02T03:04:05Z, a UTCTime; 2051-06-07T08:09:10Z, a GeneralizedTime.
        let (first, second) = (1_925_089_445, 2_569_738_150);
        let (c1, k1) = pair_until("one", first);
        std::fs::write(&c, &c1).unwrap();
        std::fs::write(&k, &k1).unwrap();
        let r = ReloadingCert::load(&c, &k).unwrap();
        assert_eq!(r.not_after(), Some(first));
        let (c2, k2) = pair_until("two", second);
        std::fs::write(&k, &k2).unwrap();
        std::fs::write(&c, &c2).unwrap();
        assert_eq!(r.reload_if_changed(), Reload::Reloaded);
        assert_eq!(r.not_after(), Some(second));
        // A pair that does not load leaves the one in service, and its expiry.
        std::fs::write(&c, &c1).unwrap();
        assert_eq!(r.reload_if_changed(), Reload::Failed);
        assert_eq!(r.not_after(), Some(second));
        assert!(not_after(b"not a certificate").is_err());
    }

    #[test]
    fn reloads_changed_files_and_keeps_the_old_pair_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (c1, k1) = pair("one");
        std::fs::write(&c, &c1).unwrap();
        std::fs::write(&k, &k1).unwrap();
        let r = ReloadingCert::load(&c, &k).unwrap();
        let first = served(&r);
        assert_eq!(r.reload_if_changed(), Reload::Unchanged);

        // New certificate with the old key: mismatch, old pair stays.
        let (c2, k2) = pair("two");
        std::fs::write(&c, &c2).unwrap();
        assert_eq!(r.reload_if_changed(), Reload::Failed);
        assert_eq!(served(&r), first);
        // Reported once, not on every tick.
        assert_eq!(r.reload_if_changed(), Reload::Unchanged);

        std::fs::write(&k, &k2).unwrap();
        assert_eq!(r.reload_if_changed(), Reload::Reloaded);
        assert_ne!(served(&r), first);

        std::fs::remove_file(&k).unwrap();
        assert_eq!(r.reload_if_changed(), Reload::Failed);
    }

    #[test]
    fn unusable_files_fail_at_start_with_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&c, "not pem").unwrap();
        std::fs::write(&k, "not pem").unwrap();
        let err = format!("{:#}", ReloadingCert::load(&c, &k).unwrap_err());
        assert!(err.contains("tls.crt"), "{err}");
        let missing = format!(
            "{:#}",
            ReloadingCert::load(&dir.path().join("nope"), &k).unwrap_err()
        );
        assert!(missing.contains("nope"), "{missing}");
    }
}
