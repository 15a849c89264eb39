//! Go azidentity cannot be installed here, so its documented parsing and retry rules are
//! encoded below as small models and run against REAL broker responses (the `imds-broker`
//! binary, on its emulator or the fake Entra).
//!
//! Two Go clients matter, because Velero pins both generations:
//! - **azidentity ≤ 1.8** (Velero 1.15 → v1.6.0, 1.16 → v1.8.1): its own managed-identity client,
//!   `sdk/azidentity/managed_identity_client.go` (Azure/azure-sdk-for-go).
//! - **azidentity ≥ 1.9** (Velero 1.17 → v1.10.1, 1.18 → v1.13.1): a thin wrapper
//!   (`sdk/azidentity/managed_identity_client.go`) around MSAL Go's
//!   `apps/managedidentity/managedidentity.go` (AzureAD/microsoft-authentication-library-for-go),
//!   which unmarshals into `accesstokens.TokenResponse`
//!   (`apps/internal/oauth/ops/accesstokens/tokens.go`) whose durations are
//!   `apps/internal/json/types/time/time.go` `DurationTime`.
//!
//! Both send requests through an azcore pipeline whose retry policy is
//! `sdk/azcore/runtime/policy_retry.go`. Each rule's comment names the file it comes from; the
//! sources were read, not copied.

mod support;

use serde_json::Value;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::broker::{enc, token_dir, Broker, BrokerBuilder, Reply, ARM, STORAGE};
use support::fake_entra::FakeEntra;

/// Client ID the emulator serves when none is configured (src/serve.rs).
const EMULATOR_CLIENT_ID: &str = "11111111-1111-1111-1111-111111111111";
const UNKNOWN_CLIENT_ID: &str = "00000000-0000-0000-0000-00000000dead";
const REFUSED: &str = "https://vault.azure.net/";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// =========================================================================================
// The Go rules, as models.

/// How a Go credential reports a failed token request. The difference matters: a
/// `CredentialUnavailable` makes DefaultAzureCredential silently try the next credential; an
/// `AuthenticationFailed` stops the chain with the message (the clear failure we want).
#[derive(Debug, PartialEq, Eq)]
enum GoError {
    AuthenticationFailed(String),
    CredentialUnavailable(String),
}

/// Which endpoint flavour the Go client selected (from IDENTITY_ENDPOINT/IDENTITY_HEADER).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Imds,
    AppService,
}

/// `wrappedNumber` (managed_identity_client.go, ≤ 1.8): `""` means absent; anything else goes
/// through `json.Number`, so a JSON number or a string holding a number literal; `Int64()` then
/// needs an integer.
fn go18_wrapped_number(v: Option<&Value>) -> Result<Option<i64>, String> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            // json.Number accepts only a valid JSON number literal.
            serde_json::from_str::<serde_json::Number>(s)
                .map_err(|_| format!("json: invalid number literal {s:?}"))?;
            s.parse::<i64>()
                .map(Some)
                .map_err(|e| format!("Int64 of {s:?}: {e}"))
        }
        Some(Value::Number(n)) => n
            .to_string()
            .parse::<i64>()
            .map(Some)
            .map_err(|e| format!("Int64 of {n}: {e}")),
        Some(other) => Err(format!("cannot unmarshal {other} into wrappedNumber")),
    }
}

