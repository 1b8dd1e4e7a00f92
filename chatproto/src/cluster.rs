//! Cluster mode: the nodes of one service and what they tell each other
//! over the bus ([`BusMessage`]), versioned so that nodes of two releases
//! can run side by side during a rolling restart.
//!
//! What spans the nodes: presence (who is online on which node, presence
//! frames for users on other nodes, `whoelse` and `whoelsesince` counted
//! over every node), broadcast with cluster-wide counts, blocks, lockout
//! counts and the per-name login limit, node liveness (heartbeats; a node
//! not heard from for a lease is given up, its users offline from when it
//! was last heard from; a node that shuts down says so; a node frozen past
//! its lease closes its clients), direct messages to a user on another
//! node ([`BusMessage::Deliver`], answered with [`BusMessage::Routed`];
//! see `routes.rs`), and one session per user in the whole cluster, with
//! the offline queue it hands over (claimed in the cluster's database;
//! see below).
//!
//! A node is a [`Server`](crate::Server) with
//! [`ServerConfig::cluster`](crate::ServerConfig::cluster) set. It asks its
//! driver to publish with [`Output::Publish`](crate::Output::Publish), and
//! the driver hands it what the other nodes published with
//! [`Server::handle_bus`](crate::Server::handle_bus). The bus may lose
//! messages (core NATS delivers at most once); when the driver's bus
//! connection comes back it calls
//! [`Server::handle_bus_restored`](crate::Server::handle_bus_restored), and
//! the nodes exchange rosters, which repairs what was lost; when it is
//! lost, [`Server::handle_bus_lost`](crate::Server::handle_bus_lost). A
//! heartbeat that counts other users than a node knows of makes it ask for
//! the sender's roster, which repairs a message lost while the bus stayed
//! up. A node that the driver knows is gone sooner than its lease says is
//! removed with [`Server::handle_node_gone`](crate::Server::handle_node_gone).
//! Every deadline (the next heartbeat, the first lease to run out) is in
//! [`Server::poll_timeout`](crate::Server::poll_timeout).
//!
//! **One session per user** needs an atomic test-and-set that the bus
//! cannot give, so it lives in the cluster's database. Once a login's
//! password is right, the core asks for the session with
//! [`Output::ClaimSession`](crate::Output::ClaimSession); the driver
//! answers with [`Server::handle_claim`](crate::Server::handle_claim) and a
//! [`ClaimOutcome`]. Each session ends with
//! [`Output::ReleaseSession`](crate::Output::ReleaseSession), which names
//! its claim. The database takes a session over from a node silent past
//! its lease (by its own clock) and tells that node at its next heartbeat,
//! for which the driver calls
//! [`Server::handle_node_expired`](crate::Server::handle_node_expired).
//!
//! ```
//! use chatproto::{ClaimOutcome, ClusterConfig, NodeId, Output, Server, ServerConfig, Timestamp};
//! let now = Timestamp::from_unix_millis(0);
//! let mut config = ServerConfig::default();
//! config.cluster = Some(ClusterConfig::new(NodeId::from_u128(1)));
//! let mut accounts = chatproto::Accounts::default();
//! accounts.insert("alice".parse().unwrap(), "pw-alice".parse().unwrap()).unwrap();
//! let mut node = Server::new(config, accounts, now).unwrap();
//! let conn = node.accept(chatproto::PeerKey::UNSPECIFIED, [0; 16], now);
//! node.handle_input(conn, b"login alice pw-alice\n", now).unwrap();
//! let claim = std::iter::from_fn(|| node.poll_output())
//!     .find_map(|output| match output {
//!         Output::ClaimSession { claim, .. } => Some(claim),
//!         _ => None,
//!     })
//!     .expect("a right password asks for the session");
//! // The database says nobody alive holds alice's session, and her
//! // offline queue is empty.
//! let queued = chatproto::QueueSize::default();
//! node.handle_claim(claim, ClaimOutcome::Claimed { queued }, now);
//! assert_eq!(node.user(conn).map(|u| u.as_str()), Some("alice"));
//! ```
//!
//! ```
//! use chatproto::{BusMessage, ClusterConfig, NodeId, Output, Server, ServerConfig, Timestamp};
//! let now = Timestamp::from_unix_millis(0);
//! let mut config = ServerConfig::default();
//! config.cluster = Some(ClusterConfig::new(NodeId::from_u128(1)));
//! let mut node = Server::new(config, chatproto::Accounts::default(), now).unwrap();
//! node.handle_bus_restored(now);
//! match node.poll_output() {
//!     Some(Output::Publish { message, .. }) => {
//!         let bytes = message.encode();
//!         assert_eq!(BusMessage::decode(&bytes).unwrap(), message);
//!     }
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::offline::QueueSize;
use crate::text::MessageText;
use crate::time::Timestamp;
use crate::username::Username;

