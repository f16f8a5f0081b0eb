//! The schema: each type wraps the record of the `agora:shop` interface
//! that carries it, and each field that crosses to another service loads
//! through the request's [`Loaders`].
//!
//! Fields that need a signed-in user (`me`, `orders`, `order`,
//! `notifications`) are nullable, so that without one they answer null
//! with an `UNAUTHENTICATED` error and the public fields of the same query
//! still answer. Who may see an order is the orders service's rule, the
//! same as its REST API's.

use std::collections::HashMap;

use agora_sdk::prelude::User;
use async_graphql::{
    Context, EmptyMutation, EmptySubscription, ErrorExtensions, Object, Result, Schema, ID,
};

use crate::limits::Limits;
use crate::loader::BatchLoader;
use crate::shop::agora::shop::{inventory, notifications, orders, payments, users};

pub type ShopSchema = Schema<Query, EmptyMutation, EmptySubscription>;

pub fn build() -> ShopSchema {
    Schema::build(Query, EmptyMutation, EmptySubscription)
        .extension(Limits)
        .finish()
}

/// Items of a list field unless `first` says otherwise.
const DEFAULT_FIRST: u32 = 20;

/// A field error with `extensions.code`, which clients branch on.
fn error(code: &'static str, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code))
}

/// The error of a linked service, naming it.
fn unavailable(service: &'static str) -> impl Fn(String) -> async_graphql::Error {
    move |e| error("UNAVAILABLE", format!("{service}: {e}"))
}

fn signed_in<'a>(ctx: &'a Context<'_>) -> Result<&'a User> {
    ctx.data_opt::<User>().ok_or_else(|| {
        error(
            "UNAUTHENTICATED",
            "this field needs a signed-in user: send a valid bearer token",
        )
    })
}

/// The loaders of one request: one linked call per kind of value.
pub struct Loaders {
    products: BatchLoader<inventory::Product>,
    payments: BatchLoader<payments::Payment>,
    /// By order id.
    notifications: BatchLoader<Vec<notifications::Notification>>,
}

impl Default for Loaders {
    fn default() -> Loaders {
        Loaders {
            products: BatchLoader::new(|ids| {
                Ok(inventory::lookup(ids)?
                    .into_iter()
                    .map(|p| (p.id.clone(), p))
                    .collect())
            }),
            payments: BatchLoader::new(|order_ids| {
                Ok(payments::of_orders(order_ids)?
                    .into_iter()
                    .map(|p| (p.order_id.clone(), p))
                    .collect())
            }),
            notifications: BatchLoader::new(|order_ids| {
                let mut by_order: HashMap<String, Vec<_>> = HashMap::new();
                for n in notifications::of_orders(order_ids)? {
                    if let Some(order_id) = n.order_id.clone() {
                        by_order.entry(order_id).or_default().push(n);
                    }
                }
                Ok(by_order)
            }),
        }
    }
}

fn loaders<'a>(ctx: &'a Context<'_>) -> &'a Loaders {
    ctx.data_unchecked::<Loaders>()
}

/// Wraps loaded orders, announcing their products, payments and
/// notifications to the loaders.
fn announce(ctx: &Context<'_>, orders: Vec<orders::Order>) -> Vec<Order> {
    let loaders = loaders(ctx);
    let ids = || orders.iter().map(|o| o.id.clone());
    loaders.payments.want(ids());
    loaders.notifications.want(ids());
    loaders.products.want(
        orders
            .iter()
            .flat_map(|o| o.items.iter().map(|i| i.product_id.clone())),
    );
    orders.into_iter().map(Order).collect()
}

pub struct Query;

#[Object]
impl Query {
    /// Products whose name or description contains `search` (ignoring
    /// case), by name: `first` of them from the `offset`th. Public.
    #[graphql(complexity = "first as usize * child_complexity")]
    async fn products(
        &self,
        search: Option<String>,
        #[graphql(default)] offset: u32,
        #[graphql(default_with = "DEFAULT_FIRST", validator(minimum = 1, maximum = 100))]
        first: u32,
    ) -> Result<ProductPage> {
        let page = inventory::search(search.as_deref().unwrap_or(""), offset, first)
            .map_err(unavailable("catalog"))?;
        Ok(ProductPage(page))
    }

    /// The product with this id. Public.
    async fn product(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Product>> {
        let product = loaders(ctx)
            .products
            .load(&id)
            .map_err(unavailable("catalog"))?;
        Ok(product.map(Product))
    }

    /// The signed-in user.
    async fn me(&self, ctx: &Context<'_>) -> Result<Option<Profile>> {
        let user = signed_in(ctx)?;
        Ok(users::get(&user.id).map(|profile| Profile {
            profile,
            roles: user.roles.clone(),
        }))
    }

    /// The signed-in user's orders, newest first.
    #[graphql(complexity = "first as usize * child_complexity")]
    async fn orders(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "DEFAULT_FIRST", validator(minimum = 1, maximum = 100))]
        first: u32,
    ) -> Result<Option<Vec<Order>>> {
        let user = signed_in(ctx)?;
        let orders = orders::of_user(&user.id, first).map_err(unavailable("orders"))?;
        Ok(Some(announce(ctx, orders)))
    }

    /// One order, if it is the signed-in user's (or the user is an admin).
    async fn order(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Order>> {
        let user = signed_in(ctx)?;
        let viewer = orders::Viewer {
            id: user.id.clone(),
            roles: user.roles.clone(),
        };
        let order = orders::get(&id, &viewer).map_err(unavailable("orders"))?;
        Ok(announce(ctx, order.into_iter().collect()).pop())
    }

    /// The signed-in user's notifications, newest first.
    #[graphql(complexity = "first as usize * child_complexity")]
    async fn notifications(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "DEFAULT_FIRST", validator(minimum = 1, maximum = 100))]
        first: u32,
    ) -> Result<Option<Vec<Notification>>> {
        let user = signed_in(ctx)?;
        let notifications =
            notifications::of_user(&user.id, first).map_err(unavailable("notifications"))?;
        Ok(Some(notifications.into_iter().map(Notification).collect()))
    }
}

