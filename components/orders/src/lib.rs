//! orders: carts, checkout and orders, the first step of the purchase saga.
//!
//! Placing an order reserves stock through `agora:shop/inventory` (all or
//! nothing), then writes the order and its `order.created` event in one
//! transaction; if that fails, the reservation is released. Payment events
//! settle the order: `payment.succeeded` makes it `paid` and commits the
//! stock, `payment.failed` makes it `cancelled` and releases the stock.
//! Settling is idempotent, so a redelivered event changes nothing.
//!
//! Exports `agora:shop/orders` so the GraphQL component can read orders;
//! the orders and items it carries are the ones the REST API answers with.

use std::collections::BTreeMap;
use std::time::Duration;

use agora_sdk::prelude::*;
use serde::{Deserialize, Serialize};

mod shop {
    wit_bindgen::generate!({
        path: "../../wit/shop",
        world: "orders-service",
        additional_derives: [serde::Serialize, serde::Deserialize],
    });
}

use shop::agora::shop::inventory::{self, Line, ReserveError};
use shop::exports::agora::shop::orders::{self, Item, Order};

struct Orders;

impl Service for Orders {
    fn router() -> Router {
        Router::new()
            .get("/cart", show_cart)
            .post("/cart/items", add_to_cart)
            .delete("/cart/items/{product_id}", remove_from_cart)
            .post("/checkout", checkout)
            .post("/orders", create_order)
            .get("/orders", list_orders)
            .get("/orders/{id}", show_order)
    }

    fn migrations() -> Vec<Migration> {
        vec![Migration::new(
            "0001_orders",
            include_str!("../migrations/0001_orders.sql"),
        )]
    }

    fn on_message(message: messaging::Message) -> Result<(), String> {
        #[derive(Deserialize)]
        struct PaymentEvent {
            order_id: String,
        }
        let event: PaymentEvent = message.json()?;
        match message.topic.as_str() {
            "payment.succeeded" => settle(&event.order_id, "paid"),
            "payment.failed" => settle(&event.order_id, "cancelled"),
            other => Err(format!("orders does not handle `{other}`")),
        }
    }
}

agora_sdk::service!(Orders);

impl orders::Guest for Orders {
    fn of_user(user_id: String, limit: u32) -> Result<Vec<Order>, String> {
        orders_of(&user_id, i64::from(limit).min(MAX_LISTED)).map_err(|e| e.message)
    }

    fn get(id: String, viewer: orders::Viewer) -> Result<Option<Order>, String> {
        let viewer = User {
            id: viewer.id,
            roles: viewer.roles,
        };
        visible_order(&viewer, &id).map_err(|e| e.message)
    }
}

shop::export!(Orders with_types_in shop);

/// A cart lives a week without changes.
const CART_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most of one product in an order or a cart.
const MAX_QUANTITY: u32 = 1000;
/// Orders returned by a listing, newest first.
const MAX_LISTED: i64 = 100;

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct CartLine {
    product_id: String,
    quantity: u32,
}

#[derive(Deserialize, Serialize, Default)]
struct Cart {
    items: Vec<CartLine>,
}

fn cart_key(user: &User) -> String {
    format!("cart:{}", user.id)
}

fn load_cart(user: &User) -> Result<Cart> {
    Ok(cache::get_json(&cart_key(user))?.unwrap_or_default())
}

fn check_quantity(quantity: u32) -> Result<()> {
    if quantity == 0 || quantity > MAX_QUANTITY {
        return Err(Error::new(
            400,
            "validation_failed",
            format!("`quantity` must be between 1 and {MAX_QUANTITY}"),
        ));
    }
    Ok(())
}

/// The sum of (unit price, quantity) lines, refused where it does not fit
/// in cents: wrapping would show or charge a wrong, even negative, total.
fn total_cents(lines: impl IntoIterator<Item = (i64, i64)>) -> Result<i64> {
    lines
        .into_iter()
        .try_fold(0i64, |sum, (unit_price, quantity)| {
            unit_price
                .checked_mul(quantity)
                .and_then(|line| sum.checked_add(line))
        })
        .ok_or_else(|| Error::new(400, "validation_failed", "the order total is too large"))
}

