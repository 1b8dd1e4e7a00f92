//! One socket's transport, sans-IO: what the bytes on a connection are
//! (protocol lines, an HTTP request, WebSocket messages), its TLS session,
//! its output queue, how it closes, and its deadlines.
//!
//! A [`Link`] is told what arrived ([`Link::received`], [`Link::eof`]) and
//! when; it gives back what the bytes carry for the core, one
//! [`LinkEvent`] at a time ([`Link::poll_event`]), and writes what is
//! queued to any `Write` ([`Link::write_to`]). It never touches a socket,
//! a clock or the core: the reactor does, so a link is tested in process,
//! with bytes in and bytes out (see the tests below).
//!
//! Events come one at a time because the core's answer to one must be
//! queued before the link goes on: a WebSocket close from the peer is
//! echoed after the answers to the messages before it.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes};
use chatproto::ByeReason;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::admission::Refusal;
use crate::http::{self, HttpConfig, Routed};
use crate::output_queue::{Flushed, Head, OutputQueue, LINE_END};
use crate::tls::{Decrypted, TlsConfig, TlsSession};
use crate::websocket::{self, WebSocket};

/// How long a closed connection may take to drain its output and hang up.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long an HTTP connection may take to send its request.
pub const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a kept HTTP connection may wait for its next request.
pub const HTTP_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests one HTTP connection may make; the last is answered with
/// `Connection: close`.
pub const MAX_HTTP_REQUESTS: usize = 100;
/// Unwritten output past which an HTTP connection's answer is its last.
pub const MAX_KEPT_OUTPUT_BYTES: usize = 64 * 1024;

/// What every link of a server shares.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The core's frame limit: a WebSocket takes messages up to
    /// [`websocket::MESSAGE_LIMIT_FACTOR`] times it.
    pub max_frame_bytes: usize,
    /// A backlog above this is a slow consumer's...
    pub max_output_bytes: usize,
    /// ...once it has been above it this long (at once past 4 times it).
    pub slow_consumer_after: Duration,
}

/// What a new link carries.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Protocol frames as lines, from the start.
    Lines,
    /// An HTTP request: the chat page, or an upgrade to a WebSocket.
    Http(Arc<HttpConfig>),
    /// Over a limit, on a TLS listener: once the handshake is done it gets
    /// its refusal, then is closed.
    Refused(Refusal),
}

/// What the bytes of a link carry for the core.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Protocol bytes as lines, cut anywhere: for `Server::handle_input`.
    Lines(Bytes),
    /// One WebSocket text message, one frame: for `Server::handle_message`.
    Message(Bytes),
    /// The HTTP request was a WebSocket upgrade: a session starts, and its
    /// messages follow.
    Upgraded,
    /// The link queued output of its own (a WebSocket pong): its backlog
    /// grew, and counts toward the slow-consumer limit like any output.
    Replied,
    /// The transport ended (the peer closed, or broke the protocol), and
    /// why. Whatever it still had to say is queued.
    Ended {
        /// Why, for the log.
        why: String,
        /// What is queued can never go out (a broken or unfinished TLS
        /// session): the caller reports what was written, then drops it.
        output_lost: bool,
    },
}

/// How far a link's closing got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Carrying traffic.
    Open,
    /// Closing: write what is queued, then hang up.
    Flushing,
    /// Output is written and our side shut down: read and discard until
    /// the peer hangs up too, so unread input does not turn the close into
    /// a reset that destroys the last frames in flight.
    Draining,
}

/// How far a write got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Everything queued is written.
    All,
    /// The writer would block; the rest waits for writability.
    Blocked,
    /// Everything is written and the link is closing: shut the socket
    /// down for writing. The link is now [`Phase::Draining`].
    ShutDown,
}

/// What a backlog calls for: the slow-consumer policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// Within the limit.
    Fine,
    /// Over the limit, for less than the grace time so far.
    Over,
    /// Cut it off.
    CutOff,
}

/// Which of a link's deadlines passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// The HTTP request, a refused TLS client or a close took too long:
    /// give the link up.
    GiveUp,
    /// The backlog has been over the limit for the grace time: judge it
    /// again (it may have gone down meanwhile).
    Backlog,
}

/// One socket's transport state.
#[derive(Debug)]
pub struct Link {
    config: Arc<LinkConfig>,
    app: App,
    tls: Option<Box<TlsSession>>,
    /// `close_notify` is queued (TLS, while closing).
    close_notified: bool,
    /// The TLS session broke: only its alert goes out.
    broken: bool,
    /// The core still holds output for this link's closed session (it
    /// waits for a batch): closing waits for it too.
    more_expected: bool,
    /// The transport ended ([`LinkEvent::Ended`]): no more input.
    ended: bool,
    output: OutputQueue,
    phase: Phase,
    /// When the link is given up: an unfinished HTTP request, a refused
    /// TLS client, or a close.
    expires: Option<Instant>,
    /// Since when the backlog has been over the limit.
    over_since: Option<Instant>,
    /// When that backlog is judged again.
    backlog_due: Option<Instant>,
    /// Bytes received and not yet taken apart: ciphertext on TLS. Like
    /// `plain`, it is let go of (not merely emptied) once taken apart: it
    /// may be a piece of the reactor's read buffer, whose memory is reused
    /// only once no piece of it is held.
    pending: Bytes,
    /// Plaintext not yet handed on.
    plain: Bytes,
}

