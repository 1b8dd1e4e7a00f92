//! Cluster mode, simulated: several cores whose clocks move together, a
//! bus that carries each node's messages (encoded and decoded, as on the
//! wire) to every node or the one named, in order, or loses them while it
//! is down, and nodes that can stop (frozen or killed) and resume. What is
//! built so far: presence, `whoelse`/`whoelsesince`, broadcast and blocks
//! across nodes, repaired by rosters when the bus comes back and by
//! heartbeats when a message is lost; nodes given up after their lease.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use chatproto::{
    BusDecodeError, BusMessage, BusTarget, ByeReason, ClusterConfig, ConnId, ErrorCode, Event,
    NodeId, Reply, ServerFrame, Timer, BUS_VERSION,
};
use common::{config, names, presences, secs, SessionTable, Sim, USERS};
use proptest::prelude::*;

/// Nodes and the bus between them.
struct Cluster {
    nodes: Vec<Sim>,
    /// Published and not yet handed out: the publishing node, to whom,
    /// the bytes.
    bus: VecDeque<(usize, BusTarget, Bytes)>,
    /// While false, what is published is lost (NATS away).
    up: bool,
    /// Nodes that are frozen or dead: their clocks stand still, and
    /// nothing reaches them or leaves them. With each, how long it has
    /// been stopped: past a lease, the database takes it for dead too.
    stopped: BTreeMap<usize, Duration>,
    /// The cluster's sessions, in its database.
    sessions: SessionTable,
}

/// How far apart the nodes' clocks may get while time passes: each step,
/// every node moves on, then the bus settles.
const STEP: Duration = Duration::from_millis(250);

impl Cluster {
    /// `n` nodes whose bus connections have just come up.
    fn new(n: usize) -> Cluster {
        Cluster::with_accounts_digests(&vec![""; n])
    }

    /// A node for each accounts digest, whose bus connections have just
    /// come up.
    fn with_accounts_digests(digests: &[&str]) -> Cluster {
        Cluster::with_config(digests, |_| {})
    }

    /// A node for each accounts digest, each with `tweak` made to its
    /// configuration, whose bus connections have just come up.
    fn with_config(digests: &[&str], tweak: impl Fn(&mut chatproto::ServerConfig)) -> Cluster {
        let sessions = SessionTable::default();
        let nodes = digests
            .iter()
            .enumerate()
            .map(|(i, digest)| {
                let mut cluster = ClusterConfig::new(node_id(i));
                cluster.accounts_digest = digest.to_string();
                let mut config = config();
                config.cluster = Some(cluster);
                // As chatserver runs a cluster: the texts of offline
                // queues are in the storage the nodes share.
                config.offline_texts = chatproto::OfflineTexts::External;
                tweak(&mut config);
                let mut node = Sim::with_config(config);
                node.sessions = Some(sessions.clone());
                node
            })
            .collect();
        let mut cluster = Cluster {
            nodes,
            bus: VecDeque::new(),
            up: true,
            stopped: BTreeMap::new(),
            sessions,
        };
        cluster.restore_bus();
        cluster
    }

    /// The bus is lost: every node is told, and what is published is lost
    /// until it is back.
    fn lose_bus(&mut self) {
        self.up = false;
        for node in &mut self.nodes {
            node.server.handle_bus_lost(node.now);
            node.pump();
        }
    }

    /// The bus is back: every node is told, and what they say is carried.
    fn restore_bus(&mut self) {
        self.up = true;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if !self.stopped.contains_key(&i) {
                node.server.handle_bus_restored(node.now);
                node.pump();
            }
        }
        self.settle();
    }

    /// Carries every message published until none is left: to every
    /// running node (its sender too, as NATS does), or to the one named.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            self.collect();
            if !self.carry_one() {
                return;
            }
        }
        panic!("the bus never went quiet");
    }

    /// Carries the oldest message on the bus, if there is one.
    fn carry_one(&mut self) -> bool {
        let Some((_, to, bytes)) = self.bus.pop_front() else {
            return false;
        };
        let message = BusMessage::decode(&bytes).unwrap();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let addressed = match to {
                BusTarget::Node(id) => id == node_id(i),
                _ => true,
            };
            if addressed && !self.stopped.contains_key(&i) {
                node.server.handle_bus(message.clone(), node.now);
                node.pump();
            }
        }
        true
    }

    fn collect(&mut self) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            for (to, message) in node.published.drain(..) {
                if self.up && !self.stopped.contains_key(&i) {
                    self.bus.push_back((i, to, message.encode()));
                }
            }
        }
    }

    /// Logs `user` in on node `i`, and lets the bus settle.
    fn login(&mut self, i: usize, user: &str) -> ConnId {
        let conn = self.nodes[i].login(user);
        self.settle();
        conn
    }

    fn logout(&mut self, i: usize, conn: ConnId) {
        self.nodes[i].ok(conn, "logout");
        self.settle();
    }

    /// Time passes on every running node, in small steps, the bus
    /// carrying what they say (heartbeats among it) as it goes.
    fn advance(&mut self, d: Duration) {
        let mut left = d;
        while !left.is_zero() {
            let step = left.min(STEP);
            left -= step;
            for (i, node) in self.nodes.iter_mut().enumerate() {
                if !self.stopped.contains_key(&i) {
                    node.advance(step);
                }
            }
            for (&i, stopped_for) in &mut self.stopped {
                *stopped_for += step;
                let cluster = self.nodes[i].server.config().cluster.as_ref().unwrap();
                if *stopped_for >= cluster.lease {
                    let node = cluster.node;
                    self.sessions.with(|s| s.expired.insert(node));
                }
            }
            self.settle();
        }
    }

    /// Node `i` stops (frozen, or killed): it neither hears nor is heard.
    fn stop(&mut self, i: usize) {
        self.settle();
        self.stopped.insert(i, Duration::ZERO);
    }

    /// Node `i` runs again after a stop: its clock jumps to the others'
    /// at once, as a frozen process's does when it is resumed.
    fn resume(&mut self, i: usize) {
        self.stopped.remove(&i);
        let now = self.nodes[(i + 1) % self.nodes.len()].now;
        let node = &mut self.nodes[i];
        node.now = now;
        node.server.handle_timeout(now);
        node.pump();
        // It beats again in the database (its sessions given up, if the
        // database had given it up, are closed by now).
        let id = node.node();
        self.sessions.with(|s| s.expired.remove(&id));
        self.settle();
    }

    /// Sends `line` on node `i`'s `conn`, lets the bus settle, and returns
    /// every frame `conn` got.
    fn ask(&mut self, i: usize, conn: ConnId, line: &str) -> Vec<ServerFrame> {
        self.nodes[i].take(conn);
        self.nodes[i].send(conn, line);
        self.settle();
        self.nodes[i].take(conn)
    }

    /// Like `ask`, for a line whose answer may wait on a timer (a login's
    /// claim asked again after "elsewhere"): time passes, 100 ms at a time,
    /// until an answer comes, for at most a second.
    fn ask_answered(&mut self, i: usize, conn: ConnId, line: &str) -> Vec<ServerFrame> {
        let mut frames = self.ask(i, conn, line);
        for _ in 0..10 {
            if frames
                .iter()
                .any(|f| matches!(f, ServerFrame::Ok(_) | ServerFrame::Error(_)))
            {
                break;
            }
            self.advance(Duration::from_millis(100));
            frames.extend(self.nodes[i].take(conn));
        }
        frames
    }

    /// The `message` answer: whether it was stored, or the error code.
    fn message(&mut self, i: usize, conn: ConnId, line: &str) -> Result<bool, ErrorCode> {
        let frames = self.ask(i, conn, line);
        match frames.as_slice() {
            [ServerFrame::Ok(ok)] => match &ok.reply {
                Reply::Message { stored, .. } => Ok(*stored),
                other => panic!("{other:?}"),
            },
            [ServerFrame::Error(e)] => Err(e.code),
            other => panic!("{line:?}: {other:?}"),
        }
    }

    /// `whoelse` for `conn` on node `i`.
    fn whoelse(&mut self, i: usize, conn: ConnId) -> Vec<String> {
        match self.nodes[i].ok(conn, "whoelse").reply {
            Reply::Whoelse { users } => names(&users).into_iter().map(str::to_owned).collect(),
            other => panic!("{other:?}"),
        }
    }
}

fn node_id(i: usize) -> NodeId {
    NodeId::from_u128(i as u128 + 1)
}