/// The cart with current names and prices.
fn cart_view(cart: &Cart) -> Result<Response> {
    let ids: Vec<String> = cart.items.iter().map(|l| l.product_id.clone()).collect();
    let products = inventory::lookup(&ids).map_err(Error::unavailable)?;
    let product = |line: &CartLine| products.iter().find(|p| p.id == line.product_id);
    let total =
        total_cents(cart.items.iter().filter_map(|line| {
            product(line).map(|p| (p.unit_price_cents, i64::from(line.quantity)))
        }))?;
    let items: Vec<_> = cart
        .items
        .iter()
        .map(|line| {
            let product = product(line);
            serde_json::json!({
                "product_id": line.product_id,
                "quantity": line.quantity,
                "name": product.map(|p| p.name.clone()),
                "unit_price_cents": product.map(|p| p.unit_price_cents),
            })
        })
        .collect();
    let currency = products.first().map(|p| p.currency.clone());
    Ok(Response::ok(
        &serde_json::json!({ "items": items, "total_cents": total, "currency": currency }),
    ))
}

fn show_cart(req: &Request) -> Result<Response> {
    cart_view(&load_cart(&req.require_user()?)?)
}

fn add_to_cart(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    let line: CartLine = req.json()?;
    check_quantity(line.quantity)?;
    let known =
        inventory::lookup(std::slice::from_ref(&line.product_id)).map_err(Error::unavailable)?;
    if known.is_empty() {
        return Err(Error::new(
            404,
            "unknown_product",
            format!("no product {}", line.product_id),
        ));
    }
    let mut cart = load_cart(&user)?;
    match cart
        .items
        .iter_mut()
        .find(|l| l.product_id == line.product_id)
    {
        Some(existing) => {
            existing.quantity = existing.quantity.saturating_add(line.quantity);
            check_quantity(existing.quantity)?;
        }
        None => cart.items.push(line),
    }
    cache::set_json(&cart_key(&user), &cart, Some(CART_TTL))?;
    cart_view(&cart)
}

fn remove_from_cart(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    let mut cart = load_cart(&user)?;
    let before = cart.items.len();
    cart.items
        .retain(|l| l.product_id != req.param("product_id"));
    if cart.items.len() == before {
        return Err(Error::new(
            404,
            "not_in_cart",
            "that product is not in the cart",
        ));
    }
    cache::set_json(&cart_key(&user), &cart, Some(CART_TTL))?;
    cart_view(&cart)
}

fn checkout(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    let cart = load_cart(&user)?;
    if cart.items.is_empty() {
        return Err(Error::new(400, "empty_cart", "the cart is empty"));
    }
    let order = place_order(&user, &cart.items)?;
    cache::delete(&cart_key(&user))?;
    Ok(Response::created(&order))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    items: Vec<CartLine>,
}

fn create_order(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    let body: NewOrder = req.json()?;
    Ok(Response::created(&place_order(&user, &body.items)?))
}

fn place_order(user: &User, lines: &[CartLine]) -> Result<Order> {
    if lines.is_empty() {
        return Err(Error::new(
            400,
            "empty_order",
            "an order needs at least one item",
        ));
    }
    let mut merged: BTreeMap<&str, u32> = BTreeMap::new();
    for line in lines {
        if line.product_id.is_empty() {
            return Err(Error::new(
                400,
                "validation_failed",
                "`product_id` is required",
            ));
        }
        check_quantity(line.quantity)?;
        let quantity = merged.entry(&line.product_id).or_default();
        *quantity = quantity.saturating_add(line.quantity);
        check_quantity(*quantity)?;
    }
    let order_id = new_id();
    let wanted: Vec<Line> = merged
        .iter()
        .map(|(id, quantity)| Line {
            product_id: id.to_string(),
            quantity: *quantity,
        })
        .collect();
    let reserved = inventory::reserve(&order_id, &wanted).map_err(|e| match e {
        ReserveError::UnknownProduct(id) => {
            Error::new(404, "unknown_product", format!("no product {id}"))
        }
        ReserveError::InsufficientStock(id) => Error::new(
            409,
            "insufficient_stock",
            format!("not enough stock of product {id}"),
        ),
        ReserveError::Invalid(m) => Error::new(400, "validation_failed", m),
        ReserveError::Unavailable(m) => Error::unavailable(m),
    })?;
    if cfg!(feature = "crash-after-reserve") {
        panic!("crashing between reserving stock and writing order {order_id}");
    }
    match record_order(user, &order_id, &reserved) {
        Ok(order) => Ok(order),
        Err(e) => {
            // The order does not exist: give its stock back.
            let _ = inventory::release(&order_id);
            Err(e)
        }
    }
}

