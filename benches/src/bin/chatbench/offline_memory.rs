//! `chatbench offline-memory`'s load: a few senders queue offline messages
//! as fast as the server acknowledges them stored, until a number of bytes
//! is stored or the server answers `mailbox_full`.
//!
//! Every sender keeps a window of messages in flight. The server answers a
//! connection's requests in order, so each sender keeps the text sizes of
//! its unanswered messages, oldest first, and the answer it reads is for
//! the oldest. Recipients are taken in turn, so every queue grows alike
//! and none reaches its per-user cap before the others.

use crate::outbox::Outbox;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use polling::{Event, Events, PollMode, Poller};

use crate::process::ProcessSample;
use crate::{contains, mib};

/// How long the senders' logins may take.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the answers to the messages in flight may take once sending
/// stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How often progress goes to stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub addr: SocketAddr,
    /// Senders `u0`..: they log in with `p<i>`.
    pub senders: usize,
    /// Recipients `u<senders>`..: they never log in.
    pub recipients: usize,
    pub window: usize,
    pub text_bytes: usize,
    /// Stop sending once this many bytes of text are stored or in flight.
    pub bytes: u64,
    /// Stop sending after this long, whatever is stored by then.
    pub max_time: Duration,
}

/// What the senders got stored.
#[derive(Debug)]
pub struct Queued {
    /// Bytes of text acknowledged stored (`"stored":true`).
    pub bytes: u64,
    pub messages: u64,
    /// Messages refused `mailbox_full` (sending stops at the first).
    pub mailbox_full: u64,
    /// From the first message sent to the last answer read.
    pub elapsed: Duration,
    /// Sending stopped at --max-secs, before --bytes were stored.
    pub timed_out: bool,
    /// The server's resident memory when the last answer was read, and the
    /// most seen while queuing (sampled every second).
    pub rss_at_end: Option<u64>,
    pub peak_rss: Option<u64>,
}

struct Sender {
    stream: TcpStream,
    outbox: Outbox,
    partial: Vec<u8>,
    logged_in: bool,
    /// Text sizes of the messages awaiting an answer, oldest first.
    in_flight: VecDeque<usize>,
}

/// Progress of the whole run, shared by every sender's answers.
#[derive(Default)]
struct Tally {
    stored_bytes: u64,
    stored_messages: u64,
    mailbox_full: u64,
    /// Sending has stopped (target reached, mailbox full, or time up).
    stop: bool,
}