#[test]
fn users_on_other_nodes_come_and_go_as_on_one_server() {
    let mut c = Cluster::new(3);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    // alice, on another node, is told that bob came.
    assert_eq!(presences(&c.nodes[0].take(alice)), [("bob".into(), true)]);
    let carol = c.login(2, "carol");
    assert_eq!(presences(&c.nodes[0].take(alice)), [("carol".into(), true)]);
    assert_eq!(presences(&c.nodes[1].take(bob)), [("carol".into(), true)]);
    assert_eq!(c.whoelse(0, alice), ["bob", "carol"]);
    assert_eq!(c.whoelse(2, carol), ["alice", "bob"]);

    c.advance(secs(10));
    c.logout(1, bob);
    assert_eq!(presences(&c.nodes[0].take(alice)), [("bob".into(), false)]);
    assert_eq!(presences(&c.nodes[2].take(carol)), [("bob".into(), false)]);
    assert_eq!(c.whoelse(0, alice), ["carol"]);
    // whoelsesince counts bob until the moment his node said he left.
    c.advance(secs(30));
    let since = c.nodes[2].ok(carol, "whoelsesince 40");
    assert!(
        matches!(&since.reply, Reply::Whoelsesince { users } if names(users) == ["alice", "bob"]),
        "{since:?}"
    );
    let since = c.nodes[2].ok(carol, "whoelsesince 20");
    assert!(
        matches!(&since.reply, Reply::Whoelsesince { users } if names(users) == ["alice"]),
        "{since:?}"
    );

    let state = c.nodes[2].server.debug_state(c.nodes[2].now);
    assert_eq!(state.users_online, 1);
    assert_eq!(state.cluster_users_online, Some(2));
    assert_eq!(state.cluster_nodes, Some(3));
}

#[test]
fn a_broadcast_reaches_every_node_and_counts_cluster_wide() {
    let mut c = Cluster::new(3);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    let carol = c.login(2, "carol");
    let dave = c.login(2, "dave");
    // carol (node 2) blocks alice (node 0): every node knows it.
    c.nodes[2].ok(carol, "block alice");
    c.settle();
    for (i, conn) in [(0, alice), (1, bob), (2, carol), (2, dave)] {
        c.nodes[i].take(conn);
    }

    let ok = c.nodes[0].ok(alice, "broadcast hello all");
    c.settle();
    assert_eq!(
        ok.reply,
        Reply::Broadcast {
            delivered: 2,
            skipped: 1
        }
    );
    let got = |c: &mut Cluster, i: usize, conn| {
        c.nodes[i]
            .take(conn)
            .into_iter()
            .filter(|f| matches!(f, ServerFrame::Broadcast(b) if b.text.as_str() == "hello all"))
            .count()
    };
    assert_eq!(got(&mut c, 1, bob), 1);
    assert_eq!(got(&mut c, 2, dave), 1);
    assert_eq!(got(&mut c, 2, carol), 0, "carol blocked alice");
    assert_eq!(got(&mut c, 0, alice), 0, "not to the sender");

    // Unblocked on node 2, known on node 0 too.
    c.nodes[2].ok(carol, "unblock alice");
    c.settle();
    let ok = c.nodes[0].ok(alice, "broadcast again");
    c.settle();
    assert_eq!(
        ok.reply,
        Reply::Broadcast {
            delivered: 3,
            skipped: 0
        }
    );
}

#[test]
fn presence_keeps_the_block_rule_across_nodes() {
    let mut c = Cluster::new(2);
    let bob = c.login(1, "bob");
    let alice = c.login(0, "alice");
    assert_eq!(presences(&c.nodes[1].take(bob)), [("alice".into(), true)]);
    // alice blocks bob: bob is not told when she comes and goes, and does
    // not see her in whoelse, wherever the two are.
    c.nodes[0].ok(alice, "block bob");
    c.settle();
    c.logout(0, alice);
    assert_eq!(presences(&c.nodes[1].take(bob)), []);
    let alice = c.login(0, "alice");
    assert_eq!(presences(&c.nodes[1].take(bob)), []);
    assert_eq!(c.whoelse(1, bob), Vec::<String>::new());
    assert_eq!(c.whoelse(0, alice), ["bob"]);
}

#[test]
fn presence_lost_while_the_bus_was_down_is_repaired_by_rosters() {
    let mut c = Cluster::new(3);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    let carol = c.login(2, "carol");
    c.nodes[0].take(alice);

    c.lose_bus();
    c.logout(1, bob);
    let dave = c.login(2, "dave");
    // Nobody on other nodes heard.
    assert_eq!(presences(&c.nodes[0].take(alice)), []);
    assert_eq!(c.whoelse(0, alice), ["bob", "carol"]);

    c.advance(secs(5));
    c.restore_bus();
    let mut told = presences(&c.nodes[0].take(alice));
    told.sort();
    assert_eq!(told, [("bob".into(), false), ("dave".into(), true)]);
    assert_eq!(c.whoelse(0, alice), ["carol", "dave"]);
    assert_eq!(c.whoelse(2, carol), ["alice", "dave"]);
    let _ = dave;
}

#[test]
fn a_node_given_up_takes_its_users_offline_from_when_it_was_last_alive() {
    let mut c = Cluster::new(3);
    let alice = c.login(0, "alice");
    c.login(1, "bob");
    c.login(1, "carol");
    c.nodes[0].take(alice);
    let last_alive = c.nodes[0].now;
    c.advance(secs(20));

    let now = c.nodes[0].now;
    c.nodes[0]
        .server
        .handle_node_gone(node_id(1), last_alive, now);
    c.nodes[0].pump();
    let mut told = presences(&c.nodes[0].take(alice));
    told.sort();
    assert_eq!(told, [("bob".into(), false), ("carol".into(), false)]);
    assert_eq!(c.whoelse(0, alice), Vec::<String>::new());
    // Offline since it was last known alive, 20 s ago.
    let since = c.nodes[0].ok(alice, "whoelsesince 25");
    assert!(
        matches!(&since.reply, Reply::Whoelsesince { users } if names(users) == ["bob", "carol"])
    );
    let since = c.nodes[0].ok(alice, "whoelsesince 15");
    assert!(matches!(&since.reply, Reply::Whoelsesince { users } if users.is_empty()));
    // Its own id, or an unknown node, changes nothing.
    c.nodes[0].server.handle_node_gone(node_id(0), now, now);
    c.nodes[0].server.handle_node_gone(node_id(9), now, now);
    c.nodes[0].pump();
    assert_eq!(c.nodes[0].take(alice), []);
}

#[test]
fn a_node_not_heard_from_for_a_lease_is_given_up() {
    let mut c = Cluster::new(3);
    let alice = c.login(0, "alice");
    c.login(1, "bob");
    c.login(2, "carol");
    c.nodes[0].take(alice);
    c.advance(secs(3));
    // Node 1 is killed: nobody hears from it again.
    c.stop(1);
    c.advance(secs(9));
    assert_eq!(presences(&c.nodes[0].take(alice)), []);
    assert_eq!(c.whoelse(0, alice), ["bob", "carol"]);
    c.advance(secs(2));
    assert_eq!(presences(&c.nodes[0].take(alice)), [("bob".into(), false)]);
    assert_eq!(c.whoelse(0, alice), ["carol"]);
    assert!(c.nodes[0].events.iter().any(|e| matches!(
        e,
        Event::NodeLost { node, .. } if *node == node_id(1)
    )));
    let state = c.nodes[0].server.debug_state(c.nodes[0].now);
    assert_eq!(state.cluster_nodes, Some(2));
    assert_eq!(state.cluster_users_online, Some(2));
    // whoelsesince counts bob until the node was last heard from, within
    // a heartbeat: 11 s ago, give or take one.
    let since = c.nodes[0].ok(alice, "whoelsesince 12");
    assert!(
        matches!(&since.reply, Reply::Whoelsesince { users } if names(users) == ["bob", "carol"]),
        "{since:?}"
    );
    let since = c.nodes[0].ok(alice, "whoelsesince 9");
    assert!(
        matches!(&since.reply, Reply::Whoelsesince { users } if names(users) == ["carol"]),
        "{since:?}"
    );
}

