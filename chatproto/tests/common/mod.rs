//! A simulation harness for the server core: a virtual clock, connections
//! that collect what the core sends them, and helpers to log users in.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use chatproto::{
    Accounts, BatchId, BusMessage, BusTarget, ByeReason, Change, ClaimId, ClaimOutcome, ConnId,
    ErrorCode, ErrorFrame, Event, HashedPassword, NodeId, OkFrame, Output, Password, PeerKey,
    Persisted, QueueSize, QueuedMessage, Server, ServerConfig, ServerFrame, Snapshot, Timestamp,
    Username, VerifyTicket,
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
    // Every change goes through batches, which the simulated storage
    // commits at once (see `Sim::pump`).
    config.durable = true;
    config
}

pub struct Sim {
    pub server: Server,
    pub now: Timestamp,
    /// What storage holds: every committed batch applied.
    pub store: Snapshot,
    /// Whether `pump` commits each batch as it comes (the default); if
    /// not, batches wait in `batches` for the test to answer.
    pub auto_commit: bool,
    /// Batches polled and not yet answered (without `auto_commit`).
    pub batches: Vec<(BatchId, Vec<Change>)>,
    inbox: HashMap<ConnId, Vec<Bytes>>,
    pub closed: HashMap<ConnId, ByeReason>,
    /// The connection each index names, as a driver keeps it: from the
    /// accept to its close (or the driver's disconnect).
    by_index: HashMap<usize, ConnId>,
    pub events: Vec<Event>,
    /// Password checks asked for, not yet answered.
    pub verifications: Vec<(VerifyTicket, HashedPassword, Password)>,
    /// What the core published to the other nodes (cluster mode), oldest
    /// first, until a test takes it.
    pub published: Vec<(BusTarget, BusMessage)>,
    /// Cluster mode: the cluster's sessions, shared by its nodes; claims
    /// are answered from it as they come unless `hold_claims`.
    pub sessions: Option<SessionTable>,
    /// Whether session claims wait in `claims` for the test to answer.
    pub hold_claims: bool,
    /// Session claims polled and not yet answered.
    pub claims: Vec<(ClaimId, Username)>,
    next_random: u8,
}

/// The cluster's sessions, as its database keeps them: a user's session
/// is held by one node under one claim; a claim takes it over from a node
/// given up, or from the claiming node itself.
#[derive(Clone, Default)]
pub struct SessionTable(Rc<RefCell<Sessions>>);

#[derive(Default)]
pub struct Sessions {
    pub rows: HashMap<Username, (NodeId, ClaimId)>,
    /// Nodes whose lease ran out in the database.
    pub expired: HashSet<NodeId>,
    /// While true, every claim fails and releases are kept to retry.
    pub down: bool,
    /// Releases that came while `down`.
    pub unreleased: Vec<(NodeId, Username, ClaimId)>,
    /// The offline queues every node shares (nodes that keep texts in
    /// storage), each message with its storage number.
    pub queues: HashMap<Username, Vec<QueuedMessage>>,
    pub next_seq: u64,
}

impl SessionTable {
    pub fn claim(&self, node: NodeId, user: &Username, claim: ClaimId) -> ClaimOutcome {
        let mut s = self.0.borrow_mut();
        if s.down || s.expired.contains(&node) {
            // An expired node claims nothing until its heartbeat has told
            // it (and it has closed its clients).
            return ClaimOutcome::Failed;
        }
        match s.rows.get(user) {
            Some((holder, _)) if *holder != node && !s.expired.contains(holder) => {
                ClaimOutcome::Elsewhere
            }
            _ => {
                s.rows.insert(user.clone(), (node, claim));
                let queue = s.queues.get(user).map(Vec::as_slice).unwrap_or_default();
                ClaimOutcome::Claimed {
                    queued: QueueSize {
                        messages: queue.len(),
                        bytes: queue.iter().map(|m| m.message.size()).sum(),
                    },
                }
            }
        }
    }

