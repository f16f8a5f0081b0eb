//! The gateway's response cache: a route's GET responses kept in the cache
//! backend (`response_cache` in plugins.toml) and answered by the host
//! without instantiating the component, until they expire or the component
//! drops them (`cache.invalidate-responses`).
//!
//! Keys are `agora/responses/<component>:<path and query>`, the host and
//! the user, each after a newline, which none of them can hold (a URI, a
//! header value, a user id), so no request can spell another's key. The
//! user is empty for anonymous requests: a personal response can only ever
//! reach its user, whatever the component forgets to say. The host is the
//! one the component sees (the target's authority, else `Host`, in lower
//! case) because a component may build links from it: a client sending a
//! forged one must not get its links served to everyone else. The path is
//! the gateway's canonical one, so no spelling of it misses or splits an
//! entry; it comes first, so invalidating a path prefix reaches every host
//! and user. Targets longer than [`MAX_TARGET`] are not cached: a key's
//! size is the client's to choose. The key space is the host's (no component
//! name holds a `/`), so no component reads or forges another's responses
//! through its own cache keys, and a component's invalidation reaches only
//! its own responses. With Redis the entries, and their invalidation, are
//! shared by every host.
//!
//! What is kept is decided by the component's response, as a shared cache
//! decides (RFC 9111): only a `200` without `Set-Cookie` or `Vary`, and
//! not when `Cache-Control` says `no-store`, `no-cache` or `private`; a
//! `max-age` (or `s-maxage`) shorter than the rule's TTL shortens it. The
//! body is read whole before it is sent (a cacheable response is a small
//! JSON document, and up to `max_body_kib`); a larger one is sent on as it
//! streams. A cache that fails is passed by: the component answers.
//!
//! Trade-off: entries live for their TTL unless invalidated, so data that
//! changes without the component saying so (stock, under checkouts) may be
//! that old when served from the cache. Choose TTLs by what a reader may
//! see late; writes never go through the cache.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use crate::bindings::cache::Error;
use crate::cache::CacheBackend;
use crate::gateway::USER_ID_HEADER;
use crate::metrics::CacheResult;
use crate::plugins::{ComponentSpec, ResponseCacheRule};
use crate::registry::prefix_matches;
use crate::response::Body;

/// Tells the client what the cache did: `hit`, `miss` (kept now) or
/// `uncached` (the response could not be kept).
pub const CACHE_HEADER: &str = "x-agora-cache";

/// The longest path and query whose response is kept: longer ones are
/// someone filling the cache, not a page.
const MAX_TARGET: usize = 2048;

/// The version of the stored format, its first byte.
const FORMAT: u8 = 1;

/// The cache rule for `request`, if its method is GET and a rule covers
/// its path (the longest prefix wins, as for routes).
pub fn rule_for<'a, B>(
    spec: &'a ComponentSpec,
    request: &Request<B>,
) -> Option<&'a ResponseCacheRule> {
    let too_long = request
        .uri()
        .path_and_query()
        .is_some_and(|t| t.as_str().len() > MAX_TARGET);
    if request.method() != http::Method::GET || too_long {
        return None;
    }
    let path = request.uri().path();
    spec.response_cache
        .iter()
        .filter(|rule| prefix_matches(&rule.prefix, path))
        .max_by_key(|rule| rule.prefix.len())
}

/// Where `component`'s responses are kept: a key space of the host's.
fn space(component: &str) -> String {
    format!("agora/responses/{component}:")
}

/// The key of `request`'s response: see the module docs. Call it after the
/// gateway verified the user.
pub fn key<B>(component: &str, request: &Request<B>) -> String {
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
    let host = match request.uri().authority() {
        Some(authority) => authority.as_str(),
        None => header(header::HOST.as_str()).unwrap_or(""),
    };
    let user = header(USER_ID_HEADER).unwrap_or("");
    format!(
        "{}{target}\n{}\n{user}",
        space(component),
        host.to_ascii_lowercase()
    )
}

/// Drops `component`'s responses whose path and query start with `prefix`.
pub async fn invalidate(
    cache: &dyn CacheBackend,
    component: &str,
    prefix: &str,
) -> Result<u64, Error> {
    cache
        .delete_prefix(&format!("{}{prefix}", space(component)))
        .await
}

