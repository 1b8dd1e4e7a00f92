//! The protocol over WebSocket (`--http`): the same sessions as over TCP,
//! with the same rules and limits, plus the HTTP side's own checks.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::{http_exchange, Frames, TestServer, TIMEOUT};
use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::{HandshakeError, Message, WebSocket};

/// A WebSocket client that speaks protocol frames, one per message.
struct WsClient<S: Read + Write> {
    ws: WebSocket<S>,
}

fn connect(
    addr: SocketAddr,
    origin: Option<&str>,
) -> Result<WsClient<TcpStream>, tungstenite::Error> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    handshake(&format!("ws://{addr}/ws"), stream, origin)
}

fn handshake<S: Read + Write>(
    url: &str,
    stream: S,
    origin: Option<&str>,
) -> Result<WsClient<S>, tungstenite::Error> {
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
    }
    match tungstenite::client(request, stream) {
        Ok((ws, _)) => {
            let mut c = WsClient { ws };
            assert_eq!(c.recv()["type"], "hello");
            Ok(c)
        }
        Err(HandshakeError::Failure(e)) => Err(e),
        Err(HandshakeError::Interrupted(_)) => panic!("blocking handshake interrupted"),
    }
}

impl<S: Read + Write> Frames for WsClient<S> {
    fn send(&mut self, frame: &str) {
        self.ws.send(Message::text(frame)).unwrap();
    }

    /// The next protocol frame; each message must hold exactly one.
    fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().unwrap() {
                Message::Text(text) => {
                    assert!(!text.contains('\n'), "one frame per message: {text:?}");
                    return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }
}

impl<S: Read + Write> WsClient<S> {
    /// Reads until the server's close frame, returning its status.
    fn recv_close(&mut self) -> CloseCode {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(frame))) => return frame.code,
                Ok(Message::Close(None)) => panic!("a close frame without a status"),
                Ok(_) => {}
                Err(e) => panic!("no close frame: {e}"),
            }
        }
    }
}

fn start(args: &[&str]) -> (TestServer, SocketAddr) {
    let mut all = vec!["--http", "127.0.0.1:0", "--no-db"];
    all.extend_from_slice(args);
    let server = TestServer::start(&all);
    let http = server.http_addr();
    (server, http)
}

#[test]
fn a_browser_user_and_a_tcp_user_talk_both_ways() {
    let (server, http) = start(&[]);
    let origin = format!("http://{http}");
    let mut alice = connect(http, Some(&origin)).unwrap();
    let ok = alice.ask(r#"{"id":1,"cmd":"login","user":"alice","password":"pw-alice"}"#);
    assert_eq!(ok["type"], "ok", "{ok}");
    assert_eq!(ok["id"], 1);
    let mut bob = server.login("bob");
    assert_eq!(alice.recv_type("presence")["user"], "bob");
    assert_eq!(alice.ask("message bob hello from a browser")["type"], "ok");
    let m = bob.recv_type("message");
    assert_eq!(
        (m["from"].as_str(), m["text"].as_str()),
        (Some("alice"), Some("hello from a browser"))
    );
    bob.ask("message alice hi back over tcp");
    let m = alice.recv_type("message");
    assert_eq!(m["text"], "hi back over tcp");
    // A burst of long frames arrives as one message each.
    let text = "w".repeat(5_000);
    for i in 0..20 {
        bob.send(&format!("message alice {i} {text}"));
    }
    for i in 0..20 {
        assert_eq!(
            alice.recv_type("message")["text"].as_str().unwrap(),
            format!("{i} {text}")
        );
    }
    assert_eq!(alice.ask("logout")["cmd"], "logout");
    assert_eq!(alice.recv()["reason"], "logout");
    assert_eq!(alice.recv_close(), CloseCode::Normal);
    assert_eq!(bob.recv_type("presence")["online"], false);
    server.wait_for_log("connected (WebSocket)");
}

#[test]
fn no_password_or_message_text_reaches_the_log_even_at_trace() {
    const PASSWORD: &str = "pw-Quokka-Sesame-7741";
    const TO_BOB: &str = "the eagle lands at dawn 4417";
    const TO_ERIN: &str = "bravo reply over tcp 9931";
    let credentials = format!("{}erin {PASSWORD}\n", common::CREDENTIALS);
    let server = TestServer::start_with_env(
        &credentials,
        &["--listen", "127.0.0.1:0"],
        &["--http", "127.0.0.1:0", "--no-db"],
        // Even asked for by name.
        &[("RUST_LOG", "trace,tungstenite::protocol=trace")],
    );
    let http = server.http_addr();
    let mut erin = connect(http, None).unwrap();
    let login = format!(r#"{{"cmd":"login","user":"erin","password":"{PASSWORD}","id":1}}"#);
    assert_eq!(erin.ask(&login)["type"], "ok");
    let mut bob = server.login("bob");
    assert_eq!(erin.ask(&format!("message bob {TO_BOB}"))["type"], "ok");
    assert_eq!(bob.recv_type("message")["text"], TO_BOB);
    assert_eq!(bob.ask(&format!("message erin {TO_ERIN}"))["type"], "ok");
    assert_eq!(erin.recv_type("message")["text"], TO_ERIN);
    assert_eq!(erin.ask("logout")["cmd"], "logout");
    // Logged after everything above was read and written.
    server.wait_for_log("logged out");
    let log = server.log().join("\n");
    // The level took: the reactor's debug lines are there.
    assert!(log.contains("HTTP connection"), "{log}");
    for secret in [PASSWORD, TO_BOB, TO_ERIN] {
        // As text, or as the hex dump of a frame's payload.
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        for shape in [secret, hex.as_str()] {
            assert!(!log.contains(shape), "{shape:?} is in the log:\n{log}");
        }
    }
}

#[test]
fn the_chat_page_is_served_and_everything_else_refused() {
    let (_server, http) = start(&[]);
    let page = http_exchange(http, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.contains("Content-Type: text/html"));
    assert!(page.contains("Content-Security-Policy: default-src 'none'; script-src 'self'"));
    assert!(page.to_ascii_lowercase().contains("<!doctype html>"));
    for (request, status) in [
        (&b"GET /chat.js HTTP/1.1\r\nHost: x\r\n\r\n"[..], "200"),
        // Health checks, for a load balancer (no database: always ready).
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "200"),
        (b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", "200"),
        (b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n", "404"),
        (b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n", "405"),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", "426"),
        (b"\x16\x03\x01 not http\r\n\r\n", "400"),
    ] {
        let response = http_exchange(http, request);
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status} ")),
            "{response}"
        );
    }
    // A request head past the bound is refused before it is all read.
    let mut huge = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 9_000));
    let response = http_exchange(http, &huge);
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
}