    /// Writes what a committed batch changed in the shared queues.
    pub fn commit(&self, changes: &[Change]) {
        let mut s = self.0.borrow_mut();
        for change in changes {
            match change {
                Change::MessageQueued { to, message } => {
                    s.next_seq += 1;
                    let seq = s.next_seq;
                    s.queues.entry(to.clone()).or_default().push(QueuedMessage {
                        seq,
                        message: message.clone(),
                    });
                }
                Change::OfflineDelivered { to, seqs } => {
                    if let Some(queue) = s.queues.get_mut(to) {
                        queue.retain(|m| !seqs.contains(&m.seq));
                    }
                }
                Change::MessagesDelivered { .. } => {
                    panic!("a cluster node must name what it delivered: {change:?}")
                }
                Change::AccountRemoved { user } => {
                    s.queues.remove(user);
                }
                _ => {}
            }
        }
    }

    /// `user`'s queued messages after `after_seq`, up to `max_bytes` but
    /// at least one.
    pub fn page(&self, user: &Username, after_seq: u64, max_bytes: usize) -> Vec<QueuedMessage> {
        let s = self.0.borrow();
        let mut page = Vec::new();
        let mut bytes = 0;
        for m in s.queues.get(user).into_iter().flatten() {
            if m.seq <= after_seq {
                continue;
            }
            if !page.is_empty() && bytes + m.message.size() > max_bytes {
                break;
            }
            bytes += m.message.size();
            page.push(m.clone());
        }
        page
    }

    pub fn release(&self, node: NodeId, user: &Username, claim: ClaimId) {
        let mut s = self.0.borrow_mut();
        if s.down {
            s.unreleased.push((node, user.clone(), claim));
        } else if s.rows.get(user) == Some(&(node, claim)) {
            s.rows.remove(user);
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Sessions) -> T) -> T {
        f(&mut self.0.borrow_mut())
    }

