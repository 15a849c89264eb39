//! A local stand-in for Entra: signs JWT access tokens with an ephemeral ES256 key generated
//! at start-up. The tokens are FAKE — no Azure service accepts them — but they have the shape
//! and claims of real ones, so a pod's wiring can be tested without an Azure account.

use super::{ExchangeError, Exchanger, Token};
use crate::assertion::now_unix;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Emulator {
    key: EncodingKey,
    kid: String,
    tenant_id: String,
    lifetime: Duration,
    serial: AtomicU64,
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    iss: String,
    sub: &'a str,
    oid: &'a str,
    appid: &'a str,
    azp: &'a str,
    tid: &'a str,
    idtyp: &'static str,
    iat: u64,
    nbf: u64,
    exp: u64,
    /// Makes fakes recognisable to anyone who decodes one.
    imds_broker_emulated: bool,
    uti: String,
}

impl Emulator {
    pub fn new(tenant_id: &str, lifetime: Duration) -> anyhow::Result<Self> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("cannot generate the emulator's signing key"))?;
        let key = EncodingKey::from_ec_der(pkcs8.as_ref());
        let mut kid = [0u8; 8];
        getrandom::fill(&mut kid).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
        Ok(Emulator {
            key,
            kid: kid.iter().map(|b| format!("{b:02x}")).collect(),
            tenant_id: tenant_id.to_owned(),
            lifetime: lifetime.max(Duration::from_secs(60)),
            serial: AtomicU64::new(0),
        })
    }
}

#[async_trait::async_trait]
impl Exchanger for Emulator {
    async fn exchange(&self, client_id: &str, resource: &str) -> Result<Token, ExchangeError> {
        let now = now_unix();
        let exp = now + self.lifetime.as_secs();
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let claims = Claims {
            aud: resource,
            iss: format!(
                "https://sts.emulator.imds-broker.invalid/{}/",
                self.tenant_id
            ),
            sub: client_id,
            oid: client_id,
            appid: client_id,
            azp: client_id,
            tid: &self.tenant_id,
            idtyp: "app",
            iat: now,
            nbf: now,
            exp,
            imds_broker_emulated: true,
            uti: format!("emulated-{serial}"),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let jwt = jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| {
            ExchangeError::Transient {
                message: format!("emulator could not sign a token: {e}"),
                retry_after: None,
            }
        })?;
        Ok(Token {
            access_token: Arc::from(jwt),
            expires_on: exp,
            not_before: now,
        })
    }

    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn issues_decodable_tokens_for_the_resource() {
        let e = Emulator::new("tenant", Duration::from_secs(3600)).unwrap();
        let t = e
            .exchange("client", "https://storage.azure.com/")
            .await
            .unwrap();
        let claims: serde_json::Value =
            jsonwebtoken::dangerous::insecure_decode_claims(t.access_token.as_bytes()).unwrap();
        assert_eq!(claims["aud"], "https://storage.azure.com/");
        assert_eq!(claims["appid"], "client");
        assert_eq!(claims["imds_broker_emulated"], true);
        assert!(t.expires_on >= now_unix() + 3590);
        let t2 = e
            .exchange("client", "https://storage.azure.com/")
            .await
            .unwrap();
        assert_ne!(t.access_token, t2.access_token);
    }
}