/// The version of [`BusMessage`]s this release writes and reads. A
/// message of another version is refused by [`BusMessage::decode`]
/// ([`BusDecodeError::UnknownVersion`]): the driver logs it and drops it.
pub const BUS_VERSION: u32 = 1;

/// One node of a cluster, as long as its process runs: a new one at every
/// start, so a node that was given up for dead and comes back is a new
/// node. Made by the caller (randomness comes from outside the core).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(uuid::Uuid);

impl NodeId {
    /// A node id from a random (or any unique) UUID.
    pub fn new(id: uuid::Uuid) -> NodeId {
        NodeId(id)
    }

    /// A node id from a number, for tests and examples.
    pub fn from_u128(n: u128) -> NodeId {
        NodeId(uuid::Uuid::from_u128(n))
    }

    /// The UUID.
    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// Cluster mode's settings ([`ServerConfig::cluster`](crate::ServerConfig::cluster)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// This node.
    pub node: NodeId,
    /// This node's name, for people (`debug server`). Default: the id.
    pub name: String,
    /// A digest of the accounts this node serves, made by the driver (any
    /// string that two nodes share exactly when their accounts are the
    /// same), sent with every heartbeat. A node whose digest differs from
    /// most nodes' serves other accounts than the cluster:
    /// [`Server::cluster_accounts_agree`](crate::Server::cluster_accounts_agree)
    /// says so, for the driver to stop taking clients. Default: empty.
    pub accounts_digest: String,
    /// How often this node says it is alive ([`BusMessage::Heartbeat`])
    /// while the bus is up. Default 1 s.
    pub heartbeat_every: Duration,
    /// How long a node waits for the answer to a direct message it sent
    /// to another node's user before it sends it again (once), then
    /// stores it. Default 2 s.
    pub route_timeout: Duration,
    /// How long a node not heard from is still taken for alive; past it,
    /// its users are offline from when it was last heard from. Several
    /// heartbeats long, so that a lost one or two change nothing. Default
    /// 10 s.
    pub lease: Duration,
}

impl ClusterConfig {
    /// This node is `node`, with the default heartbeat and lease.
    pub fn new(node: NodeId) -> ClusterConfig {
        ClusterConfig {
            node,
            name: node.as_uuid().to_string(),
            accounts_digest: String::new(),
            heartbeat_every: Duration::from_secs(1),
            route_timeout: Duration::from_secs(2),
            lease: Duration::from_secs(10),
        }
    }
}

/// Who a [`BusMessage`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BusTarget {
    /// Every node of the cluster (the sender gets it back too, and ignores
    /// it).
    All,
    /// One node.
    Node(NodeId),
}

