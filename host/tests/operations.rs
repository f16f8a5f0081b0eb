//! What operators see: Prometheus metrics on the admin listener, and the
//! console, driven in a real headless Chromium through ChromeDriver.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_failures_events_lag_and_deploys() {
    let host = TestHost::standard();
    let anonymous = get(&format!("{}/metrics", host.admin_url())).await;
    assert_eq!(anonymous.status, 401, "metrics need the admin token");

    for _ in 0..3 {
        assert_eq!(get(&host.url("/hello")).await.status, 200);
    }
    assert_eq!(get(&host.url("/probe/trap")).await.status, 500);
    assert_eq!(get(&host.url("/probe/loop")).await.status, 504);
    for payload in ["plain", "fail-always"] {
        let reply = post_json(
            &host.url("/probe/publish"),
            &json!({"topic": "test.events", "key": "k", "payload": payload}),
        )
        .await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let deployed = host
        .admin(
            "POST",
            "/components/probe/deploy",
            std::fs::read(component("probe-v2")).unwrap(),
        )
        .await;
    assert_eq!(deployed.status, 200, "{}", deployed.text());
    let refused = host
        .admin("POST", "/components/probe/deploy", b"not wasm".to_vec())
        .await;
    assert_eq!(refused.status, 422);

    // Every event handled or dead-lettered, and no lag left on any partition.
    let lag_lines = |metrics: &str| -> Vec<String> {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with(r#"agora_consumer_lag_events{subscriber="probe",topic="test.events""#)
            })
            .map(str::to_owned)
            .collect()
    };
    let metrics = eventually(
        "the dead letter in the metrics, and no lag",
        Duration::from_secs(20),
        || async {
            let metrics = scrape(&host).await;
            let lags = lag_lines(&metrics);
            let dead = sample(
                &metrics,
                r#"agora_events_dead_lettered_total{component="probe",topic="test.events"}"#,
            );
            (dead == Some(1.0) && !lags.is_empty() && lags.iter().all(|l| l.ends_with(" 0")))
                .then_some(metrics)
        },
    )
    .await;
    let expect = |series: &str, value: f64| {
        assert_eq!(
            sample(&metrics, series),
            Some(value),
            "{series} in\n{metrics}"
        );
    };
    expect(
        r#"agora_http_requests_total{component="hello",route="/hello",status="2xx"}"#,
        3.0,
    );
    expect(
        r#"agora_http_request_duration_seconds_count{component="hello",route="/hello"}"#,
        3.0,
    );
    expect(
        r#"agora_http_requests_total{component="probe",route="/probe",status="5xx"}"#,
        2.0,
    );
    expect(
        r#"agora_component_failures_total{component="probe",kind="trap"}"#,
        1.0,
    );
    expect(
        r#"agora_component_failures_total{component="probe",kind="deadline"}"#,
        1.0,
    );
    expect(
        // A wildcard grant counts as `*`: a component choosing topics
        // cannot grow the metrics without bound.
        r#"agora_events_published_total{component="probe",topic="*"}"#,
        2.0,
    );
    expect(
        r#"agora_events_delivered_total{component="probe",topic="test.events"}"#,
        1.0,
    );
    // Three attempts: two of them retries.
    expect(
        r#"agora_events_retried_total{component="probe",topic="test.events"}"#,
        2.0,
    );
    expect(
        r#"agora_deploys_total{component="probe",outcome="deployed"}"#,
        1.0,
    );
    expect(
        r#"agora_deploys_total{component="probe",outcome="refused"}"#,
        1.0,
    );
    expect(r#"agora_outbox_depth_events{component="probe"}"#, 0.0);
    expect(r#"agora_instance_slots_in_use{component="hello"}"#, 0.0);
    assert_eq!(lag_lines(&metrics).len(), 4, "one per partition");
    let instantiations = sample(
        &metrics,
        r#"agora_instantiation_duration_seconds_count{component="hello"}"#,
    )
    .unwrap();
    assert!(instantiations >= 3.0, "{metrics}");
    assert!(metrics.ends_with("# EOF\n"));

    // A rollback counts too, and the series go on across versions.
    assert_eq!(
        host.admin("POST", "/components/probe/rollback", Vec::new())
            .await
            .status,
        200
    );
    get(&host.url("/probe/version")).await;
    let metrics = scrape(&host).await;
    assert_eq!(
        sample(
            &metrics,
            r#"agora_deploys_total{component="probe",outcome="rolled_back"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            r#"agora_http_requests_total{component="probe",route="/probe",status="2xx"}"#
        ),
        Some(3.0),
        "{metrics}"
    );

    // Each statement a component asks of its database counts, once.
    let storage_calls = |metrics: &str| {
        sample(metrics, r#"agora_storage_calls_total{component="probe"}"#).unwrap_or(0.0)
    };
    let before = storage_calls(&metrics);
    assert_eq!(put(&host.url("/probe/kv/counted"), "1").await.status, 204);
    assert_eq!(get(&host.url("/probe/kv/counted")).await.status, 200);
    assert_eq!(storage_calls(&scrape(&host).await), before + 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_keeps_other_pages_and_strangers_out() {
    let host = TestHost::standard();
    let console = format!("{}/console", host.admin_url());
    // Without a session: the sign-in form, and nothing of the host.
    let page = get(&console).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains(r#"name="token""#));
    assert!(!page.text().contains("probe"), "{}", page.text());
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");

    let token = host.admin_token();
    let form = format!("token={token}");
    let origin = format!("http://127.0.0.1:{}", host.ports.admin);
    let sign_in = |origin: String, body: String| {
        let url = format!("{console}/login");
        async move {
            request(
                "POST",
                &url,
                &[
                    ("origin", &origin),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                body.into_bytes(),
            )
            .await
        }
    };
    // Another site cannot sign the operator in, or act for them.
    let forged = sign_in("http://evil.example".into(), form.clone()).await;
    assert_eq!(forged.status, 403);
    let wrong = sign_in(origin.clone(), "token=guess".into()).await;
    assert_eq!(wrong.status, 401);
    assert!(!wrong.headers.contains_key("set-cookie"));

    let signed_in = sign_in(origin.clone(), form).await;
    assert_eq!(signed_in.status, 303, "{}", signed_in.text());
    let cookie = signed_in.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let page = request("GET", &console, &[("cookie", &session)], Vec::new()).await;
    assert!(
        page.text().contains(r#"<tr data-component="probe">"#),
        "{}",
        page.text()
    );

    let rollback = format!("{console}/components/probe/rollback");
    let cross_site = request(
        "POST",
        &rollback,
        &[("cookie", &session), ("origin", "http://evil.example")],
        Vec::new(),
    )
    .await;
    assert_eq!(cross_site.status, 403);
    // Under another name (DNS rebinding), even the sign-in page is refused.
    let rebound = request(
        "GET",
        &console,
        &[("host", &format!("evil.example:{}", host.ports.admin))],
        Vec::new(),
    )
    .await;
    assert_eq!(rebound.status, 403);
    // A session is not the admin token: the API still wants the token.
    let api = request(
        "GET",
        &format!("{}/components", host.admin_url()),
        &[("cookie", &session)],
        Vec::new(),
    )
    .await;
    assert_eq!(api.status, 401);
}

/// A ChromeDriver with one headless Chromium session.
struct Browser {
    driver: Child,
    base: String,
    profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver, installed by scripts/setup)");
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            profile: tempfile::TempDir::new().unwrap(),
        };
        let status = format!("{}/status", browser.base);
        eventually("chromedriver", Duration::from_secs(20), || async {
            try_request("GET", &status, &[], Vec::new()).await.ok()
        })
        .await;
        let profile = browser.profile.path().display().to_string();
        let session = browser
            .call(
                "POST",
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--disable-dev-shm-usage", format!("--user-data-dir={profile}")]
                    }
                }}}),
            )
            .await;
        let id = session["sessionId"].as_str().expect("a session id");
        browser.base = format!("{}/session/{id}", browser.base);
        browser
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = (method == "POST").then_some(body);
        let reply = json_call(method, &format!("{}{path}", self.base), None, body).await;
        let value = reply.json()["value"].clone();
        assert_eq!(reply.status, 200, "WebDriver {method} {path}: {value}");
        value
    }

    async fn open(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call("POST", &format!("/element/{element}/click"), json!({}))
            .await;
    }

    /// The text of the first element matching `css`, once there is one
    /// (a click's navigation may still be loading).
    async fn wait_for(&self, css: &str) -> String {
        self.wait_for_text(css, "").await
    }

    /// The text of the first element matching `css` once it starts with
    /// `prefix` (the page before a click may have one of its own).
    async fn wait_for_text(&self, css: &str, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(text) = self.text_of(css).await.filter(|t| t.starts_with(prefix)) {
                return text;
            }
            if std::time::Instant::now() > deadline {
                let url = self.call("GET", "/url", json!({})).await;
                let source = self.call("GET", "/source", json!({})).await;
                panic!("no {css} starting with {prefix:?} on {url}:\n{source}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of the first element matching `css`, or None.
    async fn text_of(&self, css: &str) -> Option<String> {
        let script =
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;";
        let value = self
            .call(
                "POST",
                "/execute/sync",
                json!({"script": script, "args": [css]}),
            )
            .await;
        value.as_str().map(str::to_owned)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn in_a_browser_the_console_lists_components_replays_a_dead_letter_and_rolls_back() {
    let host = TestHost::standard();
    // No grant lets a component forge a dead letter, not even `*`.
    let forged = post_json(
        &host.url("/probe/publish"),
        &json!({"topic": "dead-letter.probe", "key": "k", "payload": "forged"}),
    )
    .await;
    assert_ne!(forged.status, 201, "{}", forged.text());
    // v1 of the probe cannot handle this payload: it is dead-lettered.
    let published = post_json(
        &host.url("/probe/publish"),
        &json!({"topic": "test.events", "key": "k", "payload": "fail-before-v2"}),
    )
    .await;
    assert_eq!(published.status, 201, "{}", published.text());
    eventually("the dead letter", Duration::from_secs(15), || async {
        let events = host
            .admin("GET", "/topics/dead-letter.probe/events", Vec::new())
            .await
            .json();
        (!events["events"].as_array().unwrap().is_empty()).then_some(())
    })
    .await;
    // The fix: v2.
    let v1 = get(&host.url("/probe/version")).await.json();
    assert_eq!(v1["version"], "v1");
    let deployed = host
        .admin(
            "POST",
            "/components/probe/deploy",
            std::fs::read(component("probe-v2")).unwrap(),
        )
        .await;
    assert_eq!(deployed.status, 200, "{}", deployed.text());

    let browser = Browser::start().await;
    let console = format!("{}/console", host.admin_url());
    browser.open(&console).await;
    browser.type_into("#token", &host.admin_token()).await;
    browser.click("#sign-in").await;
    browser.wait_for("#components").await;

    // The running components, with the versions the admin API reports.
    let components = host.admin("GET", "/components", Vec::new()).await.json();
    for c in components["components"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let shown = browser
            .text_of(&format!(
                r#"#components tr[data-component="{name}"] .version"#
            ))
            .await;
        assert_eq!(
            shown.as_deref(),
            c["version"].as_str(),
            "{name} on the page"
        );
    }
    let history = browser.text_of("#history tbody").await.unwrap();
    assert!(
        history.contains("probe") && history.contains("deployed"),
        "{history}"
    );
    let subscribers = browser.text_of("#subscribers tbody").await.unwrap();
    assert!(subscribers.contains("test.events"), "{subscribers}");

    // Replay the dead letter: v2 handles it.
    let dead = browser.text_of("#dead-letters tbody").await.unwrap();
    assert!(dead.contains("v1 cannot handle this payload"), "{dead}");
    browser.click("#dead-letters button.replay").await;
    browser.wait_for_text("#notice", "Replayed event").await;
    let received = get(&host.url("/probe/received")).await.json();
    assert!(
        received
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["payload"] == "\"fail-before-v2\""),
        "{received}"
    );
    assert_eq!(
        browser.text_of("#dead-letters .replayed").await.as_deref(),
        Some("replayed")
    );

    // Live request rates: the page's script shows a rate under load.
    let load = async {
        for _ in 0..300 {
            get(&host.url("/hello")).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let watch = eventually("a live request rate", Duration::from_secs(15), || async {
        let rate = browser.text_of(r#"[data-rate="hello /hello"]"#).await?;
        rate.parse::<f64>().ok().filter(|r| *r > 0.0)
    });
    let (_, rate) = tokio::join!(load, watch);
    assert!(rate > 0.0);

    // Roll back from the page: v1 serves again.
    browser
        .click(r#"button.rollback[data-component="probe"]"#)
        .await;
    browser.wait_for_text("#notice", "Rolled probe back").await;
    let version = get(&host.url("/probe/version")).await.json();
    assert_eq!(version["version"], "v1");
    let shown = browser
        .text_of(r#"#components tr[data-component="probe"] .version"#)
        .await;
    let running = host.admin("GET", "/components", Vec::new()).await.json();
    let probe = running["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "probe")
        .unwrap()
        .clone();
    assert_eq!(shown.as_deref(), probe["version"].as_str());
}
