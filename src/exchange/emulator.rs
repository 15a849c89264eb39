//! A local stand-in for Entra: signs JWT access tokens with an ephemeral ES256 key generated
//! at start-up. The tokens are FAKE — no Azure service accepts them (the signing key is known to
//! no one but this process) — but they have the shape and claims of the v1 access tokens Entra
//! issues for Storage and ARM, so a pod's wiring can be tested without an Azure account, and an
//! emulator that checks claims but not signatures (Azurite with `--oauth basic`) accepts them.
//!
//! Claims, as in a v1 token for an application (client credentials / federated assertion):
//! `iss` `https://sts.windows.net/<tenant>/` (`idp` the same), `aud` the resource exactly as
//! requested, `appid` the client ID, `appidacr` "2" (a client assertion), `oid` and `sub` the
//! service principal's object ID (here a stable UUID derived from tenant and client, since the
//! emulator has no directory), `tid`, `idtyp` "app", `iat`/`nbf` 5 minutes before issuance and
//! `exp` the configured lifetime after it (Entra backdates the same way to absorb clock skew),
//! `uti`, `ver` "1.0" — plus `imds_broker_emulated: true`, so anyone who decodes one can tell it
//! is a fake.

use super::{ExchangeError, Exchanger, Token};
use crate::assertion::now_unix;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::digest::{digest, SHA256};
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
    /// `https://sts.windows.net/<tenant>/`, the v1 issuer.
    issuer: String,
    lifetime: Duration,
    serial: AtomicU64,
}

/// How far `iat`/`nbf` are backdated, as Entra does, so a relying party whose clock is a little
/// behind the broker's does not see a token from the future.
const BACKDATE_SECS: u64 = 300;

/// A v1 access token's claims (see the module comment). Field order is the serialised order.
#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    iss: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    appid: &'a str,
    appidacr: &'static str,
    idp: &'a str,
    idtyp: &'static str,
    oid: &'a str,
    sub: &'a str,
    tid: &'a str,
    uti: String,
    ver: &'static str,
    /// Makes fakes recognisable to anyone who decodes one.
    imds_broker_emulated: bool,
}

/// A stable, UUID-shaped object ID for (tenant, client): the same client always gets the same
/// `oid`, different clients different ones, and it never equals the client ID (in Entra the
/// application's client ID and its service principal's object ID are different GUIDs).
fn object_id(tenant_id: &str, client_id: &str) -> String {
    let d = digest(
        &SHA256,
        format!("imds-broker emulator oid\0{tenant_id}\0{client_id}").as_bytes(),
    );
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    // RFC 9562 version 8 (custom) with the RFC variant bits, so validators that parse GUIDs accept it.
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
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
            issuer: format!("https://sts.windows.net/{tenant_id}/"),
            lifetime,
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
        let oid = object_id(&self.tenant_id, client_id);
        let issued = now.saturating_sub(BACKDATE_SECS);
        let claims = Claims {
            aud: resource,
            iss: &self.issuer,
            iat: issued,
            nbf: issued,
            exp,
            appid: client_id,
            appidacr: "2",
            idp: &self.issuer,
            idtyp: "app",
            oid: &oid,
            sub: &oid,
            tid: &self.tenant_id,
            uti: format!("emulated-{serial}"),
            ver: "1.0",
            imds_broker_emulated: true,
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

    fn claims_of(t: &Token) -> serde_json::Value {
        jsonwebtoken::dangerous::insecure_decode_claims(t.access_token.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn issues_decodable_tokens_for_the_resource() {
        let e = Emulator::new("tenant", Duration::from_secs(3600)).unwrap();
        let t = e
            .exchange("client", "https://storage.azure.com/")
            .await
            .unwrap();
        let claims = claims_of(&t);
        assert_eq!(claims["aud"], "https://storage.azure.com/");
        assert_eq!(claims["appid"], "client");
        assert_eq!(claims["imds_broker_emulated"], true);
        assert!(t.expires_on >= now_unix() + 3590);
        let t2 = e
            .exchange("client", "https://storage.azure.com/")
            .await
            .unwrap();
        assert_ne!(t.access_token, t2.access_token);
        assert_ne!(claims["uti"], claims_of(&t2)["uti"]);
    }

    /// The claims Entra puts in a v1 application token for Storage/ARM, which is what Azurite's
    /// `--oauth basic` checks (issuer prefix `https://sts.windows.net/`, audience, iat/nbf/exp).
    #[tokio::test]
    async fn mints_v1_access_tokens_like_entra() {
        let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        let client = "11111111-1111-1111-1111-111111111111";
        let e = Emulator::new(tenant, Duration::from_secs(3600)).unwrap();
        let before = now_unix();
        let t = e
            .exchange(client, "https://storage.azure.com")
            .await
            .unwrap();
        let after = now_unix();
        let c = claims_of(&t);
        let iss = format!("https://sts.windows.net/{tenant}/");
        assert_eq!(c["iss"], iss.as_str());
        assert_eq!(c["idp"], iss.as_str());
        assert_eq!(c["ver"], "1.0");
        // The resource exactly as requested: no slash added or removed.
        assert_eq!(c["aud"], "https://storage.azure.com");
        assert_eq!(c["appid"], client);
        assert_eq!(c["appidacr"], "2");
        assert_eq!(c["tid"], tenant);
        assert_eq!(c["idtyp"], "app");
        assert_eq!(c["sub"], c["oid"]);
        assert_ne!(c["oid"], client);
        // No v2-only claims.
        assert!(c.get("azp").is_none() && c.get("scp").is_none(), "{c}");
        // iat = nbf, backdated 5 min; exp = issuance + lifetime, and equals what the broker reports.
        let (iat, nbf, exp) = (
            c["iat"].as_u64().unwrap(),
            c["nbf"].as_u64().unwrap(),
            c["exp"].as_u64().unwrap(),
        );
        assert_eq!(iat, nbf);
        assert!(
            iat >= before - BACKDATE_SECS && iat <= after - BACKDATE_SECS,
            "{iat}"
        );
        assert!(exp >= before + 3600 && exp <= after + 3600, "{exp}");
        assert_eq!(exp, t.expires_on);
        assert!(t.not_before >= before && t.not_before <= after);

        let arm = e
            .exchange(client, "https://management.core.windows.net/")
            .await
            .unwrap();
        assert_eq!(
            claims_of(&arm)["aud"],
            "https://management.core.windows.net/"
        );
    }

    #[test]
    fn object_ids_are_stable_uuids_per_client() {
        let a = object_id("t", "client-a");
        assert_eq!(a, object_id("t", "client-a"));
        assert_ne!(a, object_id("t", "client-b"));
        assert_ne!(a, object_id("u", "client-a"));
        let groups: Vec<&str> = a.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        assert_eq!(lens, [8, 4, 4, 4, 12], "{a}");
        assert!(a.chars().all(|ch| ch == '-' || ch.is_ascii_hexdigit()));
        assert!(groups[2].starts_with('8'), "version 8: {a}");
        assert!(
            matches!(&groups[3][..1], "8" | "9" | "a" | "b"),
            "RFC variant: {a}"
        );
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
