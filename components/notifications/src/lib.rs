//! notifications: an email for each account, order and payment event,
//! looked up through `agora:shop/users`, with a delivery log per user.
//!
//! One event, one notification, never two: the log is keyed by the event
//! id, written before sending, and the event id goes to the email
//! provider (`webhook_url`) as the `Idempotency-Key`. Without a provider,
//! notifications are only logged (status `logged`).

use agora_sdk::prelude::*;
use serde::{Deserialize, Serialize};

mod shop {
    wit_bindgen::generate!({ path: "../../wit/shop", world: "notifications" });
}

use shop::agora::shop::users;

struct Notifications;

impl Service for Notifications {
    fn router() -> Router {
        Router::new().get("/notifications", list)
    }

    fn migrations() -> Vec<Migration> {
        vec![Migration::new(
            "0001_notifications",
            include_str!("../migrations/0001_notifications.sql"),
        )]
    }

    fn on_message(message: messaging::Message) -> Result<(), String> {
        notify(&message).map_err(|e| e.to_string())
    }
}

agora_sdk::service!(Notifications);

/// The fields of the events we notify about.
#[derive(Deserialize)]
struct Event {
    user_id: String,
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
    let done = storage::query(
        "SELECT status FROM notifications WHERE id = $1 AND status <> 'pending'",
        params![&message.id],
    )?;
    if !done.is_empty() {
        return Ok(());
    }
    let event: Event = message.json().map_err(Error::bad_request)?;
    let user = users::get(&event.user_id)
        .ok_or_else(|| Error::not_found(format!("no user {} to notify", event.user_id)))?;
    let (kind, subject, body) = compose(&message.topic, &event, &user.name)?;
    storage::execute(
        "INSERT INTO notifications (id, user_id, kind, channel, recipient, subject, body, status, created_at)
         VALUES ($1, $2, $3, 'email', $4, $5, $6, 'pending', $7) ON CONFLICT (id) DO NOTHING",
        params![&message.id, &user.id, &kind, &user.email, &subject, &body, now_millis()],
    )?;
    let status = match config::get("webhook_url").filter(|u| !u.is_empty()) {
        Some(url) => {
            let email = serde_json::json!({ "to": user.email, "subject": subject, "body": body });
            let sent = outbound::send(
                "POST",
                &url,
                &[
                    ("content-type", "application/json"),
                    ("idempotency-key", &message.id),
                ],
                email.to_string().as_bytes(),
            )?;
            if !(200..300).contains(&sent.status) {
                return Err(Error::unavailable(format!(
                    "the email provider answered {}",
                    sent.status
                )));
            }
            "sent"
        }
        None => "logged",
    };
    storage::execute(
        "UPDATE notifications SET status = $1 WHERE id = $2",
        params![status, &message.id],
    )?;
    Ok(())
}

#[derive(Serialize)]
struct Notification {
    id: String,
    kind: String,
    channel: String,
    recipient: String,
    subject: String,
    body: String,
    status: String,
    created_at: i64,
}

fn list(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    let rows = storage::query(
        "SELECT id, kind, channel, recipient, subject, body, status, created_at FROM notifications
         WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT 100",
        params![&user.id],
    )?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(Notification {
                id: r.get("id")?,
                kind: r.get("kind")?,
                channel: r.get("channel")?,
                recipient: r.get("recipient")?,
                subject: r.get("subject")?,
                body: r.get("body")?,
                status: r.get("status")?,
                created_at: r.get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Response::ok(&items))
}
