//! The cluster schedule: three cores (cluster mode) over a bus that carries,
//! delays, drops and reorders their messages, and a session table that
//! answers their claims in any order, driven by the fuzzer's operations.
//! It checks that no user is ever logged in on two connections at once,
//! anywhere in the cluster, that every frame a node sends is valid, and
//! that nothing panics.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use chatproto::{
    Accounts, BusMessage, BusTarget, ClaimId, ClaimOutcome, ClusterConfig, ConnId, NodeId, Output,
    PeerKey, QueueSize, Server, ServerConfig, ServerFrame, Timestamp, Username,
};

/// The accounts (plaintext passwords `pw-<name>`).
const USERS: [&str; 3] = ["alice", "bob", "carol"];
const NODES: usize = 3;

/// One step of a schedule.
#[derive(Arbitrary, Debug)]
enum Step {
    /// A new connection on a node.
    Connect { node: u8 },
    /// A connection sends a line.
    Send { conn: u8, line: Line },
    /// A connection's transport goes away.
    Disconnect { conn: u8 },
    /// The bus hands over the message at this position in its queue.
    Carry { at: u8 },
    /// The bus loses the message at this position.
    Lose { at: u8 },
    /// A node's claims are answered, the one at this position first.
    AnswerClaim { node: u8, at: u8 },
    /// Time passes on every node.
    Advance { millis: u16 },
}

#[derive(Arbitrary, Debug)]
enum Line {
    Login { user: u8 },
    Message { user: u8 },
    Whoami,
    Block { user: u8 },
    Logout,
}

/// Replays the schedule in `data`.
pub fn check_cluster_schedule(data: &[u8]) {
    // Step after step until the bytes run out (not a length-prefixed
    // list: every byte of a seed makes schedule).
    let mut u = Unstructured::new(data);
    let mut cluster = Cluster::new();
    for _ in 0..300 {
        let Ok(step) = Step::arbitrary(&mut u) else {
            return;
        };
        cluster.step(step);
        cluster.check_one_session_per_user();
        if u.is_empty() {
            return;
        }
    }
}

struct Cluster {
    nodes: Vec<Server>,
    now: Timestamp,
    /// Messages on the bus: from which node, to whom.
    bus: VecDeque<(usize, BusTarget, BusMessage)>,
    /// Claims asked and not answered, per node.
    claims: Vec<Vec<(ClaimId, Username)>>,
    /// The cluster's sessions: user → (node, claim).
    sessions: HashMap<Username, (usize, ClaimId)>,
    /// Every connection made, with its node.
    conns: Vec<(usize, ConnId)>,
}

fn node_id(i: usize) -> NodeId {
    NodeId::from_u128(i as u128 + 1)
}

