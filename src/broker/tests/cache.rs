//! The cache: coalescing, spellings, refresh at half-life, idle expiry, stale serving.

use super::*;

#[tokio::test(start_paused = true)]
async fn concurrent_cold_callers_share_one_exchange() {
    let script = Script::slow([], Duration::from_millis(100));
    let b = broker(&script);
    let callers: Vec<_> = (0..200).map(|_| spawn_get(&b, STORAGE, secs(30))).collect();
    for c in callers {
        assert_eq!(&*c.await.unwrap().unwrap().access_token, "token-0");
    }
    assert_eq!(script.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn spellings_of_one_resource_share_an_entry_and_callers_keep_theirs() {
    let script = Script::new([]);
    let b = broker(&script);
    get(&b, "https://storage.azure.com", secs(5)).await.unwrap();
    for spelling in ["https://storage.azure.com/", "HTTPS://Storage.Azure.com//"] {
        assert!(cached(&b, spelling).is_some(), "{spelling}");
    }
    assert_eq!(script.calls(), 1);
    assert_eq!(b.cached_resources(), 1);
    // Exchanged as the first caller spelled it.
    assert_eq!(lock(&script.resources)[0], "https://storage.azure.com");
}

#[tokio::test(start_paused = true)]
async fn allow_listed_spelling_is_exchanged() {
    let script = Script::new([]);
    let mut cfg = config();
    cfg.allow_resources = Some(vec![STORAGE.into()]);
    let b = broker_with(&script, cfg);
    get(&b, "https://storage.azure.com", secs(5)).await.unwrap();
    assert_eq!(lock(&script.resources)[0], STORAGE);
    assert!(matches!(
        get(&b, ARM, secs(5)).await,
        Err(BrokerError::ResourceRefused { .. })
    ));
    assert_eq!(script.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_used_token_is_refreshed_at_half_life_in_the_background() {
    let script = Script::new([Step::Token(secs(100))]).then(Step::Token(secs(100)));
    let b = broker(&script);
    let first = get(&b, STORAGE, secs(5)).await.unwrap();
    sleep(secs(10)).await;
    assert!(Arc::ptr_eq(&cached(&b, STORAGE).unwrap(), &first), "used");
    sleep(secs(39)).await;
    assert_eq!(script.calls(), 1, "not before half-life");
    sleep(secs(2)).await;
    settle().await;
    assert_eq!(script.calls(), 2, "refreshed at half-life");
    let second = cached(&b, STORAGE).unwrap();
    assert_eq!(&*second.access_token, "token-1");
}

#[tokio::test(start_paused = true)]
async fn a_token_asked_for_once_is_not_refreshed_and_is_dropped_at_expiry() {
    let script = Script::new([Step::Token(secs(100))]);
    let b = broker(&script);
    get(&b, STORAGE, secs(5)).await.unwrap();
    sleep(secs(300)).await;
    settle().await;
    assert_eq!(script.calls(), 1, "no refresh without a use");
    assert_eq!(b.cached_resources(), 0, "dropped at expiry");
}

#[tokio::test(start_paused = true)]
async fn a_parked_entry_used_again_is_refreshed_before_it_is_served() {
    let script = Script::new([Step::Token(secs(100))]).then(Step::Token(secs(100)));
    let b = broker(&script);
    get(&b, STORAGE, secs(5)).await.unwrap();
    sleep(secs(60)).await;
    assert!(
        cached(&b, STORAGE).is_none(),
        "a half-spent token is not handed out"
    );
    let t = get(&b, STORAGE, secs(5)).await.unwrap();
    assert_eq!(&*t.access_token, "token-1");
    settle().await;
    assert_eq!(
        script.calls(),
        2,
        "one refresh, by the caller or the woken refresher"
    );
}

#[tokio::test(start_paused = true)]
async fn stale_token_is_served_while_entra_fails_but_not_past_expiry_minus_skew() {
    let script = Script::new([Step::Token(secs(100))]).then(Step::Transient(None));
    let b = broker(&script);
    let t = get(&b, STORAGE, secs(5)).await.unwrap();
    for at in [30, 55, 70, 89] {
        sleep_until_secs(at).await;
        let served = cached(&b, STORAGE).expect("stale token served");
        assert!(Arc::ptr_eq(&served, &t), "at {at}s");
    }
    assert!(script.calls() > 1, "the refresh was tried");
    sleep_until_secs(91).await;
    assert!(
        cached(&b, STORAGE).is_none(),
        "not within the skew of expiry"
    );
    let err = get(&b, STORAGE, secs(1)).await.unwrap_err();
    assert!(matches!(err, BrokerError::EntraUnavailable { .. }), "{err}");
}
