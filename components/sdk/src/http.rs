//! HTTP for components: requests, responses, typed errors and a router.

use serde::de::DeserializeOwned;
use serde::Serialize;
use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A request, read whole (the host has already enforced the body limit).
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    params: Vec<(String, String)>,
}

impl Request {
    /// A path parameter of the matched route (`{id}` in `/orders/{id}`).
    pub fn param(&self, name: &str) -> &str {
        lookup(&self.params, name).unwrap_or("")
    }

    /// A query-string parameter, percent-decoded.
    pub fn query(&self, name: &str) -> Option<&str> {
        lookup(&self.query, name)
    }

    /// A query-string parameter parsed as `T`; 400 naming it when malformed.
    pub fn query_as<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>> {
        self.query(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    Error::bad_request(format!("query parameter `{name}` is malformed: {v:?}"))
                })
            })
            .transpose()
    }

    /// A header value (case-insensitive name), if it is valid text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The user the host verified from the bearer token, if any. The host
    /// sets these headers itself and strips any a client sent.
    pub fn user(&self) -> Option<User> {
        let id = self.header("x-agora-user-id").filter(|id| !id.is_empty())?;
        let roles = self.header("x-agora-user-roles").unwrap_or("");
        Some(User {
            id: id.to_owned(),
            roles: roles
                .split(',')
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    /// The verified user, or 401.
    pub fn require_user(&self) -> Result<User> {
        self.user()
            .ok_or_else(|| Error::unauthorized("this request needs a bearer token"))
    }

    /// The verified user if an admin: 401 without a user, 403 for others.
    pub fn require_admin(&self) -> Result<User> {
        let user = self.require_user()?;
        if !user.is_admin() {
            return Err(Error::forbidden("this request needs the role admin"));
        }
        Ok(user)
    }

    /// The body as JSON; 400 `invalid_json` with serde's reason (which names
    /// the field at fault, unknown fields included) when it does not fit.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::new(400, "invalid_json", format!("invalid request body: {e}")))
    }

    /// Builds a request by hand, for tests of handlers.
    pub fn new(method: &str, path_and_query: &str, body: Vec<u8>) -> Request {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            query: parse_query(query),
            body,
            ..Request::default()
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Request {
        self.headers
            .push((name.to_owned(), value.as_bytes().to_vec()));
        self
    }
}

fn lookup<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A signed-in user, as verified by the host.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: String,
    pub roles: Vec<String>,
}

impl User {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    pub fn is_admin(&self) -> bool {
        self.has_role("admin")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                headers: vec![("content-type".into(), b"application/json".to_vec())],
                body,
            },
            Err(e) => Error::internal(format!("cannot encode the response: {e}")).into_response(),
        }
    }

    pub fn ok<T: Serialize + ?Sized>(value: &T) -> Response {
        Response::json(200, value)
    }

    pub fn created<T: Serialize + ?Sized>(value: &T) -> Response {
        Response::json(201, value)
    }

    pub fn no_content() -> Response {
        Response {
            status: 204,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn text(status: u16, text: impl Into<String>) -> Response {
        Response {
            status,
            headers: vec![("content-type".into(), b"text/plain; charset=utf-8".to_vec())],
            body: text.into().into_bytes(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers
            .push((name.to_owned(), value.as_bytes().to_vec()));
        self
    }
}

/// An error a handler returns; it becomes `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Error {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Error {
        Error {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Error {
        Error::new(400, "bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Error {
        Error::new(401, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Error {
        Error::new(403, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(404, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Error {
        Error::new(409, "conflict", message)
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(500, "internal_error", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Error {
        Error::new(503, "unavailable", message)
    }

    pub fn into_response(self) -> Response {
        Response::json(
            self.status,
            &serde_json::json!({ "error": { "code": self.code, "message": self.message } }),
        )
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for Error {}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::internal(format!("JSON: {e}"))
    }
}

pub type Handler = fn(&Request) -> Result<Response>;

enum Segment {
    Literal(String),
    Param(String),
}

/// Routes by method and path pattern; `{name}` captures one segment.
#[derive(Default)]
pub struct Router {
    routes: Vec<(String, Vec<Segment>, Handler)>,
}

impl Router {
    pub fn new() -> Router {
        Router::default()
    }

    pub fn route(mut self, method: &str, pattern: &str, handler: Handler) -> Router {
        let segments = segments(pattern)
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => Segment::Param(name.to_owned()),
                    None => Segment::Literal(s.to_owned()),
                },
            )
            .collect();
        self.routes.push((method.to_owned(), segments, handler));
        self
    }

    pub fn get(self, pattern: &str, handler: Handler) -> Router {
        self.route("GET", pattern, handler)
    }

    pub fn post(self, pattern: &str, handler: Handler) -> Router {
        self.route("POST", pattern, handler)
    }

    pub fn put(self, pattern: &str, handler: Handler) -> Router {
        self.route("PUT", pattern, handler)
    }

    pub fn patch(self, pattern: &str, handler: Handler) -> Router {
        self.route("PATCH", pattern, handler)
    }

    pub fn delete(self, pattern: &str, handler: Handler) -> Router {
        self.route("DELETE", pattern, handler)
    }

    /// Dispatches: 404 when no pattern matches the path, 405 when one does
    /// but not for this method.
    ///
    /// The path is split on `/`, empty segments skipped, and each segment
    /// percent-decoded once (a `+` stays a `+`: it means a space only in a
    /// query) before literals and parameters are matched. The host hands
    /// over the canonical path it routed and checked its rules on, so this
    /// sees the same segments the gateway did.
    pub fn handle(&self, mut request: Request) -> Response {
        let path: Vec<String> = segments(&request.path)
            .map(|s| percent_decode(s, false))
            .collect();
        let mut path_matched = false;
        for (method, pattern, handler) in &self.routes {
            let Some(params) = match_path(pattern, &path) else {
                continue;
            };
            path_matched = true;
            if *method == request.method {
                request.params = params;
                return handler(&request).unwrap_or_else(Error::into_response);
            }
        }
        let error = if path_matched {
            Error::new(
                405,
                "method_not_allowed",
                format!("{} is not allowed on {}", request.method, request.path),
            )
        } else {
            Error::not_found(format!("no route for {} {}", request.method, request.path))
        };
        error.into_response()
    }
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn match_path(pattern: &[Segment], path: &[String]) -> Option<Vec<(String, String)>> {
    if pattern.len() != path.len() {
        return None;
    }
    let mut params = Vec::new();
    for (segment, actual) in pattern.iter().zip(path) {
        match segment {
            Segment::Literal(l) if l == actual => {}
            Segment::Literal(_) => return None,
            Segment::Param(name) => params.push((name.clone(), actual.clone())),
        }
    }
    Some(params)
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// Decodes `%XX` escapes (a malformed one stays as it is), and `+` as a
/// space when `plus_is_space` (form-encoded queries).
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high * 16 + low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request(request: IncomingRequest) -> Result<Request> {
    let method = match request.method() {
        Method::Get => "GET".to_owned(),
        Method::Head => "HEAD".to_owned(),
        Method::Post => "POST".to_owned(),
        Method::Put => "PUT".to_owned(),
        Method::Delete => "DELETE".to_owned(),
        Method::Connect => "CONNECT".to_owned(),
        Method::Options => "OPTIONS".to_owned(),
        Method::Trace => "TRACE".to_owned(),
        Method::Patch => "PATCH".to_owned(),
        Method::Other(other) => other,
    };
    let target = request.path_with_query().unwrap_or_else(|| "/".to_owned());
    let mut parsed = Request::new(&method, &target, Vec::new());
    parsed.headers = request.headers().entries();
    let body = request
        .consume()
        .map_err(|()| Error::internal("the request body was already taken"))?;
    let stream = body
        .stream()
        .map_err(|()| Error::internal("the request body stream was already taken"))?;
    std::io::Read::read_to_end(&mut { stream }, &mut parsed.body)
        .map_err(|e| Error::bad_request(format!("could not read the request body: {e}")))?;
    IncomingBody::finish(body);
    Ok(parsed)
}

fn write_response(out: ResponseOutparam, response: Response) {
    let headers = Fields::from_list(&response.headers).unwrap_or_else(|_| Fields::new());
    let outgoing = OutgoingResponse::new(headers);
    let _ = outgoing.set_status_code(response.status);
    let Ok(body) = outgoing.body() else { return };
    ResponseOutparam::set(out, Ok(outgoing));
    if let Ok(mut stream) = body.write() {
        let _ = std::io::Write::write_all(&mut stream, &response.body);
        let _ = std::io::Write::flush(&mut stream);
    }
    let _ = OutgoingBody::finish(body, None);
}

#[doc(hidden)]
pub fn serve(router: Router, request: IncomingRequest, out: ResponseOutparam) {
    let response = match read_request(request) {
        Ok(request) => router.handle(request),
        Err(e) => e.into_response(),
    };
    write_response(out, response);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(req: &Request) -> Result<Response> {
        Ok(Response::ok(
            &serde_json::json!({ "id": req.param("id"), "q": req.query("q") }),
        ))
    }

    fn fail(_: &Request) -> Result<Response> {
        Err(Error::conflict("taken"))
    }

    #[test]
    fn routes_by_method_and_pattern() {
        let router = Router::new().get("/items/{id}", echo).post("/items", fail);
        let r = router.handle(Request::new("GET", "/items/a%20b?q=x+y%", vec![]));
        assert_eq!(r.status, 200);
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            r#"{"id":"a b","q":"x y%"}"#
        );
        assert_eq!(
            router
                .handle(Request::new("DELETE", "/items/1", vec![]))
                .status,
            405
        );
        assert_eq!(
            router
                .handle(Request::new("GET", "/nothing", vec![]))
                .status,
            404
        );
        let r = router.handle(Request::new("POST", "/items", vec![]));
        assert_eq!(r.status, 409);
        assert!(String::from_utf8(r.body)
            .unwrap()
            .contains(r#""code":"conflict""#));
    }

    #[test]
    fn path_segments_are_decoded_once_before_matching() {
        let router = Router::new()
            .get("/items/special", fail)
            .get("/items/{id}", echo);
        // An encoded literal reaches the literal's handler, not the parameter.
        let r = router.handle(Request::new("GET", "/items/%73pecial", vec![]));
        assert_eq!(r.status, 409);
        let r = router.handle(Request::new("GET", "/items/1+1%2B1%252B", vec![]));
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            r#"{"id":"1+1+1%2B","q":null}"#
        );
    }

    #[test]
    fn the_user_comes_from_the_hosts_headers() {
        let anonymous = Request::new("GET", "/", vec![]);
        assert_eq!(anonymous.require_user().unwrap_err().status, 401);
        let customer = anonymous
            .clone()
            .with_header("x-agora-user-id", "u1")
            .with_header("x-agora-user-roles", "customer");
        assert_eq!(customer.require_user().unwrap().id, "u1");
        assert_eq!(customer.require_admin().unwrap_err().status, 403);
        let admin = anonymous
            .with_header("x-agora-user-id", "u2")
            .with_header("x-agora-user-roles", "customer,admin");
        assert!(admin.require_admin().unwrap().is_admin());
    }

    #[test]
    fn bad_json_names_the_problem() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Body {
            name: String,
        }
        let err = Request::new("POST", "/", br#"{"nme":"x"}"#.to_vec())
            .json::<Body>()
            .unwrap_err();
        assert_eq!((err.status, err.code.as_str()), (400, "invalid_json"));
        assert!(err.message.contains("nme"), "{}", err.message);
    }
}
