//! The server state machine: every rule of the chat service, driven by
//! calls that carry the time, with output to poll.
//!
//! The driver (a socket reactor, a test, a simulator) tells the [`Server`]
//! what happened — a connection opened ([`Server::accept`]), bytes arrived
//! ([`Server::handle_input`]), a connection dropped
//! ([`Server::handle_disconnect`]), time passed ([`Server::handle_timeout`])
//! — and after each call drains [`Server::poll_output`] until `None`, then
//! waits for [`Server::poll_timeout`] or the next socket event.
//!
//! Time never runs backwards for the core: a `now` earlier than the latest
//! any call brought counts as that latest, so a clock that steps back fires
//! no timer early and refills no rate limit.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use crate::accounts::{Accounts, Credential, UserId};
use crate::blocking::BlockList;
use crate::command::{Command, CommandName, DebugTarget};
use crate::connection::{ConnId, Connection, Connections};
use crate::drain::Drain;
use crate::durability::{BatchId, Held, Key, Kind, Ledger, Persisted, Undo, FIRST_PAGE};
use crate::error::{ErrorCode, RequestError};
use crate::framing::{self, FrameDecoder, FrameError, DEFAULT_MAX_FRAME_BYTES};
use crate::lockout::{Lockout, LockoutPolicy};
use crate::offline::{
    OfflineMessage, OfflineQueues, OfflineTexts, QueueLimits, QueueSize, QueuedMessage,
    DEFAULT_OFFLINE_PAGE_BYTES, DEFAULT_OFFLINE_QUEUE_BYTES, DEFAULT_OFFLINE_QUEUE_CAPACITY,
};
use crate::password::{HashedPassword, Password};
use crate::peer::{PeerKey, Peers};
use crate::presence::Presence;
use crate::rate_limit::{Rate, RateLimit, TokenBucket};
use crate::request::{Request, RequestId};
use crate::server_frame::{
    BroadcastFrame, ByeReason, CommandUsage, DebugState, ErrorFrame, MessageFrame, OkFrame,
    PresenceFrame, Reply, ServerFrame, PROTOCOL_VERSION,
};
use crate::store::{Change, LastSeen, Snapshot};
use crate::text::MessageText;
use crate::time::{seconds_until, Timestamp};
use crate::username::Username;

/// How a server core behaves. Start from [`ServerConfig::default`] and set
/// what differs.
///
/// ```
/// use chatproto::ServerConfig;
/// use std::time::Duration;
///
/// let mut config = ServerConfig::default();
/// config.idle_timeout = Duration::from_secs(30);
/// config.admins.insert("root".parse().unwrap());
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Largest frame accepted, in bytes (default 16 KiB; 64 to 16 MiB).
    pub max_frame_bytes: usize,
    /// A connection that sends no frame for this long is closed (default
    /// 600 s).
    pub idle_timeout: Duration,
    /// When failed logins lock a name.
    pub lockout: LockoutPolicy,
    /// Most messages one user's offline queue holds (default 1,000).
    pub offline_queue_capacity: usize,
    /// Most bytes of text one user's offline queue holds (default 4 MiB).
    pub offline_queue_bytes: usize,
    /// Most bytes of text all offline queues hold together, or `None` for
    /// no such cap (default). Set it when the texts are kept in memory.
    pub offline_total_bytes: Option<usize>,
    /// Where queued texts are kept (default: in the core's memory).
    pub offline_texts: OfflineTexts,
    /// Bytes of queued text handed to a connection at a time (default 64
    /// KiB; a page holds at least one message). The next page follows when
    /// the driver reports the backlog low ([`Server::handle_drained`]).
    pub offline_page_bytes: usize,
    /// Users allowed `debug server`.
    pub admins: HashSet<Username>,
    /// Frames per connection, or `None` for no limit (default:
    /// [`RateLimit::default`]).
    pub rate_limit: Option<RateLimit>,
    /// Bytes of frames per connection, or `None` for no limit (default:
    /// [`Rate::BYTES_PER_CONNECTION`]). A frame past it is refused like one
    /// past `rate_limit`, and counts toward its flood limit. The burst must
    /// hold a frame of the largest size.
    pub byte_rate: Option<Rate>,
    /// Password checks ([`Output::VerifyPassword`]) waiting for a verdict
    /// at most; logins beyond are refused with `unavailable`, so a flood of
    /// logins cannot queue unbounded work ahead of real users (default 64).
    pub max_pending_checks: usize,
    /// Password checks waiting for a verdict at most per [`PeerKey`], so
    /// that one address cannot take every slot; logins beyond are refused
    /// with `unavailable` (default 8, `None`: no such limit).
    pub max_pending_checks_per_peer: Option<usize>,
    /// Login attempts per [`PeerKey`]; beyond, a login is answered
    /// `rate_limited` (default [`Rate::LOGINS_PER_PEER`]).
    pub login_rate_per_peer: Option<Rate>,
    /// Login attempts per user name, account or not; beyond, a login is
    /// answered `rate_limited` (default [`Rate::LOGINS_PER_NAME`]).
    pub login_rate_per_name: Option<Rate>,
    /// A connection that has not logged in this long after it opened is
    /// closed with `bye` reason `login_timeout`, so idle unauthenticated
    /// sockets cannot pile up (default 30 s; `None`: only the idle
    /// timeout applies).
    pub login_timeout: Option<Duration>,
    /// Changes to lasting state leave as [`Output::Persist`] batches, and
    /// what depends on a batch waits in the core until the driver answers
    /// it with [`Server::handle_persisted`] (PROTOCOL.md rule 15). Default
    /// `false`: nothing lasts past the process, and nothing waits.
    pub durable: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            idle_timeout: Duration::from_secs(600),
            lockout: LockoutPolicy::default(),
            offline_queue_capacity: DEFAULT_OFFLINE_QUEUE_CAPACITY,
            offline_queue_bytes: DEFAULT_OFFLINE_QUEUE_BYTES,
            offline_total_bytes: None,
            offline_texts: OfflineTexts::InMemory,
            offline_page_bytes: DEFAULT_OFFLINE_PAGE_BYTES,
            admins: HashSet::new(),
            rate_limit: Some(RateLimit::default()),
            byte_rate: Some(Rate::BYTES_PER_CONNECTION),
            login_timeout: Some(Duration::from_secs(30)),
            max_pending_checks: 64,
            max_pending_checks_per_peer: Some(8),
            login_rate_per_peer: Some(Rate::LOGINS_PER_PEER),
            login_rate_per_name: Some(Rate::LOGINS_PER_NAME),
            durable: false,
        }
    }
}

/// A [`ServerConfig`] value out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `max_frame_bytes` is out of range.
    #[error(
        "the frame limit must be between {MIN_FRAME_BYTES} and {MAX_FRAME_BYTES} bytes (got {0})"
    )]
    FrameLimit(usize),
    /// `idle_timeout` is zero.
    #[error("the idle timeout must be longer than zero")]
    ZeroIdleTimeout,
    /// `lockout.max_failures` is zero.
    #[error("the number of failed logins before a lock must be at least 1")]
    ZeroLockoutAttempts,
    /// `lockout.lock_duration` is zero.
    #[error("the lockout duration must be longer than zero")]
    ZeroLockDuration,
    /// `lockout.max_tracked_names` is zero.
    #[error("at least one user name must be tracked for lockout")]
    ZeroTrackedNames,
    /// A login rate allows no logins at all.
    #[error("a login rate needs a burst and a rate of at least 1 login")]
    ZeroRate,
    /// `byte_rate` cannot let a frame of the largest size through.
    #[error("the byte rate limit needs a burst of at least the frame limit ({frame_limit} bytes) and a rate of at least 1 byte")]
    ByteRateBelowFrameLimit {
        /// The frame limit in force.
        frame_limit: usize,
    },
    /// `max_pending_checks_per_peer` is zero (use `None` for no limit).
    #[error("at least one password check per peer must be allowed")]
    ZeroPendingChecksPerPeer,
    /// `rate_limit` allows no frames at all.
    #[error("a rate limit needs a burst and a rate of at least 1 frame")]
    ZeroRateLimit,
    /// `login_timeout` is zero (use `None` for no login timeout).
    #[error("the login timeout must be at least 1 ms")]
    ZeroLoginTimeout,
    /// `offline_page_bytes` is zero.
    #[error("an offline page must hold at least 1 byte")]
    ZeroOfflinePage,
}

/// Output queue slots kept between bursts, and the size past which a
/// drained queue shrinks back to it.
const OUTPUT_QUEUE_KEEP: usize = 1024;
const OUTPUT_QUEUE_SHRINK_ABOVE: usize = 1 << 16;

/// The smallest frame limit accepted.
pub const MIN_FRAME_BYTES: usize = 64;
/// The largest frame limit accepted.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

impl ServerConfig {
    /// Checks every value is in range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err(ConfigError::FrameLimit(self.max_frame_bytes));
        }
        if self.idle_timeout.is_zero() {
            return Err(ConfigError::ZeroIdleTimeout);
        }
        if self.lockout.max_failures == 0 {
            return Err(ConfigError::ZeroLockoutAttempts);
        }
        if self.lockout.lock_duration.is_zero() {
            return Err(ConfigError::ZeroLockDuration);
        }
        if self.lockout.max_tracked_names == 0 {
            return Err(ConfigError::ZeroTrackedNames);
        }
        if [self.login_rate_per_peer, self.login_rate_per_name]
            .iter()
            .flatten()
            .any(|r| r.burst == 0 || r.per_second == 0)
        {
            return Err(ConfigError::ZeroRate);
        }
        if self
            .byte_rate
            .is_some_and(|r| (r.burst as usize) < self.max_frame_bytes || r.per_second == 0)
        {
            return Err(ConfigError::ByteRateBelowFrameLimit {
                frame_limit: self.max_frame_bytes,
            });
        }
        if self.max_pending_checks_per_peer == Some(0) {
            return Err(ConfigError::ZeroPendingChecksPerPeer);
        }
        if self
            .rate_limit
            .is_some_and(|r| r.burst == 0 || r.per_second == 0)
        {
            return Err(ConfigError::ZeroRateLimit);
        }
        if self.login_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::ZeroLoginTimeout);
        }
        if self.offline_page_bytes == 0 {
            return Err(ConfigError::ZeroOfflinePage);
        }
        Ok(())
    }
}

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
    /// it costs milliseconds. Answer with [`Server::handle_verification`].
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
    /// Read the next page of `user`'s offline queue from storage (with
    /// [`OfflineTexts::External`]): the messages after `after_seq` (all of
    /// them for 0), oldest first, up to `max_bytes` of text but at least
    /// one. Answer with [`Server::handle_offline_page`], after committing
    /// every change polled before this output, so the page reflects them.
    LoadOffline {
        /// The connection the page is for.
        conn: ConnId,
        /// Whose queue.
        user: Username,
        /// The page starts after this [`QueuedMessage::seq`].
        after_seq: u64,
        /// How much text the page may hold.
        max_bytes: usize,
    },
    /// Make `changes` durable, all or none, in order (with
    /// [`ServerConfig::durable`]); answer with [`Server::handle_persisted`].
    /// Outputs that depend on them wait in the core meanwhile; everything
    /// else goes on. One batch is in flight at a time: changes made while
    /// it is written come as the next one, after its answer.
    Persist {
        /// What to hand back with the outcome.
        batch: BatchId,
        /// The changes, oldest first. [`Snapshot::apply`] says what each
        /// means.
        changes: Vec<Change>,
    },
}