/// What a link's (decrypted) bytes carry.
enum App {
    Lines,
    Http(Box<HttpRequest>),
    WebSocket(Box<WebSocket>),
    Refused(Refusal),
    /// The HTTP request got its answer: input goes nowhere.
    Answered,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            App::Lines => "Lines",
            App::Http(_) => "Http",
            App::WebSocket(_) => "WebSocket",
            App::Refused(_) => "Refused",
            App::Answered => "Answered",
        })
    }
}

struct HttpRequest {
    head: Vec<u8>,
    config: Arc<HttpConfig>,
    /// Requests answered on this connection.
    served: usize,
}

impl Link {
    /// A link for a connection accepted `now`, over TLS when `tls` is
    /// given.
    pub fn new(
        config: Arc<LinkConfig>,
        transport: Transport,
        tls: Option<&TlsConfig>,
        now: Instant,
    ) -> Result<Link, String> {
        let tls = tls
            .map(TlsSession::new)
            .transpose()
            .map_err(|e| format!("cannot start TLS: {e}"))?
            .map(Box::new);
        let (app, expires) = match transport {
            Transport::Lines => (App::Lines, None),
            Transport::Http(config) => (
                App::Http(Box::new(HttpRequest {
                    head: Vec::new(),
                    config,
                    served: 0,
                })),
                Some(now + HTTP_REQUEST_TIMEOUT),
            ),
            Transport::Refused(refusal) => (App::Refused(refusal), Some(now + CLOSE_GRACE)),
        };
        let mut link = Link {
            config,
            app,
            tls,
            close_notified: false,
            broken: false,
            more_expected: false,
            ended: false,
            output: OutputQueue::default(),
            phase: Phase::Open,
            expires,
            over_since: None,
            backlog_due: None,
            pending: Bytes::new(),
            plain: Bytes::new(),
        };
        if link.tls.is_none() {
            // Without a handshake to wait for, a refusal is said at once.
            link.refuse_if_ready(now);
        }
        Ok(link)
    }

    /// Bytes arrived. What they carry comes out of [`Link::poll_event`],
    /// which the caller calls until it returns `None`.
    pub fn received(&mut self, data: Bytes) {
        if self.pending.is_empty() {
            self.pending = data;
        } else {
            // Only if the caller stopped polling early: rare, so a copy.
            self.pending = [&self.pending[..], &data[..]].concat().into();
        }
    }

    /// The next thing the bytes received carry, or `None` once they are
    /// all taken apart (or the link no longer takes input).
    pub fn poll_event(&mut self, now: Instant) -> Option<LinkEvent> {
        let event = self.next_event(now);
        if matches!(event, Some(LinkEvent::Ended { .. })) {
            self.ended = true;
            self.drop_input();
        }
        event
    }

    fn next_event(&mut self, now: Instant) -> Option<LinkEvent> {
        loop {
            if self.phase != Phase::Open || self.ended {
                // Closing: what else it says goes nowhere.
                self.drop_input();
                return None;
            }
            if let Some(event) = self.serve_plain(now) {
                return Some(event);
            }
            if self.phase != Phase::Open {
                continue;
            }
            match self.decrypt(now) {
                Step::More => {}
                Step::Idle => return None,
                Step::Event(event) => return Some(event),
            }
        }
    }

    /// The peer closed its side (a read of 0 bytes).
    pub fn eof(&mut self) -> LinkEvent {
        self.ended = true;
        self.drop_input();
        LinkEvent::Ended {
            why: "the peer closed the connection".to_owned(),
            output_lost: self.output_lost(),
        }
    }