#[test]
fn a_node_frozen_past_its_lease_closes_its_clients_and_joins_again() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    let carol = c.login(1, "carol");
    c.nodes[0].take(alice);
    // Node 1 freezes past its lease: node 0 gives it up.
    c.stop(1);
    c.advance(secs(12));
    let mut told = presences(&c.nodes[0].take(alice));
    told.sort();
    assert_eq!(told, [("bob".into(), false), ("carol".into(), false)]);
    // bob logs in again on node 0 meanwhile: his session is there now.
    let bob_again = c.login(0, "bob");
    assert_eq!(presences(&c.nodes[0].take(alice)), [("bob".into(), true)]);

    // Node 1 runs again: it must not go on serving sessions the cluster
    // gave up. Every client gets `bye node_expired`, nobody is told of
    // anyone (its users were announced offline long ago), and it joins
    // again with nobody on it.
    c.resume(1);
    for conn in [bob, carol] {
        assert_eq!(c.nodes[1].closed.get(&conn), Some(&ByeReason::NodeExpired));
    }
    assert!(c.nodes[1]
        .events
        .iter()
        .any(|e| matches!(e, Event::NodeExpired { silent_for } if *silent_for >= secs(10))));
    c.advance(secs(2));
    assert_eq!(presences(&c.nodes[0].take(alice)), []);
    assert_eq!(c.whoelse(0, alice), ["bob"]);
    assert_eq!(c.whoelse(0, bob_again), ["alice"]);
    // Back in the cluster: a login there is seen on node 0.
    let carol = c.login(1, "carol");
    assert_eq!(presences(&c.nodes[0].take(alice)), [("carol".into(), true)]);
    assert_eq!(c.whoelse(1, carol), ["alice", "bob"]);
    assert_eq!(
        c.nodes[0].server.debug_state(c.nodes[0].now).cluster_nodes,
        Some(2)
    );
}

#[test]
fn a_bus_outage_longer_than_a_lease_closes_nobody() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    c.lose_bus();
    c.advance(secs(30));
    c.restore_bus();
    c.advance(secs(2));
    assert!(c.nodes[0].closed.is_empty() && c.nodes[1].closed.is_empty());
    assert_eq!(c.whoelse(0, alice), ["bob"]);
    assert_eq!(c.whoelse(1, bob), ["alice"]);
}

#[test]
fn a_presence_message_lost_on_the_way_is_repaired_by_the_next_heartbeat() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    c.nodes[0].take(alice);
    // bob's login on node 1 is published, and lost (a slow consumer
    // dropped it, say), while the bus stays up.
    c.nodes[1].login("bob");
    c.nodes[1].published.clear();
    assert_eq!(c.whoelse(0, alice), Vec::<String>::new());
    // Node 1's next heartbeat counts one user; node 0 knows none there,
    // asks for the roster, and learns of bob.
    c.advance(secs(2));
    assert_eq!(presences(&c.nodes[0].take(alice)), [("bob".into(), true)]);
    assert_eq!(c.whoelse(0, alice), ["bob"]);
}

#[test]
fn a_node_that_shuts_down_is_forgotten_at_once() {
    let mut c = Cluster::new(3);
    let alice = c.login(0, "alice");
    c.login(1, "bob");
    c.login(1, "carol");
    c.nodes[0].take(alice);
    let now = c.nodes[1].now;
    c.nodes[1].server.shutdown(now);
    c.nodes[1].pump();
    c.settle();
    let mut told = presences(&c.nodes[0].take(alice));
    told.sort();
    assert_eq!(told, [("bob".into(), false), ("carol".into(), false)]);
    let state = c.nodes[0].server.debug_state(c.nodes[0].now);
    assert_eq!(state.cluster_nodes, Some(2), "forgotten, not waited for");
    // It says nothing more (a heartbeat would make it alive again), and
    // no lease runs out later for it.
    c.advance(secs(15));
    assert_eq!(c.nodes[1].published, []);
    assert_eq!(
        c.nodes[0].server.debug_state(c.nodes[0].now).cluster_nodes,
        Some(2)
    );
    assert!(!c.nodes[0]
        .events
        .iter()
        .any(|e| matches!(e, Event::NodeLost { .. })));
}

#[test]
fn heartbeats_stop_while_the_bus_is_down_and_start_again_with_it() {
    let mut c = Cluster::new(2);
    let heartbeats = |c: &Cluster| -> Vec<Timer> {
        c.nodes[0]
            .server
            .next_timer()
            .into_iter()
            .map(|(_, timer)| timer)
            .collect()
    };
    assert!(c.nodes[0].server.poll_timeout().is_some());
    c.lose_bus();
    c.advance(secs(3));
    assert!(c.nodes[0]
        .published
        .iter()
        .all(|(_, m)| !matches!(m, BusMessage::Heartbeat { .. })));
    // Without the bus only the other node's lease is left to wait for.
    assert_eq!(heartbeats(&c), [Timer::NodeLease]);
    c.restore_bus();
    c.advance(secs(1));
    assert!(c.nodes[1].server.debug_state(c.nodes[1].now).cluster_nodes == Some(2));
}

#[test]
fn a_node_serving_other_accounts_than_most_knows_it() {
    let mut c = Cluster::with_accounts_digests(&["same", "same", "other"]);
    c.advance(secs(2));
    let agree: Vec<bool> = c
        .nodes
        .iter()
        .map(|node| node.server.cluster_accounts_agree())
        .collect();
    assert_eq!(agree, [true, true, false]);
    // Each node reports the odd one once; the odd one reports both.
    let differ = |node: &chatproto::Event| matches!(node, Event::AccountsDiffer { .. });
    let counts: Vec<usize> = c
        .nodes
        .iter()
        .map(|node| node.events.iter().filter(|e| differ(e)).count())
        .collect();
    assert_eq!(counts, [1, 1, 2]);
    // With the odd node gone, all agree; two that disagree alone cannot
    // tell which is right, so neither is.
    c.stop(2);
    c.advance(secs(11));
    assert!(c.nodes[0].server.cluster_accounts_agree());
    let mut pair = Cluster::with_accounts_digests(&["a", "b"]);
    pair.advance(secs(2));
    assert!(!pair.nodes[0].server.cluster_accounts_agree());
    assert!(!pair.nodes[1].server.cluster_accounts_agree());
}

/// The texts of the direct messages among `frames`, each with whether it
/// came from the offline queue.
fn messages(frames: &[ServerFrame]) -> Vec<(String, bool)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message(m) => Some((m.text.as_str().to_owned(), m.offline)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_direct_message_reaches_a_user_on_another_node_at_once() {
    let mut c = Cluster::new(3);
    let alice = c.login(0, "alice");
    let bob = c.login(2, "bob");
    c.nodes[2].take(bob);
    // The answer waits for bob's node; what alice sends meanwhile waits
    // behind it (answers keep request order).
    c.nodes[0].take(alice);
    c.nodes[0].send(alice, "message bob one");
    c.nodes[0].send(alice, "whoami");
    assert_eq!(
        c.nodes[0].take(alice),
        [],
        "nothing before bob's node answers"
    );
    c.settle();
    let frames = c.nodes[0].take(alice);
    let replies: Vec<&Reply> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Ok(ok) => Some(&ok.reply),
            _ => None,
        })
        .collect();
    assert!(
        matches!(
            replies.as_slice(),
            [Reply::Message { stored: false, .. }, Reply::Whoami { .. }]
        ),
        "{frames:?}"
    );
    for i in 2..=4 {
        assert_eq!(c.message(0, alice, &format!("message bob m{i}")), Ok(false));
    }
    let got = messages(&c.nodes[2].take(bob));
    let want: Vec<(String, bool)> = ["one", "m2", "m3", "m4"]
        .iter()
        .map(|t| (t.to_string(), false))
        .collect();
    assert_eq!(got, want, "each once, in order");
    // And back.
    assert_eq!(c.message(2, bob, "message alice hi"), Ok(false));
    assert_eq!(
        messages(&c.nodes[0].take(alice)),
        [("hi".to_owned(), false)]
    );
}

#[test]
fn a_block_on_the_recipients_node_is_honoured() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    c.nodes[1].ok(bob, "block alice");
    c.settle();
    assert_eq!(
        c.message(0, alice, "message bob hi"),
        Err(ErrorCode::Blocked)
    );
    // Even when node 0 has not heard of the block yet (its message lost),
    // bob's node refuses it.
    c.nodes[1].ok(bob, "unblock alice");
    c.settle();
    c.nodes[1].ok(bob, "block alice");
    c.nodes[1].published.clear();
    assert_eq!(
        c.message(0, alice, "message bob hi"),
        Err(ErrorCode::Blocked)
    );
    assert_eq!(messages(&c.nodes[1].take(bob)), []);
}

