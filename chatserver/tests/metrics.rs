//! `--metrics ADDR`: `/metrics` after a scripted session holds the values
//! the session made, parses with the Prometheus project's own Python
//! parser, agrees with `debug server`, and carries no user name; the
//! listener is kept apart from the chat page's.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::{http_exchange, TestServer};

fn metrics_addr(server: &TestServer) -> SocketAddr {
    let marker = "serving metrics on http://";
    server.wait_for_log(marker);
    let log = server.log();
    let line = log.iter().find(|l| l.contains(marker)).unwrap();
    let rest = &line[line.find(marker).unwrap() + marker.len()..];
    rest.split('/').next().unwrap().parse().unwrap()
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = http_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap();
    (status, body)
}

/// Each sample line, `name{labels}` to value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// The exposition as the Prometheus Python client's parser reads it:
/// `name{label="v",…}` (labels sorted) to value, one per line.
fn parsed_by_prometheus_client(text: &str) -> HashMap<String, f64> {
    const SCRIPT: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        print("%s{%s} %r" % (s.name, labels, s.value))
"#;
    // Debian's python3-prometheus-client is for the system's Python;
    // another python3 first on PATH may lack it.
    for python in ["/usr/bin/python3", "python3"] {
        let Ok(mut child) = Command::new(python)
            .args(["-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            continue;
        };
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No module named 'prometheus_client'") {
            continue;
        }
        assert!(out.status.success(), "the parser refused it: {stderr}");
        return String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let (key, value) = l.rsplit_once(' ').unwrap();
                (key.to_owned(), value.parse().unwrap())
            })
            .collect();
    }
    panic!(
        "this test checks /metrics with the Prometheus Python client: install it \
         (Debian: apt-get install python3-prometheus-client; the test command does)"
    );
}

