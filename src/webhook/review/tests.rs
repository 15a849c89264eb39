use super::*;

#[test]
fn random_headers_are_long_and_distinct() {
    let a = random_identity_header().unwrap();
    let b = random_identity_header().unwrap();
    assert_eq!(a.len(), 43);
    assert_ne!(a, b);
    assert!(a
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
}

#[test]
fn envelopes_are_checked() {
    for bad in [
        &b"not json"[..],
        br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{}}"#,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod"}"#,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"","kind":{"kind":"Pod"},"operation":"CREATE"}}"#,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","operation":"CREATE"}}"#,
    ] {
        assert!(parse_review(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
    let ok = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE"}}"#;
    assert_eq!(parse_review(ok).unwrap().uid, "u");
}

#[test]
fn denials_and_empty_patches() {
    let d = Decision::deny("nope".into());
    let r = respond("u", &d);
    assert!(!r.allowed);
    assert_eq!(r.status.unwrap()["message"], "nope");
    let r = respond("u", &Decision::admit(Outcome::Skipped));
    assert!(r.allowed && r.patch.is_none() && r.patch_type.is_none());
}