#[test]
fn a_recipient_who_left_meanwhile_gets_the_message_stored() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    // bob logs out on node 1, and node 0 has not heard (the message is
    // lost): node 1 answers that he is not there, and node 0 stores it.
    c.nodes[1].ok(bob, "logout");
    c.nodes[1].published.clear();
    assert_eq!(c.message(0, alice, "message bob later"), Ok(true));
    c.advance(secs(2));
    // He gets it at his next login on node 0, from the queue.
    let bob = c.nodes[0].connect();
    let password = USERS.iter().find(|(n, _)| *n == "bob").unwrap().1;
    c.nodes[0].send(bob, &format!("login bob {password}"));
    let frames = c.nodes[0].take(bob);
    assert_eq!(
        messages(&frames),
        [("later".to_owned(), true)],
        "{frames:?}"
    );
}

#[test]
fn with_no_answer_the_message_is_sent_again_and_delivered_once() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    c.nodes[1].take(bob);
    c.nodes[0].take(alice);
    // Node 1 delivers, but its answer is lost on the way.
    c.nodes[0].send(alice, "message bob once");
    c.collect();
    c.carry_one();
    assert_eq!(
        messages(&c.nodes[1].take(bob)),
        [("once".to_owned(), false)]
    );
    c.nodes[1].published.clear();
    assert_eq!(c.nodes[0].take(alice), []);
    // After the route timeout node 0 sends it again; node 1 knows the
    // route, answers again, and does not deliver it twice.
    c.advance(secs(2));
    assert_eq!(messages(&c.nodes[1].take(bob)), []);
    let frames = c.nodes[0].take(alice);
    assert!(
        matches!(frames.as_slice(), [ServerFrame::Ok(ok)] if ok.reply == Reply::Message { to: "bob".parse().unwrap(), stored: false }),
        "{frames:?}"
    );
}

#[test]
fn with_no_answer_at_all_the_message_is_stored() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    c.login(1, "bob");
    assert_eq!(c.message(0, alice, "message bob once"), Ok(false));
    // Node 1 is gone without a word: no answer ever comes. After the
    // route timeout the message is sent again, then stored.
    c.stop(1);
    c.nodes[0].take(alice);
    c.nodes[0].send(alice, "message bob twice");
    assert_eq!(c.nodes[0].take(alice), []);
    c.advance(secs(2));
    assert_eq!(c.nodes[0].take(alice), [], "sent again, still waiting");
    c.advance(secs(2));
    let frames = c.nodes[0].take(alice);
    assert!(
        matches!(frames.as_slice(), [ServerFrame::Ok(ok)] if ok.reply == Reply::Message { to: "bob".parse().unwrap(), stored: true }),
        "{frames:?}"
    );
}

#[test]
fn while_the_bus_is_down_a_message_to_another_node_is_stored() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    c.login(1, "bob");
    c.lose_bus();
    assert_eq!(c.message(0, alice, "message bob hi"), Ok(true));
}

#[test]
fn a_server_alone_ignores_the_bus_and_publishes_nothing() {
    let mut sim = Sim::new();
    let alice = sim.login("alice");
    sim.server.handle_bus_restored(sim.now);
    let message = BusMessage::decode(
        br#"{"v":1,"kind":"online","node":"00000000-0000-0000-0000-000000000002","user":"bob"}"#,
    )
    .unwrap();
    sim.server.handle_bus(message, sim.now);
    sim.pump();
    assert!(sim.published.is_empty());
    assert_eq!(sim.take(alice), []);
    let state = sim.server.debug_state(sim.now);
    assert_eq!(
        (state.cluster_nodes, state.cluster_users_online),
        (None, None)
    );
}