/// `createAccessToken` (managed_identity_client.go, ≤ 1.8): `expires_in` wins and is added to
/// the local clock; otherwise `expires_on` as float64 or an Atoi-able string; a date string or
/// anything else is an error. Success statuses are 200 and 201 (`authenticate`).
fn go18_parse(source: Source, user_assigned: bool, r: &Reply) -> Result<(String, i64), GoError> {
    if r.status == 200 || r.status == 201 {
        let body = r.body.as_object().ok_or_else(|| {
            GoError::AuthenticationFailed(format!("Unexpected response content: {}", r.raw))
        })?;
        let token = match body.get("access_token") {
            Some(Value::String(s)) => s.clone(),
            None => String::new(),
            Some(v) => {
                return Err(GoError::AuthenticationFailed(format!(
                    "access_token is not a string: {v}"
                )))
            }
        };
        let fail = |m: String| GoError::AuthenticationFailed(m);
        if let Some(secs) = go18_wrapped_number(body.get("expires_in")).map_err(fail)? {
            return Ok((token, now() + secs));
        }
        return match body.get("expires_on") {
            Some(Value::Number(n)) => Ok((token, n.as_f64().unwrap_or_default() as i64)),
            Some(Value::String(s)) => s
                .parse::<i64>()
                .map(|e| (token, e))
                .map_err(|_| fail(format!("unexpected expires_on value: {s}"))),
            other => Err(fail(format!(
                "unsupported type received in expires_on: {other:?}"
            ))),
        };
    }
    // `authenticate`: IMDS-only special cases, then AuthenticationFailed with the response.
    if source == Source::Imds {
        match r.status {
            400 if user_assigned => {
                return Err(GoError::AuthenticationFailed(
                    "the requested identity isn't assigned to this resource".into(),
                ))
            }
            400 => {
                let what = "failed to authenticate a system assigned identity";
                return Err(GoError::CredentialUnavailable(format!(
                    "{what}. The endpoint responded with {}",
                    r.raw
                )));
            }
            403 if r.raw.contains("unreachable") => {
                return Err(GoError::CredentialUnavailable(format!(
                    "unexpected response {:?}",
                    r.raw
                )))
            }
            _ => {}
        }
    }
    Err(GoError::AuthenticationFailed(r.raw.clone()))
}

/// MSAL Go `DurationTime.UnmarshalJSON` (apps/internal/json/types/time/time.go):
/// `strconv.Atoi(strings.Trim(raw, "\""))`. A JSON number or a digit string parses; `""`,
/// `null`, a float or a word is an unmarshal error that fails the whole response.
fn msal_duration(raw: &Value) -> Result<i64, String> {
    let text = raw.to_string();
    text.trim_matches('"')
        .parse::<i64>()
        .map_err(|e| format!("unix time({text}) could not be converted from string to int: {e}"))
}

/// MSAL Go `getTokenForRequest` (apps/managedidentity/managedidentity.go): only 200 and 202
/// are success; any other status is a `CallErr` carrying the body. The body is unmarshalled
/// into `accesstokens.TokenResponse` (tokens.go): `expires_in`, `ext_expires_in` and (newer
/// versions) `refresh_in` are `DurationTime`; `expires_on`, when present, wins over
/// `expires_in` (number or Unix-seconds string); then `Validate` rejects a body with a
/// non-empty `error` or an empty `access_token`.
fn msal_go_parse(r: &Reply) -> Result<(String, i64), String> {
    if r.status != 200 && r.status != 202 {
        return Err(format!(
            "http call error: reply status code was {}:\n{}",
            r.status,
            r.raw.trim()
        ));
    }
    let body = r
        .body
        .as_object()
        .ok_or_else(|| format!("InvalidJsonErr: {}", r.raw))?;
    let mut expires = None;
    for field in ["expires_in", "ext_expires_in", "refresh_in"] {
        if let Some(v) = body.get(field) {
            let secs = msal_duration(v).map_err(|e| format!("InvalidJsonErr: {field}: {e}"))?;
            if field == "expires_in" {
                expires = Some(now() + secs);
            }
        }
    }
    match body.get("expires_on") {
        None => {}
        Some(Value::Number(n)) => expires = n.as_i64(),
        Some(Value::String(s)) => {
            expires = Some(
                s.parse::<i64>()
                    .map_err(|_| format!("expires_on {s:?} is not Unix seconds"))?,
            )
        }
        Some(v) => return Err(format!("InvalidJsonErr: expires_on {v}")),
    }
    if let Some(e) = body.get("error").and_then(Value::as_str) {
        if !e.is_empty() {
            return Err(format!("{e}: {}", body["error_description"]));
        }
    }
    let token = body
        .get("access_token")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if token.is_empty() {
        return Err("response is missing access_token".into());
    }
    let expires = expires.ok_or("no expiry: the token would be treated as expired")?;
    Ok((token.to_owned(), expires))
}

