//! The load generator: N clients on one `polling` reactor, driving a
//! server with direct messages, broadcasts, or messages to users who are
//! offline, measuring delivery latency.
//!
//! Every message carries, in its text, the sender's index, whether it was
//! sent inside the measurement window, and its send time (nanoseconds since
//! the run started; for open-loop runs, the time it was *scheduled*, so a
//! stalled server cannot hide its stall: no coordinated omission).
//!
//! Messages to offline users are never delivered: they are done when the
//! server acknowledges them stored. The server answers each connection's
//! requests in order, so each client keeps a first-in, first-out queue of
//! its unacknowledged messages' send times (scheduled times, open loop).

use crate::outbox::Outbox;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use polling::{Event, Events, PollMode, Poller};

use crate::contains;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Every client keeps `window` messages in flight to random others.
    Direct,
    /// `senders` clients broadcast to everyone, `window` in flight each.
    Fanout { senders: usize },
    /// Every client keeps `window` messages in flight to random users among
    /// `recipients` who never log in (`u<clients>`, `u<clients + 1>`, ...):
    /// the server stores each one, and a message is done when its sender
    /// reads the `ok` that says so (`"stored":true`).
    Offline { recipients: usize },
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Where clients connect: client i to the (i mod n)th (the nodes of a
    /// cluster; one for a server alone).
    pub addrs: Vec<SocketAddr>,
    /// Direct load: each message to a user on another address than its
    /// sender's.
    pub cross_node: bool,
    /// Command names whose processes' CPU time counts too (a cluster's
    /// nodes, its NATS and PostgreSQL servers).
    pub cpu_of: Vec<String>,
    pub clients: usize,
    pub workload: Workload,
    pub window: usize,
    pub text_bytes: usize,
    pub warmup: Duration,
    pub measure: Duration,
    /// Open loop: messages per second, all senders together.
    pub rate: Option<u64>,
    pub server_pid: Option<u32>,
    /// Extra connections that keep logging in to hashed accounts `s<i>`
    /// with a wrong password, each retrying as soon as it is refused: a
    /// storm of password checks beside the workload.
    pub login_storm: usize,
    /// Clients speak WebSocket (`GET /ws` at `addrs`).
    pub websocket: bool,
}

/// What a run measured.
#[derive(Debug)]
pub struct Report {
    pub deliveries: u64,
    pub seconds: f64,
    pub sent: u64,
    pub lost: u64,
    pub latency: Histogram<u64>,
    pub server_cpu_secs: Option<f64>,
    /// Storm logins refused (each a password check) while measuring.
    pub storm_checks: u64,
}

impl Report {
    pub fn deliveries_per_sec(&self) -> f64 {
        self.deliveries as f64 / self.seconds
    }

    pub fn print(&self, config: &LoadConfig) {
        let (name, delivery) = match config.workload {
            Workload::Direct => ("direct".to_owned(), "delivery"),
            Workload::Fanout { senders } => (format!("fanout ({senders} senders)"), "delivery"),
            Workload::Offline { recipients } => (
                format!("offline ({recipients} recipients)"),
                "stored message",
            ),
        };
        let us = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        let rate = match config.workload {
            Workload::Offline { .. } => "stored messages/s (acknowledged)",
            _ => "deliveries/s",
        };
        println!(
            "{name}: {} clients, window {}, {} s: {:.0} {rate}, {} sent, {} lost",
            config.clients,
            config.window,
            self.seconds,
            self.deliveries_per_sec(),
            self.sent,
            self.lost
        );
        println!(
            "latency: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
            us(0.5),
            us(0.99),
            us(0.999),
            self.latency.max() as f64 / 1000.0
        );
        let cpu_per_delivery = self
            .server_cpu_secs
            .map(|cpu| cpu / self.deliveries.max(1) as f64 * 1e6);
        if let (Some(cpu), Some(per)) = (self.server_cpu_secs, cpu_per_delivery) {
            println!(
                "server CPU: {:.0}% of one core, {per:.2} µs per {delivery}",
                cpu / self.seconds * 100.0
            );
        }
        if config.login_storm > 0 {
            println!(
                "login storm: {} connections, {:.0} password checks/s",
                config.login_storm,
                self.storm_checks as f64 / self.seconds
            );
        }
        let mut recipients = match config.workload {
            Workload::Offline { recipients } => format!("\"recipients\":{recipients},"),
            _ => String::new(),
        };
        if config.login_storm > 0 {
            recipients += &format!(
                "\"login_storm\":{},\"storm_checks_per_sec\":{:.0},",
                config.login_storm,
                self.storm_checks as f64 / self.seconds
            );
        }
        println!(
            "{{\"workload\":\"{}\",\"clients\":{},{recipients}\"window\":{},\"rate\":{},\"seconds\":{:.1},\"deliveries_per_sec\":{:.0},\"sent\":{},\"lost\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\"server_cpu_us_per_delivery\":{}}}",
            match config.workload {
                Workload::Direct => "direct",
                Workload::Fanout { .. } => "fanout",
                Workload::Offline { .. } => "offline",
            },
            config.clients,
            config.window,
            config.rate.map_or("null".to_owned(), |r| r.to_string()),
            self.seconds,
            self.deliveries_per_sec(),
            self.sent,
            self.lost,
            us(0.5),
            us(0.99),
            us(0.999),
            self.latency.max() as f64 / 1000.0,
            cpu_per_delivery.map_or("null".to_owned(), |v| format!("{v:.3}")),
        );
    }
}

