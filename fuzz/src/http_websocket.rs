//! The check behind the `http_websocket` target: the `--http` listener on
//! untrusted bytes, through the server library (`chatserver` without its
//! default features: no SQLite, no rustls, no clap). An HTTP request, then
//! (after an upgrade) WebSocket frames, cut into reads of a size the first
//! byte picks; once through the parsers alone, once through a `Link` as
//! the reactor drives it.
//!
//! Not a module of `lib.rs`: the core's seed replay
//! (`chatproto/tests/fuzz_seeds.rs`) compiles `lib.rs` without
//! `chatserver`. The fuzz target and the server's seed replay
//! (`chatserver/tests/fuzz_seeds.rs`) include this file.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatserver::http::{self, HttpConfig, Routed};
use chatserver::link::{self, Link, LinkConfig, LinkEvent, Transport};
use chatserver::origin::{self, Origins};
use chatserver::websocket::{self, Received, WebSocket};

/// The core frame limit the sessions are made with.
const FRAME_LIMIT: usize = 64;

/// Input: a control byte (bit 0: the listener is HTTPS; the rest: the
/// size of each read), then the bytes a client sends.
pub fn check_http_websocket(data: &[u8]) {
    let Some((&control, data)) = data.split_first() else {
        return;
    };
    let secure = control & 1 == 1;
    let chunk = usize::from(control >> 1).max(1);
    let allowed = vec![origin::parse_origin("https://chat.example.com").expect("a valid origin")];
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 8080));
    let config = Arc::new(HttpConfig {
        health: chatserver::health::Health::default(),
        origins: Origins::new(secure, listen, &[], allowed),
        tls: secure,
        metrics: None,
    });
    let upgrade = check_parsers(data, &config, chunk);
    check_link(data, config, chunk, upgrade);
}

/// Every answer is a whole HTTP response, an oversized head is never
/// waited on, and every message handed on is UTF-8 and within the limit.
/// Requests are served in turn while the connection is kept, as the link
/// serves them (its limits: `MAX_HTTP_REQUESTS`, and the answers queued
/// below `MAX_KEPT_OUTPUT_BYTES`, none written meanwhile here). Whether
/// one of them is an upgrade.
fn check_parsers(data: &[u8], config: &HttpConfig, chunk: usize) -> bool {
    let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let mut at = 0;
    let (mut served, mut queued) = (0, 0);
    let (rest, upgrade) = loop {
        let may_keep = served + 1 < link::MAX_HTTP_REQUESTS && queued < link::MAX_KEPT_OUTPUT_BYTES;
        let head = &data[at..];
        match http::route(head, config, now, may_keep) {
            Routed::Partial => {
                assert!(
                    head.len() < http::MAX_REQUEST_BYTES,
                    "an oversized head waits"
                );
                break (data, false);
            }
            Routed::Respond {
                response,
                keep_alive,
                consumed,
            } => {
                assert!(response.starts_with(b"HTTP/1.1 "));
                assert!(consumed <= head.len());
                if !keep_alive {
                    break (data, false);
                }
                // A kept connection reads its next request after this one.
                assert!(consumed > 0);
                at += consumed;
                served += 1;
                queued += response.len();
            }
            Routed::Upgrade { response, consumed } => {
                assert!(response.starts_with(b"HTTP/1.1 101 "));
                break (&data[at + consumed..], true);
            }
        }
    };
    // The bytes after the request (or all of them) as WebSocket input.
    let mut ws = WebSocket::new(FRAME_LIMIT);
    'reads: for piece in rest.chunks(chunk) {
        let mut input = piece;
        loop {
            match ws.read_one(&mut input) {
                Received::Message(frame) => check_message(&frame),
                Received::Reply(pong) => assert_eq!(pong[0], 0x8a, "a pong"),
                // Nothing more is read from an ended session.
                Received::Ended { .. } => break 'reads,
                Received::NeedMore => {
                    assert!(input.is_empty(), "tungstenite takes every byte");
                    break;
                }
            }
        }
    }
    upgrade
}

/// The link the reactor would run for these bytes agrees with the parsers,
/// hands on nothing after its end, and queues only whole answers.
fn check_link(data: &[u8], config: Arc<HttpConfig>, chunk: usize, upgrade: bool) {
    let now = Instant::now();
    let link_config = Arc::new(LinkConfig {
        max_frame_bytes: FRAME_LIMIT,
        max_output_bytes: 1 << 20,
        slow_consumer_after: Duration::from_secs(10),
    });
    let mut link =
        Link::new(link_config, Transport::Http(config), None, now).expect("no TLS to start");
    let (mut upgraded, mut ended) = (false, false);
    for piece in data.chunks(chunk) {
        if !link.takes_input() {
            break;
        }
        link.received(Bytes::copy_from_slice(piece));
        while let Some(event) = link.poll_event(now) {
            assert!(!ended, "nothing after the end");
            match event {
                LinkEvent::Upgraded => {
                    assert!(!upgraded, "one upgrade");
                    upgraded = true;
                }
                LinkEvent::Message(message) => {
                    assert!(upgraded, "messages only after the upgrade");
                    check_message(&message);
                    // As the core would answer: one frame back.
                    link.push_frame(message);
                }
                LinkEvent::Replied => assert!(upgraded),
                LinkEvent::Lines(_) => panic!("an HTTP link carries no lines"),
                LinkEvent::Ended { output_lost, .. } => {
                    assert!(!output_lost, "no TLS, so nothing is lost");
                    ended = true;
                }
            }
        }
    }
    assert_eq!(upgraded, upgrade, "the link and the parser agree");
    let mut out = Vec::new();
    link.write_to(&mut out).expect("a Vec takes everything");
    assert!(
        out.is_empty() || out.starts_with(b"HTTP/1.1 "),
        "a response first"
    );
    assert_eq!(link.unsent_frames(), 0);
}

fn check_message(frame: &[u8]) {
    assert!(frame.len() <= FRAME_LIMIT * websocket::MESSAGE_LIMIT_FACTOR);
    assert!(
        std::str::from_utf8(frame).is_ok(),
        "text messages are UTF-8"
    );
}
