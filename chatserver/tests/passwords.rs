//! Hashed passwords end to end: `chatserver hash-password`, and logins
//! against Argon2id hashes checked on the worker pool.

mod common;

use common::{binary, TestServer};

/// `chatserver hash-password` with `input` on standard input.
fn hash_password(input: &str) -> (i32, String, String) {
    let mut cmd = binary();
    cmd.arg("hash-password");
    common::run_with_input(cmd, input)
}

#[test]
fn hash_password_prints_a_fresh_argon2id_hash() {
    let (code, first, _) = hash_password("s3cret\n");
    assert_eq!(code, 0);
    let first = first.trim();
    assert!(
        first.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{first}"
    );
    let (_, second, _) = hash_password("s3cret\n");
    assert_ne!(first, second.trim(), "the salt must be fresh");
    let (code, _, err) = hash_password("");
    assert_eq!(code, 1);
    assert!(err.contains("no password"), "{err}");
    let (code, _, err) = hash_password("two words\n");
    assert_eq!(code, 1);
    assert!(err.contains("white space"), "{err}");
}

#[test]
fn hashed_accounts_log_in_and_wrong_passwords_still_lock() {
    let (_, hash, _) = hash_password("pw-alice\n");
    let credentials = format!("alice {}\nbob pw-bob\n", hash.trim());
    let server = TestServer::start_with(
        &credentials,
        &["--listen", "127.0.0.1:0"],
        &["--lockout-attempts", "2"],
    );
    server.wait_for_log("1 of 2 accounts");
    let mut c = server.connect();
    // Requests sent behind the login wait for it and come back in order.
    c.send("login alice pw-alice");
    c.send("whoami");
    let ok = c.recv_answer();
    assert_eq!(
        (ok["cmd"].as_str(), ok["user"].as_str()),
        (Some("login"), Some("alice"))
    );
    assert_eq!(c.recv_answer()["user"], "alice");

    let mut d = server.connect();
    assert_eq!(d.ask("login alice wrong")["code"], "invalid_credentials");
    assert_eq!(d.ask("login nobody wrong")["code"], "invalid_credentials");
    assert_eq!(d.ask("login alice wrong")["code"], "account_locked");
}
