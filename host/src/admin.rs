//! The admin API, on its own listener (loopback by default): deploy,
//! rollback, reload, and inspection of components and topics. The CLI's
//! `deploy`, `rollback` and `events` commands are clients of it.
//!
//! - `GET  /components`
//! - `POST /components/{name}/deploy` (body: the .wasm binary)
//! - `POST /components/{name}/rollback`
//! - `POST /reload` (re-read plugins.toml and component files)
//! - `GET  /topics/{topic}/events?from=N&limit=N`
//! - `GET  /topics/{topic}/subscribers/{component}` (progress: next offset and end, per partition)
//! - `POST /topics/{topic}/subscribers/{component}/rewind?to=N` (redeliver from N)

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;

use crate::response::{self, Body};
use crate::runtime::Runtime;
use crate::server::read_body;

/// Largest binary accepted by `deploy`.
const MAX_DEPLOY_BYTES: usize = 256 * 1024 * 1024;
/// Events returned per inspection call unless `limit` says otherwise.
const DEFAULT_EVENTS: usize = 100;

pub async fn handle(runtime: Arc<Runtime>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, ["components"]) => components(&runtime),
        (&Method::POST, ["components", name, "deploy"]) => deploy(&runtime, name, request).await,
        (&Method::POST, ["components", name, "rollback"]) => match runtime.rollback(name).await {
            Ok(v) => response::json(
                StatusCode::OK,
                &json!({"component": v.name, "version": v.version}),
            ),
            Err(e) => refused(StatusCode::CONFLICT, e),
        },
        (&Method::POST, ["reload"]) => match runtime.reconcile().await {
            Ok(()) => components(&runtime),
            Err(e) => refused(StatusCode::UNPROCESSABLE_ENTITY, e),
        },
        (&Method::GET, ["topics", topic, "events"]) => {
            events(&runtime, topic, request.uri().query()).await
        }
        (&Method::GET, ["topics", topic, "subscribers", component]) => {
            match runtime
                .capabilities
                .messaging
                .progress(component, topic)
                .await
            {
                Ok(partitions) => {
                    let partitions: Vec<_> = partitions
                        .into_iter()
                        .map(|(partition, next, end)| {
                            json!({"partition": partition, "next": next, "end": end, "caught_up": next >= end})
                        })
                        .collect();
                    response::json(
                        StatusCode::OK,
                        &json!({"topic": topic, "subscriber": component, "partitions": partitions}),
                    )
                }
                Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        (&Method::POST, ["topics", topic, "subscribers", component, "rewind"]) => {
            let to = query_param(request.uri().query(), "to").unwrap_or(0);
            match runtime
                .capabilities
                .messaging
                .rewind(component, topic, to)
                .await
            {
                Ok(()) => response::json(
                    StatusCode::OK,
                    &json!({"topic": topic, "subscriber": component, "next": to}),
                ),
                Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        _ => response::error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint {method} {path}"),
        ),
    };
    tracing::info!(target: "agora::admin", %method, %path, status = response.status().as_u16());
    response
}

fn refused(status: StatusCode, error: anyhow::Error) -> Response<Body> {
    tracing::error!(error = %format!("{error:#}"), "admin request refused");
    response::error(status, "refused", format!("{error:#}"))
}

fn components(runtime: &Runtime) -> Response<Body> {
    let registry = runtime.registry();
    let list: Vec<_> = registry
        .components
        .values()
        .map(|c| {
            json!({
                "name": c.name,
                "version": c.version,
                "routes": c.spec.routes,
                "previous_versions": runtime.previous_versions(&c.name),
            })
        })
        .collect();
    response::json(
        StatusCode::OK,
        &json!({ "components": list, "pooling_allocator": runtime.pooling }),
    )
}

async fn deploy(runtime: &Runtime, name: &str, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let request = match read_body(request, MAX_DEPLOY_BYTES).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let wasm = match request.into_body().collect().await {
        Ok(body) => body.to_bytes().to_vec(),
        Err(never) => match never {},
    };
    match runtime.deploy(name, wasm).await {
        Ok(v) => {
            let swap_ms = started.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(component = %name, version = %v.version, swap_ms, "deployed");
            response::json(
                StatusCode::OK,
                &json!({"component": v.name, "version": v.version, "swap_ms": swap_ms}),
            )
        }
        Err(e) => refused(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

fn query_param(query: Option<&str>, key: &str) -> Option<u64> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse::<u64>().ok())
}

async fn events(runtime: &Runtime, topic: &str, query: Option<&str>) -> Response<Body> {
    let from = query_param(query, "from").unwrap_or(0);
    let limit = query_param(query, "limit").map_or(DEFAULT_EVENTS, |n| n as usize);
    match runtime
        .capabilities
        .messaging
        .read_topic(topic, from, limit)
        .await
    {
        Ok(events) => {
            let events: Vec<_> = events
                .into_iter()
                .map(|(offset, e)| {
                    json!({
                        "offset": offset,
                        "id": e.id,
                        "key": e.key,
                        "headers": e.headers.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                        "payload": String::from_utf8_lossy(&e.payload),
                        "published_at": e.published_at,
                    })
                })
                .collect();
            response::json(StatusCode::OK, &json!({ "topic": topic, "events": events }))
        }
        Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}
