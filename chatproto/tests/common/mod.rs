//! A simulation harness for the server core: a virtual clock, connections
//! that collect what the core sends them, and helpers to log users in.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use chatproto::{
    Accounts, ByeReason, ConnId, ErrorCode, ErrorFrame, Event, HashedPassword, MemoryStore,
    OkFrame, Output, Password, PeerKey, Server, ServerConfig, ServerFrame, Snapshot, Timestamp,
    VerifyTicket,
};

/// The accounts every simulation has: name and password.
pub const USERS: [(&str, &str); 6] = [
    ("alice", "pw-alice"),
    ("bob", "pw-bob"),
    ("carol", "pw-carol"),
    ("dave", "pw-dave"),
    ("eve", "pw-eve"),
    ("root", "pw-root"),
];

pub const T0: u64 = 1_700_000_000_000;

pub fn accounts() -> Accounts {
    let mut accounts = Accounts::new();
    for (name, password) in USERS {
        accounts
            .insert(name.parse().unwrap(), password.parse().unwrap())
            .unwrap();
    }
    accounts
}

pub fn config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.admins.insert("root".parse().unwrap());
    // Most rules are about long spells of protocol time on connections
    // that have not logged in; the login timeout has tests of its own.
    config.login_timeout = None;
    // Likewise the per-address and per-name login limits: every simulated
    // connection shares one peer key, and tests log in at will.
    config.login_rate_per_peer = None;
    config.login_rate_per_name = None;
    config.max_pending_checks_per_peer = None;
    // And the byte rate: tests send what they need, as fast as they like.
    config.byte_rate = None;
    config
}

pub struct Sim {
    pub server: Server<MemoryStore>,
    pub now: Timestamp,
    inbox: HashMap<ConnId, Vec<Bytes>>,
    pub closed: HashMap<ConnId, ByeReason>,
    pub events: Vec<Event>,
    /// Password checks asked for, not yet answered.
    pub verifications: Vec<(VerifyTicket, HashedPassword, Password)>,
    next_random: u8,
}

impl Sim {
    pub fn new() -> Sim {
        Sim::with_config(config())
    }

    pub fn with_config(config: ServerConfig) -> Sim {
        Sim::with_accounts(config, accounts())
    }

    pub fn with_accounts(config: ServerConfig, accounts: Accounts) -> Sim {
        let now = Timestamp::from_unix_millis(T0);
        Sim::from_server(
            Server::new(config, accounts, MemoryStore::new(), now).unwrap(),
            now,
        )
    }

    /// Answers every pending password check, as a driver's workers would:
    /// the test "hash" of a password is `$test$<password>`.
    pub fn verify_all(&mut self) {
        for (ticket, hash, password) in std::mem::take(&mut self.verifications) {
            let matches = hash.as_str() == format!("$test${}", password.expose());
            self.server.handle_verification(ticket, matches, self.now);
            self.pump();
        }
    }

    /// A server carrying on from `snapshot`, as after a restart.
    pub fn restarted(config: ServerConfig, snapshot: &Snapshot, now: Timestamp) -> Sim {
        let store = MemoryStore::new();
        let (server, _) = Server::with_snapshot(config, accounts(), store, snapshot, now).unwrap();
        Sim::from_server(server, now)
    }

    fn from_server(server: Server<MemoryStore>, now: Timestamp) -> Sim {
        Sim {
            server,
            now,
            inbox: HashMap::new(),
            closed: HashMap::new(),
            events: Vec::new(),
            verifications: Vec::new(),
            next_random: 0,
        }
    }

    pub fn connect(&mut self) -> ConnId {
        self.connect_from(PeerKey::UNSPECIFIED)
    }

    /// Connects from the client address `peer`.
    pub fn connect_from(&mut self, peer: PeerKey) -> ConnId {
        self.next_random = self.next_random.wrapping_add(1);
        let conn = self.server.accept(peer, [self.next_random; 16], self.now);
        self.pump();
        conn
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, conn: ConnId, bytes: &[u8]) {
        self.server.handle_input(conn, bytes, self.now).unwrap();
        self.pump();
    }

    /// Sends one line (a newline is added).
    pub fn send(&mut self, conn: ConnId, line: &str) {
        self.send_bytes(conn, format!("{line}\n").as_bytes());
    }

