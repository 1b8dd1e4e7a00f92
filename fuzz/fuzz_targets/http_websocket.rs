#![no_main]
//! The `--http` listener's parsers, on untrusted bytes: an HTTP request,
//! then (after an upgrade) WebSocket frames. The modules are the server's
//! own, included by path (chatserver is a binary, not a library).

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../chatserver/src/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "../../chatserver/src/origin.rs"]
mod origin;
#[allow(dead_code)]
#[path = "../../chatserver/src/websocket.rs"]
mod websocket;

/// The core frame limit the sessions are made with.
const FRAME_LIMIT: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&control, data)) = data.split_first() else {
        return;
    };
    let secure = control & 1 == 1;
    let allowed = vec![origin::parse_origin("https://chat.example.com").expect("a valid origin")];
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 8080));
    let config = http::HttpConfig {
        origins: origin::Origins::new(secure, listen, &[], allowed),
    };
    let rest = match http::route(data, &config) {
        http::Routed::Partial => {
            assert!(data.len() < http::MAX_REQUEST_BYTES, "an oversized head waits");
            data
        }
        http::Routed::Respond(response) => {
            assert!(response.starts_with(b"HTTP/1.1 "));
            data
        }
        http::Routed::Upgrade { response, consumed } => {
            assert!(response.starts_with(b"HTTP/1.1 101 "));
            &data[consumed..]
        }
    };
    // The bytes after the request (or all of them) as WebSocket input, cut
    // into reads of a size the control byte picks.
    let mut ws = websocket::WebSocket::new(FRAME_LIMIT);
    let chunk = usize::from(control >> 1).max(1);
    for piece in rest.chunks(chunk) {
        let received = ws.receive(piece);
        for frame in &received.frames {
            assert!(frame.len() <= FRAME_LIMIT * websocket::MESSAGE_LIMIT_FACTOR);
            assert!(std::str::from_utf8(frame).is_ok(), "text messages are UTF-8");
        }
        if received.ended.is_some() {
            // Nothing more is read from an ended session.
            break;
        }
    }
});
