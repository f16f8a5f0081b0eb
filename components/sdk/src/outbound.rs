//! Outbound HTTP through the host, which allows only the hosts granted to
//! the component in plugins.toml (`outbound_hosts`).

use std::io::{Read, Write};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
};

use crate::http::{Error, Response};

fn method(name: &str) -> Method {
    match name {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_owned()),
    }
}

fn failed(url: &str, reason: impl std::fmt::Display) -> Error {
    Error::new(502, "upstream_failed", format!("{url}: {reason}"))
}

/// Sends a request and reads the whole response. A host that is not granted
/// answers 403 `outbound_denied`; an unreachable one 502 `upstream_failed`.
pub fn send(
    method_name: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, Error> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => return Err(Error::bad_request(format!("`{url}` is not an http(s) URL"))),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let fields: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    let fields =
        Fields::from_list(&fields).map_err(|e| failed(url, format!("bad header: {e:?}")))?;
    let request = OutgoingRequest::new(fields);
    let invalid = |what: &str| failed(url, format!("invalid {what}"));
    request
        .set_method(&method(method_name))
        .map_err(|()| invalid("method"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| invalid("scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| invalid("authority"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| invalid("path"))?;
    let outgoing_body = request
        .body()
        .map_err(|()| failed(url, "no request body"))?;
    let pending = outgoing_handler::handle(request, None).map_err(|e| denied_or_failed(url, e))?;
    // A refused request closes the body stream at once; its reason comes
    // with the response, so a write error is reported only if that has none.
    let written = match outgoing_body.write() {
        Ok(mut stream) => stream
            .write_all(body)
            .and_then(|()| Write::flush(&mut stream))
            .map_err(|e| failed(url, e)),
        Err(()) => Err(failed(url, "no body stream")),
    };
    let finished = OutgoingBody::finish(outgoing_body, None).map_err(|e| denied_or_failed(url, e));
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(denied_or_failed(url, e)),
        Some(Err(())) | None => return Err(failed(url, "no response")),
    };
    written?;
    finished?;
    let status = response.status();
    let headers = response.headers().entries();
    let incoming = response
        .consume()
        .map_err(|()| failed(url, "no response body"))?;
    let mut bytes = Vec::new();
    {
        let mut stream = incoming
            .stream()
            .map_err(|()| failed(url, "no response stream"))?;
        stream.read_to_end(&mut bytes).map_err(|e| failed(url, e))?;
    }
    IncomingBody::finish(incoming);
    Ok(Response {
        status,
        headers,
        body: bytes,
    })
}

/// POSTs `body` as JSON to `provider` (an email or payment service, say)
/// with an `Idempotency-Key`, so that a provider asked twice for one thing
/// (a redelivered event, a retry after a crash) does it once. An answer
/// outside 2xx is an `unavailable` error naming the provider and status,
/// which a message handler's retry takes up.
pub fn post_idempotent(
    provider: &str,
    url: &str,
    idempotency_key: &str,
    body: &serde_json::Value,
) -> Result<Response, Error> {
    let response = send(
        "POST",
        url,
        &[
            ("content-type", "application/json"),
            ("idempotency-key", idempotency_key),
        ],
        body.to_string().as_bytes(),
    )?;
    if !(200..300).contains(&response.status) {
        return Err(Error::unavailable(format!(
            "the {provider} answered {}",
            response.status
        )));
    }
    Ok(response)
}

fn denied_or_failed(url: &str, code: ErrorCode) -> Error {
    match code {
        ErrorCode::HttpRequestDenied => Error::new(
            403,
            "outbound_denied",
            format!("{url}: the host does not grant this component that destination"),
        ),
        other => failed(url, format!("{other:?}")),
    }
}
