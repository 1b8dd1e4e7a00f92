//! # chatproto
//!
//! The sans-IO core of a small instant-messaging protocol: framing, the
//! command parser, the wire types, and the server and client state machines.
//! Pure logic over byte buffers: nothing here opens a socket, reads a clock,
//! blocks, or starts a thread. Time comes in as an argument ([`Timestamp`]),
//! randomness too (session ids from caller-supplied bytes), and everything
//! the core wants done comes out of a `poll_*` call. A driver — a socket
//! reactor, a WebSocket bridge, a test — moves the bytes.
//!
//! The protocol itself is specified in `PROTOCOL.md` at the repository root.
//!
//! ## Driving the server core
//!
//! ```
//! use chatproto::{Accounts, Output, PeerKey, Server, ServerConfig, ServerFrame, Timestamp};
//!
//! let mut accounts = Accounts::new();
//! accounts.insert("alice".parse()?, "wonderland".parse()?)?;
//! accounts.insert("bob".parse()?, "builder".parse()?)?;
//! let mut now = Timestamp::from_unix_millis(1_700_000_000_000);
//! let mut server = Server::new(ServerConfig::default(), accounts, now)?;
//!
//! // Two connections arrive; each is greeted with `hello`.
//! let a = server.accept(PeerKey::UNSPECIFIED, [1; 16], now);
//! let b = server.accept(PeerKey::UNSPECIFIED, [2; 16], now);
//!
//! // Bytes come in as they were read: any chunking, either request form.
//! server.handle_input(a, b"login alice wonderland\n", now)?;
//! server.handle_input(b, b"{\"cmd\":\"login\",\"user\":\"bob\",\"password\":\"builder\",\"id\":1}\n", now)?;
//! now = Timestamp::from_unix_millis(1_700_000_001_000);
//! server.handle_input(a, b"message bob hi ", now)?;
//! server.handle_input(a, b"there\n", now)?;
//!
//! // After every call, drain the outputs: a frame for a connection, a
//! // connection to close, or an event to log.
//! let mut to_bob = Vec::new();
//! while let Some(output) = server.poll_output() {
//!     match output {
//!         Output::Transmit { conn, frame } if conn == b => {
//!             // One frame's payload; over TCP, write it, then `\n`.
//!             to_bob.push(ServerFrame::decode(&frame)?);
//!         }
//!         _ => {} // a real driver writes the other frames, closes, logs
//!     }
//! }
//! // Bob saw his hello, the ok for his login (id 1), then alice's message.
//! assert_eq!(to_bob.len(), 3);
//! let ServerFrame::Message(m) = &to_bob[2] else { panic!("expected a message") };
//! assert_eq!((m.from.as_str(), m.text.as_str(), m.offline), ("alice", "hi there", false));
//!
//! // Wait for the next deadline, tell the core, repeat: here both
//! // connections reach their idle timeout and are closed.
//! while let Some(wake_at) = server.poll_timeout() {
//!     server.handle_timeout(wake_at);
//! }
//! assert!(!server.is_open(a) && !server.is_open(b));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Map of the crate
//!
//! | module | owns |
//! |---|---|
//! | [`framing`] | splitting a byte stream into lines, within a size limit |
//! | [`command`] | [`Command`] and the inline syntax people type |
//! | [`request`] | a client frame (JSON or inline) into a [`Request`] |
//! | [`server_frame`] | every server-to-client frame ([`ServerFrame`]) |
//! | [`error`] | wire error codes and [`RequestError`] |
//! | [`server`] | the server state machine: the [`Server`] façade (`server/mod.rs`: every entry point), its state (`state.rs`), the service it serves (`hub.rs`: accounts, presence, blocks, queues, lockouts), one session per connection (`session.rs`: decoder, rate limits, held frames, timers), the rules of each request (`requests.rs`), offline delivery (`drains.rs`), accounts changed while running (`account_changes.rs`), and units of work and their output (`outbox.rs`) |
//! | `output` | what the core asks of its driver: [`Output`], [`Event`], [`Timer`] (re-exported) |
//! | [`ids`] | the names a driver hands back: [`ConnId`], [`VerifyTicket`], [`BatchId`] |
//! | `refusal` | what a connection refused before its session is told ([`Server::refusal`]) |
//! | [`client`] | the client state machine ([`Client`]) |
//! | [`store`] | lasting state: [`Change`] and [`Snapshot`] |
//! | [`stats`] | counters of what the server did, for metrics ([`ServerStats`]) |
//! | [`durability`] | changes in batches ([`Output::Persist`]), what waits for them, undoing a failed one |
//! | [`accounts`], [`lockout`], [`offline`], [`rate_limit`] | accounts, failed-login locks, offline queues, flood control |
//! | `presence`, `blocking` | who is online, block lists (internal) |
//! | [`peer`] | client addresses as [`PeerKey`]s, and the limits kept per address |
//! | `drain` | one connection's offline delivery in progress: frame numbers, what is known written (internal) |
//! | [`cluster`], `directory`, `liveness`, `routes` | cluster mode: [`NodeId`], [`BusMessage`] and how a driver carries them ([`Output::Publish`], [`Server::handle_bus`]); who is online on the other nodes, which nodes are alive by their heartbeats, and direct messages on their way to another node (internal); one session per user ([`Output::ClaimSession`], [`Server::handle_claim`], `server/claims.rs`) |
//!
//! The modules form no import cycle: `ids` and the value types are at the
//! bottom, `output` and `durability` above them, `server` on top.
//!
//! # Examples
//!
//! Runnable, in `examples/` (each run by the test suite):
//!
//! - `examples/tokio_server.rs`: the core driven by a tokio runtime instead of chatserver's reactor,
//!   in under 200 lines (`cargo run -p chatproto --example tokio_server`);
//! - `examples/bot.rs`: a [`Client`] over a plain `TcpStream` that logs in and answers
//!   direct messages (`cargo run -p chatproto --example bot -- ADDR USER`);
//! - `examples/custom_rule.rs`: a server that adds a rule of its own (a
//!   banned-words filter) without a callback into the core, answering the
//!   frames it judges only while [`Server::is_caught_up`], so answers keep
//!   their order.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accounts;
mod blocking;
pub mod client;
pub mod cluster;
pub mod command;
mod directory;
mod drain;
pub mod durability;
pub mod error;
pub mod framing;
pub mod ids;
mod liveness;
pub mod lockout;
pub mod offline;
mod output;
mod password;
pub mod peer;
mod presence;
pub mod rate_limit;
mod refusal;
pub mod request;
mod routes;
pub mod server;
pub mod server_frame;
pub mod stats;
pub mod store;
mod text;
mod time;
mod username;

