//! Bounds a caller can push on: the entry cap, the admission rate of new resources,
//! exchanges in flight, gauge series.

use super::*;

#[tokio::test(start_paused = true)]
async fn the_entry_cap_counts_entries_being_fetched() {
    let script = Script::slow([], secs(1));
    let mut cfg = config();
    cfg.gate.new_burst = 1000;
    cfg.gate.max_in_flight = 1000;
    let b = broker_with(&script, cfg);
    let callers: Vec<_> = (0..100)
        .map(|i| spawn_get(&b, &format!("https://r{i}.example/"), secs(30)))
        .collect();
    let mut refused = 0;
    for c in callers {
        match c.await.unwrap() {
            Ok(_) => {}
            Err(BrokerError::TooManyResources(n)) => {
                assert_eq!(n, MAX_ENTRIES);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, 100 - MAX_ENTRIES);
    assert_eq!(script.calls(), MAX_ENTRIES);
}

#[tokio::test(start_paused = true)]
async fn failed_entries_make_room_for_new_ones() {
    let script = Script::new([]).then(Step::Permanent);
    let mut cfg = config();
    cfg.gate.new_burst = 1000;
    let b = broker_with(&script, cfg);
    for i in 0..MAX_ENTRIES {
        get(&b, &format!("https://r{i}.example/"), secs(1))
            .await
            .unwrap_err();
    }
    script.then(Step::Token(HOUR));
    assert!(
        get(&b, STORAGE, secs(1)).await.is_ok(),
        "a refused entry was evicted"
    );
}

#[tokio::test(start_paused = true)]
async fn new_resources_are_admitted_at_a_bounded_rate() {
    let script = Script::new([]);
    let b = broker(&script);
    let limits = GateLimits::default();
    let mut throttled = None;
    for i in 0..=limits.new_burst {
        match get(&b, &format!("https://r{i}.example/"), secs(1)).await {
            Ok(_) => {}
            Err(e @ BrokerError::NewResourcesThrottled { .. }) => {
                throttled = Some((i, e));
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let (i, e) = throttled.expect("throttled after the burst");
    assert_eq!(i, limits.new_burst);
    assert!(e.retry_after().unwrap() <= secs(1));
    assert_eq!(script.calls(), limits.new_burst as usize);
    advance(secs(1)).await;
    assert!(get(&b, "https://late.example/", secs(1)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn exchanges_in_flight_are_bounded() {
    let script = Script::slow([], secs(1));
    let b = broker(&script);
    let callers: Vec<_> = (0..12)
        .map(|i| spawn_get(&b, &format!("https://r{i}.example/"), secs(30)))
        .collect();
    for c in callers {
        c.await.unwrap().unwrap();
    }
    assert_eq!(
        script.most_running.load(Ordering::SeqCst),
        GateLimits::default().max_in_flight
    );
}

#[tokio::test(start_paused = true)]
async fn gauges_use_bounded_labels_and_go_with_their_entries() {
    let script = Script::new([Step::Token(secs(100)), Step::Token(secs(100))]);
    let b = broker(&script);
    get(&b, STORAGE, secs(1)).await.unwrap();
    get(&b, "https://weird.example/\u{7f}x", secs(1))
        .await
        .unwrap_err();
    get(&b, "https://weird.example/x", secs(1)).await.unwrap();
    b.update_gauges();
    let text = b.metrics.render();
    assert!(
        text.contains("resource=\"https://storage.azure.com/\""),
        "{text}"
    );
    assert!(text.contains("resource=\"other\""), "{text}");
    assert!(!text.contains("weird"), "{text}");
    sleep(secs(300)).await;
    settle().await;
    b.update_gauges();
    assert!(
        !b.metrics.render().contains("token_expiry_seconds{"),
        "series dropped with the entries"
    );
}
