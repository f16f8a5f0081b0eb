//! The listeners under attack by real TCP clients: connections that never
//! finish a request head or body or sit idle, clients that stop reading
//! their response, a flood of connections under a small file-descriptor
//! limit, a burst of requests waiting for one instance slot, HTTP/2 and its
//! stream cap, and the admin API reached without its token or from a
//! browser.
//!
//! Timeouts are configured small and waited for generously, so a busy
//! machine makes the tests slower, not flaky.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a test waits for what a 1 s timeout should do.
const GENEROUS: Duration = Duration::from_secs(30);

/// The standard host with `[host]` settings in front.
fn with_host_settings(settings: &str) -> impl FnOnce(&Ports, &Path) -> String + '_ {
    move |ports, _| {
        format!(
            "[host]\n{settings}\n{}",
            standard_config(ports, &component("probe"))
        )
    }
}

/// Reads until the host closes the connection; panics if it does not
/// within `GENEROUS`. Returns what the host sent.
async fn closed_by_host(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(GENEROUS, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the host kept {what} open");
    received
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_does_not_finish_its_request_head_is_closed() {
    let host = TestHost::start(with_host_settings(
        "header_read_timeout_seconds = 1\nidle_timeout_seconds = 600",
    ));
    let mut half_sent = TcpStream::connect(("127.0.0.1", host.ports.public))
        .await
        .unwrap();
    half_sent
        .write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(("127.0.0.1", host.ports.public))
        .await
        .unwrap();
    let mut slow_preface = TcpStream::connect(("127.0.0.1", host.ports.public))
        .await
        .unwrap();
    // The start of the HTTP/2 preface keeps the protocol undecided.
    slow_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();

    let answer = closed_by_host(&mut half_sent, "a half-sent request").await;
    assert!(
        !String::from_utf8_lossy(&answer).contains(" 200 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    closed_by_host(&mut silent, "a connection that sent nothing").await;
    closed_by_host(&mut slow_preface, "a half-sent HTTP/2 preface").await;
    assert_eq!(get(&host.url("/hello")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_body_trickles_is_refused_with_408() {
    let host = TestHost::start(with_host_settings(
        "body_read_timeout_seconds = 1\nidle_timeout_seconds = 600",
    ));
    let mut stream = TcpStream::connect(("127.0.0.1", host.ports.public))
        .await
        .unwrap();
    stream
        .write_all(
            b"PUT /probe/kv/trickled HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    let answer = closed_by_host(&mut stream, "a request whose body never ends").await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert_eq!(get(&host.url("/probe/kv/trickled")).await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed() {
    let host = TestHost::start(with_host_settings(
        "header_read_timeout_seconds = 600\nidle_timeout_seconds = 1",
    ));
    let uri = format!("http://127.0.0.1:{}/hello", host.ports.public);

    // HTTP/1.1: a request answered, then nothing.
    let stream = TcpStream::connect(("127.0.0.1", host.ports.public))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(&uri)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    assert!(
        tokio::time::timeout(GENEROUS, connection).await.is_ok(),
        "the host kept an idle HTTP/1.1 connection open"
    );

    // HTTP/2: the same, ended by the host's GOAWAY.
    let stream = TcpStream::connect(("127.0.0.1", host.ports.public))
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(&uri)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    assert!(
        tokio::time::timeout(GENEROUS, connection).await.is_ok(),
        "the host kept an idle HTTP/2 connection open"
    );
}

/// The size of the large response: the host's OpenAPI document, made far
/// bigger than any socket buffers.
const BIG: usize = 32 << 20;

/// A host with one connection slot, nothing but a stalled response to free
/// it, and a `BIG` document at `/openapi.json`.
fn one_slot_and_a_big_response(ports: &Ports, dir: &Path) -> String {
    std::fs::write(dir.join("big.json"), vec![b' '; BIG]).unwrap();
    with_host_settings(
        "openapi = \"big.json\"\nmax_connections = 1\nresponse_write_timeout_seconds = 1\n\
         header_read_timeout_seconds = 600\nidle_timeout_seconds = 600",
    )(ports, dir)
}

/// A fresh client, waiting in the accept queue behind the only slot, is
/// served within `GENEROUS`.
async fn a_fresh_client_is_served(host: &TestHost, behind: &str) {
    let reply = tokio::time::timeout(GENEROUS, get(&host.url("/healthz")))
        .await
        .unwrap_or_else(|_| panic!("{behind} held the only connection slot"));
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http1_client_that_stops_reading_its_response_is_cut() {
    let host = TestHost::start(one_slot_and_a_big_response);
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket
        .connect(([127, 0, 0, 1], host.ports.public).into())
        .await
        .unwrap();
    stalled
        .write_all(b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();

    a_fresh_client_is_served(&host, "a client not reading its response").await;
    // The stalled client finds its response cut short.
    let received = closed_by_host(&mut stalled, "a client not reading its response").await;
    assert!(
        String::from_utf8_lossy(&received[..12]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&received[..received.len().min(200)])
    );
    assert!(received.len() < BIG, "the whole response was sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_that_holds_its_stream_window_at_zero_is_cut() {
    let host = TestHost::start(one_slot_and_a_big_response);
    let stream = TcpStream::connect(("127.0.0.1", host.ports.public))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let uri = format!("http://127.0.0.1:{}/openapi.json", host.ports.public);
    let request = http::Request::get(&uri)
        .body(Empty::<Bytes>::new())
        .unwrap();
    // The head passes (it is not flow-controlled); the body never can.
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);

    a_fresh_client_is_served(&host, "an HTTP/2 stream with a window of 0").await;
    assert!(
        tokio::time::timeout(GENEROUS, connection).await.is_ok(),
        "the host kept the stalled HTTP/2 connection open"
    );
    let body = response.into_body().collect().await;
    assert!(body.is_err(), "the whole response was sent");
}

/// An HTTP/2 frame: type, flags, stream id and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// Reads one HTTP/2 frame: (type, stream id, payload).
async fn read_h2_frame(stream: &mut TcpStream) -> (u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.unwrap();
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    (head[3], id, payload)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_cannot_open_more_than_32_streams_at_once() {
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    let host = TestHost::start(with_host_settings("body_read_timeout_seconds = 600"));
    // A raw client, since a polite one queues what the server's
    // SETTINGS_MAX_CONCURRENT_STREAMS does not allow.
    let mut client = TcpStream::connect(("127.0.0.1", host.ports.public))
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    // 33 PUTs whose bodies never come, so each stream stays open; HPACK
    // literals without Huffman coding.
    let stream_id = |i: u32| 2 * i + 1;
    for i in 0..33 {
        let mut block = Vec::new();
        for (name_index, value) in [
            (2u8, "PUT".to_owned()),
            (6, "http".to_owned()),
            (4, format!("/probe/kv/stream-{i}")),
            (1, "localhost".to_owned()),
        ] {
            block.extend([name_index, value.len() as u8]);
            block.extend(value.as_bytes());
        }
        out.extend(h2_frame(HEADERS, END_HEADERS, stream_id(i), &block));
    }
    client.write_all(&out).await.unwrap();

    let mut advertised = None;
    let refused = tokio::time::timeout(GENEROUS, async {
        loop {
            let (kind, id, payload) = read_h2_frame(&mut client).await;
            match kind {
                SETTINGS if id == 0 => {
                    for setting in payload.chunks_exact(6) {
                        // SETTINGS_MAX_CONCURRENT_STREAMS
                        if setting[..2] == [0, 3] {
                            advertised = Some(u32::from_be_bytes(setting[2..].try_into().unwrap()));
                        }
                    }
                }
                RST_STREAM => return (id, u32::from_be_bytes(payload[..4].try_into().unwrap())),
                GOAWAY => panic!("the host closed the connection: {payload:?}"),
                HEADERS => panic!("stream {id} was answered before its body came"),
                _ => {}
            }
        }
    })
    .await
    .expect("the 33rd stream was not refused");
    assert_eq!(advertised, Some(32));
    // REFUSED_STREAM, on the 33rd stream only.
    assert_eq!(refused, (stream_id(32), 0x7));

    // The 32 open streams still work: the first one gets its body.
    client
        .write_all(&h2_frame(0, END_STREAM, stream_id(0), b"v"))
        .await
        .unwrap();
    tokio::time::timeout(GENEROUS, async {
        loop {
            match read_h2_frame(&mut client).await {
                (HEADERS, id, _) if id == stream_id(0) => return,
                (HEADERS | RST_STREAM | GOAWAY, id, payload) => {
                    panic!("unexpected frame on stream {id}: {payload:?}")
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the first stream got no answer");
    assert_eq!(get(&host.url("/probe/kv/stream-0")).await.status, 200);
    assert_eq!(get(&host.url("/probe/kv/stream-32")).await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn under_a_small_descriptor_limit_idle_and_half_open_connections_do_not_lock_out_a_client() {
    // The default connection cap (1024) does not fit in 256 descriptors:
    // the host must lower it, and the timeouts must free the slots.
    let host = TestHost::start_with_open_files(
        with_host_settings("header_read_timeout_seconds = 2\nidle_timeout_seconds = 2"),
        256,
    );
    let mut attackers = Vec::new();
    for i in 0..400 {
        let mut stream = TcpStream::connect(("127.0.0.1", host.ports.public))
            .await
            .unwrap();
        if i % 2 == 0 {
            stream
                .write_all(b"POST /probe/kv/x HTTP/1.1\r\nHost: localhost\r\n")
                .await
                .unwrap();
        }
        attackers.push(stream);
    }
    let reply = tokio::time::timeout(Duration::from_secs(120), get(&host.url("/hello")))
        .await
        .expect("a fresh client got no answer while 400 idle connections were open");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        host.log().contains("host.max_connections lowered"),
        "{}",
        host.log()
    );
    drop(attackers);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_beyond_the_waiting_bound_are_refused_with_retry_after() {
    let host = TestHost::start(|ports, _| {
        format!(
            "[host]\nmax_waiting_requests = 2\n{}",
            standard_config(ports, &component("probe")).replace(
                "limits = { timeout_ms = 6000, memory_mib = 32 }",
                "limits = { timeout_ms = 30000, memory_mib = 32, max_concurrency = 1 }",
            )
        )
    });
    // One request holds the only instance slot for 8 s...
    let slow_url = host.url("/probe/slow?ms=8000");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // ...while ten more arrive: two may wait, the rest are refused at once.
    let burst: Vec<_> = (0..10)
        .map(|i| {
            let url = host.url(&format!("/probe/kv/burst-{i}"));
            tokio::spawn(async move { request("PUT", &url, &[], b"v".to_vec()).await })
        })
        .collect();
    let mut refused = 0;
    let mut written = Vec::new();
    for (i, reply) in burst.into_iter().enumerate() {
        let reply = reply.await.unwrap();
        if reply.status == 503 {
            assert_error(&reply, 503, "component_overloaded");
            assert_eq!(reply.headers["retry-after"], "1");
            refused += 1;
        } else {
            assert_eq!(reply.status, 204, "{}", reply.text());
            written.push(i);
        }
    }
    assert_eq!((refused, written.len()), (8, 2));
    assert_eq!(slow.await.unwrap().status, 200);
    // A refused request did nothing; the waiting ones did their work.
    for i in 0..10 {
        let stored = get(&host.url(&format!("/probe/kv/burst-{i}"))).await;
        let expected = if written.contains(&i) { 200 } else { 404 };
        assert_eq!(stored.status, expected, "burst-{i}: {}", stored.text());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_with_prior_knowledge_is_answered_in_http2() {
    let host = TestHost::standard();
    let stream = TcpStream::connect(("127.0.0.1", host.ports.public))
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let uri = format!("http://127.0.0.1:{}/hello", host.ports.public);
    for _ in 0..2 {
        let request = http::Request::get(&uri)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(!body.is_empty());
    }
    // HTTP/1.1 still works beside it.
    assert_eq!(get(&host.url("/hello")).await.status, 200);
}

/// The probe's version as the public API reports it.
async fn probe_version(host: &TestHost) -> serde_json::Value {
    get(&host.url("/probe/version")).await.json()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_refuses_requests_without_its_token() {
    let host = TestHost::standard();
    let before = probe_version(&host).await;
    let v2 = std::fs::read(component("probe-v2")).unwrap();
    let deploy = format!("{}/components/probe/deploy", host.admin_url());

    let missing = request("POST", &deploy, &[], v2.clone()).await;
    assert_error(&missing, 401, "missing_token");
    assert!(missing.headers.contains_key("www-authenticate"));
    let wrong = request(
        "POST",
        &deploy,
        &[("authorization", &format!("Bearer {}", "0".repeat(64)))],
        v2.clone(),
    )
    .await;
    assert_error(&wrong, 401, "invalid_token");
    // A token that is a prefix of the real one is no better.
    let prefix = format!("Bearer {}", &host.admin_token()[..32]);
    let short = request("POST", &deploy, &[("authorization", &prefix)], v2.clone()).await;
    assert_error(&short, 401, "invalid_token");
    let reads = request(
        "GET",
        &format!("{}/components", host.admin_url()),
        &[],
        vec![],
    )
    .await;
    assert_error(&reads, 401, "missing_token");
    assert_eq!(
        probe_version(&host).await,
        before,
        "a refused deploy changed the probe"
    );

    // The token: random, in the data directory, for the owner only.
    let token = host.admin_token();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(host.data_dir().join("admin.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let ok = host.admin("POST", "/components/probe/deploy", v2).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_ne!(probe_version(&host).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_refuses_browser_requests_even_with_its_token() {
    let host = TestHost::standard();
    let before = probe_version(&host).await;
    let v2 = std::fs::read(component("probe-v2")).unwrap();
    let deploy = format!("{}/components/probe/deploy", host.admin_url());
    let bearer = format!("Bearer {}", host.admin_token());

    let cross_origin = request(
        "POST",
        &deploy,
        &[
            ("authorization", &bearer),
            ("origin", "http://evil.example"),
        ],
        v2.clone(),
    )
    .await;
    assert_error(&cross_origin, 403, "browser_request");
    // A DNS-rebinding page reaches the same socket under its own name.
    let rebound = request(
        "POST",
        &deploy,
        &[("authorization", &bearer), ("host", "evil.example")],
        v2.clone(),
    )
    .await;
    assert_error(&rebound, 403, "foreign_host");
    let rebound_with_port = request(
        "GET",
        &format!("{}/components", host.admin_url()),
        &[
            ("authorization", &bearer),
            ("host", &format!("evil.example:{}", host.ports.admin)),
        ],
        vec![],
    )
    .await;
    assert_error(&rebound_with_port, 403, "foreign_host");
    let own = format!("127.0.0.1:{}", host.ports.admin);
    let two_hosts = request(
        "POST",
        &deploy,
        &[
            ("authorization", &bearer),
            ("host", &own),
            ("host", "evil.example"),
        ],
        v2.clone(),
    )
    .await;
    assert_error(&two_hosts, 403, "foreign_host");
    assert_eq!(
        probe_version(&host).await,
        before,
        "a refused deploy changed the probe"
    );

    // The listener's own address and localhost are fine.
    let by_name = request(
        "GET",
        &format!("{}/components", host.admin_url()),
        &[
            ("authorization", &bearer),
            ("host", &format!("localhost:{}", host.ports.admin)),
        ],
        vec![],
    )
    .await;
    assert_eq!(by_name.status, 200, "{}", by_name.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_beside_the_host_finds_the_admin_api_and_its_token_without_flags() {
    let host = TestHost::start(|ports, _| {
        format!(
            "[host]\nadmin_listen = \"127.0.0.1:{}\"\ndata_dir = \"data\"\n{}",
            ports.admin,
            standard_config(ports, &component("probe"))
        )
    });
    let beside = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_agora"))
            .args(args)
            .current_dir(host.dir.path())
            .env("NO_COLOR", "1")
            .env_remove("AGORA_ADMIN_TOKEN")
            .env_remove("AGORA_CONFIG")
            .env_remove("AGORA_DATA")
            .env_remove("AGORA_ADMIN")
            .output()
            .unwrap()
    };
    let out = beside(&["events", "test.events"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let before = probe_version(&host).await;
    let out = beside(&["deploy", "probe", component("probe-v2").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deployed = probe_version(&host).await;
    assert_ne!(deployed, before);

    // An explicit token overrides the file: a wrong one is refused.
    let wrong = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["rollback", "probe"])
        .current_dir(host.dir.path())
        .env("AGORA_ADMIN_TOKEN", "f".repeat(64))
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("401"), "{}", stderr(&wrong));
    assert_eq!(probe_version(&host).await, deployed);

    // Elsewhere, without plugins.toml or flags, it says what it needs.
    let elsewhere = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["events", "test.events"])
        .current_dir(std::env::temp_dir())
        .env_remove("AGORA_ADMIN_TOKEN")
        .env_remove("AGORA_CONFIG")
        .output()
        .unwrap();
    assert!(!elsewhere.status.success());
    assert!(
        stderr(&elsewhere).contains("--admin-token-file"),
        "{}",
        stderr(&elsewhere)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_openapi_document_is_a_500_that_shows_no_host_path() {
    let host = TestHost::start(with_host_settings(
        "openapi = \"docs/missing-openapi.json\"",
    ));
    let reply = get(&host.url("/openapi.json")).await;
    assert_error(&reply, 500, "internal_error");
    let text = reply.text();
    let dir = host.dir.path().to_string_lossy();
    assert!(
        !text.contains(&*dir) && !text.contains("missing-openapi"),
        "the answer shows the path: {text}"
    );
    // The operator's log names it.
    let log = host.logged("missing-openapi.json").await;
    assert!(log.contains("missing-openapi.json"), "{log}");
}