    /// The database is back: the releases kept are done.
    pub fn restore(&self) {
        let unreleased = self.with(|s| {
            s.down = false;
            std::mem::take(&mut s.unreleased)
        });
        for (node, user, claim) in unreleased {
            self.release(node, &user, claim);
        }
    }
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
        Sim::from_server(Server::new(config, accounts, now).unwrap(), now)
    }

    /// This node's id (cluster mode).
    pub fn node(&self) -> NodeId {
        self.server
            .config()
            .cluster
            .as_ref()
            .expect("cluster mode")
            .node
    }

    /// Answers every pending session claim from the session table.
    pub fn answer_claims(&mut self) {
        for (claim, user) in std::mem::take(&mut self.claims) {
            let table = self.sessions.as_ref().expect("a session table");
            let outcome = table.claim(self.node(), &user, claim);
            self.server.handle_claim(claim, outcome, self.now);
            self.pump();
        }
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
        Sim::restarted_with(config, accounts(), snapshot, now)
    }

    /// As [`Sim::restarted`], serving `accounts`.
    pub fn restarted_with(
        config: ServerConfig,
        accounts: Accounts,
        snapshot: &Snapshot,
        now: Timestamp,
    ) -> Sim {
        let (server, _) = Server::with_snapshot(config, accounts, snapshot, now).unwrap();
        let mut sim = Sim::from_server(server, now);
        sim.store = snapshot.clone();
        sim.pump();
        sim
    }

    fn from_server(server: Server, now: Timestamp) -> Sim {
        Sim {
            server,
            now,
            store: Snapshot::default(),
            auto_commit: true,
            batches: Vec::new(),
            inbox: HashMap::new(),
            closed: HashMap::new(),
            by_index: HashMap::new(),
            events: Vec::new(),
            verifications: Vec::new(),
            published: Vec::new(),
            sessions: None,
            hold_claims: false,
            claims: Vec::new(),
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
        if let Some(old) = self.by_index.insert(conn.index(), conn) {
            panic!("{conn} took the index of {old}, whose socket a driver still has");
        }
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

    /// A driver no longer needs `conn`'s index.
    fn forget_index(&mut self, conn: ConnId) {
        if self.by_index.get(&conn.index()) == Some(&conn) {
            self.by_index.remove(&conn.index());
        }
    }

    pub fn disconnect(&mut self, conn: ConnId) {
        self.server.handle_disconnect(conn, self.now).unwrap();
        self.forget_index(conn);
        self.pump();
    }

    /// Takes every output, as a driver that writes everything at once:
    /// each connection that got frames is then reported drained, which
    /// hands over the next page of an offline queue.
    pub fn pump(&mut self) {
        let mut written = Vec::new();
        let mut committed = Vec::new();
        let mut pages = Vec::new();
        loop {
            self.pump_once(&mut written, &mut committed, &mut pages);
            let claims = match &self.sessions {
                Some(table) if !self.hold_claims => std::mem::take(&mut self.claims)
                    .into_iter()
                    .map(|(claim, user)| (claim, table.claim(self.node(), &user, claim)))
                    .collect(),
                _ => Vec::new(),
            };
            if written.is_empty() && committed.is_empty() && claims.is_empty() && pages.is_empty() {
                return;
            }
            for (conn, page) in pages.drain(..) {
                let _ = self.server.handle_offline_page(conn, page, self.now);
            }
            for (claim, outcome) in claims {
                self.server.handle_claim(claim, outcome, self.now);
            }
            for batch in committed.drain(..) {
                self.server
                    .handle_persisted(batch, Persisted::Committed, self.now);
            }
            for conn in written.drain(..) {
                let _ = self.server.handle_drained(conn, 0, self.now);
            }
        }
    }

    /// Answers the oldest batch the test holds (without `auto_commit`):
    /// committed (applied to `store`) or failed.
    pub fn answer_batch(&mut self, outcome: Persisted) {
        assert!(!self.batches.is_empty(), "no batch to answer");
        let (batch, changes) = self.batches.remove(0);
        if outcome == Persisted::Committed {
            for change in &changes {
                self.store.apply(change);
            }
        }
        self.server.handle_persisted(batch, outcome, self.now);
        self.pump();
    }

    fn pump_once(
        &mut self,
        written: &mut Vec<ConnId>,
        committed: &mut Vec<BatchId>,
        pages: &mut Vec<(ConnId, Vec<QueuedMessage>)>,
    ) {
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
                    self.forget_index(conn);
                }
                Output::Event(e) => self.events.push(e),
                Output::VerifyPassword {
                    ticket,
                    hash,
                    password,
                    ..
                } => self.verifications.push((ticket, hash, password)),
                Output::Persist { batch, changes } if self.auto_commit => {
                    for change in &changes {
                        self.store.apply(change);
                    }
                    if let Some(table) = &self.sessions {
                        table.commit(&changes);
                    }
                    committed.push(batch);
                }
                Output::LoadOffline {
                    conn,
                    user,
                    after_seq,
                    max_bytes,
                } => {
                    let table = self.sessions.as_ref().expect("a shared store");
                    pages.push((conn, table.page(&user, after_seq, max_bytes)));
                }
                Output::Persist { batch, changes } => self.batches.push((batch, changes)),
                Output::Publish { to, message } => self.published.push((to, message)),
                Output::ClaimSession { claim, user } => self.claims.push((claim, user)),
                Output::ReleaseSession { user, claim } => {
                    let table = self.sessions.as_ref().expect("a session table");
                    table.release(self.node(), &user, claim);
                }
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

/// Drains `server`'s outputs as a driver with storage would: each batch's
/// changes are appended to `journal`, and the batch committed.
pub fn drain_journal(server: &mut Server, now: Timestamp, journal: &mut Vec<Change>) {
    loop {
        let mut committed = None;
        while let Some(output) = server.poll_output() {
            if let Output::Persist { batch, changes } = output {
                journal.extend(changes);
                committed = Some(batch);
            }
        }
        match committed {
            Some(batch) => server.handle_persisted(batch, Persisted::Committed, now),
            None => return,
        }
    }
}

impl Sim {
    /// Sends one line whose answer waits for storage (nothing comes yet).
    pub fn ok_later(&mut self, conn: ConnId, line: &str) {
        let frames = self.ask(conn, line);
        assert!(frames.is_empty(), "{line:?} answered early: {frames:?}");
    }
}
