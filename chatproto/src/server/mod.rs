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

use crate::accounts::{AccountChange, AccountChangeError, Accounts};
use crate::cluster::{BusMessage, BusTarget, ClaimOutcome, NodeId};
use crate::command::Command;
use crate::durability::{Key, Kind, Ledger, Persisted};
use crate::error::RequestError;
use crate::framing::{self, FrameDecoder, FrameError};
use crate::ids::{BatchId, ClaimId, ConnId};
use crate::offline::QueuedMessage;
use crate::peer::PeerKey;
use crate::rate_limit::TokenBucket;
use crate::request::Request;
use crate::routes::MAX_IN_FLIGHT;
use crate::server_frame::{ByeReason, DebugState, ServerFrame};
use crate::stats::{ServerStats, Tally};
use crate::store::{Change, LastSeen, Snapshot};
use crate::time::Timestamp;
use crate::username::Username;

mod account_changes;
mod claims;
mod cluster;
mod config;
mod drains;
mod hub;
mod outbox;
mod requests;
mod routing;
mod session;
mod state;

pub use crate::ids::VerifyTicket;
pub use crate::output::{
    CloseReason, Event, MessageError, Output, RestoreSummary, Timer, UnknownConnection,
};
pub use config::{ConfigError, ServerConfig, MAX_FRAME_BYTES, MIN_FRAME_BYTES};

use hub::{Hub, PendingLogin, HELD_INPUT_FRAMES};
use outbox::{error_frame, release_into, Drains};
use session::{Session, Sessions};
pub use state::Server;

/// Output queue slots kept between bursts, and the size past which a
/// drained queue shrinks back to it.
const OUTPUT_QUEUE_KEEP: usize = 1024;

const OUTPUT_QUEUE_SHRINK_ABOVE: usize = 1 << 16;

/// Closed connections whose drain outcome the core waits for, at most
/// (only a driver that never reports could fill it): past it one is given
/// up, and its messages stay queued.
const MAX_CLOSING_DRAINS: usize = 4096;