/// One simulated user.
struct Client {
    stream: TcpStream,
    /// Bytes waiting to be written; written many frames per syscall.
    outbox: Outbox,
    partial: Vec<u8>,
    logged_in: bool,
    in_flight: usize,
    /// Offline workload: each message awaiting its `ok`, oldest first: when
    /// it was sent (scheduled, open loop) and whether it was sent while
    /// measuring.
    unacked: VecDeque<(Instant, bool)>,
    rng: u64,
    /// Open loop: when the next message is due.
    next_due: Option<Instant>,
    /// Listed in `Run::dirty`.
    dirty: bool,
    /// One of the login storm's connections.
    storm: bool,
}

struct Run {
    config: LoadConfig,
    poller: Poller,
    clients: Vec<Client>,
    start: Instant,
    measure_from: Instant,
    measure_until: Instant,
    latency: Histogram<u64>,
    deliveries: u64,
    sent: u64,
    received_marked: u64,
    recipients_per_message: u64,
    padding: String,
    /// Clients with output queued during this turn: flushed once each at
    /// its end, so a write carries every frame the turn produced for it.
    dirty: Vec<usize>,
    /// The poller's event buffer, kept from turn to turn.
    events: Events,
    /// Refused storm logins while measuring.
    storm_checks: u64,
}

pub fn run(config: LoadConfig) -> Result<Report, String> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).map_err(|e| e.to_string())?;
    if (limit as usize) < config.clients + config.login_storm + 16 {
        return Err(format!(
            "the open-file limit ({limit}) is too low for {} clients",
            config.clients + config.login_storm
        ));
    }
    let senders = match config.workload {
        Workload::Direct | Workload::Offline { .. } => config.clients,
        Workload::Fanout { senders } => senders.min(config.clients),
    };
    let mut clients = Vec::with_capacity(config.clients);
    let poller = Poller::new().map_err(|e| e.to_string())?;
    for i in 0..config.clients + config.login_storm {
        let storm = i >= config.clients;
        let addr = config.addrs[i % config.addrs.len()];
        let mut stream =
            TcpStream::connect(addr).map_err(|e| format!("client {i} ({addr}): {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        if config.websocket {
            crate::ws::handshake(&mut stream, addr).map_err(|e| format!("client {i}: {e}"))?;
        }
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        // Level-triggered: no re-arming syscall after every event.
        // SAFETY: every stream lives in `clients`, inside the `Run` that
        // also owns the poller; `Run` deletes them all before dropping.
        #[allow(unsafe_code)]
        unsafe {
            poller
                .add_with_mode(&stream, Event::readable(i), PollMode::Level)
                .map_err(|e| e.to_string())?;
        }
        let login = if storm {
            storm_login(i - config.clients)
        } else {
            format!("login u{i} p{i}\n").into_bytes()
        };
        clients.push(Client {
            stream,
            outbox: if config.websocket {
                Outbox::websocket(login, (i as u32 ^ 0x5a5a_5a5a).to_le_bytes())
            } else {
                Outbox::new(login)
            },
            partial: Vec::new(),
            // Storm connections never log in.
            logged_in: storm,
            in_flight: 0,
            unacked: VecDeque::new(),
            rng: 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd),
            next_due: None,
            dirty: false,
            storm,
        });
    }
    let now = Instant::now();
    let mut run = Run {
        recipients_per_message: match config.workload {
            Workload::Direct | Workload::Offline { .. } => 1,
            Workload::Fanout { .. } => config.clients as u64 - 1,
        },
        padding: "x".repeat(config.text_bytes),
        poller,
        clients,
        start: now,
        measure_from: now,
        measure_until: now,
        latency: Histogram::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?,
        deliveries: 0,
        sent: 0,
        received_marked: 0,
        dirty: Vec::new(),
        storm_checks: 0,
        events: Events::new(),
        config,
    };
    let result = run.drive(senders);
    for client in &run.clients {
        let _ = run.poller.delete(&client.stream);
    }
    result
}

