//! The gateway attacked through real clients: other spellings of protected
//! paths, login guessing spread over tokens, addresses and accounts, and a
//! component minting tokens it was not allowed to.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One window for a whole test: at this length no window boundary can fall
/// inside it (the next is in 2033), so counts never reset halfway.
const ONE_WINDOW: &str = "1000000000";

/// The response header that says what the gateway's cache did.
const CACHE_HEADER: &str = "x-agora-cache";

/// Sends one request exactly as written (the target is not parsed or
/// cleaned up by any client library) from the loopback address `from`.
async fn raw(
    from: Ipv4Addr,
    port: u16,
    method: &str,
    target: &str,
    token: Option<&str>,
    body: &str,
) -> Reply {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let mut stream = socket
        .connect((Ipv4Addr::LOCALHOST, port).into())
        .await
        .unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n{auth}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.unwrap();
    parse_response(&bytes)
}

fn parse_response(bytes: &[u8]) -> Reply {
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head")
        + 4;
    let head = std::str::from_utf8(&bytes[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut map = http::HeaderMap::new();
    let mut chunked = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').unwrap();
        let name: http::HeaderName = name.trim().parse().unwrap();
        chunked |= name == http::header::TRANSFER_ENCODING && value.contains("chunked");
        map.append(name, value.trim().parse().unwrap());
    }
    let mut body = bytes[split..].to_vec();
    if chunked {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers: map,
        body,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                .unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The probe with an admin-only `PUT /probe/kv/...`, and leave to issue
/// `admin` tokens so the test can hold one.
fn probe_with_admin_only_writes(ports: &Ports, _: &std::path::Path) -> String {
    standard_config(ports, &component("probe"))
        .replace("issues_roles = [\"tester\"]", "issues_roles = [\"tester\", \"admin\"]")
        .replace(
            "retry = {",
            "auth = [{ prefix = \"/probe/kv\", methods = [\"PUT\"], roles = [\"admin\"] }]\nretry = {",
        )
}

async fn probe_token(host: &TestHost, roles: &[&str]) -> String {
    let issued = post_json(
        &host.url("/probe/token-as"),
        &json!({"subject": "someone", "roles": roles}),
    )
    .await;
    assert_eq!(issued.status, 201, "{}", issued.text());
    issued.json()["token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_spelling_of_a_path_escapes_its_auth_rule() {
    let host = TestHost::start(probe_with_admin_only_writes);
    let port = host.ports.public;
    let tester = probe_token(&host, &["tester"]).await;
    let spellings = [
        "/probe/kv/k",
        "/probe//kv/k",
        "//probe/kv/k",
        "/probe/kv//k",
        "/probe/kv/k/",
        "/probe/./kv/k",
        "/probe/x/../kv/k",
        "/hello/../probe/kv/k",
        "/../probe/kv/k",
        "/probe/%2E/kv/k",
        "/probe/x/%2e%2E/kv/k",
        "/probe/x/.%2e/kv/k",
        "/probe/%6Bv/k",
        "/probe/%6bv/k",
        "/%70robe/kv/k",
    ];
    for target in spellings {
        let anonymous = raw(LOOPBACK, port, "PUT", target, None, "stolen").await;
        assert_eq!(
            (anonymous.status, anonymous.error_code().as_str()),
            (401, "unauthorized"),
            "{target}: {}",
            anonymous.text()
        );
        let customer = raw(LOOPBACK, port, "PUT", target, Some(&tester), "stolen").await;
        assert_eq!(
            (customer.status, customer.error_code().as_str()),
            (403, "forbidden"),
            "{target}: {}",
            customer.text()
        );
    }
    // What has no single meaning is refused before any rule or component.
    for target in [
        "/probe%2Fkv/k",
        "/probe/kv%2fk",
        "/probe/kv/%2F",
        "/probe/kv/%zz",
        "/probe/kv/k%",
        "/probe/kv/%FF",
    ] {
        let refused = raw(LOOPBACK, port, "PUT", target, Some(&tester), "stolen").await;
        assert_eq!(
            (refused.status, refused.error_code().as_str()),
            (400, "invalid_path"),
            "{target}: {}",
            refused.text()
        );
    }
    // Nothing was written by any of them.
    assert_eq!(get(&host.url("/probe/kv/k")).await.status, 404);

    // The component is handed the path the gateway decided on: another
    // spelling reaches the same handler with the same parameter.
    let admin = probe_token(&host, &["admin"]).await;
    let written = raw(
        LOOPBACK,
        port,
        "PUT",
        "/probe//kv/./%6B/",
        Some(&admin),
        "mine",
    )
    .await;
    assert_eq!(written.status, 204, "{}", written.text());
    assert_eq!(
        get(&host.url("/probe/kv/k")).await.json(),
        json!({"value": "mine"})
    );
    // A parameter is decoded once, and `+` in a path is a plus.
    let plus = raw(
        LOOPBACK,
        port,
        "PUT",
        "/probe/kv/a+b%2Bc%2520",
        Some(&admin),
        "plus",
    )
    .await;
    assert_eq!(plus.status, 204, "{}", plus.text());
    assert_eq!(
        get(&host.url("/probe/kv/a%2Bb%2Bc%2520")).await.json(),
        json!({"value": "plus"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_spelling_of_a_shop_path_escapes_its_auth_rule() {
    let host = TestHost::start(shop_config(|c| c));
    let port = host.ports.public;
    let admin = user(&host, "admin@example.com", "admin-password").await;
    let customer = user(&host, "c@example.com", "customer-password").await;
    let product = json!({"name": "Stolen", "price_cents": 1, "stock": 1}).to_string();
    for target in [
        "/products",
        "//products",
        "/products/",
        "/./products",
        "/products/.",
        "/orders/../products",
        "/%2e%2E/products",
        "/cart/%2E%2E/products",
        "/%70roducts",
        "/%70RODUCTS/../products",
    ] {
        let anonymous = raw(LOOPBACK, port, "POST", target, None, &product).await;
        assert_eq!(anonymous.status, 401, "{target}: {}", anonymous.text());
        let refused = raw(LOOPBACK, port, "POST", target, Some(&customer), &product).await;
        assert_eq!(refused.status, 403, "{target}: {}", refused.text());
    }
    for target in ["/products%2F", "/products/%2f", "/products/%"] {
        let refused = raw(LOOPBACK, port, "POST", target, Some(&customer), &product).await;
        assert_eq!(refused.status, 400, "{target}: {}", refused.text());
    }
    for target in [
        "/orders",
        "//orders",
        "/orders/",
        "/%6Frders",
        "/products/../orders",
        "/users/me",
        "/users//me",
        "/users/./me",
        "/users/%6De",
    ] {
        let anonymous = raw(LOOPBACK, port, "GET", target, None, "").await;
        assert_eq!(
            (anonymous.status, anonymous.error_code().as_str()),
            (401, "unauthorized"),
            "{target}: {}",
            anonymous.text()
        );
    }
    let listed = get(&host.url("/products")).await.json();
    assert_eq!(listed["total"], 0, "no product was created: {listed}");

    // The admin's request, spelt oddly, is the same request.
    let created = raw(
        LOOPBACK,
        port,
        "POST",
        "//products/",
        Some(&admin),
        &product,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(get(&host.url("/products")).await.json()["total"], 1);
}

/// Logs in as `email` with `password` from `from`, carrying `token` if given.
async fn login(
    host: &TestHost,
    from: Ipv4Addr,
    token: Option<&str>,
    email: &str,
    password: &str,
) -> Reply {
    let body = json!({"email": email, "password": password}).to_string();
    raw(from, host.ports.public, "POST", "/auth/login", token, &body).await
}

async fn register(host: &TestHost, email: &str, password: &str) {
    let body = json!({"email": email, "password": password, "name": "N"}).to_string();
    let created = raw(LOOPBACK, host.ports.public, "POST", "/users", None, &body).await;
    assert_eq!(created.status, 201, "{}", created.text());
}

/// Registers and logs in; returns the token.
async fn user(host: &TestHost, email: &str, password: &str) -> String {
    register(host, email, password).await;
    let reply = login(host, LOOPBACK, None, email, password).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["token"].as_str().unwrap().to_owned()
}

fn retry_after(reply: &Reply) -> u64 {
    reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn login_attempts_are_limited_per_address_whatever_the_token() {
    let host = TestHost::start(shop_config(|c| {
        let limited = c.replace(
            "requests = 20, window_seconds = 60, per = \"address\"",
            &format!("requests = 20, window_seconds = {ONE_WINDOW}, per = \"address\""),
        );
        assert_ne!(limited, c, "the login rule is in plugins.toml");
        limited
    }));
    // Attempts 1 and 2.
    let tokens = [
        user(&host, "a@example.com", "password-a").await,
        user(&host, "b@example.com", "password-b").await,
    ];
    // Attempts 3 to 20, each with a valid token and on an account of its
    // own (so no per-account limit is reached).
    for i in 3..=20 {
        let token = &tokens[i % 2];
        let reply = login(
            &host,
            LOOPBACK,
            Some(token),
            &format!("guess{i}@example.com"),
            "x",
        )
        .await;
        assert_error(&reply, 401, "invalid_credentials");
    }
    for token in [Some(tokens[0].as_str()), Some(tokens[1].as_str()), None] {
        let reply = login(&host, LOOPBACK, token, "guess21@example.com", "x").await;
        assert_error(&reply, 429, "rate_limited");
        assert!(retry_after(&reply) > 0);
        // Not even the right password gets through from this address now.
        let reply = login(&host, LOOPBACK, token, "a@example.com", "password-a").await;
        assert_error(&reply, 429, "rate_limited");
    }
    // The count is this address's: another client is not shut out.
    let other = Ipv4Addr::new(127, 0, 0, 2);
    let reply = login(&host, other, None, "a@example.com", "password-a").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn login_guesses_on_one_account_are_limited_across_tokens_and_addresses() {
    let host = TestHost::start(shop_config(|c| {
        let limited = c.replace(
            "login_limit = { attempts = 10, window_seconds = 900 }",
            &format!("login_limit = {{ attempts = 10, window_seconds = {ONE_WINDOW} }}"),
        );
        assert_ne!(limited, c, "the login limit is in plugins.toml");
        limited
    }));
    register(&host, "victim@example.com", "victim-password").await;
    let attacker = user(&host, "attacker@example.com", "attacker-password").await;
    // Ten guesses, each from an address of its own, half with a token.
    for i in 1..=10u8 {
        let from = Ipv4Addr::new(127, 0, 1, i);
        let token = (i % 2 == 0).then_some(attacker.as_str());
        let reply = login(
            &host,
            from,
            token,
            "victim@example.com",
            &format!("guess {i}"),
        )
        .await;
        assert_error(&reply, 401, "invalid_credentials");
    }
    // The account is closed to guesses from anywhere, however spelt, and
    // the right password does not tell the guesser it was right.
    for (i, email) in ["victim@example.com", " VICTIM@example.com"]
        .iter()
        .enumerate()
    {
        let from = Ipv4Addr::new(127, 0, 2, i as u8 + 1);
        let reply = login(&host, from, Some(&attacker), email, "victim-password").await;
        assert_error(&reply, 429, "rate_limited");
        assert!(reply.json()["token"].is_null());
        assert!(retry_after(&reply) > 0);
        let reply = login(&host, from, None, email, "guess 11").await;
        assert_error(&reply, 429, "rate_limited");
    }
    // Other accounts are not closed by it.
    let other = Ipv4Addr::new(127, 0, 2, 9);
    let reply = login(
        &host,
        other,
        None,
        "attacker@example.com",
        "attacker-password",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_successful_login_clears_the_accounts_count() {
    let host = TestHost::start(shop_config(|c| {
        c.replace(
            "login_limit = { attempts = 10, window_seconds = 900 }",
            &format!("login_limit = {{ attempts = 3, window_seconds = {ONE_WINDOW} }}"),
        )
    }));
    register(&host, "owner@example.com", "owner-password").await;
    for round in 0..3 {
        for guess in 0..2 {
            let reply = login(
                &host,
                LOOPBACK,
                None,
                "owner@example.com",
                &format!("typo {round} {guess}"),
            )
            .await;
            assert_error(&reply, 401, "invalid_credentials");
        }
        let reply = login(&host, LOOPBACK, None, "owner@example.com", "owner-password").await;
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
    }
    // Without a success in between, the fourth attempt is one too many.
    for guess in 0..3 {
        let reply = login(
            &host,
            LOOPBACK,
            None,
            "owner@example.com",
            &format!("guess {guess}"),
        )
        .await;
        assert_error(&reply, 401, "invalid_credentials");
    }
    let reply = login(&host, LOOPBACK, None, "owner@example.com", "owner-password").await;
    assert_error(&reply, 429, "rate_limited");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_issues_only_the_roles_plugins_toml_lists_for_it() {
    let host = TestHost::standard();
    let ask = |roles: Value, ttl: Option<u64>| {
        let url = host.url("/probe/token-as");
        async move {
            post_json(
                &url,
                &json!({"subject": "mallory", "roles": roles, "ttl_seconds": ttl}),
            )
            .await
        }
    };
    for roles in [
        json!(["admin"]),
        json!(["tester", "admin"]),
        json!(["tester,admin"]),
    ] {
        let refused = ask(roles.clone(), None).await;
        assert_error(&refused, 500, "role_not_granted");
        let message = refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.contains("components.probe.issues_roles") && message.contains("admin"),
            "{roles}: {message}"
        );
        assert!(refused.json()["token"].is_null());
    }
    // Nor a token that outlives the host's own lifetime.
    let refused = ask(json!(["tester"]), Some(10_000_000)).await;
    assert_error(&refused, 500, "invalid_token_request");
    assert!(
        refused.text().contains("tokens.ttl_seconds"),
        "{}",
        refused.text()
    );
    let refused = ask(json!([]), Some(u64::MAX)).await;
    assert_error(&refused, 500, "invalid_token_request");

    // What it was given, it can issue.
    let issued = ask(json!(["tester"]), Some(60)).await;
    assert_eq!(issued.status, 201, "{}", issued.text());
    assert_eq!(issued.json()["expires_in"], 60);
    let bearer = format!("Bearer {}", issued.json()["token"].as_str().unwrap());
    let me = request(
        "GET",
        &host.url("/probe/whoami"),
        &[("authorization", &bearer)],
        vec![],
    )
    .await;
    assert_eq!(
        me.json(),
        json!({"subject": "mallory", "roles": ["tester"]})
    );
}

/// `agora check` on the standard configuration with `edit` applied.
fn check(edit: impl FnOnce(String) -> String) -> std::process::Output {
    let dir = tempfile::TempDir::new().unwrap();
    let config = standard_config(
        &Ports {
            public: 1,
            admin: 2,
        },
        &component("probe"),
    );
    let edited = edit(config.clone());
    assert_ne!(edited, config, "the edit applies");
    let path = dir.path().join("plugins.toml");
    std::fs::write(&path, edited).unwrap();
    agora(&["check", "--config", path.to_str().unwrap()])
}

#[test]
fn a_component_importing_the_issuer_without_its_grant_is_refused_at_load() {
    let out = check(|c| {
        c.replace("\"tokens-issue\", ", "")
            .replace("issues_roles = [\"tester\"]\n", "")
    });
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("component `probe` imports `agora:platform/token-issuer")
            && err.contains("`tokens-issue`"),
        "{err}"
    );
    // Issuing does not bring verifying with it, either.
    let out = check(|c| c.replace("\"tokens\", ", ""));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("imports `agora:platform/tokens@") && err.contains("`tokens`"),
        "{err}"
    );
    // Roles to issue without the grant to issue are a mistake, named.
    let out = check(|c| c.replace("\"tokens-issue\", ", ""));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("components.probe.issues_roles"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_limits_count_the_client_it_names_and_only_that() {
    let host = TestHost::start(shop_config(|c| {
        c.replace(
            "requests = 20, window_seconds = 60, per = \"address\"",
            &format!("requests = 20, window_seconds = {ONE_WINDOW}, per = \"address\""),
        )
        .replace("[host]\n", "[host]\ntrusted_proxies = [\"127.0.0.1\"]\n")
    }));
    let url = host.url("/auth/login");
    // Each on an account of its own, so no per-account limit is reached.
    let accounts = std::sync::atomic::AtomicUsize::new(0);
    let attempt = |forwarded_for: &'static str| {
        let url = url.clone();
        let n = accounts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            let body = json!({"email": format!("nobody{n}@example.com"), "password": "x"});
            request(
                "POST",
                &url,
                &[
                    ("content-type", "application/json"),
                    ("x-forwarded-for", forwarded_for),
                ],
                body.to_string().into_bytes(),
            )
            .await
        }
    };
    for _ in 0..20 {
        assert_error(&attempt("198.51.100.1").await, 401, "invalid_credentials");
    }
    assert_error(&attempt("198.51.100.1").await, 429, "rate_limited");
    // What a client writes before the proxy's entry changes nothing.
    assert_error(
        &attempt("203.0.113.50, 198.51.100.1").await,
        429,
        "rate_limited",
    );
    // Another client behind the same proxy has its own count.
    assert_error(&attempt("198.51.100.2").await, 401, "invalid_credentials");
    let log = host.logged("client=198.51.100.1").await;
    assert!(log.contains("client=198.51.100.1"), "{log}");
}

/// A pretend OpenID Connect provider: serves its JWKS (the keys of
/// `tests/fixtures/oidc` under the ids the test chooses), counts the
/// fetches, and signs tokens.
struct Provider {
    port: u16,
    /// The published key set: (kid, "rsa" | "ec").
    published: std::sync::Arc<std::sync::Mutex<Vec<(String, &'static str)>>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

const PROVIDER_ISSUER: &str = "https://id.example.test/";
const AUDIENCE: &str = "https://shop.example.test/api";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/oidc")
            .join(name),
    )
    .unwrap()
}

impl Provider {
    async fn start(keys: &[(&str, &'static str)]) -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let published = std::sync::Arc::new(std::sync::Mutex::new(
            keys.iter()
                .map(|(k, t)| (k.to_string(), *t))
                .collect::<Vec<_>>(),
        ));
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let public: Value = serde_json::from_slice(&fixture("public-keys.json")).unwrap();
        let (served, counted) = (published.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (served, counted, public) = (served.clone(), counted.clone(), public.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let keys: Vec<Value> = served
                            .lock()
                            .unwrap()
                            .iter()
                            .map(|(kid, kind)| {
                                let mut key = public[*kind].clone();
                                key["kid"] = json!(kid);
                                key
                            })
                            .collect();
                        let body = json!({ "keys": keys }).to_string();
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Provider {
            port,
            published,
            fetches,
        }
    }

    fn fetched(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn publish(&self, kid: &str, kind: &'static str) {
        self.published.lock().unwrap().push((kid.to_owned(), kind));
    }

    /// plugins.toml's table for this provider, as `pretend`.
    fn table(&self) -> String {
        format!(
            r#"
[tokens.trusted_issuers.pretend]
issuer = "{PROVIDER_ISSUER}"
audience = "{AUDIENCE}"
jwks_url = "http://127.0.0.1:{}/.well-known/jwks.json"
roles_claim = "https://shop.example.test/roles"
allowed_roles = ["admin"]
default_roles = ["customer"]
"#,
            self.port
        )
    }
}

/// A token signed with the fixture key `kind` ("rsa": RS256, "ec": ES256)
/// under the key id `kid`, with `claims` over the defaults.
fn provider_token(kind: &str, kid: &str, claims: Value) -> String {
    let (algorithm, key) = match kind {
        "rsa" => (
            jsonwebtoken::Algorithm::RS256,
            jsonwebtoken::EncodingKey::from_rsa_pem(&fixture("rsa.pem")).unwrap(),
        ),
        _ => (
            jsonwebtoken::Algorithm::ES256,
            jsonwebtoken::EncodingKey::from_ec_pem(&fixture("ec.pem")).unwrap(),
        ),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut all = json!({
        "iss": PROVIDER_ISSUER,
        "aud": AUDIENCE,
        "sub": "google-oauth2|1001",
        "iat": now,
        "exp": now + 600,
    });
    for (name, value) in claims.as_object().unwrap() {
        all[name] = value.clone();
    }
    let mut header = jsonwebtoken::Header::new(algorithm);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &all, &key).unwrap()
}

async fn get_as(url: &str, token: &str) -> Reply {
    request(
        "GET",
        url,
        &[("authorization", &format!("Bearer {token}"))],
        Vec::new(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_providers_users_sign_in_get_a_record_and_only_the_roles_allowed() {
    let provider = Provider::start(&[("rsa-1", "rsa"), ("ec-1", "ec")]).await;
    let table = provider.table();
    let host = TestHost::start(shop_config(move |c| c + &table));
    let me = host.url("/users/me");

    // RS256: the user is `pretend:<sub>` with a record made on first use.
    let alice = provider_token(
        "rsa",
        "rsa-1",
        json!({"email": "Alice@Example.test", "name": "Alice", "email_verified": true}),
    );
    let profile = get_as(&me, &alice).await;
    assert_eq!(profile.status, 200, "{}", profile.text());
    assert_eq!(profile.json()["id"], "pretend:google-oauth2|1001");
    assert_eq!(profile.json()["email"], "alice@example.test");
    assert_eq!(profile.json()["name"], "Alice");
    assert_eq!(profile.json()["roles"], json!(["customer"]));
    // The record is the user's own: renaming it sticks.
    let renamed = json_call(
        "PATCH",
        &me,
        Some(&alice),
        Some(json!({"name": "Alice A."})),
    )
    .await;
    assert_eq!(renamed.json()["name"], "Alice A.", "{}", renamed.text());
    assert_eq!(get_as(&me, &alice).await.json()["name"], "Alice A.");

    // ES256, another user; a provider's role is believed only if allowed.
    let bob = provider_token(
        "ec",
        "ec-1",
        json!({"sub": "bob", "https://shop.example.test/roles": ["admin", "root"]}),
    );
    let profile = get_as(&me, &bob).await;
    assert_eq!(profile.status, 200, "{}", profile.text());
    assert_eq!(profile.json()["id"], "pretend:bob");
    assert_eq!(profile.json()["roles"], json!(["customer", "admin"]));
    let product = json!({"name": "Kettle", "price_cents": 2500, "stock": 3});
    let created = json_call(
        "POST",
        &host.url("/products"),
        Some(&bob),
        Some(product.clone()),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let not_admin = json_call(
        "POST",
        &host.url("/products"),
        Some(&alice),
        Some(product.clone()),
    )
    .await;
    assert_error(&not_admin, 403, "forbidden");

    // A local account with the provider user's email stays the local user's.
    let local = user(&host, "alice@example.test", "correct horse").await;
    let local_me = get_as(&me, &local).await.json();
    assert_ne!(local_me["id"], "pretend:google-oauth2|1001");
    assert_eq!(get_as(&me, &alice).await.json()["name"], "Alice A.");

    // Refused: another audience, expired, an untrusted issuer, a key the
    // provider does not have, a subject that cannot be a user id, and the
    // provider's public key passed off as an HS256 secret.
    for (token, code) in [
        (
            provider_token("rsa", "rsa-1", json!({"aud": "someone-else"})),
            "invalid_token",
        ),
        (
            provider_token("rsa", "rsa-1", json!({"exp": 1_000_000})),
            "token_expired",
        ),
        (
            provider_token("rsa", "rsa-1", json!({"iss": "https://evil.example.test/"})),
            "invalid_token",
        ),
        (provider_token("ec", "rsa-1", json!({})), "invalid_token"),
        (
            provider_token("rsa", "rsa-1", json!({"sub": "has space"})),
            "invalid_token",
        ),
    ] {
        assert_error(&get_as(&me, &token).await, 401, code);
    }
    let public_pem = fixture("public-keys.json");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &json!({"iss": PROVIDER_ISSUER, "aud": AUDIENCE, "sub": "bob", "exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    assert_error(&get_as(&me, &confused).await, 401, "invalid_token");

    // The keys were fetched once for all of that.
    assert_eq!(provider.fetched(), 1);

    // Unknown key ids fetch the set again, at most once per 10 s: a key the
    // provider publishes later is found, invented ones cost nothing more.
    provider.publish("ec-2", "ec");
    let carol = provider_token("ec", "ec-2", json!({"sub": "carol"}));
    eventually(
        "the rotated key to be accepted",
        Duration::from_secs(30),
        || async { (get_as(&me, &carol).await.status == 200).then_some(()) },
    )
    .await;
    let after_rotation = provider.fetched();
    for i in 0..5 {
        let invented = provider_token("ec", &format!("nope-{i}"), json!({}));
        assert_error(&get_as(&me, &invented).await, 401, "invalid_token");
    }
    assert!(
        provider.fetched() <= after_rotation + 1,
        "{}",
        provider.fetched()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_whose_keys_cannot_be_fetched_is_unavailable_not_unauthorized() {
    let table = format!(
        r#"
[tokens.trusted_issuers.down]
issuer = "{PROVIDER_ISSUER}"
audience = "{AUDIENCE}"
jwks_url = "http://127.0.0.1:{}/jwks.json"
"#,
        free_port()
    );
    let host = TestHost::start(shop_config(move |c| c + &table));
    let token = provider_token("rsa", "rsa-1", json!({}));
    assert_error(
        &get_as(&host.url("/users/me"), &token).await,
        503,
        "issuer_unavailable",
    );
    // On a public route the token is ignored, as an invalid one is.
    assert_eq!(get_as(&host.url("/products"), &token).await.status, 200);
}

/// hello and the probe, each with a response cache on part of its routes.
fn cached_probe_and_hello(ports: &Ports, _: &std::path::Path) -> String {
    standard_config(ports, &component("probe"))
        .replace(
            "routes = [\"/hello\"]",
            "routes = [\"/hello\"]\nresponse_cache = [{ prefix = \"/hello\", ttl_seconds = 600 }]",
        )
        .replace(
            "retry = {",
            "response_cache = [{ prefix = \"/probe/counted\", ttl_seconds = 600 }]\nretry = {",
        )
}

#[tokio::test(flavor = "multi_thread")]
async fn get_responses_are_cached_per_path_query_and_user_until_invalidated() {
    let host = TestHost::start(cached_probe_and_hello);
    let url = |path: &str| host.url(path);
    let cache = |reply: &Reply| reply.headers[CACHE_HEADER].to_str().unwrap().to_owned();

    let first = get(&url("/probe/counted/a")).await;
    assert_eq!(
        (first.status, cache(&first)),
        (200, "miss".into()),
        "{}",
        first.text()
    );
    assert_eq!(first.json()["calls"], 1);
    let again = get(&url("/probe/counted/a")).await;
    assert_eq!(cache(&again), "hit");
    assert_eq!(
        again.json(),
        first.json(),
        "the component was not called again"
    );
    assert!(again.headers.contains_key("age"));
    assert!(again.headers.contains_key("x-request-id"));
    // Another query is another response.
    let query = get(&url("/probe/counted/a?page=2")).await;
    assert_eq!(
        (cache(&query), query.json()["calls"].clone()),
        ("miss".into(), json!(2))
    );

    // A signed-in user has entries of their own, and the anonymous one
    // still answers the anonymous.
    let token = probe_token(&host, &[]).await;
    let mine = get_as(&url("/probe/counted/a"), &token).await;
    assert_eq!(
        (cache(&mine), mine.json()["user"].clone()),
        ("miss".into(), json!("someone"))
    );
    assert_eq!(
        cache(&get_as(&url("/probe/counted/a"), &token).await),
        "hit"
    );
    let anonymous = get(&url("/probe/counted/a")).await;
    assert_eq!(
        (cache(&anonymous), anonymous.json()["user"].clone()),
        ("hit".into(), Value::Null)
    );

    // A forged Host keeps its response to itself, whether in the header
    // or in an absolute target, and a Host that is not one is refused (a
    // space in it would otherwise reach the user's part of the key).
    let forged = request(
        "GET",
        &url("/probe/counted/h"),
        &[("host", "evil.example")],
        Vec::new(),
    )
    .await;
    assert_eq!(cache(&forged), "miss");
    let port = host.ports.public;
    let absolute = raw(
        LOOPBACK,
        port,
        "GET",
        "http://evil.example/probe/counted/h",
        None,
        "",
    )
    .await;
    assert_eq!(cache(&absolute), "hit", "the forged host's own entry");
    assert_eq!(cache(&get(&url("/probe/counted/h")).await), "miss");
    let spaced = request(
        "GET",
        &url("/probe/counted/a"),
        &[("host", &format!("127.0.0.1:{port} someone"))],
        Vec::new(),
    )
    .await;
    assert_error(&spaced, 400, "invalid_host");

    // What the component says may not be kept, is not.
    for (i, query) in [
        "cache-control=no-store",
        "cache-control=private,max-age=60",
        "cache-control=no-cache",
        "set-cookie=session%3D1",
        "vary=accept-language",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/probe/counted/refused-{i}?{query}");
        for calls in 1..=2 {
            let reply = get(&url(&path)).await;
            assert_eq!(cache(&reply), "uncached", "{query}");
            assert_eq!(reply.json()["calls"], calls, "{query}");
        }
    }
    // Writes pass by the cache.
    let posted = post_json(&url("/probe/counted/a"), &json!({})).await;
    assert!(!posted.headers.contains_key(CACHE_HEADER));

    // hello's responses are cached too, and the probe cannot drop them:
    // a component invalidates only its own.
    assert_eq!(cache(&get(&url("/hello")).await), "miss");
    let dropped = post_json(&url("/probe/invalidate"), &json!({"prefix": "/"})).await;
    assert_eq!(dropped.status, 200, "{}", dropped.text());
    assert_eq!(cache(&get(&url("/hello")).await), "hit");

    // The probe's own, by prefix: every user's and every query's.
    assert_eq!(cache(&get(&url("/probe/counted/a")).await), "miss");
    assert_eq!(cache(&get(&url("/probe/counted/b")).await), "miss");
    let dropped = post_json(
        &url("/probe/invalidate"),
        &json!({"prefix": "/probe/counted/a"}),
    )
    .await;
    assert_eq!(dropped.json()["dropped"], 1);
    let fresh = get(&url("/probe/counted/a")).await;
    assert_eq!(
        (cache(&fresh), fresh.json()["calls"].clone()),
        ("miss".into(), json!(5))
    );
    assert_eq!(cache(&get(&url("/probe/counted/b")).await), "hit");

    let metrics = scrape(&host).await;
    let series = |result: &str| {
        sample(
            &metrics,
            &format!(
                "agora_response_cache_lookups_total{{component=\"probe\",route=\"/probe\",result=\"{result}\"}}"
            ),
        )
    };
    assert_eq!(series("hit"), Some(5.0), "{metrics}");
    assert_eq!(series("miss"), Some(8.0), "{metrics}");
    assert_eq!(series("uncached"), Some(10.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_catalog_drops_its_cached_products_when_one_changes() {
    let host = TestHost::start(shop_config(|c| c));
    let admin = user(&host, "admin@example.com", "admin password").await;
    let created = json_call(
        "POST",
        &host.url("/products"),
        Some(&admin),
        Some(json!({"name": "Teapot", "price_cents": 1200, "stock": 5})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let product = host.url(&format!("/products/{id}"));
    let cache = |reply: &Reply| reply.headers[CACHE_HEADER].to_str().unwrap().to_owned();
    assert_eq!(cache(&get(&product).await), "miss");
    assert_eq!(cache(&get(&host.url("/products")).await), "miss");
    let hit = get(&product).await;
    assert_eq!(
        (cache(&hit), hit.json()["price_cents"].clone()),
        ("hit".into(), json!(1200))
    );
    let updated = json_call(
        "PATCH",
        &product,
        Some(&admin),
        Some(json!({"price_cents": 990})),
    )
    .await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let fresh = get(&product).await;
    assert_eq!(
        (cache(&fresh), fresh.json()["price_cents"].clone()),
        ("miss".into(), json!(990))
    );
    let listing = get(&host.url("/products")).await;
    assert_eq!(cache(&listing), "miss");
    assert_eq!(
        listing.json()["items"][0]["price_cents"],
        990,
        "{}",
        listing.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_cut_short_by_a_trap_is_an_error_never_a_response_nor_a_cached_one() {
    let cut = component("hello-cut-body");
    let host = TestHost::start(move |_, _| {
        format!(
            r#"
[components.cut]
wasm = "{cut}"
routes = ["/cut"]

[components.cached-cut]
wasm = "{cut}"
routes = ["/cached-cut"]
response_cache = [{{ prefix = "/cached-cut", ttl_seconds = 600 }}]
"#,
            cut = cut.display()
        )
    });
    // The head went out before the trap: the client sees the connection
    // cut, not a short body that looks whole.
    let streamed = try_request("GET", &host.url("/cut"), &[], Vec::new()).await;
    assert!(streamed.is_err(), "{:?}", streamed.map(|r| r.text()));
    // Where the gateway reads the body to keep it, the client gets a 502,
    // and nothing is kept.
    for _ in 0..2 {
        assert_error(&get(&host.url("/cached-cut")).await, 502, "bad_gateway");
    }
    assert_eq!(get(&host.url("/healthz")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_the_guest_never_finished_is_an_error_never_a_response() {
    let unfinished = component("hello-unfinished-body");
    let host = TestHost::start(move |_, _| {
        format!(
            r#"
[components.unfinished]
wasm = "{unfinished}"
routes = ["/unfinished"]
"#,
            unfinished = unfinished.display()
        )
    });
    // Every byte it wrote went out, but it returned without `finish`: the
    // client cannot be told the response is whole.
    for _ in 0..2 {
        let answered = try_request("GET", &host.url("/unfinished"), &[], Vec::new()).await;
        assert!(answered.is_err(), "{:?}", answered.map(|r| r.text()));
    }
    assert_eq!(get(&host.url("/healthz")).await.status, 200);
}
