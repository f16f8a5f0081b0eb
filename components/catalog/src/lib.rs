//! catalog: products and their stock, and reservations against it.
//!
//! Stock can never go negative: a reservation takes stock with a
//! conditional `UPDATE ... WHERE stock >= quantity` inside one transaction
//! for all lines (all or nothing), and the schema checks `stock >= 0` too.
//!
//! A reservation waits for its order: the order's `order.created` event,
//! written in the same transaction as the order, confirms it (`held`). One
//! that no order confirms within `reservation_timeout_seconds` (the orders
//! service crashed between reserving and writing the order) has its stock
//! put back (`expired`) by the next reservation, which is when the stock is
//! wanted. Should a confirmation still come after that, the stock is taken
//! again if it is there; if not, the event fails and ends up dead-lettered
//! for an operator, rather than an order silently going without stock.
//!
//! Product reads come from the cache. Every write deletes the product's
//! entry and bumps a generation number that list entries are keyed by, so
//! no list survives a change; entries also expire after `CACHE_TTL`.
//!
//! The cache only saves work: when it fails (its server is down or slow)
//! reads go to storage and writes go on, and the host logs the failure. An
//! invalidation lost that way leaves a stale entry for at most `CACHE_TTL`.

use std::time::Duration;

use agora_sdk::prelude::*;
use serde::{Deserialize, Serialize};

mod shop {
    wit_bindgen::generate!({ path: "../../wit/shop", world: "catalog" });
}

use shop::exports::agora::shop::inventory::{self, Line, ReserveError, ReservedLine};

struct Catalog;

impl Service for Catalog {
    fn router() -> Router {
        Router::new()
            .get("/products", list)
            .post("/products", create)
            .get("/products/{id}", show)
            .patch("/products/{id}", update)
    }

    fn migrations() -> Vec<Migration> {
        vec![
            Migration::new(
                "0001_products",
                include_str!("../migrations/0001_products.sql"),
            ),
            Migration::new(
                "0002_reservations_by_state",
                include_str!("../migrations/0002_reservations_by_state.sql"),
            ),
        ]
    }

    fn on_message(message: messaging::Message) -> Result<(), String> {
        #[derive(Deserialize)]
        struct OrderCreated {
            order_id: String,
        }
        match message.topic.as_str() {
            "order.created" => confirm(&message.json::<OrderCreated>()?.order_id),
            other => Err(format!("catalog does not handle `{other}`")),
        }
    }
}

agora_sdk::service!(Catalog);

/// How long a reservation waits for its order before its stock is put back.
/// An order confirms its reservation within milliseconds of checkout; 15
/// minutes also rides out a subscriber that is failing for a while, and
/// holds stock that no order will take for no longer than a checkout page.
const DEFAULT_RESERVATION_TIMEOUT_SECONDS: i64 = 15 * 60;

/// A bound on staleness should an invalidation be missed.
const CACHE_TTL: Duration = Duration::from_secs(30);
const GENERATION_KEY: &str = "products:generation";
const DEFAULT_PAGE: i64 = 20;
const MAX_PAGE: i64 = 100;

#[derive(Serialize, Deserialize, Clone)]
struct Product {
    id: String,
    name: String,
    description: String,
    price_cents: i64,
    currency: String,
    stock: i64,
}

const COLUMNS: &str = "id, name, description, price_cents, currency, stock";

impl From<Product> for inventory::Product {
    fn from(p: Product) -> Self {
        inventory::Product {
            id: p.id,
            name: p.name,
            description: p.description,
            unit_price_cents: p.price_cents,
            currency: p.currency,
            stock: p.stock,
        }
    }
}

fn product_key(id: &str) -> String {
    format!("product:{id}")
}

/// Forgets cached copies of these products and of every list. A failed
/// cache call is skipped (see the module docs): the change is committed by
/// then, and reporting it as failed would be false.
fn invalidate<'a>(ids: impl IntoIterator<Item = &'a str>) {
    for id in ids {
        let _ = cache::delete(&product_key(id));
    }
    let _ = cache::increment(GENERATION_KEY, 1, None);
}

/// After an edit of a product: also drops the gateway's cached responses
/// of `/products` (plugins.toml `response_cache`), so an edit shows at
/// once. Stock taken by checkouts does not drop them: that happens on
/// every order, and the rule's short TTL bounds how late it shows.
fn edited(id: &str) {
    invalidate([id]);
    let _ = cache::invalidate_responses("/products");
}