/// Asserts that a handshake was refused with a 403.
fn refused<S: Read + Write>(result: Result<WsClient<S>, tungstenite::Error>) {
    match result {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a foreign origin got a session"),
    }
}

#[test]
fn the_page_and_its_files_share_one_kept_connection() {
    let (_server, http) = start(&[]);
    let mut stream = std::net::TcpStream::connect(http).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    for path in ["/", "/chat.css", "/chat.js", "/favicon.ico"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {http}\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let response = common::read_http_response(&mut stream, false);
        assert!(
            response.starts_with("HTTP/1.1 200 OK\r\n"),
            "{path}: {response}"
        );
        assert!(response.contains("\r\nDate: "), "{response}");
        assert!(!response.contains("Connection: close"), "{response}");
    }
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let last = common::read_http_response(&mut stream, false);
    assert!(last.contains("\r\nConnection: close\r\n"), "{last}");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "closed after the last");
}

#[test]
fn a_websocket_from_another_origin_is_refused() {
    let (_server, http) = start(&[
        "--allow-origin",
        "https://chat.example.com",
        "--public-host",
        "chat.test",
    ]);
    let port = http.port();
    refused(connect(http, Some("http://evil.example")));
    // A page on a name its author pointed at this server (DNS
    // rebinding): its Host header agrees with its origin, and is no guide.
    let stream = TcpStream::connect(http).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let rebound = format!("rebound.example:{port}");
    refused(handshake(
        &format!("ws://{rebound}/ws"),
        stream,
        Some(&format!("http://{rebound}")),
    ));
    for origin in [
        "https://chat.example.com".to_owned(),
        format!("http://{http}"),
        format!("http://localhost:{port}"),
        format!("http://chat.test:{port}"),
    ] {
        assert!(connect(http, Some(&origin)).is_ok(), "{origin}");
    }
}

#[test]
fn a_wildcard_listener_warns_that_browsers_will_be_refused() {
    // Nothing connects to it but over loopback.
    let server = TestServer::start(&["--http", "0.0.0.0:0", "--no-db"]);
    server.wait_for_log("listens on every address");
    let port = server.http_addr().port();
    let http = SocketAddr::from(([127, 0, 0, 1], port));
    refused(connect(http, Some(&format!("http://{http}"))));
    // Clients that are not browsers still get a session.
    assert!(connect(http, None).is_ok());
}

#[test]
fn an_oversize_frame_is_refused_and_a_huge_message_ends_the_session() {
    let (_server, http) = start(&["--max-frame-bytes", "1024"]);
    let mut c = connect(http, None).unwrap();
    let e = c.ask(&"x".repeat(1025));
    assert_eq!(e["code"], "frame_too_large", "{e}");
    // The session goes on, as over TCP.
    assert_eq!(c.ask("whoami")["code"], "not_logged_in");
    // Beyond four frame limits, the WebSocket is closed: message too big.
    c.ws.send(Message::text("y".repeat(4 * 1024 + 1))).unwrap();
    assert_eq!(c.recv_close(), CloseCode::Size);
}