impl Run {
    fn drive(&mut self, senders: usize) -> Result<Report, String> {
        // Log everyone in.
        for i in 0..self.clients.len() {
            self.flush(i)?;
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.clients.iter().any(|c| !c.logged_in) {
            if Instant::now() > deadline {
                return Err("logins did not finish in 120 s".to_owned());
            }
            self.turn(Some(Duration::from_millis(100)))?;
        }
        // Let presence notices drain before the clock starts.
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(500) {
            if self.turn(Some(Duration::from_millis(100)))? > 0 {
                quiet_since = Instant::now();
            }
        }

        self.start = Instant::now();
        self.measure_from = self.start + self.config.warmup;
        self.measure_until = self.measure_from + self.config.measure;
        let per_sender_interval = self
            .config
            .rate
            .map(|rate| Duration::from_secs_f64(senders as f64 / rate.max(1) as f64));
        for s in 0..senders {
            match per_sender_interval {
                Some(interval) => {
                    // Spread the senders' schedules over one interval.
                    let offset = interval.mul_f64(s as f64 / senders as f64);
                    self.clients[s].next_due = Some(self.start + offset);
                }
                None => {
                    for _ in 0..self.config.window {
                        self.send(s, Instant::now());
                    }
                }
            }
        }
        self.flush_dirty()?;
        let mut cpu_start = None;
        let mut measuring = false;
        while Instant::now() < self.measure_until {
            let now = Instant::now();
            if !measuring && now >= self.measure_from {
                measuring = true;
                self.latency.reset();
                self.deliveries = 0;
                cpu_start = self.cpu_secs()?;
            }
            if let Some(interval) = per_sender_interval {
                for s in 0..senders {
                    while let Some(due) = self.clients[s].next_due.filter(|due| *due <= now) {
                        self.send(s, due);
                        self.clients[s].next_due = Some(due + interval);
                    }
                }
                self.flush_dirty()?;
            }
            let next_due = self.clients[..senders]
                .iter()
                .filter_map(|c| c.next_due)
                .min();
            let timeout = next_due
                .map(|due| due.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(50))
                .min(self.measure_until.saturating_duration_since(Instant::now()));
            self.turn(Some(timeout))?;
        }
        let seconds = self
            .measure_until
            .duration_since(self.measure_from)
            .as_secs_f64();
        let deliveries = self.deliveries;
        let latency = self.latency.clone();
        let cpu_end = self.cpu_secs()?;
        // Stop sending; wait for what is in flight, to count losses.
        for c in &mut self.clients {
            c.next_due = None;
        }
        let expected = self.sent * self.recipients_per_message;
        let drain_until = Instant::now() + Duration::from_secs(5);
        while self.received_marked < expected && Instant::now() < drain_until {
            self.turn(Some(Duration::from_millis(100)))?;
        }
        Ok(Report {
            deliveries,
            seconds,
            sent: self.sent,
            lost: expected.saturating_sub(self.received_marked),
            latency,
            server_cpu_secs: match (cpu_start, cpu_end) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            },
            storm_checks: self.storm_checks,
        })
    }

    /// The CPU time of the server and of every process named in `cpu_of`.
    fn cpu_secs(&self) -> Result<Option<f64>, String> {
        crate::process::cpu_secs(self.config.server_pid, &self.config.cpu_of)
    }

