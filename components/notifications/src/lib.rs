//! notifications: an email for each account, order and payment event,
//! with a delivery log per user.
//!
//! Addresses come from identity's events (`user.registered`,
//! `user.updated`), kept in `contacts`: a notification then needs neither
//! an identity instance nor identity being up. A user whose events have not
//! arrived yet (an order placed right after signing up; users from before
//! this table) is looked up through `agora:shop/users` instead.
//!
//! One event, one notification, never two: the log is keyed by the event
//! id, written before sending, and the event id goes to the email
//! provider (`webhook_url`) as the `Idempotency-Key`. Without a provider,
//! notifications are only logged (status `logged`).
//!
//! Exports `agora:shop/notifications`: a user's log, and the notifications
//! of many orders in one call.

use agora_sdk::prelude::*;
use serde::Deserialize;

mod shop {
    wit_bindgen::generate!({
        path: "../../wit/shop",
        world: "notifications-service",
        additional_derives: [serde::Serialize, serde::Deserialize],
    });
}

use shop::agora::shop::users;
use shop::exports::agora::shop::notifications::{self, Notification};

struct Notifications;

impl Service for Notifications {
    fn router() -> Router {
        Router::new().get("/notifications", list)
    }

    fn migrations() -> Vec<Migration> {
        vec![
            Migration::new(
                "0001_notifications",
                include_str!("../migrations/0001_notifications.sql"),
            ),
            Migration::new(
                "0002_order_id",
                include_str!("../migrations/0002_order_id.sql"),
            ),
            Migration::new(
                "0003_contacts",
                include_str!("../migrations/0003_contacts.sql"),
            ),
        ]
    }

    fn on_message(message: messaging::Message) -> Result<(), String> {
        notify(&message).map_err(|e| e.to_string())
    }
}

agora_sdk::service!(Notifications);

impl notifications::Guest for Notifications {
    fn of_user(user_id: String, limit: u32) -> Result<Vec<Notification>, String> {
        recent(&user_id, i64::from(limit).min(MAX_LISTED)).map_err(|e| e.message)
    }

    fn of_orders(order_ids: Vec<String>) -> Result<Vec<Notification>, String> {
        storage::query_keys(
            &format!(
                "SELECT {COLUMNS} FROM notifications WHERE order_id IN ({{keys}})
                 ORDER BY created_at DESC, id DESC"
            ),
            &order_ids,
        )
        .and_then(|rows| rows.decode())
        .map_err(|e| e.message)
    }
}

shop::export!(Notifications with_types_in shop);

/// Notifications returned by a listing, newest first.
const MAX_LISTED: i64 = 100;

/// The fields of the events we notify about.
#[derive(Deserialize)]
struct Event {
    user_id: String,
    /// In identity's events: the user's contact.
    email: Option<String>,
    name: Option<String>,
    order_id: Option<String>,
    total_cents: Option<i64>,
    amount_cents: Option<i64>,
    currency: Option<String>,
    reason: Option<String>,
}

fn money(cents: Option<i64>, currency: &Option<String>) -> String {
    let cents = cents.unwrap_or(0);
    format!(
        "{}.{:02} {}",
        cents / 100,
        cents % 100,
        currency.as_deref().unwrap_or("")
    )
}

/// (kind, subject, body) for an event.
fn compose(topic: &str, event: &Event, name: &str) -> Result<(String, String, String)> {
    let order = event.order_id.as_deref().unwrap_or("?");
    let (kind, subject, body) = match topic {
        "user.registered" => (
            "welcome",
            "Welcome to the shop".to_owned(),
            format!("Hello {name}, your account is ready."),
        ),
        "order.created" => (
            "order_received",
            format!("We received your order {order}"),
            format!(
                "Hello {name}, your order of {} is waiting for payment.",
                money(event.total_cents, &event.currency)
            ),
        ),
        "payment.succeeded" => (
            "payment_received",
            format!("Your order {order} is paid"),
            format!(
                "Hello {name}, we received {} for your order.",
                money(event.amount_cents, &event.currency)
            ),
        ),
        "payment.failed" => (
            "payment_failed",
            format!("Payment for your order {order} failed"),
            format!(
                "Hello {name}, the payment failed ({}); the order is cancelled.",
                event.reason.as_deref().unwrap_or("no reason given")
            ),
        ),
        other => {
            return Err(Error::bad_request(format!(
                "notifications does not handle `{other}`"
            )))
        }
    };
    Ok((kind.to_owned(), subject, body))
}

