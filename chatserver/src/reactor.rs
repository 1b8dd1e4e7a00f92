//! The reactor: one thread, one poller, every socket non-blocking.
//!
//! Each turn it waits for socket readiness or the next deadline (the core's
//! `poll_timeout`, a closing socket's grace period), feeds what it read to
//! the core, drains the core's outputs into per-socket queues, and writes
//! each socket that has output once, with vectored writes. It holds no chat
//! logic: that is all in `chatproto::Server`.
//!
//! A socket carries the protocol as lines (TCP, or TLS), or, on the
//! `--http` listener, one HTTP request that either gets the chat page or
//! becomes a WebSocket carrying one frame per message: see [`App`].

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatproto::rate_limit::TokenBucket;
use chatproto::{
    ByeReason, ConnId, Event as CoreEvent, MessageError, Output, PeerKey, Persisted, Rate, Server,
    ServerFrame, Timestamp,
};
use polling::{Event, Events, PollMode, Poller};
use tracing::{debug, error, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::cli::Limits;
use crate::clock::Clock;
use crate::http::{self, HttpConfig, Routed};
use crate::output_queue::{Flushed, Head, OutputQueue, LINE_END};
use crate::registration::Registered;
use crate::storage::{Done, Storage};
use crate::verifier::Verifier;
use crate::websocket::{self, WebSocket};

/// What the reactor needs besides the core.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    pub max_connections: usize,
    pub max_output_bytes: usize,
    /// Per-socket and per-address limits.
    pub limits: Limits,
    pub shutdown_grace: Duration,
    /// Worker threads for password checks.
    pub verify_threads: usize,
    /// The share of a CPU each of them may use, in percent.
    pub verify_cpu_percent: u8,
    /// The CPU the reactor is pinned to, which the checks keep off.
    pub reactor_cpu: Option<usize>,
}

/// Bytes read from one socket per wake-up, so one fast sender cannot
/// starve the others.
const READ_BUDGET: usize = 256 * 1024;
/// Connections accepted per wake-up, for the same reason.
const ACCEPT_BUDGET: usize = 256;
/// The kernel send buffer of every accepted socket (`SO_SNDBUF`).
pub const SEND_BUFFER_BYTES: usize = 256 * 1024;
/// Write-and-refill rounds per wake-up before the reactor polls again, so
/// a fast reader draining a long queue cannot hold the loop.
const MAX_FLUSH_ROUNDS: usize = 16;
/// How long a closed connection may take to drain its output and hang up.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long an HTTP connection may take to send its request.
const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to stop accepting after running out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// The listeners' poller keys count down from here; sockets use their
/// slab index.
const LISTENER_KEY: usize = usize::MAX - 1;
/// At most this many listeners (plaintext and TLS).
const MAX_LISTENERS: usize = 4;

/// A listening socket, the TLS its connections speak, if any, and whether
/// it serves HTTP (the chat page and WebSocket) rather than lines.
pub struct Listener {
    pub socket: TcpListener,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub http: Option<Arc<HttpConfig>>,
}

struct Listening {
    socket: Registered<TcpListener>,
    tls: Option<Arc<rustls::ServerConfig>>,
    http: Option<Arc<HttpConfig>>,
}

pub struct Reactor {
    poller: Arc<Poller>,
    listeners: Vec<Listening>,
    socket_mode: PollMode,
    core: Server,
    /// The storage thread, with a database (`None` with `--no-db`).
    storage: Option<Storage>,
    clock: Clock,
    config: ReactorConfig,
    sockets: Vec<Option<Socket>>,
    free_keys: Vec<usize>,
    open: usize,
    /// Open sockets per client address (with `max_connections_per_ip`).
    per_ip: HashMap<PeerKey, u32>,
    /// TLS handshake budgets: overall, and per client address.
    handshakes: Option<TokenBucket>,
    handshakes_per_ip: HashMap<PeerKey, TokenBucket>,
    /// When sockets whose backlog went over `max_output_bytes` are cut off
    /// if it is still over then.
    slow_deadlines: BTreeSet<(Instant, usize)>,
    /// Socket key for each open core connection, by `ConnId::index`.
    by_conn: Vec<Option<(ConnId, usize)>>,
    /// Sockets with output or interest to update this turn.
    dirty: Vec<usize>,
    /// Closing sockets' deadlines.
    close_deadlines: BTreeSet<(Instant, usize)>,
    accept_paused_until: Option<Instant>,
    stop: Arc<AtomicBool>,
    shutdown_deadline: Option<Instant>,
    read_buf: Vec<u8>,
    /// When this wake-up began: the clock is read once per wake-up, and
    /// everything in it happens at that time.
    instant: Instant,
    /// Runs password checks off this thread.
    verifier: Verifier,
}

struct Socket {
    stream: Registered<TcpStream>,
    peer: SocketAddr,
    /// The core's connection, until the core closes it.
    conn: Option<ConnId>,
    /// The core's connection after it closed, while the socket writes its
    /// last frames: the core hears how many were written when it is gone.
    closed_conn: Option<ConnId>,
    output: OutputQueue,
    phase: Phase,
    /// What the poller is armed for; `None` once an event disarmed it
    /// (oneshot mode only).
    armed: Option<(bool, bool)>,
    dirty: bool,
    /// The TLS session, on a TLS listener's connections.
    tls: Option<Box<rustls::ServerConnection>>,
    /// `close_notify` is queued (TLS, while closing).
    close_notified: bool,
    /// What the bytes on the stream are.
    app: App,
    /// Since when its backlog has been over `max_output_bytes`.
    over_since: Option<Instant>,
}

/// What a socket's (decrypted) bytes carry.
enum App {
    /// Protocol frames as lines.
    Lines,
    /// An HTTP request, read until it is whole.
    Http(Box<HttpRequest>),
    /// Protocol frames as WebSocket text messages.
    WebSocket(Box<WebSocket>),
    /// Over a limit, on a TLS listener: once the handshake is done it gets
    /// the refusal (a `bye`, or a 503 over HTTPS), then is closed; given up
    /// at `deadline`.
    Refused {
        reason: ByeReason,
        http: bool,
        deadline: Instant,
    },
}

struct HttpRequest {
    head: Vec<u8>,
    /// When an unfinished request is given up (in `close_deadlines`).
    deadline: Instant,
    config: Arc<HttpConfig>,
}