/// What one node tells the others. Every message names its sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum BusMessage {
    /// `user` logged in on `node`. It also counts as a login attempt
    /// that succeeded, on every node: it takes from the name's login
    /// limit and clears its failure count.
    Online {
        /// Where.
        node: NodeId,
        /// Who.
        user: Username,
    },
    /// A login for the name `user` (an account's or not) failed its
    /// password check on `node` at `at`: every node counts it toward the
    /// name's lockout and login limit, so both hold cluster-wide.
    LoginFailed {
        /// Where.
        node: NodeId,
        /// The name tried.
        user: Username,
        /// When.
        at: Timestamp,
    },
    /// `user` went offline on `node` at `at`.
    Offline {
        /// Where.
        node: NodeId,
        /// Who.
        user: Username,
        /// When (for `whoelsesince`).
        at: Timestamp,
    },
    /// Everyone online on `node` now. Sent when the node's bus connection
    /// comes up (the first time, or again after a loss), with `reply` set
    /// so that every other node answers with its own roster.
    Roster {
        /// Whose.
        node: NodeId,
        /// Its users online.
        users: Vec<Username>,
        /// Whether the others should answer with theirs.
        reply: bool,
    },
    /// `node` is alive, with `online` users: sent every
    /// [`ClusterConfig::heartbeat_every`]. A node whose directory counts
    /// another number of users there asks for its roster
    /// ([`BusMessage::RosterWanted`]): a message was lost.
    Heartbeat {
        /// Who.
        node: NodeId,
        /// How many users are online there.
        online: u32,
        /// Its [`ClusterConfig::accounts_digest`].
        #[serde(default)]
        accounts: String,
    },
    /// `node` asks the node it is sent to for its roster, which comes
    /// back to `node` alone.
    RosterWanted {
        /// Who asks.
        node: NodeId,
    },
    /// `node` is shutting down at `at`: its users went offline (each
    /// announced before this), and it should be forgotten now rather than
    /// when its lease runs out.
    Leaving {
        /// Who.
        node: NodeId,
        /// When.
        at: Timestamp,
    },
    /// A direct message for `to`, whom the sender's node believes online
    /// on the node it is sent to. Answered with [`BusMessage::Routed`].
    /// Sent again under the same `route` if the answer does not come in
    /// time: the recipient's node delivers one route once.
    Deliver {
        /// The sender's node.
        node: NodeId,
        /// Its number for this message, unique on that node.
        route: u64,
        /// Who sent it.
        from: Username,
        /// For whom.
        to: Username,
        /// What.
        text: MessageText,
        /// When it was sent.
        sent_at: Timestamp,
    },
    /// `node` stored a message for `user`, who may be online elsewhere (it
    /// could not be delivered there: the bus was away, or no answer came):
    /// now that it is durable, the node where `user` is hands their queue
    /// over at once rather than at their next login.
    Queued {
        /// The storing node.
        node: NodeId,
        /// The recipient.
        user: Username,
    },
    /// What became of [`BusMessage::Deliver`] `route`, sent back to the
    /// sender's node by `node`.
    Routed {
        /// The recipient's node (the one answering).
        node: NodeId,
        /// The sender's node's number for it.
        route: u64,
        /// What became of it.
        outcome: RouteOutcome,
    },
    /// `from` broadcast `text` at `sent_at`: every node hands it to its own
    /// users, except those who blocked `from`.
    Broadcast {
        /// The sender's node.
        node: NodeId,
        /// Who.
        from: Username,
        /// What.
        text: MessageText,
        /// When.
        sent_at: Timestamp,
    },
    /// `blocker` blocked `target` (on `node`, which made it durable).
    Blocked {
        /// Where.
        node: NodeId,
        /// Who blocks.
        blocker: Username,
        /// Who is blocked.
        target: Username,
    },
    /// `blocker` unblocked `target`.
    Unblocked {
        /// Where.
        node: NodeId,
        /// Who unblocks.
        blocker: Username,
        /// Who is unblocked.
        target: Username,
    },
}

/// What became of a direct message sent to another node
/// ([`BusMessage::Routed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RouteOutcome {
    /// Handed to the recipient's connection (or handed already, for a
    /// message sent again): the sender gets `ok` with `stored: false`.
    Delivered,
    /// The recipient blocked the sender.
    Blocked,
    /// The recipient is not online there (any more), or not now able to
    /// take a message live (their offline queue is being handed over):
    /// the sender's node stores it.
    NotHere,
}

/// What the cluster's database said to an
/// [`Output::ClaimSession`](crate::Output::ClaimSession), handed back with
/// [`Server::handle_claim`](crate::Server::handle_claim).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimOutcome {
    /// This node now holds the user's one session: the login goes on, and
    /// hands over the user's offline queue, which holds `queued` in the
    /// shared storage (read with the claim; with texts kept in memory,
    /// [`OfflineTexts::InMemory`](crate::OfflineTexts::InMemory), the
    /// node's own queue is handed over and this is not used).
    Claimed {
        /// What the user's offline queue holds.
        queued: QueueSize,
    },
    /// A node that is alive holds it: the login gets `session_elsewhere`.
    Elsewhere,
    /// The database could not be asked: the login gets `unavailable`.
    Failed,
}