/// azidentity ≥ 1.9 `GetToken` (sdk/azidentity/managed_identity_client.go): maps MSAL's error
/// for IMDS exactly as ≤ 1.8 did (400 + user-assigned → AuthenticationFailed, 400 system →
/// CredentialUnavailable, 403 "unreachable" → CredentialUnavailable).
fn go19_error(source: Source, user_assigned: bool, r: &Reply) -> GoError {
    if source == Source::Imds {
        match r.status {
            400 if user_assigned => {
                return GoError::AuthenticationFailed(
                    "the requested identity isn't assigned to this resource".into(),
                )
            }
            400 => return GoError::CredentialUnavailable(r.raw.clone()),
            403 if r.raw.contains("unreachable") => {
                return GoError::CredentialUnavailable(r.raw.clone())
            }
            _ => {}
        }
    }
    GoError::AuthenticationFailed(r.raw.clone())
}

/// The azcore retry policy the Go clients use (both generations; azidentity ≥ 1.9 turns MSAL's
/// own retry off with `WithRetryPolicyDisabled` and sends through azcore).
struct RetryRules {
    status_codes: &'static [u16],
    max_retries: u32,
    max_retry_delay: Duration,
}

/// `setIMDSRetryOptionDefaults` (sdk/azidentity/managed_identity_client.go): IMDS retries
/// 404, 410, 429 and 5xx (not 509), 5 retries, delays 2 s doubling, capped at 1 min.
const GO_IMDS_RETRY: RetryRules = RetryRules {
    status_codes: &[
        404, 410, 429, 500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
    ],
    max_retries: 5,
    max_retry_delay: Duration::from_secs(60),
};

/// azcore `setDefaults` (sdk/azcore/runtime/policy_retry.go), used for App Service: 408, 429,
/// 500, 502, 503, 504, 3 retries, capped at 60 s.
const GO_APP_SERVICE_RETRY: RetryRules = RetryRules {
    status_codes: &[408, 429, 500, 502, 503, 504],
    max_retries: 3,
    max_retry_delay: Duration::from_secs(60),
};

/// MSAL Go's own retry when used directly (apps/managedidentity/managedidentity.go
/// `retryCodesForIMDS` / `retryStatusCodes`, `defaultRetryCount` = 3 tries, 1 s apart, no
/// Retry-After).
const MSAL_GO_IMDS_RETRY_CODES: &[u16] = &[
    404, 410, 429, 500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
];
const MSAL_GO_OTHER_RETRY_CODES: &[u16] = &[408, 429, 500, 502, 503, 504];

impl RetryRules {
    /// azcore `retryPolicy.Do`: a listed status is retried; the wait is `Retry-After` when the
    /// response has one — and when it exceeds MaxRetryDelay the policy gives up at once.
    /// `None` = not retried.
    fn next_delay(&self, r: &Reply) -> Option<Duration> {
        if !self.status_codes.contains(&r.status) {
            return None;
        }
        match r.retry_after.as_deref() {
            Some(v) => {
                let secs: u64 = v.trim().parse().expect("Retry-After in whole seconds");
                let d = Duration::from_secs(secs);
                (d <= self.max_retry_delay).then_some(d)
            }
            None => Some(Duration::from_millis(800)),
        }
    }
}

fn rules(source: Source) -> &'static RetryRules {
    match source {
        Source::Imds => &GO_IMDS_RETRY,
        Source::AppService => &GO_APP_SERVICE_RETRY,
    }
}

// =========================================================================================
// Requests exactly as the Go clients build them.

/// IMDS: `createIMDSAuthRequest` sets api-version 2018-02-01, `resource` (the scope with
/// "/.default" trimmed), an optional `client_id`, and `Metadata: true`. url.Values.Encode sorts
/// the keys.
async fn go_imds(broker: &Broker, resource: &str, client_id: Option<&str>) -> Reply {
    let mut q = String::from("api-version=2018-02-01");
    if let Some(id) = client_id {
        q.push_str(&format!("&client_id={}", enc(id)));
    }
    q.push_str(&format!("&resource={}", enc(resource)));
    broker.imds(&q).await
}