impl Socket {
    /// Whether its input still goes anywhere.
    fn takes_input(&self) -> bool {
        self.phase == Phase::Open && (self.conn.is_some() || matches!(self.app, App::Http(_)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// The core closed it: write what is queued, then hang up.
    Flushing {
        deadline: Instant,
    },
    /// Output is written and our side shut down: read and discard until
    /// the peer hangs up too, so unread input does not turn the close into
    /// a reset that destroys the last frames in flight.
    Draining {
        deadline: Instant,
    },
}

impl Reactor {
    pub fn new(
        listeners: Vec<Listener>,
        core: Server,
        storage: Option<Storage>,
        clock: Clock,
        config: ReactorConfig,
        stop: Arc<AtomicBool>,
        poller: Arc<Poller>,
    ) -> io::Result<Reactor> {
        let verifier = Verifier::start(
            config.verify_threads,
            config.verify_cpu_percent,
            config.reactor_cpu,
            poller.clone(),
        )?;
        let mut listening = Vec::new();
        for (i, listener) in listeners.into_iter().take(MAX_LISTENERS).enumerate() {
            listener.socket.set_nonblocking(true)?;
            listening.push(Listening {
                socket: Registered::new(
                    poller.clone(),
                    listener.socket,
                    Event::readable(LISTENER_KEY - i),
                    PollMode::Oneshot,
                )?,
                tls: listener.tls,
                http: listener.http,
            });
        }
        // Level-triggered sockets need no re-arming after each event: one
        // syscall fewer per read. Where the platform lacks it, oneshot.
        let socket_mode = if poller.supports_level() {
            PollMode::Level
        } else {
            PollMode::Oneshot
        };
        Ok(Reactor {
            poller,
            listeners: listening,
            socket_mode,
            core,
            storage,
            clock,
            config,
            sockets: Vec::new(),
            free_keys: Vec::new(),
            open: 0,
            per_ip: HashMap::new(),
            handshakes: None,
            handshakes_per_ip: HashMap::new(),
            slow_deadlines: BTreeSet::new(),
            by_conn: Vec::new(),
            dirty: Vec::new(),
            close_deadlines: BTreeSet::new(),
            accept_paused_until: None,
            stop,
            shutdown_deadline: None,
            read_buf: vec![0; 64 * 1024],
            instant: Instant::now(),
            verifier,
        })
    }

    /// Serves until a stop is requested and every connection has been said
    /// goodbye to (or the grace period ran out).
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::new();
        loop {
            self.instant = Instant::now();
            if self.stop.load(Ordering::SeqCst) && self.shutdown_deadline.is_none() {
                self.begin_shutdown()?;
            }
            if let Some(deadline) = self.shutdown_deadline {
                // Done once every socket is closed and every change the core
                // made (the logouts of the shutdown included) is durable.
                let persisted = !self.core.persist_pending()
                    && self.storage.as_ref().map_or(true, Storage::idle);
                if (self.open == 0 && persisted) || self.instant >= deadline {
                    if !persisted {
                        error!("shutdown grace period over with changes not yet durable");
                    }
                    if self.open > 0 {
                        warn!(
                            connections = self.open,
                            "shutdown grace period over: closing the rest"
                        );
                    }
                    return Ok(());
                }
            }
            let timeout = self
                .next_wakeup()
                .map(|at| at.saturating_duration_since(self.instant));
            events.clear();
            match self.poller.wait(&mut events, timeout) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.instant = Instant::now();
            self.take_verdicts();
            self.take_storage();
            for event in events.iter() {
                if event.key > LISTENER_KEY - MAX_LISTENERS {
                    self.accept_ready(LISTENER_KEY - event.key);
                } else {
                    self.socket_ready(event.key, event.readable);
                }
            }
            self.handle_deadlines();
            self.flush()?;
        }
    }

    /// Writes what the wake-up queued. A flush can make more output (a
    /// write error logs a user out; a drained connection gets its next
    /// offline page): flush until nothing is left, so nothing waits for an
    /// unrelated wake-up, for a bounded number of rounds (what is left is
    /// flushed on the next turn).
    fn flush(&mut self) -> io::Result<()> {
        for _ in 0..MAX_FLUSH_ROUNDS {
            if self.dirty.is_empty() {
                break;
            }
            self.flush_dirty()?;
        }
        Ok(())
    }

    /// Hands the core what the storage thread finished: batches committed
    /// (or failed), and offline pages read.
    fn take_storage(&mut self) {
        let Some(storage) = self.storage.as_mut() else {
            return;
        };
        for done in storage.finished() {
            let now = self.now();
            match done {
                Done::Persisted { batch, result } => {
                    let outcome = match result {
                        Ok(_) => Persisted::Committed,
                        Err(e) => {
                            error!(%batch, "{e}: taking the batch back; its requests are answered `unavailable`");
                            Persisted::Failed
                        }
                    };
                    self.core.handle_persisted(batch, outcome, now);
                }
                Done::Page { conn, result } => match result {
                    Ok(page) => {
                        let _ = self.core.handle_offline_page(conn, page, now);
                    }
                    Err(e) => {
                        // The messages stay queued; the connection is cut
                        // off so its next login tries again, rather than
                        // wait forever.
                        error!(%conn, "{e}: cannot read offline messages; closing the connection");
                        if let Some(key) = self.key_of(conn) {
                            self.report_written(key);
                            self.transport_closed(key, "its offline messages cannot be read");
                        }
                    }
                },
            }
            self.drain_core();
        }
    }

    /// Hands the core the password checks the workers finished.
    fn take_verdicts(&mut self) {
        let verdicts: Vec<_> = self.verifier.verdicts().collect();
        for (ticket, matches) in verdicts {
            let now = self.now();
            self.core.handle_verification(ticket, matches, now);
            self.drain_core();
        }
    }

    /// This wake-up's time, as the core's clock.
    fn now(&self) -> Timestamp {
        self.clock.at(self.instant)
    }

    /// The earliest moment something is due.
    fn next_wakeup(&self) -> Option<Instant> {
        [
            self.core.poll_timeout().map(|t| self.clock.instant(t)),
            self.close_deadlines.first().map(|(at, _)| *at),
            // A backlog over the limit is judged at its deadline, even if
            // nothing else happens by then.
            self.slow_deadlines.first().map(|(at, _)| *at),
            self.accept_paused_until,
            self.shutdown_deadline,
            // Flush rounds ran out with sockets still to write: go on at
            // once, after a look at the others.
            (!self.dirty.is_empty()).then_some(self.instant),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn accept_ready(&mut self, index: usize) {
        for _ in 0..ACCEPT_BUDGET {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            let tls = listener.tls.clone();
            let http = listener.http.clone();
            match listener.socket.get().accept() {
                Ok((stream, peer)) => self.admit(stream, peer, tls, http),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_out_of_descriptors(&e) => {
                    warn!("cannot accept: {e}; pausing accepts for {ACCEPT_PAUSE:?}");
                    self.accept_paused_until = Some(self.instant + ACCEPT_PAUSE);
                    return;
                }
                // A connection that failed between the handshake and accept
                // (ECONNABORTED and the like) concerns only that peer.
                Err(e) => debug!("accept failed: {e}"),
            }
        }
        self.rearm_listener(index);
    }

    fn rearm_listener(&self, index: usize) {
        if let Some(listener) = self.listeners.get(index) {
            if let Err(e) = listener.socket.rearm(Event::readable(LISTENER_KEY - index)) {
                warn!("cannot re-arm a listener: {e}");
            }
        }
    }

    fn admit(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        http: Option<Arc<HttpConfig>>,
    ) {
        let key_of_peer = PeerKey::from_ip(peer.ip());
        let refusal = self.admission(key_of_peer).map(|(reason, why)| {
            info!(%peer, open = self.open, "refused: {why}");
            reason
        });
        if tls.is_some() && !self.handshake_budget(key_of_peer) {
            // Handshakes cost the reactor CPU: past the budget, not even a
            // refusal is worth one.
            debug!(%peer, "TLS handshake budget spent: closing at once");
            return;
        }
        if let (Some(reason), None) = (refusal, &tls) {
            refuse(stream, http.is_some(), reason);
            return;
        }
        if refusal.is_some() && self.open >= self.config.max_connections {
            // No descriptor to spare for a handshake that only refuses.
            return;
        }
        if let Err(e) = stream
            .set_nonblocking(true)
            .and_then(|()| configure_socket(&stream, &self.config.limits))
        {
            warn!(%peer, "cannot set up the socket: {e}");
            return;
        }
        let tls = match tls.map(rustls::ServerConnection::new).transpose() {
            Ok(tls) => tls.map(Box::new),
            Err(e) => {
                warn!(%peer, "cannot start TLS: {e}");
                return;
            }
        };
        let key = self.free_keys.pop().unwrap_or(self.sockets.len());
        let stream = match Registered::new(
            self.poller.clone(),
            stream,
            Event::readable(key),
            self.socket_mode,
        ) {
            Ok(stream) => stream,
            Err(e) => {
                warn!(%peer, "cannot register the socket: {e}");
                self.free_keys.push(key);
                return;
            }
        };
        if self.config.limits.max_connections_per_ip.is_some() {
            // Counted from here on; `remove` uncounts it.
            *self.per_ip.entry(key_of_peer).or_default() += 1;
        }
        let app = match http {
            _ if refusal.is_some() => {
                let deadline = self.instant + CLOSE_GRACE;
                self.close_deadlines.insert((deadline, key));
                App::Refused {
                    reason: refusal.unwrap_or(ByeReason::ServerFull),
                    http: http.is_some(),
                    deadline,
                }
            }
            Some(config) => {
                let deadline = self.instant + HTTP_REQUEST_TIMEOUT;
                self.close_deadlines.insert((deadline, key));
                App::Http(Box::new(HttpRequest {
                    head: Vec::new(),
                    deadline,
                    config,
                }))
            }
            None => App::Lines,
        };
        let lines = matches!(app, App::Lines);
        let socket = Socket {
            stream,
            peer,
            conn: None,
            closed_conn: None,
            output: OutputQueue::default(),
            phase: Phase::Open,
            armed: Some((true, false)),
            dirty: false,
            tls,
            close_notified: false,
            app,
            over_since: None,
        };
        if key == self.sockets.len() {
            self.sockets.push(Some(socket));
        } else {
            self.sockets[key] = Some(socket);
        }
        self.open += 1;
        if lines {
            self.start_session(key);
        } else {
            debug!(%peer, "HTTP connection");
        }
    }

    /// Whether a new connection from `peer` may come in, or the reason it
    /// is refused (and why, for the log). The admission policy, in one
    /// place.
    fn admission(&self, peer: PeerKey) -> Option<(ByeReason, &'static str)> {
        let limits = &self.config.limits;
        if self.open >= self.config.max_connections {
            return Some((ByeReason::ServerFull, "server full"));
        }
        let from_peer = self.per_ip.get(&peer).copied().unwrap_or(0);
        if limits
            .max_connections_per_ip
            .is_some_and(|limit| from_peer >= limit)
        {
            return Some((
                ByeReason::TooManyConnections,
                "too many connections from this address",
            ));
        }
        if let Some(percent) = limits.max_unauthenticated_percent {
            // Sockets without a logged-in user: new ones, HTTP requests,
            // closing ones. Logged-in users can always be let in again.
            let unauthenticated = self.open.saturating_sub(self.core.users_online());
            let cap = self.config.max_connections * usize::from(percent) / 100;
            if unauthenticated >= cap.max(1) {
                return Some((
                    ByeReason::ServerFull,
                    "server full of connections not logged in",
                ));
            }
        }
        None
    }

    /// Takes a TLS handshake from the budgets (overall and `peer`'s):
    /// whether one may start now.
    fn handshake_budget(&mut self, peer: PeerKey) -> bool {
        let now = self.now();
        let limits = &self.config.limits;
        if let Some(rate) = limits.tls_handshakes_per_ip {
            if self.handshakes_per_ip.len() > 4096 {
                // Forget addresses whose budget is whole again.
                self.handshakes_per_ip
                    .retain(|_, bucket| bucket.full_at(rate.burst, rate.per_second) > now);
            }
            let bucket = self
                .handshakes_per_ip
                .entry(peer)
                .or_insert_with(|| TokenBucket::full(rate.burst, now));
            if !bucket.take(rate.burst, rate.per_second, now) {
                return false;
            }
        }
        match limits.tls_handshakes {
            Some(Rate { burst, per_second }) => self
                .handshakes
                .get_or_insert_with(|| TokenBucket::full(burst, now))
                .take(burst, per_second, now),
            None => true,
        }
    }

    /// Opens the core's connection for the socket at `key`.
    fn start_session(&mut self, key: usize) {
        let now = self.now();
        let socket = self.sockets[key].as_ref().expect("keys point at sockets");
        let peer = PeerKey::from_ip(socket.peer.ip());
        let conn = self
            .core
            .accept(peer, *uuid::Uuid::new_v4().as_bytes(), now);
        if self.by_conn.len() <= conn.index() {
            self.by_conn.resize(conn.index() + 1, None);
        }
        self.by_conn[conn.index()] = Some((conn, key));
        let socket = self.sockets[key].as_mut().expect("keys point at sockets");
        socket.conn = Some(conn);
        let kind = if matches!(socket.app, App::WebSocket(_)) {
            " (WebSocket)"
        } else {
            ""
        };
        info!(peer = %socket.peer, %conn, "connected{kind}");
        self.drain_core();
    }

    /// Hands bytes read from the socket at `key` to whatever they are for.
    fn deliver(&mut self, key: usize, data: &[u8]) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        match &mut socket.app {
            App::Lines => {
                if let Some(conn) = socket.conn {
                    let now = self.now();
                    if self.core.handle_input(conn, data, now).is_ok() {
                        self.drain_core();
                    }
                }
            }
            App::Http(request) => {
                request.head.extend_from_slice(data);
                self.serve_request(key, data.len());
            }
            App::WebSocket(ws) => {
                let received = ws.receive(data);
                self.serve_messages(key, received);
            }
            // Refused: what it says before its refusal goes nowhere.
            App::Refused { .. } => {}
        }
    }

    /// Answers the HTTP request on `key` once it is whole (or too long):
    /// with a response and a close, or an upgrade to a WebSocket session.
    /// `new` is how many bytes of the head just arrived.
    fn serve_request(&mut self, key: usize, new: usize) {
        let socket = self.sockets[key].as_mut().expect("keys point at sockets");
        let App::Http(request) = &mut socket.app else {
            return;
        };
        // Parse only once the head may be whole (a blank line came) or is
        // too long, not once per byte of a slow sender.
        let scanned = request.head.len().saturating_sub(new + 2);
        let ended = request.head[scanned..]
            .windows(2)
            .any(|w| w == b"\n\n" || w == b"\n\r");
        if !ended && request.head.len() < http::MAX_REQUEST_BYTES {
            return;
        }
        let deadline = request.deadline;
        match http::route(&request.head, &request.config) {
            Routed::Partial => {}
            Routed::Respond(response) => {
                socket.output.push_raw(response);
                socket.app = App::Lines;
                self.close_deadlines.remove(&(deadline, key));
                self.start_closing(key, None);
            }
            Routed::Upgrade { response, consumed } => {
                let rest = request.head.split_off(consumed);
                socket.output.push_raw(response);
                let limit = self.core.config().max_frame_bytes;
                socket.app = App::WebSocket(Box::new(WebSocket::new(limit)));
                self.close_deadlines.remove(&(deadline, key));
                self.mark_dirty(key);
                self.start_session(key);
                if !rest.is_empty() {
                    self.deliver(key, &rest);
                }
            }
        }
    }

    /// Serves what a WebSocket read made: pongs, then the frames in order,
    /// then the close that ends the session, if any.
    fn serve_messages(&mut self, key: usize, received: websocket::Received) {
        let mut frames = received.frames;
        if let Some(reply) = received.reply {
            let socket = self.sockets[key].as_mut().expect("keys point at sockets");
            socket.output.push_raw(reply);
            self.mark_dirty(key);
            // Pongs count toward the backlog like any output: a peer that
            // pings and never reads is a slow consumer.
            if self.enforce_backlog(key) {
                frames.clear();
                self.drain_core();
            }
        }
        let mut ended = received.ended;
        for frame in frames {
            let Some(conn) = self.sockets[key].as_ref().and_then(|s| s.conn) else {
                break;
            };
            let now = self.now();
            match self.core.handle_message(conn, &frame, now) {
                Ok(()) => self.drain_core(),
                Err(MessageError::LineBreak) => {
                    let socket = self.sockets[key].as_mut().expect("keys point at sockets");
                    if let App::WebSocket(ws) = &mut socket.app {
                        let reason = "one frame per message: no line breaks";
                        if let Some(close) = ws.refuse_invalid(reason) {
                            socket.output.push_raw(close);
                        }
                    }
                    ended = Some("WebSocket: a message with a line break".to_owned());
                    break;
                }
                Err(_) => break,
            }
        }
        if let Some(close) = received.close {
            // After the answers to the frames that came before it.
            if let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
                socket.output.push_raw(close);
            }
        }
        if let Some(why) = ended {
            self.transport_closed(key, &why);
        }
    }

    fn socket_ready(&mut self, key: usize, readable: bool) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        if self.socket_mode == PollMode::Oneshot {
            socket.armed = None;
        }
        let phase = socket.phase;
        // Whatever the event, the socket is flushed (if writable, that is
        // the point) and its interest updated at the end of the turn.
        self.mark_dirty(key);
        if !readable {
            return;
        }
        match phase {
            Phase::Open => self.read_input(key),
            Phase::Draining { .. } => self.discard_input(key),
            Phase::Flushing { .. } => {}
        }
    }

    /// Reads up to the budget and feeds the core.
    fn read_input(&mut self, key: usize) {
        if self
            .sockets
            .get(key)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.tls.is_some())
        {
            return self.read_tls_input(key);
        }
        let mut buf = std::mem::take(&mut self.read_buf);
        let mut total = 0;
        while total < READ_BUDGET {
            let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
                break;
            };
            if !socket.takes_input() {
                break;
            }
            match socket.stream.get().read(&mut buf) {
                Ok(0) => {
                    self.transport_closed(key, "the peer closed the connection");
                    break;
                }
                Ok(n) => {
                    total += n;
                    self.deliver(key, &buf[..n]);
                    if n < buf.len() && self.socket_mode == PollMode::Level {
                        // Drained for now; a level-triggered poller reports
                        // anything more, so skip the read that would only
                        // say "would block".
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.transport_closed(key, &e.to_string());
                    break;
                }
            }
        }
        self.read_buf = buf;
    }

