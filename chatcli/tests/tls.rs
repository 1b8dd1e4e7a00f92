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
