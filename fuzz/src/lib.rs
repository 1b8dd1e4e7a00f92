//! The checks behind the fuzz targets. Each takes the fuzzer's raw bytes
//! and panics when an invariant breaks. `cargo test` in the main workspace
//! replays every file under `fuzz/seeds/` through the same functions
//! (`chatproto/tests/fuzz_seeds.rs`), so the invariants are checked on the
//! stable toolchain too.

mod cluster;

pub use cluster::check_cluster_schedule;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use chatproto::{
    Accounts, BatchId, Change, CloseReason, Command, ConnId, FrameDecoder, FrameError,
    HashedPassword, Output, Password, PeerKey, Persisted, Reply, Request, Server, ServerConfig,
    ServerFrame, Snapshot, Timestamp, VerifyTicket,
};

/// Frame decoding: never buffers more than the limit, and the frames do
/// not depend on how the input is cut.
///
/// Input: one byte for the limit, one for the cut seed, then the stream.
pub fn check_frame_decoder(data: &[u8]) {
    let [limit, seed, stream @ ..] = data else {
        return;
    };
    let limit = usize::from(*limit % 64) + 1;
    let whole = decode(limit, stream, &[stream.len()]);
    // Cut points from a small deterministic generator seeded by the input.
    let mut cuts = Vec::new();
    let mut x = u32::from(*seed) | 1;
    let mut at = 0;
    while at < stream.len() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        at += (x as usize % 9) + 1;
        cuts.push(at.min(stream.len()));
    }
    assert_eq!(
        whole,
        decode(limit, stream, &cuts),
        "chunking changed the frames"
    );
    let every_byte: Vec<usize> = (1..=stream.len()).collect();
    assert_eq!(
        whole,
        decode(limit, stream, &every_byte),
        "byte-by-byte changed the frames"
    );
    // (A frame may still end in `\r`: only one `\r` before the `\n` is
    // dropped, so "a\r\r\n" is the frame "a\r".)
    for frame in whole.iter().flatten() {
        assert!(!frame.is_empty() && frame.len() <= limit);
        assert!(!frame.contains(&b'\n'));
    }
}

fn decode(limit: usize, stream: &[u8], cuts: &[usize]) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut decoder = FrameDecoder::new(limit);
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts {
        let mut input = &stream[start..end];
        while let Some(frame) = decoder.decode(&mut input) {
            out.push(frame.map(<[u8]>::to_vec));
        }
        assert!(decoder.buffered() <= limit, "buffered past the limit");
        start = end;
    }
    out
}

/// The inline parser: never panics; what parses renders and parses back
/// to the same command, and survives the JSON form too.
pub fn check_inline_parser(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match Command::parse(line) {
        Ok(command) => {
            let rendered = command.render();
            assert_eq!(
                Command::parse(&rendered).as_ref(),
                Ok(&command),
                "{rendered:?}"
            );
            let request = Request {
                id: Some(chatproto::RequestId(7)),
                command,
            };
            assert_eq!(
                Request::from_json(&request.to_json()).as_ref(),
                Ok(&request)
            );
        }
        Err(e) => {
            let code = e.code();
            assert!(
                matches!(
                    code,
                    chatproto::ErrorCode::UnknownCommand | chatproto::ErrorCode::BadArguments
                ),
                "{code}"
            );
            assert!(
                e.to_string().len() < 512,
                "error text echoes too much input"
            );
        }
    }
}

/// A client frame: never panics; a request that decodes encodes and
/// decodes back to itself.
pub fn check_json_request(data: &[u8]) {
    match Request::parse_frame(data) {
        Ok(request) => {
            let json = request.to_json();
            assert_eq!(Request::from_json(&json).as_ref(), Ok(&request), "{json}");
        }
        Err(rejected) => assert!(rejected.error.to_string().len() < 512),
    }
}

