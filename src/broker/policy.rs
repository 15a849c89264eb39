//! Who may ask for what: the identity this broker serves, how a request names it (selectors),
//! which resources are allowed, and how a resource string is checked and normalised.

use super::error::BrokerError;

/// Longest resource accepted. Azure resource URIs and App ID URIs are well under this; a
/// bound keeps hostile strings out of the cache, the logs and Entra.
pub const MAX_RESOURCE_LEN: usize = 512;

/// Well-known Azure resources, used as metric labels without an allow-list (any other
/// resource is labelled `other`, so no caller-controlled string becomes a series).
const WELL_KNOWN: &[&str] = &[
    "https://storage.azure.com",
    "https://management.azure.com",
    "https://management.core.windows.net",
    "https://vault.azure.net",
    "https://graph.microsoft.com",
    "https://database.windows.net",
    "https://ossrdbms-aad.database.windows.net",
    "https://servicebus.azure.net",
    "https://eventhubs.azure.net",
    "https://cognitiveservices.azure.com",
];

/// The identity this broker serves and how callers may name it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub client_id: String,
    pub object_id: Option<String>,
    pub resource_id: Option<String>,
}

/// How a request names the identity it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// No selector, or an empty `client_id=` (Velero 1.15 sends one): the configured identity.
    Default,
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

/// The identity and resource rules of one broker.
#[derive(Debug)]
pub struct Policy {
    identity: Identity,
    /// Allowed resources as given; compared by [`same_resource`].
    allow: Option<Vec<String>>,
    allow_display: String,
}