impl Cluster {
    fn new() -> Cluster {
        let mut accounts = Accounts::new();
        for name in USERS {
            accounts
                .insert(name.parse().unwrap(), format!("pw-{name}").parse().unwrap())
                .unwrap();
        }
        let now = Timestamp::from_unix_millis(1_700_000_000_000);
        let nodes = (0..NODES)
            .map(|i| {
                let mut config = ServerConfig::default();
                config.cluster = Some(ClusterConfig::new(node_id(i)));
                config.login_rate_per_peer = None;
                config.login_rate_per_name = None;
                config.max_pending_checks_per_peer = None;
                config.rate_limit = None;
                config.byte_rate = None;
                let mut server = Server::new(config, accounts.clone(), now).unwrap();
                server.handle_bus_restored(now);
                server
            })
            .collect();
        let mut cluster = Cluster {
            nodes,
            now,
            bus: VecDeque::new(),
            claims: vec![Vec::new(); NODES],
            sessions: HashMap::new(),
            conns: Vec::new(),
        };
        cluster.pump();
        cluster
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Connect { node } => {
                let node = usize::from(node) % NODES;
                let conn = self.nodes[node].accept(PeerKey::UNSPECIFIED, [7; 16], self.now);
                self.conns.push((node, conn));
            }
            Step::Send { conn, line } => {
                let Some(&(node, conn)) = self.pick(conn) else {
                    return;
                };
                if !self.nodes[node].is_open(conn) {
                    return;
                }
                let name = |user: u8| USERS[usize::from(user) % USERS.len()];
                let text = match line {
                    Line::Login { user } => format!("login {0} pw-{0}\n", name(user)),
                    Line::Message { user } => format!("message {} hi\n", name(user)),
                    Line::Whoami => "whoami\n".to_owned(),
                    Line::Block { user } => format!("block {}\n", name(user)),
                    Line::Logout => "logout\n".to_owned(),
                };
                let _ = self.nodes[node].handle_input(conn, text.as_bytes(), self.now);
            }
            Step::Disconnect { conn } => {
                if let Some(&(node, conn)) = self.pick(conn) {
                    let _ = self.nodes[node].handle_disconnect(conn, self.now);
                }
            }
            Step::Carry { at } => {
                if !self.bus.is_empty() {
                    let at = usize::from(at) % self.bus.len();
                    if let Some((from, to, message)) = self.bus.remove(at) {
                        // As on the wire.
                        let message = BusMessage::decode(&message.encode()).unwrap();
                        for (i, node) in self.nodes.iter_mut().enumerate() {
                            let addressed = match to {
                                BusTarget::Node(id) => id == node_id(i),
                                _ => i != from,
                            };
                            if addressed {
                                node.handle_bus(message.clone(), self.now);
                            }
                        }
                    }
                }
            }
            Step::Lose { at } => {
                if !self.bus.is_empty() {
                    let at = usize::from(at) % self.bus.len();
                    self.bus.remove(at);
                }
            }
            Step::AnswerClaim { node, at } => {
                let node = usize::from(node) % NODES;
                if self.claims[node].is_empty() {
                    return;
                }
                let at = usize::from(at) % self.claims[node].len();
                let (claim, user) = self.claims[node].remove(at);
                let outcome = match self.sessions.get(&user) {
                    Some(&(holder, _)) if holder != node => ClaimOutcome::Elsewhere,
                    _ => {
                        self.sessions.insert(user, (node, claim));
                        ClaimOutcome::Claimed {
                            queued: QueueSize::default(),
                        }
                    }
                };
                self.nodes[node].handle_claim(claim, outcome, self.now);
            }
            Step::Advance { millis } => {
                self.now = self.now + Duration::from_millis(u64::from(millis));
                for node in &mut self.nodes {
                    node.handle_timeout(self.now);
                }
            }
        }
        self.pump();
    }

    fn pick(&self, i: u8) -> Option<&(usize, ConnId)> {
        if self.conns.is_empty() {
            return None;
        }
        self.conns.get(usize::from(i) % self.conns.len())
    }

    /// Takes every node's output, as a driver would.
    fn pump(&mut self) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            while let Some(output) = node.poll_output() {
                match output {
                    Output::Transmit { frame, .. } => {
                        if let Err(e) = ServerFrame::decode(&frame) {
                            panic!("node {i} sent a frame that is not valid: {e}");
                        }
                    }
                    Output::Publish { to, message } => self.bus.push_back((i, to, message)),
                    Output::ClaimSession { claim, user } => self.claims[i].push((claim, user)),
                    Output::ReleaseSession { user, claim } => {
                        if self.sessions.get(&user) == Some(&(i, claim)) {
                            self.sessions.remove(&user);
                        }
                    }
                    Output::VerifyPassword { .. } => panic!("plaintext accounts only"),
                    _ => {}
                }
            }
        }
        // Bounded, whatever the schedule: a bus no step carries stays small.
        while self.bus.len() > 64 {
            self.bus.pop_front();
        }
    }

    /// No user is logged in on two open connections, on any nodes.
    fn check_one_session_per_user(&self) {
        let mut seen: HashMap<&str, (usize, ConnId)> = HashMap::new();
        for &(node, conn) in &self.conns {
            if let Some(user) = self.nodes[node].user(conn) {
                if let Some(first) = seen.insert(user.as_str(), (node, conn)) {
                    panic!("{user} is logged in on {first:?} and on {:?}", (node, conn));
                }
            }
        }
    }
}