/// What the driver does in one step of a server session.
#[derive(Debug, Arbitrary)]
pub enum Op {
    Connect,
    Send {
        conn: u8,
        line: Line,
    },
    Raw {
        conn: u8,
        bytes: Vec<u8>,
    },
    Advance {
        millis: u32,
    },
    Disconnect {
        conn: u8,
    },
    CloseSlow {
        conn: u8,
    },
    Shutdown,
    /// Storage turns slow: the batch in flight waits for `Commit` or
    /// `FailCommit` (without it, every batch is committed at once).
    Begin,
    /// The batch in flight is committed: what waited for it goes out.
    Commit,
    /// The batch in flight fails: the core takes it back, and every change
    /// made since.
    FailCommit,
    /// A password-check worker answers one pending check.
    Verify {
        which: u8,
    },
}

/// A request, built to reach the interesting rules often.
#[derive(Debug, Arbitrary)]
pub enum Line {
    Login {
        user: u8,
        right_password: bool,
        json: bool,
    },
    Message {
        to: u8,
        text: u8,
    },
    Broadcast {
        text: u8,
    },
    Block {
        user: u8,
    },
    Unblock {
        user: u8,
    },
    Whoelse,
    Whoelsesince {
        seconds: u8,
    },
    Whoami,
    Logout,
    Help,
    Debug,
}

const USERS: [&str; 5] = ["alice", "bob", "carol", "root", "ghost"];
const TEXTS: [&str; 4] = ["hi", "two  words", "tab\there", "é🎉"];
/// Connections the fuzzer addresses, by index (taken modulo this).
const MAX_CONNS: usize = 6;

