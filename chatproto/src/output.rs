//! What the server core tells its driver: [`Output`](crate::Output) (to poll), with the
//! events, timers, reasons and errors it names.

use bytes::Bytes;

use crate::cluster::{BusMessage, BusTarget, NodeId};
use crate::error::ErrorCode;
use crate::ids::{BatchId, ClaimId, ConnId, VerifyTicket};
use crate::password::{HashedPassword, Password};
use crate::peer::PeerKey;
use crate::server_frame::ByeReason;
use crate::store::Change;
use crate::time::Timestamp;
use crate::username::Username;

/// What the server core asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Send this frame on `conn`, after everything sent on it before.
    /// `frame` is exactly one frame's payload, without a terminator: the
    /// transport frames it (over a byte stream, write `frame` then `\n`;
    /// over WebSocket, send it as one text message).
    Transmit {
        /// Where.
        conn: ConnId,
        /// What: one frame's payload, shared, not copied, when many
        /// connections get the same.
        frame: Bytes,
    },
    /// Send what is queued for `conn`, then close it. The core has already
    /// forgotten it: later calls with this id return
    /// [`UnknownConnection`].
    Close {
        /// Which.
        conn: ConnId,
        /// Why (the `bye` already queued says the same).
        reason: ByeReason,
    },
    /// Something worth a log line. Never holds a password or message text.
    Event(Event),
    /// Check `password` against `hash` (for a login), off the event loop:
    /// it costs milliseconds. Answer with [`Server::handle_verification`](crate::Server::handle_verification).
    /// Meanwhile the connection's later frames wait, so its answers stay
    /// in order.
    VerifyPassword {
        /// What to hand back with the verdict.
        ticket: VerifyTicket,
        /// Whose login it is: a driver that queues checks serves peers in
        /// turn, so that one address's flood does not delay the others.
        peer: PeerKey,
        /// The stored hash (PHC string).
        hash: HashedPassword,
        /// The password the user sent.
        password: Password,
    },
    /// Cluster mode: make this node `user`'s one session in the cluster's
    /// database, atomically, unless a node that is alive holds it (a
    /// session held by a node whose lease ran out, or by this node under
    /// an older claim, is taken over). Comes after the password check; the
    /// connection's later frames wait for the answer. Answer with
    /// [`Server::handle_claim`](crate::Server::handle_claim), after
    /// committing every change polled before this output (a release of
    /// the same user among them). The session is given back with
    /// [`Output::ReleaseSession`].
    ClaimSession {
        /// What to hand back with the answer.
        claim: ClaimId,
        /// Whose session.
        user: Username,
    },
    /// Cluster mode: this node no longer holds `user`'s session made by
    /// `claim` (logout, disconnect, or a claim answered after its
    /// connection closed). Remove it from the cluster's database only if
    /// it is still that claim of this node's, so that a release that
    /// arrives late never removes a newer session. Nothing answers it; a
    /// driver whose database is away keeps it and tries again, since until
    /// it is done the user cannot log in on another node while this one
    /// is alive.
    ReleaseSession {
        /// Whose session.
        user: Username,
        /// The claim that made it.
        claim: ClaimId,
    },
    /// Read the next page of `user`'s offline queue from storage (with
    /// [`OfflineTexts::External`](crate::OfflineTexts::External)): the messages after `after_seq` (all of
    /// them for 0), oldest first, up to `max_bytes` of text but at least
    /// one. Answer with [`Server::handle_offline_page`](crate::Server::handle_offline_page), after committing
    /// every change polled before this output, so the page reflects them.
    LoadOffline {
        /// The connection the page is for.
        conn: ConnId,
        /// Whose queue.
        user: Username,
        /// The page starts after this [`QueuedMessage::seq`](crate::QueuedMessage::seq).
        after_seq: u64,
        /// How much text the page may hold.
        max_bytes: usize,
    },
    /// Make `changes` durable, all or none, in order (with
    /// [`ServerConfig::durable`](crate::ServerConfig::durable)); answer with [`Server::handle_persisted`](crate::Server::handle_persisted).
    /// Outputs that depend on them wait in the core meanwhile; everything
    /// else goes on. One batch is in flight at a time: changes made while
    /// it is written come as the next one, after its answer.
    Persist {
        /// What to hand back with the outcome.
        batch: BatchId,
        /// The changes, oldest first. [`Snapshot::apply`](crate::Snapshot::apply) says what each
        /// means.
        changes: Vec<Change>,
    },
    /// Publish `message` to the other nodes (cluster mode): encode it with
    /// [`BusMessage::encode`] and send it, in the order polled, over one
    /// connection so that the others get this node's messages in order.
    /// Nothing waits for it; a message lost on the way is repaired by the
    /// rosters exchanged when the bus comes back
    /// ([`Server::handle_bus_restored`](crate::Server::handle_bus_restored)).
    Publish {
        /// Who it is for.
        to: BusTarget,
        /// What.
        message: BusMessage,
    },
}

