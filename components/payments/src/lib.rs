//! payments: charges each order once, on `order.created`.
//!
//! Never twice, however often the event is redelivered: a `charging` row is
//! written before the provider is called and the order id goes to the
//! provider as the `Idempotency-Key`, so a retry after a crash asks the
//! provider about the same charge instead of making a new one; a settled
//! row ends the matter. The outcome and its event (`payment.succeeded` or
//! `payment.failed`) are written in one transaction.
//!
//! The provider is `provider_url` (POST `{order_id, amount_cents, currency}`,
//! answering `{status: "approved"|"declined", reference?, reason?}`); without
//! one, a simulator approves totals up to `decline_above_cents`.
//!
//! Exports `agora:shop/payments`: the payments of many orders in one call.

use agora_sdk::prelude::*;
use serde::Deserialize;

mod shop {
    wit_bindgen::generate!({
        path: "../../wit/shop",
        world: "payments-service",
        additional_derives: [serde::Serialize, serde::Deserialize],
    });
}

use shop::exports::agora::shop::payments::{self, Payment};

struct Payments;

impl Service for Payments {
    fn router() -> Router {
        Router::new().get("/payments/{order_id}", show)
    }

    fn migrations() -> Vec<Migration> {
        vec![Migration::new(
            "0001_payments",
            include_str!("../migrations/0001_payments.sql"),
        )]
    }

    fn on_message(message: messaging::Message) -> Result<(), String> {
        match message.topic.as_str() {
            "order.created" => charge(&message.json()?).map_err(|e| e.to_string()),
            other => Err(format!("payments does not handle `{other}`")),
        }
    }
}

agora_sdk::service!(Payments);

impl payments::Guest for Payments {
    fn of_orders(order_ids: Vec<String>) -> Result<Vec<Payment>, String> {
        storage::query_keys(
            &format!("SELECT {COLUMNS} FROM payments WHERE order_id IN ({{keys}})"),
            &order_ids,
        )
        .and_then(|rows| rows.decode())
        .map_err(|e| e.message)
    }
}

shop::export!(Payments with_types_in shop);

#[derive(Deserialize)]
struct OrderCreated {
    order_id: String,
    user_id: String,
    total_cents: i64,
    currency: String,
}

enum Outcome {
    Approved { reference: String },
    Declined { reason: String },
}

fn charge(order: &OrderCreated) -> Result<()> {
    let started = storage::execute(
        "INSERT INTO payments (order_id, user_id, amount_cents, currency, status, created_at)
         VALUES ($1, $2, $3, $4, 'charging', $5) ON CONFLICT (order_id) DO NOTHING",
        params![
            &order.order_id,
            &order.user_id,
            order.total_cents,
            &order.currency,
            now_millis()
        ],
    )?;
    if started == 0 {
        // A redelivered event: done already, or a charge was under way when
        // we stopped, which asks the provider again.
        let rows = storage::query(
            "SELECT status FROM payments WHERE order_id = $1",
            params![&order.order_id],
        )?;
        if let Some("succeeded" | "failed") = rows
            .first()
            .map(|r| r.get::<String>("status"))
            .transpose()?
            .as_deref()
        {
            return Ok(());
        }
    }
    let outcome = match config::get("provider_url").filter(|u| !u.is_empty()) {
        Some(url) => provider(&url, order)?,
        None => simulate(order)?,
    };
    let (status, topic, reason, reference) = match &outcome {
        Outcome::Approved { reference } => (
            "succeeded",
            "payment.succeeded",
            None,
            Some(reference.as_str()),
        ),
        Outcome::Declined { reason } => ("failed", "payment.failed", Some(reason.as_str()), None),
    };
    let tx = storage::begin()?;
    let settled = tx.execute(
        "UPDATE payments SET status = $1, reason = $2, reference = $3 WHERE order_id = $4 AND status = 'charging'",
        params![status, reason, reference, &order.order_id],
    )?;
    if settled == 1 {
        tx.publish(
            topic,
            Some(&order.order_id),
            &serde_json::json!({
                "order_id": order.order_id,
                "user_id": order.user_id,
                "amount_cents": order.total_cents,
                "currency": order.currency,
                "reason": reason,
                "reference": reference,
            }),
        )?;
        tx.commit()?;
    }
    Ok(())
}

fn simulate(order: &OrderCreated) -> Result<Outcome> {
    let limit: Option<i64> = config::get_json("decline_above_cents")?;
    Ok(match limit {
        Some(limit) if order.total_cents > limit => Outcome::Declined {
            reason: format!("the amount exceeds the simulator's limit of {limit} cents"),
        },
        _ => Outcome::Approved {
            reference: format!("sim-{}", order.order_id),
        },
    })
}

#[derive(Deserialize)]
struct ProviderReply {
    status: String,
    reference: Option<String>,
    reason: Option<String>,
}

fn provider(url: &str, order: &OrderCreated) -> Result<Outcome> {
    let body = serde_json::json!({
        "order_id": order.order_id,
        "amount_cents": order.total_cents,
        "currency": order.currency,
    });
    let response = outbound::post_idempotent("payment provider", url, &order.order_id, &body)?;
    let reply: ProviderReply = serde_json::from_slice(&response.body).map_err(|e| {
        Error::unavailable(format!("the payment provider's answer is malformed: {e}"))
    })?;
    Ok(match reply.status.as_str() {
        "approved" => Outcome::Approved {
            reference: reply.reference.unwrap_or_default(),
        },
        _ => Outcome::Declined {
            reason: reply
                .reason
                .unwrap_or_else(|| "declined by the payment provider".into()),
        },
    })
}

const COLUMNS: &str = "order_id, user_id, status, amount_cents, currency, reason, reference";

fn show(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    let order_id = req.param("order_id");
    let rows = storage::query(
        &format!("SELECT {COLUMNS} FROM payments WHERE order_id = $1"),
        params![order_id],
    )?;
    let row = rows
        .first()
        .filter(|r| {
            user.is_admin()
                || r.get::<String>("user_id")
                    .is_ok_and(|owner| owner == user.id)
        })
        .ok_or_else(|| Error::not_found(format!("no payment for order {order_id}")))?;
    Ok(Response::ok(&row.decode::<Payment>()?))
}
