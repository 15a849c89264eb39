//! The assertion source: the projected service-account token that kubelet writes (and rotates
//! in place) into the pod. It is re-read before every Entra exchange.
//!
//! The claims are decoded without checking the signature (Entra does that) so that the common
//! mistakes — a missing mount, an expired token, the wrong audience — become errors naming the
//! file and the fix, instead of an opaque AADSTS code from Entra.

pub use crate::clock::now_unix;
use crate::excerpt::{excerpt, excerpt_list};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::io::Read;

/// How much of a claim (an audience, a value the decoder refused) a message repeats.
const CLAIM_CHARS: usize = 100;

/// Largest token file read: a projected service-account token is a few KiB, and the file is
/// read before every exchange and every readiness probe.
pub const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// Reads at most [`MAX_TOKEN_FILE_BYTES`] of `path`; a larger file is an error, not a read.
fn read_capped(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "it is larger than {} KiB, which no service-account token is: check --token-file",
            MAX_TOKEN_FILE_BYTES / 1024
        )));
    }
    Ok(text)
}
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// What went wrong with the token file. Messages name the file and say what to do; they never
/// contain the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error(
        "service-account token file {path} does not exist: mount a projected service-account \
         token there (audience {audience}) or point --token-file / AZURE_FEDERATED_TOKEN_FILE at it"
    )]
    Missing { path: PathBuf, audience: String },
    #[error("service-account token file {path} cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "service-account token file {path} is empty: kubelet has not written the projected token yet"
    )]
    Empty { path: PathBuf },
    #[error("service-account token file {path} does not hold a JWT ({reason}): it must contain the projected service-account token and nothing else")]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "service-account token in {path} expired {ago}s ago (exp {exp}): kubelet should rotate it \
         at 80% of its lifetime — check that the volume is a projected serviceAccountToken volume \
         and that the node clock is right"
    )]
    Expired { path: PathBuf, exp: u64, ago: u64 },
    #[error("service-account token in {path} is not valid before {nbf} (in {wait}s): check the node clock")]
    NotYetValid { path: PathBuf, nbf: u64, wait: u64 },
    #[error(
        "service-account token in {path} has audience [{}] but the federated credential \
         expects {expected:?}: set the projected volume's audience to {expected:?} (or \
         --token-audience to the audience of your federated credential)",
        excerpt_list(found, 3, CLAIM_CHARS)
    )]
    WrongAudience {
        path: PathBuf,
        found: Vec<String>,
        expected: String,
    },
}

impl AssertionError {
    /// True for conditions kubelet is expected to fix shortly (the file not written yet):
    /// callers get "not ready, retry" rather than a hard failure.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AssertionError::Missing { .. }
                | AssertionError::Empty { .. }
                | AssertionError::Unreadable { .. }
                | AssertionError::Expired { .. }
                | AssertionError::NotYetValid { .. }
        )
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Audience,
    exp: Option<u64>,
    nbf: Option<u64>,
}

/// `aud` may be one string or a list (Kubernetes emits a list).
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
    #[default]
    None,
}

impl Audience {
    fn into_vec(self) -> Vec<String> {
        match self {
            Audience::One(a) => vec![a],
            Audience::Many(v) => v,
            Audience::None => Vec::new(),
        }
    }
}

/// The projected token file and the audience it must carry.
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: PathBuf,
    audience: String,
}

impl TokenFile {
    pub fn new(path: impl Into<PathBuf>, audience: impl Into<String>) -> Self {
        TokenFile {
            path: path.into(),
            audience: audience.into(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the token and checks its claims against the clock and the expected audience.
    pub fn read(&self) -> Result<String, AssertionError> {
        let raw = self.read_raw()?;
        self.check_claims(&raw, now_unix())?;
        Ok(raw)
    }

    /// Readiness: the file exists, is readable and non-empty. Claims are not checked, so a
    /// misconfiguration shows up in the token response rather than as a pod that never starts.
    pub fn check_readable(&self) -> Result<(), AssertionError> {
        self.read_raw().map(|_| ())
    }

    fn read_raw(&self) -> Result<String, AssertionError> {
        let path = self.path.clone();
        let text = read_capped(&self.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => AssertionError::Missing {
                path: path.clone(),
                audience: self.audience.clone(),
            },
            _ => AssertionError::Unreadable {
                path: path.clone(),
                reason: e.to_string(),
            },
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(AssertionError::Empty { path });
        }
        Ok(token.to_owned())
    }

    pub(crate) fn check_claims(&self, token: &str, now: u64) -> Result<(), AssertionError> {
        let path = || self.path.clone();
        let malformed = |reason: String| AssertionError::Malformed {
            path: path(),
            reason,
        };
        check_shape(token).map_err(malformed)?;
        let claims: Claims = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| malformed(excerpt(&e.to_string(), 2 * CLAIM_CHARS).into_owned()))?;
        if let Some(exp) = claims.exp {
            if exp <= now {
                return Err(AssertionError::Expired {
                    path: path(),
                    exp,
                    ago: now - exp,
                });
            }
        }
        if let Some(nbf) = claims.nbf {
            // Entra allows a few minutes of skew; so do we.
            if nbf > now + 300 {
                return Err(AssertionError::NotYetValid {
                    path: path(),
                    nbf,
                    wait: nbf - now,
                });
            }
        }
        let found = claims.aud.into_vec();
        if !found.iter().any(|a| a == &self.audience) {
            return Err(AssertionError::WrongAudience {
                path: path(),
                found,
                expected: self.audience.clone(),
            });
        }
        Ok(())
    }
}

/// A JWT's shape, which the claims decoder does not check (it reads the part before the last
/// '.' but one): three non-empty base64url parts, the header a JSON object. Anything else is
/// not the projected token, and Entra would refuse it with an opaque AADSTS code.
fn check_shape(token: &str) -> Result<(), String> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(format!(
            "{} parts, where a JWT has 3: header.payload.signature",
            parts.len()
        ));
    }
    for (i, name) in [(0, "header"), (1, "payload"), (2, "signature")] {
        if parts[i].is_empty() {
            return Err(format!("part {} (the {name}) is empty", i + 1));
        }
    }
    let header = URL_SAFE_NO_PAD
        .decode(parts[0])
        .ok()
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .ok_or("the header is not base64url JSON")?;
    if !header.is_object() {
        return Err("the header is not a JSON object".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_token_file_is_refused_without_reading_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, vec![b'a'; 200 * 1024]).unwrap();
        let e = TokenFile::new(path, "api://AzureADTokenExchange")
            .read()
            .unwrap_err();
        assert!(e.to_string().contains("larger than 64 KiB"), "{e}");
    }