    /// Reads TLS records up to the budget, and feeds the core what they
    /// decrypt to.
    fn read_tls_input(&mut self, key: usize) {
        let mut plain = std::mem::take(&mut self.read_buf);
        let mut total = 0;
        let mut tls_failed = false;
        let ended = loop {
            let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
                break None;
            };
            let Some(tls) = socket.tls.as_mut() else {
                break None;
            };
            match tls.read_tls(&mut socket.stream.get()) {
                Ok(0) => break Some("the peer closed the connection".to_owned()),
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Some(e.to_string()),
            }
            if let Err(e) = tls.process_new_packets() {
                // The alert that says why goes out before the close; the
                // session can carry nothing else now.
                let _ = tls.write_tls(&mut socket.stream.get());
                tls_failed = true;
                break Some(format!("TLS: {e}"));
            }
            if let App::Refused { reason, http, .. } = socket.app {
                if !tls.is_handshaking() {
                    // The handshake the budget allowed is done: now say why.
                    push_refusal(&mut socket.output, http, reason);
                    self.start_closing(key, None);
                    break None;
                }
            }
            // Everything decrypted so far goes to the core.
            let closed = loop {
                let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
                    break true;
                };
                if !socket.takes_input() {
                    // Closing (an HTTP answer, a WebSocket close): the
                    // rest of its input goes nowhere.
                    break false;
                }
                let Some(tls) = socket.tls.as_mut() else {
                    break true;
                };
                match tls.reader().read(&mut plain) {
                    Ok(0) => break true, // close_notify
                    Ok(n) => self.deliver(key, &plain[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                    Err(_) => break true, // the transport ended without close_notify
                }
            };
            if closed {
                break Some("the peer closed the TLS session".to_owned());
            }
            let taking = self
                .sockets
                .get(key)
                .and_then(Option::as_ref)
                .is_some_and(Socket::takes_input);
            if !taking || total >= READ_BUDGET {
                break None;
            }
        };
        self.read_buf = plain;
        if let Some(why) = ended {
            let handshaking = self
                .sockets
                .get(key)
                .and_then(Option::as_ref)
                .and_then(|s| s.tls.as_ref())
                .is_some_and(|t| t.is_handshaking());
            self.transport_closed(key, &why);
            if tls_failed || handshaking {
                // Nothing queued can go out: not after a broken record,
                // nor before a handshake that will not finish.
                self.discard_output(key);
            }
        }
    }