/// Names one [`Output::VerifyPassword`] request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerifyTicket(u64);

impl VerifyTicket {
    /// The ticket as a number, for a driver that sends it elsewhere.
    pub fn into_raw(self) -> u64 {
        self.0
    }

    /// A ticket back from [`VerifyTicket::into_raw`]. A number the core
    /// never issued is simply ignored by [`Server::handle_verification`].
    pub fn from_raw(raw: u64) -> Self {
        VerifyTicket(raw)
    }
}

impl std::fmt::Display for VerifyTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verify#{}", self.0)
    }
}

/// A login waiting for its password check.
#[derive(Debug)]
struct PendingLogin {
    conn: ConnId,
    peer: PeerKey,
    id: Option<RequestId>,
    name: Username,
    /// `None` for a name without an account (checked against a decoy).
    account: Option<UserId>,
    /// The verdict on a plaintext password, known already (wrong): the
    /// check against a decoy hash only makes it cost what a hashed one
    /// costs.
    plain_verdict: Option<bool>,
}

/// Input a connection may send while its login is being checked, beyond
/// which it is cut off as a flood (in frame limits).
const HELD_INPUT_FRAMES: usize = 4;

/// Compared with the password of a login for an unknown name when no
/// account is hashed, so it costs what a wrong password costs.
static DECOY_PASSWORD: std::sync::LazyLock<Password> =
    std::sync::LazyLock::new(|| Password::new("decoy-password-never-matches").expect("valid"));

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
}

/// One of the core's timers, as [`Server::next_timer`] names it.
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
    /// [`Server::handle_drained`] report.
    ClosingDrain,
}

impl std::fmt::Display for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Timer::Idle => "idle timeout",
            Timer::Login => "login timeout",
            Timer::LoginRecord => "login record expiry",
            Timer::ClosingDrain => "closing drain timeout",
        })
    }
}

/// Why a driver ends a connection with [`Server::close`].
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

/// What became of a connection after one of its frames.
enum Served {
    Open,
    /// A login went to be checked: later input waits.
    Awaiting,
    /// The frame closed it (logout, flood).
    Closed,
}

/// Why [`Server::handle_message`] did not take a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The connection is closed, or never was.
    #[error(transparent)]
    UnknownConnection(#[from] UnknownConnection),
    /// The message holds a line break, so it is not one frame. Nothing of
    /// it was taken; the transport should refuse it (a WebSocket closes
    /// with status 1007).
    #[error("a message holds exactly one frame, without a line break")]
    LineBreak,
}

/// What [`Server::with_snapshot`] loaded, in counts.
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

/// The chat service's server side, without any I/O.
///
/// See the [crate docs](crate) for a walk through a session.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    accounts: Accounts,
    connections: Connections,
    presence: Presence,
    blocks: BlockList,
    offline: OfflineQueues,
    lockout: Lockout,
    /// Idle deadlines, earliest first. An entry may be early (the
    /// connection was active since); it is rescheduled when it fires.
    idle_timers: BTreeSet<(Timestamp, ConnId)>,
    outputs: VecDeque<Output>,
    started_at: Timestamp,
    /// Batches of changes, and the outputs that wait for them.
    ledger: Ledger,
    /// Answers and facts among the outputs of the unit of work being
    /// served, by position in `outputs`: what a failed batch does to each.
    unit_kinds: Vec<(usize, Kind)>,
    /// Units of work open (they nest: the outermost settles).
    unit_depth: u32,
    /// Drains that want their next page handed over, once nothing they
    /// follow waits for a batch.
    page_due: Vec<ConnId>,
    /// Drains whose next page waits for a batch to be answered.
    page_gated: Vec<ConnId>,
    /// Connections whose held input may go on: their first page went out.
    input_due: Vec<ConnId>,
    /// The connection whose login, in the unit being served, started an
    /// offline drain: its answer waits for the first page too.
    first_page_for: Option<ConnId>,
    /// Logins waiting for a password check, by ticket.
    verifications: HashMap<VerifyTicket, PendingLogin>,
    next_ticket: u64,
    /// Connections with an offline drain in progress.
    draining: usize,
    /// The latest time any call brought: an earlier one counts as this, so
    /// a clock that steps back fires no timer early and refills no bucket.
    latest: Timestamp,
    /// Drains of closed connections whose last frames may still be being
    /// written: the driver says how many were, once it knows.
    closing_drains: HashMap<ConnId, (UserId, Drain)>,
    /// When each closing drain is given up if no report came (a driver
    /// that never reports must not hold its user's queue back for ever).
    closing_deadlines: BTreeSet<(Timestamp, ConnId)>,
    /// Per-address limits.
    peers: Peers,
}

/// Closed connections whose drain outcome the core waits for, at most
/// (only a driver that never reports could fill it): past it one is given
/// up, and its messages stay queued.
const MAX_CLOSING_DRAINS: usize = 4096;
/// How long the core waits for a closed connection's last report before
/// it gives the drain up (its unsettled messages stay queued, and may come
/// twice): far longer than a driver takes to flush and close a socket.
const CLOSING_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

impl Server {
    /// A server core with no lasting state yet.
    pub fn new(
        config: ServerConfig,
        accounts: Accounts,
        now: Timestamp,
    ) -> Result<Self, ConfigError> {
        Server::with_snapshot(config, accounts, &Snapshot::default(), now).map(|(s, _)| s)
    }

    /// A server core that carries on from `snapshot`, as loaded from
    /// storage. Users who were online when the last run stopped are taken
    /// as having gone offline `now` (and the first [`Output::Persist`] says
    /// so).
    pub fn with_snapshot(
        config: ServerConfig,
        accounts: Accounts,
        snapshot: &Snapshot,
        now: Timestamp,
    ) -> Result<(Self, RestoreSummary), ConfigError> {
        config.validate()?;
        let mut server = Server {
            presence: Presence::new(&accounts),
            blocks: BlockList::new(&accounts),
            offline: OfflineQueues::new(&accounts, queue_limits(&config), config.offline_texts),
            lockout: Lockout::new(config.lockout.clone()),
            connections: Connections::default(),
            idle_timers: BTreeSet::new(),
            outputs: VecDeque::new(),
            started_at: now,
            ledger: Ledger::new(config.durable),
            unit_kinds: Vec::new(),
            unit_depth: 0,
            page_due: Vec::new(),
            page_gated: Vec::new(),
            input_due: Vec::new(),
            first_page_for: None,
            verifications: HashMap::new(),
            next_ticket: 0,
            draining: 0,
            latest: now,
            closing_drains: HashMap::new(),
            closing_deadlines: BTreeSet::new(),
            peers: Peers::new(),
            accounts,
            config,
        };
        let summary = server.restore(snapshot, now);
        Ok((server, summary))
    }

    /// A new connection from `peer` (its address: see
    /// [`PeerKey::from_ip`]): queues its `hello`. `session_random` makes its
    /// session id (a UUID v4); give it fresh random bytes.
    pub fn accept(&mut self, peer: PeerKey, session_random: [u8; 16], now: Timestamp) -> ConnId {
        let now = self.clock(now);
        let session = uuid::Builder::from_random_bytes(session_random).into_uuid();
        self.peers.connected(peer, now);
        let mut c = Connection {
            session,
            peer,
            decoder: FrameDecoder::new(self.config.max_frame_bytes),
            user: None,
            opened: now,
            last_frame: now,
            idle_timer: now,
            bucket: self
                .config
                .rate_limit
                .map(|limit| TokenBucket::full(limit.burst, now)),
            byte_bucket: self
                .config
                .byte_rate
                .map(|rate| TokenBucket::full(rate.burst, now)),
            refused_in_row: 0,
            awaiting: None,
            held_input: Vec::new(),
            drain: None,
        };
        let idle_timer = self.deadline(&c).0;
        c.idle_timer = idle_timer;
        let conn = self.connections.insert(c);
        self.idle_timers.insert((idle_timer, conn));
        // Nothing is held for a new connection, and a hello depends on
        // nothing: it goes out at once.
        self.send_hello(conn, session);
        conn
    }

    /// Bytes arrived on `conn`, cut anywhere: any number of frames, or
    /// part of one. The core buffers at most one frame limit per
    /// connection.
    ///
    /// Deadlines due by `now` fire first, as if [`Server::handle_timeout`]
    /// had been called: input that arrives after a connection's idle
    /// timeout does not revive it.
    pub fn handle_input(
        &mut self,
        conn: ConnId,
        data: &[u8],
        now: Timestamp,
    ) -> Result<(), UnknownConnection> {
        let now = self.clock(now);
        let Some(awaiting) = self.catch_up(conn, now)? else {
            // Timed out just now: the input is too late.
            return Ok(());
        };
        if awaiting {
            // A login is being checked: what follows waits for it.
            self.hold_input(conn, &[data], now);
            self.pump_drains();
            return Ok(());
        }
        let Some(c) = self.connections.get_mut(conn) else {
            return Ok(());
        };
        // Take the decoder out so frames can borrow it while the rest of
        // the core is mutated.
        let mut decoder = std::mem::replace(&mut c.decoder, FrameDecoder::new(0));
        let mut input = data;
        while let Some(frame) = decoder.decode(&mut input) {
            match self.serve_frame(conn, frame, now) {
                // Closed by this frame (logout, flood): the rest is ignored.
                Served::Closed => {
                    self.pump_drains();
                    return Ok(());
                }
                Served::Awaiting => {
                    // A login went to be checked: the rest waits for it.
                    self.hold_input(conn, &[input], now);
                    break;
                }
                Served::Open => {}
            }
        }
        if let Some(c) = self.connections.get_mut(conn) {
            c.decoder = decoder;
        }
        self.pump_drains();
        Ok(())
    }