    /// Whether queued output can no longer go out if the transport ends
    /// now: nothing goes out through a TLS session that broke or never
    /// finished its handshake.
    pub fn output_lost(&self) -> bool {
        self.broken || self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Queues one core frame (a payload without terminator), framed for
    /// this transport: a line, or a WebSocket text message. The payload is
    /// shared, not copied.
    pub fn push_frame(&mut self, frame: Bytes) {
        match &self.app {
            App::WebSocket(_) => {
                self.output
                    .push_frame(websocket::text_header(frame.len()), frame, b"")
            }
            _ => self.output.push_frame(Head::EMPTY, frame, LINE_END),
        }
    }

    /// Refuses the WebSocket message just handed on, which the core would
    /// not take (a line break before its end): the close frame (1007) is queued,
    /// and the transport is over.
    pub fn refuse_message(&mut self) -> LinkEvent {
        self.ended = true;
        if let App::WebSocket(ws) = &mut self.app {
            if let Some(close) =
                ws.refuse_invalid("one frame per message: no line break before its end")
            {
                self.output.push_raw(close);
            }
        }
        LinkEvent::Ended {
            why: "WebSocket: a message with a line break before its end".to_owned(),
            output_lost: false,
        }
    }

    /// Starts closing: what is queued is written, then a WebSocket's close
    /// frame (with the status that goes with the `bye`'s `reason`) and
    /// TLS's `close_notify`; then our side shuts down.
    pub fn start_closing(&mut self, reason: Option<ByeReason>, now: Instant) {
        if self.phase != Phase::Open {
            return;
        }
        if let App::WebSocket(ws) = &mut self.app {
            if let Some(close) = ws.close_frame(websocket_close_code(reason), "") {
                self.output.push_raw(close);
            }
        }
        self.phase = Phase::Flushing;
        self.drop_input();
        let grace = now + CLOSE_GRACE;
        self.expires = match (&self.app, self.expires) {
            // A refused client's own deadline still holds.
            (App::Refused(_), Some(at)) => Some(at.min(grace)),
            _ => Some(grace),
        };
    }

    /// Writes what is queued (through TLS, if any) to `socket`, until it
    /// would block or everything is out.
    pub fn write_to(&mut self, socket: &mut impl Write) -> io::Result<Written> {
        let flushed = match self.tls.as_deref_mut() {
            Some(tls) => flush_tls(
                tls,
                &mut self.output,
                socket,
                self.phase == Phase::Flushing && !self.broken && !self.more_expected,
                &mut self.close_notified,
                self.broken,
            )?,
            None => self.output.write_to(socket)?,
        };
        Ok(match flushed {
            Flushed::Blocked => Written::Blocked,
            Flushed::All if self.phase == Phase::Flushing && !self.more_expected => {
                // Our side is done; hear the peer out, briefly.
                self.phase = Phase::Draining;
                Written::ShutDown
            }
            Flushed::All => Written::All,
        })
    }

    /// Whether the core still holds output for this link's closed session
    /// (answers waiting for a commit, and the `bye` behind them): while it
    /// does, a closing link writes what it has but does not shut down.
    pub fn expect_more(&mut self, more: bool) {
        self.more_expected = more;
    }

    /// Drops what is queued, unwritten.
    pub fn discard_output(&mut self) {
        self.output = OutputQueue::default();
    }

    /// Bytes queued and not yet written: the backlog.
    pub fn backlog(&self) -> usize {
        self.output.len()
    }

    /// Core frames not yet wholly written.
    pub fn unsent_frames(&self) -> usize {
        self.output.frames()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.output.is_empty()
    }

    /// Drops every unit not yet started (a slow consumer's backlog).
    pub fn drop_unstarted(&mut self) {
        self.output.drop_unstarted();
    }

    /// How far its closing got.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether input still goes anywhere: the caller keeps reading.
    pub fn takes_input(&self) -> bool {
        self.phase == Phase::Open && !self.ended && !matches!(self.app, App::Answered)
    }

    /// Whether it is still reading its HTTP request.
    pub fn is_http_request(&self) -> bool {
        matches!(self.app, App::Http(_))
    }

    /// Whether output waits to be written.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Whether it carries protocol lines.
    pub fn is_lines(&self) -> bool {
        matches!(self.app, App::Lines)
    }

    /// Whether it was refused at the door (on a TLS listener: it is told
    /// why once its handshake is done, then closed).
    pub fn is_refusing(&self) -> bool {
        matches!(self.app, App::Refused(_))
    }

    /// Whether it carries WebSocket messages.
    pub fn is_websocket(&self) -> bool {
        matches!(self.app, App::WebSocket(_))
    }

    /// Whether it is over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// What the socket should be polled for: (readable, writable).
    pub fn interest(&self) -> (bool, bool) {
        let read = self.phase != Phase::Flushing;
        let write = match &self.tls {
            // Output waits while the handshake is under way; the
            // handshake's own records are `wants_write`.
            Some(tls) => {
                tls.wants_write()
                    || (!self.output.is_empty() && !tls.is_handshaking() && !self.broken)
            }
            None => !self.output.is_empty(),
        };
        (read, write)
    }

    /// Judges the backlog now (the slow-consumer policy); starts its clock
    /// when it first goes over the limit.
    pub fn backlog_check(&mut self, now: Instant) -> Backlog {
        let verdict = backlog_verdict(
            self.output.len(),
            self.config.max_output_bytes,
            self.over_since,
            self.config.slow_consumer_after,
            now,
        );
        if verdict == Backlog::Over && self.over_since.is_none() {
            self.over_since = Some(now);
            self.backlog_due = Some(now + self.config.slow_consumer_after);
        }
        verdict
    }

    /// After a write: a backlog back under the limit starts its clock
    /// afresh.
    pub fn backlog_written(&mut self) {
        if self.over_since.is_some() && self.output.len() <= self.config.max_output_bytes {
            self.over_since = None;
            self.backlog_due = None;
        }
    }

    /// The earliest of its deadlines.
    pub fn deadline(&self) -> Option<Instant> {
        [self.expires, self.backlog_due].into_iter().flatten().min()
    }

    /// Which deadline passed by `now`, if any. A backlog deadline is
    /// reported once.
    pub fn timeout(&mut self, now: Instant) -> Option<Expired> {
        if self.expires.is_some_and(|at| at <= now) {
            return Some(Expired::GiveUp);
        }
        if self.backlog_due.is_some_and(|at| at <= now) {
            self.backlog_due = None;
            return Some(Expired::Backlog);
        }
        None
    }

    /// Serves the plaintext waiting, by what it carries; `None` once it
    /// needs more.
    fn serve_plain(&mut self, now: Instant) -> Option<LinkEvent> {
        match &mut self.app {
            App::Lines => (!self.plain.is_empty()).then(|| LinkEvent::Lines(self.take_plain())),
            App::Http(request) => {
                if self.plain.is_empty() {
                    return None;
                }
                let new = self.plain.len();
                request.head.extend_from_slice(&self.plain);
                self.plain = Bytes::new();
                self.serve_request(new, now)
            }
            App::WebSocket(ws) => {
                let mut input = &self.plain[..];
                let before = input.len();
                let read = ws.read_one(&mut input);
                let consumed = before - input.len();
                consume(&mut self.plain, consumed);
                match read {
                    websocket::Received::Message(message) => Some(LinkEvent::Message(message)),
                    websocket::Received::Reply(pong) => {
                        self.output.push_raw(pong);
                        Some(LinkEvent::Replied)
                    }
                    websocket::Received::Ended { why, close } => {
                        if let Some(close) = close {
                            // After the answers to what came before it.
                            self.output.push_raw(close);
                        }
                        self.plain = Bytes::new();
                        Some(LinkEvent::Ended {
                            why,
                            output_lost: false,
                        })
                    }
                    websocket::Received::NeedMore => None,
                }
            }
            App::Refused(_) | App::Answered => {
                // What it says before its refusal, or after its answer,
                // goes nowhere.
                self.plain = Bytes::new();
                None
            }
        }
    }

    fn take_plain(&mut self) -> Bytes {
        std::mem::take(&mut self.plain)
    }

    /// Lets go of input not yet taken apart: it goes nowhere now.
    fn drop_input(&mut self) {
        self.pending = Bytes::new();
        self.plain = Bytes::new();
    }

    /// Answers the HTTP request once it is whole (or too long): with a
    /// response and a close, or an upgrade to a WebSocket session. `new`
    /// is how many bytes of the head just arrived.
    fn serve_request(&mut self, new: usize, now: Instant) -> Option<LinkEvent> {
        let App::Http(request) = &mut self.app else {
            return None;
        };
        // Parse only once the head may be whole (a blank line came) or is
        // too long, not once per byte of a slow sender.
        let scanned = request.head.len().saturating_sub(new + 2);
        let ended = request.head[scanned..]
            .windows(2)
            .any(|w| w == b"\n\n" || w == b"\n\r");
        if !ended && request.head.len() < http::MAX_REQUEST_BYTES {
            return None;
        }
        // Pipelined requests are answered only while little output waits:
        // past it, this answer is the last (a client that sends and never
        // reads cannot make a few bytes of requests cost megabytes here).
        let may_keep =
            request.served + 1 < MAX_HTTP_REQUESTS && self.output.len() < MAX_KEPT_OUTPUT_BYTES;
        match http::route(&request.head, &request.config, SystemTime::now(), may_keep) {
            Routed::Partial => None,
            Routed::Respond {
                response,
                keep_alive,
                consumed,
            } => {
                self.output.push_raw(response);
                request.served += 1;
                if !keep_alive {
                    self.app = App::Answered;
                    self.start_closing(None, now);
                    return None;
                }
                // Kept for the next request: what came behind this one (a
                // pipelined request) is its start.
                request.head.drain(..consumed);
                self.expires = Some(now + HTTP_KEEPALIVE_TIMEOUT);
                let behind = request.head.len();
                if behind == 0 {
                    return None;
                }
                self.serve_request(behind, now)
            }
            Routed::Upgrade { response, consumed } => {
                let rest = request.head.split_off(consumed);
                self.output.push_raw(response);
                self.app = App::WebSocket(Box::new(WebSocket::new(self.config.max_frame_bytes)));
                self.expires = None;
                // Messages sent right behind the request come next.
                self.plain = Bytes::from(rest);
                Some(LinkEvent::Upgraded)
            }
        }
    }

    /// Takes more plaintext from what was received: through TLS, or as it
    /// is.
    fn decrypt(&mut self, now: Instant) -> Step {
        let Some(tls) = self.tls.as_deref_mut() else {
            if self.pending.is_empty() {
                return Step::Idle;
            }
            self.plain = std::mem::take(&mut self.pending);
            return Step::More;
        };
        let mut took = 0;
        if !self.pending.is_empty() {
            let mut input = &self.pending[..];
            match tls.read_tls(&mut input) {
                Ok(n) => {
                    took = n;
                    consume(&mut self.pending, n);
                }
                Err(e) => {
                    self.pending = Bytes::new();
                    return Step::Event(LinkEvent::Ended {
                        why: e.to_string(),
                        output_lost: self.output_lost(),
                    });
                }
            }
        }
        let decrypted = match tls.decrypt() {
            Ok(decrypted) => decrypted,
            Err(e) => {
                // The alert that says why is queued; the session can carry
                // nothing else now.
                self.broken = true;
                self.pending = Bytes::new();
                return Step::Event(LinkEvent::Ended {
                    why: format!("TLS: {e}"),
                    output_lost: true,
                });
            }
        };
        self.refuse_if_ready(now);
        match decrypted {
            Decrypted::Closed => Step::Event(LinkEvent::Ended {
                why: "the peer closed the TLS session".to_owned(),
                output_lost: self.output_lost(),
            }),
            Decrypted::Plain(plain) if !plain.is_empty() => {
                self.plain = plain;
                Step::More
            }
            Decrypted::Plain(_) if self.pending.is_empty() => Step::Idle,
            Decrypted::Plain(_) if took > 0 => Step::More,
            // Records left that the session takes no more of, and nothing
            // decrypted: it can go no further.
            Decrypted::Plain(_) => {
                self.pending = Bytes::new();
                Step::Event(LinkEvent::Ended {
                    why: "TLS: the session takes no more records".to_owned(),
                    output_lost: self.output_lost(),
                })
            }
        }
    }

    /// A refused link whose handshake is done (or that has none) says why
    /// and closes.
    fn refuse_if_ready(&mut self, now: Instant) {
        let App::Refused(refusal) = &self.app else {
            return;
        };
        if self.tls.as_ref().is_some_and(|t| t.is_handshaking()) || self.phase != Phase::Open {
            return;
        }
        refusal.queue(&mut self.output);
        self.start_closing(None, now);
    }
}

/// Takes `n` bytes off the front of `bytes`; once emptied it lets go of
/// its memory (see `Link::pending`).
fn consume(bytes: &mut Bytes, n: usize) {
    bytes.advance(n);
    if bytes.is_empty() {
        *bytes = Bytes::new();
    }
}

/// What one decryption step made.
enum Step {
    /// Plaintext to serve, or more ciphertext to take.
    More,
    /// Nothing more for now.
    Idle,
    Event(LinkEvent),
}

/// The slow-consumer policy: a backlog over `limit` is cut off once it has
/// been over for `grace` (it was over since `over_since`), or at once past
/// 4 times `limit`, so a burst does not cut off a reader that keeps up.
pub fn backlog_verdict(
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
/// away) at shutdown or when a cluster node expired, 1008 (policy) for a
/// flood or a slow consumer, 1000 otherwise.
pub fn websocket_close_code(reason: Option<ByeReason>) -> CloseCode {
    match reason {
        Some(ByeReason::ServerShutdown | ByeReason::NodeExpired) => CloseCode::Away,
        Some(ByeReason::Flood | ByeReason::SlowConsumer) => CloseCode::Policy,
        _ => CloseCode::Normal,
    }
}

/// Moves queued output through the TLS session onto `socket`: as much
/// plaintext as rustls buffers, then its records, until the socket would
/// block or everything is out. While `closing`, `close_notify` follows the
/// last frame. A `broken` session sends only the records it holds (its
/// alert).
fn flush_tls(
    tls: &mut TlsSession,
    output: &mut OutputQueue,
    socket: &mut impl Write,
    closing: bool,
    close_notified: &mut bool,
    broken: bool,
) -> io::Result<Flushed> {
    loop {
        if !tls.is_handshaking() && !broken {
            tls.write_plaintext(output)?;
        }
        if closing && output.is_empty() && !*close_notified {
            tls.send_close_notify();
            *close_notified = true;
        }
        while tls.wants_write() {
            match tls.write_tls(socket) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if broken || (output.is_empty() && (*close_notified || !closing)) {
            return Ok(Flushed::All);
        }
        if tls.is_handshaking() {
            // The rest waits for the peer's handshake messages.
            return Ok(Flushed::Blocked);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::Origins;
    use crate::websocket::tests::{masked, text};
    use tungstenite::protocol::frame::Frame;

    fn config() -> Arc<LinkConfig> {
        Arc::new(LinkConfig {
            max_frame_bytes: 64,
            max_output_bytes: 1000,
            slow_consumer_after: Duration::from_secs(10),
        })
    }

    fn http_config() -> Arc<HttpConfig> {
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 8080));
        Arc::new(HttpConfig {
            health: crate::health::Health::default(),
            origins: Origins::new(false, listen, &[], Vec::new()),
            tls: false,
            metrics: None,
        })
    }

    /// A line refusal for `reason`, with the core's `bye`.
    fn refusal(reason: ByeReason) -> Refusal {
        let bye = chatproto::ServerFrame::Bye { reason }.encode();
        Refusal::new(reason, bye, false)
    }

    /// Every event the bytes make.
    fn events(link: &mut Link, data: &[u8], now: Instant) -> Vec<LinkEvent> {
        link.received(Bytes::copy_from_slice(data));
        std::iter::from_fn(|| link.poll_event(now)).collect()
    }

    /// Everything the link writes now.
    fn written(link: &mut Link) -> (Vec<u8>, Written) {
        let mut out = Vec::new();
        let written = link.write_to(&mut out).unwrap();
        (out, written)
    }

    /// A link upgraded to a WebSocket, its 101 written.
    fn websocket_link(now: Instant) -> Link {
        let mut link = Link::new(config(), Transport::Http(http_config()), None, now).unwrap();
        events(&mut link, UPGRADE, now);
        written(&mut link);
        link
    }

    const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn lines_pass_through_and_frames_go_out_as_lines() {
        let now = Instant::now();
        let mut link = Link::new(config(), Transport::Lines, None, now).unwrap();
        assert_eq!(
            events(&mut link, b"whoami\nhel", now),
            [LinkEvent::Lines(Bytes::from_static(b"whoami\nhel"))]
        );
        let frame = Bytes::from_static(br#"{"type":"bye","reason":"logout"}"#);
        link.push_frame(frame.clone());
        link.push_frame(frame);
        assert_eq!((link.unsent_frames(), link.backlog()), (2, 66));
        let (out, written) = written(&mut link);
        assert_eq!(written, Written::All);
        assert_eq!(
            out,
            [&br#"{"type":"bye","reason":"logout"}"#[..], b"\n"]
                .concat()
                .repeat(2)
        );
        assert_eq!(link.unsent_frames(), 0);
    }

    #[test]
    fn a_websocket_upgrade_then_messages_in_both_directions() {
        let now = Instant::now();
        let mut link = Link::new(config(), Transport::Http(http_config()), None, now).unwrap();
        assert!(link.is_http_request());
        assert_eq!(link.deadline(), Some(now + HTTP_REQUEST_TIMEOUT));
        // The request in two pieces, with a message right behind it.
        let bytes = [UPGRADE, &text("whoami")].concat();
        assert_eq!(events(&mut link, &bytes[..20], now), []);
        assert_eq!(
            events(&mut link, &bytes[20..], now),
            [
                LinkEvent::Upgraded,
                LinkEvent::Message(Bytes::from_static(b"whoami"))
            ]
        );
        assert!(link.is_websocket());
        assert_eq!(link.deadline(), None, "no request deadline once upgraded");
        let frame = Bytes::from_static(b"{\"a\":1}");
        link.push_frame(frame);
        assert_eq!(link.unsent_frames(), 1, "the 101 is no core frame");
        let (out, _) = written(&mut link);
        let response = String::from_utf8_lossy(&out);
        assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
        assert!(out.ends_with(b"\r\n\r\n\x81\x07{\"a\":1}"), "{response}");
        // A ping is answered at once; the pong is output of the link's own.
        let ping = masked(Frame::ping(&b"p"[..]));
        assert_eq!(events(&mut link, &ping, now), [LinkEvent::Replied]);
        assert_eq!((link.unsent_frames(), link.backlog()), (0, 3));
        assert_eq!(written(&mut link).0, [0x8a, 1, b'p']);
    }

    #[test]
    fn no_piece_of_what_was_read_is_held_once_it_is_taken_apart() {
        // Each read is a piece of the reactor's read buffer, which is
        // reused only once no piece of it is held: an idle link must hold
        // none.
        let now = Instant::now();
        let read = |bytes: Vec<u8>, link: &mut Link| {
            let read = Bytes::from(bytes);
            let probe = read.clone();
            link.received(read);
            while link.poll_event(now).is_some() {}
            assert!(probe.is_unique(), "{link:?} holds a piece");
        };
        let mut lines = Link::new(config(), Transport::Lines, None, now).unwrap();
        read(b"whoami\n".to_vec(), &mut lines);
        let mut http = Link::new(config(), Transport::Http(http_config()), None, now).unwrap();
        read(UPGRADE[..8].to_vec(), &mut http);
        read([&UPGRADE[8..], &text("whoami")[..3]].concat(), &mut http);
        read(text("whoami")[3..].to_vec(), &mut http);
        assert!(http.is_websocket());
    }

    #[test]
    fn a_peers_websocket_close_is_echoed_after_the_answers_before_it() {
        let now = Instant::now();
        let mut link = websocket_link(now);
        let bytes = [text("logout"), masked(Frame::close(None))].concat();
        link.received(Bytes::from(bytes));
        assert_eq!(
            link.poll_event(now),
            Some(LinkEvent::Message(Bytes::from_static(b"logout")))
        );
        // The core answers before the link goes on.
        link.push_frame(Bytes::from_static(b"ok"));
        let Some(LinkEvent::Ended { why, output_lost }) = link.poll_event(now) else {
            panic!("the close ends it");
        };
        assert!(why.contains("closed") && !output_lost, "{why}");
        assert_eq!(link.poll_event(now), None);
        let (out, _) = written(&mut link);
        assert_eq!(&out[..4], b"\x81\x02ok");
        assert_eq!(out[4], 0x88, "then the echo");
    }

    #[test]
    fn a_message_the_core_refuses_closes_with_1007_and_closing_sends_the_bye_status() {
        let now = Instant::now();
        let mut link = websocket_link(now);
        assert!(matches!(
            link.refuse_message(),
            LinkEvent::Ended {
                output_lost: false,
                ..
            }
        ));
        let (out, _) = written(&mut link);
        assert_eq!((out[0], u16::from_be_bytes([out[2], out[3]])), (0x88, 1007));
        // One close only, whatever comes next.
        link.start_closing(Some(ByeReason::ServerShutdown), now);
        assert_eq!(written(&mut link), (vec![], Written::ShutDown));

        let mut link = websocket_link(now);
        link.push_frame(Bytes::from_static(b"bye"));
        link.start_closing(Some(ByeReason::ServerShutdown), now);
        let (out, written) = written(&mut link);
        assert_eq!(&out[..5], b"\x81\x03bye");
        assert_eq!(u16::from_be_bytes([out[7], out[8]]), 1001);
        assert_eq!(written, Written::ShutDown);
    }

    #[test]
    fn an_http_request_is_answered_then_closed_and_its_deadlines_follow() {
        let now = Instant::now();
        let mut link = Link::new(config(), Transport::Http(http_config()), None, now).unwrap();
        let later = now + Duration::from_secs(3);
        let request = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nmore bytes";
        assert_eq!(events(&mut link, request, later), []);
        assert_eq!(link.phase(), Phase::Flushing);
        assert!(!link.takes_input());
        assert_eq!(
            link.deadline(),
            Some(later + CLOSE_GRACE),
            "the close's grace"
        );
        assert_eq!(link.timeout(later + Duration::from_secs(4)), None);
        assert_eq!(link.interest(), (false, true));
        let (out, written) = written(&mut link);
        assert!(out.starts_with(b"HTTP/1.1 404 "));
        assert_eq!(written, Written::ShutDown);
        assert_eq!(link.phase(), Phase::Draining);
        assert_eq!(
            link.interest(),
            (true, false),
            "reads what the peer still sends"
        );
        assert_eq!(link.timeout(later + CLOSE_GRACE), Some(Expired::GiveUp));
        // A request that never ends is given up at its deadline.
        let mut slow = Link::new(config(), Transport::Http(http_config()), None, now).unwrap();
        assert_eq!(events(&mut slow, b"GET / HT", now), []);
        assert_eq!(
            slow.timeout(now + HTTP_REQUEST_TIMEOUT),
            Some(Expired::GiveUp)
        );
    }

    #[test]
    fn an_http_connection_serves_requests_in_turn_until_told_to_close() {
        let now = Instant::now();
        let mut link = Link::new(config(), Transport::Http(http_config()), None, now).unwrap();
        // Two requests at once (pipelined), and the start of a third.
        let later = now + Duration::from_secs(1);
        let two = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: x\r\n\r\nGET /chat";
        assert_eq!(events(&mut link, two, later), []);
        assert_eq!(link.phase(), Phase::Open);
        assert_eq!(link.deadline(), Some(later + HTTP_KEEPALIVE_TIMEOUT));
        let (out, _) = written(&mut link);
        let out = String::from_utf8(out).unwrap();
        let statuses: Vec<&str> = out.matches("HTTP/1.1 ").map(|_| "").collect();
        assert_eq!(statuses.len(), 2, "{out}");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.contains("\r\n\r\nok\nHTTP/1.1 404 Not Found\r\n"),
            "{out}"
        );
        assert!(!out.contains("Connection: close"), "{out}");
        // The third ends, saying it is the last.
        let last = b".css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        assert_eq!(events(&mut link, last, later), []);
        assert_eq!(link.phase(), Phase::Flushing);
        let (out, done) = written(&mut link);
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/css"),
            "{out}"
        );
        assert!(out.contains("\r\nConnection: close\r\n"), "{out}");
        assert_eq!(done, Written::ShutDown);

        // HTTP/1.0 closes after one; so does an error.
        for request in [
            &b"GET /healthz HTTP/1.0\r\n\r\n"[..],
            b"PUT / HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let mut link = Link::new(config(), Transport::Http(http_config()), None, now).unwrap();
            assert_eq!(events(&mut link, request, now), []);
            assert_eq!(link.phase(), Phase::Flushing);
        }

        // A client that pipelines and never reads gets answers until a
        // little output waits, the last saying so.
        let mut link = Link::new(config(), Transport::Http(http_config()), None, now).unwrap();
        let js = b"GET /chat.js HTTP/1.1\r\nHost: x\r\n\r\n".repeat(50);
        assert_eq!(events(&mut link, &js, now), []);
        assert_eq!(link.phase(), Phase::Flushing);
        let (out, _) = written(&mut link);
        let out = String::from_utf8(out).unwrap();
        let answers = out.matches("HTTP/1.1 200 OK").count();
        let each = include_str!("../web/chat.js").len();
        assert!(answers < 50, "{answers}");
        // Answers go on while under the bound, then one more, the last.
        assert!(answers <= MAX_KEPT_OUTPUT_BYTES / each + 2, "{answers}");
        assert_eq!(out.matches("Connection: close").count(), 1);

        // At most MAX_HTTP_REQUESTS, the last saying so.
        let mut link = Link::new(config(), Transport::Http(http_config()), None, now).unwrap();
        let many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(MAX_HTTP_REQUESTS + 5);
        assert_eq!(events(&mut link, &many, now), []);
        assert_eq!(link.phase(), Phase::Flushing);
        let (out, _) = written(&mut link);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), MAX_HTTP_REQUESTS);
        assert_eq!(out.matches("Connection: close").count(), 1);
    }

    #[test]
    fn a_refusal_without_tls_is_said_at_once() {
        let now = Instant::now();
        let refused = Transport::Refused(refusal(ByeReason::ServerFull));
        let mut link = Link::new(config(), refused, None, now).unwrap();
        assert_eq!(link.phase(), Phase::Flushing);
        assert_eq!(events(&mut link, b"login alice x\n", now), []);
        let (out, written) = written(&mut link);
        assert_eq!(out, b"{\"type\":\"bye\",\"reason\":\"server_full\"}\n");
        assert_eq!(written, Written::ShutDown);
    }

    #[test]
    fn a_backlog_over_the_limit_is_judged_at_its_deadline() {
        let t0 = Instant::now();
        let mut link = Link::new(config(), Transport::Lines, None, t0).unwrap();
        link.push_frame(Bytes::from(vec![b'x'; 999]));
        assert_eq!(link.backlog_check(t0), Backlog::Fine);
        assert_eq!(link.deadline(), None);
        link.push_frame(Bytes::from(vec![b'x'; 10]));
        assert_eq!(link.backlog_check(t0), Backlog::Over);
        let due = t0 + Duration::from_secs(10);
        assert_eq!(link.deadline(), Some(due));
        assert_eq!(link.timeout(due - Duration::from_millis(1)), None);
        assert_eq!(link.timeout(due), Some(Expired::Backlog));
        assert_eq!(link.timeout(due), None, "reported once");
        assert_eq!(link.backlog_check(due), Backlog::CutOff);
        // Cut off: what it has not started is dropped.
        link.drop_unstarted();
        assert_eq!((link.backlog(), link.unsent_frames()), (0, 0));
        // A write that brings the backlog under the limit stops the clock.
        let mut link = Link::new(config(), Transport::Lines, None, t0).unwrap();
        link.push_frame(Bytes::from(vec![b'x'; 1500]));
        assert_eq!(link.backlog_check(t0), Backlog::Over);
        written(&mut link);
        link.backlog_written();
        assert_eq!(link.deadline(), None);
        // Past 4 times the limit, at once.
        link.push_frame(Bytes::from(vec![b'x'; 4001]));
        assert_eq!(link.backlog_check(t0), Backlog::CutOff);
    }

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
    fn each_bye_reason_has_its_websocket_close_status() {
        let code = |r| u16::from(websocket_close_code(r));
        assert_eq!(code(Some(ByeReason::ServerShutdown)), 1001);
        assert_eq!(code(Some(ByeReason::NodeExpired)), 1001);
        assert_eq!(code(Some(ByeReason::Flood)), 1008);
        assert_eq!(code(Some(ByeReason::SlowConsumer)), 1008);
        assert_eq!(code(Some(ByeReason::Logout)), 1000);
        assert_eq!(code(Some(ByeReason::IdleTimeout)), 1000);
        assert_eq!(code(None), 1000);
    }

    #[cfg(feature = "tls")]
    mod tls {
        //! TLS links against a rustls client, in memory.

        use super::*;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

        /// A server configuration for a fresh self-signed certificate, and
        /// a client configuration that trusts it.
        fn configs() -> (TlsConfig, Arc<rustls::ClientConfig>) {
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            let der = CertificateDer::from(cert.cert.der().to_vec());
            let key =
                PrivateKeyDer::from(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
            let server = crate::tls::config_for(vec![der.clone()], key).unwrap();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(der).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let client = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            (server, Arc::new(client))
        }

        fn client(config: &Arc<rustls::ClientConfig>) -> rustls::ClientConnection {
            let name = ServerName::try_from("localhost").unwrap();
            rustls::ClientConnection::new(config.clone(), name).unwrap()
        }

        /// Moves records both ways until neither side has more; returns
        /// the events the link made.
        fn exchange(
            link: &mut Link,
            client: &mut rustls::ClientConnection,
            now: Instant,
        ) -> Vec<LinkEvent> {
            let mut all = Vec::new();
            for _ in 0..20 {
                let mut to_server = Vec::new();
                while client.wants_write() {
                    client.write_tls(&mut to_server).unwrap();
                }
                if !to_server.is_empty() {
                    all.extend(events(link, &to_server, now));
                }
                let (to_client, _) = written(link);
                if to_server.is_empty() && to_client.is_empty() {
                    break;
                }
                let mut input = &to_client[..];
                while !input.is_empty() {
                    client.read_tls(&mut input).unwrap();
                    client.process_new_packets().unwrap();
                }
            }
            all
        }

        /// A TLS link carrying `transport`, and a client for it.
        fn tls_link(transport: Transport, now: Instant) -> (Link, rustls::ClientConnection) {
            let (server, client_config) = configs();
            let link = Link::new(config(), transport, Some(&server), now).unwrap();
            (link, client(&client_config))
        }

        fn plaintext(client: &mut rustls::ClientConnection) -> Vec<u8> {
            let mut out = Vec::new();
            let _ = std::io::Read::read_to_end(&mut client.reader(), &mut out);
            out
        }

        #[test]
        fn lines_over_tls_both_ways_then_close_notify() {
            let now = Instant::now();
            let (mut link, mut client) = tls_link(Transport::Lines, now);
            // Output queued before the handshake waits for it.
            link.push_frame(Bytes::from_static(b"hello"));
            assert!(link.output_lost(), "nothing goes out before the handshake");
            std::io::Write::write_all(&mut client.writer(), b"whoami\n").unwrap();
            let got = exchange(&mut link, &mut client, now);
            assert_eq!(got, [LinkEvent::Lines(Bytes::from_static(b"whoami\n"))]);
            assert!(!link.output_lost());
            assert_eq!(plaintext(&mut client), b"hello\n");
            link.push_frame(Bytes::from_static(b"bye"));
            link.start_closing(None, now);
            exchange(&mut link, &mut client, now);
            assert_eq!(plaintext(&mut client), b"bye\n");
            assert_eq!(link.phase(), Phase::Draining);
            assert!(client.process_new_packets().unwrap().peer_has_closed());
        }

        #[test]
        fn a_websocket_over_tls() {
            let now = Instant::now();
            let (mut link, mut client) = tls_link(Transport::Http(http_config()), now);
            let bytes = [UPGRADE, &text("help")].concat();
            std::io::Write::write_all(&mut client.writer(), &bytes).unwrap();
            let got = exchange(&mut link, &mut client, now);
            assert_eq!(
                got,
                [
                    LinkEvent::Upgraded,
                    LinkEvent::Message(Bytes::from_static(b"help"))
                ]
            );
            link.push_frame(Bytes::from_static(b"{}"));
            exchange(&mut link, &mut client, now);
            assert!(plaintext(&mut client).ends_with(b"\r\n\r\n\x81\x02{}"));
        }

        #[test]
        fn a_refused_tls_client_hears_why_after_its_handshake() {
            let now = Instant::now();
            let refused = Transport::Refused(refusal(ByeReason::TooManyConnections));
            let (mut link, mut client) = tls_link(refused, now);
            assert_eq!(link.phase(), Phase::Open, "the handshake first");
            std::io::Write::write_all(&mut client.writer(), b"login alice x\n").unwrap();
            assert_eq!(exchange(&mut link, &mut client, now), []);
            assert_eq!(
                plaintext(&mut client),
                b"{\"type\":\"bye\",\"reason\":\"too_many_connections\"}\n"
            );
            assert_eq!(link.phase(), Phase::Draining);
        }

        #[test]
        fn plaintext_on_a_tls_link_breaks_it_and_only_the_alert_goes_out() {
            let now = Instant::now();
            let (mut link, _) = tls_link(Transport::Lines, now);
            link.push_frame(Bytes::from_static(b"hello"));
            let got = events(&mut link, b"login alice wonderland\n", now);
            let [LinkEvent::Ended { why, output_lost }] = &got[..] else {
                panic!("{got:?}");
            };
            assert!(why.starts_with("TLS: "), "{why}");
            assert!(output_lost);
            let (out, _) = written(&mut link);
            assert_eq!(out[0], 0x15, "a TLS alert record, and nothing else");
            assert!(!out.windows(5).any(|w| w == b"hello"));
        }

        #[test]
        fn a_peer_gone_during_the_handshake_loses_the_output() {
            let now = Instant::now();
            let (mut link, mut client) = tls_link(Transport::Lines, now);
            let mut hello = Vec::new();
            client.write_tls(&mut hello).unwrap();
            assert_eq!(events(&mut link, &hello, now), []);
            assert_eq!(
                link.eof(),
                LinkEvent::Ended {
                    why: "the peer closed the connection".to_owned(),
                    output_lost: true
                }
            );
        }
    }
}