    /// Reads and throws away input of a connection being closed.
    fn discard_input(&mut self, key: usize) {
        let mut buf = std::mem::take(&mut self.read_buf);
        let mut total = 0;
        let mut finished = false;
        while let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
            match socket.stream.get().read(&mut buf) {
                Ok(0) => finished = true,
                Ok(n) if total + n < READ_BUDGET => {
                    total += n;
                    continue;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => finished = true,
            }
            break;
        }
        self.read_buf = buf;
        if finished {
            self.remove(key);
        }
    }

    /// The transport failed or ended: tell the core, keep flushing what is
    /// queued in case only the peer's sending half closed.
    fn transport_closed(&mut self, key: usize, why: &str) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        if let Some(conn) = socket.conn {
            info!(peer = %socket.peer, %conn, "disconnected: {why}");
            self.end_session(key, conn);
        }
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        // Answers waiting in the core for a commit (and a `bye` behind
        // them) still go out to a peer that closed only its sending half.
        let held = socket
            .closed_conn
            .is_some_and(|conn| self.core.holds_output(conn));
        if socket.output.is_empty() && !held {
            self.remove(key);
        } else {
            self.start_closing(key, None);
        }
    }

    /// Tells the core the session on `key` is gone: what is written so far
    /// counts as delivered; the rest may still go out (only the peer's
    /// sending half may be closed), and the socket's last report settles
    /// it (`remove`).
    fn end_session(&mut self, key: usize, conn: ConnId) {
        self.report_written(key);
        if let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
            socket.conn = None;
            socket.closed_conn = Some(conn);
        }
        // Still mapped (until `remove`): output the core held for a batch
        // reaches the closing socket once the batch is answered.
        let now = self.now();
        if self.core.handle_disconnect(conn, now).is_ok() {
            self.drain_core();
        }
    }

    /// Moves every core output to where it goes.
    fn drain_core(&mut self) {
        // Slow consumers found on the way are cut off only once the core
        // has nothing more queued, one at a time: the core has counted
        // every frame it queued for a connection, so reporting what a
        // socket wrote while some of its frames are still in the core
        // would count those as written.
        let mut cut = Vec::new();
        loop {
            self.drain_core_outputs(&mut cut);
            let Some(key) = cut.pop() else {
                return;
            };
            let socket = self.sockets.get(key).and_then(Option::as_ref);
            if let Some((conn, backlog)) = socket.and_then(|s| Some((s.conn?, s.output.len()))) {
                self.cut_off_slow_consumer(key, conn, backlog);
            }
        }
    }

    /// Moves the core's outputs to where they go until there are none;
    /// notes in `cut` the sockets whose backlog calls for a cut-off.
    fn drain_core_outputs(&mut self, cut: &mut Vec<usize>) {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Transmit { conn, frame } => {
                    let Some(key) = self.key_of(conn) else {
                        continue;
                    };
                    let socket = self.sockets[key].as_mut().expect("keys point at sockets");
                    // The core's frames are bare payloads: each transport
                    // frames them, without copying them.
                    match &socket.app {
                        App::WebSocket(_) => socket.output.push_frame(
                            websocket::text_header(frame.len()),
                            frame,
                            b"",
                        ),
                        _ => socket.output.push_frame(Head::EMPTY, frame, LINE_END),
                    }
                    self.mark_dirty(key);
                    if self.backlog_due(key) && !cut.contains(&key) {
                        cut.push(key);
                    }
                }
                Output::Close { conn, reason } => {
                    let Some(key) = self.key_of(conn) else {
                        continue;
                    };
                    let socket = self.sockets[key].as_mut().expect("keys point at sockets");
                    info!(peer = %socket.peer, %conn, "closing: {reason}");
                    socket.conn = None;
                    socket.closed_conn = Some(conn);
                    self.forget_conn(conn);
                    self.start_closing(key, Some(reason));
                }
                Output::Event(event) => log_event(&event, self.core.accounts()),
                Output::VerifyPassword {
                    ticket,
                    peer,
                    hash,
                    password,
                } => self.verifier.submit(ticket, peer, hash, password),
                Output::LoadOffline {
                    conn,
                    user,
                    after_seq,
                    max_bytes,
                } => match self.storage.as_mut() {
                    Some(storage) => storage.load_page(conn, user, after_seq, max_bytes),
                    // Texts stay in the core without a database: never asked.
                    None => error!(%conn, "an offline page was asked for without a database"),
                },
                Output::Persist { batch, changes } => match self.storage.as_mut() {
                    Some(storage) => storage.persist(batch, changes),
                    None => {
                        // Not durable without a database: the core makes no
                        // batches then, but if it did, nothing could fail.
                        let now = self.now();
                        self.core.handle_persisted(batch, Persisted::Committed, now);
                    }
                },
                other => debug!("unhandled core output {other:?}"),
            }
        }
    }

    /// Cuts the connection on `key` off as a slow consumer if its unsent
    /// output is over the limit; whether it did.
    fn enforce_backlog(&mut self, key: usize) -> bool {
        if !self.backlog_due(key) {
            return false;
        }
        let socket = self.sockets[key].as_ref().expect("keys point at sockets");
        if let Some(conn) = socket.conn {
            let backlog = socket.output.len();
            self.cut_off_slow_consumer(key, conn, backlog);
        }
        true
    }

    /// Whether the backlog on `key` calls for a cut-off now (the backlog
    /// policy); starts its clock when it first goes over the limit.
    fn backlog_due(&mut self, key: usize) -> bool {
        let socket = self.sockets[key].as_mut().expect("keys point at sockets");
        let backlog = socket.output.len();
        if socket.conn.is_none() {
            return false;
        }
        match backlog_verdict(
            backlog,
            self.config.max_output_bytes,
            socket.over_since,
            self.config.limits.slow_consumer_after,
            self.instant,
        ) {
            Backlog::Fine => false,
            Backlog::Over => {
                if socket.over_since.is_none() {
                    let now = self.instant;
                    socket.over_since = Some(now);
                    let deadline = now + self.config.limits.slow_consumer_after;
                    self.slow_deadlines.insert((deadline, key));
                }
                false
            }
            Backlog::CutOff => true,
        }
    }

    /// After a write: a backlog back under the limit starts its clock
    /// afresh.
    fn backlog_written(&mut self, key: usize) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        if let Some(since) = socket.over_since {
            if socket.output.len() <= self.config.max_output_bytes {
                socket.over_since = None;
                self.slow_deadlines
                    .remove(&(since + self.config.limits.slow_consumer_after, key));
            }
        }
    }

    /// Cuts `conn` on `key` off as a slow consumer. Only while the core
    /// has no output queued (see `drain_core`); the caller drains the core
    /// after.
    fn cut_off_slow_consumer(&mut self, key: usize, conn: ConnId, backlog: usize) {
        let socket = self.sockets[key].as_mut().expect("keys point at sockets");
        warn!(peer = %socket.peer, %conn, backlog, "slow consumer: cutting it off");
        // What was written counts as delivered; what it has not started
        // reading is dropped (its offline messages stay queued, as the core
        // ends the drain), so the bye goes out next rather than after a
        // megabyte it will never read.
        let unsent = socket.output.frames();
        socket.output.drop_unstarted();
        let now = self.now();
        // The bye and the close come out of the core with the next outputs.
        let _ = self.core.cut_off_slow_consumer(conn, unsent, now);
    }

    /// Flushes what is queued on `key`, then hangs up; a WebSocket says
    /// goodbye with the close status for `reason` (the `bye`'s).
    fn start_closing(&mut self, key: usize, reason: Option<ByeReason>) {
        let socket = self.sockets[key].as_mut().expect("keys point at sockets");
        if socket.phase != Phase::Open {
            return;
        }
        if let App::WebSocket(ws) = &mut socket.app {
            // After the `bye`, the WebSocket's own goodbye.
            if let Some(close) = ws.close_frame(websocket_close_code(reason), "") {
                socket.output.push_raw(close);
            }
        }
        let deadline = self.instant + CLOSE_GRACE;
        socket.phase = Phase::Flushing { deadline };
        self.close_deadlines.insert((deadline, key));
        self.mark_dirty(key);
    }

    fn handle_deadlines(&mut self) {
        let now = self.instant;
        if let Some((_, timer)) = self
            .core
            .next_timer()
            .filter(|&(t, _)| self.clock.instant(t) <= now)
        {
            debug!("woke for the core's {timer}");
            self.core.handle_timeout(self.clock.at(now));
            self.drain_core();
        }
        while let Some(&(deadline, key)) = self.slow_deadlines.first() {
            if deadline > now {
                break;
            }
            self.slow_deadlines.pop_first();
            // Still over since then (a write under the limit removes it;
            // a backlog found under it starts its clock afresh).
            self.backlog_written(key);
            if self.sockets.get(key).and_then(Option::as_ref).is_some() && self.enforce_backlog(key)
            {
                // The bye, the close and the presence wait in the core.
                self.drain_core();
            }
        }
        while let Some(&(deadline, key)) = self.close_deadlines.first() {
            if deadline > now {
                break;
            }
            self.close_deadlines.pop_first();
            if let Some(socket) = self.sockets.get(key).and_then(Option::as_ref) {
                debug!(peer = %socket.peer, "close grace period over");
                self.remove(key);
            }
        }
        if self.accept_paused_until.is_some_and(|until| until <= now) {
            self.accept_paused_until = None;
            for index in 0..self.listeners.len() {
                self.rearm_listener(index);
            }
        }
    }

    /// Writes every socket with new output once, and re-arms interest.
    fn flush_dirty(&mut self) -> io::Result<()> {
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
                continue;
            };
            socket.dirty = false;
            let result = match socket.tls.as_mut() {
                Some(tls) => flush_tls(
                    tls,
                    &mut socket.output,
                    socket.stream.get(),
                    matches!(socket.phase, Phase::Flushing { .. }),
                    &mut socket.close_notified,
                ),
                None => socket.output.write_to(&mut socket.stream.get()),
            };
            match result {
                Ok(Flushed::All) => {
                    let held = socket
                        .closed_conn
                        .is_some_and(|conn| self.core.holds_output(conn));
                    if let (Phase::Flushing { deadline }, false) = (socket.phase, held) {
                        // Our side is done; hear the peer out, briefly.
                        let _ = socket.stream.get().shutdown(Shutdown::Write);
                        socket.phase = Phase::Draining { deadline };
                    }
                }
                Ok(Flushed::Blocked) => {}
                Err(e) => {
                    // Nothing more can be written: what is queued is
                    // dropped with the socket (and not counted as written).
                    let why = format!("write failed: {e}");
                    self.transport_closed(key, &why);
                    self.remove(key);
                    continue;
                }
            }
            self.backlog_written(key);
            let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
                continue;
            };
            // What is written is delivered; the core hands over the next
            // offline page once at most half a page is unwritten.
            if let Some(conn) = socket.conn {
                let unsent = socket.output.frames();
                let now = self.now();
                if self.core.handle_drained(conn, unsent, now).is_ok() {
                    self.drain_core();
                }
            }
            self.rearm(key);
        }
        // Keep the allocation for the next turn.
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
        Ok(())
    }

    fn rearm(&mut self, key: usize) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        let read = matches!(socket.phase, Phase::Open | Phase::Draining { .. });
        let write = match &socket.tls {
            // Output waits while the handshake is under way; the
            // handshake's own records are `wants_write`.
            Some(tls) => tls.wants_write() || (!socket.output.is_empty() && !tls.is_handshaking()),
            None => !socket.output.is_empty(),
        };
        if socket.armed == Some((read, write)) {
            return;
        }
        let interest = match (read, write) {
            (true, true) => Event::all(key),
            (true, false) => Event::readable(key),
            (false, true) => Event::writable(key),
            (false, false) => Event::none(key),
        };
        match socket.stream.rearm(interest) {
            Ok(()) => socket.armed = Some((read, write)),
            Err(e) => {
                let why = format!("cannot re-arm: {e}");
                self.transport_closed(key, &why);
                self.remove(key);
            }
        }
    }

    fn begin_shutdown(&mut self) -> io::Result<()> {
        let deadline = self.instant + self.config.shutdown_grace;
        info!(
            connections = self.open,
            "shutting down: saying bye to every connection"
        );
        self.shutdown_deadline = Some(deadline);
        self.listeners.clear();
        // Requests still being read have no session to say bye to.
        let requests: Vec<usize> = (0..self.sockets.len())
            .filter(|&key| {
                self.sockets[key]
                    .as_ref()
                    .is_some_and(|s| matches!(s.app, App::Http(_)))
            })
            .collect();
        for key in requests {
            self.remove(key);
        }
        self.accept_paused_until = None;
        let now = self.now();
        self.core.shutdown(now);
        self.drain_core();
        self.flush_dirty()
    }

    /// A socket from `ip` is gone.
    fn uncount(&mut self, peer: PeerKey) {
        if let Some(count) = self.per_ip.get_mut(&peer) {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&peer);
            }
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
            if !socket.dirty {
                socket.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    fn key_of(&self, conn: ConnId) -> Option<usize> {
        match self.by_conn.get(conn.index()) {
            Some(Some((c, key))) if *c == conn => Some(*key),
            _ => None,
        }
    }

    fn forget_conn(&mut self, conn: ConnId) {
        if let Some(slot) = self.by_conn.get_mut(conn.index()) {
            if matches!(slot, Some((c, _)) if *c == conn) {
                *slot = None;
            }
        }
    }

    /// Tells the core how much of the output of the socket at `key` is
    /// written, before any of the rest is dropped.
    fn report_written(&mut self, key: usize) {
        let Some(socket) = self.sockets.get(key).and_then(Option::as_ref) else {
            return;
        };
        let Some(conn) = socket.conn.or(socket.closed_conn) else {
            return;
        };
        let unsent = socket.output.frames();
        let now = self.now();
        if self.core.handle_drained(conn, unsent, now).is_ok() {
            self.drain_core();
        }
    }

    /// Drops the output queued on `key`, unwritten, after telling the core
    /// (for the last time) how much of it was written before.
    fn discard_output(&mut self, key: usize) {
        self.report_written(key);
        if let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
            // That report settled the closed connection's drain: none follows.
            let closed = if socket.conn.is_none() {
                socket.closed_conn.take()
            } else {
                None
            };
            socket.output = OutputQueue::default();
            if let Some(conn) = closed {
                // Nor does any output: nothing more is written.
                self.forget_conn(conn);
            }
        }
    }

    /// Drops a socket: the poller forgets it and the descriptor closes.
    fn remove(&mut self, key: usize) {
        if let Some(conn) = self
            .sockets
            .get(key)
            .and_then(Option::as_ref)
            .and_then(|s| s.conn)
        {
            // Dropped without the core closing it: it ends here, while the
            // socket can still take what the core hands it meanwhile.
            self.end_session(key, conn);
        }
        if let Some(conn) = self
            .sockets
            .get(key)
            .and_then(Option::as_ref)
            .and_then(|s| s.closed_conn)
        {
            // Whatever the core still hands over for it goes nowhere now.
            self.forget_conn(conn);
        }
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::take) else {
            return;
        };
        if let Phase::Flushing { deadline } | Phase::Draining { deadline } = socket.phase {
            self.close_deadlines.remove(&(deadline, key));
        }
        if let App::Http(request) = &socket.app {
            self.close_deadlines.remove(&(request.deadline, key));
        }
        if let App::Refused { deadline, .. } = &socket.app {
            self.close_deadlines.remove(&(*deadline, key));
        }
        if let Some(since) = socket.over_since {
            self.slow_deadlines
                .remove(&(since + self.config.limits.slow_consumer_after, key));
        }
        let now = self.now();
        let unsent = socket.output.frames();
        if let Some(conn) = socket.closed_conn {
            // Its last frames are written, or never will be: that settles
            // which of its offline messages were delivered.
            if self.core.handle_drained(conn, unsent, now).is_ok() {
                self.drain_core();
            }
        }
        debug!(peer = %socket.peer, "socket closed");
        self.uncount(PeerKey::from_ip(socket.peer.ip()));
        self.free_keys.push(key);
        self.open -= 1;
    }
}