#[test]
fn bus_messages_carry_their_version_and_others_are_refused() {
    let message = BusMessage::Offline {
        node: node_id(0),
        user: "alice".parse().unwrap(),
        at: chatproto::Timestamp::from_unix_millis(5),
    };
    let bytes = message.encode();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["v"], BUS_VERSION);
    assert_eq!(json["kind"], "offline");
    assert_eq!(BusMessage::decode(&bytes).unwrap(), message);

    let next = String::from_utf8(bytes.to_vec())
        .unwrap()
        .replace("\"v\":1", "\"v\":2");
    assert_eq!(
        BusMessage::decode(next.as_bytes()),
        Err(BusDecodeError::UnknownVersion(2))
    );
    for bad in [
        &b"not json"[..],
        b"[]",
        br#"{"kind":"offline"}"#,
        br#"{"v":"one","kind":"offline"}"#,
        br#"{"v":1,"kind":"teleport","node":"00000000-0000-0000-0000-000000000001"}"#,
        br#"{"v":1,"kind":"online","node":"00000000-0000-0000-0000-000000000001","user":"not a name!"}"#,
    ] {
        assert!(
            matches!(BusMessage::decode(bad), Err(BusDecodeError::Malformed(_))),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn one_bus_payload_carries_many_messages_and_a_bad_one_costs_only_itself() {
    let node = node_id(0);
    let messages = [
        BusMessage::RosterWanted { node },
        BusMessage::Offline {
            node,
            user: "alice".parse().unwrap(),
            at: chatproto::Timestamp::from_unix_millis(5),
        },
    ];
    let mut payload = Vec::new();
    messages[0].encode_into(&mut payload);
    payload.extend_from_slice(b"\n{\"v\":1,\"kind\":\"teleport\"}\n\n");
    messages[1].encode_into(&mut payload);
    let decoded: Vec<_> = BusMessage::decode_all(&payload).collect();
    assert_eq!(decoded.len(), 3, "{decoded:?}");
    assert_eq!(decoded[0], Ok(messages[0].clone()));
    assert!(matches!(decoded[1], Err(BusDecodeError::Malformed(_))));
    assert_eq!(decoded[2], Ok(messages[1].clone()));
    // A payload of one message is what `encode` makes.
    assert_eq!(
        BusMessage::decode_all(&messages[1].encode()).collect::<Vec<_>>(),
        [Ok(messages[1].clone())]
    );
    assert_eq!(BusMessage::decode_all(b"").count(), 0);
}

/// What a schedule does.
#[derive(Clone, Debug)]
enum Op {
    /// A mover logs in on a node (if offline everywhere).
    Login {
        user: usize,
        node: usize,
    },
    /// A mover logs out (if online).
    Logout {
        user: usize,
    },
    /// The bus loses what is published from now on.
    BusDown,
    /// The bus is back.
    BusUp,
    Advance {
        secs: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3usize).prop_map(|(user, node)| Op::Login { user, node }),
        3 => (0..3usize).prop_map(|user| Op::Logout { user }),
        1 => Just(Op::BusDown),
        1 => Just(Op::BusUp),
        1 => (1..30u64).prop_map(|secs| Op::Advance { secs }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// However the bus loses messages, once it is back every node sees
    /// exactly who is online, and each of its users heard presence frames
    /// that end in the truth.
    #[test]
    fn presence_converges_once_the_bus_is_back(ops in prop::collection::vec(op(), 1..40)) {
        const MOVERS: [&str; 3] = ["alice", "bob", "carol"];
        const WATCHERS: [&str; 3] = ["dave", "eve", "root"];
        let mut c = Cluster::new(3);
        let watchers: Vec<ConnId> = (0..3).map(|i| c.login(i, WATCHERS[i])).collect();
        let mut heard: Vec<std::collections::HashMap<String, bool>> = vec![Default::default(); 3];
        let mut online: Vec<Option<(usize, ConnId)>> = vec![None; 3];
        for op in ops {
            match op {
                Op::Login { user, node } if online[user].is_none() => {
                    online[user] = Some((node, c.login(node, MOVERS[user])));
                }
                Op::Logout { user } => {
                    if let Some((node, conn)) = online[user].take() {
                        c.logout(node, conn);
                    }
                }
                Op::BusDown => c.lose_bus(),
                Op::BusUp => c.restore_bus(),
                Op::Advance { secs: s } => c.advance(secs(s)),
                Op::Login { .. } => {}
            }
            for i in 0..3 {
                for (user, up) in presences(&c.nodes[i].take(watchers[i])) {
                    heard[i].insert(user, up);
                }
            }
        }
        c.restore_bus();
        for i in 0..3 {
            for (user, up) in presences(&c.nodes[i].take(watchers[i])) {
                heard[i].insert(user, up);
            }
        }
        for i in 0..3 {
            let truth: BTreeSet<String> = MOVERS
                .iter()
                .zip(&online)
                .filter(|(_, at)| at.is_some())
                .map(|(u, _)| u.to_string())
                .chain(WATCHERS.iter().filter(|w| **w != WATCHERS[i]).map(|w| w.to_string()))
                .collect();
            let seen: BTreeSet<String> = c.whoelse(i, watchers[i]).into_iter().collect();
            prop_assert_eq!(&seen, &truth, "node {}'s whoelse", i);
            for user in MOVERS {
                let last = heard[i].get(user).copied().unwrap_or(false);
                prop_assert_eq!(last, truth.contains(user), "node {}: last presence of {}", i, user);
            }
        }
    }
}

/// A step of a schedule of logins racing for sessions.
#[derive(Debug, Clone)]
enum Race {
    /// A connection on a node sends a user's login (its claim waits).
    Try {
        user: usize,
        node: usize,
    },
    /// A node's waiting claims are answered, in the order asked.
    Answer {
        node: usize,
    },
    /// A node's connection logs out (or sends `logout` unanswered).
    Leave {
        node: usize,
        pick: usize,
    },
    /// The database is away, or back.
    DatabaseDown,
    DatabaseUp,
}

fn race() -> impl Strategy<Value = Race> {
    prop_oneof![
        4 => (0..3usize, 0..3usize).prop_map(|(user, node)| Race::Try { user, node }),
        3 => (0..3usize).prop_map(|node| Race::Answer { node }),
        2 => (0..3usize, 0..8usize).prop_map(|(node, pick)| Race::Leave { node, pick }),
        1 => Just(Race::DatabaseDown),
        1 => Just(Race::DatabaseUp),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// However logins race across nodes, their claims are answered and
    /// the database comes and goes, no user is ever logged in twice in the
    /// cluster, and a user nobody holds can always log in.
    #[test]
    fn a_user_is_never_logged_in_twice(ops in prop::collection::vec(race(), 1..60)) {
        const USERS3: [&str; 3] = ["alice", "bob", "carol"];
        let mut c = Cluster::new(3);
        for node in &mut c.nodes {
            node.hold_claims = true;
        }
        let mut conns: Vec<Vec<ConnId>> = vec![Vec::new(); 3];
        for op in ops {
            match op {
                Race::Try { user, node } => {
                    let conn = c.nodes[node].connect();
                    c.nodes[node].send(conn, &login_line(USERS3[user]));
                    conns[node].push(conn);
                }
                Race::Answer { node } => c.nodes[node].answer_claims(),
                Race::Leave { node, pick } if !conns[node].is_empty() => {
                    let at = pick % conns[node].len();
                    let conn = conns[node].remove(at);
                    if c.nodes[node].server.is_open(conn) {
                        c.nodes[node].disconnect(conn);
                    }
                }
                Race::Leave { .. } => {}
                Race::DatabaseDown => c.sessions.with(|s| s.down = true),
                Race::DatabaseUp => c.sessions.restore(),
            }
            c.settle();
            for user in USERS3 {
                let holders: Vec<(usize, ConnId)> = (0..3)
                    .flat_map(|i| conns[i].iter().map(move |&conn| (i, conn)))
                    .filter(|&(i, conn)| {
                        c.nodes[i].server.user(conn).map(|u| u.as_str()) == Some(user)
                    })
                    .collect();
                prop_assert!(holders.len() <= 1, "{} on {:?}", user, holders);
            }
        }
        // Everyone leaves and the database is back: each user logs in
        // anywhere.
        c.sessions.restore();
        for (i, node) in c.nodes.iter_mut().enumerate() {
            node.answer_claims();
            for conn in conns[i].drain(..) {
                if node.server.is_open(conn) {
                    node.disconnect(conn);
                }
            }
            node.hold_claims = false;
        }
        for (i, user) in USERS3.iter().enumerate() {
            c.login(i, user);
        }
    }
}

/// The password line of `user`'s login.
fn login_line(user: &str) -> String {
    let password = USERS.iter().find(|(n, _)| *n == user).unwrap().1;
    format!("login {user} {password}")
}

/// The error code among `frames`, if one is there.
fn error_code(frames: &[ServerFrame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        ServerFrame::Error(e) => Some(e.code),
        _ => None,
    })
}

/// Whether `frames` hold a login's `ok`.
fn logged_in(frames: &[ServerFrame]) -> bool {
    frames
        .iter()
        .any(|f| matches!(f, ServerFrame::Ok(ok) if matches!(ok.reply, Reply::Login { .. })))
}

#[test]
fn a_user_has_one_session_in_the_whole_cluster() {
    let mut c = Cluster::new(3);
    let alice = c.login(0, "alice");
    for i in [1, 2, 0] {
        let conn = c.nodes[i].connect();
        let frames = c.ask_answered(i, conn, &login_line("alice"));
        assert_eq!(
            error_code(&frames),
            Some(ErrorCode::SessionElsewhere),
            "node {i}"
        );
    }
    // Once she has left, any node takes her.
    c.logout(0, alice);
    let conn = c.nodes[2].connect();
    assert!(logged_in(&c.ask(2, conn, &login_line("alice"))));
    assert_eq!(c.sessions.with(|s| s.rows.len()), 1);
    c.nodes[2].disconnect(conn);
    assert_eq!(
        c.sessions.with(|s| s.rows.len()),
        0,
        "given back at disconnect"
    );
}

#[test]
fn of_two_logins_at_once_on_two_nodes_exactly_one_gets_in() {
    let mut c = Cluster::new(2);
    for node in &mut c.nodes {
        node.hold_claims = true;
    }
    let a = c.nodes[0].connect();
    let b = c.nodes[1].connect();
    c.nodes[0].send(a, &login_line("bob"));
    c.nodes[1].send(b, &login_line("bob"));
    // Both passwords are right; the claims race in the database, and the
    // one it serves first wins, whatever the order of the answers.
    assert_eq!(c.nodes[0].claims.len(), 1);
    assert_eq!(c.nodes[1].claims.len(), 1);
    // Later input waits behind the claim.
    c.nodes[0].send(a, "whoami");
    let early = c.nodes[0].take(a);
    assert!(
        early.iter().all(|f| matches!(f, ServerFrame::Hello { .. })),
        "{early:?}"
    );
    c.nodes[1].answer_claims();
    c.nodes[0].answer_claims();
    c.settle();
    // The loser is asked again twice (the winner might have been on its
    // way out) before `session_elsewhere`.
    for _ in 0..3 {
        c.advance(Duration::from_millis(150));
        for node in &mut c.nodes {
            node.answer_claims();
        }
        c.settle();
    }
    let frames_a = c.nodes[0].take(a);
    let frames_b = c.nodes[1].take(b);
    assert!(logged_in(&frames_b), "{frames_b:?}");
    assert_eq!(error_code(&frames_a), Some(ErrorCode::SessionElsewhere));
    // The `whoami` sent behind the claim is answered after it.
    assert!(
        matches!(frames_a.last(), Some(ServerFrame::Error(e)) if e.code == ErrorCode::NotLoggedIn),
        "{frames_a:?}"
    );
}

#[test]
fn a_second_login_on_the_same_node_while_the_first_is_claimed_is_refused() {
    let mut c = Cluster::new(2);
    c.nodes[0].hold_claims = true;
    let a = c.nodes[0].connect();
    let b = c.nodes[0].connect();
    c.nodes[0].send(a, &login_line("carol"));
    c.nodes[0].send(b, &login_line("carol"));
    assert_eq!(
        error_code(&c.nodes[0].take(b)),
        Some(ErrorCode::SessionElsewhere)
    );
    c.nodes[0].answer_claims();
    assert!(logged_in(&c.nodes[0].take(a)));
}

#[test]
fn a_session_claimed_for_a_connection_gone_meanwhile_is_given_back() {
    let mut c = Cluster::new(2);
    c.nodes[0].hold_claims = true;
    let a = c.nodes[0].connect();
    c.nodes[0].send(a, &login_line("dave"));
    c.nodes[0].disconnect(a);
    c.nodes[0].answer_claims();
    assert_eq!(c.sessions.with(|s| s.rows.len()), 0);
    c.login(1, "dave");
}

#[test]
fn a_dead_nodes_users_log_in_elsewhere_once_its_lease_runs_out() {
    let mut c = Cluster::new(2);
    c.login(1, "bob");
    c.stop(1); // killed
    let conn = c.nodes[0].connect();
    assert_eq!(
        error_code(&c.ask_answered(0, conn, &login_line("bob"))),
        Some(ErrorCode::SessionElsewhere),
        "node 1 may still be alive"
    );
    c.advance(secs(10));
    assert!(logged_in(&c.ask(0, conn, &login_line("bob"))));
}

#[test]
fn while_the_database_is_away_a_login_is_unavailable_and_a_release_waits() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    c.sessions.with(|s| s.down = true);
    let conn = c.nodes[1].connect();
    assert_eq!(
        error_code(&c.ask(1, conn, &login_line("bob"))),
        Some(ErrorCode::Unavailable)
    );
    // alice leaves while it is away: her session is given back when it is
    // back, and she can log in on the other node then.
    c.logout(0, alice);
    c.sessions.restore();
    assert!(logged_in(&c.ask(1, conn, &login_line("alice"))));
}

#[test]
fn a_release_that_comes_late_never_removes_a_newer_session() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    c.sessions.with(|s| s.down = true);
    c.logout(0, alice); // its release waits for the database
    c.sessions.with(|s| s.down = false);
    // She logs in again on the same node: its new claim takes the row
    // over from its old one.
    let again = c.login(0, "alice");
    c.sessions.restore(); // the old release, late: it names the old claim
    let conn = c.nodes[1].connect();
    assert_eq!(
        error_code(&c.ask_answered(1, conn, &login_line("alice"))),
        Some(ErrorCode::SessionElsewhere)
    );
    assert!(c.nodes[0].server.is_open(again));
}

#[test]
fn a_node_told_by_the_database_that_its_sessions_were_taken_closes_its_clients() {
    let mut c = Cluster::new(2);
    let bob = c.login(1, "bob");
    // Node 1 lost the database past its lease while the bus stayed up (so
    // it saw no silence of its own); node 0 took bob's session meanwhile.
    c.sessions.with(|s| s.expired.insert(node_id(1)));
    c.login(0, "bob");
    let now = c.nodes[1].now;
    c.nodes[1].server.handle_node_expired(secs(12), now);
    c.nodes[1].pump();
    assert_eq!(c.nodes[1].closed.get(&bob), Some(&ByeReason::NodeExpired));
    assert!(c.nodes[1]
        .events
        .iter()
        .any(|e| matches!(e, Event::NodeExpired { silent_for } if *silent_for == secs(12))));
}

#[test]
fn after_closing_its_clients_itself_a_node_keeps_the_sessions_made_since() {
    let mut c = Cluster::new(2);
    c.login(1, "bob");
    c.stop(1);
    c.advance(secs(12));
    c.resume(1); // finds its own silence: closes bob
    let carol = c.login(1, "carol");
    // The database's heartbeat answer comes after: the silence it speaks
    // of was dealt with, and carol's session is newer than it.
    let now = c.nodes[1].now;
    c.nodes[1].server.handle_node_expired(secs(12), now);
    c.nodes[1].pump();
    assert!(c.nodes[1].server.is_open(carol));
}

#[test]
fn failed_logins_on_every_node_count_toward_one_lockout() {
    let mut c = Cluster::new(3);
    // Three wrong passwords, one on each node: the third locks the name
    // everywhere, and a right password then gets `account_locked`.
    for i in 0..3 {
        let conn = c.nodes[i].connect();
        let frames = c.ask(i, conn, "login alice wrong");
        let want = if i < 2 {
            ErrorCode::InvalidCredentials
        } else {
            ErrorCode::AccountLocked
        };
        assert_eq!(error_code(&frames), Some(want), "node {i}");
    }
    for i in 0..3 {
        let conn = c.nodes[i].connect();
        let frames = c.ask(i, conn, &login_line("alice"));
        assert_eq!(
            error_code(&frames),
            Some(ErrorCode::AccountLocked),
            "node {i}"
        );
    }
    // The same for a name with no account: nothing tells them apart.
    for i in 0..3 {
        let conn = c.nodes[i].connect();
        let want = if i < 2 {
            ErrorCode::InvalidCredentials
        } else {
            ErrorCode::AccountLocked
        };
        assert_eq!(error_code(&c.ask(i, conn, "login nobody x")), Some(want));
    }
}

#[test]
fn a_login_on_one_node_clears_the_count_on_every_node() {
    let mut c = Cluster::new(3);
    for _ in 0..2 {
        let conn = c.nodes[0].connect();
        c.ask(0, conn, "login bob wrong");
    }
    let bob = c.login(1, "bob");
    c.logout(1, bob);
    for _ in 0..2 {
        let conn = c.nodes[2].connect();
        let frames = c.ask(2, conn, "login bob wrong");
        assert_eq!(error_code(&frames), Some(ErrorCode::InvalidCredentials));
    }
    c.login(0, "bob");
}

#[test]
fn the_login_limit_per_name_holds_across_nodes() {
    let mut c = Cluster::with_config(&["", "", ""], |config| {
        config.login_rate_per_name = Some(chatproto::Rate {
            burst: 3,
            per_second: 1,
        });
        config.lockout.max_failures = 100;
    });
    // Three attempts, one a node, spend the name's burst everywhere.
    for i in 0..3 {
        let conn = c.nodes[i].connect();
        let frames = c.ask(i, conn, "login carol wrong");
        assert_eq!(error_code(&frames), Some(ErrorCode::InvalidCredentials));
    }
    for i in 0..3 {
        let conn = c.nodes[i].connect();
        let frames = c.ask(i, conn, &login_line("carol"));
        assert_eq!(
            error_code(&frames),
            Some(ErrorCode::RateLimited),
            "node {i}"
        );
    }
}

/// The texts of `conn`'s offline messages among `frames`.
fn offline_texts(frames: &[ServerFrame]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message(m) if m.offline => Some(m.text.as_str().to_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_message_stored_by_one_node_is_delivered_at_a_login_on_another() {
    let mut c = Cluster::new(3);
    let alice = c.login(0, "alice");
    for i in 0..3 {
        assert_eq!(c.message(0, alice, &format!("message bob m{i}")), Ok(true));
    }
    let bob = c.nodes[1].connect();
    let frames = c.ask(1, bob, &login_line("bob"));
    assert!(logged_in(&frames));
    assert_eq!(offline_texts(&frames), ["m0", "m1", "m2"]);
    assert!(c.sessions.with(|s| s.queues.values().all(Vec::is_empty)));
    // Delivered once: a later login anywhere gets nothing more.
    c.logout(1, bob);
    let bob = c.nodes[2].connect();
    let frames = c.ask(2, bob, &login_line("bob"));
    assert!(logged_in(&frames));
    assert_eq!(offline_texts(&frames), Vec::<String>::new());
}

#[test]
fn a_message_queued_on_the_login_node_while_its_claim_waits_is_not_missed() {
    let mut c = Cluster::new(2);
    let carol = c.login(1, "carol");
    c.nodes[1].hold_claims = true;
    let bob = c.nodes[1].connect();
    c.nodes[1].send(bob, &login_line("bob"));
    // bob is not online yet: carol's message is stored, on his node.
    assert_eq!(c.message(1, carol, "message bob early"), Ok(true));
    c.nodes[1].hold_claims = false;
    c.nodes[1].answer_claims();
    c.settle();
    let frames = c.nodes[1].take(bob);
    assert!(logged_in(&frames), "{frames:?}");
    assert_eq!(offline_texts(&frames), ["early"]);
}

#[test]
fn a_login_undone_by_a_failed_batch_gives_its_session_back() {
    let mut c = Cluster::new(2);
    c.nodes[0].auto_commit = false;
    let conn = c.nodes[0].connect();
    c.nodes[0].send(conn, &login_line("alice"));
    c.settle();
    // The claim succeeded; the batch with the login fails.
    while !c.nodes[0].batches.is_empty() {
        let login = c.nodes[0].batches[0]
            .1
            .iter()
            .any(|change| matches!(change, chatproto::Change::LoggedIn { .. }));
        let outcome = if login {
            chatproto::Persisted::Failed
        } else {
            chatproto::Persisted::Committed
        };
        c.nodes[0].answer_batch(outcome);
    }
    assert_eq!(
        error_code(&c.nodes[0].take(conn)),
        Some(ErrorCode::Unavailable)
    );
    assert_eq!(c.sessions.with(|s| s.rows.len()), 0, "given back");
    c.nodes[0].auto_commit = true;
    c.login(1, "alice");
}

#[test]
fn a_failed_claim_is_given_back_in_case_it_was_written() {
    let mut c = Cluster::new(2);
    c.nodes[0].hold_claims = true;
    let conn = c.nodes[0].connect();
    c.nodes[0].send(conn, &login_line("bob"));
    // The database wrote the claim but the answer was lost with the
    // connection: the node hears "failed".
    let (claim, user) = c.nodes[0].claims.pop().unwrap();
    let node = c.nodes[0].node();
    c.sessions.claim(node, &user, claim);
    let now = c.nodes[0].now;
    c.nodes[0]
        .server
        .handle_claim(claim, chatproto::ClaimOutcome::Failed, now);
    c.nodes[0].pump();
    assert_eq!(
        error_code(&c.nodes[0].take(conn)),
        Some(ErrorCode::Unavailable)
    );
    assert_eq!(c.sessions.with(|s| s.rows.len()), 0);
    c.login(1, "bob");
}

#[test]
fn a_node_the_database_gave_up_claims_nothing_until_told() {
    let mut c = Cluster::new(2);
    c.login(1, "bob");
    c.stop(1);
    c.advance(secs(12));
    c.resume(1); // closes bob itself
                 // Its row is still marked expired (its heartbeat has not got through
                 // yet): a login there is refused, rather than claimed on a node the
                 // others may take it from.
    c.sessions.with(|s| s.expired.insert(node_id(1)));
    let carol = c.nodes[1].connect();
    assert_eq!(
        error_code(&c.ask(1, carol, &login_line("carol"))),
        Some(ErrorCode::Unavailable)
    );
    // The heartbeat gets through: told, it has nobody to close, and its
    // logins work again.
    let now = c.nodes[1].now;
    c.nodes[1].server.handle_node_expired(secs(13), now);
    c.sessions.with(|s| s.expired.remove(&node_id(1)));
    assert!(logged_in(&c.ask(1, carol, &login_line("carol"))));
    let elsewhere = c.nodes[0].connect();
    assert_eq!(
        error_code(&c.ask_answered(0, elsewhere, &login_line("carol"))),
        Some(ErrorCode::SessionElsewhere)
    );
}

#[test]
fn a_block_or_login_undone_by_a_failed_batch_is_undone_on_every_node() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    c.nodes[0].auto_commit = false;
    c.nodes[0].send(alice, "block bob");
    c.settle(); // the other node heard of the block at once
    c.nodes[0].answer_batch(chatproto::Persisted::Failed);
    c.settle();
    assert_eq!(
        error_code(&c.nodes[0].take(alice)),
        Some(ErrorCode::Unavailable)
    );
    // Not blocked after all, on either node.
    c.nodes[1].take(bob);
    assert_eq!(c.message(1, bob, "message alice hi"), Ok(false));

    // A login whose batch fails: the other node is told it went offline.
    let carol = c.nodes[0].connect();
    c.nodes[0].send(carol, &login_line("carol"));
    c.settle();
    while !c.nodes[0].batches.is_empty() {
        c.nodes[0].answer_batch(chatproto::Persisted::Failed);
    }
    c.settle();
    assert_eq!(c.whoelse(1, bob), ["alice"]);
}

/// Whether `frames` hold a `message` answer, and whether it was stored,
/// in the order they came.
fn message_answers(frames: &[ServerFrame]) -> Vec<Result<bool, ErrorCode>> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Ok(ok) => match &ok.reply {
                Reply::Message { stored, .. } => Some(Ok(*stored)),
                _ => None,
            },
            ServerFrame::Error(e) => Some(Err(e.code)),
            _ => None,
        })
        .collect()
}

