//! `chatcli --tls` against a TLS server with a certificate made at test
//! time: trusted through --ca, refused without it, accepted (loudly) with
//! --insecure.

#[path = "../../chatserver/tests/common/mod.rs"]
mod common;

use std::process::Command;

use common::TestServer;

/// Runs chatcli with `args` and `script` on standard input; returns (exit
/// code, stdout, stderr).
fn chatcli(server: &TestServer, args: &[&str], script: &str) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatcli"));
    cmd.arg(server.addr.to_string()).args(args);
    common::run_with_input(cmd, script)
}

/// A certificate for 127.0.0.1: (cert path, key path).
fn certificate(dir: &std::path::Path) -> (String, String) {
    let (cert, key, _) = common::certificate(dir, "127.0.0.1");
    (cert, key)
}

#[test]
fn a_session_over_tls_with_the_servers_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let server = TestServer::start(&["--tls-cert", &cert, "--tls-key", &key]);
    // bob leaves alice a message through one chatcli...
    let (code, bob, err) = chatcli(
        &server,
        &["--tls", "--ca", &cert],
        "login bob pw-bob\nmessage alice hello\nlogout\n",
    );
    assert_eq!(code, 0, "{bob}\n{err}");
    assert!(bob.contains("welcome, bob"), "{bob}");
    // ...and alice reads it through another.
    let (code, out, err) = chatcli(
        &server,
        &["--tls", "--ca", &cert],
        "login alice pw-alice\nwhoami\nlogout\n",
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("welcome, alice"), "{out}");
    assert!(out.contains("hello"), "the offline message: {out}");
    assert!(out.contains("Logged out."), "{out}");
}

#[test]
fn an_untrusted_certificate_is_refused_and_insecure_says_so_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _) = certificate(other.path());
    let server = TestServer::start(&["--tls-cert", &cert, "--tls-key", &key]);
    let (code, _, err) = chatcli(&server, &["--tls", "--ca", &other_ca], "whoami\n");
    assert_eq!(code, 1);
    assert!(err.contains("TLS handshake failed"), "{err}");
    let (code, out, err) = chatcli(
        &server,
        &["--tls", "--insecure"],
        "login carol pw-carol\nlogout\n",
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("WARNING: --insecure"), "{err}");
    assert!(out.contains("welcome, carol"), "{out}");
}

#[test]
fn a_tls_port_without_tls_gets_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let server = TestServer::start(&["--tls-cert", &cert, "--tls-key", &key]);
    let (code, _, err) = chatcli(&server, &[], "whoami\n");
    assert_ne!(code, 0);
    assert!(err.contains("if it serves TLS, add --tls"), "{err}");
}

/// An idle session over TLS sleeps until the server speaks: its reader
/// waits on the socket, not on a timer.
#[cfg(target_os = "linux")]
#[test]
fn an_idle_tls_session_does_not_wake_up() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let server = TestServer::start(&["--tls-cert", &cert, "--tls-key", &key]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatcli"))
        .arg(server.addr.to_string())
        .args(["--tls", "--ca", &cert])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"login alice pw-alice\n").unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("welcome, alice") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "no welcome");
    }
    // Idle now (stdin open, nothing to read): count the process's wake-ups.
    let switches = || -> u64 {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .filter_map(|task| {
                let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .sum()
    };
    let before = switches();
    std::thread::sleep(Duration::from_secs(3));
    let woke = switches() - before;
    let _ = child.kill();
    let _ = child.wait();
    // It used to wake 50 times a second; at most one a second now.
    assert!(woke <= 3, "{woke} voluntary context switches in 3 s idle");
}
