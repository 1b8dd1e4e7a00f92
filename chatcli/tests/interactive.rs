#![cfg(unix)]
//! The interactive client in a pseudo-terminal, against a real server.

#[path = "../../chatserver/tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

use common::TestServer;
use expectrl::process::unix::WaitStatus;
use expectrl::{Expect, Session};

type Pty = Session<expectrl::process::unix::UnixProcess, expectrl::process::unix::PtyStream>;

fn chatcli(server: &TestServer) -> Pty {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatcli"));
    cmd.arg(server.addr.to_string())
        .env("NO_COLOR", "1")
        .env("TERM", "xterm");
    let mut pty = Session::spawn(cmd).unwrap();
    pty.get_process_mut().set_window_size(120, 40).unwrap();
    pty.set_expect_timeout(Some(Duration::from_secs(10)));
    pty
}

fn log_in(pty: &mut Pty, user: &str) {
    pty.expect("Username:").unwrap();
    pty.send(format!("{user}\r")).unwrap();
    pty.expect("Password:").unwrap();
    pty.send(format!("pw-{user}\r")).unwrap();
    pty.expect(format!("Logged in as {user}")).unwrap();
}

fn exit_code(pty: &Pty) -> i32 {
    match pty.get_process().wait().unwrap() {
        WaitStatus::Exited(_, code) => code,
        other => panic!("chatcli did not exit normally: {other:?}"),
    }
}

#[test]
fn a_wrong_password_is_explained_and_asked_again_and_the_password_is_not_echoed() {
    let server = TestServer::start(&[]);
    let mut pty = chatcli(&server);
    pty.expect("Username:").unwrap();
    pty.send("alice\r").unwrap();
    pty.expect("Password:").unwrap();
    pty.send("wrong-secret\r").unwrap();
    let shown = pty
        .expect("Login failed: invalid user name or password.")
        .unwrap();
    assert!(
        !String::from_utf8_lossy(shown.before()).contains("wrong-secret"),
        "the password was echoed"
    );
    log_in(&mut pty, "alice");
    pty.expect("> ").unwrap();
    pty.send("logout\r").unwrap();
    pty.expect("Logged out.").unwrap();
    assert_eq!(exit_code(&pty), 0);
}

#[test]
fn a_locked_account_says_how_long_to_wait() {
    let server = TestServer::start(&["--lockout-attempts", "1"]);
    let mut pty = chatcli(&server);
    pty.expect("Username:").unwrap();
    pty.send("bob\r").unwrap();
    pty.expect("Password:").unwrap();
    pty.send("nope\r").unwrap();
    pty.expect("try again in 60 s").unwrap();
    pty.expect("Username:").unwrap();
}

#[test]
fn a_message_arriving_mid_line_leaves_the_line_intact() {
    let server = TestServer::start(&[]);
    let mut bob = server.login("bob");
    let mut pty = chatcli(&server);
    log_in(&mut pty, "alice");
    pty.expect("> ").unwrap();
    pty.send("message bob hel").unwrap();
    // Wait until the half line is on screen, then bob writes.
    pty.expect("message bob hel").unwrap();
    assert_eq!(bob.ask("message alice ping from bob")["stored"], false);
    pty.expect("bob: ping from bob").unwrap();
    // The half-typed line is redrawn below the message...
    pty.expect("> message bob hel").unwrap();
    // ...and finishing it sends exactly what was typed.
    pty.send("lo\r").unwrap();
    let m = bob.recv_type("message");
    assert_eq!(
        (m["from"].as_str(), m["text"].as_str()),
        (Some("alice"), Some("hello"))
    );
    pty.expect("message delivered to bob").unwrap();
}

#[test]
fn debug_client_shows_the_session_and_logout_exits_zero() {
    let server = TestServer::start(&[]);
    let mut pty = chatcli(&server);
    log_in(&mut pty, "carol");
    pty.expect("> ").unwrap();
    pty.send("whoami\r").unwrap();
    pty.expect("you are carol").unwrap();
    pty.send("debug client\r").unwrap();
    pty.expect("user carol").unwrap();
    pty.expect("frames sent").unwrap();
    pty.send("logout\r").unwrap();
    pty.expect("Logged out.").unwrap();
    assert_eq!(exit_code(&pty), 0);
}

#[test]
fn typing_during_a_burst_of_incoming_messages_does_not_hang() {
    let server = TestServer::start(&["--no-rate-limit"]);
    let mut bob = server.login("bob");
    let mut pty = chatcli(&server);
    log_in(&mut pty, "alice");
    pty.expect("> ").unwrap();
    let flood = std::thread::spawn(move || {
        for i in 0..300 {
            bob.send(&format!("message alice burst {i}"));
        }
        bob
    });
    for _ in 0..20 {
        pty.send("message b\t").unwrap();
        pty.send("\x15whoami\r").unwrap();
    }
    let _bob = flood.join().unwrap();
    pty.expect("burst 299").unwrap();
    pty.send("debug client\r").unwrap();
    pty.expect("0 awaiting answers").unwrap();
}

#[test]
fn a_user_online_elsewhere_is_told_so() {
    let server = TestServer::start(&[]);
    let _first = server.login("carol");
    let mut pty = chatcli(&server);
    pty.expect("Username:").unwrap();
    pty.send("carol\r").unwrap();
    pty.expect("Password:").unwrap();
    pty.send("pw-carol\r").unwrap();
    pty.expect("carol is already logged in elsewhere").unwrap();
    pty.expect("Username:").unwrap();
}

#[test]
fn tab_completes_commands_and_names_seen() {
    let server = TestServer::start(&[]);
    let _bob = server.login("bob");
    let mut pty = chatcli(&server);
    log_in(&mut pty, "alice");
    pty.expect("> ").unwrap();
    // A command name...
    pty.send("whoel\t").unwrap();
    pty.expect("whoelse").unwrap();
    pty.send("\r").unwrap();
    pty.expect("online now: bob").unwrap();
    // ...and a user name learnt from that listing.
    pty.send("message b\t").unwrap();
    pty.expect("message bob").unwrap();
    pty.send("hi\r").unwrap();
    pty.expect("message delivered to bob").unwrap();
}

#[test]
fn a_server_shutdown_is_reported_with_its_own_exit_status() {
    let server = TestServer::start(&[]);
    let mut pty = chatcli(&server);
    log_in(&mut pty, "dave");
    pty.expect("> ").unwrap();
    pty.send("half a li").unwrap();
    server.signal("TERM");
    pty.expect("the server is shutting down").unwrap();
    assert_eq!(exit_code(&pty), 4);
}

#[test]
fn ctrl_d_at_the_login_prompt_quits_cleanly() {
    let server = TestServer::start(&[]);
    let mut pty = chatcli(&server);
    pty.expect("Username:").unwrap();
    pty.send(expectrl::ControlCode::EndOfTransmission).unwrap();
    assert_eq!(exit_code(&pty), 0);
}
