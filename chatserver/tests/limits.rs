//! Flood control and connection limits, end to end.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{TestServer, TIMEOUT};
use serde_json::json;

/// Reads everything until the server closes.
fn read_to_close(mut stream: TcpStream) -> String {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).unwrap();
    got
}

#[test]
fn connections_beyond_the_per_address_limit_get_too_many_connections() {
    let server = TestServer::start(&["--max-connections-per-ip", "2"]);
    let a = server.connect();
    let _b = server.connect();
    let third = TcpStream::connect(server.addr).unwrap();
    assert_eq!(
        read_to_close(third),
        "{\"type\":\"bye\",\"reason\":\"too_many_connections\"}\n"
    );
    server.wait_for_log("too many connections from this address");
    // A connection that ends frees its place.
    a.shutdown();
    drop(a);
    let start = Instant::now();
    loop {
        let mut c = common::Client::from_stream_raw(TcpStream::connect(server.addr).unwrap());
        match c.try_recv() {
            Some(v) if v["type"] == "hello" => break,
            Some(v) => assert_eq!(v["reason"], "too_many_connections", "{v}"),
            None => {}
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "the closed connection still counts"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connections_that_do_not_log_in_in_time_are_closed() {
    let server = TestServer::start(&["--login-timeout-secs", "1"]);
    let mut idle = server.connect();
    let mut alice = server.login("alice");
    let started = Instant::now();
    assert_eq!(
        idle.recv_to_end(),
        [json!({"type":"bye","reason":"login_timeout"})]
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Logged in: only the idle timeout (600 s) applies.
    assert_eq!(alice.ask("whoami")["user"], "alice");
}

#[test]
fn a_client_that_keeps_flooding_is_cut_off() {
    let server = TestServer::start(&[
        "--rate-limit-burst",
        "5",
        "--rate-limit-per-sec",
        "1",
        "--flood-after",
        "3",
    ]);
    let mut bob = server.login("bob");
    let mut c = server.login("alice");
    // The login used one token of the burst of 5: four answers, three
    // refusals, then the fourth refusal in a row ends it.
    c.send(&"whoami\n".repeat(50));
    let frames = c.recv_to_end();
    let kinds = common::frame_kinds(&frames);
    assert_eq!(
        kinds,
        [
            "ok",
            "ok",
            "ok",
            "ok",
            "rate_limited",
            "rate_limited",
            "rate_limited",
            "bye flood"
        ]
    );
    server.wait_for_log("flooding past its rate limit");
    let online = bob.recv_type("presence");
    assert_eq!(online["online"], true, "{online}");
    let offline = bob.recv_type("presence");
    assert_eq!(
        (offline["user"].as_str(), offline["online"].as_bool()),
        (Some("alice"), Some(false))
    );
}
