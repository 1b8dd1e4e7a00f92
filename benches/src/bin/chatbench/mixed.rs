//! `chatbench mixed`: two open-loop loads at once, on disjoint users, to
//! see whether durable storage stalls the server's event loop (issue 14,
//! "Durable mode does not stall the event loop").
//!
//! - **The store load.** Senders (`u<online>`, ...) send direct messages,
//!   `store_rate` a second in all, to `recipients` users who never log in
//!   (the last users), taken in turn so that every offline queue grows
//!   alike. The server stores each one and answers `ok` with
//!   `"stored":true`; with a database that answer leaves only after the
//!   commit (and its fsync) that holds the message. Its figure is stored
//!   messages acknowledged a second, counted over the measurement window:
//!   a commit path that cannot keep up, or that holds the event loop, shows
//!   as fewer acknowledgements than were offered.
//! - **The online load.** Users `u0`, ... send each other direct messages,
//!   `online_rate` a second in all. Its figure is the latency of each
//!   message, from its send time to its recipient reading it: while a
//!   commit holds the event loop, these wait too.
//!
//! Both are open loop: each sender's messages are due at fixed intervals,
//! whatever the answers, and a message's latency counts from when it was
//! *due*, not from when it went out, so a stalled server (or a load
//! generator that fell behind) cannot hide the stall (no coordinated
//! omission). Messages due in the measurement window are the measured
//! ones; after the window the run waits (at most [`DRAIN_TIMEOUT`]) for
//! every answer and every delivery.
//!
//! Every request must be answered `ok`, stored for the store load and
//! delivered for the online load (the server answers a connection's
//! requests in order, so each client matches answers to its oldest
//! unanswered request). Anything else (an `error`, a message stored that
//! should have been delivered or the reverse, no answer, a message never
//! delivered) is counted by kind; the caller reports a run with errors as
//! failed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use polling::{Event, Events, PollMode, Poller};

use crate::contains;
use crate::load::{field, next_random, parse};
use crate::outbox::Outbox;
use crate::process::ProcessSample;

/// How long all the clients' logins may take.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(120);
/// The presence notices of the logins must stop within this, or the run
/// starts anyway (nothing else sends before the loads start).
const QUIET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the answers and deliveries still due may take once sending
/// stops. A server that fell behind the store load has a backlog to work
/// through; past this, what is missing counts as errors.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Errors whose frames are kept to show (the rest are only counted).
const ERRORS_SHOWN: usize = 5;

#[derive(Debug, Clone)]
pub struct MixedConfig {
    pub addr: SocketAddr,
    /// Users `u0`..`u<online_clients - 1>`: they log in and message each
    /// other.
    pub online_clients: usize,
    /// Online messages a second, all online clients together.
    pub online_rate: u64,
    /// Users after the online ones: they log in and message the offline
    /// recipients.
    pub store_senders: usize,
    /// Stored messages a second, all store senders together.
    pub store_rate: u64,
    /// The last users: they never log in.
    pub recipients: usize,
    pub text_bytes: usize,
    pub warmup: Duration,
    pub measure: Duration,
    pub server_pid: Option<u32>,
}

impl MixedConfig {
    /// Accounts the server needs (`u<i>` with password `p<i>`).
    pub fn users(&self) -> usize {
        self.online_clients + self.store_senders + self.recipients
    }

    /// The first offline recipient's index.
    fn first_recipient(&self) -> usize {
        self.online_clients + self.store_senders
    }

    /// Stored messages each offline recipient gets at most in one run
    /// (sending stops at the end of the measurement window).
    pub fn stored_per_recipient(&self) -> u64 {
        let secs = (self.warmup + self.measure).as_secs_f64();
        // One more per sender: each sender's first message is due at the
        // start, before a whole interval has passed.
        let messages = (self.store_rate as f64 * secs).ceil() as u64 + self.store_senders as u64;
        messages.div_ceil(self.recipients.max(1) as u64)
    }
}

