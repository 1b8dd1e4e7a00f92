//! `chatbench logins`: a login storm against a server, or the nodes of a
//! cluster, with users online watching it.
//!
//! First `online` idle users (`u0`, `u1`, ...; user i on the (i mod n)th
//! address) log in and stay connected, reading and discarding everything
//! the server sends: each login and logout that follows makes a presence
//! frame for every one of them. Then `workers` connections (users
//! `u<online>`, ...; worker j on the (j mod n)th address) each loop: open
//! a connection, send `login`, wait for its `ok` (one login, timed from
//! sending the line to reading the `ok`), send `logout`, read until the
//! server closes, and again. Everything runs on one `polling` reactor, so
//! ten thousand idle users take ten thousand sockets and no threads.
//!
//! Every wait is bounded (`TIMEOUT`); a refused login, an unexpected close
//! or a wait past its bound ends the run with an error.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use polling::{Event, Events, PollMode, Poller};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::contains;
use crate::load::field;

/// The most any one wait may take: a connect, a login's `ok`, a logout's
/// close, or the idle users' logins making no progress.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The most the presence storm of the idle users' own logins may take to
/// drain before the storm of worker logins starts.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct LoginsConfig {
    /// Where connections go: idle user i and worker j to the (i mod n)th
    /// and (j mod n)th.
    pub addrs: Vec<SocketAddr>,
    /// Idle users logged in throughout (`u0` .. `u<online - 1>`).
    pub online: usize,
    /// Connections logging in and out in a loop (`u<online>` ..).
    pub workers: usize,
    pub warmup: Duration,
    pub measure: Duration,
    pub server_pid: Option<u32>,
    /// Command names whose processes' CPU time counts too.
    pub cpu_of: Vec<String>,
}

/// What a run measured.
#[derive(Debug)]
pub struct LoginsReport {
    /// Logins whose `ok` came while measuring.
    pub logins: u64,
    pub seconds: f64,
    /// From sending `login` to reading its `ok`, in nanoseconds.
    pub latency: Histogram<u64>,
    /// CPU time of the server (and the `cpu_of` processes) while measuring.
    pub cpu_secs: Option<f64>,
}

impl LoginsReport {
    pub fn logins_per_sec(&self) -> f64 {
        self.logins as f64 / self.seconds
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1e6
    }

    pub fn cpu_us_per_login(&self) -> Option<f64> {
        self.cpu_secs
            .map(|cpu| cpu / self.logins.max(1) as f64 * 1e6)
    }

    /// The readable line.
    pub fn summary(&self, config: &LoginsConfig) -> String {
        let cpu = match (self.cpu_secs, self.cpu_us_per_login()) {
            (Some(cpu), Some(per)) => format!(
                "; CPU {:.0}% of one core, {per:.1} µs per login",
                cpu / self.seconds * 100.0
            ),
            _ => String::new(),
        };
        format!(
            "logins: {} online, {} workers on {} address{}, {:.0} s: {:.0} logins/s; login latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms{cpu}",
            config.online,
            config.workers,
            config.addrs.len(),
            if config.addrs.len() == 1 { "" } else { "es" },
            self.seconds,
            self.logins_per_sec(),
            self.ms(0.5),
            self.ms(0.99),
            self.latency.max() as f64 / 1e6,
        )
    }

    /// The flat JSON line.
    pub fn json(&self, config: &LoginsConfig) -> String {
        format!(
            "{{\"workload\":\"logins\",\"online\":{},\"workers\":{},\"nodes\":{},\"seconds\":{:.1},\"logins\":{},\"logins_per_sec\":{:.0},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3},\"cpu_us_per_login\":{}}}",
            config.online,
            config.workers,
            config.addrs.len(),
            self.seconds,
            self.logins,
            self.logins_per_sec(),
            self.ms(0.5),
            self.ms(0.99),
            self.latency.max() as f64 / 1e6,
            self.cpu_us_per_login()
                .map_or("null".to_owned(), |v| format!("{v:.1}")),
        )
    }
}

/// An idle user's connection.
struct Idle {
    stream: TcpStream,
    partial: Vec<u8>,
    logged_in: bool,
}

