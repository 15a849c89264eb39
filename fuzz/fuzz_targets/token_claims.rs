//! The projected service-account token's claims, as the broker checks them before every
//! exchange (the file's content, already trimmed, as `TokenFile::read` hands it on).
//!
//! The first byte picks the input's shape: the raw file content, or `header\npayload\nsig`
//! whose first two parts this target base64url-encodes, so the fuzzer mutates the claims'
//! JSON itself.
//!
//! Beyond "no panic": a token is accepted only if it is three base64url segments whose header
//! is a JSON object and whose claims carry the audience, are not expired and not valid only
//! in the future (past the 5-minute skew); an error never contains the token's signature,
//! and its message is bounded whatever the token's size.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use imds_broker::fuzzing::check_token_claims;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const AUDIENCE: &str = "api://AzureADTokenExchange";
const NOW: u64 = 1_750_000_000;
/// Longest error message: the fixed text, the file's path and excerpts of the claims.
const MAX_MESSAGE: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let token = if shape & 1 == 0 {
        text.trim().to_owned()
    } else {
        let mut parts = text.splitn(3, '\n');
        let (header, claims, sig) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims),
            sig.trim()
        )
    };
    if token.is_empty() {
        return; // TokenFile::read refuses an empty file before the claims.
    }
    match check_token_claims(&token, AUDIENCE, NOW) {
        Ok(()) => assert_valid(&token),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.len() <= MAX_MESSAGE,
                "a {}-byte error: {message:.300}…",
                message.len()
            );
            assert!(
                token.len() < 16 || !message.contains(&token),
                "the token is in the error: {message}"
            );
            let sig = token.rsplit('.').next().unwrap_or("");
            let decoded: String = token
                .split('.')
                .filter_map(|p| URL_SAFE_NO_PAD.decode(p).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .collect();
            assert!(
                sig.len() < 16 || decoded.contains(sig) || !message.contains(sig),
                "the token's signature is in the error: {message}"
            );
        }
    }
});

#[derive(serde::Deserialize)]
struct Checked {
    #[serde(default)]
    aud: Value,
    #[serde(default)]
    exp: Value,
    #[serde(default)]
    nbf: Value,
}

/// What an accepted token must be, read independently of the broker's decoder.
fn assert_valid(token: &str) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(
        parts.len(),
        3,
        "accepted a token of {} segments",
        parts.len()
    );
    assert!(!parts[2].is_empty(), "accepted a token without a signature");
    let decode = |part: &str, what: &str| -> Vec<u8> {
        URL_SAFE_NO_PAD
            .decode(part)
            .unwrap_or_else(|e| panic!("accepted a {what} that is not base64url: {e}"))
    };
    let header: Value = serde_json::from_slice(&decode(parts[0], "header"))
        .unwrap_or_else(|e| panic!("accepted a header that is not JSON: {e}"));
    assert!(
        header.is_object(),
        "accepted a header that is not an object"
    );
    // Only the claims the broker checks are read (others may hold numbers out of f64's range).
    let claims: Checked = serde_json::from_slice(&decode(parts[1], "payload"))
        .unwrap_or_else(|e| panic!("accepted a payload that is not claims JSON: {e}"));
    let aud_ok = match &claims.aud {
        Value::String(a) => a == AUDIENCE,
        Value::Array(list) => list.iter().any(|a| a == AUDIENCE),
        _ => false,
    };
    assert!(aud_ok, "accepted audience {}", claims.aud);
    if let Some(exp) = claims.exp.as_u64() {
        assert!(exp > NOW, "accepted a token that expired at {exp}");
    }
    if let Some(nbf) = claims.nbf.as_u64() {
        assert!(nbf <= NOW + 300, "accepted a token valid only from {nbf}");
    }
}