/// What a run measured.
#[derive(Debug)]
pub struct MixedReport {
    /// The measurement window.
    pub seconds: f64,
    /// Store messages due in the window.
    pub stored_sent: u64,
    /// `ok`s with `"stored":true` read in the window.
    pub stored_acked: u64,
    /// From due to `ok`, for store messages due in the window.
    pub stored_latency: Histogram<u64>,
    /// Online messages due in the window.
    pub online_sent: u64,
    /// Of those, how many their recipients read (before the drain ended).
    pub online_delivered: u64,
    /// From due to the recipient reading it, for online messages due in
    /// the window.
    pub online_latency: Histogram<u64>,
    /// How late the load generator queued each message due in the window
    /// (both loads): when it is late, the latencies above include its
    /// delay, which is the machine's (another process on the CPUs), not
    /// the server's.
    pub send_lag: Histogram<u64>,
    /// The server's CPU time over the window.
    pub server_cpu_secs: Option<f64>,
    /// Errors by kind: an `error` frame's code, or one of the kinds named
    /// in this module (`unanswered`, `not_delivered`, ...).
    pub errors: BTreeMap<String, u64>,
    /// The first few errors, with the frame or fact behind each.
    pub first_errors: Vec<String>,
}

impl MixedReport {
    /// Stored messages acknowledged a second over the window.
    pub fn stored_per_sec(&self) -> f64 {
        self.stored_acked as f64 / self.seconds
    }

    /// Errors of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// A latency quantile in microseconds.
    pub fn us(histogram: &Histogram<u64>, q: f64) -> f64 {
        histogram.value_at_quantile(q) as f64 / 1000.0
    }

    /// A latency maximum in microseconds.
    pub fn max_us(histogram: &Histogram<u64>) -> f64 {
        histogram.max() as f64 / 1000.0
    }

    /// The errors as `kind N, kind N`, or `none`.
    pub fn error_kinds(&self) -> String {
        if self.errors.is_empty() {
            return "none".to_owned();
        }
        self.errors
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Which load a client belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Online,
    Store,
}

/// A request sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// When it was due.
    due: Instant,
    /// Due inside the measurement window.
    marked: bool,
}

/// One logged-in user.
struct Client {
    stream: TcpStream,
    outbox: Outbox,
    partial: Vec<u8>,
    logged_in: bool,
    role: Role,
    /// Messages awaiting their `ok`, oldest first: answers come in the
    /// order of the requests.
    unanswered: VecDeque<Pending>,
    rng: u64,
    /// Listed in `Run::dirty`.
    dirty: bool,
}

/// What the frames read so far add up to.
struct Tally {
    stored_sent: u64,
    stored_acked: u64,
    stored_latency: Histogram<u64>,
    online_sent: u64,
    online_delivered: u64,
    online_latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    /// Every online message sent and read, warm-up included: the
    /// difference after the drain is what was lost.
    online_sent_all: u64,
    online_read_all: u64,
    errors: BTreeMap<String, u64>,
    first_errors: Vec<String>,
}

impl Tally {
    fn error(&mut self, kind: &str, detail: impl FnOnce() -> String) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
        if self.first_errors.len() < ERRORS_SHOWN {
            self.first_errors.push(format!("{kind}: {}", detail()));
        }
    }
}

struct Run<'a> {
    config: &'a MixedConfig,
    poller: Poller,
    clients: Vec<Client>,
    events: Events,
    /// Clients with output queued this turn: flushed once each at its end.
    dirty: Vec<usize>,
    start: Instant,
    measure_from: Instant,
    measure_until: Instant,
    padding: String,
    /// The store load's next recipient, as an offset from the first.
    next_recipient: usize,
    /// When each client's next message is due, soonest first.
    schedule: BinaryHeap<Reverse<(Instant, usize)>>,
    tally: Tally,
}

