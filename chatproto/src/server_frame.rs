//! Server-to-client frames: one JSON object each, told apart by `type`.
//!
//! These types are the wire contract. The server builds and encodes them;
//! clients decode them. Encoding is deterministic (fields in declaration
//! order), which the test vectors rely on. An encoded frame is the payload
//! only: the transport frames it (a line ends it with `\n`; a WebSocket
//! text message carries it as is).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::command::CommandName;
use crate::error::ErrorCode;
use crate::request::RequestId;
use crate::text::MessageText;
use crate::time::Timestamp;
use crate::username::Username;

/// The protocol version this crate speaks, sent in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Any frame the server sends.
///
/// ```
/// use chatproto::{ServerFrame, ByeReason};
///
/// let bye = ServerFrame::Bye { reason: ByeReason::IdleTimeout };
/// assert_eq!(&bye.encode()[..], b"{\"type\":\"bye\",\"reason\":\"idle_timeout\"}");
/// assert_eq!(ServerFrame::decode(br#"{"type":"bye","reason":"idle_timeout"}"#).unwrap(), bye);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerFrame {
    /// Sent once, first, on every connection.
    Hello {
        /// This connection's session id (a random UUID v4).
        session: Uuid,
        /// The protocol version, [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// A request succeeded.
    Ok(OkFrame),
    /// A request (or a frame) was refused.
    Error(ErrorFrame),
    /// A direct message.
    Message(MessageFrame),
    /// A message to everyone online.
    Broadcast(BroadcastFrame),
    /// Someone came online or went offline.
    Presence(PresenceFrame),
    /// The server is closing the connection, and why.
    Bye {
        /// Why the connection ends.
        reason: ByeReason,
    },
}

/// The answer to a request that succeeded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OkFrame {
    /// The request's id, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    /// The command answered, with its result fields.
    #[serde(flatten)]
    pub reply: Reply,
    /// The result as one line for people.
    pub text: String,
}

/// The result fields of an `ok`, by command (the `cmd` field).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Reply {
    /// Logged in.
    Login {
        /// As whom.
        user: Username,
    },
    /// Logged out; a `bye` follows.
    Logout,
    /// The message was delivered, or queued for later.
    Message {
        /// The recipient.
        to: Username,
        /// True when the recipient was offline and the message was queued.
        stored: bool,
    },
    /// The broadcast went out.
    Broadcast {
        /// How many users received it.
        delivered: usize,
        /// How many online users did not, because they blocked the sender.
        skipped: usize,
    },
    /// Who this session is.
    Whoami {
        /// The logged-in user.
        user: Username,
        /// The session id from `hello`.
        session: Uuid,
    },
    /// Who else is online.
    Whoelse {
        /// Sorted names.
        users: Vec<Username>,
    },
    /// Who else was online lately.
    Whoelsesince {
        /// Sorted names.
        users: Vec<Username>,
    },
    /// The user is blocked.
    Block {
        /// Who.
        user: Username,
    },
    /// The user is no longer blocked.
    Unblock {
        /// Who.
        user: Username,
    },
    /// The commands and how to type them.
    Help {
        /// One entry per command.
        commands: Vec<CommandUsage>,
    },
    /// The server's state, for administrators.
    Debug {
        /// Counters; never passwords or message texts.
        state: DebugState,
    },
}

/// One line of `help`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandUsage {
    /// The command.
    pub cmd: CommandName,
    /// How to type it.
    pub usage: String,
}

/// What `debug server` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DebugState {
    /// Open connections, logged in or not.
    pub connections: usize,
    /// Users logged in.
    pub users_online: usize,
    /// Messages waiting in offline queues, all users together.
    pub queued_offline_messages: usize,
    /// Accounts locked by failed logins right now.
    pub locked_accounts: usize,
    /// Seconds since the server core started.
    pub uptime_secs: u64,
    /// Cluster mode: this node's name (absent on a server alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_node: Option<String>,
    /// Cluster mode: the nodes alive, this one included, as this node
    /// knows them (absent on a server alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_nodes: Option<usize>,
    /// Cluster mode: users online on every node together (absent on a
    /// server alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_users_online: Option<usize>,
}

