//! SIGHUP reloads the credentials file of a running server, and the
//! `user` commands send it (`--pid-file`): new accounts log in at once,
//! new passwords apply from the next login, a removed account is logged
//! out and forgotten, and a file with a mistake changes nothing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{binary, run_with_input, Client, TestServer, CREDENTIALS, TIMEOUT};

/// `chatserver user ARGS`, with `input` on stdin: (status, stderr).
fn user(args: &[&str], input: &str) -> (i32, String) {
    let mut command: Command = binary();
    command.arg("user").args(args);
    let (status, _, stderr) = run_with_input(command, input);
    (status, stderr)
}

/// Waits until `count` log lines hold `needle`.
fn wait_for_lines(server: &TestServer, needle: &str, count: usize) {
    let start = Instant::now();
    while start.elapsed() < TIMEOUT {
        if server.log().iter().filter(|l| l.contains(needle)).count() >= count {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "fewer than {count} log lines with {needle:?}: {:#?}",
        server.log()
    );
}

fn wait_for_file(path: &Path) -> String {
    let start = Instant::now();
    while start.elapsed() < TIMEOUT {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} was not written", path.display());
}

fn login_answer(server: &TestServer, user: &str, password: &str) -> serde_json::Value {
    let mut c = server.connect();
    c.ask(&format!("login {user} {password}"))
}

#[test]
fn user_commands_reload_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.txt");
    let pid_file = dir.path().join("chatserver.pid");
    let pid_arg = pid_file.to_str().unwrap();
    let mut server = TestServer::start_in(
        dir.path(),
        CREDENTIALS,
        &["--listen", "127.0.0.1:0"],
        &["--pid-file", pid_arg],
    );
    assert_eq!(wait_for_file(&pid_file).trim(), server.pid().to_string());
    let files = [
        "--credentials",
        credentials.to_str().unwrap(),
        "--pid-file",
        pid_arg,
    ];

    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    alice.recv_type("presence");
    assert_eq!(alice.ask("message dave queued-for-dave")["type"], "ok");
    assert_eq!(alice.ask("block bob")["type"], "ok");

    // Removed: bob's session ends, and alice hears he left.
    let (status, stderr) = user(&[&["remove", "bob"][..], &files].concat(), "");
    assert_eq!(status, 0, "{stderr}");
    assert!(stderr.contains("reloads its credentials now"), "{stderr}");
    let bye = bob.recv_type("bye");
    assert_eq!(bye["reason"], "account_removed", "{bye}");
    let presence = alice.recv_type("presence");
    assert_eq!(presence["user"], "bob");
    wait_for_lines(&server, "credentials reloaded", 1);
    assert_eq!(
        login_answer(&server, "bob", "pw-bob")["code"],
        "invalid_credentials"
    );
    // alice's block of him went with him.
    assert_eq!(alice.ask("unblock bob")["code"], "unknown_user");

    // dave's queue goes with his account: back under the same name, he
    // has nothing waiting.
    let (status, stderr) = user(&[&["remove", "dave"][..], &files].concat(), "");
    assert_eq!(status, 0, "{stderr}");
    wait_for_lines(&server, "credentials reloaded", 2);
    let (status, stderr) = user(&[&["add", "dave"][..], &files].concat(), "pw-dave\n");
    assert_eq!(status, 0, "{stderr}");
    wait_for_lines(&server, "credentials reloaded", 3);
    let mut dave = server.login("dave");
    assert_eq!(
        dave.ask("whoami")["type"],
        "ok",
        "an old message came first"
    );

    // A new password applies from the next login; a new account at once.
    let (status, stderr) = user(&[&["passwd", "carol"][..], &files].concat(), "new-pw\n");
    assert_eq!(status, 0, "{stderr}");
    let (status, stderr) = user(&[&["add", "erin"][..], &files].concat(), "pw-erin\n");
    assert_eq!(status, 0, "{stderr}");
    wait_for_lines(&server, "credentials reloaded", 5);
    assert_eq!(
        login_answer(&server, "carol", "pw-carol")["code"],
        "invalid_credentials"
    );
    assert_eq!(login_answer(&server, "carol", "new-pw")["type"], "ok");
    let _erin = server.login("erin");
    // Sessions open all along are untouched.
    assert_eq!(alice.ask("whoami")["type"], "ok");

    // A file with a mistake changes nothing, and the log names its line.
    let mut text = std::fs::read_to_string(&credentials).unwrap();
    text.push_str("frank\n");
    std::fs::write(&credentials, &text).unwrap();
    let lines = text.lines().count();
    server.signal("HUP");
    wait_for_lines(&server, "the accounts in use are unchanged", 1);
    let log = server.log();
    let error = log
        .iter()
        .find(|l| l.contains("the accounts in use are unchanged"))
        .unwrap();
    assert!(
        error.contains(&format!("credentials.txt:{lines}:")),
        "{error}"
    );
    assert_eq!(login_answer(&server, "carol", "new-pw")["type"], "ok");

    // A file cut short by mistake (one account left of six) is refused:
    // it would delete most users' stored state at once.
    std::fs::write(&credentials, "alice pw-alice\n").unwrap();
    server.signal("HUP");
    wait_for_lines(&server, "credentials reload refused", 1);
    assert_eq!(login_answer(&server, "carol", "new-pw")["type"], "ok");

    // A clean stop removes the pid file.
    server.signal("TERM");
    assert!(server.wait_exit().success());
    assert!(!pid_file.exists());
}

