//! The operator's console: a web page on the admin listener showing the
//! components (versions, routes, grants, limits), the deploy history with
//! a rollback button, each subscriber's progress per partition, the dead
//! letters with a replay button, and live request rates.
//!
//! Server-rendered HTML with plain forms: a page needs no build step and no
//! front-end dependencies, every button works without script, and the
//! strict content security policy below holds (no inline script or style).
//! One small script, served beside the page, only refreshes the rates.
//!
//! It uses the admin API's authentication, adapted to a browser, which
//! cannot send a bearer header when it follows a link:
//! - The operator signs in with the admin token (the login form). The host
//!   answers with a session cookie: random, `HttpOnly`, `SameSite=Strict`,
//!   scoped to `/console`, valid for [`SESSION_TTL`], and kept only as its
//!   hash. Signing out, or a restart, ends it.
//! - The admin API's walls stay: the `Host` must be this listener's own
//!   address or `localhost` (DNS rebinding), and a request that changes
//!   anything (every `POST`) must come from the console's own origin
//!   (`Origin` equal to `http://<Host>`), so no other page can submit its
//!   forms even while the operator is signed in (cross-site request
//!   forgery). Pages may not be framed (clickjacking).
//!
//! Replaying a dead letter delivers it once more to its subscriber's
//! serving version, now, and shows the result; it stays in the dead-letter
//! topic (an append-only log), marked as replayed on this host. Handlers are
//! meant to be idempotent per event id (the shop's are), because delivery
//! is at least once anyway.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::bindings::messaging::Message;
use crate::messaging::{
    Progress, ATTEMPTS_HEADER, DEAD_LETTER_PREFIX, ERROR_HEADER, ORIGINAL_TOPIC_HEADER,
};
use crate::response::{self, Body};
use crate::runtime::Runtime;
use crate::server::read_body;

/// How long a console session lasts: a working day.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The session cookie's name. The public listener removes it from requests
/// before a component sees them ([`crate::gateway::strip_console_cookie`]).
pub const COOKIE: &str = "agora_console";
/// Dead letters listed per partition of a subscriber's dead-letter topic:
/// the latest, newest first.
const DEAD_LETTERS_SHOWN: usize = 20;
/// How long the page waits for the broker and coordination, per section:
/// in an outage the page (and its rollback buttons) must still load.
const SECTION_TIMEOUT: Duration = Duration::from_secs(3);
/// Notices kept for the page after a redirect.
const KEPT_NOTICES: usize = 32;
/// The largest form the console accepts (a token, a few fields).
const MAX_FORM_BYTES: usize = 4096;
/// Every console response: no framing, no script or style from elsewhere,
/// nothing cached.
const SECURITY_HEADERS: [(&str, &str); 5] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
    ("cache-control", "no-store"),
];

const STYLE: &str = include_str!("console/console.css");
const SCRIPT: &str = include_str!("console/console.js");

/// A dead letter: its subscriber, partition and offset.
type Letter = (String, u32, u64);

/// Sessions and replays of the console.
#[derive(Default)]
pub struct Console {
    /// SHA-256 of each session cookie, and when it expires.
    sessions: Mutex<HashMap<[u8; 32], Instant>>,
    /// Dead letters replayed from this host: (subscriber, partition,
    /// offset) and what the replay gave.
    replays: Mutex<BTreeMap<Letter, Result<(), String>>>,
    /// What the last actions said, by a random id the redirect carries: the
    /// page shows only what the host wrote, never text from a link.
    notices: Mutex<VecDeque<(u64, String)>>,
}

impl Console {
    fn open_session(&self) -> anyhow::Result<String> {
        let cookie: String = crate::secret::random_bytes(32)?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut sessions = self.sessions.lock().unwrap();
        let now = Instant::now();
        sessions.retain(|_, expires| *expires > now);
        sessions.insert(digest(&cookie), now + SESSION_TTL);
        Ok(cookie)
    }

    fn session_of(&self, request: &Request<Incoming>) -> Option<[u8; 32]> {
        let cookie = cookie(request)?;
        let key = digest(&cookie);
        let sessions = self.sessions.lock().unwrap();
        sessions
            .get(&key)
            .is_some_and(|expires| *expires > Instant::now())
            .then_some(key)
    }
}