    /// Sends one line and returns every frame it caused on that connection.
    pub fn ask(&mut self, conn: ConnId, line: &str) -> Vec<ServerFrame> {
        self.take(conn);
        self.send(conn, line);
        self.take(conn)
    }

    /// Sends one line that must be answered by a single `ok`.
    pub fn ok(&mut self, conn: ConnId, line: &str) -> OkFrame {
        let frames = self.ask(conn, line);
        match frames.as_slice() {
            [ServerFrame::Ok(ok), ..] => ok.clone(),
            other => panic!("{line:?}: expected ok, got {other:?}"),
        }
    }

    /// Sends one line that must be answered by a single `error`.
    pub fn err(&mut self, conn: ConnId, line: &str) -> ErrorFrame {
        let frames = self.ask(conn, line);
        match frames.as_slice() {
            [ServerFrame::Error(e)] => e.clone(),
            other => panic!("{line:?}: expected one error, got {other:?}"),
        }
    }

    /// The error code for one line.
    pub fn code(&mut self, conn: ConnId, line: &str) -> ErrorCode {
        self.err(conn, line).code
    }

    /// Connects and logs `user` in; drops the greeting and the answer.
    pub fn login(&mut self, user: &str) -> ConnId {
        let conn = self.connect();
        let password = USERS.iter().find(|(n, _)| *n == user).unwrap().1;
        let ok = self.ok(conn, &format!("login {user} {password}"));
        assert_eq!(
            ok.reply,
            chatproto::Reply::Login {
                user: user.parse().unwrap()
            }
        );
        conn
    }

    /// Frames received on `conn` since the last call.
    pub fn take(&mut self, conn: ConnId) -> Vec<ServerFrame> {
        self.take_raw(conn)
            .iter()
            .map(|b| {
                assert!(!b.contains(&b'\n'), "a frame is one payload, unterminated");
                ServerFrame::decode(b).unwrap()
            })
            .collect()
    }

    /// The encoded frames received on `conn` since the last call.
    pub fn take_raw(&mut self, conn: ConnId) -> Vec<Bytes> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    /// Moves the clock on by `d`, firing every deadline on the way at its
    /// own time, as a driver that waits on `poll_timeout` would.
    pub fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        while let Some(t) = self.server.poll_timeout() {
            if t > until {
                break;
            }
            self.now = self.now.max(t);
            self.server.handle_timeout(self.now);
            self.pump();
        }
        self.now = until;
    }

    pub fn disconnect(&mut self, conn: ConnId) {
        self.server.handle_disconnect(conn, self.now).unwrap();
        self.pump();
    }

    /// Takes every output, as a driver that writes everything at once:
    /// each connection that got frames is then reported drained, which
    /// hands over the next page of an offline queue.
    pub fn pump(&mut self) {
        let mut written = Vec::new();
        loop {
            self.pump_once(&mut written);
            if written.is_empty() {
                return;
            }
            for conn in written.drain(..) {
                let _ = self.server.handle_drained(conn, 0, self.now);
            }
        }
    }

    fn pump_once(&mut self, written: &mut Vec<ConnId>) {
        while let Some(output) = self.server.poll_output() {
            match output {
                Output::Transmit { conn, frame } => {
                    assert!(
                        !self.closed.contains_key(&conn),
                        "frame sent to closed {conn}"
                    );
                    if !written.contains(&conn) {
                        written.push(conn);
                    }
                    self.inbox.entry(conn).or_default().push(frame);
                }
                Output::Close { conn, reason } => {
                    assert!(
                        self.closed.insert(conn, reason).is_none(),
                        "{conn} closed twice"
                    );
                }
                Output::Event(e) => self.events.push(e),
                Output::VerifyPassword {
                    ticket,
                    hash,
                    password,
                    ..
                } => self.verifications.push((ticket, hash, password)),
                other => panic!("unexpected output {other:?}"),
            }
        }
    }
}

/// The presence frames among `frames`, as (user, online).
pub fn presences(frames: &[ServerFrame]) -> Vec<(String, bool)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Presence(p) => Some((p.user.to_string(), p.online)),
            _ => None,
        })
        .collect()
}

pub fn names(users: &[chatproto::Username]) -> Vec<&str> {
    users.iter().map(|u| u.as_str()).collect()
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