fn record_order(
    user: &User,
    order_id: &str,
    reserved: &[inventory::ReservedLine],
) -> Result<Order> {
    let currency = reserved[0].currency.clone();
    if reserved.iter().any(|l| l.currency != currency) {
        return Err(Error::new(
            400,
            "mixed_currencies",
            "all items of an order must have the same currency",
        ));
    }
    let items: Vec<Item> = reserved
        .iter()
        .map(|l| Item {
            product_id: l.product_id.clone(),
            quantity: l.quantity,
            unit_price_cents: l.unit_price_cents,
        })
        .collect();
    let total = total_cents(
        items
            .iter()
            .map(|i| (i.unit_price_cents, i64::from(i.quantity))),
    )?;
    let order = Order {
        id: order_id.to_owned(),
        status: "pending".into(),
        items,
        total_cents: total,
        currency,
        created_at: now_millis(),
    };
    let tx = storage::begin()?;
    tx.execute(
        "INSERT INTO orders (id, user_id, status, total_cents, currency, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        params![&order.id, &user.id, &order.status, order.total_cents, &order.currency, order.created_at],
    )?;
    for item in &order.items {
        tx.execute(
            "INSERT INTO order_items (order_id, product_id, quantity, unit_price_cents) VALUES ($1, $2, $3, $4)",
            params![&order.id, &item.product_id, item.quantity, item.unit_price_cents],
        )?;
    }
    tx.publish(
        "order.created",
        Some(&order.id),
        &serde_json::json!({
            "order_id": order.id,
            "user_id": user.id,
            "items": order.items,
            "total_cents": order.total_cents,
            "currency": order.currency,
        }),
    )?;
    tx.commit()?;
    Ok(order)
}

const COLUMNS: &str = "id, user_id, status, total_cents, currency, created_at";

/// The orders of `user_id`, newest first, at most `limit`.
fn orders_of(user_id: &str, limit: i64) -> Result<Vec<Order>> {
    let rows = storage::query(
        &format!(
            "SELECT {COLUMNS} FROM orders WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
        ),
        params![user_id, limit],
    )?;
    Ok(with_items(&rows)?.into_iter().map(|(_, o)| o).collect())
}

/// One order, if `user` owns it or is an admin; others are told it does
/// not exist rather than that it is someone else's.
fn visible_order(user: &User, id: &str) -> Result<Option<Order>> {
    let rows = storage::query(
        &format!("SELECT {COLUMNS} FROM orders WHERE id = $1"),
        params![id],
    )?;
    Ok(with_items(&rows)?
        .into_iter()
        .find(|(owner, _)| *owner == user.id || user.is_admin())
        .map(|(_, order)| order))
}

/// The orders of `rows` with their items, each with its owner's id.
fn with_items(rows: &storage::Rows) -> Result<Vec<(String, Order)>> {
    /// An order's row; its items are read apart.
    #[derive(Deserialize)]
    struct OrderRow {
        id: String,
        user_id: String,
        status: String,
        total_cents: i64,
        currency: String,
        created_at: i64,
    }
    rows.decode::<OrderRow>()?
        .into_iter()
        .map(|order| {
            let items = storage::query(
                "SELECT product_id, quantity, unit_price_cents FROM order_items WHERE order_id = $1 ORDER BY product_id",
                params![&order.id],
            )?
            .decode::<Item>()?;
            Ok((
                order.user_id,
                Order {
                    id: order.id,
                    status: order.status,
                    items,
                    total_cents: order.total_cents,
                    currency: order.currency,
                    created_at: order.created_at,
                },
            ))
        })
        .collect()
}

fn list_orders(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    Ok(Response::ok(&orders_of(&user.id, MAX_LISTED)?))
}

fn show_order(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    let id = req.param("id");
    let order =
        visible_order(&user, id)?.ok_or_else(|| Error::not_found(format!("no order {id}")))?;
    Ok(Response::ok(&order))
}

/// Moves a pending order to `status` and settles its stock accordingly.
fn settle(order_id: &str, status: &str) -> Result<(), String> {
    // One statement on the common path: a pending order moves, and one
    // already at `status` (a redelivery) is matched too, so that its stock
    // step runs again below.
    let matched = storage::execute(
        "UPDATE orders SET status = $1 WHERE id = $2 AND status IN ('pending', $1)",
        params![status, order_id],
    )
    .map_err(|e| e.to_string())?;
    if matched == 0 {
        let exists = !storage::query("SELECT id FROM orders WHERE id = $1", params![order_id])
            .map_err(|e| e.to_string())?
            .is_empty();
        // Settled the other way already: a contradicting event changes nothing.
        return if exists {
            Ok(())
        } else {
            Err(format!("no order {order_id}"))
        };
    }
    // Also on a redelivery: the stock step may be what failed last time,
    // and it is idempotent.
    match status {
        "paid" => inventory::commit(order_id),
        _ => inventory::release(order_id),
    }
}
