//! Scripted use: commands on standard input, one line per answer or event.

#[path = "../../chatserver/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use common::TestServer;

fn chatcli(server: &TestServer, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatcli"));
    cmd.arg(server.addr.to_string()).args(args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs a whole script; returns (exit code, stdout lines, stderr).
fn run_script(server: &TestServer, args: &[&str], script: &str) -> (i32, Vec<String>, String) {
    let mut child = chatcli(server, args).spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (
        out.status.code().unwrap(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A client kept running, fed line by line.
struct Live {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Live {
    fn start(server: &TestServer, args: &[&str]) -> Live {
        let mut child = chatcli(server, args).spawn().unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Live {
            child,
            stdin,
            lines,
        }
    }

    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a line from chatcli")
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    /// Closes standard input and waits; returns (exit code, remaining lines).
    fn finish(mut self) -> (i32, Vec<String>) {
        drop(self.stdin.take());
        let code = self.child.wait().unwrap().code().unwrap();
        (code, self.lines.try_iter().collect())
    }
}

fn password_file(dir: &tempfile::TempDir, user: &str) -> String {
    let path = dir.path().join(format!("{user}.pw"));
    std::fs::write(&path, format!("pw-{user}\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn two_users_talk_through_scripts() {
    let server = TestServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut bob = Live::start(
        &server,
        &[
            "--user",
            "bob",
            "--password-file",
            &password_file(&dir, "bob"),
        ],
    );
    assert_eq!(bob.next_line(), "welcome, bob");

    let (code, alice, _) = run_script(
        &server,
        &[],
        "login alice pw-alice\nmessage bob hi bob, how are you?\nwhoelse\nwhoelsesince 60\nblok bob\nlogout\n",
    );
    assert_eq!(code, 0);
    assert_eq!(
        alice,
        [
            "welcome, alice",
            "message delivered to bob",
            "online now: bob",
            "online in the last 60 s: bob",
            "error: unknown command \"blok\": type 'help' for the list",
            "goodbye",
            "Logged out.",
        ]
    );

    assert!(bob.next_line().ends_with("* alice is online"));
    assert!(bob.next_line().ends_with(" alice: hi bob, how are you?"));
    assert!(bob.next_line().ends_with("* alice went offline"));
    bob.send("message alice fine, thanks");
    assert_eq!(
        bob.next_line(),
        "alice is offline: the message will be delivered when they log in"
    );
    let (code, rest) = bob.finish();
    assert_eq!((code, rest), (0, vec![]));

    // Alice gets it at her next login, marked as sent while she was away.
    let (code, alice, _) = run_script(&server, &[], "login alice pw-alice\n");
    assert_eq!(code, 0);
    assert_eq!(alice[0], "welcome, alice");
    assert!(
        alice[1].ends_with(" bob (sent while you were offline): fine, thanks"),
        "{}",
        alice[1]
    );
}

#[test]
fn json_mode_prints_the_raw_frames() {
    let server = TestServer::start(&[]);
    let (code, lines, _) = run_script(
        &server,
        &["--json"],
        "login carol pw-carol\nwhoami\nnonsense\n",
    );
    assert_eq!(code, 0);
    let frames: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(frames[0]["type"], "hello");
    assert_eq!(
        (frames[1]["type"].as_str(), frames[1]["cmd"].as_str()),
        (Some("ok"), Some("login"))
    );
    assert_eq!(frames[2]["user"], "carol");
    assert_eq!(
        (frames[3]["code"].as_str(), frames[3]["local"].as_bool()),
        (Some("unknown_command"), Some(true))
    );
}

#[test]
fn debug_client_in_a_script_reflects_the_lines_before_it() {
    let server = TestServer::start(&[]);
    let (code, lines, _) = run_script(&server, &[], "login dave pw-dave\nwhoami\ndebug client\n");
    assert_eq!(code, 0);
    let debug = &lines[2];
    assert!(
        debug.contains("user dave")
            && debug.contains("2 frames sent, 3 received")
            && debug.contains("0 awaiting"),
        "{debug}"
    );
}

#[test]
fn an_idle_timeout_ends_the_client_with_status_3() {
    let server = TestServer::start(&["--idle-timeout-secs", "1"]);
    let live = Live::start(&server, &[]);
    assert_eq!(live.next_line(), "Disconnected: idle for too long.");
    let mut live = live;
    assert_eq!(live.child.wait().unwrap().code(), Some(3));
}

#[test]
fn a_lost_connection_ends_the_client_with_status_5() {
    let server = TestServer::start(&[]);
    let live = Live::start(&server, &[]);
    std::thread::sleep(Duration::from_millis(200));
    server.signal("KILL");
    assert_eq!(live.next_line(), "Connection to the server lost.");
    let mut live = live;
    assert_eq!(live.child.wait().unwrap().code(), Some(5));
}

#[test]
fn a_failed_scripted_login_exits_non_zero() {
    let server = TestServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrong.pw");
    std::fs::write(&path, "nope\n").unwrap();
    let (code, lines, _) = run_script(
        &server,
        &["--user", "bob", "--password-file", path.to_str().unwrap()],
        "whoami\n",
    );
    assert_eq!(code, 1);
    assert_eq!(lines, ["error: invalid user name or password"]);
}

#[test]
fn an_unreachable_server_is_one_line_and_status_1() {
    let port = common::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_chatcli"))
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot connect to 127.0.0.1:"), "{stderr}");
}

#[test]
fn a_bad_command_line_is_status_2_and_names_what_is_missing() {
    let out = Command::new(env!("CARGO_BIN_EXE_chatcli"))
        .args(["--user", "bob"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the following required arguments were not provided"),
        "{stderr}"
    );
    assert!(stderr.contains("--password-file <FILE>"), "{stderr}");
    assert!(stderr.contains("Usage: chatcli"), "{stderr}");
}