impl Line {
    fn render(&self) -> String {
        let user = |i: &u8| USERS[usize::from(*i) % USERS.len()];
        let text = |i: &u8| TEXTS[usize::from(*i) % TEXTS.len()];
        match self {
            Line::Login {
                user: u,
                right_password,
                json,
            } => {
                let name = user(u);
                let password = if *right_password {
                    format!("pw-{name}")
                } else {
                    "wrong".to_owned()
                };
                if *json {
                    format!(r#"{{"cmd":"login","user":"{name}","password":"{password}","id":1}}"#)
                } else {
                    format!("login {name} {password}")
                }
            }
            Line::Message { to, text: t } => format!("message {} {}", user(to), text(t)),
            Line::Broadcast { text: t } => format!("broadcast {}", text(t)),
            Line::Block { user: u } => format!("block {}", user(u)),
            Line::Unblock { user: u } => {
                format!(r#"{{"cmd":"unblock","user":"{}","id":2}}"#, user(u))
            }
            Line::Whoelse => "whoelse".to_owned(),
            Line::Whoelsesince { seconds } => format!("whoelsesince {seconds}"),
            Line::Whoami => "whoami".to_owned(),
            Line::Logout => "logout".to_owned(),
            Line::Help => "help".to_owned(),
            Line::Debug => "debug server".to_owned(),
        }
    }
}

/// The whole server core through a sequence of driver operations, with
/// the protocol's invariants checked after every step.
pub fn check_server_session(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(ops) = Vec::<Op>::arbitrary(&mut u) else {
        return;
    };
    let mut sim = Model::new();
    for op in ops.into_iter().take(200) {
        sim.step(op);
    }
}

/// The fuzzer's view of the server: what it has seen, to check against.
/// It drives the core as a durable server does: each batch of changes is
/// committed (or failed) when the operations say, and the core holds what
/// depends on a batch until then.
struct Model {
    server: Server,
    /// What storage holds: every committed change applied.
    committed: Snapshot,
    /// The batch being written, if any.
    in_flight: Option<(BatchId, Vec<Change>)>,
    /// Password checks asked for and not answered yet.
    checks: Vec<(VerifyTicket, HashedPassword, Password)>,
    /// Storage is slow: batches wait for `Commit` or `FailCommit`.
    holding: bool,
    now: Timestamp,
    conns: Vec<ConnId>,
    closed: HashSet<ConnId>,
    /// Connections the driver reported gone (`handle_disconnect`).
    disconnected: HashSet<ConnId>,
    /// Who each connection is logged in as, from the `ok` frames it got.
    user_of: HashMap<ConnId, String>,
    /// `blocks[a]` holds whom `a` has blocked, from the `ok` frames.
    blocks: HashMap<String, HashSet<String>>,
    /// Connections whose output has been waiting in the core (behind a
    /// batch, or a first offline page) since before the current step:
    /// what comes out for them may have been made before a block that
    /// this step served and answered, so the block rules are not held
    /// against it (a presence made before a block, released after the
    /// blocker's `ok`, is a race of the network's kind, not a breach).
    /// Kept while they hold output.
    held_since_before: HashSet<ConnId>,
    max_frame: usize,
    steps: u32,
}

impl Model {
    fn new() -> Model {
        let mut accounts = Accounts::new();
        for (i, &name) in USERS[..4].iter().enumerate() {
            let user = name.parse().unwrap();
            if i % 2 == 0 {
                accounts
                    .insert(user, format!("pw-{name}").parse().unwrap())
                    .unwrap();
            } else {
                // Checked by the "driver" (the model) with a test scheme.
                let hash = HashedPassword::new(&format!("$test$pw-{name}")).unwrap();
                accounts.insert_hashed(user, hash).unwrap();
            }
        }
        let mut config = ServerConfig::default();
        config.max_frame_bytes = 256;
        config.offline_queue_capacity = 4;
        config.idle_timeout = Duration::from_secs(30);
        config.lockout.max_tracked_names = 4;
        config.admins.insert("root".parse().unwrap());
        config.durable = true;
        let now = Timestamp::from_unix_millis(1_700_000_000_000);
        Model {
            max_frame: config.max_frame_bytes,
            server: Server::new(config, accounts, now).unwrap(),
            committed: Snapshot::default(),
            in_flight: None,
            checks: Vec::new(),
            holding: false,
            now,
            conns: Vec::new(),
            closed: HashSet::new(),
            disconnected: HashSet::new(),
            user_of: HashMap::new(),
            blocks: HashMap::new(),
            held_since_before: HashSet::new(),
            steps: 0,
        }
    }

    fn pick(&self, i: u8) -> Option<ConnId> {
        (!self.conns.is_empty()).then(|| self.conns[usize::from(i) % self.conns.len()])
    }

    fn step(&mut self, op: Op) {
        self.steps += 1;
        for &c in &self.conns {
            if self.server.holds_output(c) {
                self.held_since_before.insert(c);
            }
        }
        match op {
            Op::Connect if self.conns.len() < MAX_CONNS => {
                let random = [self.steps as u8; 16];
                self.conns
                    .push(self.server.accept(PeerKey::UNSPECIFIED, random, self.now));
            }
            Op::Connect => {}
            Op::Send { conn, line } => {
                if let Some(c) = self.pick(conn) {
                    let bytes = format!("{}\n", line.render());
                    self.input(c, bytes.as_bytes());
                }
            }
            Op::Raw { conn, bytes } => {
                if let Some(c) = self.pick(conn) {
                    self.input(c, &bytes);
                }
            }
            Op::Advance { millis } => {
                self.now = self.now + Duration::from_millis(u64::from(millis % 120_000));
                self.server.handle_timeout(self.now);
            }
            Op::Disconnect { conn } => {
                if let Some(c) = self.pick(conn) {
                    let open = !self.closed.contains(&c);
                    let known = self.server.handle_disconnect(c, self.now).is_ok();
                    self.check_known(c, known, open);
                    // What was held for it may still come out (a half-closed
                    // peer reads it); a driver drops it for a socket gone.
                    self.disconnected.insert(c);
                    if open {
                        self.closed.insert(c);
                        self.user_of.remove(&c);
                    }
                }
            }
            Op::CloseSlow { conn } => {
                if let Some(c) = self.pick(conn) {
                    let open = !self.closed.contains(&c);
                    let known = self
                        .server
                        .close(c, CloseReason::SlowConsumer, self.now)
                        .is_ok();
                    self.check_known(c, known, open);
                }
            }
            Op::Shutdown => self.server.shutdown(self.now),
            Op::Verify { which } => {
                if !self.checks.is_empty() {
                    let i = usize::from(which) % self.checks.len();
                    let (ticket, hash, password) = self.checks.remove(i);
                    let matches = hash.as_str() == format!("$test${}", password.expose());
                    self.server.handle_verification(ticket, matches, self.now);
                }
            }
            Op::Begin => self.holding = true,
            Op::Commit => self.holding = false,
            Op::FailCommit => {
                self.collect();
                if let Some((batch, _)) = self.in_flight.take() {
                    self.server
                        .handle_persisted(batch, Persisted::Failed, self.now);
                }
                self.holding = false;
            }
        }
        self.collect();
        if !self.holding {
            while let Some((batch, changes)) = self.in_flight.take() {
                for change in &changes {
                    self.committed.apply(change);
                }
                self.server
                    .handle_persisted(batch, Persisted::Committed, self.now);
                self.collect();
            }
            assert!(!self.server.persist_pending(), "a batch left unsent");
            self.check_invariants();
        }
    }

    fn input(&mut self, c: ConnId, bytes: &[u8]) {
        let open = !self.closed.contains(&c);
        let known = self.server.handle_input(c, bytes, self.now).is_ok();
        self.check_known(c, known, open);
    }

    /// A call on `c` found it `known` to the core, the model thinking it
    /// `open`. A connection the core closed behind held output (its
    /// `Close` not out yet) is already unknown to the core, though the
    /// model has not seen it close.
    fn check_known(&self, c: ConnId, known: bool, open: bool) {
        if known != open {
            assert!(
                open && self.server.holds_output(c),
                "conn {c:?}: known to the core {known}, open for the model {open}"
            );
        }
    }

    /// Takes the core's output, all of it written at once: each
    /// connection that got frames is then reported drained (which hands
    /// over the next page of an offline queue), until nothing more comes.
    fn collect(&mut self) {
        loop {
            let written = self.collect_once();
            if written.is_empty() {
                let server = &self.server;
                self.held_since_before
                    .retain(|conn| server.holds_output(*conn));
                return;
            }
            for conn in written {
                let _ = self.server.handle_drained(conn, 0, self.now);
            }
        }
    }

    fn collect_once(&mut self) -> Vec<ConnId> {
        let mut written = Vec::new();
        while let Some(output) = self.server.poll_output() {
            match output {
                Output::Transmit { conn, frame } => {
                    assert!(
                        !self.closed.contains(&conn) || self.disconnected.contains(&conn),
                        "frame sent to closed {conn}"
                    );
                    // One frame's payload: no terminator, no line break.
                    let line = &frame[..];
                    assert!(!line.contains(&b'\n'));
                    let frame = ServerFrame::decode(line)
                        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(line)));
                    if self.disconnected.contains(&conn) {
                        // Held output of a connection gone: the model
                        // forgot who it was.
                        continue;
                    }
                    if !written.contains(&conn) {
                        written.push(conn);
                    }
                    self.observe(conn, frame);
                }
                Output::Close { conn, .. } => {
                    assert!(
                        self.closed.insert(conn) || self.disconnected.contains(&conn),
                        "{conn} closed twice"
                    );
                    self.user_of.remove(&conn);
                }
                Output::Persist { batch, changes } => {
                    assert!(self.in_flight.is_none(), "two batches in flight");
                    self.in_flight = Some((batch, changes));
                }
                Output::VerifyPassword {
                    ticket,
                    hash,
                    password,
                    ..
                } => {
                    assert!(
                        !self.checks.iter().any(|(t, _, _)| *t == ticket),
                        "{ticket} asked twice"
                    );
                    self.checks.push((ticket, hash, password));
                }
                _ => {}
            }
        }
        written
    }