    fn jwt(claims: serde_json::Value) -> String {
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let c = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{h}.{c}.c2ln")
    }

    fn file_with(content: &str) -> (tempfile::TempDir, TokenFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, content).unwrap();
        (dir, TokenFile::new(path, "api://AzureADTokenExchange"))
    }

    #[test]
    fn valid_token_is_returned_trimmed() {
        let now = now_unix();
        let t = jwt(serde_json::json!({"aud":["api://AzureADTokenExchange"],"exp":now+600}));
        let (_d, f) = file_with(&format!("{t}\n"));
        assert_eq!(f.read().unwrap(), t);
    }

    #[test]
    fn missing_file_names_the_path() {
        let f = TokenFile::new("/nonexistent/token", "api://AzureADTokenExchange");
        let e = f.read().unwrap_err();
        assert!(matches!(e, AssertionError::Missing { .. }));
        assert!(e.to_string().contains("/nonexistent/token"));
        assert!(e.is_transient());
    }

    #[test]
    fn empty_file_is_reported() {
        let (_d, f) = file_with("  \n");
        assert!(matches!(
            f.read().unwrap_err(),
            AssertionError::Empty { .. }
        ));
    }

    #[test]
    fn expired_token_is_reported_without_the_token() {
        let now = now_unix();
        let t = jwt(serde_json::json!({"aud":"api://AzureADTokenExchange","exp":now-30}));
        let (_d, f) = file_with(&t);
        let e = f.read().unwrap_err();
        assert!(matches!(e, AssertionError::Expired { ago, .. } if ago >= 30));
        assert!(!e.to_string().contains(&t));
    }

    #[test]
    fn wrong_audience_names_both_audiences() {
        let now = now_unix();
        let t = jwt(serde_json::json!({"aud":["https://kubernetes.default.svc"],"exp":now+600}));
        let (_d, f) = file_with(&t);
        let e = f.read().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("https://kubernetes.default.svc"), "{msg}");
        assert!(msg.contains("api://AzureADTokenExchange"), "{msg}");
        assert!(!e.is_transient());
    }

    #[test]
    fn garbage_is_malformed() {
        let (_d, f) = file_with("not-a-jwt");
        assert!(matches!(
            f.read().unwrap_err(),
            AssertionError::Malformed { .. }
        ));
    }

    fn claims_error(token: &str) -> AssertionError {
        TokenFile::new("/t", "api://AzureADTokenExchange")
            .check_claims(token, 1_750_000_000)
            .unwrap_err()
    }

    /// Found by fuzz/fuzz_targets/token_claims.rs: the JWT decoder reads only the payload
    /// (the part before the last '.' but one), so these passed for a JWT.
    #[test]
    fn a_token_is_three_parts_with_a_json_object_header() {
        let good = jwt(serde_json::json!({"aud": "api://AzureADTokenExchange"}));
        let (header, rest) = good.split_once('.').unwrap();
        let payload = rest.split('.').next().unwrap();
        for (bad, why) in [
            (format!("extra.{good}"), "4 parts"),
            (
                format!("{header}.{payload}."),
                "part 3 (the signature) is empty",
            ),
            (format!("e30K!.{rest}"), "the header is not base64url JSON"),
            (
                format!("{}.{rest}", URL_SAFE_NO_PAD.encode("[1]")),
                "the header is not a JSON object",
            ),
        ] {
            match claims_error(&bad) {
                AssertionError::Malformed { reason, .. } => {
                    assert!(reason.contains(why), "{reason}")
                }
                e => panic!("{bad}: {e}"),
            }
        }
        assert!(TokenFile::new("/t", "api://AzureADTokenExchange")
            .check_claims(&good, 1_750_000_000)
            .is_ok());
    }

    /// The bound fuzz/fuzz_targets/token_claims.rs checks: a claim's value or the audience
    /// list was repeated whole in the message (which goes to callers and the log).
    #[test]
    fn messages_quote_the_claims_only_in_part() {
        let long = "x".repeat(5000);
        let many: Vec<String> = (0..1000).map(|i| format!("aud-{i}")).collect();
        for claims in [
            serde_json::json!({"aud": "api://AzureADTokenExchange", "exp": long}),
            serde_json::json!({"aud": many}),
            serde_json::json!({"aud": [long]}),
        ] {
            let msg = claims_error(&jwt(claims)).to_string();
            assert!(msg.len() < 1024, "{} bytes: {msg:.300}", msg.len());
        }
        let msg = claims_error(&jwt(serde_json::json!({"aud": many}))).to_string();
        assert!(
            msg.contains(r#""aud-0", "aud-1", "aud-2" and 997 more"#),
            "{msg}"
        );
    }

    #[test]
    fn readable_check_ignores_claims() {
        let (_d, f) = file_with("not-a-jwt");
        assert!(f.check_readable().is_ok());
    }
}