/// Logs every client in, runs both loads for the warm-up and the window,
/// then waits for what is still due.
pub fn run(config: &MixedConfig) -> Result<MixedReport, String> {
    let clients = config.online_clients + config.store_senders;
    let limit = rlimit::increase_nofile_limit(u64::MAX).map_err(|e| e.to_string())?;
    if (limit as usize) < clients + 16 {
        return Err(format!(
            "the open-file limit ({limit}) is too low for {clients} clients"
        ));
    }
    let histogram = || Histogram::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string());
    let now = Instant::now();
    let mut run = Run {
        config,
        poller: Poller::new().map_err(|e| e.to_string())?,
        clients: Vec::with_capacity(clients),
        events: Events::new(),
        dirty: Vec::new(),
        start: now,
        measure_from: now,
        measure_until: now,
        padding: "x".repeat(config.text_bytes),
        next_recipient: 0,
        schedule: BinaryHeap::new(),
        tally: Tally {
            stored_sent: 0,
            stored_acked: 0,
            stored_latency: histogram()?,
            online_sent: 0,
            online_delivered: 0,
            online_latency: histogram()?,
            send_lag: histogram()?,
            online_sent_all: 0,
            online_read_all: 0,
            errors: BTreeMap::new(),
            first_errors: Vec::new(),
        },
    };
    let result = run.connect().and_then(|()| run.drive());
    for client in &run.clients {
        let _ = run.poller.delete(&client.stream);
    }
    result
}