impl Policy {
    pub fn new(identity: Identity, allow: Option<Vec<String>>) -> Self {
        let allow_display = allow
            .as_ref()
            .map_or_else(|| "any".into(), |l| l.join(", "));
        Policy {
            identity,
            allow,
            allow_display,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether an allow-list restricts the resources (then every cache entry is one of them).
    pub fn restricted(&self) -> bool {
        self.allow.is_some()
    }

    /// Checks the identity selector and the resource, without any Entra call. Runs on every
    /// request, so an accepted request allocates nothing.
    pub fn authorize(&self, selector: &Selector, resource: &str) -> Result<(), BrokerError> {
        let id = &self.identity;
        let matches = |configured: &Option<String>, asked: &str| {
            configured
                .as_deref()
                .is_some_and(|c| c.eq_ignore_ascii_case(asked))
        };
        let refused = match selector {
            Selector::Default => None,
            Selector::ClientId(c) => {
                (!c.eq_ignore_ascii_case(&id.client_id)).then(|| format!("client_id {c}"))
            }
            Selector::ObjectId(o) => (!matches(&id.object_id, o)).then(|| format!("object_id {o}")),
            Selector::ResourceId(r) => {
                (!matches(&id.resource_id, r)).then(|| format!("resource id {r}"))
            }
        };
        if let Some(named) = refused {
            return Err(BrokerError::IdentityNotFound(
                named.chars().take(200).collect(),
                id.client_id.clone(),
            ));
        }
        check_resource(resource)?;
        if let Some(allow) = &self.allow {
            if !allow.iter().any(|a| same_resource(a, resource)) {
                return Err(BrokerError::ResourceRefused {
                    resource: shortened(resource),
                    allowed: self.allow_display.clone(),
                });
            }
        }
        Ok(())
    }

    /// The spelling to exchange for `resource`: the allow-list's own, else the caller's.
    pub fn canonical(&self, resource: &str) -> String {
        self.allow
            .as_ref()
            .and_then(|l| l.iter().find(|a| same_resource(a, resource)))
            .map_or_else(|| resource.to_owned(), Clone::clone)
    }

    /// A bounded metric label for `resource`: its allow-list entry, a well-known Azure
    /// resource, or `other`.
    pub fn label(&self, resource: &str) -> String {
        if let Some(a) = self
            .allow
            .iter()
            .flatten()
            .find(|a| same_resource(a, resource))
        {
            return a.clone();
        }
        WELL_KNOWN
            .iter()
            .find(|w| same_resource(w, resource))
            .map_or_else(|| "other".into(), |w| format!("{w}/"))
    }
}

/// Resource spellings that name the same resource: compared without surrounding space or
/// trailing slashes, case-insensitively. Velero's Go SDK asks for `https://storage.azure.com`
/// where an operator writes `https://storage.azure.com/`; both are one cache entry.
pub fn same_resource(a: &str, b: &str) -> bool {
    key(a).eq_ignore_ascii_case(key(b))
}

fn key(r: &str) -> &str {
    r.trim().trim_end_matches('/')
}

/// A resource must be an absolute `https://` URI with a host, an `api://` App ID URI, or an
/// application (client) ID GUID — the three forms Entra accepts — of bounded length, with no
/// whitespace or control characters.
pub fn check_resource(r: &str) -> Result<(), BrokerError> {
    let invalid = |why: &str| {
        Err(BrokerError::InvalidResource(format!(
            "resource {:?} {why}: send an absolute https:// URI (e.g. https://storage.azure.com/), \
             an api:// App ID URI or an application ID",
            shortened(r)
        )))
    };
    if r.len() > MAX_RESOURCE_LEN {
        return invalid(&format!("is longer than {MAX_RESOURCE_LEN} bytes"));
    }
    if r.bytes().any(|b| b.is_ascii_control() || b == b' ') || !r.is_ascii() {
        return invalid("contains spaces, control or non-ASCII characters");
    }
    let lower_starts = |p: &str| r.len() > p.len() && r[..p.len()].eq_ignore_ascii_case(p);
    if lower_starts("https://") {
        let host = r["https://".len()..]
            .split(['/', '?', '#'])
            .next()
            .unwrap_or("");
        if host.is_empty() || host.contains('@') {
            return invalid("has no host");
        }
        return Ok(());
    }
    if lower_starts("api://") || is_guid(r) {
        return Ok(());
    }
    invalid("is not a resource URI")
}

/// An 8-4-4-4-12 hex GUID, as Entra writes client, tenant and object IDs.
pub fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// At most 100 characters of a caller's string, for error messages.
fn shortened(s: &str) -> String {
    if s.chars().count() <= 100 {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(100).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: Option<&[&str]>) -> Policy {
        Policy::new(
            Identity {
                client_id: "C".into(),
                object_id: Some("O".into()),
                resource_id: None,
            },
            allow.map(|l| l.iter().map(|s| (*s).to_owned()).collect()),
        )
    }

    #[test]
    fn selectors_name_the_configured_identity_only() {
        let p = policy(None);
        let r = "https://storage.azure.com/";
        assert!(p.authorize(&Selector::Default, r).is_ok());
        assert!(p.authorize(&Selector::ClientId("c".into()), r).is_ok());
        assert!(p.authorize(&Selector::ObjectId("o".into()), r).is_ok());
        for s in [
            Selector::ClientId("x".into()),
            Selector::ObjectId("x".into()),
            Selector::ResourceId("x".into()),
        ] {
            assert!(matches!(
                p.authorize(&s, r),
                Err(BrokerError::IdentityNotFound(..))
            ));
        }
    }

    #[test]
    fn allow_list_ignores_case_and_trailing_slash() {
        let p = policy(Some(&["https://storage.azure.com/"]));
        for ok in [
            "https://storage.azure.com",
            "https://STORAGE.azure.com/",
            "https://storage.azure.com//",
        ] {
            assert!(p.authorize(&Selector::Default, ok).is_ok(), "{ok}");
            assert_eq!(p.canonical(ok), "https://storage.azure.com/");
            assert_eq!(p.label(ok), "https://storage.azure.com/");
        }
        assert!(matches!(
            p.authorize(&Selector::Default, "https://vault.azure.net/"),
            Err(BrokerError::ResourceRefused { .. })
        ));
    }

    #[test]
    fn resources_must_be_uris_of_bounded_length() {
        for ok in [
            "https://storage.azure.com",
            "https://management.core.windows.net/",
            "api://my-app",
            "e406a681-f3d4-42a8-90b6-c2b029497af1",
        ] {
            assert!(check_resource(ok).is_ok(), "{ok}");
        }
        let long = format!("https://x/{}", "a".repeat(MAX_RESOURCE_LEN));
        for bad in [
            "storage",
            "http://storage.azure.com/",
            "https://",
            "https:///path",
            "https://a b/",
            "https://x/\nforged",
            "https://x/\0",
            "https://user@evil/",
            long.as_str(),
        ] {
            let e = check_resource(bad).unwrap_err();
            assert!(matches!(e, BrokerError::InvalidResource(_)), "{bad}");
            assert!(e.to_string().len() < 400, "error text is bounded");
        }
    }

    #[test]
    fn labels_are_a_bounded_set_without_an_allow_list() {
        let p = policy(None);
        assert_eq!(
            p.label("https://storage.azure.com"),
            "https://storage.azure.com/"
        );
        assert_eq!(p.label("https://evil.example/\u{1b}"), "other");
        assert_eq!(p.label("api://x"), "other");
        assert_eq!(
            p.canonical("https://storage.azure.com"),
            "https://storage.azure.com"
        );
    }
}