/// App Service: `createAppServiceAuthRequest` sets api-version 2019-08-01, `resource`, an
/// optional `client_id`, and `X-IDENTITY-HEADER` from IDENTITY_HEADER.
async fn go_app_service(broker: &Broker, resource: &str, client_id: Option<&str>) -> Reply {
    let mut q = String::from("api-version=2019-08-01");
    if let Some(id) = client_id {
        q.push_str(&format!("&client_id={}", enc(id)));
    }
    q.push_str(&format!("&resource={}", enc(resource)));
    broker.app_service(&q).await
}

async fn go_request(
    broker: &Broker,
    source: Source,
    resource: &str,
    client_id: Option<&str>,
) -> Reply {
    match source {
        Source::Imds => go_imds(broker, resource, client_id).await,
        Source::AppService => go_app_service(broker, resource, client_id).await,
    }
}

const SOURCES: [Source; 2] = [Source::Imds, Source::AppService];

// =========================================================================================
// The tests.

#[tokio::test]
async fn success_parses_under_both_go_generations_with_the_same_expiry() {
    let broker = BrokerBuilder::emulate().spawn().await;
    for source in SOURCES {
        // Velero passes the credentials file's AZURE_CLIENT_ID (may be absent → no selector on
        // ≥ 1.9) and both a trimmed and an untrimmed resource occur in the wild.
        for (resource, id) in [
            (STORAGE.trim_end_matches('/'), Some(EMULATOR_CLIENT_ID)),
            (STORAGE, None),
            (ARM.trim_end_matches('/'), Some(EMULATOR_CLIENT_ID)),
        ] {
            let r = go_request(&broker, source, resource, id).await;
            let ctx = format!("{source:?} {resource} {id:?}: {}", r.raw);
            // Success must be exactly 200: ≤ 1.8 accepts 200/201, MSAL Go 200/202.
            assert_eq!(r.status, 200, "{ctx}");
            let (t18, exp18) = go18_parse(source, id.is_some(), &r).expect(&ctx);
            let (t19, exp19) = msal_go_parse(&r).expect(&ctx);
            assert!(t18.len() > 100 && t18 == t19, "{ctx}");
            // ≤ 1.8 uses expires_in + local clock, MSAL Go expires_on: they must agree, or
            // the two Velero generations would refresh at different times.
            assert!((exp18 - exp19).abs() <= 2, "{ctx}: {exp18} vs {exp19}");
            assert!(exp19 > now() + 3000, "{ctx}: expiry {exp19} too close");
            // Never Retry-After on a 200.
            assert!(r.retry_after.is_none(), "{ctx}");
        }
    }
}

#[tokio::test]
async fn numeric_fields_are_non_empty_digit_strings_that_both_parsers_accept() {
    let broker = BrokerBuilder::emulate().spawn().await;
    for source in SOURCES {
        let r = go_request(&broker, source, STORAGE, None).await;
        assert_eq!(r.status, 200, "{}", r.raw);
        for field in ["expires_in", "expires_on", "ext_expires_in", "not_before"] {
            let v = &r.body[field];
            let s = v
                .as_str()
                .unwrap_or_else(|| panic!("{field} must be a string: {}", r.raw));
            assert!(
                !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()),
                "{field} = {s:?}: an empty or non-digit string breaks MSAL Go's DurationTime"
            );
            msal_duration(v).unwrap_or_else(|e| panic!("{field}: {e}"));
            go18_wrapped_number(Some(v)).unwrap_or_else(|e| panic!("{field}: {e}"));
        }
        // A `refresh_in` would go through DurationTime too; the broker does not send one.
        assert!(r.body.get("refresh_in").is_none(), "{}", r.raw);
        // MSAL Go's Validate fails a 200 that carries an `error`.
        assert!(r.body.get("error").is_none(), "{}", r.raw);
        assert_eq!(r.body["token_type"], "Bearer");
        assert!(r.body["refresh_token"].is_string(), "{}", r.raw);
    }
}