/// Where a worker is in its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connecting; the login goes once the socket is writable.
    Connecting,
    /// `login` sent at this time; waiting for its `ok`.
    LoggingIn(Instant),
    /// `logout` sent; reading until the server closes.
    LoggingOut,
    /// The run is over.
    Stopped,
}

struct Worker {
    /// Its connection, registered with the poller (none once stopped).
    stream: Option<TcpStream>,
    phase: Phase,
    /// When the phase began: its wait is bounded from there.
    since: Instant,
    partial: Vec<u8>,
}

struct Run<'a> {
    config: &'a LoginsConfig,
    poller: Poller,
    events: Events,
    idle: Vec<Idle>,
    workers: Vec<Worker>,
    measure_from: Instant,
    measure_until: Instant,
    logins: u64,
    latency: Histogram<u64>,
    /// The read buffer, kept from turn to turn.
    buf: Vec<u8>,
}

pub fn run(config: &LoginsConfig) -> Result<LoginsReport, String> {
    if config.addrs.is_empty() || config.workers == 0 {
        return Err("logins needs an address and at least one worker".to_owned());
    }
    let limit = rlimit::increase_nofile_limit(u64::MAX).map_err(|e| e.to_string())?;
    if (limit as usize) < config.online + config.workers + 16 {
        return Err(format!(
            "the open-file limit ({limit}) is too low for {} connections",
            config.online + config.workers
        ));
    }
    let now = Instant::now();
    let mut run = Run {
        config,
        poller: Poller::new().map_err(|e| e.to_string())?,
        events: Events::new(),
        idle: Vec::with_capacity(config.online),
        workers: Vec::with_capacity(config.workers),
        measure_from: now,
        measure_until: now,
        logins: 0,
        latency: Histogram::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?,
        buf: Vec::new(),
    };
    let result = run.drive();
    // Every socket leaves the poller before it is closed.
    for idle in &run.idle {
        let _ = run.poller.delete(&idle.stream);
    }
    for worker in &run.workers {
        if let Some(stream) = &worker.stream {
            let _ = run.poller.delete(stream);
        }
    }
    result
}