    /// Queues one message from sender `s`, stamped `at`.
    fn send(&mut self, s: usize, at: Instant) {
        let marked = at >= self.measure_from && at < self.measure_until;
        if marked {
            self.sent += 1;
        }
        let n = self.config.clients;
        let ts = at.saturating_duration_since(self.start).as_nanos();
        let recipients = self.recipients_per_message as usize;
        let client = &mut self.clients[s];
        client.in_flight += recipients;
        let nodes = self.config.addrs.len();
        let cross_node = self.config.cross_node;
        let to = match self.config.workload {
            Workload::Direct if cross_node => {
                // Users on another node than the sender's: every user whose
                // index differs from the sender's modulo the node count.
                let others_per_node = n / nodes;
                let pick = next_random(&mut client.rng) as usize;
                let node = (s % nodes + 1 + pick % (nodes - 1)) % nodes;
                let slot = (pick / nodes) % others_per_node.max(1);
                Some((slot * nodes + node).min(n - 1))
            }
            Workload::Direct => {
                Some((s + 1 + (next_random(&mut client.rng) as usize % (n - 1))) % n)
            }
            Workload::Fanout { .. } => None,
            Workload::Offline { recipients } => {
                // Users u<n>.. never log in: the server stores the message.
                client.unacked.push_back((at, marked));
                Some(n + next_random(&mut client.rng) as usize % recipients)
            }
        };
        let out = &mut client.outbox.out;
        // Writing into a Vec cannot fail.
        let _ = match to {
            Some(to) => write!(out, "message u{to} "),
            None => write!(out, "broadcast "),
        };
        let text_start = out.len();
        let _ = write!(out, "{s} {} {ts} ", u8::from(marked));
        let pad = self
            .config
            .text_bytes
            .saturating_sub(out.len() - text_start)
            .max(1);
        out.extend_from_slice(&self.padding.as_bytes()[..pad.min(self.padding.len())]);
        out.push(b'\n');
        self.mark_dirty(s);
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

    /// Waits once and serves every ready client; returns frames read.
    fn turn(&mut self, timeout: Option<Duration>) -> Result<usize, String> {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        self.poller
            .wait(&mut events, timeout)
            .map_err(|e| e.to_string())?;
        let mut frames = 0;
        let mut buf = [0u8; 64 * 1024];
        for (i, readable, writable) in events.iter().map(|e| (e.key, e.readable, e.writable)) {
            if readable {
                loop {
                    match (&self.clients[i].stream).read(&mut buf) {
                        Ok(0) => return Err(format!("the server closed client {i}")),
                        Ok(n) => {
                            let taken = self.take(i, &buf[..n])?;
                            // The storm never goes quiet: it does not count
                            // as traffic when waiting for quiet.
                            if !self.clients[i].storm {
                                frames += taken;
                            }
                            if n < buf.len() {
                                break; // drained: level-triggered, no read to EAGAIN
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("client {i}: {e}")),
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

    /// Splits input into frames (lines, or WebSocket messages) and
    /// accounts for each.
    fn take(&mut self, i: usize, bytes: &[u8]) -> Result<usize, String> {
        if self.config.websocket {
            return self.take_messages(i, bytes);
        }
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

    /// `take` for a WebSocket client: `partial` holds a message still
    /// arriving.
    fn take_messages(&mut self, i: usize, bytes: &[u8]) -> Result<usize, String> {
        let mut input = std::mem::take(&mut self.clients[i].partial);
        input.extend_from_slice(bytes);
        let mut frames = 0;
        let taken = crate::ws::take_messages(&input, |message| {
            frames += 1;
            self.frame(i, message)
        })?;
        input.drain(..taken);
        self.clients[i].partial = input;
        Ok(frames)
    }

    fn frame(&mut self, i: usize, line: &[u8]) -> Result<(), String> {
        if self.clients[i].storm {
            if contains(line, b"\"code\":\"invalid_credentials\"") {
                let now = Instant::now();
                if now >= self.measure_from && now < self.measure_until {
                    self.storm_checks += 1;
                }
                let line = storm_login(i - self.config.clients);
                self.clients[i].outbox.out.extend_from_slice(&line);
                self.mark_dirty(i);
            } else if !line.starts_with(b"{\"type\":\"hello\"") {
                return Err(format!(
                    "storm client {i}: {}",
                    String::from_utf8_lossy(line)
                ));
            }
            return Ok(());
        }
        if line.starts_with(b"{\"type\":\"message\"")
            || line.starts_with(b"{\"type\":\"broadcast\"")
        {
            let text = field(line, b"\"text\":\"").ok_or("a message without text")?;
            let mut parts = text.split(|&b| b == b' ');
            let (Some(sender), Some(marked), Some(ts)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!(
                    "unexpected text {:?}",
                    String::from_utf8_lossy(text)
                ));
            };
            if let Workload::Offline { .. } = self.config.workload {
                return Err(format!(
                    "client {i}: a message, though nobody sends to online users: {}",
                    String::from_utf8_lossy(line)
                ));
            }
            let sender: usize = parse(sender)?;
            let ts: u64 = parse(ts)?;
            if sender >= self.config.clients {
                return Err("a message from an unknown sender".to_owned());
            }
            self.done(
                sender,
                self.start + Duration::from_nanos(ts),
                marked == b"1",
            );
        } else if line.starts_with(b"{\"type\":\"ok\"") {
            if !self.clients[i].logged_in {
                if field(line, b"\"cmd\":\"").is_some_and(|cmd| cmd == b"login") {
                    self.clients[i].logged_in = true;
                }
            } else if let Workload::Offline { .. } = self.config.workload {
                self.stored(i, line)?;
            }
        } else if line.starts_with(b"{\"type\":\"error\"") || line.starts_with(b"{\"type\":\"bye\"")
        {
            let hint = if contains(line, b"\"code\":\"mailbox_full\"") {
                " (the recipients' offline queues are full: use more --recipients, or a server with a larger --offline-queue-cap)"
            } else {
                ""
            };
            return Err(format!(
                "client {i}: {}{hint}",
                String::from_utf8_lossy(line)
            ));
        }
        Ok(())
    }

    /// Offline workload: client `i` read an `ok` after logging in, which
    /// must acknowledge its oldest unacknowledged message as stored.
    fn stored(&mut self, i: usize, line: &[u8]) -> Result<(), String> {
        if field(line, b"\"cmd\":\"") != Some(b"message") || !contains(line, b"\"stored\":true") {
            return Err(format!(
                "client {i}: expected the ok of a stored message, got {}",
                String::from_utf8_lossy(line)
            ));
        }
        let (sent_at, marked) = self.clients[i].unacked.pop_front().ok_or_else(|| {
            format!(
                "client {i}: an ok for a message it did not send: {}",
                String::from_utf8_lossy(line)
            )
        })?;
        self.done(i, sent_at, marked);
        Ok(())
    }

    /// A message from `sender`, sent (or scheduled) at `sent_at`, reached
    /// one recipient or, offline, was acknowledged stored.
    fn done(&mut self, sender: usize, sent_at: Instant, marked: bool) {
        let now = Instant::now();
        if now >= self.measure_from && now < self.measure_until {
            self.deliveries += 1;
            let _ = self
                .latency
                .record(now.saturating_duration_since(sent_at).as_nanos().max(1) as u64);
        }
        if marked {
            self.received_marked += 1;
        }
        // Closed loop: a message is done when it is read; for a broadcast,
        // when its last recipient reads it.
        if self.config.rate.is_none() {
            let recipients = self.recipients_per_message as usize;
            let sender_client = &mut self.clients[sender];
            sender_client.in_flight = sender_client.in_flight.saturating_sub(1);
            let done = sender_client.in_flight % recipients == 0;
            if done && Instant::now() < self.measure_until {
                self.send(sender, Instant::now());
            }
        }
    }

    /// Writes what client `i` has queued, in one syscall when the socket
    /// takes it all.
    fn flush(&mut self, i: usize) -> Result<(), String> {
        let client = &mut self.clients[i];
        client
            .outbox
            .flush(&client.stream, &self.poller, i)
            .map_err(|e| format!("client {i}: {e}"))
    }
}

/// The value of a JSON string field, found by its key (the texts here have
/// nothing to escape).
pub(crate) fn field<'a>(line: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let start = line.windows(key.len()).position(|w| w == key)? + key.len();
    let len = line[start..].iter().position(|&b| b == b'"')?;
    Some(&line[start..start + len])
}

pub(crate) fn parse<T: std::str::FromStr>(bytes: &[u8]) -> Result<T, String> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad number {:?}", String::from_utf8_lossy(bytes)))
}

/// A wrong-password login for storm account `s<j>`.
fn storm_login(j: usize) -> Vec<u8> {
    format!("login s{j} wrong\n").into_bytes()
}

pub(crate) fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