    /// Learns from a frame, and checks it against the blocks in force.
    fn observe(&mut self, conn: ConnId, frame: ServerFrame) {
        let me = self.user_of.get(&conn).cloned();
        // Whether `target` (this connection's user) is blocked by
        // `blocker` for a frame that `blocker` made.
        let blocked = |blocker: &str, target: &str| {
            self.blocks
                .get(blocker)
                .is_some_and(|set| set.contains(target))
        };
        let from_blocker = |blocker: &str, target: &str| {
            blocked(blocker, target) && !self.held_since_before.contains(&conn)
        };
        match frame {
            ServerFrame::Ok(ok) => match ok.reply {
                Reply::Login { user } => {
                    // Rule 15: a login is answered once it is durable.
                    assert!(
                        self.committed.last_seen.contains_key(&user),
                        "{user}'s login answered before it was committed"
                    );
                    self.user_of.insert(conn, user.to_string());
                }
                Reply::Block { user } => {
                    let me = me.expect("block answered on a logged-in connection");
                    self.blocks.entry(me).or_default().insert(user.to_string());
                }
                Reply::Unblock { user } => {
                    let me = me.expect("unblock answered on a logged-in connection");
                    self.blocks.entry(me).or_default().remove(user.as_str());
                }
                Reply::Whoelse { users } | Reply::Whoelsesince { users } => {
                    let me = me.expect("listing answered on a logged-in connection");
                    for u in &users {
                        assert_ne!(u.as_str(), me, "listed oneself");
                        assert!(
                            !from_blocker(u.as_str(), &me),
                            "{u} blocked {me} but is listed"
                        );
                    }
                    assert!(users.windows(2).all(|w| w[0] < w[1]), "not sorted");
                }
                _ => {}
            },
            ServerFrame::Message(m) => {
                let me = me.expect("messages go to logged-in users");
                // A queued message was accepted before any block now in
                // force (a blocked sender's message is refused, not
                // queued), so it is still delivered.
                assert!(
                    m.offline || !blocked(&me, m.from.as_str()),
                    "{me} got a message from blocked {}",
                    m.from
                );
            }
            ServerFrame::Broadcast(b) => {
                let me = me.expect("broadcasts go to logged-in users");
                assert!(
                    !blocked(&me, b.from.as_str()),
                    "{me} got a broadcast from blocked {}",
                    b.from
                );
                assert_ne!(me, b.from.as_str(), "broadcast echoed to its sender");
            }
            ServerFrame::Presence(p) => {
                let me = me.expect("presence goes to logged-in users");
                assert!(
                    !from_blocker(p.user.as_str(), &me),
                    "{me} got presence of {} who blocked them",
                    p.user
                );
                assert_ne!(me, p.user.as_str(), "presence about oneself");
            }
            _ => {}
        }
    }

    fn check_invariants(&self) {
        let mut online = HashSet::new();
        for &c in &self.conns {
            let open = !self.closed.contains(&c);
            assert_eq!(self.server.is_open(c), open);
            let user = self.server.user(c).map(|u| u.to_string());
            assert_eq!(
                user.as_ref(),
                self.user_of.get(&c),
                "the model and the core disagree on {c}"
            );
            if let Some(user) = user {
                assert!(online.insert(user), "two sessions for one user");
            }
            if let Some(buffered) = self.server.buffered_input(c) {
                assert!(
                    buffered <= self.max_frame,
                    "input buffer past the frame limit"
                );
            }
        }
        let state = self.server.debug_state(self.now);
        assert_eq!(
            state.users_online,
            online.len(),
            "online set differs from logged-in connections"
        );
        assert!(
            state.queued_offline_messages <= 4 * 4,
            "offline queues past their cap"
        );
    }
}