impl Run<'_> {
    fn connect(&mut self) -> Result<(), String> {
        for i in 0..self.config.online_clients + self.config.store_senders {
            let stream =
                TcpStream::connect(self.config.addr).map_err(|e| format!("client u{i}: {e}"))?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            stream.set_nonblocking(true).map_err(|e| e.to_string())?;
            // Level-triggered: no re-arming syscall after every event.
            // SAFETY: every stream lives in `clients`, inside the `Run`
            // that also owns the poller; `run` deletes them all before the
            // `Run` is dropped.
            #[allow(unsafe_code)]
            unsafe {
                self.poller
                    .add_with_mode(&stream, Event::readable(i), PollMode::Level)
                    .map_err(|e| e.to_string())?;
            }
            self.clients.push(Client {
                stream,
                outbox: Outbox::new(format!("login u{i} p{i}\n").into_bytes()),
                partial: Vec::new(),
                logged_in: false,
                role: if i < self.config.online_clients {
                    Role::Online
                } else {
                    Role::Store
                },
                unanswered: VecDeque::new(),
                rng: 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd),
                dirty: false,
            });
        }
        Ok(())
    }

    fn drive(&mut self) -> Result<MixedReport, String> {
        for i in 0..self.clients.len() {
            self.flush(i)?;
        }
        let deadline = Instant::now() + LOGIN_TIMEOUT;
        while self.clients.iter().any(|c| !c.logged_in) {
            if Instant::now() > deadline {
                let left = self.clients.iter().filter(|c| !c.logged_in).count();
                return Err(format!(
                    "{left} clients not logged in after {} s",
                    LOGIN_TIMEOUT.as_secs()
                ));
            }
            self.turn(Duration::from_millis(100))?;
        }
        // Let the logins' presence notices drain before the clock starts.
        let quiet_deadline = Instant::now() + QUIET_TIMEOUT;
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(500) && Instant::now() < quiet_deadline
        {
            if self.turn(Duration::from_millis(100))? > 0 {
                quiet_since = Instant::now();
            }
        }

        // A first sample now, so that the ones at the window's edges cost
        // only a read of /proc (the first also asks `getconf`).
        self.cpu()?;
        self.start = Instant::now();
        self.measure_from = self.start + self.config.warmup;
        self.measure_until = self.measure_from + self.config.measure;
        let online = self.config.online_clients;
        let (online_interval, store_interval) = self.intervals();
        for i in 0..self.clients.len() {
            // Each load's senders are spread evenly over one interval, so
            // the load arrives smoothly rather than in bursts.
            let offset = if i < online {
                online_interval.mul_f64(i as f64 / online as f64)
            } else {
                store_interval.mul_f64((i - online) as f64 / self.config.store_senders as f64)
            };
            self.schedule.push(Reverse((self.start + offset, i)));
        }

        let mut cpu_start = None;
        let mut measuring = false;
        loop {
            let now = Instant::now();
            if now >= self.measure_until {
                break;
            }
            if !measuring && now >= self.measure_from {
                measuring = true;
                cpu_start = self.cpu()?;
            }
            // Everything due by now goes out, each stamped with when it was
            // due: if this loop fell behind, the delay counts against the
            // latency rather than vanishing.
            while let Some(&Reverse((due, i))) = self.schedule.peek() {
                if due > now {
                    break;
                }
                self.schedule.pop();
                self.send(i, due, now);
                let interval = if i < online {
                    online_interval
                } else {
                    store_interval
                };
                if due + interval < self.measure_until {
                    self.schedule.push(Reverse((due + interval, i)));
                }
            }
            self.flush_dirty()?;
            let next = self
                .schedule
                .peek()
                .map_or(self.measure_until, |Reverse((due, _))| *due)
                .min(self.measure_until);
            self.turn(next.saturating_duration_since(Instant::now()))?;
        }
        let cpu_end = self.cpu()?;
        // The window's figures are taken now; the drain below adds only
        // the latencies and deliveries of messages due in the window.
        let stored_acked = self.tally.stored_acked;
        let drain_until = Instant::now() + DRAIN_TIMEOUT;
        while !self.settled() && Instant::now() < drain_until {
            self.turn(Duration::from_millis(100))?;
        }
        let unanswered: usize = self.clients.iter().map(|c| c.unanswered.len()).sum();
        if unanswered > 0 {
            *self
                .tally
                .errors
                .entry("unanswered".to_owned())
                .or_default() += unanswered as u64;
            if self.tally.first_errors.len() < ERRORS_SHOWN {
                self.tally.first_errors.push(format!(
                    "unanswered: {unanswered} messages without an answer {} s after sending stopped",
                    DRAIN_TIMEOUT.as_secs()
                ));
            }
        }
        let lost = self
            .tally
            .online_sent_all
            .saturating_sub(self.tally.online_read_all);
        if lost > 0 {
            *self
                .tally
                .errors
                .entry("not_delivered".to_owned())
                .or_default() += lost;
            if self.tally.first_errors.len() < ERRORS_SHOWN {
                self.tally.first_errors.push(format!(
                    "not_delivered: {lost} online messages never reached their recipient"
                ));
            }
        }
        let tally = &mut self.tally;
        Ok(MixedReport {
            seconds: self.config.measure.as_secs_f64(),
            stored_sent: tally.stored_sent,
            stored_acked,
            stored_latency: tally.stored_latency.clone(),
            online_sent: tally.online_sent,
            online_delivered: tally.online_delivered,
            online_latency: tally.online_latency.clone(),
            send_lag: tally.send_lag.clone(),
            server_cpu_secs: match (cpu_start, cpu_end) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            },
            errors: std::mem::take(&mut tally.errors),
            first_errors: std::mem::take(&mut tally.first_errors),
        })
    }

    /// Each online client's and each store sender's interval between
    /// messages.
    fn intervals(&self) -> (Duration, Duration) {
        let every = |clients: usize, rate: u64| {
            Duration::from_secs_f64(clients as f64 / rate.max(1) as f64)
                // A zero interval would schedule the same instant forever.
                .max(Duration::from_nanos(1))
        };
        (
            every(self.config.online_clients, self.config.online_rate),
            every(self.config.store_senders, self.config.store_rate),
        )
    }

    /// Every request answered and every online message read.
    fn settled(&self) -> bool {
        self.tally.online_read_all >= self.tally.online_sent_all
            && self.clients.iter().all(|c| c.unanswered.is_empty())
    }

    fn cpu(&self) -> Result<Option<f64>, String> {
        Ok(self
            .config
            .server_pid
            .map(ProcessSample::read)
            .transpose()?
            .map(|s| s.cpu_secs))
    }

    /// Queues client `i`'s next message, due at `due`, at `now`.
    fn send(&mut self, i: usize, due: Instant, now: Instant) {
        let marked = due >= self.measure_from && due < self.measure_until;
        if marked {
            self.tally.send_lag.saturating_record(latency_ns(now, due));
        }
        let online = self.config.online_clients;
        let client = &mut self.clients[i];
        let to = match client.role {
            Role::Online => {
                if marked {
                    self.tally.online_sent += 1;
                }
                self.tally.online_sent_all += 1;
                // Anyone online but the sender.
                (i + 1 + next_random(&mut client.rng) as usize % (online - 1)) % online
            }
            Role::Store => {
                if marked {
                    self.tally.stored_sent += 1;
                }
                // In turn: every offline queue grows alike, so none nears
                // its cap before the others.
                let to = self.config.first_recipient() + self.next_recipient;
                self.next_recipient = (self.next_recipient + 1) % self.config.recipients;
                to
            }
        };
        client.unanswered.push_back(Pending { due, marked });
        let ts = due.saturating_duration_since(self.start).as_nanos();
        let out = &mut client.outbox.out;
        // Writing into a Vec cannot fail.
        let _ = write!(out, "message u{to} ");
        let text_start = out.len();
        let _ = write!(out, "{i} {} {ts} ", u8::from(marked));
        let pad = self
            .config
            .text_bytes
            .saturating_sub(out.len() - text_start)
            .clamp(1, self.padding.len().max(1));
        out.extend_from_slice(&self.padding.as_bytes()[..pad.min(self.padding.len())]);
        out.push(b'\n');
        self.mark_dirty(i);
    }

    fn mark_dirty(&mut self, i: usize) {
        let client = &mut self.clients[i];
        if !client.dirty {
            client.dirty = true;
            self.dirty.push(i);
        }
    }

    fn flush_dirty(&mut self) -> Result<(), String> {
        let dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            self.clients[i].dirty = false;
            self.flush(i)?;
        }
        self.dirty = dirty;
        self.dirty.clear();
        Ok(())
    }

    /// Writes what client `i` has queued, as far as its socket takes it.
    fn flush(&mut self, i: usize) -> Result<(), String> {
        let client = &mut self.clients[i];
        client
            .outbox
            .flush(&client.stream, &self.poller, i)
            .map_err(|e| format!("client u{i}: {e}"))
    }

    /// Waits up to `timeout` once and serves every ready client; returns
    /// the frames read.
    fn turn(&mut self, timeout: Duration) -> Result<usize, String> {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        self.poller
            .wait(&mut events, Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut frames = 0;
        let mut buf = [0u8; 64 * 1024];
        for (i, readable, writable) in events.iter().map(|e| (e.key, e.readable, e.writable)) {
            if readable {
                // Bounded: a short read means the socket is drained for
                // now (level-triggered, the rest comes next turn).
                loop {
                    match (&self.clients[i].stream).read(&mut buf) {
                        Ok(0) => return Err(format!("the server closed client u{i}")),
                        Ok(n) => {
                            frames += self.take(i, &buf[..n])?;
                            if n < buf.len() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("client u{i}: {e}")),
                    }
                }
            }
            if writable {
                self.mark_dirty(i);
            }
        }
        self.events = events;
        self.flush_dirty()?;
        Ok(frames)
    }

    /// Splits input into frames and accounts for each.
    fn take(&mut self, i: usize, bytes: &[u8]) -> Result<usize, String> {
        let mut frames = 0;
        let mut rest = bytes;
        let mut partial = std::mem::take(&mut self.clients[i].partial);
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            if partial.is_empty() {
                self.frame(i, &rest[..end])?;
            } else {
                partial.extend_from_slice(&rest[..end]);
                self.frame(i, &partial)?;
                partial.clear();
            }
            frames += 1;
            rest = &rest[end + 1..];
        }
        partial.extend_from_slice(rest);
        self.clients[i].partial = partial;
        Ok(frames)
    }

    fn frame(&mut self, i: usize, line: &[u8]) -> Result<(), String> {
        let show = || String::from_utf8_lossy(line).into_owned();
        if line.starts_with(b"{\"type\":\"hello\"") || line.starts_with(b"{\"type\":\"presence\"") {
            return Ok(());
        }
        if line.starts_with(b"{\"type\":\"bye\"") {
            // The connection is ending: the run cannot go on as measured.
            return Err(format!(
                "the server ended client u{i}'s session: {}",
                show()
            ));
        }
        if !self.clients[i].logged_in {
            if line.starts_with(b"{\"type\":\"ok\"") && contains(line, b"\"cmd\":\"login\"") {
                self.clients[i].logged_in = true;
                return Ok(());
            }
            return Err(format!("client u{i}: login refused: {}", show()));
        }
        let role = self.clients[i].role;
        if line.starts_with(b"{\"type\":\"ok\"") {
            let Some(pending) = self.clients[i].unanswered.pop_front() else {
                self.tally.error("answer_to_nothing", show);
                return Ok(());
            };
            if field(line, b"\"cmd\":\"") != Some(b"message") {
                self.tally.error("unexpected_ok", show);
                return Ok(());
            }
            let stored = contains(line, b"\"stored\":true");
            match (role, stored) {
                (Role::Store, true) => {
                    let now = Instant::now();
                    if now >= self.measure_from && now < self.measure_until {
                        self.tally.stored_acked += 1;
                    }
                    if pending.marked {
                        self.tally
                            .stored_latency
                            .saturating_record(latency_ns(now, pending.due));
                    }
                }
                (Role::Online, false) => {}
                // The recipient was online: an offline user logged in?
                (Role::Store, false) => self.tally.error("delivered_not_stored", show),
                // The recipient was offline: an online user left?
                (Role::Online, true) => self.tally.error("stored_not_delivered", show),
            }
        } else if line.starts_with(b"{\"type\":\"error\"") {
            let code = field(line, b"\"code\":\"").map_or_else(|| "error".to_owned(), show_code);
            if self.clients[i].unanswered.pop_front().is_none() {
                self.tally.error("error_to_nothing", show);
            } else {
                self.tally.error(&code, show);
            }
        } else if line.starts_with(b"{\"type\":\"message\"") {
            if role == Role::Store {
                self.tally.error("message_to_store_sender", show);
                return Ok(());
            }
            self.delivered(line)?;
        } else {
            self.tally.error("unexpected_frame", show);
        }
        Ok(())
    }

    /// An online client read a message: its text holds the sender, whether
    /// it was due in the window, and when it was due.
    fn delivered(&mut self, line: &[u8]) -> Result<(), String> {
        let show = || String::from_utf8_lossy(line).into_owned();
        let text = field(line, b"\"text\":\"").ok_or_else(|| format!("no text in {}", show()))?;
        let mut parts = text.split(|&b| b == b' ');
        let (Some(sender), Some(marked), Some(ts)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("a message chatbench did not send: {}", show()));
        };
        let sender: usize = parse(sender)?;
        let ts: u64 = parse(ts)?;
        if sender >= self.config.online_clients {
            return Err(format!(
                "a message from outside the online load: {}",
                show()
            ));
        }
        self.tally.online_read_all += 1;
        if marked == b"1" {
            self.tally.online_delivered += 1;
            let due = self.start + Duration::from_nanos(ts);
            self.tally
                .online_latency
                .saturating_record(latency_ns(Instant::now(), due));
        }
        Ok(())
    }
}

/// From `due` to `now` in nanoseconds, at least 1 (the histogram's floor).
fn latency_ns(now: Instant, due: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(due).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// An error code as a name for the tally: only the characters codes use,
/// so that it can go into JSON as it is.
fn show_code(code: &[u8]) -> String {
    code.iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b == b'_' {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MixedConfig {
        MixedConfig {
            addr: "127.0.0.1:1".parse().unwrap(),
            online_clients: 100,
            online_rate: 5_000,
            store_senders: 250,
            store_rate: 20_000,
            recipients: 1_000,
            text_bytes: 64,
            warmup: Duration::from_secs(2),
            measure: Duration::from_secs(10),
            server_pid: None,
        }
    }

    #[test]
    fn users_are_disjoint_and_counted() {
        let c = config();
        assert_eq!(c.users(), 1_350);
        assert_eq!(c.first_recipient(), 350);
        // 20,000/s for 12 s, plus one per sender, over 1,000 recipients.
        assert_eq!(c.stored_per_recipient(), 241);
    }

    #[test]
    fn codes_are_safe_names() {
        assert_eq!(show_code(b"mailbox_full"), "mailbox_full");
        assert_eq!(show_code(b"a\"b\\c"), "a?b?c");
    }
}
