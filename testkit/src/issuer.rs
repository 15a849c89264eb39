//! A Kubernetes-like OIDC issuer that mints projected service-account tokens (RS256).
//!
//! The signing key is the fixed test-only key in `tests/fixtures/test-issuer-key.pem`, so the
//! fake Entra server (and anything else) can verify tokens without sharing state with the
//! issuer instance that minted them.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::Serialize;

/// Issuer URL of the default test cluster (what a federated credential's `issuer` must equal).
pub(crate) const DEFAULT_ISSUER: &str = "https://oidc.test.local/issuer";
/// Subject of Velero's server service account, the default workload.
pub const DEFAULT_SUBJECT: &str = "system:serviceaccount:velero:velero-server";
/// Audience Entra expects for public-cloud workload identity federation.
pub(crate) const DEFAULT_AUDIENCE: &str = "api://AzureADTokenExchange";
/// `kid` put in every token header.
const KEY_ID: &str = "imds-broker-test-issuer-key-1";

/// The fixed test-only private key (PKCS#8 PEM). Embedded so tests do not depend on the
/// working directory.
const KEY_PEM: &str = include_str!("../../tests/fixtures/test-issuer-key.pem");

/// Claims of a projected service-account token. Build with [`SaClaims::new`] (or
/// [`TestIssuer::claims`]) and adjust with the `with_*` / [`SaClaims::expired`] builders.
#[derive(Clone, Debug, Serialize)]
pub struct SaClaims {
    iss: String,
    pub sub: String,
    /// Kubernetes always emits `aud` as an array.
    pub aud: Vec<String>,
    pub iat: i64,
    nbf: i64,
    pub exp: i64,
    /// Extra top-level claims (e.g. `kubernetes.io`); flattened into the payload.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl SaClaims {
    /// Defaults: iss [`DEFAULT_ISSUER`], sub [`DEFAULT_SUBJECT`], aud [`DEFAULT_AUDIENCE`],
    /// iat = nbf = now - 10 s, exp = now + 3600 s.
    pub fn new() -> Self {
        let now = unix_now();
        SaClaims {
            iss: DEFAULT_ISSUER.to_string(),
            sub: DEFAULT_SUBJECT.to_string(),
            aud: vec![DEFAULT_AUDIENCE.to_string()],
            iat: now - 10,
            nbf: now - 10,
            exp: now + 3600,
            extra: serde_json::Map::new(),
        }
    }

    fn with_iss(mut self, iss: impl Into<String>) -> Self {
        self.iss = iss.into();
        self
    }

    pub fn with_sub(mut self, sub: impl Into<String>) -> Self {
        self.sub = sub.into();
        self
    }

    /// Replaces the audience list with a single audience.
    pub fn with_aud(mut self, aud: impl Into<String>) -> Self {
        self.aud = vec![aud.into()];
        self
    }

    /// Issued and valid from 2 h ago, expired 10 min ago: outside any sane clock skew, so
    /// Entra answers AADSTS700024.
    pub fn expired(mut self) -> Self {
        let now = unix_now();
        self.iat = now - 7200;
        self.nbf = now - 7200;
        self.exp = now - 600;
        self
    }

    /// Valid only from 10 min in the future (AADSTS700024 as well).
    pub fn not_yet_valid(mut self) -> Self {
        let now = unix_now();
        self.iat = now;
        self.nbf = now + 600;
        self.exp = now + 4200;
        self
    }

    pub fn with_claim(mut self, name: impl Into<String>, value: serde_json::Value) -> Self {
        self.extra.insert(name.into(), value);
        self
    }
}

impl Default for SaClaims {
    fn default() -> Self {
        Self::new()
    }
}

/// Mints service-account JWTs signed with the fixed test key.
#[derive(Clone)]
pub struct TestIssuer {
    iss: String,
    encoding_key: EncodingKey,
    /// Public key as base64url big-endian modulus / exponent (JWK `n` / `e`).
    n: String,
    e: String,
}

impl TestIssuer {
    /// Issuer with iss [`DEFAULT_ISSUER`].
    pub fn new() -> Self {
        Self::with_issuer(DEFAULT_ISSUER)
    }

    /// Issuer with a different `iss` (same key).
    pub fn with_issuer(iss: impl Into<String>) -> Self {
        let encoding_key = EncodingKey::from_rsa_pem(KEY_PEM.as_bytes())
            .expect("test issuer: parse tests/fixtures/test-issuer-key.pem for signing");
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(KEY_PEM.as_bytes())
            .expect("test issuer: test-issuer-key.pem is not a PKCS#8 PEM");
        let key_pair = ring::signature::RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der())
            .expect("test issuer: test-issuer-key.pem is not an RSA key");
        let public: ring::rsa::PublicKeyComponents<Vec<u8>> = key_pair.public().into();
        TestIssuer {
            iss: iss.into(),
            encoding_key,
            n: URL_SAFE_NO_PAD.encode(public.n),
            e: URL_SAFE_NO_PAD.encode(public.e),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.iss
    }

    /// Default claims carrying this issuer's `iss`.
    pub fn claims(&self) -> SaClaims {
        SaClaims::new().with_iss(self.iss.clone())
    }

    /// Signs `claims` as-is (RS256, `kid` = [`KEY_ID`]). `iss` comes from the claims, so a
    /// test can mint a token from a "foreign" issuer with the trusted key.
    pub fn mint(&self, claims: SaClaims) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.typ = Some("JWT".to_string());
        header.kid = Some(KEY_ID.to_string());
        jsonwebtoken::encode(&header, &claims, &self.encoding_key)
            .expect("test issuer: sign service-account token")
    }

    /// A currently valid token with the default claims of this issuer.
    pub fn mint_valid(&self) -> String {
        self.mint(self.claims())
    }

    /// Writes a freshly minted valid token to `path` atomically; returns the token.
    pub fn write_to(&self, path: impl AsRef<Path>) -> std::io::Result<String> {
        self.write_claims_to(path, self.claims())
    }

    /// Mints `claims` and writes the token to `path` atomically; returns the token.
    pub fn write_claims_to(
        &self,
        path: impl AsRef<Path>,
        claims: SaClaims,
    ) -> std::io::Result<String> {
        let token = self.mint(claims);
        write_token_file(path, &token)?;
        Ok(token)
    }

    /// Verification key for the fake Entra server.
    pub(crate) fn decoding_key(&self) -> DecodingKey {
        DecodingKey::from_rsa_components(&self.n, &self.e)
            .expect("test issuer: decoding key from JWK components")
    }
}

impl Default for TestIssuer {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes `token` to `path` the way kubelet updates a projected volume: write a temp file in
/// the same directory, then rename over the target, so a reader never sees a partial token.
fn write_token_file(path: impl AsRef<Path>, token: &str) -> std::io::Result<()> {
    let path = path.as_ref();
    let with_context = |what: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".token-")
        .tempfile_in(dir)
        .map_err(|e| with_context("create temp file for token", e))?;
    tmp.write_all(token.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| with_context("write temp file for token", e))?;
    tmp.persist(path)
        .map_err(|e| with_context("rename temp file over token", e.error))?;
    Ok(())
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
