//! The crate's examples, run: the tokio server serves a session, and the
//! bot, logged in to it, answers a direct message.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatproto::{Client, ClientEvent, Reply};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The example's binary, built by `cargo test` beside this test's (or
/// built now, when only this test was built).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "chatproto", "--example", name])
            .status()
            .unwrap();
        assert!(status.success(), "cannot build example {name}");
    }
    path
}

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the tokio server on a free port; its address.
fn tokio_server() -> (Running, SocketAddr) {
    server_example("tokio_server")
}

/// Starts the server example `name` on a free port; its address.
fn server_example(name: &str) -> (Running, SocketAddr) {
    let mut child = Command::new(example(name))
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    // The rest (its event log) is read and dropped, so it never blocks.
    std::thread::spawn(move || for _ in stdout.lines() {});
    (Running(child), addr)
}

/// A test user: a `Client` over a socket, with a bounded wait for events.
struct User {
    stream: TcpStream,
    client: Client,
}

impl User {
    fn connect(addr: SocketAddr) -> User {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        User {
            stream,
            client: Client::new(),
        }
    }

    fn send(&mut self, line: &str) {
        self.client
            .send(chatproto::Command::parse(line).unwrap())
            .unwrap();
        while let Some(frame) = self.client.poll_transmit() {
            self.stream.write_all(&frame).unwrap();
        }
    }

    /// Events until `wanted` returns something; panics after TIMEOUT.
    fn wait_for<T>(&mut self, mut wanted: impl FnMut(&ClientEvent) -> Option<T>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0; 4096];
        loop {
            while let Some(event) = self.client.poll_event() {
                if let Some(found) = wanted(&event) {
                    return found;
                }
            }
            assert!(Instant::now() < deadline, "no such event in time");
            let n = self.stream.read(&mut buf).unwrap();
            assert!(n > 0, "the server hung up");
            self.client.handle_input(&buf[..n]);
        }
    }
}

#[test]
fn the_tokio_server_serves_a_whole_session() {
    let (_server, addr) = tokio_server();
    let mut alice = User::connect(addr);
    alice.send("login alice wonderland");
    let user = alice.wait_for(|e| match e {
        ClientEvent::Ok { frame, .. } => Some(frame.text.clone()),
        _ => None,
    });
    assert_eq!(user, "welcome, alice");
    // Bob is offline: stored, then handed over at his login.
    alice.send("message bob see you later");
    alice.wait_for(|e| matches!(e, ClientEvent::Ok { .. }).then_some(()));
    let mut bob = User::connect(addr);
    bob.send("login bob builder");
    let text = bob.wait_for(|e| match e {
        ClientEvent::Message(m) => Some((m.text.as_str().to_owned(), m.offline)),
        _ => None,
    });
    assert_eq!(text, ("see you later".to_owned(), true));
    alice.wait_for(|e| match e {
        ClientEvent::Presence(p) if p.user.as_str() == "bob" && p.online => Some(()),
        _ => None,
    });
    bob.send("logout");
    bob.wait_for(|e| matches!(e, ClientEvent::Closed { .. }).then_some(()));
}

#[test]
fn the_bot_answers_direct_messages() {
    let (_server, addr) = tokio_server();
    let _bot = Running(
        Command::new(example("bot"))
            .args([addr.to_string(), "bob".to_owned()])
            .env("CHATBOT_PASSWORD", "builder")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut alice = User::connect(addr);
    alice.send("login alice wonderland");
    alice.wait_for(|e| matches!(e, ClientEvent::Ok { .. }).then_some(()));
    // Once the bot is online, it answers.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        alice.send("whoelse");
        let online = alice.wait_for(|e| match e {
            ClientEvent::Ok { frame, .. } => match &frame.reply {
                Reply::Whoelse { users } => Some(users.iter().any(|u| u.as_str() == "bob")),
                _ => None,
            },
            _ => None,
        });
        if online {
            break;
        }
        assert!(Instant::now() < deadline, "the bot never logged in");
        std::thread::sleep(Duration::from_millis(20));
    }
    alice.send("message bob hello there");
    let reply = alice.wait_for(|e| match e {
        ClientEvent::Message(m) if m.from.as_str() == "bob" => Some(m.text.as_str().to_owned()),
        _ => None,
    });
    assert_eq!(reply, "you said: hello there");
}

#[test]
fn the_custom_rule_refuses_banned_words_and_answers_stay_in_order() {
    let (_server, addr) = server_example("custom_rule");
    let mut alice = User::connect(addr);
    // All at once: the rule's answer must not overtake the login's.
    for line in [
        "login alice wonderland",
        "broadcast buy SPAM now",
        "broadcast hello",
        "whoami",
    ] {
        alice.send(line);
    }
    let mut answers = Vec::new();
    while answers.len() < 4 {
        let answer = alice.wait_for(|e| match e {
            ClientEvent::Ok { frame, .. } => Some(format!("ok {}", frame.text)),
            ClientEvent::Error { frame, .. } => Some(format!("{:?}", frame.code)),
            _ => None,
        });
        answers.push(answer);
    }
    assert_eq!(answers[0], "ok welcome, alice");
    assert_eq!(answers[1], "Forbidden");
    assert!(answers[2].starts_with("ok broadcast"), "{answers:?}");
    assert!(answers[3].starts_with("ok you are alice"), "{answers:?}");
}