/// The kept response for `key`, if there is one.
pub async fn lookup(cache: &dyn CacheBackend, key: &str) -> Option<Response<Body>> {
    let stored = match cache.get(key).await {
        Ok(stored) => stored?,
        Err(e) => {
            tracing::warn!(error = ?e, "response cache skipped: the cache failed");
            return None;
        }
    };
    let response = decode(&stored);
    if response.is_none() {
        tracing::warn!(
            key,
            "response cache: an entry that does not decode was passed by"
        );
    }
    response
}

/// Keeps `response` under `key` if it may be kept, and returns it with
/// [`CACHE_HEADER`] set, and what was done.
pub async fn keep(
    cache: &dyn CacheBackend,
    key: &str,
    rule: &ResponseCacheRule,
    response: Response<Body>,
) -> (Response<Body>, CacheResult) {
    let max_body = rule.max_body_kib as usize * 1024;
    let Some(ttl) = ttl(rule, &response) else {
        return uncached(response);
    };
    let declared = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return uncached(response);
    }
    let (parts, mut body) = response.into_parts();
    let mut buffered = BytesMut::new();
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buffered.extend_from_slice(&data);
                }
                if buffered.len() > max_body {
                    // Too large to keep: sent on as it comes.
                    let head =
                        futures_util::stream::once(
                            async move { Ok(Frame::data(buffered.freeze())) },
                        );
                    let rest = body.into_data_stream().map(|data| data.map(Frame::data));
                    let body = StreamBody::new(head.chain(rest)).boxed_unsync();
                    let response = Response::from_parts(parts, body);
                    return uncached(response);
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "response cache: the component's response body failed");
                let failed = crate::response::error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "the component's response failed while it was sent",
                );
                return (failed, CacheResult::Uncached);
            }
        }
    }
    let body = buffered.freeze();
    let stored = encode(&parts.headers, &body);
    // Kept before it is answered, so the next request finds it: a miss
    // costs one more round trip to the cache, and misses are the rare case.
    if let Err(e) = cache.set(key, stored, Some(ttl)).await {
        tracing::warn!(error = ?e, "response cache: keeping a response failed");
    }
    let response = Response::from_parts(parts, crate::response::full(body));
    (marked(response, CacheResult::Miss), CacheResult::Miss)
}

/// `response` passed on as the component sent it, not kept.
fn uncached(response: Response<Body>) -> (Response<Body>, CacheResult) {
    (
        marked(response, CacheResult::Uncached),
        CacheResult::Uncached,
    )
}

fn marked(mut response: Response<Body>, result: CacheResult) -> Response<Body> {
    response.headers_mut().insert(
        HeaderName::from_static(CACHE_HEADER),
        HeaderValue::from_static(result.name()),
    );
    response
}

/// How long `response` may be kept, or `None` if it may not be.
fn ttl(rule: &ResponseCacheRule, response: &Response<Body>) -> Option<Duration> {
    let headers = response.headers();
    if response.status() != StatusCode::OK
        || headers.contains_key(header::SET_COOKIE)
        || headers.contains_key(header::VARY)
    {
        return None;
    }
    if headers
        .get_all(header::PRAGMA)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"))
    {
        return None;
    }
    let mut directives = Vec::new();
    for value in headers.get_all(header::CACHE_CONTROL) {
        // A directive this cannot read might be `no-store`.
        directives.extend(value.to_str().ok()?.split(','));
    }
    let mut ttl = rule.ttl_seconds;
    for directive in directives {
        let (name, value) = directive
            .trim()
            .split_once('=')
            .map_or((directive.trim(), None), |(n, v)| {
                (n.trim(), Some(v.trim()))
            });
        let name = name.to_ascii_lowercase();
        match name.as_str() {
            "no-store" | "no-cache" | "private" => return None,
            "max-age" | "s-maxage" => {
                let seconds = value?.trim_matches('"').parse::<u64>().ok()?;
                ttl = ttl.min(seconds);
            }
            _ => {}
        }
    }
    (ttl > 0).then(|| Duration::from_secs(ttl))
}