/// Logs the senders in and queues messages until `config.bytes` are
/// stored, the server answers `mailbox_full`, or `config.max_time` is up.
pub fn queue(config: &QueueConfig, pid: Option<u32>) -> Result<Queued, String> {
    // Declared before the poller so that the poller is dropped first: no
    // registered socket is closed while the poller still watches it.
    let mut senders: Vec<Sender> = Vec::with_capacity(config.senders);
    let poller = Poller::new().map_err(|e| e.to_string())?;
    for i in 0..config.senders {
        let stream = TcpStream::connect(config.addr).map_err(|e| format!("sender {i}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        // SAFETY: `stream` is kept in `senders`, which outlives `poller`
        // (see the declaration order above).
        #[allow(unsafe_code)]
        unsafe {
            poller
                .add_with_mode(&stream, Event::readable(i), PollMode::Level)
                .map_err(|e| e.to_string())?;
        }
        senders.push(Sender {
            stream,
            outbox: Outbox::new(format!("login u{i} p{i}\n").into_bytes()),
            partial: Vec::new(),
            logged_in: false,
            in_flight: VecDeque::new(),
        });
    }
    let mut events = Events::new();
    let mut tally = Tally::default();
    let deadline = Instant::now() + LOGIN_TIMEOUT;
    while senders.iter().any(|s| !s.logged_in) {
        if Instant::now() > deadline {
            return Err(format!(
                "the senders' logins did not finish in {} s",
                LOGIN_TIMEOUT.as_secs()
            ));
        }
        for (i, sender) in senders.iter_mut().enumerate() {
            sender.flush(&poller, i)?;
        }
        turn(&poller, &mut events, &mut senders, &mut tally)?;
    }

    let text = "x".repeat(config.text_bytes);
    let started = Instant::now();
    let stop_sending_at = started + config.max_time;
    let mut timed_out = false;
    // Bytes stored or in flight: sending stops when it reaches the target.
    let mut committed: u64 = 0;
    let mut next_recipient = 0;
    let mut peak_rss = None;
    let mut next_sample = started;
    let mut next_progress = started + PROGRESS_EVERY;
    let mut drain_deadline = None;
    loop {
        let now = Instant::now();
        if !tally.stop && (committed >= config.bytes || now >= stop_sending_at) {
            timed_out = committed < config.bytes;
            tally.stop = true;
        }
        if tally.stop && senders.iter().all(|s| s.in_flight.is_empty()) {
            break;
        }
        if tally.stop {
            let deadline = *drain_deadline.get_or_insert(now + DRAIN_TIMEOUT);
            if now > deadline {
                let left: usize = senders.iter().map(|s| s.in_flight.len()).sum();
                return Err(format!(
                    "{left} messages still unanswered {} s after sending stopped",
                    DRAIN_TIMEOUT.as_secs()
                ));
            }
        }
        if now >= next_sample {
            next_sample += Duration::from_secs(1);
            if let Some(pid) = pid {
                let rss = ProcessSample::read(pid)?.rss_bytes;
                peak_rss = Some(peak_rss.map_or(rss, |p: u64| p.max(rss)));
            }
        }
        if now >= next_progress {
            next_progress += PROGRESS_EVERY;
            let secs = now.duration_since(started).as_secs_f64();
            eprintln!(
                "  {:.0} s: {:.1} MiB stored ({:.1} MiB/s){}",
                secs,
                mib(tally.stored_bytes),
                mib(tally.stored_bytes) / secs,
                peak_rss.map_or(String::new(), |p| format!(
                    ", server at most {:.1} MiB resident so far",
                    mib(p)
                ))
            );
        }
        if !tally.stop {
            for (i, sender) in senders.iter_mut().enumerate() {
                while sender.in_flight.len() < config.window && committed < config.bytes {
                    let to = config.senders + next_recipient;
                    next_recipient = (next_recipient + 1) % config.recipients;
                    // Writing into a Vec cannot fail.
                    let _ = writeln!(sender.outbox.out, "message u{to} {text}");
                    sender.in_flight.push_back(text.len());
                    committed += text.len() as u64;
                }
                sender.flush(&poller, i)?;
            }
        }
        turn(&poller, &mut events, &mut senders, &mut tally)?;
    }
    let elapsed = started.elapsed();
    let rss_at_end = pid
        .map(ProcessSample::read)
        .transpose()?
        .map(|s| s.rss_bytes);
    for sender in &senders {
        let _ = poller.delete(&sender.stream);
    }
    Ok(Queued {
        bytes: tally.stored_bytes,
        messages: tally.stored_messages,
        mailbox_full: tally.mailbox_full,
        elapsed,
        timed_out,
        rss_at_end,
        peak_rss: match (peak_rss, rss_at_end) {
            (Some(p), Some(e)) => Some(p.max(e)),
            (p, e) => p.or(e),
        },
    })
}

/// Waits up to 100 ms and reads every ready sender.
fn turn(
    poller: &Poller,
    events: &mut Events,
    senders: &mut [Sender],
    tally: &mut Tally,
) -> Result<(), String> {
    events.clear();
    poller
        .wait(events, Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64 * 1024];
    for (i, readable, writable) in events.iter().map(|e| (e.key, e.readable, e.writable)) {
        let sender = &mut senders[i];
        if readable {
            // Level-triggered: what is left is read on the next turn, so
            // one read a turn bounds the work here.
            match (&sender.stream).read(&mut buf) {
                Ok(0) => return Err(format!("the server closed sender {i}")),
                Ok(n) => sender.take(i, &buf[..n], tally)?,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(format!("sender {i}: {e}")),
            }
        }
        if writable {
            sender.flush(poller, i)?;
        }
    }
    Ok(())
}

impl Sender {
    /// Writes what is queued, as far as the socket takes it.
    fn flush(&mut self, poller: &Poller, i: usize) -> Result<(), String> {
        self.outbox
            .flush(&self.stream, poller, i)
            .map_err(|e| format!("sender {i}: {e}"))
    }

    /// Splits input into lines and accounts for each.
    fn take(&mut self, i: usize, mut bytes: &[u8], tally: &mut Tally) -> Result<(), String> {
        let mut partial = std::mem::take(&mut self.partial);
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            if partial.is_empty() {
                self.line(i, &bytes[..end], tally)?;
            } else {
                partial.extend_from_slice(&bytes[..end]);
                self.line(i, &partial, tally)?;
                partial.clear();
            }
            bytes = &bytes[end + 1..];
        }
        partial.extend_from_slice(bytes);
        self.partial = partial;
        Ok(())
    }

    fn line(&mut self, i: usize, line: &[u8], tally: &mut Tally) -> Result<(), String> {
        let show = || String::from_utf8_lossy(line).into_owned();
        if line.starts_with(b"{\"type\":\"hello\"") || line.starts_with(b"{\"type\":\"presence\"") {
            return Ok(());
        }
        if !self.logged_in {
            if line.starts_with(b"{\"type\":\"ok\"") && contains(line, b"\"cmd\":\"login\"") {
                self.logged_in = true;
                return Ok(());
            }
            return Err(format!("sender {i}: login refused: {}", show()));
        }
        let answered = |this: &mut Sender| {
            this.in_flight
                .pop_front()
                .ok_or_else(|| format!("sender {i}: an answer to no message: {}", show()))
        };
        if line.starts_with(b"{\"type\":\"ok\"") && contains(line, b"\"cmd\":\"message\"") {
            if !contains(line, b"\"stored\":true") {
                return Err(format!(
                    "sender {i}: a message delivered, not stored (is a recipient online?): {}",
                    show()
                ));
            }
            let len = answered(self)?;
            tally.stored_bytes += len as u64;
            tally.stored_messages += 1;
        } else if line.starts_with(b"{\"type\":\"error\"")
            && contains(line, b"\"code\":\"mailbox_full\"")
        {
            answered(self)?;
            tally.mailbox_full += 1;
            tally.stop = true;
        } else {
            return Err(format!("sender {i}: unexpected {}", show()));
        }
        Ok(())
    }
}