pub struct Profile {
    profile: users::User,
    roles: Vec<String>,
}

/// A user's profile.
#[Object(name = "User")]
impl Profile {
    async fn id(&self) -> &str {
        &self.profile.id
    }

    async fn email(&self) -> &str {
        &self.profile.email
    }

    async fn name(&self) -> &str {
        &self.profile.name
    }

    /// `customer`, and `admin` for administrators.
    async fn roles(&self) -> &[String] {
        &self.roles
    }
}

pub struct ProductPage(inventory::ProductPage);

/// One page of a product search.
#[Object]
impl ProductPage {
    /// How many products match, on all pages.
    async fn total(&self) -> u64 {
        self.0.total
    }

    async fn items(&self) -> Vec<Product> {
        self.0.items.iter().cloned().map(Product).collect()
    }
}

pub struct Product(inventory::Product);

#[Object]
impl Product {
    async fn id(&self) -> &str {
        &self.0.id
    }

    async fn name(&self) -> &str {
        &self.0.name
    }

    async fn description(&self) -> &str {
        &self.0.description
    }

    /// The current price.
    async fn price_cents(&self) -> i64 {
        self.0.unit_price_cents
    }

    async fn currency(&self) -> &str {
        &self.0.currency
    }

    async fn stock(&self) -> i64 {
        self.0.stock
    }
}

pub struct Order(orders::Order);

#[Object]
impl Order {
    async fn id(&self) -> &str {
        &self.0.id
    }

    /// `pending` until paid, then `paid` or `cancelled`.
    async fn status(&self) -> &str {
        &self.0.status
    }

    async fn items(&self) -> Vec<OrderItem> {
        self.0.items.iter().cloned().map(OrderItem).collect()
    }

    async fn total_cents(&self) -> i64 {
        self.0.total_cents
    }

    async fn currency(&self) -> &str {
        &self.0.currency
    }

    /// Milliseconds since the Unix epoch.
    async fn created_at(&self) -> i64 {
        self.0.created_at
    }

    /// Its payment; none until payments has taken it up.
    async fn payment(&self, ctx: &Context<'_>) -> Result<Option<Payment>> {
        let payment = loaders(ctx)
            .payments
            .load(&self.0.id)
            .map_err(unavailable("payments"))?;
        Ok(payment.map(Payment))
    }

    /// What the customer was told about it, newest first.
    async fn notifications(&self, ctx: &Context<'_>) -> Result<Vec<Notification>> {
        let notifications = loaders(ctx)
            .notifications
            .load(&self.0.id)
            .map_err(unavailable("notifications"))?;
        Ok(notifications
            .unwrap_or_default()
            .into_iter()
            .map(Notification)
            .collect())
    }
}

pub struct OrderItem(orders::Item);

#[Object]
impl OrderItem {
    async fn product_id(&self) -> &str {
        &self.0.product_id
    }

    async fn quantity(&self) -> u32 {
        self.0.quantity
    }

    /// The price when the order was placed.
    async fn unit_price_cents(&self) -> i64 {
        self.0.unit_price_cents
    }

    /// The product as it is now.
    async fn product(&self, ctx: &Context<'_>) -> Result<Option<Product>> {
        let product = loaders(ctx)
            .products
            .load(&self.0.product_id)
            .map_err(unavailable("catalog"))?;
        Ok(product.map(Product))
    }
}

pub struct Payment(payments::Payment);

#[Object]
impl Payment {
    /// `charging` while the provider is asked, then `succeeded` or `failed`.
    async fn status(&self) -> &str {
        &self.0.status
    }

    async fn amount_cents(&self) -> i64 {
        self.0.amount_cents
    }

    async fn currency(&self) -> &str {
        &self.0.currency
    }

    /// Why a failed charge failed.
    async fn reason(&self) -> Option<&str> {
        self.0.reason.as_deref()
    }

    /// The provider's reference of a successful charge.
    async fn reference(&self) -> Option<&str> {
        self.0.reference.as_deref()
    }
}

pub struct Notification(notifications::Notification);

#[Object]
impl Notification {
    /// The id of the event it is about.
    async fn id(&self) -> &str {
        &self.0.id
    }

    /// The order it is about, if any.
    async fn order_id(&self) -> Option<&str> {
        self.0.order_id.as_deref()
    }

    /// `welcome`, `order_received`, `payment_received` or `payment_failed`.
    async fn kind(&self) -> &str {
        &self.0.kind
    }

    /// `email`.
    async fn channel(&self) -> &str {
        &self.0.channel
    }

    /// The address it went to.
    async fn recipient(&self) -> &str {
        &self.0.recipient
    }

    async fn subject(&self) -> &str {
        &self.0.subject
    }

    async fn body(&self) -> &str {
        &self.0.body
    }

    /// `pending` until sent, then `sent` or `logged` (no provider).
    async fn status(&self) -> &str {
        &self.0.status
    }

    /// Milliseconds since the Unix epoch.
    async fn created_at(&self) -> i64 {
        self.0.created_at
    }
}