#[test]
fn several_messages_go_across_at_once_and_are_answered_in_order() {
    let mut c = Cluster::new(3);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    let carol = c.login(2, "carol");
    c.nodes[0].take(alice);
    c.nodes[1].take(bob);
    // Node 1 is slow (frozen for a moment): carol's answer comes first,
    // but is given after bob's.
    c.stop(1);
    c.nodes[0].send(
        alice,
        "message bob one\nmessage carol two\nwhoami\nmessage bob three",
    );
    // Both messages before the `whoami` left at once; the `whoami` and
    // what follows it wait for their answers.
    let sent = c.nodes[0]
        .published
        .iter()
        .filter(|(_, m)| matches!(m, BusMessage::Deliver { .. }))
        .count();
    assert_eq!(sent, 2);
    c.settle();
    let early = c.nodes[0].take(alice);
    assert_eq!(message_answers(&early), []);
    c.resume(1);
    c.advance(secs(3)); // bob's was lost to the stop: sent again
    let frames = c.nodes[0].take(alice);
    let kinds: Vec<&str> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Ok(ok) => Some(match ok.reply {
                Reply::Message { .. } => "message",
                Reply::Whoami { .. } => "whoami",
                _ => "other",
            }),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["message", "message", "whoami", "message"]);
    assert_eq!(message_answers(&frames), [Ok(false), Ok(false), Ok(false)]);
    let texts = |frames: Vec<ServerFrame>| -> Vec<String> {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Message(m) => Some(m.text.as_str().to_owned()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(texts(c.nodes[1].take(bob)), ["one", "three"]);
    assert_eq!(texts(c.nodes[2].take(carol)), ["two"]);
}

#[test]
fn a_message_turned_away_turns_away_the_next_one_already_on_its_way() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    // bob leaves, but node 0 does not hear of it (the notice is lost).
    c.nodes[1].ok(bob, "logout");
    c.nodes[1].published.clear();
    c.nodes[0].take(alice);
    // Node 1 turns the first message away (twice): node 0 stores it.
    assert_eq!(c.message(0, alice, "message bob first"), Ok(true));
    // bob logs in there again at once; the next message, sent before
    // node 0 could know, is turned away too rather than overtake the
    // first, which waits in his queue.
    let bob = c.nodes[1].connect();
    c.nodes[1].send(bob, &login_line("bob"));
    assert_eq!(c.message(0, alice, "message bob second"), Ok(true));
    // He got the first at that login, and the second once node 0 had
    // stored it and said so (`Queued`): in order, each once.
    assert_eq!(offline_texts(&c.nodes[1].take(bob)), ["first", "second"]);
    c.nodes[1].ok(bob, "logout");
    c.settle();
    let again = c.nodes[1].connect();
    let frames = c.ask(1, again, &login_line("bob"));
    assert_eq!(offline_texts(&frames), Vec::<String>::new());
}