    /// One whole frame arrived on `conn` from a transport that keeps
    /// message boundaries itself, such as a WebSocket text message: no line
    /// framing. It is served exactly as the same frame sent as a line, with
    /// the same frame limit (a longer one is answered `frame_too_large`)
    /// and rate limit; an empty message is ignored, as an empty line is.
    ///
    /// ```
    /// # use chatproto::{Accounts, Output, PeerKey, Server, ServerConfig, Timestamp};
    /// let now = Timestamp::from_unix_millis(0);
    /// let mut server = Server::new(ServerConfig::default(), Accounts::default(), now).unwrap();
    /// let conn = server.accept(PeerKey::UNSPECIFIED, [0; 16], now);
    /// server.handle_message(conn, br#"{"id":1,"cmd":"whoami"}"#, now).unwrap();
    /// assert!(server.handle_message(conn, b"whoami\nhelp", now).is_err());
    /// ```
    pub fn handle_message(
        &mut self,
        conn: ConnId,
        message: &[u8],
        now: Timestamp,
    ) -> Result<(), MessageError> {
        let now = self.clock(now);
        if message.contains(&b'\n') {
            return Err(MessageError::LineBreak);
        }
        let Some(awaiting) = self.catch_up(conn, now)? else {
            // Timed out just now: the message is too late.
            return Ok(());
        };
        if awaiting {
            // Held as the line it would have been, to be served in order.
            self.hold_input(conn, &[message, b"\n"], now);
        } else if let Some(frame) = framing::message_frame(message, self.config.max_frame_bytes) {
            self.serve_frame(conn, frame, now);
        }
        self.pump_drains();
        Ok(())
    }

    /// The transport under `conn` is gone (reset, end of stream, write
    /// error). The user, if any, goes offline and others are told.
    pub fn handle_disconnect(
        &mut self,
        conn: ConnId,
        now: Timestamp,
    ) -> Result<(), UnknownConnection> {
        let now = self.clock(now);
        // Nothing more can be written to it: what waits for it goes.
        self.ledger.forget_held(conn);
        let mark = self.begin();
        let known = self.forget(conn, now, true);
        self.settle(mark);
        self.pump_drains();
        known.ok_or(UnknownConnection(conn))
    }

    /// Ends `conn` for a reason the driver found: queues `bye` with the
    /// reason, then [`Output::Close`]; the user, if any, goes offline and
    /// others are told.
    pub fn close(
        &mut self,
        conn: ConnId,
        reason: CloseReason,
        now: Timestamp,
    ) -> Result<(), UnknownConnection> {
        match reason {
            // Nothing known written: what a drain had in flight stays
            // queued.
            CloseReason::SlowConsumer => self.cut_off_slow_consumer(conn, usize::MAX, now),
            CloseReason::ServerFull => {
                let now = self.clock(now);
                if self.connections.get(conn).is_none() {
                    return Err(UnknownConnection(conn));
                }
                let mark = self.begin();
                self.say_bye(conn, ByeReason::ServerFull, now);
                self.settle(mark);
                self.pump_drains();
                Ok(())
            }
        }
    }

    /// The driver cuts `conn` off as a slow consumer: all but the newest
    /// `unsent_frames` of the frames it was given for `conn` were written,
    /// and it drops those unwritten ones. Queues `bye slow_consumer` and
    /// the close, as [`Server::close`] does; offline messages among the
    /// dropped frames stay queued, those written leave the queue. Unlike
    /// [`Server::handle_drained`] it hands nothing more over and fires no
    /// timer, so nothing new is queued for `conn` before the `bye`.
    pub fn cut_off_slow_consumer(
        &mut self,
        conn: ConnId,
        unsent_frames: usize,
        now: Timestamp,
    ) -> Result<(), UnknownConnection> {
        let now = self.clock(now);
        if self.connections.get(conn).is_none() {
            return Err(UnknownConnection(conn));
        }
        self.record_written(conn, unsent_frames);
        self.end_drain(conn);
        let mark = self.begin();
        self.say_bye(conn, ByeReason::SlowConsumer, now);
        self.settle(mark);
        self.pump_drains();
        Ok(())
    }

    /// Ends every connection with `bye` reason `server_shutdown`. Users go
    /// offline (the store is told) without presence notices, since everyone
    /// is leaving.
    pub fn shutdown(&mut self, now: Timestamp) {
        let now = self.clock(now);
        let ids: Vec<ConnId> = self.connections.ids().collect();
        let bye = ServerFrame::Bye {
            reason: ByeReason::ServerShutdown,
        }
        .encode();
        let mark = self.begin();
        for conn in ids {
            self.note_kind(Kind::Fact);
            self.transmit(conn, bye.clone());
            self.outputs.push_back(Output::Close {
                conn,
                reason: ByeReason::ServerShutdown,
            });
            self.forget(conn, now, false);
        }
        self.settle(mark);
    }