impl Console {
    fn keep_notice(&self, text: String) -> u64 {
        let id = crate::secret::random_bytes(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .unwrap_or_default();
        let mut notices = self.notices.lock().unwrap();
        if notices.len() == KEPT_NOTICES {
            notices.pop_front();
        }
        notices.push_back((id, text));
        id
    }

    fn notice(&self, id: u64) -> Option<String> {
        let notices = self.notices.lock().unwrap();
        notices
            .iter()
            .find(|(n, _)| *n == id)
            .map(|(_, t)| t.clone())
    }
}

fn digest(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

/// The console's cookie, if the request carries one.
fn cookie(request: &Request<Incoming>) -> Option<String> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Whether a `POST` comes from the console's own page: its `Origin` is
/// `http://` and the `Host` it was sent to (which the admin API checked is
/// this listener's).
fn same_origin(request: &Request<Incoming>) -> bool {
    let origin = request.headers().get(header::ORIGIN);
    let host = request.headers().get(header::HOST);
    match (
        origin.and_then(|o| o.to_str().ok()),
        host.and_then(|h| h.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => origin
            .strip_prefix("http://")
            .is_some_and(|o| o.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// Serves `/console` and below. `token` is the admin token, which signs in.
pub async fn handle(
    console: &Console,
    runtime: &Runtime,
    token: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').skip(1).collect();
    if method == Method::POST && !same_origin(&request) {
        return secured(response::error(
            StatusCode::FORBIDDEN,
            "cross_origin",
            "console forms are accepted only from the console's own page",
        ));
    }
    let signed_in = console.session_of(&request);
    let response = match (&method, segments.as_slice(), signed_in) {
        (&Method::GET, ["console.css"], _) => asset(STYLE, "text/css"),
        (&Method::GET, ["console.js"], _) => asset(SCRIPT, "text/javascript"),
        (&Method::POST, ["login"], _) => login(console, token, request).await,
        (_, _, None) => page("Sign in", &login_form(None)),
        (&Method::GET, [] | [""], Some(_)) => {
            let notice = request
                .uri()
                .query()
                .and_then(notice_of)
                .and_then(|id| console.notice(id));
            overview(console, runtime, notice.as_deref()).await
        }
        (&Method::GET, ["rates"], Some(_)) => rates(runtime),
        (&Method::POST, ["logout"], Some(session)) => {
            console.sessions.lock().unwrap().remove(&session);
            let mut response = see_other("/console");
            response.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_static(
                    "agora_console=; Path=/console; Max-Age=0; HttpOnly; SameSite=Strict",
                ),
            );
            response
        }
        (&Method::POST, ["components", name, "rollback"], Some(_)) => {
            let notice = match runtime.rollback(name).await {
                Ok(v) => format!("Rolled {name} back to version {}", v.version),
                Err(e) => format!("Rollback of {name} refused: {e:#}"),
            };
            notice_redirect(console, &notice)
        }
        (&Method::POST, ["dead-letters", component, partition, offset, "replay"], Some(_)) => {
            match (partition.parse(), offset.parse()) {
                (Ok(partition), Ok(offset)) => {
                    replay(console, runtime, component, partition, offset).await
                }
                _ => response::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "a dead letter is named by its partition and offset (numbers)",
                ),
            }
        }
        _ => response::error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no console page {method} {path}"),
        ),
    };
    secured(response)
}

fn secured(mut response: Response<Body>) -> Response<Body> {
    for (name, value) in SECURITY_HEADERS {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    response
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(response::full(text));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn see_other(location: &str) -> Response<Body> {
    let mut response = Response::new(response::full(""));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(location) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// Back to the overview, with a line saying what happened.
fn notice_redirect(console: &Console, notice: &str) -> Response<Body> {
    let id = console.keep_notice(notice.to_owned());
    see_other(&format!("/console?notice={id}"))
}

fn notice_of(query: &str) -> Option<u64> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "notice")
        .and_then(|(_, v)| v.parse().ok())
}

async fn login(console: &Console, token: &str, request: Request<Incoming>) -> Response<Body> {
    let request = match read_body(request, MAX_FORM_BYTES).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(never) => match never {},
    };
    let presented = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    if !bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        tracing::warn!(target: "agora::admin", "console sign-in refused: wrong token");
        let mut response = page("Sign in", &login_form(Some("That is not the admin token.")));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let cookie = match console.open_session() {
        Ok(cookie) => cookie,
        Err(e) => {
            return response::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                format!("{e:#}"),
            )
        }
    };
    tracing::info!(target: "agora::admin", "console session opened");
    let mut response = see_other("/console");
    let value = format!(
        "{COOKIE}={cookie}; Path=/console; Max-Age={}; HttpOnly; SameSite=Strict",
        SESSION_TTL.as_secs()
    );
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&value).expect("hex and ASCII"),
    );
    response
}