/// `FORMAT`, the time it was kept (ms since the epoch), the headers (count,
/// then each name and value with its length), then the body with its
/// length, so an entry that is not whole is told apart.
fn encode(headers: &HeaderMap, body: &Bytes) -> Vec<u8> {
    let kept: Vec<(&HeaderName, &HeaderValue)> = headers
        .iter()
        .filter(|(name, _)| !is_per_response(name))
        .collect();
    let mut out = Vec::with_capacity(body.len() + 64 * kept.len() + 16);
    out.push(FORMAT);
    out.extend_from_slice(&crate::now_millis().to_be_bytes());
    out.extend_from_slice(&(kept.len() as u16).to_be_bytes());
    for (name, value) in kept {
        out.extend_from_slice(&(name.as_str().len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Headers that belong to one response, not to what is kept: the host sets
/// them again for each answer.
fn is_per_response(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::CONTENT_LENGTH
        || name == header::DATE
        || name.as_str() == "x-request-id"
        || name.as_str() == CACHE_HEADER
}

fn decode(stored: &[u8]) -> Option<Response<Body>> {
    let mut rest = stored;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    if take(1)? != [FORMAT] {
        return None;
    }
    let kept_at = u64::from_be_bytes(take(8)?.try_into().ok()?);
    let count = u16::from_be_bytes(take(2)?.try_into().ok()?);
    let mut response = Response::new(crate::response::full(Bytes::new()));
    for _ in 0..count {
        let name_len = u16::from_be_bytes(take(2)?.try_into().ok()?) as usize;
        let name = HeaderName::from_bytes(take(name_len)?).ok()?;
        let value_len = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
        let value = HeaderValue::from_bytes(take(value_len)?).ok()?;
        response.headers_mut().append(name, value);
    }
    let body_len = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
    if rest.len() != body_len {
        return None;
    }
    let age = crate::now_millis().saturating_sub(kept_at) / 1000;
    response
        .headers_mut()
        .insert(header::AGE, HeaderValue::from(age));
    *response.body_mut() = crate::response::full(Bytes::copy_from_slice(rest));
    Some(marked(response, CacheResult::Hit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(ttl_seconds: u64) -> ResponseCacheRule {
        ResponseCacheRule {
            prefix: "/products".into(),
            ttl_seconds,
            max_body_kib: 256,
        }
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> Response<Body> {
        let mut response = Response::new(crate::response::full("{}"));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        for (name, value) in headers {
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        response
    }

    #[test]
    fn only_what_a_shared_cache_may_keep_is_kept_and_max_age_shortens_it() {
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(ttl(&rule(30), &response(200, &[])), secs(30));
        assert_eq!(
            ttl(
                &rule(30),
                &response(200, &[("cache-control", "public, max-age=5")])
            ),
            secs(5)
        );
        assert_eq!(
            ttl(
                &rule(30),
                &response(200, &[("cache-control", "s-maxage=\"60\"")])
            ),
            secs(30)
        );
        for refused in [
            response(200, &[("cache-control", "no-store")]),
            response(200, &[("cache-control", "max-age=60, Private")]),
            response(200, &[("cache-control", "no-cache")]),
            response(200, &[("cache-control", "max-age=0")]),
            response(200, &[("cache-control", "max-age=soon")]),
            response(200, &[("set-cookie", "a=b")]),
            response(200, &[("vary", "accept-language")]),
            response(200, &[("pragma", "No-Cache")]),
            response(404, &[]),
            response(201, &[]),
        ] {
            assert_eq!(ttl(&rule(30), &refused), None, "{:?}", refused.headers());
        }
    }

    #[tokio::test]
    async fn a_kept_response_comes_back_with_its_headers_and_body() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        headers.append("x-one", "1".parse().unwrap());
        headers.append("x-one", "2".parse().unwrap());
        headers.insert("x-request-id", "not kept".parse().unwrap());
        let stored = encode(&headers, &Bytes::from_static(b"{\"ok\":true}"));
        let back = decode(&stored).unwrap();
        assert_eq!(back.headers()[header::CONTENT_TYPE], "application/json");
        let ones: Vec<_> = back.headers().get_all("x-one").iter().collect();
        assert_eq!(ones, ["1", "2"]);
        assert!(back.headers().get("x-request-id").is_none());
        assert_eq!(back.headers()[CACHE_HEADER], "hit");
        assert_eq!(back.headers()[header::AGE], "0");
        let body = back.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"ok\":true}");
        // Truncated or foreign entries are passed by, not trusted.
        assert!(decode(&stored[..stored.len() - 1]).is_none());
        assert!(decode(&stored[..stored.len() / 2]).is_none());
        assert!(decode(b"\x02whatever").is_none());
        assert!(decode(b"").is_none());
    }
}