#[test]
fn a_message_with_a_line_break_closes_the_websocket() {
    let (_server, http) = start(&[]);
    let mut c = connect(http, None).unwrap();
    c.send("whoami\nhelp");
    assert_eq!(c.recv_close(), CloseCode::Invalid);
}

#[test]
fn a_message_ending_in_a_newline_is_one_frame_as_websocat_sends_it() {
    let (_server, http) = start(&[]);
    let mut c = connect(http, None).unwrap();
    c.send("whoami\n");
    assert_eq!(c.recv()["code"], "not_logged_in");
    c.send("login alice pw-alice\r\n");
    assert_eq!(c.recv_type("ok")["user"], "alice");
    c.send("whoami\n\n");
    assert_eq!(c.recv_close(), CloseCode::Invalid);
}

#[test]
fn the_same_limits_apply_as_over_tcp() {
    let (_server, http) = start(&[
        "--rate-limit-burst",
        "2",
        "--rate-limit-per-sec",
        "1",
        "--idle-timeout-secs",
        "1",
    ]);
    let mut c = connect(http, None).unwrap();
    for _ in 0..3 {
        c.send("help");
    }
    let codes: Vec<Value> = (0..3).map(|_| c.recv()["code"].clone()).collect();
    assert_eq!(codes[2], "rate_limited", "{codes:?}");
    // Then silence: the idle timeout says bye and closes the WebSocket.
    let bye = c.recv_type("bye");
    assert_eq!(bye["reason"], "idle_timeout");
    assert_eq!(c.recv_close(), CloseCode::Normal);
}

#[test]
fn with_tls_the_page_and_websocket_are_https_and_wss() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, root) = common::certificate(dir.path(), "localhost");
    let (_server, http) = start(&["--tls-cert", &cert, "--tls-key", &key]);
    let config = common::tls_client_config(&root);
    let wss = |origin: &str| {
        let tcp = TcpStream::connect(http).unwrap();
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        let tls =
            rustls::ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
        let url = format!("wss://localhost:{}/ws", http.port());
        handshake(&url, rustls::StreamOwned::new(tls, tcp), Some(origin))
    };
    let mut c = wss(&format!("https://localhost:{}", http.port())).unwrap();
    assert_eq!(c.ask("login carol pw-carol")["cmd"], "login");
    // Over TLS the page's origin is https: the same host over http is
    // another origin.
    match wss(&format!("http://localhost:{}", http.port())) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        _ => panic!("an http origin opened a wss session"),
    }
}

#[test]
fn an_http_connection_over_a_limit_gets_a_503() {
    let (_server, http) = start(&["--max-connections-per-ip", "1"]);
    // Accepted first: the listener takes connections in order.
    let _first = TcpStream::connect(http).unwrap();
    let response = http_exchange(http, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    assert!(response.contains("too_many_connections"), "{response}");
}

#[test]
fn a_browser_that_stops_reading_is_cut_off_as_a_slow_consumer() {
    let (server, http) = start(&["--max-output-bytes", "65536", "--no-rate-limit"]);
    // A WebSocket with a tiny receive window that stops reading once
    // logged in.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&http.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut slow = handshake(&format!("ws://{http}/ws"), stream, None).unwrap();
    assert_eq!(slow.ask("login carol pw-carol")["type"], "ok");
    let mut sender = server.login("alice");
    let text = "x".repeat(8000);
    let (_, cut) = sender.broadcast_until_offline(&text, "carol", 2000);
    assert!(cut, "the WebSocket reader was never cut off");
    server.wait_for_log("slow consumer");
}

#[test]
fn answers_go_out_before_the_close_that_follows_them() {
    let (_server, http) = start(&[]);
    let mut c = connect(http, None).unwrap();
    // `help` and a close in one segment, so the server reads them together.
    let mut bytes = Vec::new();
    for mut frame in [
        Frame::message(&b"help"[..], OpCode::Data(Data::Text), true),
        Frame::close(None),
    ] {
        frame.header_mut().mask = Some([1, 2, 3, 4]);
        frame.format(&mut bytes).unwrap();
    }
    c.ws.get_mut().write_all(&bytes).unwrap();
    // The help reply, then the echo of our close: nothing after a close.
    let mut saw_help = false;
    loop {
        match c.ws.read() {
            Ok(Message::Text(text)) => {
                assert!(text.contains("\"help\""), "{text}");
                saw_help = true;
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(saw_help, "the close came before the answer");
}

#[test]
fn a_peer_that_pings_and_never_reads_is_cut_off() {
    let (server, http) = start(&["--max-output-bytes", "65536"]);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&http.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    let mut c = handshake(&format!("ws://{http}/ws"), stream, None).unwrap();
    let payload = vec![b'p'; 125];
    for i in 0..200_000 {
        let sent =
            c.ws.write(Message::Ping(payload.clone().into()))
                .and_then(|()| c.ws.flush());
        if sent.is_err()
            || (i % 1000 == 0 && server.log().iter().any(|l| l.contains("slow consumer")))
        {
            break;
        }
    }
    server.wait_for_log("slow consumer");
}