/// Sends alice's "message bob one\nmessage carol two" from node 0 with
/// carol gone from node 2 unbeknown to node 0, holding node 0's batches:
/// carol's is answered (stored) while bob's answer is still on its way.
fn a_stored_answer_behind_another(c: &mut Cluster) -> ConnId {
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    let carol = c.login(2, "carol");
    c.nodes[2].ok(carol, "logout");
    c.nodes[2].published.clear(); // node 0 does not hear of it
    c.settle();
    c.nodes[0].take(alice);
    c.nodes[1].take(bob);
    c.nodes[0].auto_commit = false;
    c.nodes[0].send(alice, "message bob one\nmessage carol two");
    c.collect();
    let to_bob = c
        .bus
        .iter()
        .position(|(_, to, _)| *to == BusTarget::Node(node_id(1)))
        .unwrap();
    let slow = c.bus.remove(to_bob).unwrap();
    c.settle();
    assert_eq!(message_answers(&c.nodes[0].take(alice)), []);
    c.bus.push_back(slow);
    c.settle();
    assert_eq!(c.nodes[1].take(bob).len(), 1, "bob got his");
    alice
}

#[test]
fn a_stored_answer_behind_another_waits_for_its_batch() {
    let mut c = Cluster::new(3);
    let alice = a_stored_answer_behind_another(&mut c);
    assert_eq!(
        c.nodes[0].batches.len(),
        1,
        "carol's message not durable yet"
    );
    assert_eq!(message_answers(&c.nodes[0].take(alice)), [Ok(false)]);
    c.nodes[0].answer_batch(chatproto::Persisted::Committed);
    c.settle();
    assert_eq!(message_answers(&c.nodes[0].take(alice)), [Ok(true)]);
}

#[test]
fn a_stored_answer_whose_batch_fails_is_unavailable_and_nothing_is_kept() {
    let mut c = Cluster::new(3);
    let alice = a_stored_answer_behind_another(&mut c);
    c.nodes[0].answer_batch(chatproto::Persisted::Failed);
    c.settle();
    assert_eq!(
        message_answers(&c.nodes[0].take(alice)),
        [Ok(false), Err(ErrorCode::Unavailable)]
    );
    c.nodes[0].auto_commit = true;
    let carol = c.nodes[2].connect();
    let frames = c.ask(2, carol, &login_line("carol"));
    assert!(logged_in(&frames));
    assert_eq!(offline_texts(&frames), Vec::<String>::new());
}

#[test]
fn a_turned_away_sender_still_learns_of_a_block() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    c.nodes[1].ok(bob, "logout");
    c.nodes[1].published.clear(); // node 0 does not hear of it
    c.nodes[0].take(alice);
    assert_eq!(c.message(0, alice, "message bob first"), Ok(true));
    let bob = c.nodes[1].connect();
    c.nodes[1].send(bob, &login_line("bob"));
    c.settle();
    // bob blocks alice; node 1 turned alice away a moment ago. Once the
    // block has reached node 0, alice's messages are refused `blocked`
    // there, wherever bob is.
    c.nodes[1].ok(bob, "block alice");
    c.settle();
    assert_eq!(
        c.message(0, alice, "message bob second"),
        Err(ErrorCode::Blocked)
    );
    // Unblocked, and past the moment when messages to bob were stored
    // behind the one stored first, they go live again.
    c.advance(secs(3));
    c.nodes[1].ok(bob, "unblock alice");
    c.settle();
    assert_eq!(c.message(0, alice, "message bob third"), Ok(false));
}

