//! Where the broker asks Entra for tokens: `{authority host}/{tenant}/oauth2/v2.0/token`.
//! The two settings are checked here, once, for every place they come from — `serve`'s flags
//! and env, the webhook's flags, a ServiceAccount's annotations — so the webhook never injects
//! a value the sidecar would refuse to start with. Errors say what is wrong with the value;
//! each caller names where it came from.

use crate::broker::policy::is_guid;

/// Refuses a tenant that is neither a directory ID (GUID) nor a verified domain
/// (`contoso.onmicrosoft.com`): it becomes a path segment of the authority URL, and the
/// multi-tenant aliases (`common`, `organizations`) cannot issue app-only tokens.
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let domain = tenant.len() <= 253 && tenant.contains('.') && tenant.split('.').all(label_ok);
    if is_guid(tenant) || domain {
        return Ok(());
    }
    let shown: String = tenant.chars().take(80).collect();
    Err(format!(
        "{shown:?} is neither a directory (tenant) ID such as \
         72f988bf-86f1-41af-91ab-2d7cd011db47 nor a domain such as contoso.onmicrosoft.com: \
         copy the Directory (tenant) ID from the app's or identity's overview page"
    ))
}

/// The authority host without trailing slashes, if it is an `https://` URL (the token
/// exchange carries a credential; the SDK refuses plain HTTP).
pub fn authority_url(host: &str) -> Result<String, String> {
    let trimmed = host.trim_end_matches('/');
    match trimmed.split_once("://") {
        Some(("https", rest)) if !rest.is_empty() => Ok(trimmed.to_owned()),
        _ => {
            let shown: String = host.chars().take(200).collect();
            Err(format!(
                "{shown:?} must be an https:// URL, e.g. https://login.microsoftonline.com \
                 (China: https://login.chinacloudapi.cn, US Government: \
                 https://login.microsoftonline.us)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_are_guids_or_domains() {
        let guid = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        assert_eq!(check_tenant(guid), Ok(()));
        assert_eq!(check_tenant("contoso.onmicrosoft.com"), Ok(()));
        // The multi-tenant aliases, and what would change the authority URL's path.
        for bad in [
            "organizations",
            "common",
            "consumers",
            "x.com/oauth2",
            "../x",
        ] {
            let err = check_tenant(bad).unwrap_err();
            assert!(err.contains("directory (tenant) ID"), "{bad}: {err}");
        }
    }

    #[test]
    fn authorities_are_https_urls() {
        assert_eq!(
            authority_url("https://login.microsoftonline.us//").as_deref(),
            Ok("https://login.microsoftonline.us")
        );
        for bad in [
            "http://login.example",
            "login.microsoftonline.com",
            "https://",
            "",
        ] {
            let err = authority_url(bad).unwrap_err();
            assert!(err.contains("must be an https:// URL"), "{bad}: {err}");
        }
    }
}