impl Run<'_> {
    fn addr(&self, i: usize) -> SocketAddr {
        self.config.addrs[i % self.config.addrs.len()]
    }

    fn drive(&mut self) -> Result<LoginsReport, String> {
        self.log_in_idle_users()?;

        let start = Instant::now();
        self.measure_from = start + self.config.warmup;
        self.measure_until = self.measure_from + self.config.measure;
        for j in 0..self.config.workers {
            self.workers.push(Worker {
                stream: None,
                phase: Phase::Stopped,
                since: start,
                partial: Vec::new(),
            });
            self.connect(j)?;
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
                self.logins = 0;
                self.latency.reset();
                cpu_start = self.cpu_secs()?;
            }
            let until = if measuring {
                self.measure_until
            } else {
                self.measure_from
            };
            let timeout = until
                .saturating_duration_since(now)
                .min(Duration::from_millis(100));
            self.turn(Some(timeout))?;
            self.check_deadlines()?;
        }
        let cpu_end = self.cpu_secs()?;
        Ok(LoginsReport {
            logins: self.logins,
            seconds: self.config.measure.as_secs_f64(),
            latency: self.latency.clone(),
            cpu_secs: match (cpu_start, cpu_end) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            },
        })
    }

    /// Logs the idle users in, then waits for the presence storm of their
    /// logins to drain.
    fn log_in_idle_users(&mut self) -> Result<(), String> {
        for i in 0..self.config.online {
            let addr = self.addr(i);
            let stream = TcpStream::connect_timeout(&addr, TIMEOUT)
                .map_err(|e| format!("idle user u{i}: cannot connect to {addr}: {e}"))?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            // A short line on a new connection: the socket takes it whole.
            (&stream)
                .write_all(format!("login u{i} p{i}\n").as_bytes())
                .map_err(|e| format!("idle user u{i} ({addr}): {e}"))?;
            stream.set_nonblocking(true).map_err(|e| e.to_string())?;
            // Level-triggered: no re-arming after each event.
            // SAFETY: the stream is kept in `self.idle` and deleted from
            // the poller before it is dropped (see `run`).
            #[allow(unsafe_code)]
            unsafe {
                self.poller
                    .add_with_mode(&stream, Event::readable(i), PollMode::Level)
                    .map_err(|e| e.to_string())?;
            }
            self.idle.push(Idle {
                stream,
                partial: Vec::new(),
                logged_in: false,
            });
            if i % 256 == 255 {
                // Read what has come, so the server's output does not pile
                // up while the rest connect.
                self.turn(Some(Duration::ZERO))?;
            }
        }
        let mut last_progress = Instant::now();
        loop {
            let waiting = self.idle.iter().filter(|c| !c.logged_in).count();
            if waiting == 0 {
                break;
            }
            if last_progress.elapsed() > TIMEOUT {
                return Err(format!(
                    "{waiting} of {} idle users had no login ok after {} s without progress",
                    self.config.online,
                    TIMEOUT.as_secs()
                ));
            }
            if self.turn(Some(Duration::from_millis(100)))? > 0 {
                last_progress = Instant::now();
            }
        }
        // Quiet for half a second: the presence notices have all come.
        let started = Instant::now();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(500) {
            if started.elapsed() > DRAIN_LIMIT {
                return Err(format!(
                    "the idle users' presence notices were still coming after {} s",
                    DRAIN_LIMIT.as_secs()
                ));
            }
            if self.turn(Some(Duration::from_millis(100)))? > 0 {
                quiet_since = Instant::now();
            }
        }
        Ok(())
    }

    /// Opens worker `j`'s next connection (a non-blocking connect: its
    /// login goes once the socket turns writable).
    fn connect(&mut self, j: usize) -> Result<(), String> {
        let addr = self.addr(j);
        let user = self.config.online + j;
        let stream = start_connect(addr)
            .map_err(|e| format!("worker u{user}: cannot connect to {addr}: {e}"))?;
        let key = self.config.online + j;
        // SAFETY: the stream is kept in `self.workers[j]` and deleted from
        // the poller before it is dropped (here on replacement, in `run`
        // at the end).
        #[allow(unsafe_code)]
        unsafe {
            self.poller
                .add_with_mode(&stream, Event::writable(key), PollMode::Level)
                .map_err(|e| e.to_string())?;
        }
        let worker = &mut self.workers[j];
        worker.stream = Some(stream);
        worker.phase = Phase::Connecting;
        worker.since = Instant::now();
        worker.partial.clear();
        Ok(())
    }

    /// Closes worker `j`'s connection (the server closed it after the
    /// logout) and, while the run lasts, opens the next.
    fn reconnect(&mut self, j: usize) -> Result<(), String> {
        if let Some(stream) = self.workers[j].stream.take() {
            let _ = self.poller.delete(&stream);
        }
        self.workers[j].phase = Phase::Stopped;
        if Instant::now() < self.measure_until {
            self.connect(j)?;
        }
        Ok(())
    }

    /// Waits once and serves every ready connection; returns the frames
    /// the idle users read.
    fn turn(&mut self, timeout: Option<Duration>) -> Result<usize, String> {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        self.poller
            .wait(&mut events, timeout)
            .map_err(|e| e.to_string())?;
        let mut frames = 0;
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(64 * 1024, 0);
        let online = self.config.online;
        let mut result = Ok(());
        for (key, readable, writable) in events.iter().map(|e| (e.key, e.readable, e.writable)) {
            result = if key < online {
                self.read_idle(key, &mut buf).map(|n| frames += n)
            } else if readable || writable {
                self.serve_worker(key - online, writable, &mut buf)
            } else {
                Ok(())
            };
            if result.is_err() {
                break;
            }
        }
        self.events = events;
        self.buf = buf;
        result.map(|()| frames)
    }

    /// Reads what idle user `i` has; returns frames read.
    fn read_idle(&mut self, i: usize, buf: &mut [u8]) -> Result<usize, String> {
        let mut frames = 0;
        loop {
            let idle = &mut self.idle[i];
            match (&idle.stream).read(buf) {
                Ok(0) => {
                    return Err(format!(
                        "the server closed idle user u{i}'s connection ({})",
                        self.addr(i)
                    ))
                }
                Ok(n) => {
                    let mut rest = &buf[..n];
                    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                        idle.partial.extend_from_slice(&rest[..end]);
                        let line = &idle.partial[..];
                        if line.starts_with(b"{\"type\":\"error\"")
                            || line.starts_with(b"{\"type\":\"bye\"")
                        {
                            return Err(format!(
                                "idle user u{i}: {}",
                                String::from_utf8_lossy(line)
                            ));
                        }
                        if !idle.logged_in
                            && line.starts_with(b"{\"type\":\"ok\"")
                            && field(line, b"\"cmd\":\"") == Some(b"login")
                        {
                            idle.logged_in = true;
                        }
                        idle.partial.clear();
                        frames += 1;
                        rest = &rest[end + 1..];
                    }
                    idle.partial.extend_from_slice(rest);
                    if n < buf.len() {
                        break; // drained: level-triggered, no read to EAGAIN
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("idle user u{i}: {e}")),
            }
        }
        Ok(frames)
    }

    fn serve_worker(&mut self, j: usize, writable: bool, buf: &mut [u8]) -> Result<(), String> {
        let user = self.config.online + j;
        let addr = self.addr(j);
        let key = self.config.online + j;
        let phase = self.workers[j].phase;
        let Some(stream) = &self.workers[j].stream else {
            return Ok(());
        };
        match phase {
            Phase::Stopped => Ok(()),
            Phase::Connecting => {
                if !writable {
                    return Ok(());
                }
                if let Some(e) = stream.take_error().map_err(|e| e.to_string())? {
                    return Err(format!("worker u{user}: cannot connect to {addr}: {e}"));
                }
                let line = format!("login u{user} p{user}\n");
                let sent = Instant::now();
                match (&*stream).write(line.as_bytes()) {
                    Ok(n) if n == line.len() => {}
                    Ok(n) => {
                        return Err(format!(
                            "worker u{user} ({addr}): only {n} bytes of its login written"
                        ))
                    }
                    Err(e) => return Err(format!("worker u{user} ({addr}): {e}")),
                }
                self.poller
                    .modify_with_mode(stream, Event::readable(key), PollMode::Level)
                    .map_err(|e| e.to_string())?;
                let worker = &mut self.workers[j];
                worker.phase = Phase::LoggingIn(sent);
                worker.since = sent;
                Ok(())
            }
            Phase::LoggingIn(sent) => loop {
                let Some(stream) = &self.workers[j].stream else {
                    return Ok(());
                };
                let read = (&*stream).read(buf);
                match read {
                    Ok(0) => {
                        return Err(format!(
                            "the server closed worker u{user}'s connection ({addr}) before its login's ok"
                        ))
                    }
                    Ok(n) => {
                        if self.worker_lines(j, sent, &buf[..n])? {
                            return Ok(());
                        }
                        if n < buf.len() {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("worker u{user} ({addr}): {e}")),
                }
            },
            Phase::LoggingOut => loop {
                match (&*stream).read(buf) {
                    // Closed by the server, as a logout ends: the next one.
                    Ok(0) => return self.reconnect(j),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                        return self.reconnect(j)
                    }
                    // The ok, the bye, and presence notices: discarded.
                    Ok(n) if n < buf.len() => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("worker u{user} ({addr}) logging out: {e}")),
                }
            },
        }
    }

    /// Worker `j`'s input while it waits for its login's `ok` (sent at
    /// `sent`); returns whether it came (and the logout went).
    fn worker_lines(&mut self, j: usize, sent: Instant, bytes: &[u8]) -> Result<bool, String> {
        let user = self.config.online + j;
        let mut rest = bytes;
        let mut partial = std::mem::take(&mut self.workers[j].partial);
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            partial.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            let line = &partial[..];
            if line.starts_with(b"{\"type\":\"ok\"") && field(line, b"\"cmd\":\"") == Some(b"login")
            {
                let now = Instant::now();
                if now >= self.measure_from && now < self.measure_until {
                    self.logins += 1;
                    let _ = self
                        .latency
                        .record(now.saturating_duration_since(sent).as_nanos().max(1) as u64);
                }
                let stream = self.workers[j].stream.as_ref().ok_or("no stream")?;
                // A short line on a socket that has sent only its login.
                match (&*stream).write(b"logout\n") {
                    Ok(7) => {}
                    Ok(n) => {
                        return Err(format!(
                            "worker u{user}: only {n} bytes of its logout written"
                        ))
                    }
                    Err(e) => return Err(format!("worker u{user} ({}): {e}", self.addr(j))),
                }
                let worker = &mut self.workers[j];
                worker.phase = Phase::LoggingOut;
                worker.since = now;
                partial.clear();
                worker.partial = partial;
                return Ok(true);
            }
            if line.starts_with(b"{\"type\":\"error\"") || line.starts_with(b"{\"type\":\"bye\"") {
                let hint = if contains(line, b"rate_limited") || contains(line, b"too_many") {
                    " (turn the server's per-address and per-name login limits off)"
                } else {
                    ""
                };
                return Err(format!(
                    "worker u{user} ({}): login refused: {}{hint}",
                    self.addr(j),
                    String::from_utf8_lossy(line)
                ));
            }
            // The hello (and nothing else comes before the ok).
            partial.clear();
        }
        partial.extend_from_slice(rest);
        self.workers[j].partial = partial;
        Ok(false)
    }

    /// Fails a worker that waited past `TIMEOUT` in one phase.
    fn check_deadlines(&self) -> Result<(), String> {
        let now = Instant::now();
        for (j, worker) in self.workers.iter().enumerate() {
            if worker.phase == Phase::Stopped || now.duration_since(worker.since) <= TIMEOUT {
                continue;
            }
            let what = match worker.phase {
                Phase::Connecting => "its connection was not accepted",
                Phase::LoggingIn(_) => "no ok for its login",
                Phase::LoggingOut => "the server did not close after its logout",
                Phase::Stopped => continue,
            };
            return Err(format!(
                "worker u{} ({}): {what} within {} s",
                self.config.online + j,
                self.addr(j),
                TIMEOUT.as_secs()
            ));
        }
        Ok(())
    }

    /// The CPU time of the server and of every process named in `cpu_of`.
    fn cpu_secs(&self) -> Result<Option<f64>, String> {
        crate::process::cpu_secs(self.config.server_pid, &self.config.cpu_of)
    }
}