#[test]
fn the_models_reject_what_breaks_real_go_clients() {
    // The models are only useful if they fail where the Go code fails.
    let reply = |body: Value| Reply {
        status: 200,
        retry_after: None,
        raw: body.to_string(),
        body,
    };
    let ok =
        serde_json::json!({"access_token": "t", "expires_in": "3599", "expires_on": "1900000000"});
    assert!(msal_go_parse(&reply(ok.clone())).is_ok());
    assert!(go18_parse(Source::Imds, false, &reply(ok)).is_ok());
    // Empty expires_in: fine for ≤ 1.8 (wrappedNumber), fatal for MSAL Go.
    let empty =
        serde_json::json!({"access_token": "t", "expires_in": "", "expires_on": "1900000000"});
    assert!(msal_go_parse(&reply(empty.clone())).is_err());
    assert!(go18_parse(Source::Imds, false, &reply(empty)).is_ok());
    // A date string in expires_on (App Service 2017 style) breaks ≤ 1.8 without expires_in.
    let date =
        serde_json::json!({"access_token": "t", "expires_on": "09/14/2017 00:00:00 PM +00:00"});
    assert!(go18_parse(Source::AppService, false, &reply(date)).is_err());
    // null and floats are not integers.
    assert!(msal_duration(&Value::Null).is_err());
    assert!(go18_wrapped_number(Some(&serde_json::json!("3599.5"))).is_err());
    // Only 200/202 are success for MSAL Go; 201 is not.
    let mut created = reply(serde_json::json!({"access_token": "t", "expires_in": 1}));
    created.status = 201;
    assert!(msal_go_parse(&created).is_err());
}

#[tokio::test]
async fn velero_empty_client_id_gets_the_configured_identity() {
    // Velero 1.15/1.16 (azidentity ≤ 1.8) always passes ClientID(creds["AZURE_CLIENT_ID"]),
    // which is "" without that key: the request carries `client_id=` (managed_identity_client.go
    // createIMDSAuthRequest sets it whenever an ID option is present).
    let broker = BrokerBuilder::emulate().spawn().await;
    for source in SOURCES {
        let r = go_request(&broker, source, STORAGE, Some("")).await;
        assert_eq!(r.status, 200, "{source:?}: {}", r.raw);
        go18_parse(source, true, &r).expect("parses");
        assert_eq!(r.body["client_id"], EMULATOR_CLIENT_ID);
    }
}

#[tokio::test]
async fn dac_probes_get_a_json_answer_within_the_probe_timeout() {
    // ≤ 1.8: DefaultAzureCredential probes IMDS with a GET to the token path, no query, no
    // Metadata header, 1 s timeout, no retry; a non-JSON body means "not IMDS" and the chain
    // moves on (managed_identity_client.go `authenticate`, imdsProbeTimeout). ≥ 1.9 accepts any
    // response but treats a later non-JSON token response as unavailable (InvalidJsonErr).
    let broker = BrokerBuilder::emulate().spawn().await;
    let url = format!(
        "http://{}/metadata/identity/oauth2/token",
        broker.token_addr
    );
    let started = Instant::now();
    let r = broker.get(&url, &[]).await;
    assert!(started.elapsed() < Duration::from_secs(1), "probe too slow");
    assert!(
        serde_json::from_str::<Value>(&r.raw).is_ok(),
        "probe body must be JSON: {}",
        r.raw
    );
    assert_eq!(r.status, 400, "{}", r.raw);
    assert!(r.retry_after.is_none());
}

#[tokio::test]
async fn unknown_client_id_is_a_clear_non_retried_failure() {
    let broker = BrokerBuilder::emulate().spawn().await;
    for source in SOURCES {
        let r = go_request(&broker, source, STORAGE, Some(UNKNOWN_CLIENT_ID)).await;
        assert_eq!(r.status, 400, "{source:?}: {}", r.raw);
        assert!(r.description().contains("Identity not found"), "{}", r.raw);
        // Not in any Go retry list: fails at once instead of burning ~1 min of retries.
        assert_eq!(rules(source).next_delay(&r), None, "{source:?}");
        assert!(!MSAL_GO_IMDS_RETRY_CODES.contains(&r.status));
        assert!(!MSAL_GO_OTHER_RETRY_CODES.contains(&r.status));
        // Both generations stop the credential chain with an authentication failure.
        let e18 = go18_parse(source, true, &r).unwrap_err();
        let e19 = go19_error(source, true, &r);
        assert!(matches!(e18, GoError::AuthenticationFailed(_)), "{e18:?}");
        assert!(matches!(e19, GoError::AuthenticationFailed(_)), "{e19:?}");
        assert!(msal_go_parse(&r).unwrap_err().contains("400"));
    }
}