/// Why bytes from the bus are not a [`BusMessage`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BusDecodeError {
    /// Another release's message ([`BUS_VERSION`] is this one's): dropped.
    #[error("bus message of version {0} (this node speaks version {BUS_VERSION})")]
    UnknownVersion(u64),
    /// Not a bus message at all.
    #[error("malformed bus message: {0}")]
    Malformed(String),
}

/// The envelope on the wire: the version beside the message's fields.
#[derive(Serialize)]
struct Envelope<'a> {
    v: u32,
    #[serde(flatten)]
    message: &'a BusMessage,
}

impl BusMessage {
    /// The node that sent it.
    pub fn node(&self) -> NodeId {
        match self {
            BusMessage::Online { node, .. }
            | BusMessage::Offline { node, .. }
            | BusMessage::Roster { node, .. }
            | BusMessage::Heartbeat { node, .. }
            | BusMessage::RosterWanted { node }
            | BusMessage::Leaving { node, .. }
            | BusMessage::LoginFailed { node, .. }
            | BusMessage::Deliver { node, .. }
            | BusMessage::Routed { node, .. }
            | BusMessage::Queued { node, .. }
            | BusMessage::Broadcast { node, .. }
            | BusMessage::Blocked { node, .. }
            | BusMessage::Unblocked { node, .. } => *node,
        }
    }

    /// The message as it goes on the bus: one line of JSON (without its
    /// newline) with its version, `"v"`.
    pub fn encode(&self) -> Bytes {
        let mut payload = Vec::new();
        self.encode_into(&mut payload);
        Bytes::from(payload)
    }

    /// Appends the message to `payload`, after a newline if `payload`
    /// already holds messages: one bus payload can carry many
    /// ([`BusMessage::decode_all`]), so a driver under load sends one
    /// payload per node per wake-up instead of one per message.
    ///
    /// ```
    /// use chatproto::{BusMessage, NodeId};
    /// let node = NodeId::from_u128(1);
    /// let mut payload = Vec::new();
    /// BusMessage::RosterWanted { node }.encode_into(&mut payload);
    /// BusMessage::Leaving { node, at: chatproto::Timestamp::from_unix_millis(5) }
    ///     .encode_into(&mut payload);
    /// let messages: Vec<_> = BusMessage::decode_all(&payload).collect();
    /// assert_eq!(messages.len(), 2);
    /// assert_eq!(messages[0], Ok(BusMessage::RosterWanted { node }));
    /// ```
    pub fn encode_into(&self, payload: &mut Vec<u8>) {
        if !payload.is_empty() {
            payload.push(b'\n');
        }
        let envelope = Envelope {
            v: BUS_VERSION,
            message: self,
        };
        // Every field serializes (string keys, no fallible Serialize impl),
        // and compact JSON holds no raw newline.
        serde_json::to_writer(payload, &envelope).expect("bus messages always serialize");
    }

    /// A message from the bus, if it is one of this release's version.
    pub fn decode(bytes: &[u8]) -> Result<BusMessage, BusDecodeError> {
        let malformed = |e: serde_json::Error| BusDecodeError::Malformed(e.to_string());
        // The version first, alone (other fields skipped), so that a
        // message of another release is told apart from a malformed one.
        let Versioned { v } = serde_json::from_slice(bytes).map_err(malformed)?;
        match v {
            None => return Err(BusDecodeError::Malformed("no version (\"v\")".to_owned())),
            Some(v) if v != u64::from(BUS_VERSION) => {
                return Err(BusDecodeError::UnknownVersion(v))
            }
            Some(_) => {}
        }
        // The message itself ignores the "v" beside its fields.
        serde_json::from_slice(bytes).map_err(malformed)
    }

    /// Every message of a bus payload, in order: one per line, as
    /// [`BusMessage::encode_into`] packs them (a payload of one message,
    /// [`BusMessage::encode`]'s, is one line). Each is decoded on its own,
    /// so one bad message does not cost the others; empty lines are
    /// skipped.
    pub fn decode_all(
        payload: &[u8],
    ) -> impl Iterator<Item = Result<BusMessage, BusDecodeError>> + '_ {
        payload
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(BusMessage::decode)
    }
}

/// The version of a message on the bus, read before the message.
#[derive(Deserialize)]
struct Versioned {
    v: Option<u64>,
}
