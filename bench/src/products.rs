//! `GET /products/{id}` and `GET /products` on the shop of plugins.toml,
//! with the gateway's response cache (the catalog's `response_cache` rule)
//! and without it (the rule removed), under the in-process client and wrk;
//! and without it with fresh instances (the catalog's `limits.reuse`
//! removed too). Without the cache every request goes to a catalog
//! instance, which reads its own cache (the embedded one here) and, on a
//! miss, SQLite; with it the host answers from the cache backend alone.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::checkout::{call, sign_up, start_shop};
use crate::{load, wrk};

/// Products in the catalog while it is measured.
const PRODUCTS: usize = 20;

pub async fn products(scratch: &Path, duration: Duration, connections: usize) -> Result<()> {
    println!(
        "\n## GET /products: with and without the response cache, {connections} connections, {}s each",
        duration.as_secs()
    );
    // The shop as configured (the catalog reuses instances), without the
    // gateway's response cache, and without reuse either.
    for (label, dropped) in [
        ("cached", &[][..]),
        ("uncached", &["response_cache = "][..]),
        ("fresh", &["response_cache = ", "limits = { reuse"][..]),
    ] {
        let dir = scratch.join(format!("products-{label}"));
        let (_servers, addrs, _) = start_shop(&dir, "", 1, |config| {
            config
                .lines()
                .filter(|l| !dropped.iter().any(|d| l.starts_with(d)))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .await?;
        let addr = addrs[0];
        let admin = sign_up(addr, "admin@example.com", "admin-password").await?;
        let mut first = None;
        for i in 0..PRODUCTS {
            let product = json!({"name": format!("Lamp {i}"), "description": "bench", "price_cents": 1000 + i, "stock": 100});
            let (status, body) =
                call(addr, "POST", "/products", Some(&admin), Some(product)).await?;
            if status != 201 {
                bail!("creating a product: {status} {body}");
            }
            first.get_or_insert(body["id"].as_str().context("product id")?.to_owned());
        }
        for path in [
            format!("/products/{}", first.clone().unwrap_or_default()),
            "/products".to_owned(),
        ] {
            let shown = if path == "/products" {
                "/products"
            } else {
                "/products/{id}"
            };
            let (count, failures) = load(addr, &path, duration, connections).await;
            println!(
                "{label:<9} {shown:<16} {:>9.0} req/s  ({count} ok, {failures} failed; in-process client)",
                count as f64 / duration.as_secs_f64()
            );
            match wrk(addr, &path, duration, connections) {
                Ok((_, summary)) => println!("{label:<9} {shown:<16} {summary} (wrk)"),
                Err(e) => println!("{label:<9} {shown:<16} wrk skipped: {e:#}"),
            }
        }
    }
    Ok(())
}