/// Accepted beyond a connection limit: say why (a `bye`, or a 503 to an
/// HTTP client) and hang up. The answer is tiny and the socket's send
/// buffer empty, so one non-blocking write suffices.
fn refuse(stream: TcpStream, http: bool, reason: ByeReason) {
    let _ = stream.set_nonblocking(true);
    let mut output = OutputQueue::default();
    push_refusal(&mut output, http, reason);
    let _ = output.write_to(&mut &stream);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Socket options every accepted connection gets.
fn configure_socket(stream: &TcpStream, limits: &Limits) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    // A backlog must not hide in the kernel, where the slow-consumer check
    // cannot see it (Linux grows send buffers to megabytes).
    socket.set_send_buffer_size(SEND_BUFFER_BYTES)?;
    // A peer that vanishes without a FIN or RST (its network gone) is found
    // dead by keepalive probes, or by unacknowledged data.
    if let Some(idle) = limits.tcp_keepalive {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval((idle / 3).max(Duration::from_secs(1)))
            .with_retries(3);
        socket.set_tcp_keepalive(&keepalive)?;
    }
    #[cfg(target_os = "linux")]
    if let Some(timeout) = limits.tcp_user_timeout {
        socket.set_tcp_user_timeout(Some(timeout))?;
    }
    Ok(())
}