/// A non-blocking connection to `addr`, under way (done when the socket
/// turns writable).
fn start_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_line_is_flat_and_parses() {
        let config = LoginsConfig {
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], 4000))],
            online: 100,
            workers: 32,
            warmup: Duration::from_secs(2),
            measure: Duration::from_secs(4),
            server_pid: None,
            cpu_of: Vec::new(),
        };
        let mut latency = Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        latency.record(2_000_000).unwrap();
        let mut report = LoginsReport {
            logins: 8000,
            seconds: 4.0,
            latency,
            cpu_secs: Some(2.0),
        };
        let line = report.json(&config);
        assert!(!line.contains('\n'));
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["workload"], "logins");
        assert_eq!(
            (json["online"].clone(), json["workers"].clone()),
            (100.into(), 32.into())
        );
        assert_eq!(json["logins_per_sec"], 2000);
        assert_eq!(json["p50_ms"].as_f64().map(f64::round), Some(2.0));
        assert_eq!(json["cpu_us_per_login"], 250.0);
        assert!(report.summary(&config).contains("2000 logins/s"));
        report.cpu_secs = None;
        let json: serde_json::Value = serde_json::from_str(&report.json(&config)).unwrap();
        assert!(json["cpu_us_per_login"].is_null());
    }

    /// A refused login is an error, never a panic or a hang.
    #[test]
    fn a_refused_login_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"{\"type\":\"hello\",\"session\":\"x\",\"version\":1}\n")
                .unwrap();
            let mut line = [0u8; 64];
            let _ = conn.read(&mut line);
            conn.write_all(
                b"{\"type\":\"error\",\"code\":\"invalid_credentials\",\"text\":\"no\"}\n",
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        let err = run(&LoginsConfig {
            addrs: vec![addr],
            online: 0,
            workers: 1,
            warmup: Duration::ZERO,
            measure: Duration::from_secs(1),
            server_pid: None,
            cpu_of: Vec::new(),
        })
        .unwrap_err();
        assert!(err.contains("invalid_credentials"), "{err}");
        server.join().unwrap();
    }
}