fn load(id: &str) -> Result<Option<Product>> {
    if let Ok(Some(product)) = cache::get_json::<Product>(&product_key(id)) {
        return Ok(Some(product));
    }
    let rows = storage::query(
        &format!("SELECT {COLUMNS} FROM products WHERE id = $1"),
        params![id],
    )?;
    let product = rows.first().map(|r| r.decode::<Product>()).transpose()?;
    if let Some(product) = &product {
        let _ = cache::set_json(&product_key(id), product, Some(CACHE_TTL));
    }
    Ok(product)
}

fn show(req: &Request) -> Result<Response> {
    let id = req.param("id");
    let product = load(id)?.ok_or_else(|| Error::not_found(format!("no product {id}")))?;
    Ok(Response::ok(&product))
}

fn list(req: &Request) -> Result<Response> {
    let page = search(
        req.query("q").unwrap_or(""),
        req.query_as("offset")?.unwrap_or(0),
        req.query_as("limit")?.unwrap_or(DEFAULT_PAGE),
    )?;
    Ok(Response::ok(&page))
}

/// A page of products, by name, and how many there are on all pages.
#[derive(Serialize, Deserialize)]
struct Page {
    items: Vec<Product>,
    total: i64,
}

/// The products whose name or description contains `text` (ignoring case),
/// `limit` of them from the `offset`th; `GET /products` and
/// `inventory.search`.
fn search(text: &str, offset: i64, limit: i64) -> Result<Page> {
    let q = text.trim().to_lowercase();
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::bad_request(format!(
            "`limit` must be between 1 and {MAX_PAGE}"
        )));
    }
    if offset < 0 {
        return Err(Error::bad_request("`offset` must not be negative"));
    }
    // Without the generation a cached page cannot be told current: skip
    // the cache for this request.
    let key = cache::get(GENERATION_KEY).ok().map(|generation| {
        let generation = generation
            .and_then(|g| String::from_utf8(g).ok())
            .unwrap_or_default();
        format!("products:{generation}:{limit}:{offset}:{q}")
    });
    if let Some(Ok(Some(page))) = key.as_deref().map(cache::get_json::<Page>) {
        return Ok(page);
    }
    let pattern = format!("%{q}%");
    let filter = "WHERE LOWER(name) LIKE $1 OR LOWER(description) LIKE $1";
    let rows = storage::query(
        &format!("SELECT {COLUMNS} FROM products {filter} ORDER BY name, id LIMIT $2 OFFSET $3"),
        params![&pattern, limit, offset],
    )?;
    let items = rows.decode::<Product>()?;
    let total: i64 = storage::query(
        &format!("SELECT COUNT(*) AS total FROM products {filter}"),
        params![&pattern],
    )?
    .first()
    .map(|r| r.get("total"))
    .transpose()?
    .unwrap_or(0);
    let page = Page { items, total };
    if let Some(key) = &key {
        let _ = cache::set_json(key, &page, Some(CACHE_TTL));
    }
    Ok(page)
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(400, "validation_failed", message)
}

fn check_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(invalid("`name` is required (1 to 200 characters)"));
    }
    Ok(name.to_owned())
}

fn check_currency(currency: &str) -> Result<String> {
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(invalid(
            "`currency` must be a three-letter code such as USD",
        ));
    }
    Ok(currency.to_owned())
}

fn check_non_negative(field: &str, value: i64) -> Result<i64> {
    if value < 0 {
        return Err(invalid(format!("`{field}` must not be negative")));
    }
    Ok(value)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProduct {
    name: String,
    #[serde(default)]
    description: String,
    price_cents: i64,
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default)]
    stock: i64,
}

fn default_currency() -> String {
    "USD".to_owned()
}

fn create(req: &Request) -> Result<Response> {
    req.require_admin()?;
    let body: NewProduct = req.json()?;
    let product = Product {
        id: new_id(),
        name: check_name(&body.name)?,
        description: body.description.trim().to_owned(),
        price_cents: check_non_negative("price_cents", body.price_cents)?,
        currency: check_currency(&body.currency)?,
        stock: check_non_negative("stock", body.stock)?,
    };
    storage::execute(
        "INSERT INTO products (id, name, description, price_cents, currency, stock, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        params![
            &product.id,
            &product.name,
            &product.description,
            product.price_cents,
            &product.currency,
            product.stock,
            now_millis()
        ],
    )?;
    edited(&product.id);
    Ok(Response::created(&product))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductChange {
    name: Option<String>,
    description: Option<String>,
    price_cents: Option<i64>,
    currency: Option<String>,
    stock: Option<i64>,
}