/// Queues what a refused connection is told: a `bye` line, or a 503 to an
/// HTTP client.
fn push_refusal(output: &mut OutputQueue, http: bool, reason: ByeReason) {
    if http {
        output.push_raw(http::unavailable(&format!("{reason}")));
    } else {
        output.push_frame(Head::EMPTY, ServerFrame::Bye { reason }.encode(), LINE_END);
    }
}

/// What a socket's backlog calls for.
#[derive(Debug, PartialEq, Eq)]
enum Backlog {
    Fine,
    /// Over the limit, for less than the grace time so far.
    Over,
    CutOff,
}

/// The slow-consumer policy: a backlog over `limit` is cut off once it has
/// been over for `grace` (it was over since `over_since`), or at once past
/// 4 times `limit`, so a burst does not cut off a reader that keeps up.
fn backlog_verdict(
    backlog: usize,
    limit: usize,
    over_since: Option<Instant>,
    grace: Duration,
    now: Instant,
) -> Backlog {
    if backlog > limit.saturating_mul(4) {
        Backlog::CutOff
    } else if backlog <= limit {
        Backlog::Fine
    } else if over_since.is_some_and(|since| now >= since + grace) {
        Backlog::CutOff
    } else {
        Backlog::Over
    }
}

/// The WebSocket close status that goes with a `bye` reason: 1001 (going
/// away) at shutdown, 1008 (policy) for a flood or a slow consumer, 1000
/// otherwise.
fn websocket_close_code(reason: Option<ByeReason>) -> CloseCode {
    match reason {
        Some(ByeReason::ServerShutdown) => CloseCode::Away,
        Some(ByeReason::Flood | ByeReason::SlowConsumer) => CloseCode::Policy,
        _ => CloseCode::Normal,
    }
}