fn notify(message: &messaging::Message) -> Result<()> {
    let event: Event = message.json().map_err(Error::bad_request)?;
    // Only identity's events say where a user's mail goes: whoever may
    // publish an order or payment event must not redirect it.
    let from_identity = matches!(message.topic.as_str(), "user.registered" | "user.updated");
    if let (true, Some(email), Some(name)) = (from_identity, &event.email, &event.name) {
        if !email.is_empty() {
            keep_contact(&event.user_id, email, name, message.published_at)?;
        }
    }
    if message.topic == "user.updated" {
        return Ok(());
    }
    // A redelivered event that was handled needs no contact (whose lookup
    // would fail it while identity is away).
    let known = storage::query(
        "SELECT (SELECT status FROM notifications WHERE id = $1 AND status <> 'pending') AS done,
                (SELECT email FROM contacts WHERE user_id = $2) AS email,
                (SELECT name FROM contacts WHERE user_id = $2) AS name",
        params![&message.id, &event.user_id],
    )?;
    let known = known.first().ok_or_else(|| Error::internal("no row"))?;
    if known.get::<Option<String>>("done")?.is_some() {
        return Ok(());
    }
    let (email, name) = match (known.get("email")?, known.get("name")?) {
        (Some(email), Some(name)) => (email, name),
        _ => {
            let user = users::get(&event.user_id)
                .ok_or_else(|| Error::not_found(format!("no user {} to notify", event.user_id)))?;
            (user.email, user.name)
        }
    };
    let webhook = config::get("webhook_url").filter(|u| !u.is_empty());
    let (kind, subject, body) = compose(&message.topic, &event, &name)?;
    // Without a provider the notification is logged in the one statement;
    // with one it is written `pending` first, so a send that fails or is
    // cut short is tried again, under the same idempotency key. A row left
    // `pending` by a provider since removed is logged now.
    let first_status = if webhook.is_some() {
        "pending"
    } else {
        "logged"
    };
    storage::execute(
        "INSERT INTO notifications (id, user_id, order_id, kind, channel, recipient, subject, body, status, created_at)
         VALUES ($1, $2, $3, $4, 'email', $5, $6, $7, $8, $9)
         ON CONFLICT (id) DO UPDATE SET status = excluded.status WHERE notifications.status = 'pending'",
        params![&message.id, &event.user_id, event.order_id.as_deref(), &kind, &email, &subject, &body, first_status, now_millis()],
    )?;
    let Some(url) = webhook else {
        return Ok(());
    };
    let email = serde_json::json!({ "to": email, "subject": subject, "body": body });
    outbound::post_idempotent("email provider", &url, &message.id, &email)?;
    storage::execute(
        "UPDATE notifications SET status = 'sent' WHERE id = $1",
        params![&message.id],
    )?;
    Ok(())
}

/// Keeps a user's contact as of `as_of` (its event's publication time),
/// unless a newer one is kept already.
fn keep_contact(user_id: &str, email: &str, name: &str, as_of: u64) -> Result<()> {
    storage::execute(
        "INSERT INTO contacts (user_id, email, name, as_of) VALUES ($1, $2, $3, $4)
         ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, name = excluded.name,
             as_of = excluded.as_of
         WHERE contacts.as_of <= excluded.as_of",
        params![user_id, email, name, as_of as i64],
    )?;
    Ok(())
}

const COLUMNS: &str = "id, order_id, kind, channel, recipient, subject, body, status, created_at";

/// The notifications of `user_id`, newest first, at most `limit`.
fn recent(user_id: &str, limit: i64) -> Result<Vec<Notification>> {
    storage::query(
        &format!(
            "SELECT {COLUMNS} FROM notifications
             WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
        ),
        params![user_id, limit],
    )?
    .decode()
}

fn list(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    Ok(Response::ok(&recent(&user.id, MAX_LISTED)?))
}