#[test]
fn a_login_right_after_a_logout_on_another_node_gets_in() {
    let mut c = Cluster::new(2);
    let bob = c.login(1, "bob");
    // bob logs out on node 1; its release is not written yet when he logs
    // in on node 0 (his client had its `ok` at once).
    c.sessions.with(|s| s.down = true);
    c.logout(1, bob);
    c.sessions.with(|s| s.down = false);
    let conn = c.nodes[0].connect();
    let frames = c.ask(0, conn, &login_line("bob"));
    assert_eq!(error_code(&frames), None, "asked again, not refused yet");
    assert_eq!(
        c.nodes[0].server.next_timer().map(|(_, timer)| timer),
        Some(Timer::ClaimRetry)
    );
    c.sessions.restore(); // the release is written
    c.advance(Duration::from_millis(100));
    assert!(logged_in(&c.nodes[0].take(conn)));
}

#[test]
fn a_message_stored_while_the_bus_was_away_reaches_its_online_recipient_when_it_is_back() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    c.nodes[1].take(bob);
    c.lose_bus();
    // bob is online on node 1, but node 0 cannot reach it: stored.
    assert_eq!(c.message(0, alice, "message bob while away"), Ok(true));
    assert_eq!(c.message(0, alice, "message bob and again"), Ok(true));
    assert_eq!(offline_texts(&c.nodes[1].take(bob)), Vec::<String>::new());
    // The bus is back: node 0 says it stored messages for bob, and node 1
    // hands them over at once, in order, without waiting for a login.
    c.restore_bus();
    assert_eq!(
        offline_texts(&c.nodes[1].take(bob)),
        ["while away", "and again"]
    );
    assert!(c.sessions.with(|s| s.queues.values().all(Vec::is_empty)));
    // Live again once that is over (stored ones are not overtaken).
    c.advance(secs(3));
    assert_eq!(c.message(0, alice, "message bob now"), Ok(false));
}

#[test]
fn after_a_message_is_stored_for_lack_of_an_answer_the_next_ones_do_not_overtake_it() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    c.nodes[1].take(bob);
    // Node 1 stops answering for a while (shorter than its lease): the
    // message gets no answer, twice, and node 0 stores it.
    c.stop(1);
    c.nodes[0].take(alice);
    c.nodes[0].send(alice, "message bob first");
    c.advance(secs(5));
    assert_eq!(message_answers(&c.nodes[0].take(alice)), [Ok(true)]);
    c.resume(1);
    // The next one, right after, is stored behind it rather than sent
    // live past it; node 1 hands both over, in order.
    assert_eq!(c.message(0, alice, "message bob second"), Ok(true));
    assert_eq!(offline_texts(&c.nodes[1].take(bob)), ["first", "second"]);
    // Once that is over, messages go live again.
    c.advance(secs(3));
    assert_eq!(c.message(0, alice, "message bob third"), Ok(false));
}

#[test]
fn a_notice_lost_while_a_node_was_rejoining_is_said_again_when_it_has() {
    let mut c = Cluster::new(2);
    let alice = c.login(0, "alice");
    let bob = c.login(1, "bob");
    c.nodes[1].take(bob);
    c.lose_bus();
    assert_eq!(c.message(0, alice, "message bob while away"), Ok(true));
    // Node 0 is back on the bus first: what it says then (its roster and
    // the notice for bob) is lost, node 1 not being there yet.
    c.up = true;
    let now = c.nodes[0].now;
    c.nodes[0].server.handle_bus_restored(now);
    c.nodes[0].pump();
    c.nodes[0].published.clear();
    // Node 1 comes back and asks for rosters: node 0 says the notice again.
    let now = c.nodes[1].now;
    c.nodes[1].server.handle_bus_restored(now);
    c.nodes[1].pump();
    c.settle();
    assert_eq!(offline_texts(&c.nodes[1].take(bob)), ["while away"]);
}

// ---------------------------------------------------------------------
// Accounts changed on a running cluster (a reload, node by node).
// ---------------------------------------------------------------------

/// Node `i` reloads its accounts: `change`, then its new digest.
fn change_accounts(c: &mut Cluster, i: usize, change: chatproto::AccountChange, digest: &str) {
    let node = &mut c.nodes[i];
    node.server.handle_account_change(change, node.now).unwrap();
    node.server.set_accounts_digest(digest.to_owned());
    node.pump();
    c.settle();
}

fn removed(user: &str) -> chatproto::AccountChange {
    chatproto::AccountChange::Removed {
        name: user.parse().unwrap(),
    }
}

#[test]
fn a_removed_account_online_elsewhere_is_forgotten_here() {
    let mut c = Cluster::with_accounts_digests(&["v1", "v1"]);
    let alice = c.login(0, "alice");
    c.login(1, "bob");
    assert_eq!(c.whoelse(0, alice), ["bob"]);
    change_accounts(&mut c, 0, removed("bob"), "v2");
    assert_eq!(c.whoelse(0, alice), Vec::<String>::new());
    assert_eq!(
        c.nodes[0].code(alice, "message bob hi"),
        ErrorCode::UnknownUser
    );
    // bob's comings and goings on node 1 are not told here any more.
    c.nodes[0].take(alice);
    c.advance(secs(2));
    assert!(presences(&c.nodes[0].take(alice)).is_empty());
}

#[test]
fn a_message_on_its_way_to_a_removed_account_is_not_stored() {
    let mut c = Cluster::with_accounts_digests(&["v1", "v1"]);
    let alice = c.login(0, "alice");
    c.login(1, "bob");
    c.stop(1);
    c.nodes[0].take(alice);
    c.nodes[0].send(alice, "message bob in-flight");
    assert_eq!(c.nodes[0].take(alice), []);
    change_accounts(&mut c, 0, removed("bob"), "v2");
    // Node 1 never answers: the message is not kept for nobody.
    c.advance(secs(5));
    let frames = c.nodes[0].take(alice);
    assert!(
        matches!(&frames[..], [ServerFrame::Error(e)] if e.code == ErrorCode::UnknownUser),
        "{frames:?}"
    );
    assert!(!c.nodes[0].store.offline.contains_key("bob"));
    assert!(c.sessions.with(|s| !s.queues.contains_key("bob")));
    assert_eq!(
        c.nodes[0]
            .server
            .debug_state(c.nodes[0].now)
            .queued_offline_messages,
        0
    );
}

/// One node reloaded alone (a mistaken file, or the first of a rolling
/// reload) forgets the account in memory but leaves the cluster's stored
/// state; once every node serves the same accounts it is deleted. Put
/// right before then, nothing is lost.
#[test]
fn what_the_cluster_stores_for_a_removed_account_goes_once_the_nodes_agree() {
    let mut c = Cluster::with_accounts_digests(&["v1", "v1"]);
    let alice = c.login(0, "alice");
    assert_eq!(c.message(0, alice, "message dave one"), Ok(true));
    assert_eq!(c.message(0, alice, "message carol two"), Ok(true));
    let stored = |c: &mut Cluster, user: &str| c.sessions.with(|s| s.queues.contains_key(user));
    assert!(stored(&mut c, "dave") && stored(&mut c, "carol"));

    // A mistake on node 0, put right before node 1 follows.
    change_accounts(&mut c, 0, removed("carol"), "v2");
    c.advance(secs(3));
    assert!(stored(&mut c, "carol"), "deleted on one node's word");
    change_accounts(
        &mut c,
        0,
        chatproto::AccountChange::Added {
            name: "carol".parse().unwrap(),
            credential: chatproto::Credential::Plain("pw-carol".parse().unwrap()),
        },
        "v1",
    );
    c.advance(secs(3));
    assert!(stored(&mut c, "carol"), "lost to a mistake put right");

    // A real removal: on both nodes.
    change_accounts(&mut c, 0, removed("dave"), "v3");
    c.advance(secs(3));
    assert!(stored(&mut c, "dave"));
    change_accounts(&mut c, 1, removed("dave"), "v3");
    c.advance(secs(3));
    assert!(!stored(&mut c, "dave"));
    assert!(stored(&mut c, "carol"));
}
