//! Starting and stopping: the command line, bad configuration, signals.

mod common;

use std::time::Duration;

use common::{binary, free_port, run, temp_file, Client, TestServer, CREDENTIALS};
use serde_json::json;

fn assert_one_clear_line(stderr: &str) {
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn sigterm_says_bye_to_everyone_and_exits_zero() {
    let mut server = TestServer::start(&[]);
    let mut a = server.login("alice");
    let mut anon = server.connect();
    server.signal("TERM");
    assert_eq!(
        a.recv_to_end(),
        [json!({"type":"bye","reason":"server_shutdown"})]
    );
    assert_eq!(
        anon.recv_to_end(),
        [json!({"type":"bye","reason":"server_shutdown"})]
    );
    assert!(server.wait_exit().success());
    assert!(
        std::net::TcpStream::connect(server.addr).is_err(),
        "no longer accepting"
    );
}

#[test]
fn sigint_stops_an_idle_server_too() {
    let mut server = TestServer::start(&[]);
    server.signal("INT");
    assert!(server.wait_exit().success());
}

#[test]
fn the_positional_form_sets_port_lockout_and_idle_timeout() {
    let port = free_port();
    let server = TestServer::start_with(CREDENTIALS, &[&port.to_string(), "1", "1"], &[]);
    assert_eq!(server.addr.port(), port);
    let mut c = Client::connect(server.addr);
    for _ in 0..2 {
        assert_eq!(c.ask("login bob nope")["code"], "invalid_credentials");
    }
    let locked = c.ask("login bob nope");
    assert_eq!(
        (locked["code"].as_str(), locked["retry_after"].as_u64()),
        (Some("account_locked"), Some(1))
    );
    // The one-second idle timeout.
    assert_eq!(
        c.recv_to_end(),
        [json!({"type":"bye","reason":"idle_timeout"})]
    );
}

#[test]
fn a_malformed_credentials_file_is_one_line_naming_file_and_line() {
    let (_dir, path) = temp_file("alice pw\n\nbob\n");
    let (code, stderr) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--credentials",
        path.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert_one_clear_line(&stderr);
    assert!(
        stderr.contains(&format!("{}:3:", path.display())),
        "{stderr}"
    );
}

#[test]
fn a_missing_credentials_file_is_a_clear_error() {
    let (code, stderr) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--credentials",
        "/nonexistent/creds.txt",
    ]);
    assert_ne!(code, 0);
    assert_one_clear_line(&stderr);
    assert!(stderr.contains("/nonexistent/creds.txt"), "{stderr}");
}

#[test]
fn bad_flags_exit_2_and_say_what_is_wrong() {
    // The program's own checks: one line.
    for args in [
        &["--max-frame-bytes", "5"][..],
        &["4000", "10"],
        &["port", "10", "20"],
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_one_clear_line(&stderr);
    }
    // clap's: its whole message, naming every argument at fault, and where
    // help is.
    for (args, named) in [
        (&["--bogus"][..], "'--bogus'"),
        (&["--listen", "nowhere"], "'nowhere' for '--listen <ADDR>'"),
        (
            &["--lockout-attempts", "0"],
            "'0' for '--lockout-attempts <N>'",
        ),
        (
            &["--admin", "not valid"],
            "'not valid' for '--admin <USER>'",
        ),
        (&["--tls-cert", "x"], "--tls-key <FILE>"),
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(stderr.contains("try '--help'"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn an_address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (_dir, path) = temp_file(CREDENTIALS);
    let (code, stderr) = run(&["--listen", &addr, "--credentials", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[cfg(target_os = "linux")]
#[test]
fn a_reactor_cpu_the_process_cannot_use_is_a_clear_error() {
    let (_dir, path) = temp_file(CREDENTIALS);
    let (code, stderr) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--no-db",
        "--credentials",
        path.to_str().unwrap(),
        "--reactor-cpu",
        "100000",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--reactor-cpu 100000: not a CPU this process may run on"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn help_and_version_print_and_succeed() {
    let out = binary().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--idle-timeout-secs") && help.contains("PORT BLOCK_DURATION TIMEOUT"),
        "{help}"
    );
    let out = binary().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("chatserver "));
}

#[test]
fn demo_accounts_are_warned_about() {
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../credentials.txt"))
        .unwrap();
    let server = TestServer::start_with(&demo, &["--listen", "127.0.0.1:0"], &[]);
    server.wait_for_log("demo accounts");
    let quiet = TestServer::start(&[]);
    std::thread::sleep(Duration::from_millis(50));
    assert!(!quiet.log().iter().any(|l| l.contains("demo accounts")));
}

#[test]
fn ipv6_loopback_works() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    }
    let server = TestServer::start_with(CREDENTIALS, &["--listen", "[::1]:0"], &[]);
    assert!(server.addr.is_ipv6());
    let mut c = server.login("alice");
    assert_eq!(c.ask("whoami")["user"], "alice");
}
