//! The body of a successful token answer, shared by both protocols: every value a JSON
//! string, rendered once per second and reused (the hot path).

use crate::broker::Token;
use crate::clock::now_unix;
use bytes::Bytes;
use std::cell::RefCell;
use std::sync::Arc;

/// Fields of a successful token response.
pub struct TokenView<'a> {
    pub token: &'a Token,
    pub resource: &'a str,
    pub client_id: &'a str,
}

impl TokenView<'_> {
    /// Renders the JSON object as of `now` (Unix seconds); all values are strings.
    /// Hand-built because the field set is fixed and this is the hot path; values that need
    /// it are escaped by serde_json.
    fn render_at(&self, now: u64) -> String {
        let expires_in = self.token.expires_on.saturating_sub(now).max(1);
        let mut num = itoa::Buffer::new();
        let mut out = String::with_capacity(self.token.access_token.len() + 320);
        out.push_str("{\"access_token\":");
        push_json_str(&mut out, &self.token.access_token);
        out.push_str(",\"client_id\":");
        push_json_str(&mut out, self.client_id);
        out.push_str(",\"expires_in\":\"");
        out.push_str(num.format(expires_in));
        out.push_str("\",\"expires_on\":\"");
        out.push_str(num.format(self.token.expires_on));
        out.push_str("\",\"ext_expires_in\":\"");
        out.push_str(num.format(expires_in));
        out.push_str("\",\"not_before\":\"");
        out.push_str(num.format(self.token.not_before));
        out.push_str("\",\"refresh_token\":\"\",\"resource\":");
        push_json_str(&mut out, self.resource);
        out.push_str(",\"token_type\":\"Bearer\"}");
        out
    }
}

/// The body of a token answer, reused while nothing in it changes. Each worker thread keeps
/// its last body with the token, resource, client ID and second it was rendered for
/// (`expires_in` counts whole seconds): a repeat answer costs a reference-count increment
/// instead of rendering 1-2 KB (bench/RESULTS.md). Holding the `Arc<Token>` keeps the
/// identity check sound: a token's address cannot be reused while it is cached.
pub fn token_body(token: &Arc<Token>, resource: &str, client_id: &str) -> Bytes {
    struct Rendered {
        token: Arc<Token>,
        resource: String,
        client_id: String,
        now: u64,
        body: Bytes,
    }
    thread_local! {
        static LAST: RefCell<Option<Rendered>> = const { RefCell::new(None) };
    }
    let now = now_unix();
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some(r) = last.as_ref().filter(|r| {
            r.now == now
                && Arc::ptr_eq(&r.token, token)
                && r.resource == resource
                && r.client_id == client_id
        }) {
            return r.body.clone();
        }
        let body = Bytes::from(
            TokenView {
                token,
                resource,
                client_id,
            }
            .render_at(now),
        );
        *last = Some(Rendered {
            token: token.clone(),
            resource: resource.to_owned(),
            client_id: client_id.to_owned(),
            now,
            body: body.clone(),
        });
        body
    })
}

fn push_json_str(out: &mut String, s: &str) {
    // Tokens and GUIDs need no escaping; anything else goes through serde_json. A fold
    // without early exit, so the compiler vectorises it (bench/RESULTS.md).
    if s.bytes().fold(true, |ok, b| {
        ok & b.is_ascii_graphic() & (b != b'"') & (b != b'\\')
    }) {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::from(s).to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token expiring in 100 s, rendered for `resource`.
    fn rendered(resource: &str) -> serde_json::Value {
        let t = Token {
            access_token: "tok".into(),
            expires_on: now_unix() + 100,
            not_before: 5,
        };
        let body = TokenView {
            token: &t,
            resource,
            client_id: "c",
        }
        .render_at(now_unix());
        serde_json::from_str(&body).unwrap()
    }

    #[test]
    fn render_uses_strings_only() {
        let v = rendered("https://x/");
        for (k, val) in v.as_object().unwrap() {
            assert!(val.is_string(), "{k} is not a string");
        }
        let ei: u64 = v["expires_in"].as_str().unwrap().parse().unwrap();
        assert!((95..=100).contains(&ei));
        assert_eq!(v["not_before"], "5");
    }

    #[test]
    fn token_body_is_the_rendered_body_reused_within_a_second() {
        let t = Arc::new(Token {
            access_token: "tok".into(),
            expires_on: now_unix() + 100,
            not_before: 5,
        });
        let before = now_unix();
        let a = token_body(&t, "https://x/", "c");
        let b = token_body(&t, "https://x/", "c");
        let after = now_unix();
        let view = TokenView {
            token: &t,
            resource: "https://x/",
            client_id: "c",
        };
        // (Unless the clock crossed a second between the calls, which changes `expires_in`.)
        if before == after {
            assert_eq!(a, view.render_at(before));
            assert_eq!(a.as_ptr(), b.as_ptr(), "reused");
        }
        // Another resource, client ID or token is another body.
        let text = |b: Bytes| String::from_utf8(b.to_vec()).unwrap();
        assert!(text(token_body(&t, "https://y/", "c")).contains(r#""resource":"https://y/""#));
        assert!(text(token_body(&t, "https://x/", "d")).contains(r#""client_id":"d""#));
        let t2 = Arc::new(Token {
            access_token: "other".into(),
            ..(*t).clone()
        });
        assert!(text(token_body(&t2, "https://x/", "c")).starts_with(r#"{"access_token":"other""#));
    }

    #[test]
    fn render_escapes_odd_resources() {
        assert_eq!(rendered("a\"b")["resource"], "a\"b");
    }
}