#[test]
fn metrics_follow_a_scripted_session() {
    let server = TestServer::start(&["--admin", "root", "--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&server);

    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    let mut wrong = server.connect();
    assert_eq!(wrong.ask("login carol nope")["code"], "invalid_credentials");
    assert_eq!(alice.ask("message bob hi")["stored"], false);
    assert_eq!(alice.ask("message carol later")["stored"], true);
    assert_eq!(alice.ask("message dave later")["stored"], true);
    assert_eq!(bob.ask("block alice")["type"], "ok");
    assert_eq!(alice.ask("message bob again")["code"], "blocked");
    assert_eq!(alice.ask("frobnicate")["code"], "unknown_command");
    // bob blocked alice, and root is not online yet: nobody gets it.
    assert_eq!(alice.ask("broadcast hello")["delivered"], 0);
    assert_eq!(bob.ask("logout")["type"], "ok");
    assert_eq!(bob.recv_type("bye")["reason"], "logout");
    drop(bob);
    let mut root = server.login("root");
    let debug = root.ask("debug server")["state"].clone();

    // bob's socket is gone once the server has seen his side close.
    let tcp = r#"chatserver_connections{transport="tcp"}"#;
    let started = std::time::Instant::now();
    let (text, m) = loop {
        let (status, text) = get(addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        let m = samples(&text);
        if m[tcp] == 3.0 || started.elapsed() > common::TIMEOUT {
            break (text, m);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let value = |key: &str| {
        *m.get(key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{text}"))
    };
    // bob's login told alice; his logout did not (he blocked her, and a
    // block hides the blocker's comings and goings); root's told alice.
    // Every series is there from the start, at zero until it happens.
    let expected = [
        (r#"chatserver_logins_total{result="ok"}"#, 3.0),
        (r#"chatserver_logins_total{result="invalid"}"#, 1.0),
        (r#"chatserver_logins_total{result="locked"}"#, 0.0),
        (r#"chatserver_messages_total{outcome="delivered"}"#, 1.0),
        (r#"chatserver_messages_total{outcome="stored"}"#, 2.0),
        (r#"chatserver_messages_total{outcome="blocked"}"#, 1.0),
        (r#"chatserver_messages_total{outcome="mailbox_full"}"#, 0.0),
        ("chatserver_broadcasts_total", 1.0),
        ("chatserver_broadcast_deliveries_total", 0.0),
        ("chatserver_presence_frames_total", 2.0),
        (r#"chatserver_byes_total{reason="logout"}"#, 1.0),
        (r#"chatserver_errors_total{code="unknown_command"}"#, 1.0),
        (
            r#"chatserver_errors_total{code="invalid_credentials"}"#,
            1.0,
        ),
        (tcp, 3.0),
        (r#"chatserver_connections{transport="http"}"#, 1.0),
        ("chatserver_offline_messages", 2.0),
        ("chatserver_offline_bytes", 10.0),
        ("chatserver_password_checks_pending", 0.0),
        (r#"chatserver_commit_batches_total{result="failed"}"#, 0.0),
        (r#"chatserver_byes_total{reason="flood"}"#, 0.0),
        (r#"chatserver_errors_total{code="forbidden"}"#, 0.0),
        (
            r#"chatserver_connections_refused_total{reason="server_full"}"#,
            0.0,
        ),
    ];
    for (key, want) in expected {
        assert_eq!(value(key), want, "{key}");
    }
    assert!(value("chatserver_event_loop_turn_duration_seconds_count") > 0.0);
    assert!(value(r#"chatserver_commit_batches_total{result="committed"}"#) > 0.0);
    assert!(value(r#"chatserver_commit_duration_seconds_bucket{le="+Inf"}"#) > 0.0);
    assert!(value("process_resident_memory_bytes") > 0.0);
    assert!(value("process_open_fds") > 0.0);
    assert!(value("process_cpu_seconds_total") >= 0.0);
    // `debug server` agrees.
    for (field, key) in [
        ("users_online", "chatserver_users_online"),
        ("queued_offline_messages", "chatserver_offline_messages"),
        ("locked_accounts", "chatserver_locked_accounts"),
        ("connections", "chatserver_sessions"),
    ] {
        assert_eq!(debug[field].as_f64(), Some(value(key)), "{field}");
    }
    // No label carries a user name.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        for name in ["alice", "bob", "carol", "dave", "root"] {
            assert!(!line.contains(name), "a user name in {line}");
        }
    }

    // The Prometheus project's own parser reads it, to the same values.
    let parsed = parsed_by_prometheus_client(&text);
    assert_eq!(parsed[r#"chatserver_logins_total{result="ok"}"#], 3.0);
    assert_eq!(parsed["chatserver_offline_messages{}"], 2.0);
    assert!(parsed.len() > 50, "{parsed:?}");
    let _ = (&mut alice, &mut root);
}

#[test]
fn the_metrics_listener_serves_metrics_and_health_only() {
    let server = TestServer::start(&["--metrics", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
    let addr = metrics_addr(&server);
    let (status, body) = get(addr, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = get(addr, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    for path in ["/", "/ws", "/chat.js", "/metricsx"] {
        assert_eq!(get(addr, path).0, 404, "{path}");
    }
    let head = http_exchange(
        addr,
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    // The chat page's listener has no /metrics.
    let page = server.http_addr();
    assert_eq!(get(page, "/metrics").0, 404);
    assert_eq!(get(page, "/healthz").0, 200);
}

/// The metrics listener is kept out of the chat's connection limits: a
/// full server still answers its scrapes and health checks, and counts
/// the chat connections it refuses.
#[test]
fn a_full_server_still_answers_on_the_metrics_listener() {
    let server = TestServer::start(&["--max-connections", "2", "--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&server);
    let _a = server.connect();
    let _b = server.connect();
    // The third is refused.
    let mut c = std::net::TcpStream::connect(server.addr).unwrap();
    c.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    let mut refusal = String::new();
    std::io::Read::read_to_string(&mut c, &mut refusal).unwrap();
    assert!(refusal.contains("server_full"), "{refusal}");
    for _ in 0..3 {
        assert_eq!(get(addr, "/healthz").0, 200);
    }
    let started = std::time::Instant::now();
    loop {
        let (status, text) = get(addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        let refused =
            samples(&text)[r#"chatserver_connections_refused_total{reason="server_full"}"#];
        if refused == 1.0 {
            break;
        }
        assert!(started.elapsed() < common::TIMEOUT, "{text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
