//! Query parameters of a token request: decoded once, duplicates refused, bounded in number.

use super::error::{excerpt, ApiError, ECHO_CHARS};
use crate::broker::Selector;
use std::cell::RefCell;
use std::sync::Arc;

/// A query parameter that selects an identity, and how it names it.
pub type SelectorParam = (&'static str, fn(String) -> Selector);

/// More parameters than any SDK sends (at most four); bounds the work on a hostile query.
pub const MAX_PARAMS: usize = 16;

/// Query parameters, with duplicates rejected (IMDS does; a duplicate is ambiguous).
///
/// SDK clients send the same query string with every request, so each worker thread keeps
/// the last one it parsed: a repeat costs a string compare and a reference count
/// (bench/RESULTS.md).
#[derive(Clone)]
pub struct Query(Arc<[(Box<str>, Box<str>)]>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Query, ApiError> {
        thread_local! {
            static LAST: RefCell<Option<(Box<str>, Query)>> = const { RefCell::new(None) };
        }
        let raw = raw.unwrap_or("");
        let seen = LAST.with(|last| {
            let last = last.borrow();
            last.as_ref()
                .filter(|(r, _)| **r == *raw)
                .map(|(_, q)| q.clone())
        });
        if let Some(query) = seen {
            return Ok(query);
        }
        let query = Self::parse_uncached(raw)?;
        LAST.with(|last| *last.borrow_mut() = Some((raw.into(), query.clone())));
        Ok(query)
    }

    fn parse_uncached(raw: &str) -> Result<Query, ApiError> {
        let mut pairs: Vec<(Box<str>, Box<str>)> = Vec::with_capacity(4);
        for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
            if pairs.len() == MAX_PARAMS {
                return Err(ApiError::bad_request(format!(
                    "Too many query parameters: at most {MAX_PARAMS} are accepted"
                )));
            }
            if pairs.iter().any(|(seen, _)| seen.eq_ignore_ascii_case(&k)) {
                return Err(ApiError::bad_request(format!(
                    "Duplicate query parameter '{}': each parameter may appear once",
                    excerpt(&k, ECHO_CHARS)
                )));
            }
            pairs.push((k.into(), v.into()));
        }
        Ok(Query(pairs.into()))
    }

    /// Parameter names are matched case-insensitively, as IMDS does.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }

    /// The identity selector among `names` (each paired with its meaning). More than one
    /// non-empty selector is ambiguous; an empty `client_id=` means the default identity.
    pub fn selector(&self, names: &[SelectorParam]) -> Result<Selector, ApiError> {
        let mut found: Option<(&str, Selector)> = None;
        for (name, make) in names {
            if let Some(v) = self.get(name).map(str::trim).filter(|v| !v.is_empty()) {
                if let Some((other, _)) = &found {
                    return Err(ApiError::bad_request(format!(
                        "Multiple identity selectors ('{other}' and '{name}'): give at most one"
                    )));
                }
                found = Some((name, make(v.to_owned())));
            }
        }
        Ok(found.map_or(Selector::Default, |(_, s)| s))
    }

    pub fn resource(&self) -> Result<&str, ApiError> {
        match self.get("resource").map(str::trim) {
            Some(r) if !r.is_empty() => Ok(r),
            _ => Err(ApiError::bad_request(
                "Required query variable 'resource' is missing",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;

    #[test]
    fn duplicate_parameters_are_rejected() {
        let e = Query::parse(Some("resource=a&resource=b")).err().unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.description.contains("resource"));
        assert!(
            Query::parse(Some("Resource=a&resource=b")).is_err(),
            "case-insensitively"
        );
    }

    #[test]
    fn parameters_are_decoded_and_capped() {
        let q = Query::parse(Some("resource=https%3A%2F%2Fx%2F&a+b=c+d")).unwrap();
        assert_eq!(q.resource().unwrap(), "https://x/");
        assert_eq!(q.get("a b"), Some("c d"));
        let many: Vec<String> = (0..3200).map(|i| format!("p{i}=v")).collect();
        let e = Query::parse(Some(&many.join("&"))).err().unwrap();
        assert!(e.description.contains("Too many"), "{}", e.description);
        let ok: Vec<String> = (0..MAX_PARAMS).map(|i| format!("p{i}=v")).collect();
        assert!(Query::parse(Some(&ok.join("&"))).is_ok());
    }

    #[test]
    fn a_repeated_query_is_reused_and_a_changed_one_parsed_again() {
        let raw = "api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
        let (a, b) = (
            Query::parse(Some(raw)).unwrap(),
            Query::parse(Some(raw)).unwrap(),
        );
        assert!(Arc::ptr_eq(&a.0, &b.0), "the second parse reuses the first");
        assert_eq!(b.resource().unwrap(), "https://vault.azure.net");
        let c = Query::parse(Some("api-version=2018-02-01&resource=r")).unwrap();
        assert_eq!(c.resource().unwrap(), "r");
        // A refused query is not remembered: the same string is refused again.
        let dup = "resource=a&resource=b";
        assert!(Query::parse(Some(dup)).is_err());
        assert!(Query::parse(Some(dup)).is_err());
        assert_eq!(Query::parse(None).unwrap().0.len(), 0);
    }

    #[test]
    fn empty_client_id_means_default() {
        let q = Query::parse(Some("resource=r&client_id=")).unwrap();
        let names: [SelectorParam; 1] = [("client_id", Selector::ClientId)];
        assert_eq!(q.selector(&names).unwrap(), Selector::Default);
    }

    #[test]
    fn two_selectors_are_ambiguous() {
        let q = Query::parse(Some("resource=r&client_id=a&object_id=b")).unwrap();
        let names: [SelectorParam; 2] = [
            ("client_id", Selector::ClientId),
            ("object_id", Selector::ObjectId),
        ];
        assert!(q.selector(&names).is_err());
    }
}