/// How long the core waits for a closed connection's last report before
/// it gives the drain up (its unsettled messages stay queued, and may come
/// twice): far longer than a driver takes to flush and close a socket.
const CLOSING_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What became of a connection after one of its frames.
enum Served {
    Open,
    /// A login went to be checked: later input waits.
    Awaiting,
    /// The frame closed it (logout, flood).
    Closed,
}

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
            hub: Hub::new(&config, accounts),
            sessions: Sessions::default(),
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
            lifted: false,
            draining: 0,
            latest: now,
            closing_drains: HashMap::new(),
            closing_deadlines: BTreeSet::new(),
            stats: ServerStats::default(),
            unit_tallies: Vec::new(),
            login_refusal: None,
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
        self.hub.peers.connected(peer, now);
        let mut c = Session {
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
            routes: VecDeque::new(),
            claiming: None,
            claim: None,
            held_frames: VecDeque::new(),
            held_bytes: 0,
            drain: None,
        };
        let idle_timer = self.deadline(&c).0;
        c.idle_timer = idle_timer;
        let conn = self.sessions.insert(c);
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
        let Some(c) = self.sessions.get_mut(conn) else {
            return Ok(());
        };
        // Take the decoder out so frames can borrow it while the rest of
        // the core is mutated.
        let mut decoder = std::mem::replace(&mut c.decoder, FrameDecoder::new(0));
        let mut input = data;
        // While a login is checked (or its first offline page read), the
        // frames that follow wait, as frames, to be served in order.
        let mut waiting = awaiting;
        while let Some(frame) = decoder.decode(&mut input) {
            if waiting && !self.sends_across(conn, frame, now) {
                if !self.hold_frame(conn, frame, now) {
                    break; // flooding: closed, the rest is ignored
                }
                continue;
            }
            match self.serve_frame(conn, frame, now) {
                // Closed by this frame (logout, flood): the rest is ignored.
                Served::Closed => break,
                Served::Awaiting => waiting = true,
                Served::Open => {}
            }
        }
        if let Some(c) = self.sessions.get_mut(conn) {
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
    /// One line ending (`\n` or `\r\n`) at its end is taken as the frame's
    /// end, as on a line transport; a line break anywhere else is
    /// [`MessageError::LineBreak`].
    ///
    /// ```
    /// # use chatproto::{Accounts, Output, PeerKey, Server, ServerConfig, Timestamp};
    /// let now = Timestamp::from_unix_millis(0);
    /// let mut server = Server::new(ServerConfig::default(), Accounts::default(), now).unwrap();
    /// let conn = server.accept(PeerKey::UNSPECIFIED, [0; 16], now);
    /// server.handle_message(conn, br#"{"id":1,"cmd":"whoami"}"#, now).unwrap();
    /// // One line ending at the end is allowed; one inside is not.
    /// server.handle_message(conn, b"help\r\n", now).unwrap();
    /// assert!(server.handle_message(conn, b"whoami\nhelp", now).is_err());
    /// ```
    pub fn handle_message(
        &mut self,
        conn: ConnId,
        message: &[u8],
        now: Timestamp,
    ) -> Result<(), MessageError> {
        let now = self.clock(now);
        // One line ending at the very end is the frame's end, as on a line
        // transport (websocat sends each line with its `\n`); one inside
        // would make it two frames.
        let message = message.strip_suffix(b"\n").unwrap_or(message);
        if message.contains(&b'\n') {
            return Err(MessageError::LineBreak);
        }
        let Some(awaiting) = self.catch_up(conn, now)? else {
            // Timed out just now: the message is too late.
            return Ok(());
        };
        if let Some(frame) = framing::message_frame(message, self.config.max_frame_bytes) {
            if awaiting && !self.sends_across(conn, frame, now) {
                // Held as the frame it is, to be served in order.
                self.hold_frame(conn, frame, now);
            } else {
                self.serve_frame(conn, frame, now);
            }
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
        // What waits for a batch stays held: only the peer's sending half
        // may be closed (a client that sends its requests and shuts its
        // side), and the driver can still write the answers, and the
        // `bye`, once their batch is answered ([`Server::holds_output`]).
        // They go in bounded time, with their batch; a driver drops what
        // comes for a socket that is gone.
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
                if self.sessions.get(conn).is_none() {
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
        if self.sessions.get(conn).is_none() {
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
    /// offline (the store is told) without presence notices to this node's
    /// users, since everyone is leaving; in cluster mode the other nodes
    /// are told of each (their users get presence), then that this node
    /// is leaving.
    pub fn shutdown(&mut self, now: Timestamp) {
        let now = self.clock(now);
        let ids: Vec<ConnId> = self.sessions.ids().collect();
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
            self.sessions.keep_slot(conn);
            self.forget(conn, now, false);
        }
        // After each user's `Offline`: the others forget this node now,
        // not when its lease runs out.
        self.publish(|node| BusMessage::Leaving { node, at: now });
        self.hub.liveness.leave();
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
            let Some(c) = self.sessions.get(conn) else {
                continue;
            };
            let (deadline, reason) = self.deadline(c);
            if deadline > now {
                if let Some(c) = self.sessions.get_mut(conn) {
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
        for ended in self.hub.lockout.expire(now) {
            // Stored for every name, account or not: so is its end.
            if ended.had_record {
                self.ledger
                    .record_fact(Change::LockoutCleared { user: ended.name }, None);
            }
        }
        if self.node().is_some() {
            let mark = self.begin();
            self.cluster_timers(now);
            self.settle(mark);
        }
        self.pump_drains();
    }

    /// What another node published ([`crate::cluster`]; cluster mode,
    /// else ignored): its users coming and going, its roster, a
    /// broadcast, a block, a heartbeat. Every message shows its sender
    /// alive. This node's own messages, which the bus hands back, are
    /// ignored, as are names this node has no account for.
    pub fn handle_bus(&mut self, message: BusMessage, now: Timestamp) {
        let now = self.clock(now);
        self.catch_up_timers(now);
        if self.node().map_or(true, |me| message.node() == me) {
            return;
        }
        let mark = self.begin();
        self.serve_bus(message, now);
        self.settle(mark);
        self.pump_drains();
    }

    /// The driver's bus connection is up: the first time, or again after a
    /// loss (cluster mode, else ignored). This node publishes who is
    /// online here and asks the others for theirs, which repairs presence
    /// lost while the bus was away, and starts its heartbeats.
    pub fn handle_bus_restored(&mut self, now: Timestamp) {
        let now = self.clock(now);
        self.catch_up_timers(now);
        if self.node().is_none() {
            return;
        }
        self.publish_roster(BusTarget::All, true);
        self.hub.liveness.bus_up(now);
        // Messages stored while the bus was away, for users who may be
        // online elsewhere: their nodes hand them over now.
        self.flush_notices();
        self.handle_timeout(now);
    }

    /// The driver's bus connection was lost (cluster mode, else ignored):
    /// heartbeats stop until [`Server::handle_bus_restored`]. The other
    /// nodes' users stay in the directory until their nodes' leases run
    /// out unheard.
    pub fn handle_bus_lost(&mut self, now: Timestamp) {
        let now = self.clock(now);
        self.catch_up_timers(now);
        self.hub.liveness.bus_down();
    }

    /// Node `node` is gone, last known alive at `at`: the driver knows it
    /// (cluster mode, else ignored) sooner than its lease would tell. Its
    /// users are offline from `at`, and this node's users are told.
    pub fn handle_node_gone(&mut self, node: NodeId, at: Timestamp, now: Timestamp) {
        let now = self.clock(now);
        self.catch_up_timers(now);
        if self.node().map_or(true, |me| node == me) {
            return;
        }
        let mark = self.begin();
        self.remove_node(node, at.min(now));
        self.settle(mark);
        self.pump_drains();
    }

    /// The cluster's database says another node took over one of this
    /// node's sessions while this node was silent for `silent_for`, past
    /// its lease (cluster mode, else ignored): as when the node finds its
    /// own silence ([`Event::NodeExpired`]), it closes every connection
    /// with `bye node_expired`, since its users may be logged in elsewhere,
    /// and joins again with nobody on it.
    pub fn handle_node_expired(&mut self, silent_for: std::time::Duration, now: Timestamp) {
        let now = self.clock(now);
        self.catch_up_timers(now);
        let began = now.saturating_sub(silent_for);
        if self.node().is_none() || self.hub.liveness.rejoined_since(began) {
            // It found its silence itself, and closed its clients then:
            // every session since was claimed after the silence.
            return;
        }
        let mark = self.begin();
        self.rejoin(silent_for, now);
        self.settle(mark);
        self.pump_drains();
    }

    /// The verdict on an [`Output::VerifyPassword`]: whether the password
    /// matched the hash. The login goes on from there, and the
    /// connection's frames that waited behind it are served. A failure
    /// counts toward the lockout even if the connection has gone meanwhile.
    /// An unknown or already answered ticket is ignored.
    pub fn handle_verification(&mut self, ticket: VerifyTicket, matches: bool, now: Timestamp) {
        let now = self.clock(now);
        let Some(pending) = self.hub.verifications.remove(&ticket) else {
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
            stale,
        } = pending;
        self.hub
            .peers
            .check_ended(peer, self.config.login_rate_per_peer);
        let matches = plain_verdict.unwrap_or(matches);
        let open = self
            .sessions
            .get(conn)
            .is_some_and(|c| c.awaiting == Some(ticket));
        let mark = self.begin();
        // `stale`: its password changed, or its account went, meanwhile.
        // The verdict is about a password no longer in force: refused, and
        // not counted against a record that is gone or new.
        if !open {
            // Gone meanwhile: a wrong guess still counts.
            let known_right = matches && account.is_some();
            if !(stale || known_right) {
                self.count_failure(&name, account.is_some(), now);
            }
            self.settle(mark);
            return;
        }
        if let Some(c) = self.sessions.get_mut(conn) {
            c.awaiting = None;
        }
        self.reschedule(conn);
        // Locked by other attempts while this one was checked.
        self.ledger.read(Key::Name(&name));
        let result = match self.hub.lockout.locked_until(name.as_str(), now) {
            _ if stale => self.refuse_login(conn, &name, RequestError::InvalidCredentials),
            Some(until) => self.refuse_locked(conn, &name, until, false, now),
            None => self.finish_login(conn, id, name, account, matches, now),
        };
        if let Err(error) = result {
            self.send_error(conn, id, &error);
        }
        self.settle(mark);
        self.resume_input(conn);
        self.pump_drains();
    }

    /// The cluster's database's answer to an [`Output::ClaimSession`]
    /// (cluster mode): the login goes on, or gets `session_elsewhere`
    /// (another node holds the user's session) or `unavailable` (the
    /// database could not be asked); then the connection's frames that
    /// waited behind it are served. A session claimed for a connection
    /// that closed meanwhile is given back ([`Output::ReleaseSession`]).
    /// An unknown or already answered claim is ignored.
    pub fn handle_claim(&mut self, claim: ClaimId, outcome: ClaimOutcome, now: Timestamp) {
        let now = self.clock(now);
        self.catch_up_timers(now);
        let Some(conn) = self.hub.claims.get(&claim).map(|p| p.conn) else {
            return;
        };
        let mark = self.begin();
        self.serve_claim(claim, outcome, now);
        self.settle(mark);
        self.resume_input(conn);
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
        let c = self.sessions.get_mut(conn).ok_or(UnknownConnection(conn))?;
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
            self.hub.offline.truncate(user, in_flight);
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
        let Some(c) = self.sessions.get_mut(conn) else {
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
        let sessions = &mut self.sessions;
        let closing = &mut self.closing_drains;
        let draining = self.draining;
        let stats = &mut self.stats;
        let release = |output: Output, kind: Kind, tally: Option<Tally>| {
            let drains = Drains {
                sessions: &mut *sessions,
                closing: &mut *closing,
                draining,
            };
            release_into(outputs, drains, stats, output, kind, tally)
        };
        match outcome {
            Persisted::Committed => {
                if !self.ledger.committed(batch, release) {
                    return;
                }
                self.flush_notices();
            }
            Persisted::Failed => {
                // Every notice waiting was for the batches undone now.
                self.hub.queued_notices.clear();
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

    /// Whether open `conn` has nothing waiting in the core on its behalf:
    /// no frame of its held (behind a password check, a session claim, a
    /// first offline page, or a message on its way to another node's
    /// user) and no output of its held behind a batch. A driver that
    /// answers some frames itself (a policy or a command of its own)
    /// answers them only while this holds, and otherwise keeps them, in
    /// order, until it does: so its answers and the core's keep the order
    /// of the frames. `examples/custom_rule.rs` shows it.
    ///
    /// ```
    /// # use chatproto::{Accounts, PeerKey, Server, ServerConfig, Timestamp};
    /// let now = Timestamp::from_unix_millis(0);
    /// let mut accounts = Accounts::new();
    /// accounts.insert_hashed(
    ///     "alice".parse().unwrap(),
    ///     chatproto::HashedPassword::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo").unwrap(),
    /// ).unwrap();
    /// let mut server = Server::new(ServerConfig::default(), accounts, now).unwrap();
    /// let conn = server.accept(PeerKey::UNSPECIFIED, [0; 16], now);
    /// assert!(server.is_caught_up(conn));
    /// // A hashed password is checked off the event loop: until the
    /// // verdict, the login's answer is owed.
    /// server.handle_input(conn, b"login alice secret\n", now).unwrap();
    /// assert!(!server.is_caught_up(conn));
    /// ```
    pub fn is_caught_up(&self, conn: ConnId) -> bool {
        self.sessions
            .get(conn)
            .is_some_and(|c| !waits_for_input(c) && c.held_frames.is_empty())
            && !self.ledger.holds(conn)
    }

    /// Whether output for `conn` waits in the core for a batch to be
    /// answered, even after `conn` closed ([`Server::handle_disconnect`],
    /// or an [`Output::Close`] still held): a driver keeps a closing
    /// socket until it has written that output too.
    pub fn holds_output(&self, conn: ConnId) -> bool {
        self.ledger.holds(conn)
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
    #[inline]
    pub fn poll_output(&mut self) -> Option<Output> {
        let mut output = self.outputs.pop_front();
        if let Some(Output::Close { conn, .. }) = &output {
            // The driver is done with the slot once it has this.
            self.sessions.release_slot(*conn);
        }
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
    #[inline]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        // Checked before every input: the times alone, without working
        // out which timer each is (`next_timer` looks the session up).
        [
            self.idle_timers.first().map(|&(at, _)| at),
            self.hub.lockout.next_expiry(),
            self.closing_deadlines.first().map(|&(at, _)| at),
            self.hub.liveness.next_heartbeat(),
            self.hub.liveness.next_expiry(),
            self.hub.routes.next_deadline(),
            self.hub.claim_retries.first().map(|&(at, _)| at),
        ]
        .into_iter()
        .flatten()
        .min()
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
            let timer = match self.sessions.get(conn).map(|c| self.deadline(c).1) {
                Some(ByeReason::LoginTimeout) => Timer::Login,
                _ => Timer::Idle,
            };
            (at, timer)
        });
        [
            connection,
            self.hub
                .lockout
                .next_expiry()
                .map(|at| (at, Timer::LoginRecord)),
            self.closing_deadlines
                .first()
                .map(|&(at, _)| (at, Timer::ClosingDrain)),
            self.hub
                .liveness
                .next_heartbeat()
                .map(|at| (at, Timer::Heartbeat)),
            self.hub
                .liveness
                .next_expiry()
                .map(|at| (at, Timer::NodeLease)),
            self.hub.routes.next_deadline().map(|at| (at, Timer::Route)),
            self.hub
                .claim_retries
                .first()
                .map(|&(at, _)| (at, Timer::ClaimRetry)),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|&(at, _)| at)
    }

    /// Counters, as `debug server` shows them.
    pub fn debug_state(&self, now: Timestamp) -> DebugState {
        let now = self.latest.max(now);
        DebugState {
            connections: self.sessions.len(),
            users_online: self.hub.presence.online().len(),
            queued_offline_messages: self.hub.offline.total().messages,
            locked_accounts: self.hub.lockout.locked_accounts(),
            uptime_secs: (now - self.started_at).as_secs(),
            cluster_node: self.config.cluster.as_ref().map(|c| c.name.clone()),
            cluster_nodes: self.node().map(|_| self.hub.liveness.nodes_alive() + 1),
            cluster_users_online: self
                .node()
                .map(|_| self.hub.presence.online().len() + self.hub.directory.len()),
        }
    }

    /// The driver changed the accounts: an operator edited the credentials
    /// file and asked for a reload ([`Accounts::changes_to`] finds the
    /// changes). A new account may log in at once; a new password applies
    /// from the next login. A removed account's session ends with `bye`
    /// reason `account_removed` (as does a login of it waiting for its
    /// session claim), and its offline queue, its blocks both ways, its
    /// last-seen time and its failed-login record are deleted (one
    /// [`Change::AccountRemoved`] tells storage). A change that does not fit
    /// the accounts held changes nothing.
    ///
    /// In cluster mode every node's accounts must change alike: set the new
    /// [`accounts_digest`](crate::ClusterConfig::accounts_digest) with
    /// [`Server::set_accounts_digest`] once the changes are in.
    ///
    /// ```
    /// use chatproto::{AccountChange, Accounts, PeerKey, Server, ServerConfig, Timestamp};
    ///
    /// let now = Timestamp::from_unix_millis(0);
    /// let mut server = Server::new(ServerConfig::default(), Accounts::new(), now).unwrap();
    /// let carol: chatproto::Username = "carol".parse().unwrap();
    /// server
    ///     .handle_account_change(
    ///         AccountChange::Added { name: carol.clone(), credential: chatproto::Credential::Plain("singer".parse().unwrap()) },
    ///         now,
    ///     )
    ///     .unwrap();
    /// assert!(server.accounts().contains("carol"));
    /// server.handle_account_change(AccountChange::Removed { name: carol.clone() }, now).unwrap();
    /// assert!(server.handle_account_change(AccountChange::Removed { name: carol }, now).is_err());
    /// ```
    pub fn handle_account_change(
        &mut self,
        change: AccountChange,
        now: Timestamp,
    ) -> Result<(), AccountChangeError> {
        let now = self.clock(now);
        self.catch_up_timers(now);
        let mark = self.begin();
        let result = self.change_account(change, now);
        self.settle(mark);
        self.pump_drains();
        result
    }

    /// Cluster mode: the digest of the accounts this node serves now, after
    /// [`Server::handle_account_change`]s; its next heartbeats carry it
    /// (ignored outside cluster mode).
    pub fn set_accounts_digest(&mut self, digest: String) {
        if let Some(cluster) = &mut self.config.cluster {
            cluster.accounts_digest = digest;
        }
    }

    /// Cluster mode: whether this node serves the accounts most nodes
    /// alive serve, by their heartbeats'
    /// [`accounts_digest`](crate::ClusterConfig::accounts_digest)s (true
    /// outside cluster mode, and until another node's heartbeat is heard).
    /// A driver stops taking clients while it is false: their logins would
    /// be judged by other accounts than the cluster's.
    pub fn cluster_accounts_agree(&self) -> bool {
        match &self.config.cluster {
            Some(cluster) => self.hub.liveness.accounts_agree(&cluster.accounts_digest),
            None => true,
        }
    }

    /// What this core did since it started: logins, messages, broadcasts,
    /// presence frames and errors, counted for metrics.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Password checks asked for ([`Output::VerifyPassword`]) and not yet
    /// answered.
    pub fn pending_password_checks(&self) -> usize {
        self.hub.verifications.len()
    }

    /// What the offline queues hold now, all users together.
    pub fn queued_offline(&self) -> crate::offline::QueueSize {
        self.hub.offline.total()
    }

    /// How many users are logged in now.
    pub fn users_online(&self) -> usize {
        self.hub.presence.online().len()
    }

    /// Who is logged in on `conn`.
    pub fn user(&self, conn: ConnId) -> Option<&Username> {
        let user = self.sessions.get(conn)?.user?;
        Some(self.hub.accounts.name(user))
    }

    /// Whether `conn` is open.
    pub fn is_open(&self, conn: ConnId) -> bool {
        self.sessions.get(conn).is_some()
    }

    /// Bytes buffered for `conn`'s incomplete frame.
    pub fn buffered_input(&self, conn: ConnId) -> Option<usize> {
        Some(self.sessions.get(conn)?.decoder.buffered())
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The accounts served.
    pub fn accounts(&self) -> &Accounts {
        &self.hub.accounts
    }

    /// Loads lasting state into empty structures.
    fn restore(&mut self, snapshot: &Snapshot, now: Timestamp) -> RestoreSummary {
        let mut summary = RestoreSummary::default();
        for (user, messages) in &snapshot.offline {
            match self.hub.accounts.id(user.as_str()) {
                Some(id) => {
                    for m in messages {
                        self.hub.offline.restore(id, m.clone());
                        summary.offline_messages += 1;
                    }
                }
                None => summary.skipped += messages.len(),
            }
        }
        for (user, size) in &snapshot.offline_sizes {
            match self.hub.accounts.id(user.as_str()) {
                // Texts that stay in storage: only their count is kept.
                Some(id) if self.hub.offline.external() => {
                    self.hub.offline.restore_size(id, *size);
                    summary.offline_messages += size.messages;
                }
                _ => summary.skipped += size.messages,
            }
        }
        for (blocker, targets) in &snapshot.blocks {
            for target in targets {
                match (
                    self.hub.accounts.id(blocker.as_str()),
                    self.hub.accounts.id(target.as_str()),
                ) {
                    (Some(a), Some(b)) if a != b => {
                        self.hub.blocks.block(a, b);
                        summary.blocks += 1;
                    }
                    _ => summary.skipped += 1,
                }
            }
        }
        for (user, seen) in &snapshot.last_seen {
            let Some(id) = self.hub.accounts.id(user.as_str()) else {
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
            self.hub.presence.restore_last_seen(id, at);
            summary.last_seen += 1;
        }
        // Every name tried, account or not, so that a restart does not
        // tell them apart.
        for (user, state) in &snapshot.lockouts {
            let known = self.hub.accounts.contains(user.as_str());
            if self.hub.lockout.restore(user, known, *state, now) {
                summary.lockouts += 1;
            } else {
                // Ran out while the server was down: storage drops it too.
                self.ledger
                    .record_fact(Change::LockoutCleared { user: user.clone() }, None);
            }
        }
        summary
    }

    /// Before input on `conn`: fires the deadlines due by `now`, so input
    /// after a connection's idle timeout does not revive it. Then whether
    /// the connection waits for a password check, or `None` if it just
    /// timed out.
    #[inline]
    fn catch_up(
        &mut self,
        conn: ConnId,
        now: Timestamp,
    ) -> Result<Option<bool>, UnknownConnection> {
        if self.sessions.get(conn).is_none() {
            return Err(UnknownConnection(conn));
        }
        if self.poll_timeout().is_some_and(|due| due <= now) {
            self.handle_timeout(now);
        }
        Ok(self.sessions.get(conn).map(waits_for_input))
    }

    /// Keeps `frame` for after what `conn` waits for (a password check, a
    /// first offline page), within the bound; past it, the connection is
    /// flooding and is closed (false).
    fn hold_frame(
        &mut self,
        conn: ConnId,
        frame: Result<&[u8], FrameError>,
        now: Timestamp,
    ) -> bool {
        let bound = HELD_INPUT_FRAMES * self.config.max_frame_bytes;
        let Some(c) = self.sessions.get_mut(conn) else {
            return false;
        };
        // An over-long frame is held as its error, costing a frame limit.
        let len = frame.map_or(self.config.max_frame_bytes, <[u8]>::len);
        if c.held_bytes + len > bound {
            self.flood_out(conn, now);
            return false;
        }
        c.held_bytes += len;
        c.held_frames.push_back(frame.map(<[u8]>::to_vec));
        true
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
        if let Some(c) = self.sessions.get_mut(conn) {
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
        match self.sessions.get(conn) {
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

    /// `now`, or the latest time seen if `now` is earlier: time never runs
    /// backwards for the core.
    #[inline]
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

    /// Queues `bye` and the close, and forgets the connection.
    fn say_bye(&mut self, conn: ConnId, reason: ByeReason, now: Timestamp) {
        // A fact: it goes out even if a batch it waits behind fails.
        self.note_kind(Kind::Fact);
        self.send(conn, &ServerFrame::Bye { reason });
        self.outputs.push_back(Output::Close { conn, reason });
        self.sessions.keep_slot(conn);
        self.forget(conn, now, true);
    }

    /// Drops `conn`; its user goes offline, announced if `announce`.
    fn forget(&mut self, conn: ConnId, now: Timestamp, announce: bool) -> Option<()> {
        let c = self.sessions.remove(conn)?;
        if let Some(claim) = c.claiming {
            self.drop_waiting_claim(claim);
        }
        self.idle_timers.remove(&(c.idle_timer, conn));
        self.hub
            .peers
            .disconnected(c.peer, self.config.login_rate_per_peer);
        if let Some(drain) = c.drain {
            self.draining -= 1;
            if !drain.started {
                // Its login's answer waited for the first page, which will
                // never come now: without this the answer, and the `bye`
                // and close held behind it, would wait for ever.
                self.ledger.lift(conn);
                if self.unit_depth == 0 {
                    self.release_held();
                } else {
                    self.lifted = true;
                }
            }
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
        // Messages across whose answer was "store", not yet at the front of
        // its turn: stored now, with nobody left to answer.
        for slot in &c.routes {
            if let Some((to, message)) = slot.answer.as_ref().and_then(|a| a.store.clone()) {
                let name = self.hub.accounts.name(to).clone();
                if self.queue_offline(to, &name, message).is_ok() {
                    // No answer to count it by: counted here.
                    self.stats.count(Tally::MessageStored);
                }
            }
        }
        if let Some(user) = c.user {
            self.hub.presence.log_out(user, now);
            let name = self.hub.accounts.name(user).clone();
            let change = Change::LoggedOut {
                user: name.clone(),
                at: now,
            };
            self.ledger.record_fact(change, Some(conn));
            if let Some(claim) = c.claim {
                self.outputs.push_back(Output::ReleaseSession {
                    user: name.clone(),
                    claim,
                });
            }
            if announce {
                self.announce(user, false);
            }
            // The other nodes' users are told even at this node's
            // shutdown (its own are not: rule 4).
            let offline = name.clone();
            self.publish(|node| BusMessage::Offline {
                node,
                user: offline,
                at: now,
            });
            self.event(Event::LoggedOut { conn, user: name });
        }
        Some(())
    }

    /// Puts `conn` in the timer queue at its current deadline, if that is
    /// earlier than where it sits (a later entry is moved when it fires).
    pub(super) fn reschedule(&mut self, conn: ConnId) {
        let Some(c) = self.sessions.get(conn) else {
            return;
        };
        let (deadline, _) = self.deadline(c);
        if deadline < c.idle_timer {
            let old = (c.idle_timer, conn);
            self.idle_timers.remove(&old);
            self.idle_timers.insert((deadline, conn));
            if let Some(c) = self.sessions.get_mut(conn) {
                c.idle_timer = deadline;
            }
        }
    }

    /// When `c` times out, and why: idle for too long, or (before login)
    /// not logged in in time, whichever comes first.
    fn deadline(&self, c: &Session) -> (Timestamp, ByeReason) {
        let idle = (
            c.last_frame + self.config.idle_timeout,
            ByeReason::IdleTimeout,
        );
        match self.config.login_timeout {
            // A login being checked is not held against the client: a
            // slow check must not turn a right password into a timeout.
            Some(limit) if c.user.is_none() && c.awaiting.is_none() && c.claiming.is_none() => {
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

    /// Serves the input `conn` held back, once it no longer waits (for a
    /// password check, or for its offline queue's first page).
    fn resume_input(&mut self, conn: ConnId) {
        let now = self.latest;
        self.release_route_answers(conn);
        loop {
            let Some(c) = self.sessions.get(conn) else {
                return;
            };
            let Some(front) = c.held_frames.front() else {
                return;
            };
            if waits_for_input(c) {
                // Behind answers from other nodes, a message that goes
                // across too is served; anything else waits for them.
                let front = front.as_ref().map(Vec::as_slice).map_err(|e| *e);
                if !self.may_send_across(conn, front, now) {
                    return;
                }
            }
            let Some(c) = self.sessions.get_mut(conn) else {
                return;
            };
            let Some(frame) = c.held_frames.pop_front() else {
                return;
            };
            c.held_bytes -= frame.as_ref().map_or(self.config.max_frame_bytes, Vec::len);
            let frame = frame.as_ref().map(Vec::as_slice).map_err(|e| *e);
            if let Served::Closed = self.serve_frame(conn, frame, now) {
                return;
            }
        }
    }
}

impl Server {
    /// Whether `frame`, which arrived on `conn` while its input waits, can
    /// be served at once rather than held: see [`Server::may_send_across`].
    /// Only while nothing is held before it, which keeps input in order.
    fn sends_across(&self, conn: ConnId, frame: Result<&[u8], FrameError>, now: Timestamp) -> bool {
        self.sessions
            .get(conn)
            .is_some_and(|c| c.held_frames.is_empty())
            && self.may_send_across(conn, frame, now)
    }

    /// Whether `frame` may be served on `conn` while only answers from
    /// other nodes are awaited: a direct message that will go to another
    /// node too, answered in its turn when that node answers, so that a
    /// sender can have several on their way (up to [`MAX_IN_FLIGHT`]), one
    /// per recipient (a second to the same one waits, so that each
    /// recipient gets a sender's messages in order even if one is lost
    /// and sent again).
    /// Anything that would be answered at once (refused by a limit, an
    /// error, a local recipient) waits, so answers keep request order.
    fn may_send_across(
        &self,
        conn: ConnId,
        frame: Result<&[u8], FrameError>,
        now: Timestamp,
    ) -> bool {
        let Some(c) = self.sessions.get(conn) else {
            return false;
        };
        let only_routes = c.awaiting.is_none()
            && c.claiming.is_none()
            && c.drain.as_ref().map_or(true, |d| d.started)
            && !c.routes.is_empty()
            && c.routes.len() < MAX_IN_FLIGHT;
        let (Ok(frame), true, Some(me)) = (frame, only_routes, c.user) else {
            return false;
        };
        // The limits would let it through (checked on copies: serving it
        // takes the tokens).
        if let (Some(mut bucket), Some(rate)) = (c.byte_bucket.clone(), self.config.byte_rate) {
            let cost = u32::try_from(frame.len()).unwrap_or(u32::MAX);
            if !bucket.take_n(cost, rate.burst, rate.per_second, now) {
                return false;
            }
        }
        if let (Some(mut bucket), Some(limit)) = (c.bucket.clone(), self.config.rate_limit) {
            if !bucket.take(limit.burst, limit.per_second, now) {
                return false;
            }
        }
        let Ok(Request {
            command: Command::Message { to, .. },
            ..
        }) = Request::parse_frame(frame)
        else {
            return false;
        };
        let Some(recipient) = self.hub.accounts.id(to.as_str()) else {
            return false;
        };
        recipient != me
            && c.routes.iter().all(|r| r.to != recipient)
            && !self.hub.blocks.has_blocked(recipient, me)
            && self.hub.presence.session(recipient).is_none()
            && self.route_for(recipient).is_some()
    }
}

/// Whether `c`'s input waits: for its login's password check or session
/// claim, for the answer to a direct message sent to another node, or for the first page
/// of the offline queue its login started (so the queue comes before the
/// answer to anything sent after the login).
fn waits_for_input(c: &Session) -> bool {
    c.awaiting.is_some()
        || c.claiming.is_some()
        || !c.routes.is_empty()
        || c.drain.as_ref().is_some_and(|d| !d.started)
}
