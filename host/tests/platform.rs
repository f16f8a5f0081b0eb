//! The platform core through a real host process: routing, capabilities,
//! messaging guarantees, limits and grants.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn routes_by_longest_prefix_and_answers_unknown_paths_with_json_404() {
    let host = TestHost::standard();
    let hello = get(&host.url("/hello")).await;
    assert_eq!(
        (hello.status, hello.text().as_str()),
        (200, "Hello, world!\n")
    );
    assert_eq!(get(&host.url("/hello/anything/below")).await.status, 200);
    assert_eq!(
        get(&host.url("/probe/version")).await.json(),
        json!({"version": "v1"})
    );

    for path in ["/nope", "/hellothere", "/"] {
        let missing = get(&host.url(path)).await;
        assert_eq!(missing.status, 404, "{path}");
        assert_eq!(missing.error_code(), "not_found");
        assert!(missing.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains(path));
    }
    // A route inside a component that the component does not have.
    let inner = get(&host.url("/probe/nothing-here")).await;
    assert_error(&inner, 404, "not_found");

    assert_eq!(
        get(&host.url("/healthz")).await.json(),
        json!({"status": "ok"})
    );
    let ready = get(&host.url("/readyz")).await;
    assert_eq!(ready.status, 200);
    let ready = ready.json();
    assert_eq!(ready["status"], "ready");
    assert!(ready["components"]["hello"].is_string() && ready["components"]["probe"].is_string());
    assert_eq!(ready["backends"]["storage"], "ok");

    // Every response carries a request id, the client's own when it sent one.
    assert_eq!(hello.headers["x-request-id"].len(), 36);
    let traced = request(
        "GET",
        &host.url("/probe/version"),
        &[("x-request-id", "trace-me-42")],
        vec![],
    )
    .await;
    assert_eq!(traced.headers["x-request-id"], "trace-me-42");

    let log = host.logged("request_id=\"trace-me-42\"").await;
    assert!(
        log.contains("request_id=\"trace-me-42\""),
        "the id is in the request's log line"
    );
    assert!(
        log.contains("path=/probe/version")
            && log.contains("component=\"probe\"")
            && log.contains("status=200"),
        "one log line per request with component and status:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn data_and_delivered_events_survive_a_crash_and_nothing_recompiles() {
    let mut host = TestHost::standard();
    assert_eq!(put(&host.url("/probe/kv/colour"), "teal").await.status, 204);
    post_json(
        &host.url("/probe/publish"),
        &json!({"topic": "test.events", "payload": "before-crash"}),
    )
    .await;
    eventually(
        "the event to be handled",
        Duration::from_secs(10),
        || async {
            let received = get(&host.url("/probe/received")).await.json();
            (received.as_array().unwrap().len() == 1).then_some(())
        },
    )
    .await;
    let compiled = compiled_artifacts(&host.data_dir().join("compiled"));
    assert!(!compiled.is_empty(), "compiled code is cached on disk");

    host.restart();

    let kv = get(&host.url("/probe/kv/colour")).await;
    assert_eq!(kv.json(), json!({"value": "teal"}));
    // Progress was recorded: the event is not handled again after the restart.
    post_json(
        &host.url("/probe/publish"),
        &json!({"topic": "test.events", "payload": "after-crash"}),
    )
    .await;
    let received = eventually("the second event", Duration::from_secs(10), || async {
        let received = get(&host.url("/probe/received")).await.json();
        (received.as_array().unwrap().len() >= 2).then_some(received)
    })
    .await;
    let payloads: Vec<_> = received
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["payload"].clone())
        .collect();
    assert_eq!(
        payloads,
        [json!("\"after-crash\""), json!("\"before-crash\"")]
    );
    assert_eq!(
        compiled_artifacts(&host.data_dir().join("compiled")),
        compiled,
        "a restart reuses the compiled code instead of compiling again"
    );
}

