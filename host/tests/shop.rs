//! The shop end to end on embedded backends, through HTTP, on the
//! repository's own plugins.toml. Every response is checked against
//! docs/openapi.json (status and body shape), which keeps it true.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Shop {
    host: TestHost,
    openapi: Value,
}

const ADMIN: (&str, &str) = ("admin@example.com", "admin-password");

impl Shop {
    async fn start() -> Shop {
        Shop::start_with(|c| c).await
    }

    async fn start_with(edit: impl FnOnce(String) -> String) -> Shop {
        let host = TestHost::start(shop_config(edit));
        let openapi = get(&host.url("/openapi.json")).await.json();
        Shop { host, openapi }
    }

    /// Calls `method path` (the route template is `template`) and checks the
    /// reply against the OpenAPI document.
    async fn call(
        &self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(b) = &bearer {
            headers.push(("authorization", b));
        }
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let reply = request(method, &self.host.url(path), &headers, body).await;
        self.conforms(method, template, &reply);
        reply
    }

    fn conforms(&self, method: &str, template: &str, reply: &Reply) {
        let operation = &self.openapi["paths"][template][method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {template} is not in openapi.json"
        );
        let documented = &operation["responses"][reply.status.to_string()];
        assert!(
            documented.is_object(),
            "{method} {template} answered {} ({}), which openapi.json does not document",
            reply.status,
            reply.text()
        );
        let media = reply
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or("");
        if media != "application/json" {
            assert!(
                documented["content"][media].is_object(),
                "{method} {template} {} answered {media}, which openapi.json does not document",
                reply.status
            );
            return;
        }
        let schema = &documented["content"]["application/json"]["schema"];
        if let Err(e) = check(&self.openapi, schema, &reply.json(), "$") {
            panic!(
                "{method} {template} {}: {e}\n{}",
                reply.status,
                reply.text()
            );
        }
    }

    /// POSTs a GraphQL request (`{"query": ...}`) to /graphql.
    async fn graphql(&self, token: Option<&str>, body: Value) -> Reply {
        self.call("POST", "/graphql", "/graphql", token, Some(body))
            .await
    }

    /// How often `caller` has called `function` (`agora:shop/inventory#lookup`)
    /// of `callee`, from the host's metrics.
    async fn link_calls(&self, caller: &str, callee: &str, function: &str) -> f64 {
        let series = format!(
            "agora_link_calls_total{{caller=\"{caller}\",callee=\"{callee}\",function=\"{function}\"}}"
        );
        sample(&scrape(&self.host).await, &series).unwrap_or(0.0)
    }

    async fn register(&self, email: &str, password: &str, name: &str) -> Reply {
        let body = json!({"email": email, "password": password, "name": name});
        self.call("POST", "/users", "/users", None, Some(body))
            .await
    }

    async fn login(&self, email: &str, password: &str) -> Reply {
        let body = json!({"email": email, "password": password});
        self.call("POST", "/auth/login", "/auth/login", None, Some(body))
            .await
    }

    /// Registers and logs in; returns (user id, token).
    async fn user(&self, email: &str) -> (String, String) {
        let password = if email == ADMIN.0 {
            ADMIN.1
        } else {
            "correct horse"
        };
        let registered = self.register(email, password, "Someone").await;
        assert_eq!(registered.status, 201, "{}", registered.text());
        let token = self.login(email, password).await.json()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        (registered.json()["id"].as_str().unwrap().to_owned(), token)
    }

    async fn product(&self, admin: &str, name: &str, price_cents: i64, stock: i64) -> String {
        let body = json!({"name": name, "description": "for tests", "price_cents": price_cents, "stock": stock});
        let created = self
            .call("POST", "/products", "/products", Some(admin), Some(body))
            .await;
        assert_eq!(created.status, 201, "{}", created.text());
        created.json()["id"].as_str().unwrap().to_owned()
    }

    /// Checks the cart out and waits for its order to be paid; returns the
    /// order's id.
    async fn checkout_paid(&self, token: &str) -> String {
        let order = self
            .call("POST", "/checkout", "/checkout", Some(token), None)
            .await;
        assert_eq!(order.status, 201, "{}", order.text());
        let id = order.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(self.order_settles(token, &id).await, "paid");
        id
    }

    async fn add_to_cart(&self, token: &str, product: &str, quantity: u32) {
        let body = json!({"product_id": product, "quantity": quantity});
        let added = self
            .call(
                "POST",
                "/cart/items",
                "/cart/items",
                Some(token),
                Some(body),
            )
            .await;
        assert_eq!(added.status, 200, "{}", added.text());
    }

    async fn place_order(&self, token: &str, product: &str, quantity: u32) -> Reply {
        let body = json!({"items": [{"product_id": product, "quantity": quantity}]});
        self.call("POST", "/orders", "/orders", Some(token), Some(body))
            .await
    }

    async fn payment(&self, token: &str, order_id: &str) -> Reply {
        let path = format!("/payments/{order_id}");
        self.call("GET", "/payments/{order_id}", &path, Some(token), None)
            .await
    }

    async fn stock(&self, product: &str) -> i64 {
        let path = format!("/products/{product}");
        self.call("GET", "/products/{id}", &path, None, None)
            .await
            .json()["stock"]
            .as_i64()
            .unwrap()
    }

    async fn order(&self, token: &str, id: &str) -> Value {
        let path = format!("/orders/{id}");
        self.call("GET", "/orders/{id}", &path, Some(token), None)
            .await
            .json()
    }

    async fn order_settles(&self, token: &str, id: &str) -> String {
        eventually("the order to settle", Duration::from_secs(20), || async {
            let status = self.order(token, id).await["status"]
                .as_str()
                .unwrap()
                .to_owned();
            (status != "pending").then_some(status)
        })
        .await
    }