fn update(req: &Request) -> Result<Response> {
    req.require_admin()?;
    let id = req.param("id");
    let change: ProductChange = req.json()?;
    let tx = storage::begin()?;
    let rows = tx.query(
        &format!("SELECT {COLUMNS} FROM products WHERE id = $1"),
        params![id],
    )?;
    let mut product = rows
        .first()
        .map(|r| r.decode::<Product>())
        .transpose()?
        .ok_or_else(|| Error::not_found(format!("no product {id}")))?;
    if let Some(name) = change.name {
        product.name = check_name(&name)?;
    }
    if let Some(description) = change.description {
        product.description = description.trim().to_owned();
    }
    if let Some(price) = change.price_cents {
        product.price_cents = check_non_negative("price_cents", price)?;
    }
    if let Some(currency) = change.currency {
        product.currency = check_currency(&currency)?;
    }
    if let Some(stock) = change.stock {
        product.stock = check_non_negative("stock", stock)?;
    }
    tx.execute(
        "UPDATE products SET name = $1, description = $2, price_cents = $3, currency = $4, stock = $5 WHERE id = $6",
        params![&product.name, &product.description, product.price_cents, &product.currency, product.stock, id],
    )?;
    tx.commit()?;
    edited(id);
    Ok(Response::ok(&product))
}

fn reserved_lines(rows: &agora_sdk::storage::Rows) -> Result<Vec<ReservedLine>> {
    rows.iter()
        .map(|r| {
            Ok(ReservedLine {
                product_id: r.get("product_id")?,
                quantity: r.get::<i64>("quantity")? as u32,
                unit_price_cents: r.get("unit_price_cents")?,
                currency: r.get("currency")?,
            })
        })
        .collect()
}

fn unavailable(e: Error) -> ReserveError {
    ReserveError::Unavailable(e.message)
}

impl inventory::Guest for Catalog {
    fn lookup(ids: Vec<String>) -> Result<Vec<inventory::Product>, String> {
        let mut found = Vec::new();
        for id in ids {
            if let Some(p) = load(&id).map_err(|e| e.message)? {
                found.push(p.into());
            }
        }
        Ok(found)
    }

    fn search(text: String, offset: u32, limit: u32) -> Result<inventory::ProductPage, String> {
        let page = search(&text, offset.into(), limit.into()).map_err(|e| e.message)?;
        Ok(inventory::ProductPage {
            items: page.items.into_iter().map(Into::into).collect(),
            total: page.total.try_into().unwrap_or_default(),
        })
    }

    fn reserve(order_id: String, lines: Vec<Line>) -> Result<Vec<ReservedLine>, ReserveError> {
        if lines.is_empty() || lines.iter().any(|l| l.quantity == 0) {
            return Err(ReserveError::Invalid(
                "a reservation needs lines with quantities above 0".into(),
            ));
        }
        let tx = storage::begin().map_err(unavailable)?;
        let select = "SELECT product_id, quantity, unit_price_cents, currency FROM reservations WHERE order_id = $1 ORDER BY product_id";
        let existing = tx.query(select, params![&order_id]).map_err(unavailable)?;
        if !existing.is_empty() {
            return reserved_lines(&existing).map_err(unavailable);
        }
        let mut changed = expire_unconfirmed(&tx).map_err(unavailable)?;
        for line in &lines {
            let taken = tx
                .execute(
                    "UPDATE products SET stock = stock - $1 WHERE id = $2 AND stock >= $1",
                    params![line.quantity, &line.product_id],
                )
                .map_err(unavailable)?;
            if taken == 0 {
                let exists = !tx
                    .query(
                        "SELECT id FROM products WHERE id = $1",
                        params![&line.product_id],
                    )
                    .map_err(unavailable)?
                    .is_empty();
                // Returning drops the transaction: nothing was reserved.
                return Err(if exists {
                    ReserveError::InsufficientStock(line.product_id.clone())
                } else {
                    ReserveError::UnknownProduct(line.product_id.clone())
                });
            }
            tx.execute(
                "INSERT INTO reservations (order_id, product_id, quantity, unit_price_cents, currency, state, created_at)
                 SELECT $1, id, $2, price_cents, currency, 'reserved', $3 FROM products WHERE id = $4",
                params![&order_id, line.quantity, now_millis(), &line.product_id],
            )
            .map_err(unavailable)?;
        }
        let reserved = tx.query(select, params![&order_id]).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        changed.extend(lines.into_iter().map(|l| l.product_id));
        invalidate(changed.iter().map(String::as_str));
        reserved_lines(&reserved).map_err(unavailable)
    }