fn login_form(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p class="error">{}</p>"#, escape(e)))
        .unwrap_or_default();
    format!(
        r#"<section class="login"><h2>Sign in</h2>{error}
<p>Paste the admin token: it is in the host's data directory, in <code>admin.token</code>.</p>
<form method="post" action="/console/login">
<input type="password" name="token" id="token" autocomplete="current-password" required>
<button type="submit" id="sign-in">Sign in</button>
</form></section>"#
    )
}

/// A whole page around `body`.
fn page(title: &str, body: &str) -> Response<Body> {
    let html = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · Agora console</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/console/console.css"><script src="/console/console.js" defer></script></head>
<body><header><h1>Agora console</h1></header><main>{body}</main></body></html>"#,
        title = escape(title)
    );
    let mut response = Response::new(response::full(html));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// `text` safe inside HTML text and quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` as one URL path segment.
fn segment(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn time_of(millis: u64) -> String {
    let secs = millis / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

async fn overview(console: &Console, runtime: &Runtime, notice: Option<&str>) -> Response<Body> {
    let mut html = String::new();
    html.push_str(
        r#"<form method="post" action="/console/logout" class="logout"><button type="submit">Sign out</button></form>"#,
    );
    if let Some(notice) = notice {
        let _ = write!(
            html,
            r#"<p class="notice" id="notice">{}</p>"#,
            escape(notice)
        );
    }
    components_section(runtime, &mut html);
    rates_section(runtime, &mut html);
    history_section(runtime, &mut html);
    let subscribers = timed(subscribers_section(runtime), "Subscribers", "subscribers");
    let dead_letters = timed(
        dead_letters_section(console, runtime),
        "Dead letters",
        "dead-letters",
    );
    let (subscribers, dead_letters) = tokio::join!(subscribers, dead_letters);
    html.push_str(&subscribers);
    html.push_str(&dead_letters);
    page("Overview", &html)
}

fn components_section(runtime: &Runtime, html: &mut String) {
    let registry = runtime.registry();
    html.push_str(
        r#"<section><h2>Components</h2><table id="components"><thead><tr><th>Component</th><th>Version</th><th>Routes</th><th>Grants</th><th>Limits</th><th>Previous versions</th><th></th></tr></thead><tbody>"#,
    );
    for c in registry.components.values() {
        let name = escape(&c.name);
        let grants: Vec<&str> = c.spec.grants.iter().map(|g| g.name()).collect();
        let limits = &c.spec.limits;
        let previous = runtime.previous_versions(&c.name);
        let rollback = match previous.last() {
            Some(to) => format!(
                r#"<form method="post" action="/console/components/{}/rollback"><button type="submit" class="rollback" data-component="{name}">Roll back to {}</button></form>"#,
                segment(&c.name),
                escape(to)
            ),
            None => String::new(),
        };
        let _ = write!(
            html,
            r#"<tr data-component="{name}"><td>{name}</td><td class="version"><code>{}</code></td><td>{}</td><td>{}</td><td>{} MiB, {} ms, {} at once, {} KiB body{}</td><td>{}</td><td>{rollback}</td></tr>"#,
            escape(&c.version),
            escape(&c.spec.routes.join(" ")),
            escape(&grants.join(" ")),
            limits.memory_mib,
            limits.timeout_ms,
            limits.max_concurrency,
            limits.max_body_kib,
            match limits.reuse {
                0 => String::new(),
                n => format!(", reused for {n} requests"),
            },
            escape(&previous.join(" ")),
        );
    }
    html.push_str("</tbody></table></section>");
}

fn rates_section(runtime: &Runtime, html: &mut String) {
    html.push_str(
        r#"<section><h2>Requests</h2><p class="hint">Requests per second over the last few seconds; refreshed every 2 s.</p><table id="rates"><thead><tr><th>Component</th><th>Route</th><th>Requests</th><th>Per second</th></tr></thead><tbody>"#,
    );
    let registry = runtime.registry();
    for c in registry.components.values() {
        for (route, total) in c.requests_per_route() {
            let key = escape(&format!("{} {route}", c.name));
            let _ = write!(
                html,
                r#"<tr><td>{}</td><td>{}</td><td data-total="{key}">{total}</td><td data-rate="{key}">–</td></tr>"#,
                escape(&c.name),
                escape(route)
            );
        }
    }
    html.push_str("</tbody></table></section>");
}

/// Requests answered per component route so far, for the page's script.
fn rates(runtime: &Runtime) -> Response<Body> {
    let registry = runtime.registry();
    let totals: serde_json::Map<String, serde_json::Value> = registry
        .components
        .values()
        .flat_map(|c| {
            c.requests_per_route()
                .into_iter()
                .map(|(route, total)| (format!("{} {route}", c.name), total.into()))
                .collect::<Vec<_>>()
        })
        .collect();
    response::json(
        StatusCode::OK,
        &serde_json::json!({ "at": crate::now_millis(), "totals": totals }),
    )
}

fn history_section(runtime: &Runtime, html: &mut String) {
    html.push_str(
        r#"<section><h2>Deploy history</h2><table id="history"><thead><tr><th>When</th><th>Component</th><th>What</th><th>Version</th><th>Error</th></tr></thead><tbody>"#,
    );
    let history = runtime.history();
    if history.is_empty() {
        html.push_str(r#"<tr><td colspan="5">No change since the host started.</td></tr>"#);
    }
    for change in history.iter().rev() {
        let _ = write!(
            html,
            r#"<tr class="{}"><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>"#,
            change.outcome,
            time_of(change.at),
            escape(&change.component),
            change.outcome.replace('_', " "),
            escape(change.version.as_deref().unwrap_or("")),
            escape(change.error.as_deref().unwrap_or("")),
        );
    }
    html.push_str("</tbody></table></section>");
}

/// A section that needs the backends, or a note that they did not answer
/// within [`SECTION_TIMEOUT`].
async fn timed(
    section: impl std::future::Future<Output = String>,
    title: &str,
    id: &str,
) -> String {
    match tokio::time::timeout(SECTION_TIMEOUT, section).await {
        Ok(html) => html,
        Err(_) => format!(
            r#"<section><h2>{title}</h2><p class="error" id="{id}">The broker or coordination did not answer within {} s; reload to try again.</p></section>"#,
            SECTION_TIMEOUT.as_secs()
        ),
    }
}

async fn subscribers_section(runtime: &Runtime) -> String {
    let mut html = String::new();
    html.push_str(
        r#"<section><h2>Subscribers</h2><table id="subscribers"><thead><tr><th>Subscriber</th><th>Topic</th><th>Partition</th><th>Next offset</th><th>End</th><th>Lag</th></tr></thead><tbody>"#,
    );
    let registry = runtime.registry_snapshot();
    for c in registry.components.values() {
        for topic in &c.spec.subscribes {
            match runtime
                .capabilities
                .messaging
                .progress(&c.name, topic)
                .await
            {
                Ok(partitions) => {
                    for Progress {
                        partition,
                        next,
                        end,
                        lag,
                    } in partitions
                    {
                        let _ = write!(
                            html,
                            r#"<tr class="{}"><td>{}</td><td>{}</td><td>{partition}</td><td>{next}</td><td>{end}</td><td>{lag}</td></tr>"#,
                            if lag == 0 { "caught-up" } else { "behind" },
                            escape(&c.name),
                            escape(topic),
                        );
                    }
                }
                Err(e) => {
                    let _ = write!(
                        html,
                        r#"<tr class="error"><td>{}</td><td>{}</td><td colspan="4">{}</td></tr>"#,
                        escape(&c.name),
                        escape(topic),
                        escape(&format!("{e:#}"))
                    );
                }
            }
        }
    }
    html.push_str("</tbody></table></section>");
    html
}

/// A dead letter's header.
fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, v)| v.as_str())
}

