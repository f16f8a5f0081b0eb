//! The shop through an outage of Kafka: for 30 s under load the broker is
//! unreachable (a proxy in front of a broker of this test's own is cut).
//! Checkouts are still acknowledged, their events held in the outbox; when
//! the broker returns the relay and the consumers resume, and every order
//! settles.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The test broker `scripts/services` installs.
fn tansu() -> PathBuf {
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/tansu");
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("tansu"))
        .find(|p| p.exists())
        .unwrap_or(home)
}

/// A broker of this test's own, reached (and advertised) through `proxy`.
struct Broker(Child);

impl Broker {
    async fn start(port: u16, proxy: u16) -> Broker {
        let child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
            ])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{proxy}"),
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu (scripts/services installs it)");
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tansu did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Broker(child)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_30_second_broker_outage_under_load_loses_no_checkout() {
    if !service_answers("PostgreSQL", "127.0.0.1:5432").await
        || !service_answers("Redis", "127.0.0.1:6379").await
        || !service_answers("Kafka", "127.0.0.1:9092").await
    {
        return;
    }
    let port = free_port();
    let outage = Outage::start(&format!("127.0.0.1:{port}")).await;
    let _broker = Broker::start(port, outage.port).await;
    let ns = unique_namespace();
    let backends = server_backends(&ns, &format!("127.0.0.1:{}", outage.port), "");
    let host = TestHost::start(shop_config(move |c| backends + &c));

    let mut token = String::new();
    for (email, password) in [
        ("admin@example.com", "admin-password"),
        ("buyer@example.com", "correct horse"),
    ] {
        let signup = json_call(
            "POST",
            &host.url("/users"),
            None,
            Some(json!({"email": email, "name": "B", "password": password})),
        )
        .await;
        assert_eq!(signup.status, 201, "{}", signup.text());
        let login = json_call(
            "POST",
            &host.url("/auth/login"),
            None,
            Some(json!({"email": email, "password": password})),
        )
        .await;
        token = login.json()["token"].as_str().unwrap().to_owned();
        if email.starts_with("admin") {
            let body =
                json!({"name": "Lamp", "description": "d", "price_cents": 100, "stock": 1_000_000});
            let created = json_call("POST", &host.url("/products"), Some(&token), Some(body)).await;
            assert_eq!(created.status, 201, "{}", created.text());
        }
    }
    let product = get(&host.url("/products")).await.json()["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Checkouts before (3 s), during (30 s) and after (3 s) the outage, by
    // four buyers at once: every one must be acknowledged.
    let mut acknowledged = BTreeMap::new();
    for (phase, seconds) in [("before", 3), ("during", 30), ("after", 3)] {
        match phase {
            "during" => outage.cut(),
            "after" => outage.restore(),
            _ => {}
        }
        let until = Instant::now() + Duration::from_secs(seconds);
        let buyers: Vec<_> = (0..4)
            .map(|_| {
                let (url, token, product) = (host.url("/orders"), token.clone(), product.clone());
                tokio::spawn(async move {
                    let mut ids = Vec::new();
                    while Instant::now() < until {
                        let body = json!({"items": [{"product_id": product, "quantity": 1}]});
                        let reply = json_call("POST", &url, Some(&token), Some(body)).await;
                        assert_eq!(reply.status, 201, "{phase}: {}", reply.text());
                        ids.push(reply.json()["id"].as_str().unwrap().to_owned());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    ids
                })
            })
            .collect();
        for buyer in buyers {
            for id in buyer.await.unwrap() {
                acknowledged.insert(id, phase);
            }
        }
    }
    let during = acknowledged.values().filter(|p| **p == "during").count();
    assert!(
        during > 100,
        "checkouts went on during the outage: {during}"
    );

    // Everything resumes: every order is paid, those of the outage too.
    let statuses = format!("SELECT status, count(*) FROM \"{ns}_orders\".orders GROUP BY status");
    let settled = eventually(
        "every order to be paid",
        Duration::from_secs(120),
        || async {
            let rows = psql_rows(&statuses);
            (rows.len() == 1 && rows[0][0] == "paid").then_some(rows)
        },
    )
    .await;
    assert_eq!(settled[0][1], acknowledged.len().to_string(), "{settled:?}");
    let paid = psql_rows(&format!(
        "SELECT count(*) FROM \"{ns}_payments\".payments WHERE status = 'succeeded'"
    ));
    assert_eq!(
        paid[0][0],
        acknowledged.len().to_string(),
        "one payment per order"
    );
    let pending_outbox = psql_rows(&format!("SELECT count(*) FROM \"{ns}\".outbox"));
    assert_eq!(pending_outbox[0][0], "0", "the outbox drained");
}
