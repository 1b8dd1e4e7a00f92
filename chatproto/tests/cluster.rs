//! Cluster mode, simulated: several cores, one virtual clock, a bus that
//! carries each node's messages (encoded and decoded, as on the wire) to
//! every node, in order, or loses them while it is down. What is built so
//! far: presence, `whoelse`/`whoelsesince`, broadcast and blocks across
//! nodes, repaired by rosters when the bus comes back.

mod common;

use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;
use chatproto::{
    BusDecodeError, BusMessage, ClusterConfig, ConnId, NodeId, Reply, ServerFrame, BUS_VERSION,
};
use common::{config, names, presences, secs, Sim};
use proptest::prelude::*;

/// Nodes and the bus between them.
struct Cluster {
    nodes: Vec<Sim>,
    /// Published and not yet handed out: the publishing node, the bytes.
    bus: VecDeque<(usize, Bytes)>,
    /// While false, what is published is lost (NATS away).
    up: bool,
}

impl Cluster {
    /// `n` nodes whose bus connections have just come up.
    fn new(n: usize) -> Cluster {
        let nodes = (0..n)
            .map(|i| {
                let mut config = config();
                config.cluster = Some(ClusterConfig::new(node_id(i)));
                Sim::with_config(config)
            })
            .collect();
        let mut cluster = Cluster {
            nodes,
            bus: VecDeque::new(),
            up: true,
        };
        cluster.restore_bus();
        cluster
    }

    /// The bus is back: every node is told, and what they say is carried.
    fn restore_bus(&mut self) {
        self.up = true;
        for node in &mut self.nodes {
            node.server.handle_bus_restored(node.now);
            node.pump();
        }
        self.settle();
    }

    /// Carries every message published until none is left, each to every
    /// node (its sender too, as NATS does).
    fn settle(&mut self) {
        for _ in 0..10_000 {
            self.collect();
            let Some((_, bytes)) = self.bus.pop_front() else {
                return;
            };
            let message = BusMessage::decode(&bytes).unwrap();
            for node in &mut self.nodes {
                node.server.handle_bus(message.clone(), node.now);
                node.pump();
            }
        }
        panic!("the bus never went quiet");
    }

    fn collect(&mut self) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            for message in node.published.drain(..) {
                if self.up {
                    self.bus.push_back((i, message.encode()));
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

    fn advance(&mut self, d: std::time::Duration) {
        for node in &mut self.nodes {
            node.advance(d);
        }
        self.settle();
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
    assert_eq!(state.cluster_nodes, Some(1));
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

    c.up = false;
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
                Op::BusDown => c.up = false,
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
