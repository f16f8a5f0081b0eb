//! `POST /graphql`: the queries `orders` and `order(id)`, with items and
//! status, for the signed-in user (an admin may read any order by id).

use std::future::Future;
use std::pin::pin;
use std::task::{Context as TaskContext, Poll, Waker};

use agora_sdk::prelude::*;
use async_graphql::{Context, EmptyMutation, EmptySubscription, Object, Schema, ID};

use crate::{find_orders, visible_order, Order};

struct Query;

fn fail(e: Error) -> async_graphql::Error {
    async_graphql::Error::new(e.message)
}

#[Object]
impl Query {
    /// The signed-in user's orders, newest first.
    async fn orders(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Order>> {
        let user = ctx.data::<User>()?;
        Ok(find_orders(&user.id, None)
            .map_err(fail)?
            .into_iter()
            .map(|(_, o)| o)
            .collect())
    }

    /// One order, if it is the user's (or the user is an admin).
    async fn order(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Order>> {
        let user = ctx.data::<User>()?;
        visible_order(user, &id).map_err(fail)
    }
}

/// Runs a future that never waits: every resolver here is synchronous
/// underneath (host calls block), so there is no reactor to drive.
fn run<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = TaskContext::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
}

pub fn handle(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    let request: async_graphql::Request = req.json()?;
    let schema = Schema::build(Query, EmptyMutation, EmptySubscription)
        .data(user)
        .finish();
    let response = run(schema.execute(request));
    Ok(Response::ok(&response))
}
