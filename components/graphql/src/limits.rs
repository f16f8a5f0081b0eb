//! Depth and complexity limits, checked before a query runs.
//!
//! async-graphql's own `limit_depth` and `limit_complexity` refuse with
//! "Query is nested too deep." and no numbers; this extension checks the
//! depth and complexity that validation measured and names both the
//! measure and the limit, so a client knows how far over it is.
//!
//! Depth: the shop's data nests at most four levels (`orders { items {
//! product { name } } }`), since no type leads back to another; what nests
//! deeper is introspection, whose standard query takes 13 levels (15 with
//! the newer clients that unwrap nine type wrappers). The limit is that.
//! Complexity counts every field once and a list field (`products`,
//! `orders`, `notifications`) its `first` times its selection, so it bounds
//! how many values a query can ask for; the standard introspection query
//! (with nine type wrappers) is 217.

use std::sync::Arc;

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextValidation};
use async_graphql::{ServerError, ValidationResult};

pub const MAX_DEPTH: usize = 15;
pub const MAX_COMPLEXITY: usize = 1000;

pub struct Limits;

impl ExtensionFactory for Limits {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(Limits)
    }
}

#[async_trait::async_trait]
impl Extension for Limits {
    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        let measured = next.run(ctx).await?;
        let mut errors = Vec::new();
        if measured.depth > MAX_DEPTH {
            errors.push(over_limit(
                "QUERY_TOO_DEEP",
                format!(
                    "the query is nested {} levels deep; at most {MAX_DEPTH} are allowed",
                    measured.depth
                ),
            ));
        }
        if measured.complexity > MAX_COMPLEXITY {
            errors.push(over_limit(
                "QUERY_TOO_COMPLEX",
                format!(
                    "the query's complexity is {}; at most {MAX_COMPLEXITY} is allowed \
                     (a field counts 1, a list its `first` times its fields: ask for fewer)",
                    measured.complexity
                ),
            ));
        }
        if errors.is_empty() {
            Ok(measured)
        } else {
            Err(errors)
        }
    }
}

fn over_limit(code: &str, message: String) -> ServerError {
    let mut error = ServerError::new(message, None);
    let mut extensions = async_graphql::ErrorExtensionValues::default();
    extensions.set("code", code);
    error.extensions = Some(extensions);
    error
}

#[cfg(test)]
mod tests {
    use crate::{run, schema};

    /// The introspection query of graphql-js 16 (GraphiQL's), unwrapping
    /// nine type wrappers as newer clients do.
    const INTROSPECTION: &str = r#"
        query IntrospectionQuery {
          __schema {
            queryType { name } mutationType { name } subscriptionType { name }
            types { ...FullType }
            directives { name description locations args { ...InputValue } }
          }
        }
        fragment FullType on __Type {
          kind name description
          fields(includeDeprecated: true) {
            name description args { ...InputValue } type { ...TypeRef }
            isDeprecated deprecationReason
          }
          inputFields { ...InputValue }
          interfaces { ...TypeRef }
          enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
          possibleTypes { ...TypeRef }
        }
        fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
        fragment TypeRef on __Type {
          kind name ofType { kind name ofType { kind name ofType { kind name ofType {
          kind name ofType { kind name ofType { kind name ofType { kind name ofType {
          kind name ofType { kind name } } } } } } } } }
        }"#;

    fn errors(query: &str) -> Vec<String> {
        run(schema::build().execute(query))
            .errors
            .into_iter()
            .map(|e| e.message)
            .collect()
    }

    #[test]
    fn the_standard_introspection_query_is_within_the_limits() {
        assert_eq!(errors(INTROSPECTION), Vec::<String>::new());
    }

    #[test]
    fn a_query_over_a_limit_is_told_by_how_much() {
        let deep = format!(
            "{{ __schema {{ types {{ {}name{} }} }} }}",
            "ofType { ".repeat(14),
            " }".repeat(14)
        );
        assert_eq!(
            errors(&deep),
            ["the query is nested 17 levels deep; at most 15 are allowed"]
        );
        // 100 × (total + items + its six fields), and 100 × three fields.
        let wide = "{ products(first: 100) { total items { id name description priceCents currency stock } } \
                    orders(first: 100) { id status totalCents } }";
        let told = errors(wide);
        assert!(
            told.len() == 1 && told[0].starts_with("the query's complexity is 1100; at most 1000"),
            "{told:?}"
        );
    }
}
