//! Several hosts sharing one deployment: PostgreSQL (data, leases, consumer
//! offsets), Redis and Kafka (the test broker). Checkouts go through both
//! hosts, one is killed mid-load, and every acknowledged order still
//! settles, each paid once, each notification sent once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The shop on the production backends under `namespace`, both hosts'
/// tokens signed with one key, payments and emails going to recorders.
fn cluster_config(
    namespace: &str,
    key_file: &std::path::Path,
    provider: u16,
    mailer: u16,
) -> impl FnOnce(&Ports, &std::path::Path) -> String {
    let backends = server_backends(namespace, "127.0.0.1:9092", "lease_seconds = 3\n");
    let key_file = key_file.display().to_string();
    shop_config(move |config| {
        let config = config
            .replace(
                "[tokens]\n",
                &format!("[tokens]\nkey_file = \"{key_file}\"\n"),
            )
            .replace(
                "settings = { decline_above_cents = 500000 }",
                &format!("settings = {{ provider_url = \"http://127.0.0.1:{provider}/charges\" }}\noutbound_hosts = [\"127.0.0.1:{provider}\"]"),
            )
            .replace(
                "links = { \"agora:shop/users\" = \"identity\" }",
                &format!("links = {{ \"agora:shop/users\" = \"identity\" }}\nsettings = {{ webhook_url = \"http://127.0.0.1:{mailer}/emails\" }}\noutbound_hosts = [\"127.0.0.1:{mailer}\"]"),
            );
        backends + &config
    })
}

