//! A local stand-in for Entra: signs JWT access tokens with an ephemeral ES256 key generated
//! at start-up. The tokens are FAKE — no Azure service accepts them — but they have the shape
//! and claims of real ones, so a pod's wiring can be tested without an Azure account.

use super::{ExchangeError, Exchanger, Token};
use crate::assertion::now_unix;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Emulator {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// base64url of the JOSE header (`alg`, `typ`, `kid`), the same for every token.
    header: String,
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
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("cannot generate the emulator's signing key"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("cannot load the emulator's signing key"))?;
        let mut kid = [0u8; 8];
        getrandom::fill(&mut kid).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
        let kid: String = kid.iter().map(|b| format!("{b:02x}")).collect();
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        Ok(Emulator {
            key,
            rng,
            header: URL_SAFE_NO_PAD.encode(header.to_string()),
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
        // JWS compact serialisation (RFC 7515 §7.1), signed with ring directly: jsonwebtoken's
        // signing backends are AWS-LC or RustCrypto, either of which would add a second crypto
        // library to the binary for this one signature.
        let claims = serde_json::to_vec(&claims).expect("claims serialise");
        let mut jwt = format!("{}.{}", self.header, URL_SAFE_NO_PAD.encode(claims));
        let signature =
            self.key
                .sign(&self.rng, jwt.as_bytes())
                .map_err(|_| ExchangeError::Transient {
                    message: "emulator could not sign a token (no system randomness?)".to_owned(),
                    retry_after: None,
                })?;
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut jwt);
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

    #[tokio::test]
    async fn tokens_are_es256_signed_by_the_emulator_key() {
        use ring::signature::{KeyPair as _, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
        let e = Emulator::new("tenant", Duration::from_secs(3600)).unwrap();
        let t = e.exchange("client", "res").await.unwrap();
        let (signed, sig) = t.access_token.rsplit_once('.').unwrap();
        let header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(signed.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"].as_str().unwrap().len(), 16);
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, e.key.public_key().as_ref());
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        public.verify(signed.as_bytes(), &sig).unwrap();
        assert!(public.verify(b"tampered", &sig).is_err());
    }
}