/// A pid file is written through a fresh temporary file, never through a
/// link planted at a guessable name, and a stopping server leaves a
/// successor's pid file alone.
#[test]
fn the_pid_file_is_written_safely_and_removed_only_if_ours() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("run.pid");
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&victim, dir.path().join("run.pid.tmp")).unwrap();
    let mut server = TestServer::start_in(
        dir.path(),
        CREDENTIALS,
        &["--listen", "127.0.0.1:0"],
        &["--pid-file", pid_file.to_str().unwrap()],
    );
    assert_eq!(wait_for_file(&pid_file).trim(), server.pid().to_string());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(!std::fs::symlink_metadata(&pid_file)
        .unwrap()
        .file_type()
        .is_symlink());
    // Another server took the file over meanwhile: it stays.
    std::fs::write(&pid_file, "4242\n").unwrap();
    server.signal("TERM");
    assert!(server.wait_exit().success());
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), "4242\n");
}

#[test]
fn a_reload_says_when_the_config_file_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chatserver.toml");
    std::fs::write(&config, "shutdown-grace-ms = 2000\n").unwrap();
    let server = TestServer::start_in(
        dir.path(),
        CREDENTIALS,
        &["--listen", "127.0.0.1:0"],
        &["--config", config.to_str().unwrap()],
    );
    server.signal("HUP");
    wait_for_lines(&server, "credentials reloaded", 1);
    assert!(!server
        .log()
        .iter()
        .any(|l| l.contains("restart the server")));
    std::fs::write(&config, "shutdown-grace-ms = 1000\n").unwrap();
    server.signal("HUP");
    wait_for_lines(&server, "credentials reloaded", 2);
    wait_for_lines(&server, "changed since start-up: restart the server", 1);
    // Still serving.
    let mut c: Client = server.login("alice");
    assert_eq!(c.ask("whoami")["type"], "ok");
}

#[test]
fn user_commands_refuse_to_signal_what_is_not_a_chatserver() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.txt");
    std::fs::write(&credentials, CREDENTIALS).unwrap();
    // A stale pid file naming this test process.
    let pid_file = dir.path().join("stale.pid");
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
    let remove = |name: &str| {
        user(
            &[
                "remove",
                name,
                "--credentials",
                credentials.to_str().unwrap(),
                "--pid-file",
                pid_file.to_str().unwrap(),
            ],
            "",
        )
    };
    let (status, stderr) = remove("bob");
    assert_eq!(status, 3, "{stderr}");
    assert!(
        stderr.contains("not chatserver (a stale pid file?)"),
        "{stderr}"
    );
    assert!(stderr.contains("the file is changed"), "{stderr}");
    // No process at all.
    std::fs::write(&pid_file, "999999999\n").unwrap();
    let (status, stderr) = remove("carol");
    assert_eq!(status, 3, "{stderr}");
    assert!(stderr.contains("no process 999999999"), "{stderr}");
}

#[test]
fn user_commands_read_the_server_config_and_remind_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("accounts.txt");
    std::fs::write(&credentials, CREDENTIALS).unwrap();
    let config = dir.path().join("chatserver.toml");
    std::fs::write(
        &config,
        format!(
            "credentials = {:?}\ndb = \"host=127.0.0.1 user=postgres\"\nnats = \"nats://127.0.0.1:4222\"\n",
            credentials.to_str().unwrap()
        ),
    )
    .unwrap();
    let (status, stderr) = user(&["remove", "bob", "--config", config.to_str().unwrap()], "");
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stderr.contains("cluster mode: make the same change to every node"),
        "{stderr}"
    );
    assert!(!std::fs::read_to_string(&credentials)
        .unwrap()
        .contains("bob"));
    // A mistake in the config file is the server's own error.
    std::fs::write(&config, "lissen = 1\n").unwrap();
    let (status, stderr) = user(&["list", "--config", config.to_str().unwrap()], "");
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("chatserver.toml:1"), "{stderr}");
    std::fs::write(&config, "idle-timeout-secs = \"soon\"\n").unwrap();
    let (status, stderr) = user(&["list", "--config", config.to_str().unwrap()], "");
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("chatserver.toml:1:"), "{stderr}");
    // A relative path there is the server's working directory's, which
    // the command cannot know: refused, rather than editing another file.
    std::fs::write(&config, "credentials = \"credentials.txt\"\n").unwrap();
    let (status, stderr) = user(&["list", "--config", config.to_str().unwrap()], "");
    assert_eq!(status, 2, "{stderr}");
    assert!(
        stderr.contains("is relative to the server's working directory"),
        "{stderr}"
    );
}