async fn dead_letters_section(console: &Console, runtime: &Runtime) -> String {
    let mut html = String::new();
    html.push_str(
        r#"<section><h2>Dead letters</h2><table id="dead-letters"><thead><tr><th>Subscriber</th><th>Event</th><th>Topic</th><th>Attempts</th><th>Error</th><th>Payload</th><th></th></tr></thead><tbody>"#,
    );
    let registry = runtime.registry_snapshot();
    let mut none = true;
    for c in registry.components.values() {
        if c.spec.subscribes.is_empty() {
            continue;
        }
        let topic = format!("{DEAD_LETTER_PREFIX}{}", c.name);
        let letters = match runtime
            .capabilities
            .messaging
            .read_latest(&topic, DEAD_LETTERS_SHOWN)
            .await
        {
            Ok(letters) => letters,
            Err(e) => {
                let _ = write!(
                    html,
                    r#"<tr class="error"><td>{}</td><td colspan="6">{}</td></tr>"#,
                    escape(&c.name),
                    escape(&format!("{e:#}"))
                );
                continue;
            }
        };
        let replays = console.replays.lock().unwrap().clone();
        for (partition, offset, letter) in letters.into_iter().rev() {
            none = false;
            let replayed = replays.get(&(c.name.clone(), partition, offset));
            let action = match replayed {
                Some(Ok(())) => r#"<span class="replayed">replayed</span>"#.to_owned(),
                _ => {
                    let failed = match replayed {
                        Some(Err(e)) => {
                            format!(r#"<p class="error">Replay failed: {}</p>"#, escape(e))
                        }
                        _ => String::new(),
                    };
                    format!(
                        r#"{failed}<form method="post" action="/console/dead-letters/{}/{partition}/{offset}/replay"><button type="submit" class="replay">Replay</button></form>"#,
                        segment(&c.name)
                    )
                }
            };
            let payload = String::from_utf8_lossy(&letter.payload);
            let _ = write!(
                html,
                r#"<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{action}</td></tr>"#,
                escape(&c.name),
                escape(&letter.id),
                escape(header_of(&letter.headers, ORIGINAL_TOPIC_HEADER)),
                escape(header_of(&letter.headers, ATTEMPTS_HEADER)),
                escape(header_of(&letter.headers, ERROR_HEADER)),
                escape(&payload.chars().take(200).collect::<String>()),
            );
        }
    }
    if none {
        html.push_str(r#"<tr><td colspan="7">No dead letters.</td></tr>"#);
    }
    html.push_str("</tbody></table></section>");
    html
}

/// Delivers one dead letter to its subscriber's serving version again.
async fn replay(
    console: &Console,
    runtime: &Runtime,
    component: &str,
    partition: u32,
    offset: u64,
) -> Response<Body> {
    let topic = format!("{DEAD_LETTER_PREFIX}{component}");
    let letter = match runtime
        .capabilities
        .messaging
        .read_event(&topic, partition, offset)
        .await
    {
        Ok(letter) => letter,
        Err(e) => return notice_redirect(console, &format!("Cannot read {topic}: {e:#}")),
    };
    let Some(letter) = letter else {
        return notice_redirect(
            console,
            &format!("{topic} has no event at partition {partition}, offset {offset}"),
        );
    };
    // Only the platform writes dead letters (no grant reaches a
    // `dead-letter.` topic), and only of a topic the subscriber takes.
    let original = header_of(&letter.headers, ORIGINAL_TOPIC_HEADER).to_owned();
    let subscribed = runtime
        .registry()
        .components
        .get(component)
        .is_some_and(|c| c.spec.subscribes.contains(&original));
    if !subscribed {
        return notice_redirect(
            console,
            &format!(
                "Event {} is not a dead letter of a topic {component} subscribes to ({original:?}): not replayed",
                letter.id
            ),
        );
    }
    let message = Message {
        id: letter.id.clone(),
        topic: original.clone(),
        key: letter.key.clone(),
        payload: letter.payload.clone(),
        // What the subscriber saw the first time: the platform's dead-letter
        // headers were added after.
        headers: letter
            .headers
            .iter()
            .filter(|(name, _)| !name.starts_with("agora-"))
            .cloned()
            .collect(),
        published_at: letter.published_at,
        attempt: 1,
    };
    let result = runtime
        // Replayed at the operator's word: nothing stops it but its deadline.
        .deliver_now(component, message, tokio::sync::watch::channel(false).1)
        .await
        .map_err(|e| e.to_string());
    let notice = match &result {
        Ok(()) => format!("Replayed event {} to {component}", letter.id),
        Err(e) => format!("Replay of event {} to {component} failed: {e}", letter.id),
    };
    tracing::info!(target: "agora::admin", %component, event = %letter.id, %original, ok = result.is_ok(), "dead letter replayed");
    console
        .replays
        .lock()
        .unwrap()
        .insert((component.to_owned(), partition, offset), result);
    notice_redirect(console, &notice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(time_of(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time_of(1_795_347_296_000), "2026-11-22 11:34:56 UTC");
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn a_segment_cannot_leave_its_place_in_a_path() {
        assert_eq!(segment("a/b c?d"), "a%2Fb%20c%3Fd");
    }
}