/// The compiled artifacts, with when each was written (a compile writes
/// its artifact again), leaving out temporary files.
fn compiled_artifacts(
    dir: &std::path::Path,
) -> std::collections::BTreeSet<(String, std::time::SystemTime)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Default::default();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() {
                compiled_artifacts(&e.path())
            } else if name.starts_with('.') {
                Default::default()
            } else {
                let written = e.metadata().unwrap().created().unwrap();
                [(name, written)].into()
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_beside_an_open_transaction_fails_instead_of_waiting_on_itself() {
    let host = TestHost::standard();
    let reply = request(
        "POST",
        &host.url("/probe/write-beside-transaction"),
        &[],
        vec![],
    )
    .await;
    assert_error(&reply, 500, "internal_error");
    assert!(
        reply.text().contains("open transaction"),
        "{}",
        reply.text()
    );
    // The transaction was dropped with the failed request: nothing stays locked.
    assert_eq!(get(&host.url("/probe/kv/inside")).await.status, 404);
    assert_eq!(put(&host.url("/probe/kv/after"), "free").await.status, 204);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_cannot_pin_more_cache_memory_than_its_quota() {
    let host = TestHost::start(|ports, _| {
        let config = standard_config(ports, &component("probe"));
        format!("[backends.cache]\nkind = \"memory\"\nquota_mib = 1\n{config}")
    });
    // Warm up the request path, so its own allocations are in the baseline.
    assert_eq!(put(&host.url("/probe/cache/warm"), "x").await.status, 204);
    let before = host.resident_kib();
    let almost_a_mib = "x".repeat(1024 * 1024 - 4096);
    for i in 0..300 {
        let stored = put(&host.url(&format!("/probe/cache/big{i}")), &almost_a_mib).await;
        assert_eq!(stored.status, 204, "entry {i}: {}", stored.text());
    }
    let grown_mib = host.resident_kib().saturating_sub(before) / 1024;
    // Without a quota the host would hold all 300 MiB.
    assert!(grown_mib < 100, "the host grew by {grown_mib} MiB");
    // The newest entry is kept; the oldest made room for it.
    assert_eq!(get(&host.url("/probe/cache/big299")).await.status, 200);
    assert_eq!(get(&host.url("/probe/cache/big0")).await.status, 404);

    // One entry larger than the whole quota is refused, and says why.
    let too_large = put(&host.url("/probe/cache/huge"), &"x".repeat(1024 * 1024)).await;
    assert_error(&too_large, 500, "internal_error");
    assert!(
        too_large
            .text()
            .contains("exceeds the cache quota of 1 MiB"),
        "{}",
        too_large.text()
    );
    assert_eq!(get(&host.url("/probe/cache/huge")).await.status, 404);
    assert_eq!(get(&host.url("/probe/cache/big299")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_entries_expire_after_their_ttl() {
    let host = TestHost::standard();
    assert_eq!(
        put(&host.url("/probe/cache/short?ttl_ms=300"), "soon gone")
            .await
            .status,
        204
    );
    assert_eq!(
        put(&host.url("/probe/cache/long"), "stays").await.status,
        204
    );
    assert_eq!(
        get(&host.url("/probe/cache/short")).await.json(),
        json!({"value": "soon gone"})
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let expired = get(&host.url("/probe/cache/short")).await;
    assert_error(&expired, 404, "not_found");
    assert_eq!(
        get(&host.url("/probe/cache/long")).await.json(),
        json!({"value": "stays"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_are_delivered_retried_and_dead_lettered() {
    let host = TestHost::standard();
    for payload in ["plain", "fail-once", "fail-always"] {
        let reply = post_json(
            &host.url("/probe/publish"),
            &json!({"topic": "test.events", "key": "k", "payload": payload}),
        )
        .await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    // Order per key holds, so once "fail-always" is dead-lettered the others are done.
    let dead = eventually("the dead letter", Duration::from_secs(15), || async {
        let events = host
            .admin("GET", "/topics/dead-letter.probe/events", Vec::new())
            .await
            .json();
        let events = events["events"].as_array().unwrap().clone();
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["payload"], "\"fail-always\"");
    assert_eq!(dead[0]["headers"]["agora-original-topic"], "test.events");
    assert_eq!(dead[0]["headers"]["agora-attempts"], "3");
    assert_eq!(
        dead[0]["headers"]["agora-error"],
        "the payload asks to fail"
    );

    let received = get(&host.url("/probe/received")).await.json();
    let summary: Vec<_> = received
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["payload"].as_str().unwrap().to_owned(),
                r["attempt"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("\"fail-once\"".to_owned(), 2), ("\"plain\"".to_owned(), 1)]
    );

    // The CLI shows the same dead letters.
    let out = host.cli(&["events", "dead-letter.probe"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("fail-always"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_event_does_not_hold_up_other_keys_of_its_partition() {
    let host = TestHost::standard();
    // Two keys on one of test.events' 4 partitions.
    let partition = |key: &str| {
        let event = agora_host::messaging::Envelope {
            id: String::new(),
            topic: "test.events".into(),
            key: Some(key.into()),
            payload: Vec::new(),
            headers: Vec::new(),
            published_at: 0,
        };
        agora_host::messaging::partition_of(&event, 4)
    };
    let other = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| partition(k) == partition("slow"))
        .unwrap();
    let events = json!([
        {"topic": "test.events", "key": "slow", "payload": "slow-5000ms"},
        {"topic": "test.events", "key": other, "payload": "quick"},
    ]);
    let reply = post_json(&host.url("/probe/publish-together"), &events).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let payloads = || async {
        let received = get(&host.url("/probe/received")).await.json();
        received
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["payload"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    // One at a time, "quick" would wait the 5 s of the event before it.
    let first = eventually("the quick event", Duration::from_secs(15), || async {
        let got = payloads().await;
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(first, ["\"quick\""], "the slow event held up the other key");
    eventually("the slow event", Duration::from_secs(15), || async {
        (payloads().await.len() == 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_keys_takes_at_most_16_of_a_subscribers_instance_slots() {
    let host = TestHost::standard();
    // Distinct keys over test.events' 4 partitions, each handled for 5 s.
    let events: Vec<_> = (0..20)
        .map(|i| json!({"topic": "test.events", "key": format!("k{i}"), "payload": format!("slow-5000ms {i}")}))
        .collect();
    let reply = post_json(&host.url("/probe/publish-together"), &json!(events)).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let in_use = || async {
        sample(
            &scrape(&host).await,
            r#"agora_instance_slots_in_use{component="probe"}"#,
        )
        .unwrap_or(0.0)
    };
    eventually("deliveries in hand", Duration::from_secs(10), || async {
        (in_use().await >= 16.0).then_some(())
    })
    .await;
    let mut most = 0.0f64;
    for _ in 0..10 {
        most = most.max(in_use().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The 48 slots left serve HTTP meanwhile.
    assert_eq!(get(&host.url("/probe/version")).await.status, 200);
    assert_eq!(most, 16.0, "deliveries running at once, of 20 keys");
    eventually("all 20 events", Duration::from_secs(30), || async {
        let received = get(&host.url("/probe/received")).await.json();
        (received.as_array().unwrap().len() == 20).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_waiting_for_a_busy_subscriber_spend_no_attempt() {
    // One slot and a 3 s deadline; three keys' events of 2 s each. The
    // second waits 2 s for the slot, the third longer than its deadline.
    // Were the wait counted against the handler's time, or as an attempt,
    // they would be handled again, at attempt 2.
    let host = TestHost::start(|ports, _| {
        standard_config(ports, &component("probe")).replace(
            "timeout_ms = 6000, memory_mib = 32",
            "timeout_ms = 3000, memory_mib = 32, max_concurrency = 1",
        )
    });
    let events: Vec<_> = (0..3)
        .map(|i| json!({"topic": "test.events", "key": format!("k{i}"), "payload": format!("slow-2000ms {i}")}))
        .collect();
    let reply = post_json(&host.url("/probe/publish-together"), &json!(events)).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    // Asked while the deliveries hold the one slot, the probe may answer 503.
    let received = eventually("the three events", Duration::from_secs(30), || async {
        let received = get(&host.url("/probe/received")).await.json();
        received.as_array().filter(|r| r.len() == 3).cloned()
    })
    .await;
    for event in &received {
        assert_eq!(event["attempt"], 1, "waiting spent no attempt: {event}");
    }
    let waited = sample(
        &scrape(&host).await,
        r#"agora_events_waited_total{component="probe",topic="test.events"}"#,
    );
    assert!(
        waited >= Some(1.0),
        "the third event waited past a deadline: {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_published_in_a_rolled_back_transaction_is_never_delivered() {
    let host = TestHost::standard();
    let publish = |payload: &str, commit: bool| json!({"topic": "test.events", "key": "k", "payload": payload, "commit": commit});
    assert_eq!(
        post_json(&host.url("/probe/publish"), &publish("committed", true))
            .await
            .status,
        201
    );
    assert_eq!(
        post_json(&host.url("/probe/publish"), &publish("rolled-back", false))
            .await
            .status,
        201
    );
    assert_eq!(
        post_json(&host.url("/probe/publish"), &publish("sentinel", true))
            .await
            .status,
        201
    );
    // Delivery is in order, so once the sentinel is in, the rolled-back event had its chance.
    let received = eventually("the sentinel", Duration::from_secs(10), || async {
        let received = get(&host.url("/probe/received")).await.json();
        let done = received
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["payload"] == "\"sentinel\"");
        done.then_some(received)
    })
    .await;
    let payloads: Vec<_> = received
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["payload"].clone())
        .collect();
    assert_eq!(payloads, [json!("\"committed\""), json!("\"sentinel\"")]);
    // The row written beside the event was rolled back too.
    assert_eq!(
        get(&host.url("/probe/kv/published-\"rolled-back\""))
            .await
            .status,
        404
    );
    assert_eq!(
        get(&host.url("/probe/kv/published-\"committed\""))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_a_loop_and_a_memory_bomb_fail_only_their_request() {
    let host = TestHost::start(|ports, _| {
        standard_config(ports, &component("probe")).replace(
            "timeout_ms = 6000, memory_mib = 32",
            "timeout_ms = 1000, memory_mib = 16",
        )
    });
    let still_serving = || async {
        assert_eq!(get(&host.url("/hello")).await.status, 200);
        assert_eq!(get(&host.url("/probe/version")).await.status, 200);
    };

    let trap = get(&host.url("/probe/trap")).await;
    assert_error(&trap, 500, "component_trapped");
    assert!(trap.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`probe`"));
    still_serving().await;

    let started = Instant::now();
    let spin = get(&host.url("/probe/loop")).await;
    assert_error(&spin, 504, "deadline_exceeded");
    assert!(spin.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`probe`"));
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "stopped at the deadline, not before"
    );
    still_serving().await;

    let bomb = get(&host.url("/probe/oom")).await;
    assert_error(&bomb, 500, "memory_limit_exceeded");
    assert!(bomb.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`probe`"));
    still_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_are_fresh_unless_reuse_is_asked_and_never_reused_after_a_failure() {
    let fresh = TestHost::standard();
    // The probe counts its visits in a static: a fresh instance says 1.
    for _ in 0..3 {
        assert_eq!(visits(&fresh).await, 1, "a fresh instance per request");
    }
    drop(fresh);

    // One slot, so every request gets the one warm instance if there is one.
    let host = TestHost::start(|ports, _| {
        standard_config(ports, &component("probe")).replace(
            "timeout_ms = 6000, memory_mib = 32",
            "timeout_ms = 1000, memory_mib = 16, max_concurrency = 1, reuse = 3",
        )
    });
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(visits(&host).await);
    }
    assert_eq!(seen, [1, 2, 3, 1], "an instance serves `reuse` requests");
    // Its deadline is set again for each request: idle for longer than
    // `timeout_ms`, the warm instance still serves.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(visits(&host).await, 2, "the warm instance after a pause");

    // Each failure discards the instance that failed: the next is fresh.
    let failures = [
        ("/probe/trap", 500, "component_trapped"),
        ("/probe/loop", 504, "deadline_exceeded"),
        ("/probe/oom", 500, "memory_limit_exceeded"),
    ];
    for (path, status, code) in failures {
        assert!(visits(&host).await >= 2, "a warm instance before {path}");
        assert_error(&get(&host.url(path)).await, status, code);
        assert_eq!(visits(&host).await, 1, "a fresh instance after {path}");
    }

    // An instance that keeps a transaction open past its request is dropped
    // with it: the write is rolled back and nothing stays locked.
    let kept = request("POST", &host.url("/probe/keep-transaction"), &[], vec![]).await;
    assert_eq!(kept.status, 204, "{}", kept.text());
    assert_eq!(
        visits(&host).await,
        1,
        "the instance holding it was not kept"
    );
    assert_eq!(get(&host.url("/probe/kv/kept")).await.status, 404);
    assert_eq!(put(&host.url("/probe/kv/after"), "free").await.status, 204);

    // The operator sees why clean instances were dropped: the three that
    // served their 3 requests (the first, the one before the trap, the one
    // after the transaction), and the one holding the transaction.
    let metrics = host.admin("GET", "/metrics", vec![]).await.text();
    let not_kept = |reason: &str| -> f64 {
        let series =
            format!(r#"agora_instances_not_kept_total{{component="probe",reason="{reason}"}} "#);
        let line = metrics.lines().find(|l| l.starts_with(&series));
        let value = line.unwrap_or_else(|| panic!("no {series} in\n{metrics}"));
        value[series.len()..].trim().parse().unwrap()
    };
    assert_eq!(not_kept("served"), 3.0);
    assert_eq!(not_kept("held-resource"), 1.0);
    assert_eq!(not_kept("memory") + not_kept("no-room"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_does_not_cut_its_request_short() {
    let host = TestHost::standard();
    let url = host.url("/probe/kv/late?after_ms=700");
    let left = tokio::time::timeout(Duration::from_millis(200), put(&url, "written")).await;
    assert!(left.is_err(), "the client left before the answer");
    // The guest goes on to its write, as it would have with the client there.
    let value = eventually(
        "the write after the client left",
        Duration::from_secs(5),
        || async {
            let reply = get(&host.url("/probe/kv/late")).await;
            (reply.status == 200).then(|| reply.json())
        },
    )
    .await;
    assert_eq!(value, json!({"value": "written"}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_whose_client_left_still_stops_at_its_deadline() {
    let host = TestHost::start(|ports, _| {
        standard_config(ports, &component("probe")).replace(
            "timeout_ms = 6000, memory_mib = 32",
            "timeout_ms = 1000, memory_mib = 32, max_concurrency = 1",
        )
    });
    let url = host.url("/probe/kv/never?after_ms=5000");
    let left = tokio::time::timeout(Duration::from_millis(200), put(&url, "late")).await;
    assert!(left.is_err(), "the client left before the answer");
    // The guest it left holds the one slot only until its deadline.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get(&host.url("/probe/version")).await.status, 200);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(
        get(&host.url("/probe/kv/never")).await.status,
        404,
        "stopped at its deadline, before its write"
    );
}

async fn visits(host: &TestHost) -> u64 {
    let reply = get(&host.url("/probe/visits")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["visits"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn without_room_for_the_instance_pool_the_host_allocates_on_demand() {
    // 3 GiB of address space: far too little for the pool's reservations.
    let host = TestHost::start_limited(
        |ports, _| standard_config(ports, &component("probe")),
        Some(3 * 1024 * 1024),
    );
    assert!(
        host.log().contains("pooling allocator unavailable"),
        "{}",
        host.log()
    );
    assert_eq!(get(&host.url("/hello")).await.status, 200);
    assert_eq!(put(&host.url("/probe/kv/k"), "v").await.status, 204);
    assert_eq!(
        get(&host.url("/probe/kv/k")).await.json(),
        json!({"value": "v"})
    );
    let bomb = get(&host.url("/probe/oom")).await;
    assert_error(&bomb, 500, "memory_limit_exceeded");
    assert_eq!(get(&host.url("/hello")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_beyond_its_concurrency_limit_queues() {
    let host = TestHost::start(|ports, _| {
        standard_config(ports, &component("probe")).replace(
            "timeout_ms = 6000, memory_mib = 32",
            "timeout_ms = 6000, memory_mib = 32, max_concurrency = 1",
        )
    });
    // Two one-second requests on one instance slot cannot overlap, in
    // whichever order they get it.
    let url: &'static str = host.url("/probe/slow?ms=1000").leak();
    let started = Instant::now();
    let (a, b) = tokio::join!(get(url), get(url));
    assert_eq!((a.status, b.status), (200, 200));
    assert!(
        started.elapsed() >= Duration::from_millis(2000),
        "the requests ran one after the other"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_are_refused_with_413() {
    let host = TestHost::start(|ports, _| {
        standard_config(ports, &component("probe")).replace(
            "timeout_ms = 6000, memory_mib = 32",
            "timeout_ms = 6000, memory_mib = 32, max_body_kib = 1",
        )
    });
    let big = "x".repeat(2048);
    let refused = put(&host.url("/probe/kv/big"), &big).await;
    assert_error(&refused, 413, "body_too_large");
    assert_eq!(put(&host.url("/probe/kv/small"), "fits").await.status, 204);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_hold_per_client_and_answer_429() {
    let host = TestHost::start(|ports, _| {
        standard_config(ports, &component("probe")).replace(
            "retry = {",
            "rate_limits = [{ prefix = \"/probe/version\", methods = [\"GET\"], requests = 3, window_seconds = 3600 }]\nretry = {",
        )
    });
    for _ in 0..3 {
        assert_eq!(get(&host.url("/probe/version")).await.status, 200);
    }
    let limited = get(&host.url("/probe/version")).await;
    assert_error(&limited, 429, "rate_limited");
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry_after), "{retry_after}");
    // Other routes of the component, and other components, are not limited.
    assert_eq!(get(&host.url("/probe/config/greeting")).await.status, 200);
    assert_eq!(get(&host.url("/hello")).await.status, 200);

    // A signed-in user has a budget of their own.
    let issued = post_json(&host.url("/probe/token"), &json!({"subject": "user-9"}))
        .await
        .json();
    let bearer = format!("Bearer {}", issued["token"].as_str().unwrap());
    for expected in [200, 200, 200, 429] {
        let reply = request(
            "GET",
            &host.url("/probe/version"),
            &[("authorization", &bearer)],
            vec![],
        )
        .await;
        assert_eq!(reply.status, expected);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_issued_and_verified_by_the_host() {
    let host = TestHost::standard();
    let issued = post_json(&host.url("/probe/token"), &json!({"subject": "user-1"}))
        .await
        .json();
    let token = issued["token"].as_str().unwrap();
    assert_eq!(issued["expires_in"], 3600);
    let bearer = format!("Bearer {token}");
    let me = request(
        "GET",
        &host.url("/probe/whoami"),
        &[("authorization", &bearer)],
        vec![],
    )
    .await;
    assert_eq!(me.json(), json!({"subject": "user-1", "roles": ["tester"]}));
    let forged = format!("Bearer {}x", token);
    let refused = request(
        "GET",
        &host.url("/probe/whoami"),
        &[("authorization", &forged)],
        vec![],
    )
    .await;
    assert_error(&refused, 401, "invalid_token");
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_reach_the_component_through_config() {
    let host = TestHost::standard();
    assert_eq!(
        get(&host.url("/probe/config/greeting")).await.json(),
        json!({"value": "hi"})
    );
    assert_eq!(
        get(&host.url("/probe/config/admins")).await.json(),
        json!({"value": "[\"a@example.com\"]"})
    );
    assert_eq!(get(&host.url("/probe/config/missing")).await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn outbound_http_reaches_only_granted_hosts() {
    let host = TestHost::standard();
    let granted = format!("http://127.0.0.1:{}/hello", host.ports.public);
    let fetched = get(&host.url(&format!("/probe/fetch?url={granted}"))).await;
    assert_eq!(
        fetched.json(),
        json!({"status": 200, "body": "Hello, world!\n"})
    );
    let other = format!("http://localhost:{}/hello", host.ports.public);
    let denied = get(&host.url(&format!("/probe/fetch?url={other}"))).await;
    assert_error(&denied, 403, "outbound_denied");
}

#[test]
fn a_component_importing_an_ungranted_capability_is_refused_by_name() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = standard_config(
        &Ports {
            public: 1,
            admin: 2,
        },
        &component("probe"),
    )
    .replace(
        r#"grants = ["storage", "cache", "#,
        r#"grants = ["storage", "#,
    );
    let path = dir.path().join("plugins.toml");
    std::fs::write(&path, config).unwrap();
    let out = agora(&["check", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("component `probe` imports `agora:platform/cache") && err.contains("`cache`"),
        "{err}"
    );
}

#[test]
fn check_accepts_a_good_configuration_and_names_the_key_of_a_bad_one() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("plugins.toml");
    let good = standard_config(
        &Ports {
            public: 1,
            admin: 2,
        },
        &component("probe"),
    );
    std::fs::write(&path, &good).unwrap();
    let out = agora(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok  probe"));

    let cases = [
        (
            good.replace("routes = [\"/hello\"]", "route = [\"/hello\"]"),
            "unknown field `route`",
        ),
        (
            good.replace("memory_mib = 32", "memory_mib = 0"),
            "components.probe.limits.memory_mib",
        ),
        (good.replace("\"tokens\",", "\"sockets\","), "sockets"),
        (
            good.replace("routes = [\"/probe\"]", "routes = [\"/hello\"]"),
            "components.probe.routes[0]",
        ),
        (
            good.replace("[components.hello]", "[components.hello"),
            "plugins.toml",
        ),
    ];
    for (config, expected) in cases {
        std::fs::write(&path, config).unwrap();
        let out = agora(&["check", "--config", path.to_str().unwrap()]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(expected) && err.contains("plugins.toml"),
            "expected {expected:?} in: {err}"
        );
    }
    let missing = agora(&[
        "check",
        "--config",
        dir.path().join("absent.toml").to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("absent.toml"));
}

#[test]
fn a_missing_component_file_is_named_with_a_hint() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("plugins.toml");
    std::fs::write(
        &path,
        "[components.ghost]\nwasm = \"ghost.wasm\"\nroutes = [\"/ghost\"]\n",
    )
    .unwrap();
    let out = agora(&["check", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("component `ghost`") && err.contains("ghost.wasm") && err.contains("--build"),
        "{err}"
    );
}

/// The production file as shipped (Kafka, PostgreSQL, Redis, PostgreSQL
/// coordination) passes `agora check`, which loads every component on the
/// embedded backends and contacts no server: what the Dockerfile runs.
#[test]
fn agora_check_loads_the_production_file_without_its_servers() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins.production.toml");
    let out = agora(&["check", "--config", path.to_str().unwrap()]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}\n{}", stderr(&out));
    assert!(
        printed.contains("server backends are not contacted"),
        "{printed}"
    );
    for component in [
        "identity",
        "catalog",
        "orders",
        "payments",
        "notifications",
        "graphql",
    ] {
        assert!(
            printed.contains(&format!("ok  {component}")),
            "{component}: {printed}"
        );
    }
}

/// A component sees the environment its `env` gives it, and nothing of the
/// host's: a host variable reaches it only where `env` names it.
#[tokio::test]
async fn a_component_sees_its_env_and_nothing_of_the_hosts() {
    let host = TestHost::start(|ports, _| {
        standard_config(ports, &component("probe")).replace(
            "routes = [\"/probe\"]\n",
            "routes = [\"/probe\"]\nenv = { TARGET_URL = \"http://example.com/\", FROM_HOST = \"${HOME}\" }\n",
        )
    });
    let read = |name: &str| {
        let url = host.url(&format!("/probe/env/{name}"));
        async move { get(&url).await }
    };
    let target = read("TARGET_URL").await;
    assert_eq!(
        target.json(),
        serde_json::json!({"value": "http://example.com/"})
    );
    let home = std::env::var("HOME").unwrap();
    assert_eq!(read("FROM_HOST").await.json()["value"], home.as_str());
    for hidden in ["HOME", "PATH", "RUST_LOG"] {
        assert_eq!(
            read(hidden).await.status,
            404,
            "{hidden} leaked into the component"
        );
    }
}

/// `--log-format json` writes each log line as one JSON object, for log
/// shippers; the output meant for people stays as it is.
#[test]
fn logs_can_be_written_as_json_lines() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("plugins.toml");
    let hello = component("hello");
    std::fs::write(
        &path,
        format!(
            "[components.hello]\nwasm = \"{}\"\nroutes = [\"/hello\"]\n",
            hello.display()
        ),
    )
    .unwrap();
    let out = agora(&[
        "--log-format",
        "json",
        "check",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    let logs: Vec<serde_json::Value> = printed
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!logs.is_empty(), "no JSON log line in: {printed}");
    for log in &logs {
        assert!(
            log["level"].is_string() && log["timestamp"].is_string() && log["message"].is_string(),
            "{log}"
        );
    }
    assert!(printed.contains("ok  hello"), "{printed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_exporter_a_clients_trace_still_reaches_outbound_calls_and_events() {
    let recorder = Recorder::start(json!({"ok": true})).await;
    let port = recorder.port;
    let host = TestHost::start(move |ports, _| {
        standard_config(ports, &component("probe")).replace(
            &format!("outbound_hosts = [\"127.0.0.1:{}\"]", ports.public),
            &format!("outbound_hosts = [\"127.0.0.1:{port}\"]"),
        )
    });
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    let url = host.url(&format!("/probe/fetch?url=http://127.0.0.1:{port}/x"));
    let fetched = request("GET", &url, &[("traceparent", &traceparent)], Vec::new()).await;
    assert_eq!(fetched.status, 200, "{}", fetched.text());
    let sent = recorder.recorded()[0]
        .traceparent
        .clone()
        .unwrap_or_default();
    assert!(sent.contains(trace_id), "{sent}");

    let published = request(
        "POST",
        &host.url("/probe/publish"),
        &[
            ("traceparent", &traceparent),
            ("content-type", "application/json"),
        ],
        json!({"topic": "traced", "payload": "x"})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(published.status, 201, "{}", published.text());
    let events = host
        .admin("GET", "/topics/traced/events", Vec::new())
        .await
        .json();
    let carried = events["events"][0]["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default();
    assert!(carried.contains(trace_id), "{events}");
}

/// wstd's HTTP proxy example, built unmodified (host/tests/wstd-proxy): a
/// standard wasi:http component that reads its target from `TARGET_URL`.
#[tokio::test(flavor = "multi_thread")]
async fn a_standard_wasi_http_proxy_reads_its_target_from_env_and_runs_unmodified() {
    let upstream = Recorder::start(json!({"from": "upstream"})).await;
    let port = upstream.port;
    let host = TestHost::start(move |_, _| {
        format!(
            r#"
[components.proxy]
wasm = "{wasm}"
routes = ["/proxy"]
grants = ["http-out"]
outbound_hosts = ["127.0.0.1:{port}"]
env = {{ TARGET_URL = "http://127.0.0.1:{port}/" }}
"#,
            wasm = component("wstd-proxy").display()
        )
    });
    let proxied = get(&host.url("/proxy/catalog/items?page=2")).await;
    assert_eq!(proxied.status, 200, "{}", proxied.text());
    assert_eq!(proxied.json(), json!({"from": "upstream"}));
    let seen = upstream.recorded();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/catalog/items");
    // Anything but /proxy/ is the example's own 404.
    assert_eq!(get(&host.url("/proxy")).await.status, 404);
}