#[tokio::test]
async fn refused_resource_is_an_authentication_failure_not_unavailable() {
    let broker = BrokerBuilder::emulate()
        .args(["--allow-resource", STORAGE])
        .spawn()
        .await;
    for source in SOURCES {
        let r = go_request(&broker, source, REFUSED, Some(EMULATOR_CLIENT_ID)).await;
        assert_eq!(r.status, 403, "{source:?}: {}", r.raw);
        // A 403 whose body says "unreachable" is Docker Desktop's proxy to Go, which then
        // silently falls through the chain; ours must not look like that.
        assert!(!r.raw.contains("unreachable"), "{}", r.raw);
        assert_eq!(rules(source).next_delay(&r), None);
        for e in [
            go18_parse(source, true, &r).unwrap_err(),
            go19_error(source, true, &r),
        ] {
            match e {
                GoError::AuthenticationFailed(m) => {
                    assert!(m.contains("not allowed by this broker's policy"), "{m}")
                }
                other => panic!("{source:?}: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn not_ready_503_is_retried_by_go_and_recovers() {
    let fake = FakeEntra::start();
    for source in SOURCES {
        let (dir, token_file) = token_dir(&fake);
        let hidden = dir.path().join("hidden");
        std::fs::rename(&token_file, &hidden).unwrap();
        let broker = BrokerBuilder::entra(&fake, &token_file).spawn().await;

        // The Go client's loop (azcore retryPolicy.Do) with the rules for this source.
        let rules = rules(source);
        let mut tries = 0;
        let reply = loop {
            tries += 1;
            let r = go_request(&broker, source, STORAGE, Some(&fake.client_id())).await;
            let Some(delay) = rules.next_delay(&r) else {
                break r;
            };
            assert!(
                tries <= rules.max_retries,
                "{source:?}: out of retries: {}",
                r.raw
            );
            if tries == 1 {
                assert_eq!(r.status, 503, "{}", r.raw);
                assert_eq!(r.body["error"], "not_ready", "{}", r.raw);
                // Retry-After must be short and within MaxRetryDelay, or azcore gives up.
                assert_eq!(r.retry_after.as_deref(), Some("1"), "{}", r.raw);
                assert!(MSAL_GO_IMDS_RETRY_CODES.contains(&r.status));
                assert!(MSAL_GO_OTHER_RETRY_CODES.contains(&r.status));
                // kubelet writes the projected token.
                std::fs::rename(&hidden, &token_file).unwrap();
            }
            // This is the Go client's own wait between tries (Retry-After), not a test sleep.
            tokio::time::sleep(delay).await;
        };
        assert_eq!(reply.status, 200, "{source:?}: {}", reply.raw);
        assert_eq!(tries, 2, "{source:?}: one 503, then the token");
        go18_parse(source, true, &reply).expect("≤ 1.8 parses the recovered token");
        msal_go_parse(&reply).expect("MSAL Go parses the recovered token");
    }
}

#[tokio::test]
async fn instance_metadata_is_never_served() {
    // In transparent mode the broker answers every request to 169.254.169.254: anything but
    // the token endpoint must be a JSON 404, so no instance metadata (and no node identity)
    // leaks, and SDK probes still parse the answer.
    let broker = BrokerBuilder::emulate().spawn().await;
    for path in [
        "/metadata/instance?api-version=2021-02-01",
        "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
        "/metadata/attested/document?api-version=2020-09-01",
        "/metadata/identity/info?api-version=2018-02-01",
        "/metadata/versions",
        "/",
    ] {
        let url = format!("http://{}{path}", broker.token_addr);
        let r = broker.get(&url, &[("Metadata", "true")]).await;
        assert_eq!(r.status, 404, "{path}: {}", r.raw);
        assert_eq!(r.body["error"], "not_found", "{path}: {}", r.raw);
        assert!(
            r.description().contains("not served by imds-broker"),
            "{path}: {}",
            r.raw
        );
    }
}