    /// Waits until `component` has handled every event of `topic`.
    async fn caught_up(&self, topic: &str, component: &str) {
        let progress = format!("/topics/{topic}/subscribers/{component}");
        eventually(
            "the subscriber to catch up",
            Duration::from_secs(20),
            || async {
                let partitions = self.host.admin("GET", &progress, Vec::new()).await.json()
                    ["partitions"]
                    .clone();
                let caught_up = partitions
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|p| p["caught_up"] == true);
                caught_up.then_some(())
            },
        )
        .await;
    }

    async fn notifications(&self, token: &str) -> Vec<Value> {
        let reply = self
            .call("GET", "/notifications", "/notifications", Some(token), None)
            .await;
        reply.json().as_array().unwrap().clone()
    }

    async fn notification_kinds(&self, token: &str, count: usize) -> Vec<String> {
        eventually("the notifications", Duration::from_secs(20), || async {
            let all = self.notifications(token).await;
            let kinds: Vec<String> = all
                .iter()
                .map(|n| n["kind"].as_str().unwrap().to_owned())
                .collect();
            (kinds.len() >= count).then_some(kinds)
        })
        .await
    }
}

/// A small JSON-schema check: types, nullability, required and unknown
/// properties, items, enums and `$ref`s.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        return check(doc, &doc["components"]["schemas"][name], value, at);
    }
    if value.is_null() {
        return if schema["nullable"] == true || schema.is_null() {
            Ok(())
        } else {
            Err(format!("{at} is null"))
        };
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(value) {
            return Err(format!("{at} = {value} is not one of {options:?}"));
        }
    }
    let fits = match schema["type"].as_str() {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some(other) => return Err(format!("unknown schema type {other}")),
    };
    if !fits {
        return Err(format!("{at} = {value} is not of type {}", schema["type"]));
    }
    if let Some(object) = value.as_object() {
        let properties = schema["properties"].as_object();
        for required in schema["required"].as_array().into_iter().flatten() {
            let key = required.as_str().unwrap();
            if !object.contains_key(key) {
                return Err(format!("{at}.{key} is missing"));
            }
        }
        for (key, item) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(property) => check(doc, property, item, &format!("{at}.{key}"))?,
                None if schema["additionalProperties"] == false => {
                    return Err(format!("{at}.{key} is not documented"));
                }
                None => {
                    if schema["additionalProperties"].is_object() {
                        check(
                            doc,
                            &schema["additionalProperties"],
                            item,
                            &format!("{at}.{key}"),
                        )?;
                    }
                }
            }
        }
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            check(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purchase_is_paid_and_the_customer_is_told() {
    let shop = Shop::start().await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let (customer_id, customer) = shop.user("carol@example.com").await;
    let me = shop
        .call("GET", "/users/me", "/users/me", Some(&customer), None)
        .await
        .json();
    assert_eq!(
        (me["id"].as_str(), me["roles"].clone()),
        (Some(customer_id.as_str()), json!(["customer"]))
    );
    let admin_me = shop
        .call("GET", "/users/me", "/users/me", Some(&admin), None)
        .await
        .json();
    assert_eq!(admin_me["roles"], json!(["customer", "admin"]));

    let lamp = shop.product(&admin, "Desk lamp", 2500, 5).await;
    let mug = shop.product(&admin, "Mug", 900, 10).await;
    let found = shop
        .call("GET", "/products", "/products?q=LAMP", None, None)
        .await
        .json();
    assert_eq!(
        (found["total"].as_i64(), found["items"][0]["id"].as_str()),
        (Some(1), Some(lamp.as_str()))
    );

    for (product, quantity) in [(&lamp, 2), (&mug, 1), (&mug, 2)] {
        shop.add_to_cart(&customer, product, quantity).await;
    }
    let cart = shop
        .call("GET", "/cart", "/cart", Some(&customer), None)
        .await
        .json();
    assert_eq!(cart["total_cents"], 2 * 2500 + 3 * 900);

    let order = shop
        .call("POST", "/checkout", "/checkout", Some(&customer), None)
        .await;
    assert_eq!(order.status, 201, "{}", order.text());
    let order = order.json();
    assert_eq!(
        (order["status"].as_str(), order["total_cents"].as_i64()),
        (Some("pending"), Some(7700))
    );
    assert_eq!(order["currency"], "USD");
    let order_id = order["id"].as_str().unwrap().to_owned();
    let emptied = shop
        .call("GET", "/cart", "/cart", Some(&customer), None)
        .await
        .json();
    assert_eq!(emptied["items"], json!([]));

    assert_eq!(shop.order_settles(&customer, &order_id).await, "paid");
    assert_eq!((shop.stock(&lamp).await, shop.stock(&mug).await), (3, 7));
    let payment = shop.payment(&customer, &order_id).await.json();
    assert_eq!(
        (payment["status"].as_str(), payment["amount_cents"].as_i64()),
        (Some("succeeded"), Some(7700))
    );

    let mut kinds = shop.notification_kinds(&customer, 3).await;
    kinds.sort();
    assert_eq!(kinds, ["order_received", "payment_received", "welcome"]);
    let notes = shop.notifications(&customer).await;
    assert!(notes
        .iter()
        .all(|n| n["recipient"] == "carol@example.com" && n["status"] == "logged"));

    let listed = shop
        .call("GET", "/orders", "/orders", Some(&customer), None)
        .await
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let graphql = json!({"query": format!("{{ orders {{ id status totalCents items {{ productId quantity unitPriceCents }} }} order(id: \"{order_id}\") {{ status }} }}")});
    let answer = shop
        .call(
            "POST",
            "/graphql",
            "/graphql",
            Some(&customer),
            Some(graphql),
        )
        .await
        .json();
    assert_eq!(answer["data"]["order"]["status"], "paid");
    assert_eq!(answer["data"]["orders"][0]["totalCents"], 7700);
    assert_eq!(
        answer["data"]["orders"][0]["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declined_payment_cancels_the_order_and_restores_stock() {
    let shop = Shop::start().await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let (_, customer) = shop.user("dave@example.com").await;
    let piano = shop.product(&admin, "Grand piano", 600_000, 2).await;
    let order = shop.place_order(&customer, &piano, 1).await;
    assert_eq!(order.status, 201, "{}", order.text());
    let order_id = order.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        shop.stock(&piano).await,
        1,
        "reserved while the payment runs"
    );

    assert_eq!(shop.order_settles(&customer, &order_id).await, "cancelled");
    // Orders marks the order cancelled, then asks catalog for the stock back:
    // two services, so a reader may see the first step before the second.
    eventually(
        "the stock to come back",
        Duration::from_secs(20),
        || async { (shop.stock(&piano).await == 2).then_some(()) },
    )
    .await;
    let payment = shop.payment(&customer, &order_id).await.json();
    assert_eq!(payment["status"], "failed");
    assert!(payment["reason"].as_str().unwrap().contains("500000"));
    let kinds = shop.notification_kinds(&customer, 3).await;
    assert!(kinds.contains(&"payment_failed".to_owned()), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_checkouts_against_ten_in_stock_sell_exactly_ten() {
    let shop = Shop::start().await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let item = shop.product(&admin, "Limited edition", 1000, 10).await;
    let mut customers = Vec::new();
    for i in 0..5 {
        customers.push(shop.user(&format!("buyer{i}@example.com")).await.1);
    }
    let url: &'static str = shop.host.url("/orders").leak();
    let attempts: Vec<_> = (0..50)
        .map(|i| {
            let bearer = format!("Bearer {}", customers[i % customers.len()]);
            let body = json!({"items": [{"product_id": item, "quantity": 1}]}).to_string();
            tokio::spawn(async move {
                request(
                    "POST",
                    url,
                    &[
                        ("authorization", &bearer),
                        ("content-type", "application/json"),
                    ],
                    body.into_bytes(),
                )
                .await
            })
        })
        .collect();
    let mut placed = Vec::new();
    let mut refused = 0;
    for attempt in attempts {
        let reply = attempt.await.unwrap();
        shop.conforms("POST", "/orders", &reply);
        match reply.status {
            201 => placed.push(reply.json()["id"].as_str().unwrap().to_owned()),
            409 => {
                assert_eq!(reply.error_code(), "insufficient_stock");
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    assert_eq!((placed.len(), refused), (10, 40));
    assert_eq!(shop.stock(&item).await, 0);
    for order in &placed {
        // Whoever placed it, an admin can read it.
        assert_eq!(shop.order_settles(&admin, order).await, "paid");
    }
    assert_eq!(
        shop.stock(&item).await,
        0,
        "never negative, and paid stock stays sold"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stock_reserved_for_an_order_never_written_comes_back_after_the_timeout() {
    // No payments: confirmed orders stay pending, holding their stock. Nor
    // graphql, which links payments. Stock is read fresh, not from the
    // gateway's cache of `/products`.
    let shop = Shop::start_with(|config| {
        let (before, rest) = config.split_once("# Charges orders.").unwrap();
        let (_, after) = rest.split_once("# Emails customers").unwrap();
        let (after, _) = after.split_once("# The whole shop as one").unwrap();
        format!("{before}# Emails customers{after}")
            .replace("orders.wasm", "orders-crash-after-reserve.wasm")
            .replace(
                "reservation_timeout_seconds = 900",
                "reservation_timeout_seconds = 2",
            )
            .replace(
                "response_cache = [{ prefix = \"/products\", ttl_seconds = 10 }]",
                "",
            )
    })
    .await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let (_, customer) = shop.user("olga@example.com").await;
    let lamp = shop.product(&admin, "Lamp", 100, 3).await;

    // Orders stops dead after reserving, as a crash there would.
    let bearer = format!("Bearer {customer}");
    let body = json!({"items": [{"product_id": lamp, "quantity": 2}]});
    let crashed = request(
        "POST",
        &shop.host.url("/orders"),
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        body.to_string().into_bytes(),
    )
    .await;
    assert_error(&crashed, 500, "component_trapped");
    assert_eq!(
        shop.stock(&lamp).await,
        1,
        "the reservation holds its stock"
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = shop
        .host
        .cli(&["deploy", "orders", component("orders").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The unconfirmed reservation expired: all three can be ordered.
    let placed = shop.place_order(&customer, &lamp, 3).await;
    assert_eq!(placed.status, 201, "{}", placed.text());
    assert_eq!(shop.stock(&lamp).await, 0);

    // A reservation its order confirmed is kept past the timeout.
    shop.caught_up("order.created", "catalog").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused = shop.place_order(&customer, &lamp, 1).await;
    assert_error(&refused, 409, "insufficient_stock");
    assert_eq!(shop.stock(&lamp).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_case_has_its_status_and_code() {
    let shop = Shop::start().await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let (_, customer) = shop.user("erin@example.com").await;

    let cases = [
        (shop.register("not-an-email", "long enough", "E").await, 400, "invalid_email"),
        (shop.register("f@example.com", "short", "F").await, 400, "weak_password"),
        (shop.register("f@example.com", "long enough", " ").await, 400, "invalid_name"),
        (shop.register("erin@example.com", "long enough", "E").await, 409, "email_taken"),
        (shop.register("ERIN@example.com", "long enough", "E").await, 409, "email_taken"),
        (shop.call("POST", "/users", "/users", None, Some(json!({"email": "g@example.com", "password": "long enough", "name": "G", "admin": true}))).await, 400, "invalid_json"),
        (shop.login("erin@example.com", "wrong password").await, 401, "invalid_credentials"),
        (shop.login("nobody@example.com", "wrong password").await, 401, "invalid_credentials"),
        (shop.call("GET", "/users/me", "/users/me", None, None).await, 401, "unauthorized"),
        (shop.call("GET", "/users/me", "/users/me", Some("not.a.token"), None).await, 401, "invalid_token"),
        (shop.call("PATCH", "/users/me", "/users/me", Some(&customer), Some(json!({"name": ""}))).await, 400, "invalid_name"),
        (shop.call("GET", "/products/{id}", "/products/nope", None, None).await, 404, "not_found"),
        (shop.call("GET", "/products", "/products?limit=0", None, None).await, 400, "bad_request"),
        (shop.call("GET", "/products", "/products?offset=x", None, None).await, 400, "bad_request"),
        (shop.call("POST", "/products", "/products", None, Some(json!({"name": "X", "price_cents": 1}))).await, 401, "unauthorized"),
        (shop.call("POST", "/products", "/products", Some(&customer), Some(json!({"name": "X", "price_cents": 1}))).await, 403, "forbidden"),
        (shop.call("POST", "/products", "/products", Some(&admin), Some(json!({"name": "", "price_cents": 1}))).await, 400, "validation_failed"),
        (shop.call("POST", "/products", "/products", Some(&admin), Some(json!({"name": "X", "price_cents": -1}))).await, 400, "validation_failed"),
        (shop.call("POST", "/products", "/products", Some(&admin), Some(json!({"name": "X", "price_cents": 1, "stock": -5}))).await, 400, "validation_failed"),
        (shop.call("POST", "/products", "/products", Some(&admin), Some(json!({"name": "X", "price_cents": "1"}))).await, 400, "invalid_json"),
        (shop.call("PATCH", "/products/{id}", "/products/nope", Some(&admin), Some(json!({"stock": 1}))).await, 404, "not_found"),
        (shop.call("POST", "/orders", "/orders", Some(&customer), Some(json!({"items": []}))).await, 400, "empty_order"),
        (shop.call("POST", "/orders", "/orders", Some(&customer), Some(json!({"items": [{"product_id": "nope", "quantity": 1}]}))).await, 404, "unknown_product"),
        (shop.call("POST", "/orders", "/orders", Some(&customer), Some(json!({"items": [{"product_id": "nope", "quantity": 0}]}))).await, 400, "validation_failed"),
        (shop.call("POST", "/orders", "/orders", None, Some(json!({"items": []}))).await, 401, "unauthorized"),
        (shop.call("POST", "/checkout", "/checkout", Some(&customer), None).await, 400, "empty_cart"),
        (shop.call("POST", "/cart/items", "/cart/items", Some(&customer), Some(json!({"product_id": "nope", "quantity": 1}))).await, 404, "unknown_product"),
        (shop.call("DELETE", "/cart/items/{product_id}", "/cart/items/nope", Some(&customer), None).await, 404, "not_in_cart"),
        (shop.call("GET", "/orders/{id}", "/orders/nope", Some(&customer), None).await, 404, "not_found"),
        (shop.call("GET", "/payments/{order_id}", "/payments/nope", Some(&customer), None).await, 404, "not_found"),
    ];
    for (i, (reply, status, code)) in cases.iter().enumerate() {
        assert_eq!(
            (reply.status, reply.error_code().as_str()),
            (*status, *code),
            "case {i}: {}",
            reply.text()
        );
    }
    // Unknown email and wrong password are indistinguishable.
    assert_eq!(cases[6].0.body, cases[7].0.body);

    let widget = shop.product(&admin, "Widget", 100, 1).await;
    let too_many = shop.place_order(&customer, &widget, 2).await;
    assert_error(&too_many, 409, "insufficient_stock");
    assert!(too_many.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&widget));
    assert_eq!(
        shop.stock(&widget).await,
        1,
        "a refused order reserves nothing"
    );

    let malformed = request("POST", &shop.host.url("/users"), &[], b"{not json".to_vec()).await;
    assert_error(&malformed, 400, "invalid_json");

    // A total beyond i64 cents is refused wherever it is computed, never
    // shown or charged wrapped around.
    let dear = shop.product(&admin, "Dear", 1, 5).await;
    let cheap = shop.product(&admin, "Cheap", 1, 5).await;
    for product in [&dear, &cheap] {
        shop.add_to_cart(&customer, product, 1).await;
    }
    let path = format!("/products/{dear}");
    let repriced = shop
        .call(
            "PATCH",
            "/products/{id}",
            &path,
            Some(&admin),
            Some(json!({"price_cents": i64::MAX})),
        )
        .await;
    assert_eq!(repriced.status, 200, "{}", repriced.text());
    let cart = shop
        .call("GET", "/cart", "/cart", Some(&customer), None)
        .await;
    assert_error(&cart, 400, "validation_failed");
    assert!(
        cart.text().contains("total is too large"),
        "{}",
        cart.text()
    );
    let checkout = shop
        .call("POST", "/checkout", "/checkout", Some(&customer), None)
        .await;
    assert_error(&checkout, 400, "validation_failed");
    assert_eq!(
        (shop.stock(&dear).await, shop.stock(&cheap).await),
        (5, 5),
        "a refused checkout keeps no stock"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn users_see_only_their_own_orders_payments_and_notifications() {
    let shop = Shop::start().await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let (owner_id, owner) = shop.user("owner@example.com").await;
    let (_, other) = shop.user("other@example.com").await;
    let book = shop.product(&admin, "Book", 1500, 3).await;
    let order = shop.place_order(&owner, &book, 1).await.json();
    let order_id = order["id"].as_str().unwrap();
    shop.order_settles(&owner, order_id).await;

    let stranger = shop
        .call(
            "GET",
            "/orders/{id}",
            &format!("/orders/{order_id}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(stranger.status, 404);
    assert_eq!(
        shop.order(&admin, order_id).await["id"],
        order_id,
        "an admin may read any order"
    );
    let payment = shop.payment(&other, order_id).await;
    assert_eq!(payment.status, 404);
    let listed = shop
        .call("GET", "/orders", "/orders", Some(&other), None)
        .await
        .json();
    assert_eq!(listed, json!([]));
    let graphql =
        json!({"query": format!("{{ order(id: \"{order_id}\") {{ id }} orders {{ id }} }}")});
    let answer = shop
        .call("POST", "/graphql", "/graphql", Some(&other), Some(graphql))
        .await
        .json();
    assert_eq!(answer["data"], json!({"order": null, "orders": []}));
    let query = format!("{{ order(id: \"{order_id}\") {{ id payment {{ status }} }} }}");
    let by_admin = shop
        .graphql(Some(&admin), json!({ "query": query }))
        .await
        .json();
    assert_eq!(
        by_admin["data"]["order"],
        json!({"id": order_id, "payment": {"status": "succeeded"}}),
        "an admin may read any order: {by_admin}"
    );
    shop.notification_kinds(&owner, 3).await;
    // Once the other user's own welcome is in, their list is complete and
    // must hold nothing of the owner's.
    shop.notification_kinds(&other, 1).await;
    let others = shop.notifications(&other).await;
    assert_eq!(others.len(), 1);
    assert!(
        others.iter().all(|n| n["recipient"] == "other@example.com"),
        "{others:?}"
    );

    // A forged identity header is replaced by the host with the token's user.
    let forged = request(
        "GET",
        &shop.host.url("/users/me"),
        &[
            ("authorization", &format!("Bearer {other}")),
            ("x-agora-user-id", &owner_id),
        ],
        vec![],
    )
    .await;
    assert_eq!(forged.json()["email"], "other@example.com");
}

#[tokio::test(flavor = "multi_thread")]
async fn redelivered_events_change_nothing_and_providers_are_called_once() {
    let provider = Recorder::start(json!({"status": "approved", "reference": "psp-1"})).await;
    let mailer = Recorder::start(json!({"accepted": true})).await;
    let (provider_port, mailer_port) = (provider.port, mailer.port);
    let shop = Shop::start_with(move |config| {
        config
            .replace(
                "settings = { decline_above_cents = 500000 }",
                &format!("settings = {{ provider_url = \"http://127.0.0.1:{provider_port}/charges\" }}\noutbound_hosts = [\"127.0.0.1:{provider_port}\"]"),
            )
            .replace(
                "links = { \"agora:shop/users\" = \"identity\" }",
                &format!("links = {{ \"agora:shop/users\" = \"identity\" }}\nsettings = {{ webhook_url = \"http://127.0.0.1:{mailer_port}/emails\" }}\noutbound_hosts = [\"127.0.0.1:{mailer_port}\"]"),
            )
    })
    .await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let (_, customer) = shop.user("frank@example.com").await;
    let chair = shop.product(&admin, "Chair", 4000, 4).await;
    let order = shop.place_order(&customer, &chair, 2).await.json();
    let order_id = order["id"].as_str().unwrap().to_owned();
    assert_eq!(shop.order_settles(&customer, &order_id).await, "paid");
    let notes = shop.notification_kinds(&customer, 3).await.len();

    let charges = provider.recorded();
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!(charges[0].path, "/charges");
    assert_eq!(
        charges[0].idempotency_key.as_deref(),
        Some(order_id.as_str())
    );
    assert_eq!(charges[0].body["amount_cents"], 8000);

    // Every subscriber handles everything again.
    let rewound = [
        ("order.created", "payments"),
        ("order.created", "notifications"),
        ("payment.succeeded", "orders"),
        ("payment.succeeded", "notifications"),
        ("user.registered", "notifications"),
    ];
    for (topic, component) in rewound {
        let out = shop.host.cli(&["rewind", topic, component]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for (topic, component) in rewound {
        shop.caught_up(topic, component).await;
    }

    assert_eq!(provider.recorded().len(), 1, "never charged twice");
    assert_eq!(shop.order(&customer, &order_id).await["status"], "paid");
    assert_eq!(shop.stock(&chair).await, 2);
    assert_eq!(shop.notifications(&customer).await.len(), notes);
    let emails = mailer.recorded();
    let mut keys: Vec<_> = emails
        .iter()
        .filter_map(|e| e.idempotency_key.clone())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), emails.len(), "no email sent twice: {emails:?}");
    assert!(shop
        .notifications(&customer)
        .await
        .iter()
        .all(|n| n["status"] == "sent"));
}

/// Notifications address users from identity's events: a renamed user's
/// next email greets them by the new name, and no notification asks
/// identity for a user whose events have arrived.
#[tokio::test(flavor = "multi_thread")]
async fn notifications_keep_the_contacts_identity_publishes() {
    let shop = Shop::start().await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let (_, customer) = shop.user("renata@example.com").await;
    shop.notification_kinds(&customer, 1).await;
    let renamed = shop
        .call(
            "PATCH",
            "/users/me",
            "/users/me",
            Some(&customer),
            Some(json!({"name": "Renata"})),
        )
        .await;
    assert_eq!(renamed.status, 200, "{}", renamed.text());
    shop.caught_up("user.updated", "notifications").await;

    let lamp = shop.product(&admin, "Lamp", 2500, 5).await;
    shop.add_to_cart(&customer, &lamp, 1).await;
    shop.checkout_paid(&customer).await;
    shop.notification_kinds(&customer, 3).await;
    let mut greetings: Vec<(String, String, String)> = shop
        .notifications(&customer)
        .await
        .iter()
        .map(|n| {
            let body = n["body"].as_str().unwrap();
            let hello = body.split(',').next().unwrap().to_owned();
            (
                n["kind"].as_str().unwrap().to_owned(),
                hello,
                n["recipient"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    greetings.sort();
    let to = "renata@example.com".to_owned();
    assert_eq!(
        greetings,
        [
            ("order_received".into(), "Hello Renata".into(), to.clone()),
            ("payment_received".into(), "Hello Renata".into(), to.clone()),
            ("welcome".into(), "Hello Someone".into(), to),
        ]
    );
    assert_eq!(
        shop.link_calls("notifications", "identity", "agora:shop/users#get")
            .await,
        0.0
    );
}

/// A user whose contact notifications has not received (here, it does not
/// subscribe to identity's events) is looked up through identity instead,
/// once per notification.
#[tokio::test(flavor = "multi_thread")]
async fn notifications_ask_identity_about_users_they_have_no_contact_for() {
    let shop = Shop::start_with(|c| {
        c.replace(
            "subscribes = [\"user.registered\", \"user.updated\", \"order.created\", \"payment.succeeded\", \"payment.failed\"]",
            "subscribes = [\"order.created\", \"payment.succeeded\", \"payment.failed\"]",
        )
    })
    .await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let (_, customer) = shop.user("ida@example.com").await;
    let lamp = shop.product(&admin, "Lamp", 2500, 5).await;
    shop.add_to_cart(&customer, &lamp, 1).await;
    shop.checkout_paid(&customer).await;
    let mut kinds = shop.notification_kinds(&customer, 2).await;
    kinds.sort();
    assert_eq!(kinds, ["order_received", "payment_received"]);
    assert!(shop
        .notifications(&customer)
        .await
        .iter()
        .all(|n| n["recipient"] == "ida@example.com"
            && n["body"].as_str().unwrap().starts_with("Hello Someone,")));
    assert_eq!(
        shop.link_calls("notifications", "identity", "agora:shop/users#get")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_operation_is_served() {
    let shop = Shop::start().await;
    // As an admin, so that every request gets past the gateway to the
    // component's own router, which is what this checks.
    let (_, admin) = shop.user(ADMIN.0).await;
    let bearer = format!("Bearer {admin}");
    let paths = shop.openapi["paths"].as_object().unwrap().clone();
    let mut checked = 0;
    for (template, item) in &paths {
        let concrete = template
            .replace("{id}", "x")
            .replace("{order_id}", "x")
            .replace("{product_id}", "x");
        for method in ["get", "post", "patch", "put", "delete"] {
            if !item[method].is_object() {
                continue;
            }
            let reply = request(
                &method.to_uppercase(),
                &shop.host.url(&concrete),
                &[("authorization", &bearer)],
                b"{}".to_vec(),
            )
            .await;
            assert_ne!(
                reply.status, 401,
                "{method} {template} did not reach its component"
            );
            let body: Value = serde_json::from_slice(&reply.body).unwrap_or_default();
            let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
            assert!(
                !message.starts_with("no route")
                    && !message.starts_with("no component serves")
                    && reply.status != 405,
                "{method} {template} is documented but not served: {} {message}",
                reply.status
            );
            shop.conforms(&method.to_uppercase(), template, &reply);
            checked += 1;
        }
    }
    assert!(checked >= 19, "{checked} operations");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkout_is_one_trace_from_the_client_through_the_broker_to_the_email() {
    let collector = Collector::start().await;
    let provider = Recorder::start(json!({"status": "approved", "reference": "psp-1"})).await;
    let mailer = Recorder::start(json!({"accepted": true})).await;
    let (provider_port, mailer_port, collector_port) = (provider.port, mailer.port, collector.port);
    let shop = Shop::start_with(move |config| {
        let config = config
            .replace(
                "settings = { decline_above_cents = 500000 }",
                &format!("settings = {{ provider_url = \"http://127.0.0.1:{provider_port}/charges\" }}\noutbound_hosts = [\"127.0.0.1:{provider_port}\"]"),
            )
            .replace(
                "links = { \"agora:shop/users\" = \"identity\" }",
                &format!("links = {{ \"agora:shop/users\" = \"identity\" }}\nsettings = {{ webhook_url = \"http://127.0.0.1:{mailer_port}/emails\" }}\noutbound_hosts = [\"127.0.0.1:{mailer_port}\"]"),
            );
        format!("[telemetry]\nendpoint = \"http://127.0.0.1:{collector_port}\"\nexport_interval_ms = 100\n\n{config}")
    })
    .await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let (_, customer) = shop.user("tracy@example.com").await;
    let chair = shop.product(&admin, "Chair", 4000, 4).await;

    // The client (a storefront, say) started the trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    let bearer = format!("Bearer {customer}");
    let body = json!({"items": [{"product_id": chair, "quantity": 1}]});
    let order = request(
        "POST",
        &shop.host.url("/orders"),
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
            ("traceparent", &traceparent),
        ],
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(order.status, 201, "{}", order.text());
    let order_id = order.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(shop.order_settles(&customer, &order_id).await, "paid");
    shop.notification_kinds(&customer, 3).await;

    // Each hop: (kind, name, the component it ran in, the hop it follows).
    const SERVER: i32 = 2;
    const CLIENT: i32 = 3;
    const CONSUMER: i32 = 5;
    let hops: [(i32, &str, &str, &str); 8] = [
        (SERVER, "POST /orders", "orders", "client"),
        (
            CLIENT,
            "catalog agora:shop/inventory",
            "catalog",
            "POST /orders",
        ),
        (
            CONSUMER,
            "order.created process",
            "payments",
            "POST /orders",
        ),
        (
            CLIENT,
            "POST 127.0.0.1",
            "",
            "order.created process payments",
        ),
        (
            CONSUMER,
            "payment.succeeded process",
            "orders",
            "order.created process payments",
        ),
        (
            CONSUMER,
            "order.created process",
            "notifications",
            "POST /orders",
        ),
        (
            CONSUMER,
            "payment.succeeded process",
            "notifications",
            "order.created process payments",
        ),
        (CONSUMER, "order.created process", "catalog", "POST /orders"),
    ];
    let label = |s: &ReceivedSpan| {
        let component = s
            .attributes
            .get("agora.component")
            .cloned()
            .unwrap_or_default();
        match s.kind {
            CONSUMER => format!("{} {component}", s.name),
            _ => s.name.clone(),
        }
    };
    let spans = eventually(
        "every hop of the checkout's trace",
        Duration::from_secs(30),
        || async {
            let spans = collector.trace(trace_id);
            hops.iter()
                .all(|(kind, name, component, _)| {
                    spans.iter().any(|s| {
                        s.kind == *kind
                            && s.name.starts_with(name)
                            && (component.is_empty()
                                || s.attributes.get("agora.component").map(String::as_str)
                                    == Some(component))
                    })
                })
                .then_some(spans)
        },
    )
    .await;
    let matching = |kind: i32, name: &str, component: &str| -> Vec<&ReceivedSpan> {
        spans
            .iter()
            .filter(|s| {
                s.kind == kind
                    && s.name.starts_with(name)
                    && (component.is_empty()
                        || s.attributes.get("agora.component").map(String::as_str)
                            == Some(component))
            })
            .collect()
    };
    for (kind, name, component, follows) in hops {
        let parent = if follows == "client" {
            client_span.to_owned()
        } else {
            spans
                .iter()
                .find(|s| label(s) == follows || s.name == follows)
                .unwrap_or_else(|| panic!("no span {follows}: {spans:#?}"))
                .span_id
                .clone()
        };
        assert!(
            matching(kind, name, component)
                .iter()
                .any(|s| s.parent_span_id == parent),
            "{name} ({component}) follows {follows}: {spans:#?}"
        );
    }

    // Outbound HTTP carries the trace to the payment provider and the mailer.
    let charge = &provider.recorded()[0];
    assert!(
        charge
            .traceparent
            .as_deref()
            .is_some_and(|t| t.contains(trace_id)),
        "{charge:?}"
    );
    assert!(mailer.recorded().iter().any(|e| e
        .traceparent
        .as_deref()
        .is_some_and(|t| t.contains(trace_id))));
}

/// One GraphQL query reads the whole shop: the profile, a product search,
/// the orders with their items' products, payments and notifications. Each
/// service is called once for all the orders and items, not once per item.
#[tokio::test(flavor = "multi_thread")]
async fn one_graphql_query_reads_the_whole_shop_with_one_call_per_service() {
    let shop = Shop::start().await;
    let (_, admin) = shop.user(ADMIN.0).await;
    let (customer_id, customer) = shop.user("grace@example.com").await;
    let lamp = shop.product(&admin, "Desk lamp", 2500, 10).await;
    let mug = shop.product(&admin, "Mug", 900, 10).await;
    let pen = shop.product(&admin, "Pen", 150, 10).await;
    let mut order_ids = Vec::new();
    for cart in [[(&lamp, 1), (&mug, 2)], [(&mug, 1), (&pen, 3)]] {
        for (product, quantity) in cart {
            shop.add_to_cart(&customer, product, quantity).await;
        }
        order_ids.push(shop.checkout_paid(&customer).await);
    }
    // The welcome, and each order's receipt and payment.
    shop.notification_kinds(&customer, 5).await;

    // What graphql calls for the orders' products, payments and notifications.
    let batched = [
        ("catalog", "agora:shop/inventory#lookup"),
        ("payments", "agora:shop/payments#of-orders"),
        ("notifications", "agora:shop/notifications#of-orders"),
    ];
    let mut before = Vec::new();
    for (callee, function) in batched {
        before.push(shop.link_calls("graphql", callee, function).await);
    }
    let query = "query Shop($search: String) {
        me { id email name roles }
        products(search: $search) { total items { name priceCents } }
        orders {
            id status totalCents currency
            items { productId quantity unitPriceCents product { name priceCents stock } }
            payment { status amountCents currency reference }
            notifications { kind orderId recipient }
        }
        notifications(first: 10) { kind }
    }";
    let answer = shop
        .graphql(
            Some(&customer),
            json!({"query": query, "variables": {"search": "M"}, "operationName": "Shop"}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let answer = answer.json();
    assert_eq!(answer["errors"], Value::Null, "{answer}");
    let data = &answer["data"];
    assert_eq!(
        data["me"],
        json!({"id": customer_id, "email": "grace@example.com", "name": "Someone", "roles": ["customer"]})
    );
    // "M" matches Mug, and Desk lamp ignoring case; by name.
    assert_eq!(
        data["products"],
        json!({"total": 2, "items": [{"name": "Desk lamp", "priceCents": 2500}, {"name": "Mug", "priceCents": 900}]})
    );

    // Newest first: the second checkout, then the first.
    let orders = data["orders"].as_array().unwrap();
    let expected = [
        (
            &order_ids[1],
            900 + 3 * 150,
            vec![("Mug", 1, 900, 7), ("Pen", 3, 150, 7)],
        ),
        (
            &order_ids[0],
            2500 + 2 * 900,
            vec![("Desk lamp", 1, 2500, 9), ("Mug", 2, 900, 7)],
        ),
    ];
    assert_eq!(orders.len(), expected.len(), "{answer}");
    for (order, (id, total, items)) in orders.iter().zip(expected) {
        assert_eq!(
            (
                order["id"].as_str(),
                order["status"].as_str(),
                order["totalCents"].as_i64()
            ),
            (Some(id.as_str()), Some("paid"), Some(total)),
            "{order}"
        );
        let mut lines: Vec<(&str, i64, i64, i64)> = order["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                let product = &item["product"];
                assert_eq!(item["unitPriceCents"], product["priceCents"], "{item}");
                (
                    product["name"].as_str().unwrap(),
                    item["quantity"].as_i64().unwrap(),
                    item["unitPriceCents"].as_i64().unwrap(),
                    product["stock"].as_i64().unwrap(),
                )
            })
            .collect();
        lines.sort();
        assert_eq!(lines, items, "{order}");
        assert_eq!(
            order["payment"],
            json!({"status": "succeeded", "amountCents": total, "currency": "USD", "reference": format!("sim-{id}")})
        );
        let mut told: Vec<&str> = order["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                assert_eq!(
                    (n["orderId"].as_str(), n["recipient"].as_str()),
                    (Some(id.as_str()), Some("grace@example.com"))
                );
                n["kind"].as_str().unwrap()
            })
            .collect();
        told.sort();
        assert_eq!(told, ["order_received", "payment_received"], "{order}");
    }
    let mut kinds: Vec<&str> = data["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["kind"].as_str().unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "order_received",
            "order_received",
            "payment_received",
            "payment_received",
            "welcome"
        ]
    );

    // Two orders, four items, three products: one call for all of them.
    for ((callee, function), before) in batched.into_iter().zip(before) {
        let after = shop.link_calls("graphql", callee, function).await;
        assert_eq!(after - before, 1.0, "calls of {function}");
    }
}

/// GraphQL over HTTP: public browsing, UNAUTHENTICATED fields, GET and
/// POST, the schema as SDL and by introspection, and a clear 400 for what
/// does not run (not GraphQL, invalid, too deep, too complex).
#[tokio::test(flavor = "multi_thread")]
async fn graphql_answers_over_http_and_says_what_it_refuses() {
    let shop = Shop::start().await;
    let (_, admin) = shop.user(ADMIN.0).await;
    shop.product(&admin, "Kettle", 3000, 2).await;

    // Without a token: products answer, the user's fields are null with
    // UNAUTHENTICATED.
    let anonymous = shop
        .graphql(
            None,
            json!({"query": "{ products { total items { name } } me { id } orders { id } }"}),
        )
        .await;
    assert_eq!(anonymous.status, 200, "{}", anonymous.text());
    let anonymous = anonymous.json();
    assert_eq!(
        anonymous["data"],
        json!({"products": {"total": 1, "items": [{"name": "Kettle"}]}, "me": null, "orders": null})
    );
    let mut refused: Vec<(String, String)> = anonymous["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"][0].as_str().unwrap().to_owned(),
                e["extensions"]["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    refused.sort();
    assert_eq!(
        refused,
        [
            ("me".into(), "UNAUTHENTICATED".into()),
            ("orders".into(), "UNAUTHENTICATED".into())
        ]
    );

    let by_get = shop
        .call(
            "GET",
            "/graphql",
            "/graphql?query=%7B%20products%20%7B%20total%20%7D%20%7D",
            None,
            None,
        )
        .await;
    assert_eq!(by_get.status, 200, "{}", by_get.text());
    assert_eq!(by_get.json()["data"]["products"]["total"], 1);

    // Refused before running: 400, `errors` and no `data`.
    let refusal = |reply: &Reply| -> (String, String) {
        assert_eq!(reply.status, 400, "{}", reply.text());
        let body = reply.json();
        assert!(body.get("data").is_none(), "{body}");
        let error = &body["errors"][0];
        (
            error["extensions"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            error["message"].as_str().unwrap().to_owned(),
        )
    };
    let deep = format!(
        "{{ __schema {{ types {{ {}name{} }} }} }}",
        "ofType { ".repeat(14),
        " }".repeat(14)
    );
    assert_eq!(
        refusal(&shop.graphql(None, json!({ "query": deep })).await),
        (
            "QUERY_TOO_DEEP".into(),
            "the query is nested 17 levels deep; at most 15 are allowed".into()
        )
    );
    let wide =
        "{ products(first: 100) { total items { id name description priceCents currency stock } } \
                orders(first: 100) { id status totalCents } }";
    let (code, message) = refusal(&shop.graphql(None, json!({ "query": wide })).await);
    assert_eq!(code, "QUERY_TOO_COMPLEX");
    assert!(
        message.starts_with("the query's complexity is 1100; at most 1000 is allowed"),
        "{message}"
    );
    let not_json = request(
        "POST",
        &shop.host.url("/graphql"),
        &[("content-type", "application/json")],
        b"{ orders }".to_vec(),
    )
    .await;
    shop.conforms("POST", "/graphql", &not_json);
    let (code, message) = refusal(&not_json);
    assert_eq!(code, "BAD_REQUEST");
    assert!(message.contains("not a GraphQL request"), "{message}");
    let (code, message) = refusal(&shop.graphql(None, json!({"variables": {}})).await);
    assert_eq!(code, "BAD_REQUEST");
    assert!(message.contains("missing field `query`"), "{message}");
    let (code, message) = refusal(&shop.call("GET", "/graphql", "/graphql", None, None).await);
    assert_eq!(code, "BAD_REQUEST");
    assert!(message.contains("`query` is required"), "{message}");
    let (_, message) = refusal(
        &shop
            .graphql(None, json!({"query": "{ orders { nope } }"}))
            .await,
    );
    assert!(message.contains("nope"), "{message}");

    // The schema, by introspection and as SDL.
    let introspected = shop
        .graphql(
            None,
            json!({"query": "{ __schema { queryType { name } } __type(name: \"Order\") { fields { name } } }"}),
        )
        .await
        .json();
    assert_eq!(
        introspected["data"]["__schema"]["queryType"]["name"],
        "Query"
    );
    let fields: Vec<&str> = introspected["data"]["__type"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    for field in [
        "id",
        "status",
        "items",
        "totalCents",
        "payment",
        "notifications",
    ] {
        assert!(fields.contains(&field), "{field} in {fields:?}");
    }
    let sdl = shop
        .call("GET", "/graphql/schema", "/graphql/schema", None, None)
        .await;
    assert_eq!(sdl.status, 200);
    assert!(sdl.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for line in [
        "type Query {",
        "products(search: String, offset: Int! = 0, first: Int! = 20): ProductPage!",
        "orders(first: Int! = 20): [Order!]",
        "order(id: ID!): Order",
        "type OrderItem {",
    ] {
        assert!(sdl.text().contains(line), "{line} in\n{}", sdl.text());
    }
}