    /// Time has passed: fires every deadline due by `now` (idle timeouts,
    /// lock expiries). Early or repeated calls do nothing.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let now = self.clock(now);
        while let Some(&(due, conn)) = self.idle_timers.first() {
            if due > now {
                break;
            }
            self.idle_timers.pop_first();
            let Some(c) = self.connections.get(conn) else {
                continue;
            };
            let (deadline, reason) = self.deadline(c);
            if deadline > now {
                if let Some(c) = self.connections.get_mut(conn) {
                    c.idle_timer = deadline;
                }
                self.idle_timers.insert((deadline, conn));
            } else {
                let mark = self.begin();
                self.say_bye(conn, reason, now);
                self.settle(mark);
            }
        }
        while let Some(&(due, conn)) = self.closing_deadlines.first() {
            if due > now {
                break;
            }
            self.give_up_closing_drain(conn);
        }
        for ended in self.lockout.expire(now) {
            // Stored for every name, account or not: so is its end.
            if ended.had_record {
                self.ledger
                    .record_fact(Change::LockoutCleared { user: ended.name }, None);
            }
        }
        self.pump_drains();
    }

    /// The verdict on an [`Output::VerifyPassword`]: whether the password
    /// matched the hash. The login goes on from there, and the
    /// connection's frames that waited behind it are served. A failure
    /// counts toward the lockout even if the connection has gone meanwhile.
    /// An unknown or already answered ticket is ignored.
    pub fn handle_verification(&mut self, ticket: VerifyTicket, matches: bool, now: Timestamp) {
        let now = self.clock(now);
        let Some(pending) = self.verifications.remove(&ticket) else {
            return;
        };
        if self.poll_timeout().is_some_and(|due| due <= now) {
            self.handle_timeout(now);
        }
        let PendingLogin {
            conn,
            peer,
            id,
            name,
            account,
            plain_verdict,
        } = pending;
        self.peers
            .check_ended(peer, self.config.login_rate_per_peer);
        let matches = plain_verdict.unwrap_or(matches);
        let open = self
            .connections
            .get(conn)
            .is_some_and(|c| c.awaiting == Some(ticket));
        let mark = self.begin();
        if !open {
            // Gone meanwhile: a wrong guess still counts.
            if !(matches && account.is_some()) {
                self.count_failure(&name, account.is_some(), now);
            }
            self.settle(mark);
            return;
        }
        if let Some(c) = self.connections.get_mut(conn) {
            c.awaiting = None;
        }
        self.reschedule(conn);
        // Locked by other attempts while this one was checked.
        self.ledger.read(Key::Name(&name));
        let result = match self.lockout.locked_until(name.as_str(), now) {
            Some(until) => self.refuse_locked(conn, &name, until, false, now),
            None => self.finish_login(conn, id, name, account, matches, now),
        };
        if let Err(error) = result {
            self.send_error(conn, id, &error);
        }
        self.settle(mark);
        let held = self
            .connections
            .get_mut(conn)
            .map(|c| std::mem::take(&mut c.held_input))
            .unwrap_or_default();
        if !held.is_empty() {
            let _ = self.handle_input(conn, &held, now);
        }
        self.pump_drains();
    }

    /// A page of `conn`'s user's offline queue, read from storage for an
    /// [`Output::LoadOffline`]: the messages after its `after_seq`, oldest
    /// first. They go to the connection at once; an empty page means
    /// storage holds nothing more. A page for a connection that closed
    /// meanwhile, or that asked for none, is ignored: its messages stay
    /// queued.
    pub fn handle_offline_page(
        &mut self,
        conn: ConnId,
        page: Vec<QueuedMessage>,
        now: Timestamp,
    ) -> Result<(), UnknownConnection> {
        let now = self.clock(now);
        let c = self
            .connections
            .get_mut(conn)
            .ok_or(UnknownConnection(conn))?;
        let (Some(user), Some(drain)) = (c.user, c.drain.as_mut()) else {
            return Ok(());
        };
        if !std::mem::take(&mut drain.loading) {
            return Ok(());
        }
        let after = drain.after_seq();
        let page: Vec<QueuedMessage> = page.into_iter().filter(|m| m.seq > after).collect();
        if page.is_empty() {
            // Storage has no more than what is in flight: the core's count
            // was high (it never is, unless storage was changed behind it).
            let in_flight = drain.in_flight();
            self.offline.truncate(user, in_flight);
            self.finish_drain_if_done(conn, user);
        } else {
            // Asked for once nothing for `conn` waited: nothing does now,
            // since everything since went through this drain's gate.
            self.hand_over(conn, page);
        }
        self.catch_up_timers(now);
        self.pump_drains();
        Ok(())
    }

    /// The driver's backlog for `conn` is low: all but `unsent_frames` of
    /// the frames it was given for `conn` are written to the transport
    /// (unsent frames are the newest; 0 when everything is out).
    ///
    /// Offline messages count as delivered, and leave their queue, once
    /// written; while a queue is being handed over, this is what brings
    /// its next page. A driver calls it after a write leaves the backlog
    /// below its low-water mark, and once more, with the final count, when
    /// a connection's socket is gone or its unwritten output is dropped
    /// (before [`Server::close`] for a slow consumer, before
    /// [`Server::handle_disconnect`], and after an [`Output::Close`] once
    /// the socket is done). Without these calls an offline queue stops
    /// after its first page, and messages are kept, never lost.
    ///
    /// Cheap when nothing is being handed over. A closed connection is
    /// answered [`UnknownConnection`] unless it closed mid-drain.
    pub fn handle_drained(
        &mut self,
        conn: ConnId,
        unsent_frames: usize,
        now: Timestamp,
    ) -> Result<(), UnknownConnection> {
        let now = self.clock(now);
        let Some(c) = self.connections.get_mut(conn) else {
            // Closed: its last report settles what it delivered.
            let (user, mut drain) = self
                .closing_drains
                .remove(&conn)
                .ok_or(UnknownConnection(conn))?;
            self.closing_deadlines.retain(|&(_, c)| c != conn);
            let written = drain.written(unsent_frames);
            self.delivered(user, written);
            self.resume_drain(user);
            self.catch_up_timers(now);
            self.pump_drains();
            return Ok(());
        };
        let (Some(user), Some(loading)) = (c.user, c.drain.as_ref().map(|d| d.loading)) else {
            return Ok(());
        };
        self.record_written(conn, unsent_frames);
        if !loading {
            self.next_page(conn, user);
        }
        self.catch_up_timers(now);
        self.pump_drains();
        Ok(())
    }

    /// The outcome of an [`Output::Persist`] batch.
    ///
    /// Committed: the outputs that waited for it go out (drain
    /// [`Server::poll_output`]), and the next batch, if changes were made
    /// meanwhile, comes after them.
    ///
    /// Failed: the batch did not happen, nor did anything made after it.
    /// The core takes its changes back from what it recorded when it made
    /// them: a stored message leaves its queue, a block is lifted, a login
    /// is taken back (silently: the connection stays open, logged out), a
    /// failed-login count is as before. Every held answer that depended on
    /// them becomes `unavailable` under its request id; other output that
    /// depended on them is dropped. What cannot be taken back is recorded
    /// again in the next batch: users who went offline stay offline, and
    /// offline messages written to their recipient stay delivered; a `bye`
    /// and a close still go out.
    ///
    /// A batch that is not the one in flight is ignored.
    pub fn handle_persisted(&mut self, batch: BatchId, outcome: Persisted, now: Timestamp) {
        let now = self.clock(now);
        let outputs = &mut self.outputs;
        let connections = &mut self.connections;
        let closing = &mut self.closing_drains;
        let draining = self.draining;
        let release = |output: Output, kind: Kind| {
            let drains = Drains {
                connections: &mut *connections,
                closing: &mut *closing,
                draining,
            };
            release_into(outputs, drains, output, kind)
        };
        match outcome {
            Persisted::Committed => {
                if !self.ledger.committed(batch, release) {
                    return;
                }
            }
            Persisted::Failed => {
                let unavailable = |conn, id| Output::Transmit {
                    conn,
                    frame: error_frame(id, &RequestError::Unavailable),
                };
                let Some(failure) = self.ledger.failed(batch, unavailable, release) else {
                    return;
                };
                let mut undone_sessions = HashSet::new();
                for undo in failure.undo {
                    if let Some(conn) = self.undo(undo, now) {
                        undone_sessions.insert(conn);
                    }
                }
                for fact in failure.facts {
                    if fact.session.is_some_and(|c| undone_sessions.contains(&c)) {
                        continue; // never (durably) logged in
                    }
                    self.ledger.record_fact(fact.change, fact.session);
                }
            }
        }
        // Drains that waited for this batch may go on.
        self.page_due.append(&mut self.page_gated);
        self.catch_up_timers(now);
        self.pump_drains();
    }

    /// Whether changes are waiting to be made durable: a batch in flight,
    /// or changes made since. A driver that stops waits until this is false
    /// (answering each [`Output::Persist`]), so nothing acknowledged is
    /// lost.
    pub fn persist_pending(&self) -> bool {
        self.ledger.pending()
    }

    /// The next thing to do, if any. Drain it until `None` after every
    /// `handle_*`, `accept`, `close` or `shutdown` call.
    pub fn poll_output(&mut self) -> Option<Output> {
        let mut output = self.outputs.pop_front();
        if output.is_none() {
            // Everything else polled first: the batch holds every change
            // made by the calls before.
            output = self
                .ledger
                .take_batch()
                .map(|(batch, changes)| Output::Persist { batch, changes });
        }
        if output.is_none() && self.outputs.capacity() > OUTPUT_QUEUE_SHRINK_ABOVE {
            // An exceptional burst (a presence storm) grew the queue; give
            // it back. Ordinary fan-outs stay below the threshold, so the
            // queue is not reallocated on every broadcast.
            self.outputs.shrink_to(OUTPUT_QUEUE_KEEP);
        }
        output
    }

    /// When to call [`Server::handle_timeout`] next, at the latest. It may
    /// be early (a connection was active since the deadline was set);
    /// calling then is harmless.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_timer().map(|(at, _)| at)
    }

    /// The next deadline, as [`Server::poll_timeout`] gives it, and which
    /// timer it is: for a driver that logs why it wakes.
    ///
    /// ```
    /// # use chatproto::{Accounts, PeerKey, Server, ServerConfig, Timer, Timestamp};
    /// let now = Timestamp::from_unix_millis(0);
    /// let mut server = Server::new(ServerConfig::default(), Accounts::new(), now).unwrap();
    /// server.accept(PeerKey::UNSPECIFIED, [0; 16], now);
    /// let (_, timer) = server.next_timer().unwrap();
    /// assert_eq!(timer, Timer::Login);
    /// ```
    pub fn next_timer(&self) -> Option<(Timestamp, Timer)> {
        let connection = self.idle_timers.first().map(|&(at, conn)| {
            let timer = match self.connections.get(conn).map(|c| self.deadline(c).1) {
                Some(ByeReason::LoginTimeout) => Timer::Login,
                _ => Timer::Idle,
            };
            (at, timer)
        });
        [
            connection,
            self.lockout
                .next_expiry()
                .map(|at| (at, Timer::LoginRecord)),
            self.closing_deadlines
                .first()
                .map(|&(at, _)| (at, Timer::ClosingDrain)),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|&(at, _)| at)
    }

    /// Counters, as `debug server` shows them.
    pub fn debug_state(&self, now: Timestamp) -> DebugState {
        let now = self.latest.max(now);
        DebugState {
            connections: self.connections.len(),
            users_online: self.presence.online().len(),
            queued_offline_messages: self.offline.total().messages,
            locked_accounts: self.lockout.locked_accounts(),
            uptime_secs: (now - self.started_at).as_secs(),
        }
    }

    /// How many users are logged in now.
    pub fn users_online(&self) -> usize {
        self.presence.online().len()
    }

    /// Who is logged in on `conn`.
    pub fn user(&self, conn: ConnId) -> Option<&Username> {
        let user = self.connections.get(conn)?.user?;
        Some(self.accounts.name(user))
    }

    /// Whether `conn` is open.
    pub fn is_open(&self, conn: ConnId) -> bool {
        self.connections.get(conn).is_some()
    }

    /// Bytes buffered for `conn`'s incomplete frame.
    pub fn buffered_input(&self, conn: ConnId) -> Option<usize> {
        Some(self.connections.get(conn)?.decoder.buffered())
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The accounts served.
    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    /// Loads lasting state into empty structures.
    fn restore(&mut self, snapshot: &Snapshot, now: Timestamp) -> RestoreSummary {
        let mut summary = RestoreSummary::default();
        for (user, messages) in &snapshot.offline {
            match self.accounts.id(user.as_str()) {
                Some(id) => {
                    for m in messages {
                        self.offline.restore(id, m.clone());
                        summary.offline_messages += 1;
                    }
                }
                None => summary.skipped += messages.len(),
            }
        }
        for (user, size) in &snapshot.offline_sizes {
            match self.accounts.id(user.as_str()) {
                // Texts that stay in storage: only their count is kept.
                Some(id) if self.offline.external() => {
                    self.offline.restore_size(id, *size);
                    summary.offline_messages += size.messages;
                }
                _ => summary.skipped += size.messages,
            }
        }
        for (blocker, targets) in &snapshot.blocks {
            for target in targets {
                match (
                    self.accounts.id(blocker.as_str()),
                    self.accounts.id(target.as_str()),
                ) {
                    (Some(a), Some(b)) if a != b => {
                        self.blocks.block(a, b);
                        summary.blocks += 1;
                    }
                    _ => summary.skipped += 1,
                }
            }
        }
        for (user, seen) in &snapshot.last_seen {
            let Some(id) = self.accounts.id(user.as_str()) else {
                summary.skipped += 1;
                continue;
            };
            let at = match *seen {
                LastSeen::Offline { at } => at,
                LastSeen::Online { .. } => {
                    // Online when the last run stopped: seen until now.
                    let change = Change::LoggedOut {
                        user: user.clone(),
                        at: now,
                    };
                    self.ledger.record_fact(change, None);
                    now
                }
            };
            self.presence.restore_last_seen(id, at);
            summary.last_seen += 1;
        }
        // Every name tried, account or not, so that a restart does not
        // tell them apart.
        for (user, state) in &snapshot.lockouts {
            let known = self.accounts.contains(user.as_str());
            if self.lockout.restore(user, known, *state, now) {
                summary.lockouts += 1;
            } else {
                // Ran out while the server was down: storage drops it too.
                self.ledger
                    .record_fact(Change::LockoutCleared { user: user.clone() }, None);
            }
        }
        summary
    }

    fn handle_frame(&mut self, conn: ConnId, frame: &[u8], now: Timestamp) {
        match Request::parse_frame(frame) {
            Ok(Request { id, command }) => {
                if let Err(error) = self.handle_command(conn, id, command, now) {
                    self.send_error(conn, id, &error);
                }
            }
            Err(rejected) => self.send_error(conn, rejected.id, &rejected.error),
        }
    }

    fn handle_command(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        command: Command,
        now: Timestamp,
    ) -> Result<(), RequestError> {
        let me = self.connections.get(conn).and_then(|c| c.user);
        if let Some(me) = me {
            // Their session, queue and blocks: every answer reads them.
            self.ledger.read(Key::User(me));
        }
        match (command, me) {
            (Command::Help, _) => {
                self.help(conn, id);
                Ok(())
            }
            (Command::Login { user, password }, _) => self.login(conn, id, user, password, now),
            (Command::Logout, _) => {
                self.reply(conn, id, Reply::Logout, "goodbye".to_owned());
                self.say_bye(conn, ByeReason::Logout, now);
                Ok(())
            }
            (_, None) => Err(RequestError::NotLoggedIn),
            (Command::Message { to, text }, Some(me)) => self.message(conn, id, me, to, text, now),
            (Command::Broadcast { text }, Some(me)) => {
                self.broadcast(conn, id, me, text, now);
                Ok(())
            }
            (Command::Whoami, Some(me)) => {
                let user = self.accounts.name(me).clone();
                let session = self
                    .connections
                    .get(conn)
                    .map(|c| c.session)
                    .unwrap_or_default();
                let text = format!("you are {user} (session {session})");
                self.reply(conn, id, Reply::Whoami { user, session }, text);
                Ok(())
            }
            (Command::Whoelse, Some(me)) => {
                self.ledger.read(Key::Online);
                let users = self.visible_users(me, self.presence.online().iter().copied());
                let text = list_text("online now", &users);
                self.reply(conn, id, Reply::Whoelse { users }, text);
                Ok(())
            }
            (Command::Whoelsesince { seconds }, Some(me)) => {
                self.ledger.read(Key::Online);
                let since = now.saturating_sub(Duration::from_secs(seconds));
                let candidates = self
                    .accounts
                    .ids()
                    .filter(|&u| self.presence.seen_since(u, since));
                let users = self.visible_users(me, candidates);
                let text = list_text(&format!("online in the last {seconds} s"), &users);
                self.reply(conn, id, Reply::Whoelsesince { users }, text);
                Ok(())
            }
            (Command::Block { user }, Some(me)) => self.block(conn, id, me, user),
            (Command::Unblock { user }, Some(me)) => self.unblock(conn, id, me, user),
            (
                Command::Debug {
                    target: DebugTarget::Server,
                },
                Some(me),
            ) => {
                if !self.config.admins.contains(self.accounts.name(me)) {
                    return Err(RequestError::Forbidden {
                        what: "debug server",
                    });
                }
                self.ledger.read_all();
                let state = self.debug_state(now);
                let text = format!(
                    "{}, {} online, {} queued, {} locked, up {} s",
                    count(state.connections, "connection"),
                    count(state.users_online, "user"),
                    count(state.queued_offline_messages, "offline message"),
                    count(state.locked_accounts, "account"),
                    state.uptime_secs
                );
                self.reply(conn, id, Reply::Debug { state }, text);
                Ok(())
            }
            (
                Command::Debug {
                    target: DebugTarget::Client,
                },
                Some(_),
            ) => Err(RequestError::bad_arguments(
                "the server answers 'debug server'; 'debug client' is answered by your client",
            )),
        }
    }

    fn help(&mut self, conn: ConnId, id: Option<RequestId>) {
        let commands = CommandName::ALL
            .into_iter()
            .map(|cmd| CommandUsage {
                cmd,
                usage: cmd.usage().to_owned(),
            })
            .collect::<Vec<_>>();
        let text = format!(
            "commands: {}",
            commands
                .iter()
                .map(|c| c.usage.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.reply(conn, id, Reply::Help { commands }, text);
    }

    fn login(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        name: Username,
        password: Password,
        now: Timestamp,
    ) -> Result<(), RequestError> {
        if let Some(me) = self.connections.get(conn).and_then(|c| c.user) {
            return Err(RequestError::AlreadyLoggedIn {
                user: self.accounts.name(me).clone(),
            });
        }
        let peer = self
            .connections
            .get(conn)
            .map_or(PeerKey::UNSPECIFIED, |c| c.peer);
        if let Some(rate) = self.config.login_rate_per_peer {
            if !self.peers.take_login(peer, rate, now) {
                return self.refuse_login(conn, &name, RequestError::RateLimited);
            }
        }
        let account = self.accounts.id(name.as_str());
        self.ledger.read(Key::Name(&name));
        if let Some(account) = account {
            self.ledger.read(Key::User(account));
        }
        let rate = self.config.login_rate_per_name;
        match self
            .lockout
            .take_attempt(&name, account.is_some(), rate, now)
        {
            Ok(true) => {}
            Ok(false) => return self.refuse_login(conn, &name, RequestError::RateLimited),
            // Every name tried is tracked; with no room for one more, a new
            // name waits, account or not.
            Err(_) => return self.refuse_login(conn, &name, RequestError::Unavailable),
        }
        if let Some(until) = self.lockout.locked_until(name.as_str(), now) {
            return self.refuse_locked(conn, &name, until, false, now);
        }
        let mut plain_verdict = None;
        let hash = match account.map(|a| self.accounts.get(a).credential()) {
            Some(Credential::Plain(stored)) => {
                let ok = stored.matches(&password);
                match self.accounts.decoy() {
                    // Hashed accounts beside it: an unknown name costs an
                    // Argon2id check, so must a wrong password here, or
                    // timing tells the two apart. The decoy check only
                    // takes the time; the verdict is known.
                    Some(decoy) if !ok => {
                        plain_verdict = Some(false);
                        decoy.clone()
                    }
                    _ => return self.finish_login(conn, id, name, account, ok, now),
                }
            }
            Some(Credential::Hashed(hash)) => hash.clone(),
            // No such account: as costly as a wrong password, so timing
            // does not tell names apart.
            None => match self.accounts.decoy() {
                Some(decoy) => decoy.clone(),
                None => {
                    let _ = DECOY_PASSWORD.matches(&password);
                    return self.finish_login(conn, id, name, None, false, now);
                }
            },
        };
        let peer_full = self
            .config
            .max_pending_checks_per_peer
            .is_some_and(|max| self.peers.pending_checks(peer) as usize >= max);
        if self.verifications.len() >= self.config.max_pending_checks || peer_full {
            // Checks are queued faster than the driver runs them: refuse
            // rather than let the queue (and every login's wait) grow.
            return self.refuse_login(conn, &name, RequestError::Unavailable);
        }
        self.peers.check_started(peer);
        let ticket = VerifyTicket(self.next_ticket);
        self.next_ticket += 1;
        if let Some(c) = self.connections.get_mut(conn) {
            c.awaiting = Some(ticket);
        }
        self.verifications.insert(
            ticket,
            PendingLogin {
                conn,
                peer,
                id,
                name,
                account,
                plain_verdict,
            },
        );
        self.outputs.push_back(Output::VerifyPassword {
            ticket,
            peer,
            hash,
            password,
        });
        Ok(())
    }

    /// Counts a failed login for `name` (`known`: an account has it) and
    /// records the change; returns when the lock ends if this failure set
    /// one.
    fn count_failure(&mut self, name: &Username, known: bool, now: Timestamp) -> Option<Timestamp> {
        let rate = self.config.login_rate_per_name;
        let before = self.lockout.state(name.as_str());
        let state = self.lockout.record_failure(name, known, rate, now);
        // Stored for every name, so a restart does not tell them apart.
        self.ledger.record(
            Change::LockoutChanged {
                user: name.clone(),
                state,
            },
            Undo::Lockout {
                name: name.clone(),
                before,
            },
            &[Key::Name(name)],
        );
        let until = state.locked_until?;
        self.event(Event::Locked {
            user: name.clone(),
            until,
        });
        Some(until)
    }

    /// Refuses a login for `name`, locked until `until` (`just_locked`: by
    /// this very attempt).
    fn refuse_locked(
        &mut self,
        conn: ConnId,
        name: &Username,
        until: Timestamp,
        just_locked: bool,
        now: Timestamp,
    ) -> Result<(), RequestError> {
        let error = RequestError::AccountLocked {
            retry_after: seconds_until(until, now),
            just_locked,
        };
        self.refuse_login(conn, name, error)
    }

    /// Before input on `conn`: fires the deadlines due by `now`, so input
    /// after a connection's idle timeout does not revive it. Then whether
    /// the connection waits for a password check, or `None` if it just
    /// timed out.
    fn catch_up(
        &mut self,
        conn: ConnId,
        now: Timestamp,
    ) -> Result<Option<bool>, UnknownConnection> {
        if self.connections.get(conn).is_none() {
            return Err(UnknownConnection(conn));
        }
        if self.poll_timeout().is_some_and(|due| due <= now) {
            self.handle_timeout(now);
        }
        Ok(self.connections.get(conn).map(waits_for_input))
    }

    /// Keeps `input` (in parts) for after the password check `conn` waits
    /// for, within the bound; past it, the connection is flooding.
    fn hold_input(&mut self, conn: ConnId, input: &[&[u8]], now: Timestamp) {
        let bound = HELD_INPUT_FRAMES * self.config.max_frame_bytes;
        let Some(c) = self.connections.get_mut(conn) else {
            return;
        };
        let len: usize = input.iter().map(|part| part.len()).sum();
        if c.held_input.len() + len > bound {
            self.flood_out(conn, now);
        } else {
            for part in input {
                c.held_input.extend_from_slice(part);
            }
        }
    }

    /// Serves one frame (or a framing error) from `conn`, through the rate
    /// limit; says what became of the connection.
    fn serve_frame(
        &mut self,
        conn: ConnId,
        frame: Result<&[u8], FrameError>,
        now: Timestamp,
    ) -> Served {
        let mark = self.begin();
        let mut allowed = true;
        let mut flooding = false;
        if let Some(c) = self.connections.get_mut(conn) {
            c.last_frame = now;
            if let (Some(bucket), Some(rate)) = (&mut c.byte_bucket, self.config.byte_rate) {
                // An over-long line costs what the limit lets through.
                let len = frame.map_or(self.config.max_frame_bytes, <[u8]>::len);
                let cost = u32::try_from(len).unwrap_or(u32::MAX);
                allowed = bucket.take_n(cost, rate.burst, rate.per_second, now);
            }
            if let (Some(bucket), Some(limit)) = (&mut c.bucket, self.config.rate_limit) {
                // A frame refused for its bytes takes no frame token.
                allowed = allowed && bucket.take(limit.burst, limit.per_second, now);
            }
            if allowed {
                c.refused_in_row = 0;
            } else {
                c.refused_in_row = c.refused_in_row.saturating_add(1);
                let flood_after = self.config.rate_limit.map_or(0, |l| l.flood_after);
                flooding = flood_after > 0 && c.refused_in_row > flood_after;
            }
        }
        match frame {
            _ if flooding => {
                // It keeps going after `flood_after` refusals: it is not
                // listening. The rest of its input is ignored.
                self.flood_out(conn, now);
                self.settle(mark);
                return Served::Closed;
            }
            Ok(frame) if !allowed => {
                // Refused, not dropped: answer under the request's id.
                let id = Request::parse_frame(frame).map_or_else(|r| r.id, |r| r.id);
                self.send_error(conn, id, &RequestError::RateLimited);
            }
            Ok(frame) => self.handle_frame(conn, frame, now),
            Err(FrameError::TooLarge { limit }) => {
                self.send_error(conn, None, &RequestError::FrameTooLarge { limit });
            }
        }
        self.settle(mark);
        match self.connections.get(conn) {
            None => Served::Closed,
            Some(c) if waits_for_input(c) => Served::Awaiting,
            Some(_) => Served::Open,
        }
    }

    /// Closes `conn` for flooding.
    fn flood_out(&mut self, conn: ConnId, now: Timestamp) {
        let mark = self.begin();
        self.event(Event::Flooding { conn });
        self.say_bye(conn, ByeReason::Flood, now);
        self.settle(mark);
    }

    /// The rest of a login, once the password is checked.
    fn finish_login(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        name: Username,
        account: Option<UserId>,
        password_ok: bool,
        now: Timestamp,
    ) -> Result<(), RequestError> {
        let Some(user) = account.filter(|_| password_ok) else {
            return match self.count_failure(&name, account.is_some(), now) {
                Some(until) => self.refuse_locked(conn, &name, until, true, now),
                None => self.refuse_login(conn, &name, RequestError::InvalidCredentials),
            };
        };
        let rate = self.config.login_rate_per_name;
        let before = self.lockout.state(name.as_str());
        if self.lockout.record_success(&name, rate, now) {
            self.ledger.record(
                Change::LockoutCleared { user: name.clone() },
                Undo::Lockout {
                    name: name.clone(),
                    before,
                },
                &[Key::Name(&name)],
            );
        }
        if self.presence.session(user).is_some() {
            let error = RequestError::SessionElsewhere { user: name.clone() };
            return self.refuse_login(conn, &name, error);
        }

        if let Some(c) = self.connections.get_mut(conn) {
            c.user = Some(user);
        }
        let last_seen = self.presence.last_seen(user);
        self.presence.log_in(user, conn);
        self.ledger.record(
            Change::LoggedIn {
                user: name.clone(),
                at: now,
            },
            Undo::LoggedIn {
                user,
                conn,
                last_seen,
            },
            &[Key::User(user), Key::Online],
        );
        self.reply(
            conn,
            id,
            Reply::Login { user: name.clone() },
            format!("welcome, {name}"),
        );
        self.start_drain(conn, user);
        if self.ledger.enabled() && self.is_draining(conn) {
            // The answer goes out with the first page, as one write.
            self.first_page_for = Some(conn);
        }
        self.announce(user, true);
        self.event(Event::LoggedIn { conn, user: name });
        Ok(())
    }

    /// Logs a refused login and returns its error, to be answered.
    fn refuse_login(
        &mut self,
        conn: ConnId,
        name: &Username,
        error: RequestError,
    ) -> Result<(), RequestError> {
        self.event(Event::LoginRefused {
            conn,
            user: name.clone(),
            code: error.code(),
        });
        Err(error)
    }

    /// Starts handing `user`'s offline queue to `conn`, a page at a time.
    fn start_drain(&mut self, conn: ConnId, user: UserId) {
        if self.offline.size(user).messages == 0 {
            return;
        }
        if self.closing_drains.values().any(|(u, _)| *u == user) {
            // An earlier connection of this user may still be writing part
            // of the queue: this one waits for its last report (a close
            // grace at most), or it would get those messages twice.
            return;
        }
        if let Some(c) = self.connections.get_mut(conn) {
            if c.drain.replace(Drain::default()).is_none() {
                self.draining += 1;
            }
            self.next_page(conn, user);
        }
    }

    /// Hands over the pages drains asked for, where nothing they follow
    /// waits for a batch: a page goes out at once, after every frame
    /// before it, so the drain's frame numbers match what the driver was
    /// given. A drain whose connection has held output, or whose user's
    /// queue has changes not yet durable, waits for the next batch's
    /// answer.
    fn pump_drains(&mut self) {
        for conn in std::mem::take(&mut self.page_due) {
            let Some(user) = self
                .connections
                .get(conn)
                .filter(|c| c.drain.as_ref().is_some_and(|d| d.page_due))
                .and_then(|c| c.user)
            else {
                continue;
            };
            // A first page goes behind the login's held answer, which
            // waits for it; a later one waits until nothing is held.
            let started = self
                .connections
                .get(conn)
                .and_then(|c| c.drain.as_ref())
                .is_some_and(|d| d.started);
            if (started && self.ledger.holds(conn)) || self.ledger.user_dirty(user) {
                if !self.page_gated.contains(&conn) {
                    self.page_gated.push(conn);
                }
                continue;
            }
            self.give_page(conn, user);
        }
        // Input that waited for a first page: served now, in order.
        while let Some(conn) = self.input_due.pop() {
            self.resume_input(conn);
        }
    }

    /// Gives up waiting for closed `conn`'s last report: its unsettled
    /// messages stay queued, and its user's drain may start.
    fn give_up_closing_drain(&mut self, conn: ConnId) {
        self.closing_deadlines.retain(|&(_, c)| c != conn);
        if let Some((user, _)) = self.closing_drains.remove(&conn) {
            self.resume_drain(user);
        }
    }

    /// Starts `user`'s drain on the connection they are online on, if it
    /// waited for an earlier connection's drain to settle.
    fn resume_drain(&mut self, user: UserId) {
        if let Some(conn) = self.presence.session(user) {
            if !self.is_draining(conn) {
                self.start_drain(conn, user);
            }
        }
    }

    /// Asks for the next page of `user`'s queue for `conn`: handed over
    /// by [`Server::pump_drains`] once nothing it follows waits.
    fn next_page(&mut self, conn: ConnId, user: UserId) {
        let Some(drain) = self
            .connections
            .get_mut(conn)
            .and_then(|c| c.drain.as_mut())
        else {
            return;
        };
        if !self.ledger.enabled() {
            // Nothing is ever held: the page goes out now, in order.
            self.give_page(conn, user);
        } else if !drain.page_due {
            drain.page_due = true;
            self.page_due.push(conn);
        }
    }

    /// Hands `conn` the next page of `user`'s queue, from memory or by
    /// asking storage; ends the drain once everything is delivered.
    fn give_page(&mut self, conn: ConnId, user: UserId) {
        let Some(drain) = self
            .connections
            .get_mut(conn)
            .and_then(|c| c.drain.as_mut())
        else {
            return;
        };
        drain.page_due = false;
        let left = self.offline.size(user).messages;
        if left <= drain.in_flight().messages {
            self.finish_drain_if_done(conn, user);
            return;
        }
        let max_bytes = self.config.offline_page_bytes;
        if drain.in_flight().bytes > max_bytes / 2 {
            // Over half a page still unwritten: the reader has not caught
            // up, whatever the driver's low-water mark says.
            return;
        }
        let after_seq = drain.after_seq();
        match self.offline.page(user, after_seq, max_bytes) {
            Some(page) => self.hand_over(conn, page),
            None => {
                drain.loading = true;
                self.outputs.push_back(Output::LoadOffline {
                    conn,
                    user: self.accounts.name(user).clone(),
                    after_seq,
                    max_bytes,
                });
            }
        }
    }

    /// Sends a page of queued messages to `conn`, noting each in its drain.
    /// Never inside a unit of work: the frames go out at once, numbered.
    fn hand_over(&mut self, conn: ConnId, page: Vec<QueuedMessage>) {
        debug_assert!(self.unit_depth == 0 || !self.ledger.enabled());
        let first = self
            .connections
            .get(conn)
            .and_then(|c| c.drain.as_ref())
            .is_some_and(|d| !d.started);
        if first {
            self.input_due.push(conn);
        }
        if self.ledger.holds(conn) {
            // Behind the login's answer: held, numbered as they go out.
            for QueuedMessage { seq, message } in page {
                let bytes = message.size();
                let frame = ServerFrame::Message(MessageFrame {
                    from: message.from,
                    text: message.text,
                    sent_at: message.sent_at,
                    offline: true,
                })
                .encode();
                if let Some(drain) = self
                    .connections
                    .get_mut(conn)
                    .and_then(|c| c.drain.as_mut())
                {
                    drain.hand_over_held(seq, bytes);
                }
                let output = Output::Transmit { conn, frame };
                let held = Held {
                    after: 0,
                    output,
                    kind: Kind::Page,
                };
                self.ledger.hold(conn, held);
            }
            self.ledger.lift(conn);
            self.release_held();
            return;
        }
        for QueuedMessage { seq, message } in page {
            let bytes = message.size();
            let frame = ServerFrame::Message(MessageFrame {
                from: message.from,
                text: message.text,
                sent_at: message.sent_at,
                offline: true,
            })
            .encode();
            self.outputs.push_back(Output::Transmit { conn, frame });
            if let Some(drain) = self
                .connections
                .get_mut(conn)
                .and_then(|c| c.drain.as_mut())
            {
                drain.hand_over(seq, bytes);
            }
        }
    }

    /// Ends `conn`'s drain if nothing is queued or in flight any more.
    fn finish_drain_if_done(&mut self, conn: ConnId, user: UserId) {
        let done = self
            .connections
            .get(conn)
            .and_then(|c| c.drain.as_ref())
            .is_some_and(|d| d.in_flight().messages == 0 && !d.loading)
            && self.offline.size(user).messages == 0;
        if done {
            self.end_drain(conn);
        }
    }

    /// Drops `conn`'s drain, if any: what it had in flight stays queued.
    fn end_drain(&mut self, conn: ConnId) -> Option<Drain> {
        let drain = self.connections.get_mut(conn)?.drain.take()?;
        self.draining -= 1;
        if !drain.started {
            // Its later input, and its login's answer, waited for the
            // first page: they go on.
            self.input_due.push(conn);
            self.ledger.lift(conn);
            self.release_held();
        }
        Some(drain)
    }

    /// Hands the driver every held output that no longer waits.
    fn release_held(&mut self) {
        let outputs = &mut self.outputs;
        let connections = &mut self.connections;
        let closing = &mut self.closing_drains;
        let draining = self.draining;
        self.ledger.release(|output, kind| {
            let drains = Drains {
                connections: &mut *connections,
                closing: &mut *closing,
                draining,
            };
            release_into(outputs, drains, output, kind);
        });
    }

    /// Serves the input `conn` held back, once it no longer waits (for a
    /// password check, or for its offline queue's first page).
    fn resume_input(&mut self, conn: ConnId) {
        let Some(c) = self.connections.get_mut(conn) else {
            return;
        };
        if waits_for_input(c) || c.held_input.is_empty() {
            return;
        }
        let held = std::mem::take(&mut c.held_input);
        let _ = self.handle_input(conn, &held, self.latest);
    }

    /// The driver has `unsent_frames` of open `conn`'s frames left: the
    /// queued messages its drain now knows written leave the queue.
    fn record_written(&mut self, conn: ConnId, unsent_frames: usize) {
        let Some(c) = self.connections.get_mut(conn) else {
            return;
        };
        if let (Some(user), Some(drain)) = (c.user, c.drain.as_mut()) {
            let written = drain.written(unsent_frames);
            self.delivered(user, written);
        }
    }

    /// Offline messages of `user`'s are now written to their connection:
    /// they leave the queue.
    fn delivered(&mut self, user: UserId, written: QueueSize) {
        if written.messages == 0 {
            return;
        }
        self.offline.remove_front(user, written);
        // Written to the connection: delivered, whatever storage says.
        let change = Change::MessagesDelivered {
            to: self.accounts.name(user).clone(),
            count: written.messages,
        };
        self.ledger.record_fact(change, None);
    }

    /// `now`, or the latest time seen if `now` is earlier: time never runs
    /// backwards for the core.
    fn clock(&mut self, now: Timestamp) -> Timestamp {
        self.latest = self.latest.max(now);
        self.latest
    }

    /// Fires deadlines due by `now`, for inputs that do not go through
    /// `catch_up`.
    fn catch_up_timers(&mut self, now: Timestamp) {
        if self.poll_timeout().is_some_and(|due| due <= now) {
            self.handle_timeout(now);
        }
    }

    fn message(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        me: UserId,
        to: Username,
        text: MessageText,
        now: Timestamp,
    ) -> Result<(), RequestError> {
        let recipient = self
            .accounts
            .id(to.as_str())
            .ok_or_else(|| RequestError::unknown_user(to.as_str()))?;
        if recipient == me {
            return Err(RequestError::SelfTarget { action: "message" });
        }
        self.ledger.read(Key::User(recipient));
        if self.blocks.has_blocked(recipient, me) {
            return Err(RequestError::Blocked { user: to });
        }
        let from = self.accounts.name(me).clone();
        // While their queue is not empty (being handed over, or waiting to
        // be), a message joins its end, so it never overtakes older ones.
        let online = self.presence.session(recipient).filter(|&their_conn| {
            self.offline.size(recipient).messages == 0 && !self.is_draining(their_conn)
        });
        let stored = match online {
            Some(their_conn) => {
                let frame = ServerFrame::Message(MessageFrame {
                    from,
                    text,
                    sent_at: now,
                    offline: false,
                });
                self.send(their_conn, &frame);
                false
            }
            None => {
                let message = OfflineMessage {
                    from,
                    text,
                    sent_at: now,
                };
                let bytes = message.size();
                self.offline
                    .push(recipient, message.clone())
                    .map_err(|limit| RequestError::MailboxFull {
                        user: to.clone(),
                        limit,
                    })?;
                self.ledger.record(
                    Change::MessageQueued {
                        to: to.clone(),
                        message,
                    },
                    Undo::Queued {
                        to: recipient,
                        bytes,
                    },
                    &[Key::User(recipient)],
                );
                true
            }
        };
        let text = if stored {
            format!("{to} is offline: the message will be delivered when they log in")
        } else {
            let mut text = String::with_capacity(21 + to.as_str().len());
            text.push_str("message delivered to ");
            text.push_str(to.as_str());
            text
        };
        self.reply(conn, id, Reply::Message { to, stored }, text);
        Ok(())
    }

    fn broadcast(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        me: UserId,
        text: MessageText,
        now: Timestamp,
    ) {
        self.ledger.read(Key::Online);
        // One encoding, shared by every recipient.
        let frame = ServerFrame::Broadcast(BroadcastFrame {
            from: self.accounts.name(me).clone(),
            text,
            sent_at: now,
        })
        .encode();
        let blockers = self.blocks.blockers_of(me);
        let (mut delivered, mut skipped) = (0, 0);
        for &user in self.presence.online() {
            if user == me {
                continue;
            }
            if blockers.contains(&user) {
                skipped += 1;
                continue;
            }
            if let Some(their_conn) = self.presence.session(user) {
                let output = Output::Transmit {
                    conn: their_conn,
                    frame: frame.clone(),
                };
                let drains = Drains {
                    connections: &mut self.connections,
                    closing: &mut self.closing_drains,
                    draining: self.draining,
                };
                queue_in_unit(&mut self.outputs, drains, &self.ledger, output);
                delivered += 1;
            }
        }
        let mut text = format!("broadcast delivered to {}", count(delivered, "user"));
        if skipped > 0 {
            text += &format!(
                "; it could not be delivered to {} who blocked you",
                count(skipped, "recipient")
            );
        }
        self.reply(conn, id, Reply::Broadcast { delivered, skipped }, text);
    }

    fn block(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        me: UserId,
        user: Username,
    ) -> Result<(), RequestError> {
        let target = self.target(me, &user, "block")?;
        if self.blocks.block(me, target) {
            self.ledger.record(
                Change::Blocked {
                    blocker: self.accounts.name(me).clone(),
                    target: user.clone(),
                },
                Undo::Blocked {
                    blocker: me,
                    target,
                },
                &[Key::User(me), Key::User(target)],
            );
        }
        let text = format!("{user} is blocked");
        self.reply(conn, id, Reply::Block { user }, text);
        Ok(())
    }

    fn unblock(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        me: UserId,
        user: Username,
    ) -> Result<(), RequestError> {
        let target = self.target(me, &user, "unblock")?;
        if !self.blocks.unblock(me, target) {
            return Err(RequestError::NotBlocked { user });
        }
        self.ledger.record(
            Change::Unblocked {
                blocker: self.accounts.name(me).clone(),
                target: user.clone(),
            },
            Undo::Unblocked {
                blocker: me,
                target,
            },
            &[Key::User(me), Key::User(target)],
        );
        let text = format!("{user} is unblocked");
        self.reply(conn, id, Reply::Unblock { user }, text);
        Ok(())
    }

    /// The account `user` names, refusing unknown names and oneself.
    fn target(
        &mut self,
        me: UserId,
        user: &Username,
        action: &'static str,
    ) -> Result<UserId, RequestError> {
        let target = self
            .accounts
            .id(user.as_str())
            .ok_or_else(|| RequestError::unknown_user(user.as_str()))?;
        if target == me {
            return Err(RequestError::SelfTarget { action });
        }
        self.ledger.read(Key::User(target));
        Ok(target)
    }

    /// The names among `candidates` that `me` may see: not `me`, and not
    /// anyone who has blocked `me`. Sorted.
    fn visible_users(&self, me: UserId, candidates: impl Iterator<Item = UserId>) -> Vec<Username> {
        let blockers = self.blocks.blockers_of(me);
        let mut users: Vec<Username> = candidates
            .filter(|u| *u != me && !blockers.contains(u))
            .map(|u| self.accounts.name(u).clone())
            .collect();
        users.sort_unstable();
        users
    }

    /// Tells everyone online, except whom `user` has blocked, that `user`
    /// came or went.
    fn announce(&mut self, user: UserId, online: bool) {
        self.ledger.read(Key::User(user));
        self.ledger.read(Key::Online);
        let frame = ServerFrame::Presence(PresenceFrame {
            user: self.accounts.name(user).clone(),
            online,
        })
        .encode();
        let blocked = self.blocks.targets_of(user);
        for &other in self.presence.online() {
            if other == user || blocked.contains(&other) {
                continue;
            }
            if let Some(conn) = self.presence.session(other) {
                let output = Output::Transmit {
                    conn,
                    frame: frame.clone(),
                };
                let drains = Drains {
                    connections: &mut self.connections,
                    closing: &mut self.closing_drains,
                    draining: self.draining,
                };
                queue_in_unit(&mut self.outputs, drains, &self.ledger, output);
            }
        }
    }

    /// Queues `bye` and the close, and forgets the connection.
    fn say_bye(&mut self, conn: ConnId, reason: ByeReason, now: Timestamp) {
        // A fact: it goes out even if a batch it waits behind fails.
        self.note_kind(Kind::Fact);
        self.send(conn, &ServerFrame::Bye { reason });
        self.outputs.push_back(Output::Close { conn, reason });
        self.forget(conn, now, true);
    }

    /// Drops `conn`; its user goes offline, announced if `announce`.
    fn forget(&mut self, conn: ConnId, now: Timestamp, announce: bool) -> Option<()> {
        let c = self.connections.remove(conn)?;
        self.idle_timers.remove(&(c.idle_timer, conn));
        self.peers
            .disconnected(c.peer, self.config.login_rate_per_peer);
        if let Some(drain) = c.drain {
            self.draining -= 1;
            if let Some(user) = c.user.filter(|_| drain.in_flight().messages > 0) {
                // Its last frames may still be written: the driver's final
                // report says which.
                if self.closing_drains.len() >= MAX_CLOSING_DRAINS {
                    if let Some(&(_, oldest)) = self.closing_deadlines.first() {
                        self.give_up_closing_drain(oldest);
                    }
                }
                self.closing_drains.insert(conn, (user, drain));
                self.closing_deadlines
                    .insert((now + CLOSING_DRAIN_TIMEOUT, conn));
            }
        }
        if let Some(user) = c.user {
            self.presence.log_out(user, now);
            let name = self.accounts.name(user).clone();
            let change = Change::LoggedOut {
                user: name.clone(),
                at: now,
            };
            self.ledger.record_fact(change, Some(conn));
            if announce {
                self.announce(user, false);
            }
            self.event(Event::LoggedOut { conn, user: name });
        }
        Some(())
    }

    /// Puts `conn` in the timer queue at its current deadline, if that is
    /// earlier than where it sits (a later entry is moved when it fires).
    fn reschedule(&mut self, conn: ConnId) {
        let Some(c) = self.connections.get(conn) else {
            return;
        };
        let (deadline, _) = self.deadline(c);
        if deadline < c.idle_timer {
            let old = (c.idle_timer, conn);
            self.idle_timers.remove(&old);
            self.idle_timers.insert((deadline, conn));
            if let Some(c) = self.connections.get_mut(conn) {
                c.idle_timer = deadline;
            }
        }
    }

    /// When `c` times out, and why: idle for too long, or (before login)
    /// not logged in in time, whichever comes first.
    fn deadline(&self, c: &Connection) -> (Timestamp, ByeReason) {
        let idle = (
            c.last_frame + self.config.idle_timeout,
            ByeReason::IdleTimeout,
        );
        match self.config.login_timeout {
            // A login being checked is not held against the client: a
            // slow check must not turn a right password into a timeout.
            Some(limit) if c.user.is_none() && c.awaiting.is_none() => {
                let login = (c.opened + limit, ByeReason::LoginTimeout);
                if login.0 < idle.0 {
                    login
                } else {
                    idle
                }
            }
            _ => idle,
        }
    }

    fn reply(&mut self, conn: ConnId, id: Option<RequestId>, reply: Reply, text: String) {
        self.answered(conn, id);
        self.send(conn, &ServerFrame::Ok(OkFrame { id, reply, text }));
    }

    fn send_error(&mut self, conn: ConnId, id: Option<RequestId>, error: &RequestError) {
        self.answered(conn, id);
        self.send_error_frame(conn, id, error);
    }

    /// Notes an answer, which a failed batch it waits for turns into
    /// `unavailable`.
    fn answered(&mut self, _conn: ConnId, id: Option<RequestId>) {
        self.note_kind(Kind::Answer(id));
    }

    /// Notes what the next output is, for a failed batch to decide its
    /// fate (anything not noted is dropped with the batch).
    fn note_kind(&mut self, kind: Kind) {
        if self.ledger.enabled() {
            self.unit_kinds.push((self.outputs.len(), kind));
        }
    }

    fn send_hello(&mut self, conn: ConnId, session: uuid::Uuid) {
        self.send(
            conn,
            &ServerFrame::Hello {
                session,
                version: PROTOCOL_VERSION,
            },
        );
    }

    fn send_error_frame(&mut self, conn: ConnId, id: Option<RequestId>, error: &RequestError) {
        self.transmit(conn, error_frame(id, error));
    }

    fn send(&mut self, conn: ConnId, frame: &ServerFrame) {
        self.transmit(conn, frame.encode());
    }

    /// Queues `frame` for `conn`. Inside a unit of work it is settled
    /// (sent or held) with the unit; outside, it goes out at once.
    fn transmit(&mut self, conn: ConnId, frame: Bytes) {
        let output = Output::Transmit { conn, frame };
        // Without durability nothing is ever held: it goes out now.
        if self.unit_depth == 0 || !self.ledger.enabled() {
            let drains = Drains {
                connections: &mut self.connections,
                closing: &mut self.closing_drains,
                draining: self.draining,
            };
            release_into(&mut self.outputs, drains, output, Kind::Caused);
        } else {
            self.outputs.push_back(output);
        }
    }

    /// Starts a unit of work (a frame served, a timer fired): its outputs
    /// are sent or held together, by what it read. Units nest; the
    /// outermost settles.
    fn begin(&mut self) -> usize {
        self.unit_depth += 1;
        self.outputs.len()
    }

    /// Ends the unit of work begun at `mark`: its outputs go out, or wait
    /// for the newest unanswered batch it read or changed, behind what
    /// their connections already hold.
    fn settle(&mut self, mark: usize) {
        self.unit_depth -= 1;
        if self.unit_depth > 0 {
            return;
        }
        let after = self.ledger.take_reads();
        let first_page_for = self.first_page_for.take();
        let fast = after == 0
            && first_page_for.is_none()
            && (!self.ledger.holds_any()
                || !self.outputs.range(mark..).any(|o| match o {
                    Output::Transmit { conn, .. } | Output::Close { conn, .. } => {
                        self.ledger.holds(*conn)
                    }
                    _ => false,
                }));
        if fast {
            self.unit_kinds.clear();
            // (Without durability, frames were counted as they were queued.)
            let counted = !self.ledger.enabled();
            if !counted && (self.draining > 0 || !self.closing_drains.is_empty()) {
                for output in self.outputs.range(mark..) {
                    if let Output::Transmit { conn, .. } = output {
                        let drains = Drains {
                            connections: &mut self.connections,
                            closing: &mut self.closing_drains,
                            draining: self.draining,
                        };
                        count_frame(drains, *conn);
                    }
                }
            }
            return;
        }
        let tail: Vec<Output> = self.outputs.drain(mark..).collect();
        let mut kinds = std::mem::take(&mut self.unit_kinds).into_iter().peekable();
        for (at, output) in (mark..).zip(tail) {
            let noted = kinds.next_if(|&(i, _)| i == at).map(|(_, kind)| kind);
            let (conn, kind) = match &output {
                Output::Transmit { conn, .. } => (*conn, noted.unwrap_or(Kind::Caused)),
                Output::Close { conn, .. } => (*conn, Kind::Fact),
                // Events, password checks and page reads wait for nothing.
                _ => {
                    self.outputs.push_back(output);
                    continue;
                }
            };
            let after = match kind {
                Kind::Answer(_) if first_page_for == Some(conn) => FIRST_PAGE,
                _ => after,
            };
            if self.ledger.must_hold(conn, after) {
                self.ledger.hold(
                    conn,
                    Held {
                        after,
                        output,
                        kind,
                    },
                );
            } else {
                let drains = Drains {
                    connections: &mut self.connections,
                    closing: &mut self.closing_drains,
                    draining: self.draining,
                };
                release_into(&mut self.outputs, drains, output, Kind::Caused);
            }
        }
    }

    /// Takes back one change of a failed batch; for a login, returns the
    /// connection whose session it was.
    fn undo(&mut self, undo: Undo, now: Timestamp) -> Option<ConnId> {
        match undo {
            Undo::Queued { to, bytes } => self.offline.pop_back(to, bytes),
            Undo::Blocked { blocker, target } => {
                self.blocks.unblock(blocker, target);
            }
            Undo::Unblocked { blocker, target } => {
                self.blocks.block(blocker, target);
            }
            Undo::LoggedIn {
                user,
                conn,
                last_seen,
            } => {
                let still_on = self
                    .connections
                    .get(conn)
                    .is_some_and(|c| c.user == Some(user));
                if still_on {
                    self.end_drain(conn);
                    if let Some(c) = self.connections.get_mut(conn) {
                        c.user = None;
                    }
                    self.presence.log_out(user, now);
                    // Logged out again: the login timeout applies again.
                    self.reschedule(conn);
                }
                self.presence.set_last_seen(user, last_seen);
                return Some(conn);
            }
            Undo::Lockout { name, before } => {
                let known = self.accounts.contains(name.as_str());
                self.lockout.put_back(&name, known, before, now);
            }
        }
        None
    }

    /// Whether `conn` is being handed its offline queue.
    fn is_draining(&self, conn: ConnId) -> bool {
        self.draining > 0
            && self
                .connections
                .get(conn)
                .is_some_and(|c| c.drain.is_some())
    }

    fn event(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }
}

/// Queues an output of the unit of work being served: settled with the
/// unit, or (without durability, where nothing waits) out at once.
fn queue_in_unit(
    outputs: &mut VecDeque<Output>,
    drains: Drains<'_>,
    ledger: &Ledger,
    output: Output,
) {
    if ledger.enabled() {
        outputs.push_back(output);
    } else {
        release_into(outputs, drains, output, Kind::Caused);
    }
}

/// Puts a settled output in the queue the driver polls, numbering it in
/// its connection's drain if one is in progress.
fn release_into(outputs: &mut VecDeque<Output>, drains: Drains<'_>, output: Output, kind: Kind) {
    if let Output::Transmit { conn, .. } = &output {
        if kind == Kind::Page {
            if let Some(drain) = drains
                .connections
                .get_mut(*conn)
                .and_then(|c| c.drain.as_mut())
            {
                drain.number_held_frame();
            }
        } else {
            count_frame(drains, *conn);
        }
    }
    outputs.push_back(output);
}

/// The encoded `error` frame for request `id`.
fn error_frame(id: Option<RequestId>, error: &RequestError) -> Bytes {
    ServerFrame::Error(ErrorFrame {
        id,
        code: error.code(),
        text: error.to_string(),
        retry_after: error.retry_after(),
    })
    .encode()
}

/// The caps on offline queues `config` sets.
fn queue_limits(config: &ServerConfig) -> QueueLimits {
    QueueLimits {
        messages: config.offline_queue_capacity,
        bytes: config.offline_queue_bytes,
        total_bytes: config.offline_total_bytes,
    }
}

/// Counts a frame handed over for `conn`, if its offline queue is being
/// drained, or was when it closed (the drain needs every frame's number);
/// free when none is.
fn count_frame(drains: Drains<'_>, conn: ConnId) {
    if drains.draining > 0 {
        if let Some(drain) = drains
            .connections
            .get_mut(conn)
            .and_then(|c| c.drain.as_mut())
        {
            drain.count_frame();
            return;
        }
    }
    if !drains.closing.is_empty() {
        if let Some((_, drain)) = drains.closing.get_mut(&conn) {
            drain.count_frame();
        }
    }
}

/// Where frames handed over are counted: the open connections' drains and
/// those of connections that closed mid-drain.
struct Drains<'a> {
    connections: &'a mut Connections,
    closing: &'a mut HashMap<ConnId, (UserId, Drain)>,
    draining: usize,
}

/// "1 user", "2 users".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// "online now: alice, bob" or "online now: nobody else".
fn list_text(what: &str, users: &[Username]) -> String {
    if users.is_empty() {
        return format!("{what}: nobody else");
    }
    let names: Vec<&str> = users.iter().map(Username::as_str).collect();
    format!("{what}: {}", names.join(", "))
}

/// Whether `c`'s input waits: for its login's password check, or for the
/// first page of the offline queue its login started (so the queue comes
/// before the answer to anything sent after the login).
fn waits_for_input(c: &Connection) -> bool {
    c.awaiting.is_some() || c.drain.as_ref().is_some_and(|d| !d.started)
}