    fn commit(order_id: String) -> Result<(), String> {
        storage::execute(
            "UPDATE reservations SET state = 'committed' WHERE order_id = $1 AND state IN ('reserved', 'held')",
            params![&order_id],
        )
        .map(|_| ())
        .map_err(|e| e.message)
    }

    fn release(order_id: String) -> Result<(), String> {
        let released = (|| -> Result<Vec<String>> {
            let tx = storage::begin()?;
            let rows = tx.query(
                "SELECT product_id, quantity FROM reservations WHERE order_id = $1 AND state IN ('reserved', 'held')",
                params![&order_id],
            )?;
            let products = put_back(&tx, &rows)?;
            // An expired reservation gave its stock back already.
            tx.execute(
                "UPDATE reservations SET state = 'released' WHERE order_id = $1 AND state IN ('reserved', 'held', 'expired')",
                params![&order_id],
            )?;
            tx.commit()?;
            Ok(products)
        })()
        .map_err(|e| e.message)?;
        invalidate(released.iter().map(String::as_str));
        Ok(())
    }
}

/// Returns the stock of reservation `rows` (product_id, quantity) to their
/// products; returns the products changed.
fn put_back(tx: &storage::Transaction, rows: &storage::Rows) -> Result<Vec<String>> {
    let mut products = Vec::new();
    for r in rows.iter() {
        let product: String = r.get("product_id")?;
        tx.execute(
            "UPDATE products SET stock = stock + $1 WHERE id = $2",
            params![r.get::<i64>("quantity")?, &product],
        )?;
        products.push(product);
    }
    Ok(products)
}

/// Puts back the stock of reservations that no order confirmed in time;
/// returns the products changed.
fn expire_unconfirmed(tx: &storage::Transaction) -> Result<Vec<String>> {
    let timeout: i64 = config::get_json("reservation_timeout_seconds")?
        .unwrap_or(DEFAULT_RESERVATION_TIMEOUT_SECONDS);
    let cutoff = now_millis().saturating_sub(timeout.saturating_mul(1000));
    let rows = tx.query(
        "SELECT product_id, quantity FROM reservations WHERE state = 'reserved' AND created_at < $1",
        params![cutoff],
    )?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let products = put_back(tx, &rows)?;
    tx.execute(
        "UPDATE reservations SET state = 'expired' WHERE state = 'reserved' AND created_at < $1",
        params![cutoff],
    )?;
    Ok(products)
}

/// Marks an order's reservation as held by that order. If it expired
/// meanwhile, takes its stock again, all lines or none.
fn confirm(order_id: &str) -> Result<(), String> {
    let held = storage::execute(
        "UPDATE reservations SET state = 'held' WHERE order_id = $1 AND state = 'reserved'",
        params![order_id],
    )
    .map_err(|e| e.message)?;
    if held > 0 {
        return Ok(());
    }
    // Nothing was reserved: the reservation expired (or is held already,
    // for a redelivered event, or never was).
    let retaken = (|| -> Result<Vec<String>> {
        let tx = storage::begin()?;
        let expired = tx.query(
            "SELECT product_id, quantity FROM reservations WHERE order_id = $1 AND state = 'expired'",
            params![order_id],
        )?;
        if expired.is_empty() {
            return Ok(Vec::new());
        }
        let mut products = Vec::new();
        for r in expired.iter() {
            let product: String = r.get("product_id")?;
            let taken = tx.execute(
                "UPDATE products SET stock = stock - $1 WHERE id = $2 AND stock >= $1",
                params![r.get::<i64>("quantity")?, &product],
            )?;
            if taken == 0 {
                // Dropping the transaction takes nothing.
                return Err(Error::new(
                    409,
                    "insufficient_stock",
                    format!(
                        "order {order_id} was confirmed after its reservation expired, \
                         and product {product} no longer has the stock"
                    ),
                ));
            }
            products.push(product);
        }
        tx.execute(
            "UPDATE reservations SET state = 'held' WHERE order_id = $1 AND state = 'expired'",
            params![order_id],
        )?;
        tx.commit()?;
        Ok(products)
    })()
    .map_err(|e| e.message)?;
    invalidate(retaken.iter().map(String::as_str));
    Ok(())
}

shop::export!(Catalog with_types_in shop);
