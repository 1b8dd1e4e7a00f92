//! `--config FILE` and `--print-config`, through the binary: the file's
//! keys are flags, the command line wins, mistakes are named with their
//! line, and the printed configuration leaves passwords out and reads back.

mod common;

use std::process::Command;

use common::{TestServer, CREDENTIALS};

/// Runs the binary with `args`; (status, stdout, stderr).
fn chatserver(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatserver"));
    cmd.args(args);
    common::run_with_input(cmd, "")
}

#[test]
fn the_file_sets_flags_the_command_line_wins_and_the_result_prints() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chat.toml");
    std::fs::write(
        &config,
        "# chatserver\nlockout-attempts = 5\nadmin = [\"alice\", \"bob\"]\nno-rate-limit = true\n\
         idle-timeout-secs = 300\ndb = \"postgres://chat:s3cret@db.example/chat\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (code, out, err) = chatserver(&[
        "--config",
        config,
        "--idle-timeout-secs",
        "60",
        "--print-config",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("lockout-attempts = \"5\"\n"), "{out}");
    assert!(out.contains("admin = [\"alice\", \"bob\"]\n"), "{out}");
    assert!(out.contains("no-rate-limit = true\n"), "{out}");
    assert!(
        out.contains("idle-timeout-secs = \"60\"\n"),
        "the command line wins: {out}"
    );
    // Defaults are shown too; the password never is.
    assert!(
        out.contains("# max-frame-bytes = \"16384\"  (default)\n"),
        "{out}"
    );
    assert!(!out.contains("s3cret"), "{out}");
    assert!(out.contains("db = "), "{out}");

    // What it prints is a configuration file that reads back the same
    // (the connection string aside: its password is not there to read).
    let without_db: String = out
        .lines()
        .filter(|line| !line.starts_with("db = "))
        .map(|line| format!("{line}\n"))
        .collect();
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &without_db).unwrap();
    let (code, again, err) = chatserver(&["--config", printed.to_str().unwrap(), "--print-config"]);
    assert_eq!(code, 0, "{err}");
    let again: String = again
        .lines()
        .filter(|line| !line.starts_with("# db = "))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(again, without_db);
}

#[test]
fn a_server_started_from_a_file_serves_with_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chat.toml");
    std::fs::write(&config, "no-db = true\nlockout-attempts = 1\n").unwrap();
    let server = TestServer::start_with(
        CREDENTIALS,
        &["--listen", "127.0.0.1:0"],
        &["--config", config.to_str().unwrap()],
    );
    let mut c = server.connect();
    // One failure locks, as the file says (the default is three).
    c.send("login alice wrong");
    assert_eq!(c.recv()["code"], "account_locked");
}

#[test]
fn mistakes_in_the_file_are_named_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "listen = \"127.0.0.1:0\"\nlissen = \"x\"\n",
            ":2: unknown key 'lissen'",
        ),
        ("\n\nno-db = \"yes\"\n", ":3: 'no-db' takes true or false"),
        (
            "lockout-attempts = 0\n",
            ":1: invalid value '0' for '--lockout-attempts <N>'",
        ),
        ("listen = \n", "TOML parse error"),
    ];
    for (i, (text, said)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = chatserver(&["--config", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{text:?}: {err}");
        assert!(err.contains(said), "{text:?}: {err}");
        assert!(err.contains(&format!("bad{i}.toml")), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = chatserver(&["--config", "/nonexistent/chat.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read the configuration file /nonexistent/chat.toml"),
        "{err}"
    );
}