/// A notable thing that happened, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A user logged in.
    LoggedIn {
        /// On which connection.
        conn: ConnId,
        /// Who.
        user: Username,
    },
    /// A login was refused.
    LoginRefused {
        /// On which connection.
        conn: ConnId,
        /// The name tried (it may have no account).
        user: Username,
        /// Why: `invalid_credentials`, `account_locked` or
        /// `session_elsewhere`.
        code: ErrorCode,
    },
    /// Failed logins locked a name.
    Locked {
        /// The name (it may have no account).
        user: Username,
        /// Until when.
        until: Timestamp,
    },
    /// A user went offline, for whatever reason.
    LoggedOut {
        /// Which connection they were on.
        conn: ConnId,
        /// Who.
        user: Username,
    },
    /// A connection kept sending past its rate limit and is being closed.
    Flooding {
        /// Which.
        conn: ConnId,
    },
    /// Cluster mode: another node was not heard from for a lease and is
    /// taken for dead; its users are offline from `last_heard`.
    NodeLost {
        /// Which.
        node: NodeId,
        /// When it was last heard from.
        last_heard: Timestamp,
    },
    /// Cluster mode: `node`'s heartbeat says it serves other accounts than
    /// this node (another accounts digest); reported once per digest.
    AccountsDiffer {
        /// Which.
        node: NodeId,
    },
    /// Cluster mode: this node said nothing for `silent_for`, a lease or
    /// more, while the bus was up (it was frozen, or its loop stalled), so
    /// the others gave it up: it closed every connection (`bye
    /// node_expired`) and joined again with nobody on it.
    NodeExpired {
        /// How long it was silent.
        silent_for: std::time::Duration,
    },
}

/// One of the core's timers, as [`Server::next_timer`](crate::Server::next_timer) names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Timer {
    /// A connection's idle timeout.
    Idle,
    /// A connection's time to log in.
    Login,
    /// A user name's failed-login record or login bucket runs out (a lock
    /// ends, a count expires).
    LoginRecord,
    /// The core stops waiting for a closed connection's last
    /// [`Server::handle_drained`](crate::Server::handle_drained) report.
    ClosingDrain,
    /// Cluster mode: this node's heartbeat is due.
    Heartbeat,
    /// Cluster mode: another node's lease runs out, unless it is heard
    /// from before.
    NodeLease,
    /// Cluster mode: a direct message sent to another node has had no
    /// answer in time: it is sent again, or stored.
    Route,
    /// Cluster mode: a session claim answered "elsewhere" is asked again
    /// (the session may have been on its way out).
    ClaimRetry,
}

impl std::fmt::Display for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Timer::Idle => "idle timeout",
            Timer::Login => "login timeout",
            Timer::LoginRecord => "login record expiry",
            Timer::ClosingDrain => "closing drain timeout",
            Timer::Heartbeat => "heartbeat",
            Timer::NodeLease => "node lease expiry",
            Timer::Route => "direct message route timeout",
            Timer::ClaimRetry => "session claim retry",
        })
    }
}

/// Why a driver ends a connection with [`Server::close`](crate::Server::close).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// Its unsent output passed the driver's limit: it reads too slowly.
    SlowConsumer,
    /// The driver is at its connection limit.
    ServerFull,
}

/// A call named a connection that is closed, or never was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not an open connection")]
pub struct UnknownConnection(pub ConnId);

/// Why [`Server::handle_message`](crate::Server::handle_message) did not take a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The connection is closed, or never was.
    #[error(transparent)]
    UnknownConnection(#[from] UnknownConnection),
    /// The message holds a line break before its end, so it is not one
    /// frame. Nothing of it was taken; the transport should refuse it (a
    /// WebSocket closes with status 1007).
    #[error("a message holds exactly one frame, without a line break before its end")]
    LineBreak,
}

/// What [`Server::with_snapshot`](crate::Server::with_snapshot) loaded, in counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreSummary {
    /// Offline messages put back in their queues.
    pub offline_messages: usize,
    /// Blocks put back.
    pub blocks: usize,
    /// Last-seen times put back.
    pub last_seen: usize,
    /// Failed-login records put back (locks included).
    pub lockouts: usize,
    /// Entries skipped because they name a user without an account.
    pub skipped: usize,
}
