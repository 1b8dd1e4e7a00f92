//! `chatbench tls-flood`'s flood: new TCP connections to a TLS address, at
//! a fixed rate, each sending one recorded TLS ClientHello and closing.
//!
//! A ClientHello costs the client nothing once recorded, and the server a
//! full handshake's first flight: a key exchange and a signature with its
//! certificate's key (an RSA-2048 signature is about a millisecond). That
//! asymmetry is what the server's TLS handshake budgets are for.
//!
//! Each connection waits, up to a short time, for the server's first bytes
//! (its handshake answer) or its close (past a budget it closes at once),
//! so the report can say which it got, then closes with a reset
//! (`SO_LINGER` 0): no `TIME_WAIT` is left behind, so the source address's
//! ephemeral ports last however long the flood does.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polling::{Event, Events, PollMode, Poller};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Debug, Clone)]
pub struct FloodConfig {
    /// The server's TLS address.
    pub target: SocketAddr,
    /// The address connections come from (bound before connecting).
    pub source: IpAddr,
    /// New connections a second.
    pub rate: u64,
    pub duration: Duration,
    /// How long a connection waits for the server's answer or close.
    pub read_wait: Duration,
    /// Most connections open at once; a connection due past it is skipped.
    pub max_open: usize,
}

/// What the flood's connections got.
#[derive(Debug, Default)]
pub struct FloodReport {
    pub started: u64,
    /// The server sent bytes back: it started the handshake.
    pub answered: u64,
    /// The server closed without a byte: refused before any handshake.
    pub closed_at_once: u64,
    /// Neither within the read wait.
    pub unanswered: u64,
    /// Failed to connect, or reset before an answer.
    pub failed: u64,
    /// Due while --max-open connections were open.
    pub skipped: u64,
    pub seconds: f64,
    /// For each answered connection, from the ClientHello written to the
    /// server's first bytes read: about what the handshake's first flight
    /// costs the server, when it is otherwise idle.
    pub answer_times: Vec<Duration>,
}

impl FloodReport {
    pub fn summary(&self) -> String {
        let mut times = self.answer_times.clone();
        times.sort();
        let answer = match times.len() {
            0 => String::new(),
            n => format!(
                " (answer after {:.2} ms median, {:.2} ms max)",
                times[n / 2].as_secs_f64() * 1000.0,
                times[n - 1].as_secs_f64() * 1000.0
            ),
        };
        format!(
            "{} connections in {:.1} s ({:.0}/s): {} answered with a handshake{answer}, {} closed at once, {} unanswered, {} failed, {} skipped",
            self.started,
            self.seconds,
            self.started as f64 / self.seconds.max(1e-9),
            self.answered,
            self.closed_at_once,
            self.unanswered,
            self.failed,
            self.skipped
        )
    }
}

/// The first bytes a rustls client (ring, TLS 1.3 and 1.2, as `chatcli
/// --tls` uses) writes: its ClientHello, for server name `localhost`.
pub fn client_hello() -> Result<Vec<u8>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client set-up: {e}"))?
        // Never verified: the handshake is never finished.
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost")
        .map_err(|e| format!("TLS server name: {e}"))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| format!("TLS client: {e}"))?;
    let mut hello = Vec::new();
    // A ClientHello is one record; the bound is only a guard.
    for _ in 0..16 {
        if !conn.wants_write() {
            break;
        }
        conn.write_tls(&mut hello)
            .map_err(|e| format!("recording the ClientHello: {e}"))?;
    }
    if hello.first() != Some(&0x16) {
        return Err("the recorded bytes are not a TLS handshake record".to_owned());
    }
    Ok(hello)
}

