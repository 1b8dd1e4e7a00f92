//! The real server over loopback TCP: every command in both forms, and the
//! behaviours that need real sockets and real time (short timeouts).

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Client, TestServer};
use serde_json::{json, Value};

fn users(v: &Value) -> Vec<&str> {
    v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect()
}

#[test]
fn every_command_works_inline() {
    let server = TestServer::start(&["--admin", "root"]);
    let mut a = server.login("alice");
    let mut b = server.login("bob");
    assert_eq!(
        a.recv_type("presence"),
        json!({"type":"presence","user":"bob","online":true})
    );

    let ok = a.ask("message bob hi bob");
    assert_eq!(
        (ok["cmd"].as_str(), ok["stored"].as_bool()),
        (Some("message"), Some(false))
    );
    let m = b.recv_type("message");
    assert_eq!(
        (
            m["from"].as_str(),
            m["text"].as_str(),
            m["offline"].as_bool()
        ),
        (Some("alice"), Some("hi bob"), Some(false))
    );

    let ok = b.ask("broadcast hello everyone");
    assert_eq!(
        (ok["delivered"].as_u64(), ok["skipped"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(a.recv_type("broadcast")["text"], "hello everyone");

    let ok = a.ask("whoami");
    assert_eq!(
        (ok["user"].as_str(), ok["session"].as_str()),
        (Some("alice"), Some(a.session.as_str()))
    );
    assert_eq!(users(&a.ask("whoelse")), ["bob"]);
    assert_eq!(users(&a.ask("whoelsesince 60")), ["bob"]);
    assert_eq!(a.ask("block bob")["cmd"], "block");
    assert_eq!(b.ask("message alice hi")["code"], "blocked");
    assert_eq!(a.ask("unblock bob")["cmd"], "unblock");
    assert_eq!(a.ask("help")["commands"].as_array().unwrap().len(), 11);
    assert_eq!(a.ask("debug server")["code"], "forbidden");
    let mut r = server.login("root");
    let state = &r.ask("debug server")["state"];
    assert_eq!(
        (
            state["connections"].as_u64(),
            state["users_online"].as_u64()
        ),
        (Some(3), Some(3))
    );

    let ok = a.ask("logout");
    assert_eq!(ok["cmd"], "logout");
    assert_eq!(a.recv_to_end(), [json!({"type":"bye","reason":"logout"})]);
}

#[test]
fn every_command_works_as_json_with_ids() {
    let server = TestServer::start(&["--admin", "root"]);
    let mut a = server.connect();
    let mut b = server.login("bob");
    let ask = |c: &mut Client, v: Value| {
        c.send(&v.to_string());
        let answer = c.recv_answer();
        assert_eq!(answer["id"], v["id"], "{answer}");
        answer
    };
    assert_eq!(
        ask(
            &mut a,
            json!({"cmd":"login","user":"alice","password":"pw-alice","id":1})
        )["user"],
        "alice"
    );
    assert_eq!(
        ask(
            &mut a,
            json!({"cmd":"message","to":"bob","text":"hi","id":2})
        )["stored"],
        false
    );
    assert_eq!(b.recv_type("message")["text"], "hi");
    assert_eq!(
        ask(&mut a, json!({"cmd":"broadcast","text":"all","id":3}))["delivered"],
        1
    );
    assert_eq!(ask(&mut a, json!({"cmd":"whoami","id":4}))["user"], "alice");
    assert_eq!(
        ask(&mut a, json!({"cmd":"whoelse","id":5}))["users"],
        json!(["bob"])
    );
    assert_eq!(
        ask(&mut a, json!({"cmd":"whoelsesince","seconds":10,"id":6}))["users"],
        json!(["bob"])
    );
    assert_eq!(
        ask(&mut a, json!({"cmd":"block","user":"bob","id":7}))["user"],
        "bob"
    );
    assert_eq!(
        ask(&mut a, json!({"cmd":"unblock","user":"bob","id":8}))["user"],
        "bob"
    );
    assert_eq!(ask(&mut a, json!({"cmd":"help","id":9}))["cmd"], "help");
    assert_eq!(
        ask(&mut a, json!({"cmd":"debug","target":"server","id":10}))["code"],
        "forbidden"
    );
    assert_eq!(
        ask(&mut a, json!({"cmd":"fly","id":11}))["code"],
        "unknown_command"
    );
    assert_eq!(
        ask(&mut a, json!({"cmd":"logout","id":12}))["cmd"],
        "logout"
    );
    assert_eq!(a.recv_to_end(), [json!({"type":"bye","reason":"logout"})]);
}

#[test]
fn frame_errors_leave_the_connection_usable() {
    let server = TestServer::start(&["--max-frame-bytes", "100"]);
    let mut a = server.login("alice");
    a.send_bytes(&[b'x'; 5000]);
    a.send_bytes(b"\n\xff\xfe\n{oops\n");
    assert_eq!(a.recv()["code"], "frame_too_large");
    assert_eq!(a.recv()["code"], "bad_frame");
    assert_eq!(a.recv()["code"], "bad_frame");
    assert_eq!(a.ask("whoami")["user"], "alice");
}

#[test]
fn offline_messages_are_delivered_at_the_next_login() {
    let server = TestServer::start(&[]);
    let mut a = server.login("alice");
    for text in ["first", "second", "third"] {
        assert_eq!(a.ask(&format!("message carol {text}"))["stored"], true);
    }
    let mut c = server.connect();
    c.send("login carol pw-carol");
    assert_eq!(c.recv()["cmd"], "login");
    let texts: Vec<_> = (0..3)
        .map(|_| {
            let m = c.recv();
            assert_eq!(
                (m["type"].as_str(), m["offline"].as_bool()),
                (Some("message"), Some(true))
            );
            m["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(texts, ["first", "second", "third"]);
}

#[test]
fn an_abrupt_disconnect_sends_presence_offline() {
    let server = TestServer::start(&[]);
    let mut a = server.login("alice");
    let b = server.login("bob");
    assert_eq!(a.recv_type("presence")["online"], true);
    b.shutdown();
    drop(b);
    assert_eq!(
        a.recv_type("presence"),
        json!({"type":"presence","user":"bob","online":false})
    );
    server.wait_for_log("disconnected");
}

#[test]
fn lockout_holds_then_expires() {
    let server = TestServer::start(&["--lockout-secs", "1", "--lockout-attempts", "2"]);
    let mut c = server.connect();
    assert_eq!(c.ask("login bob nope")["code"], "invalid_credentials");
    let locked = c.ask("login bob nope");
    assert_eq!(
        (locked["code"].as_str(), locked["retry_after"].as_u64()),
        (Some("account_locked"), Some(1))
    );
    assert_eq!(c.ask("login bob pw-bob")["code"], "account_locked");
    server.wait_for_log("locked after failed logins");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(c.ask("login bob pw-bob")["cmd"], "login");
}

#[test]
fn idle_connections_are_timed_out() {
    let server = TestServer::start(&["--idle-timeout-secs", "1"]);
    let mut a = server.login("alice");
    let mut anon = server.connect();
    let start = Instant::now();
    assert_eq!(
        anon.recv_to_end(),
        [json!({"type":"bye","reason":"idle_timeout"})]
    );
    let frames = a.recv_to_end();
    assert_eq!(
        frames.last(),
        Some(&json!({"type":"bye","reason":"idle_timeout"}))
    );
    assert!(start.elapsed() >= Duration::from_millis(900));
}

#[test]
fn a_slow_consumer_is_cut_off_and_the_others_keep_receiving() {
    let server = TestServer::start(&["--max-output-bytes", "65536", "--no-rate-limit"]);
    // A reader with a tiny receive window that never reads.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut slow = Client::from_stream(socket.into());
    slow.login("carol");
    let mut fast = server.login("bob");
    let mut sender = server.login("alice");

    let text = "x".repeat(8000);
    let fast_reader = std::thread::spawn(move || {
        let mut got = 0;
        loop {
            let v = fast.recv();
            if v["type"] == "broadcast" {
                got += 1;
            }
            if v["type"] == "message" && v["text"] == "done" {
                return got;
            }
        }
    });
    let (sent, cut) = sender.broadcast_until_offline(&text, "carol", 2000);
    assert!(cut, "carol was never cut off after {sent} broadcasts");
    sender.ask("message bob done");
    assert_eq!(fast_reader.join().unwrap(), sent, "bob got every broadcast");
    server.wait_for_log("slow consumer");
    // The slow reader's stream ends (after whatever it had buffered): the
    // server let go of it.
    let mut stream = slow.into_stream();
    let mut sink = Vec::new();
    match stream.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the slow consumer's connection did not end: {e}"),
    }
}

#[test]
fn connections_beyond_the_limit_get_server_full() {
    let server = TestServer::start(&["--max-connections", "2"]);
    let _a = server.connect();
    let _b = server.connect();
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).unwrap();
    assert_eq!(got, "{\"type\":\"bye\",\"reason\":\"server_full\"}\n");
    server.wait_for_log("server full");
}

/// A name typed at a login is logged only if it is an account: people type
/// their password into the name field too.
#[test]
fn a_refused_login_logs_the_name_only_if_it_is_an_account() {
    let server = TestServer::start(&[]);
    let mut c = server.connect();
    for name in ["Tr0ub4dor-3", "alice"] {
        let e = c.ask(&format!("login {name} wrong"));
        assert_eq!(e["code"], "invalid_credentials", "{e}");
    }
    // Both refusals are logged, in order; only the account is named.
    server.wait_for_log("user=alice");
    let log = server.log().join("\n");
    assert!(log.contains("the name is no account"), "{log}");
    assert!(!log.contains("Tr0ub4dor-3"), "{log}");
    assert!(log.contains("user=alice"), "{log}");
}