async fn user(base: &str, email: &str, password: &str) -> String {
    let registered = json_call(
        "POST",
        &format!("{base}/users"),
        None,
        Some(json!({"email": email, "password": password, "name": "Buyer"})),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let login = json_call(
        "POST",
        &format!("{base}/auth/login"),
        None,
        Some(json!({"email": email, "password": password})),
    )
    .await;
    login.json()["token"].as_str().unwrap().to_owned()
}

/// Rows of `sql` over the namespace's PostgreSQL.
fn count_by(sql: &str) -> BTreeMap<String, i64> {
    psql_rows(sql)
        .into_iter()
        .map(|row| (row[0].clone(), row[1].parse().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hosts_share_the_shop_and_the_survivor_takes_over_when_one_is_killed() {
    if !service_answers("PostgreSQL", "127.0.0.1:5432").await
        || !service_answers("Redis", "127.0.0.1:6379").await
        || !service_answers("Kafka", "127.0.0.1:9092").await
    {
        return;
    }
    let provider = Recorder::start(json!({"status": "approved", "reference": "psp"})).await;
    let mailer = Recorder::start(json!({"accepted": true})).await;
    let shared = tempfile::TempDir::new().unwrap();
    let key_file = shared.path().join("tokens.key");
    let ns = unique_namespace();
    let mut a = TestHost::start(cluster_config(&ns, &key_file, provider.port, mailer.port));
    let b = TestHost::start(cluster_config(&ns, &key_file, provider.port, mailer.port));
    let (url_a, url_b) = (a.url(""), b.url(""));

    // Both hosts consume: the leases are shared out.
    let holders = format!(
        "SELECT count(DISTINCT holder) FROM \"{ns}\".consumer_offsets WHERE holder IS NOT NULL"
    );
    eventually(
        "both hosts to hold leases",
        Duration::from_secs(20),
        || async { (psql_rows(&holders)[0][0] == "2").then_some(()) },
    )
    .await;

    let admin = user(&url_a, "admin@example.com", "admin-password").await;
    let product = json_call(
        "POST",
        &format!("{url_b}/products"),
        Some(&admin),
        Some(json!({"name": "Lamp", "description": "x", "price_cents": 1200, "stock": 100000})),
    )
    .await;
    assert_eq!(product.status, 201, "{}", product.text());
    let product = product.json()["id"].as_str().unwrap().to_owned();

    // Eight buyers, each alternating between the hosts; host A dies
    // halfway. An order counts once a host acknowledged it (201).
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, &'static str)>::new()));
    let a_alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut buyers = Vec::new();
    for i in 0..8 {
        let token = user(&url_b, &format!("buyer{i}@example.com"), "correct horse").await;
        let (urls, product, acknowledged, a_alive) = (
            [(url_a.clone(), "a"), (url_b.clone(), "b")],
            product.clone(),
            acknowledged.clone(),
            a_alive.clone(),
        );
        buyers.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(6) {
                n += 1;
                let (url, host) = &urls[n % 2];
                let order = try_json(
                    "POST",
                    &format!("{url}/orders"),
                    Some(&token),
                    Some(json!({"items": [{"product_id": product, "quantity": 1}]})),
                )
                .await;
                match order {
                    Ok(order) if order.status == 201 => {
                        let id = order.json()["id"].as_str().unwrap().to_owned();
                        acknowledged.lock().unwrap().push((id, host));
                    }
                    // Host A is being killed: its unanswered orders were
                    // never acknowledged.
                    _ if *host == "a" && !a_alive.load(std::sync::atomic::Ordering::SeqCst) => {}
                    Ok(order) => panic!(
                        "host {host} refused an order: {} {}",
                        order.status,
                        order.text()
                    ),
                    Err(e) => panic!("host {host} failed an order: {e}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    a_alive.store(false, std::sync::atomic::Ordering::SeqCst);
    a.crash();
    for buyer in buyers {
        buyer.await.unwrap();
    }
    let orders: Vec<(String, &str)> = acknowledged.lock().unwrap().clone();
    let by_a = orders.iter().filter(|(_, h)| *h == "a").count();
    assert!(
        by_a > 0 && orders.len() > by_a,
        "both hosts took orders: {by_a} of {}",
        orders.len()
    );

    // Every order settles through B alone, A's included: those A
    // acknowledged, and any it committed but died before answering.
    let ids: BTreeSet<String> = orders.iter().map(|(id, _)| id.clone()).collect();
    let statuses = format!("SELECT status, count(*) FROM \"{ns}_orders\".orders GROUP BY status");
    let stored = format!("SELECT id FROM \"{ns}_orders\".orders");
    let ids_in = |sql: &str| -> BTreeSet<String> {
        psql_rows(sql)
            .into_iter()
            .map(|row| row[0].clone())
            .collect()
    };
    let settled = eventually(
        "every order to be paid",
        Duration::from_secs(90),
        || async {
            let counts = count_by(&statuses);
            (counts.keys().all(|status| status == "paid")).then_some(counts)
        },
    )
    .await;
    let placed = ids_in(&stored);
    assert!(
        ids.is_subset(&placed),
        "acknowledged orders missing: {:?}",
        ids.difference(&placed).collect::<Vec<_>>()
    );
    assert!(
        placed.len() - ids.len() <= 8,
        "at most one unanswered order per buyer: {} placed, {} acknowledged, {settled:?}",
        placed.len(),
        ids.len()
    );
    let paid = ids_in(&format!(
        "SELECT order_id FROM \"{ns}_payments\".payments WHERE status = 'succeeded'"
    ));
    assert_eq!(paid, placed, "one payment per order");
    // The provider saw each order's charge under its order's idempotency
    // key (a retry after the kill may repeat a call, never a new charge).
    let charged: BTreeSet<String> = provider
        .recorded()
        .into_iter()
        .filter_map(|c| c.idempotency_key)
        .collect();
    assert_eq!(charged, paid, "charges");

    // One notification of each kind per order, each emailed under its own key.
    let notified =
        format!("SELECT kind, count(*) FROM \"{ns}_notifications\".notifications GROUP BY kind");
    let of =
        |kinds: &BTreeMap<String, i64>, kind: &str| kinds.get(kind).copied().unwrap_or(0) as usize;
    let kinds = eventually("every notification", Duration::from_secs(60), || async {
        let kinds = count_by(&notified);
        (of(&kinds, "order_received") >= placed.len()
            && of(&kinds, "payment_received") >= placed.len())
        .then_some(kinds)
    })
    .await;
    for kind in ["order_received", "payment_received"] {
        assert_eq!(of(&kinds, kind), placed.len(), "{kind}: {kinds:?}");
    }
    let notes: i64 = kinds.values().sum();
    let sent = eventually(
        "every email to be sent",
        Duration::from_secs(30),
        || async {
            let keys: BTreeSet<String> = mailer
                .recorded()
                .into_iter()
                .filter_map(|e| e.idempotency_key)
                .collect();
            (keys.len() as i64 >= notes).then_some(keys)
        },
    )
    .await;
    assert_eq!(sent.len() as i64, notes, "one email key per notification");

    // The survivor holds every lease now.
    eventually("B to hold every lease", Duration::from_secs(20), || async {
        (psql_rows(&holders)[0][0] == "1").then_some(())
    })
    .await;
    let unheld = psql_rows(&format!(
        "SELECT count(*) FROM \"{ns}\".consumer_offsets WHERE holder IS NULL OR expires < now()"
    ));
    assert_eq!(unheld[0][0], "0", "no partition left behind");
    drop(b);
}