/// A self-signed RSA-2048 certificate for `localhost` and 127.0.0.1, as
/// PEM (certificate, key). ring, rcgen's backend here, cannot generate RSA
/// keys, so `openssl` makes the key and rcgen the certificate.
pub fn rsa_certificate() -> Result<(String, String), String> {
    let output = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run openssl to make an RSA-2048 key ({e}): install it, or give --tls-cert and --tls-key"
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "openssl genpkey failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let key_pem = String::from_utf8(output.stdout).map_err(|_| "openssl wrote no PEM key")?;
    let key =
        rcgen::KeyPair::from_pem(&key_pem).map_err(|e| format!("the RSA key openssl made: {e}"))?;
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(|e| format!("certificate parameters: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("cannot sign the certificate: {e}"))?;
    Ok((cert.pem(), key_pem))
}

struct Pending {
    stream: TcpStream,
    /// When it gives up waiting for the server.
    deadline: Instant,
    /// When the ClientHello was written (the connection is established).
    sent: Option<Instant>,
}

/// Floods `config.target` until `config.duration` is over or `stop` is
/// set.
pub fn flood(config: &FloodConfig, hello: &[u8], stop: &AtomicBool) -> Result<FloodReport, String> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).map_err(|e| e.to_string())?;
    let max_open = config
        .max_open
        .min((limit as usize).saturating_sub(64).max(1));
    let interval = Duration::from_secs_f64(1.0 / config.rate.max(1) as f64);
    let total = config
        .rate
        .saturating_mul(config.duration.as_secs().max(1))
        .max(1);
    let mut report = FloodReport::default();
    // Declared before the poller so that the poller is dropped first: no
    // registered socket is closed while the poller still watches it.
    let mut slots: Vec<Option<Pending>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let poller = Poller::new().map_err(|e| e.to_string())?;
    let mut events = Events::new();
    let started = Instant::now();
    let end = started + config.duration;
    let mut next_due = started;
    let mut open = 0usize;
    let mut buf = [0u8; 16 * 1024];
    let mut last_error = None;
    loop {
        let now = Instant::now();
        let sending = now < end && report.started + report.skipped < total;
        if !sending && open == 0 {
            break;
        }
        if stop.load(Ordering::Relaxed) || now > end + config.read_wait * 2 + Duration::from_secs(1)
        {
            break;
        }
        // Connections due by now (bounded: at most a second's worth at
        // once if the thread was held up).
        let mut burst = 0;
        while sending && next_due <= now && burst < config.rate.max(1) {
            next_due += interval;
            burst += 1;
            if report.started + report.skipped >= total {
                break;
            }
            if open >= max_open {
                report.skipped += 1;
                continue;
            }
            report.started += 1;
            let stream = match connect(config.source, config.target) {
                Ok(stream) => stream,
                Err(e) => {
                    report.failed += 1;
                    last_error = Some(e.to_string());
                    continue;
                }
            };
            let key = free.pop().unwrap_or(slots.len());
            // SAFETY: `stream` goes into `slots`, which outlives `poller`
            // (see the declaration order above), and is deleted from the
            // poller before it is dropped.
            #[allow(unsafe_code)]
            let added =
                unsafe { poller.add_with_mode(&stream, Event::writable(key), PollMode::Level) };
            if let Err(e) = added {
                report.failed += 1;
                last_error = Some(e.to_string());
                free.push(key);
                continue;
            }
            let pending = Pending {
                stream,
                deadline: now + config.read_wait,
                sent: None,
            };
            if key == slots.len() {
                slots.push(Some(pending));
            } else {
                slots[key] = Some(pending);
            }
            open += 1;
        }
        let wait = if sending {
            next_due.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(10)
        }
        .min(Duration::from_millis(10));
        events.clear();
        poller
            .wait(&mut events, Some(wait))
            .map_err(|e| e.to_string())?;
        for event in events.iter() {
            let Some(pending) = slots.get_mut(event.key).and_then(Option::as_mut) else {
                continue;
            };
            let outcome = if let Some(sent) = pending.sent {
                match (&pending.stream).read(&mut buf) {
                    Ok(0) => Some(Outcome::ClosedAtOnce),
                    Ok(_) => Some(Outcome::Answered(sent.elapsed())),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                        Some(Outcome::ClosedAtOnce)
                    }
                    Err(e) => Some(Outcome::Failed(e.to_string())),
                }
            } else {
                match pending.stream.take_error() {
                    Ok(None) => match (&pending.stream).write(hello) {
                        Ok(n) if n == hello.len() => {
                            pending.sent = Some(Instant::now());
                            poller
                                .modify_with_mode(
                                    &pending.stream,
                                    Event::readable(event.key),
                                    PollMode::Level,
                                )
                                .map_err(|e| e.to_string())?;
                            None
                        }
                        Ok(_) => Some(Outcome::Failed("a short write".to_owned())),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                        Err(e) => Some(Outcome::Failed(e.to_string())),
                    },
                    Ok(Some(e)) | Err(e) => Some(Outcome::Failed(e.to_string())),
                }
            };
            if let Some(outcome) = outcome {
                match outcome {
                    Outcome::Answered(took) => {
                        report.answered += 1;
                        report.answer_times.push(took);
                    }
                    Outcome::ClosedAtOnce => report.closed_at_once += 1,
                    Outcome::Failed(e) => {
                        report.failed += 1;
                        last_error = Some(e);
                    }
                }
                close(&poller, &mut slots, &mut free, event.key);
                open -= 1;
            }
        }
        let now = Instant::now();
        for key in 0..slots.len() {
            if slots[key].as_ref().is_some_and(|p| p.deadline <= now) {
                report.unanswered += 1;
                close(&poller, &mut slots, &mut free, key);
                open -= 1;
            }
        }
    }
    for key in 0..slots.len() {
        if slots[key].is_some() {
            close(&poller, &mut slots, &mut free, key);
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    if report.started > 0 && report.failed == report.started {
        return Err(format!(
            "every flood connection failed{}",
            last_error.map_or(String::new(), |e| format!(" (last: {e})"))
        ));
    }
    Ok(report)
}

enum Outcome {
    /// After this long.
    Answered(Duration),
    ClosedAtOnce,
    Failed(String),
}

/// A non-blocking connection from `source` (any port) to `target`, under
/// way; it closes with a reset.
fn connect(source: IpAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_linger(Some(Duration::ZERO))?;
    socket.bind(&SockAddr::from(SocketAddr::new(source, 0)))?;
    match socket.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        // Under way: done when the socket turns writable.
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from(socket))
}

fn close(poller: &Poller, slots: &mut [Option<Pending>], free: &mut Vec<usize>, key: usize) {
    if let Some(pending) = slots[key].take() {
        let _ = poller.delete(&pending.stream);
        free.push(key);
    }
}
