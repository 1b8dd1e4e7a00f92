//! The reactor in process: a server built from the library on loopback
//! sockets, no binary spawned. Clients are blocking sockets with short
//! timeouts; every loop is bounded.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use chatproto::{Accounts, Server, ServerConfig};
use chatserver::clock::Clock;
use chatserver::{Limits, Listener, Reactor, ReactorConfig, StopHandle, Turn};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(5);

/// A reactor serving lines on a loopback port, with alice and bob.
fn reactor(max_connections: usize) -> (Reactor, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let clock = Clock::start();
    let mut accounts = Accounts::new();
    for (user, password) in [("alice", "pw-alice"), ("bob", "pw-bob")] {
        accounts
            .insert(user.parse().unwrap(), password.parse().unwrap())
            .unwrap();
    }
    // Every client comes from 127.0.0.1: no per-address limits.
    let mut core_config = ServerConfig::default();
    core_config.login_rate_per_peer = None;
    core_config.login_rate_per_name = None;
    core_config.max_pending_checks_per_peer = None;
    let core = Server::new(core_config, accounts, clock.now()).unwrap();
    let config = ReactorConfig {
        max_connections,
        max_output_bytes: 1 << 20,
        limits: Limits {
            max_connections_per_ip: None,
            max_unauthenticated_percent: None,
            tls_handshakes_per_ip: None,
            tls_handshakes: None,
            ..Limits::default()
        },
        shutdown_grace: Duration::from_secs(2),
        verify_threads: 1,
        verify_cpu_percent: 100,
        reactor_cpu: None,
        health: chatserver::health::Health::default(),
        metrics: None,
        bus: None,
    };
    let listener = Listener {
        socket: listener,
        tls: None,
        http: None,
    };
    (
        Reactor::new(vec![listener], core, clock, config).unwrap(),
        addr,
    )
}

/// A reactor running on its own thread until stopped.
struct Running {
    addr: SocketAddr,
    stop: StopHandle,
    thread: JoinHandle<io::Result<()>>,
}

fn run(max_connections: usize) -> Running {
    let (mut reactor, addr) = reactor(max_connections);
    let stop = reactor.stop_handle();
    let thread = std::thread::spawn(move || reactor.run());
    Running { addr, stop, thread }
}

impl Running {
    /// Stops the reactor and waits for it to return.
    fn stop(self) {
        self.stop.stop();
        self.thread.join().unwrap().unwrap();
    }
}

struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Client {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    /// The next line, as sent.
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    fn frame(&mut self) -> Value {
        let line = self.line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Reads until the server hangs up; what came meanwhile.
    fn rest(&mut self) -> String {
        let mut rest = String::new();
        self.reader.read_to_string(&mut rest).unwrap();
        rest
    }

    fn login(addr: SocketAddr, user: &str) -> Client {
        let mut client = Client::connect(addr);
        assert_eq!(client.frame()["type"], "hello");
        client.send(&format!("login {user} pw-{user}"));
        let ok = client.frame();
        assert_eq!(
            (&ok["type"], &ok["cmd"]),
            (&"ok".into(), &"login".into()),
            "{ok}"
        );
        client
    }
}

#[test]
fn two_clients_log_in_and_message_each_other() {
    let server = run(16);
    let mut alice = Client::login(server.addr, "alice");
    let mut bob = Client::login(server.addr, "bob");
    let presence = alice.frame();
    assert_eq!(
        (&presence["type"], &presence["user"]),
        (&"presence".into(), &"bob".into())
    );
    alice.send("message bob hello from the same process");
    let message = bob.frame();
    assert_eq!(message["type"], "message");
    assert_eq!(message["from"], "alice");
    assert_eq!(message["text"], "hello from the same process");
    let ok = alice.frame();
    assert_eq!(
        (&ok["cmd"], &ok["stored"]),
        (&"message".into(), &false.into())
    );
    // Over WebSocket or lines, a frame is one line on a line transport.
    bob.send(r#"{"cmd":"whoami","id":7}"#);
    let line = bob.line();
    assert!(
        line.ends_with("}\n") && line.matches('\n').count() == 1,
        "{line:?}"
    );
    server.stop();
    for mut client in [alice, bob] {
        let rest = client.rest();
        assert!(
            rest.ends_with("{\"type\":\"bye\",\"reason\":\"server_shutdown\"}\n"),
            "{rest:?}"
        );
    }
}

#[test]
fn a_connection_over_the_limit_gets_the_cores_bye_and_nothing_else() {
    let server = run(1);
    let mut first = Client::connect(server.addr);
    assert_eq!(first.frame()["type"], "hello");
    let mut second = Client::connect(server.addr);
    assert_eq!(
        second.rest(),
        "{\"type\":\"bye\",\"reason\":\"server_full\"}\n",
        "no hello: the core opened no session for it"
    );
    // The first is still served.
    first.send("whoami");
    assert_eq!(first.frame()["code"], "not_logged_in");
    server.stop();
}

#[test]
fn a_stop_says_bye_flushes_and_ends_the_turns() {
    // Driven a turn at a time on this thread.
    let (mut reactor, addr) = reactor(16);
    let mut client = Client::connect(addr);
    let mut turns = 0;
    while reactor.open_sockets() == 0 {
        assert_eq!(
            reactor.turn(Some(Duration::from_millis(100))).unwrap(),
            Turn::Running
        );
        turns += 1;
        assert!(turns < 50, "the connection was never accepted");
    }
    assert_eq!(client.frame()["type"], "hello");
    client.send("login alice pw-alice");
    while reactor.core().users_online() == 0 {
        reactor.turn(Some(Duration::from_millis(100))).unwrap();
        turns += 1;
        assert!(turns < 100, "the login was never served");
    }
    assert_eq!(client.frame()["cmd"], "login");
    reactor.stop_handle().stop();
    let mut stopped = false;
    for _ in 0..100 {
        if reactor.turn(Some(Duration::from_millis(100))).unwrap() == Turn::Stopped {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "the reactor did not stop");
    assert_eq!(
        reactor.turn(None).unwrap(),
        Turn::Stopped,
        "and stays stopped"
    );
    assert_eq!(
        client.rest(),
        "{\"type\":\"bye\",\"reason\":\"server_shutdown\"}\n"
    );
}
