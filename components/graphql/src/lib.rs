//! graphql: the whole shop as one GraphQL schema at `/graphql`.
//!
//! Every field is answered by the service that owns its data, called in
//! process through the `agora:shop` interfaces plugins.toml links
//! (identity's `users`, catalog's `inventory`, `orders`, `payments`,
//! `notifications`); this component keeps no data of its own. A linked
//! call instantiates the callee, so a call per order or per item would make
//! a page of orders cost hundreds: resolvers load through request-scoped
//! batch loaders instead ([`loader`]), one call per service and request.
//!
//! `/graphql` is public at the gateway, so products can be browsed without
//! signing in; the gateway still passes the verified user of a valid token,
//! and the fields that need one answer `UNAUTHENTICATED` without it
//! ([`schema`]). Depth and complexity are limited ([`limits`]).
//!
//! GraphQL over HTTP: `POST /graphql` with a JSON body, or `GET /graphql`
//! with `query`, `variables` and `operationName` in the query string. A
//! request that fails before it runs (not a GraphQL request, a syntax or
//! validation error, over a limit) answers 400 with `errors` and no
//! `data`; once it runs, 200, with the errors of fields beside the data.
//! `GET /graphql/schema` serves the schema as SDL.
//!
//! async-graphql resolves with futures, but this guest has no reactor:
//! every host call blocks and returns, so no future ever waits, and [`run`]
//! just polls one to completion.

mod limits;
mod loader;
mod schema;

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use agora_sdk::prelude::*;
use async_graphql::{Name, PathSegment, Value};
use serde::Deserialize;

mod shop {
    wit_bindgen::generate!({ path: "../../wit/shop", world: "graphql" });
}

struct Graphql;

impl Service for Graphql {
    fn router() -> Router {
        Router::new()
            .post("/graphql", post)
            .get("/graphql", get)
            .get("/graphql/schema", sdl)
    }
}

agora_sdk::service!(Graphql);

/// A GraphQL request: the JSON body of a POST, or a GET's query string.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GraphqlRequest {
    query: String,
    #[serde(default)]
    variables: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    operation_name: Option<String>,
}

fn post(req: &Request) -> Result<Response> {
    Ok(match serde_json::from_slice(&req.body) {
        Ok(request) => execute(req, request),
        Err(e) => request_error(format!(
            "the body is not a GraphQL request ({{\"query\": \"...\"}}): {e}"
        )),
    })
}

fn get(req: &Request) -> Result<Response> {
    let Some(query) = req.query("query") else {
        return Ok(request_error(
            "`query` is required: GET /graphql?query={...}, or POST a JSON body",
        ));
    };
    let variables = match req.query("variables").map(serde_json::from_str).transpose() {
        Ok(variables) => variables,
        Err(e) => {
            return Ok(request_error(format!(
                "`variables` is not a JSON object: {e}"
            )))
        }
    };
    let request = GraphqlRequest {
        query: query.to_owned(),
        variables,
        operation_name: req.query("operationName").map(str::to_owned),
    };
    Ok(execute(req, request))
}

fn sdl(_: &Request) -> Result<Response> {
    Ok(Response::text(200, schema::build().sdl()))
}

fn execute(req: &Request, body: GraphqlRequest) -> Response {
    let mut request = async_graphql::Request::new(body.query)
        .variables(async_graphql::Variables::from_json(
            body.variables.unwrap_or_default().into(),
        ))
        .data(schema::Loaders::default());
    if let Some(name) = body.operation_name {
        request = request.operation_name(name);
    }
    if let Some(user) = req.user() {
        request = request.data(user);
    }
    let mut response = run(schema::build().execute(request));
    // A request error has no `data` at all, and none of its errors is a
    // field's (with a path); a field error comes with the rest of the data.
    let ran = response.data != Value::Null || response.errors.iter().any(|e| !e.path.is_empty());
    if !ran {
        return Response::json(400, &serde_json::json!({ "errors": response.errors }));
    }
    for error in &response.errors {
        null_failed_field(&mut response.data, &error.path);
    }
    Response::ok(&response)
}

/// Puts the field at `path` in `data` as null where it is missing:
/// async-graphql leaves a field that failed out of its object, where
/// GraphQL (and clients that check for every field asked) want null.
fn null_failed_field(data: &mut Value, path: &[PathSegment]) {
    let Some((PathSegment::Field(field), parents)) = path.split_last() else {
        return;
    };
    if *data == Value::Null {
        // Every field of the query failed.
        *data = Value::Object(Default::default());
    }
    let parent = parents
        .iter()
        .try_fold(data, |value, segment| match (segment, value) {
            (PathSegment::Field(name), Value::Object(fields)) => fields.get_mut(name.as_str()),
            (PathSegment::Index(i), Value::List(items)) => items.get_mut(*i),
            _ => None,
        });
    if let Some(Value::Object(fields)) = parent {
        fields.entry(Name::new(field)).or_insert(Value::Null);
    }
}

/// 400 for what is not a GraphQL request, in GraphQL's error shape.
fn request_error(message: impl Into<String>) -> Response {
    Response::json(
        400,
        &serde_json::json!({
            "errors": [{ "message": message.into(), "extensions": { "code": "BAD_REQUEST" } }]
        }),
    )
}

/// Polls a future that never waits (see the module docs) to its output.
fn run<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
}