/// A refused request or frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The request's id, when it had one and it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub text: String,
    /// For `account_locked`: whole seconds until a login may succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// A direct message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageFrame {
    /// The sender.
    pub from: Username,
    /// What they said.
    pub text: MessageText,
    /// When the server accepted it.
    pub sent_at: Timestamp,
    /// True when it waited in the offline queue.
    pub offline: bool,
}

/// A broadcast.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BroadcastFrame {
    /// The sender.
    pub from: Username,
    /// What they said.
    pub text: MessageText,
    /// When the server accepted it.
    pub sent_at: Timestamp,
}

/// A presence notice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceFrame {
    /// Who.
    pub user: Username,
    /// True on login, false on going offline.
    pub online: bool,
}

/// Why the server ends a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ByeReason {
    /// The user logged out.
    Logout,
    /// No frame arrived for the idle timeout.
    IdleTimeout,
    /// The server is stopping.
    ServerShutdown,
    /// The client read too slowly and its output backed up.
    SlowConsumer,
    /// The server is at its connection limit.
    ServerFull,
    /// Too many connections from the same address.
    TooManyConnections,
    /// The connection did not log in within the login timeout.
    LoginTimeout,
    /// The connection kept sending past its rate limit.
    Flood,
    /// Cluster mode: this node was out of touch with the others for longer
    /// than its lease (frozen, or its event loop stalled), so the cluster
    /// had given its sessions up. Connecting again (to any node) works.
    NodeExpired,
    /// The operator removed the user's account (the server reloaded its
    /// accounts): the session ends, and a new login fails.
    AccountRemoved,
    /// A reason this version does not know (sent by a newer server).
    #[serde(other)]
    Unrecognized,
}

impl ByeReason {
    /// Every reason this version sends.
    pub const ALL: [ByeReason; 10] = [
        ByeReason::Logout,
        ByeReason::IdleTimeout,
        ByeReason::ServerShutdown,
        ByeReason::SlowConsumer,
        ByeReason::ServerFull,
        ByeReason::TooManyConnections,
        ByeReason::LoginTimeout,
        ByeReason::Flood,
        ByeReason::NodeExpired,
        ByeReason::AccountRemoved,
    ];

    /// The reason as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ByeReason::Logout => "logout",
            ByeReason::IdleTimeout => "idle_timeout",
            ByeReason::ServerShutdown => "server_shutdown",
            ByeReason::SlowConsumer => "slow_consumer",
            ByeReason::ServerFull => "server_full",
            ByeReason::TooManyConnections => "too_many_connections",
            ByeReason::LoginTimeout => "login_timeout",
            ByeReason::Flood => "flood",
            ByeReason::NodeExpired => "node_expired",
            ByeReason::AccountRemoved => "account_removed",
            ByeReason::Unrecognized => "unrecognized",
        }
    }
}

impl std::fmt::Display for ByeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line from the server that is not a frame this version understands.
#[derive(Debug, thiserror::Error)]
#[error("undecodable server frame: {0}")]
pub struct InvalidFrame(#[from] serde_json::Error);

impl ServerFrame {
    /// The frame's payload: its JSON, without a line ending (a line
    /// transport writes `\n` after it; see [`crate::Output::Transmit`]).
    /// Encode a frame once and clone the `Bytes` for every recipient.
    pub fn encode(&self) -> Bytes {
        // Written straight into the buffer that becomes the shared frame:
        // one allocation, no copy.
        let mut buf = BytesMut::with_capacity(128);
        // Serializing these types cannot fail: every map key is a string
        // and no Serialize impl here returns an error.
        serde_json::to_writer((&mut buf).writer(), self).expect("server frames always serialize");
        buf.freeze()
    }

    /// Decodes one frame (without its newline).
    pub fn decode(frame: &[u8]) -> Result<ServerFrame, InvalidFrame> {
        Ok(serde_json::from_slice(frame)?)
    }
}

impl From<ErrorFrame> for ServerFrame {
    fn from(f: ErrorFrame) -> Self {
        ServerFrame::Error(f)
    }
}

impl From<OkFrame> for ServerFrame {
    fn from(f: OkFrame) -> Self {
        ServerFrame::Ok(f)
    }
}