/// Moves queued frames through the TLS session onto the socket: as much
/// plaintext as rustls buffers, then its records, until the socket would
/// block or everything is out. While `closing`, `close_notify` follows the
/// last frame.
fn flush_tls(
    tls: &mut rustls::ServerConnection,
    output: &mut OutputQueue,
    stream: &TcpStream,
    closing: bool,
    close_notified: &mut bool,
) -> io::Result<Flushed> {
    loop {
        if !tls.is_handshaking() {
            output.write_to(&mut TlsPlaintext(tls))?;
        }
        if closing && output.is_empty() && !*close_notified {
            tls.send_close_notify();
            *close_notified = true;
        }
        while tls.wants_write() {
            match tls.write_tls(&mut &*stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if output.is_empty() && (*close_notified || !closing) {
            return Ok(Flushed::All);
        }
        if tls.is_handshaking() {
            // The rest waits for the peer's handshake messages.
            return Ok(Flushed::Blocked);
        }
    }
}

/// rustls' plaintext buffer as a writer that says "would block" when full,
/// so `OutputQueue` keeps what does not fit.
struct TlsPlaintext<'a>(&'a mut rustls::ServerConnection);

impl io::Write for TlsPlaintext<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.writer().write(buf)? {
            0 if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        match self.0.writer().write_vectored(bufs)? {
            0 if total > 0 => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE and ENFILE; `io::ErrorKind` has no stable kind for them.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Logs a core event. A name typed at a login is logged only if it is an
/// account: people type passwords into the name field too.
fn log_event(event: &CoreEvent, accounts: &chatproto::Accounts) {
    match event {
        CoreEvent::LoggedIn { conn, user } => info!(%conn, %user, "logged in"),
        CoreEvent::LoginRefused { conn, user, code } if accounts.contains(user.as_str()) => {
            info!(%conn, %user, %code, "login refused")
        }
        CoreEvent::LoginRefused { conn, code, .. } => {
            info!(%conn, %code, "login refused (the name is no account)")
        }
        CoreEvent::Locked { user, .. } if !accounts.contains(user.as_str()) => {
            warn!("a name that is no account locked after failed logins")
        }
        CoreEvent::Locked { user, until } => warn!(%user, %until, "locked after failed logins"),
        CoreEvent::LoggedOut { conn, user } => info!(%conn, %user, "logged out"),
        CoreEvent::Flooding { conn } => warn!(%conn, "flooding past its rate limit: closing"),
        other => debug!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_over_the_limit_is_cut_off_only_if_it_stays_over() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let verdict = |backlog, since, now| backlog_verdict(backlog, 1000, since, grace, now);
        assert_eq!(verdict(1000, None, t0), Backlog::Fine);
        assert_eq!(verdict(1001, None, t0), Backlog::Over);
        assert_eq!(
            verdict(1001, Some(t0), t0 + Duration::from_secs(9)),
            Backlog::Over
        );
        assert_eq!(verdict(1001, Some(t0), t0 + grace), Backlog::CutOff);
        // Past 4 times the limit, at once.
        assert_eq!(verdict(4001, None, t0), Backlog::CutOff);
        assert_eq!(verdict(4000, None, t0), Backlog::Over);
    }

    #[test]
    fn accepted_sockets_get_keepalive_a_user_timeout_and_a_small_send_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let limits = Limits {
            tcp_keepalive: Some(Duration::from_secs(30)),
            tcp_user_timeout: Some(Duration::from_secs(60)),
            ..Limits::default()
        };
        configure_socket(&accepted, &limits).unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(60))
        );
        // Linux reports twice what was set (it counts its own overhead).
        let sndbuf = socket.send_buffer_size().unwrap();
        assert!(sndbuf <= 2 * SEND_BUFFER_BYTES, "{sndbuf}");
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn each_bye_reason_has_its_websocket_close_status() {
        let code = |r| u16::from(websocket_close_code(r));
        assert_eq!(code(Some(ByeReason::ServerShutdown)), 1001);
        assert_eq!(code(Some(ByeReason::Flood)), 1008);
        assert_eq!(code(Some(ByeReason::SlowConsumer)), 1008);
        assert_eq!(code(Some(ByeReason::Logout)), 1000);
        assert_eq!(code(Some(ByeReason::IdleTimeout)), 1000);
        assert_eq!(code(None), 1000);
    }
}