pub use accounts::{
    Account, AccountChange, AccountChangeError, Accounts, Credential, DuplicateAccount,
};
pub use client::{
    Client, ClientEvent, ClientState, PendingRequest, SendError, DEFAULT_CLIENT_MAX_FRAME_BYTES,
};
pub use cluster::{
    BusDecodeError, BusMessage, BusTarget, ClaimOutcome, ClusterConfig, NodeId, RouteOutcome,
    BUS_VERSION,
};
pub use command::{Command, CommandName, DebugTarget};
pub use durability::{BatchId, Persisted};
pub use error::{ErrorCode, RequestError};
pub use framing::{encode_frame, FrameDecoder, FrameError, DEFAULT_MAX_FRAME_BYTES};
pub use ids::{ClaimId, ConnId};
pub use lockout::{LockoutPolicy, LockoutState};
pub use offline::{MailboxLimit, OfflineMessage, OfflineTexts, QueueSize, QueuedMessage};
pub use password::{HashedPassword, InvalidHash, InvalidPassword, Password};
pub use peer::PeerKey;
pub use rate_limit::{Rate, RateLimit};
pub use request::{Rejected, Request, RequestId};
pub use server::{
    CloseReason, ConfigError, Event, MessageError, Output, RestoreSummary, Server, ServerConfig,
    Timer, UnknownConnection, VerifyTicket, MAX_FRAME_BYTES, MIN_FRAME_BYTES,
};
pub use server_frame::{
    BroadcastFrame, ByeReason, CommandUsage, DebugState, ErrorFrame, InvalidFrame, MessageFrame,
    OkFrame, PresenceFrame, Reply, ServerFrame, PROTOCOL_VERSION,
};
pub use stats::ServerStats;
pub use store::{Change, LastSeen, Snapshot};
pub use text::{InvalidText, MessageText};
pub use time::Timestamp;
pub use username::{InvalidUsername, Username, MAX_USERNAME_LEN};
