//! `chatbench`: load and measurement tool for a running `chatserver`.
//!
//! - `chatbench credentials N` prints a credentials file of N users
//!   (`u0 p0`, `u1 p1`, ...) for the server to serve.
//! - `chatbench idle --connections N --server-pid PID` logs N users in,
//!   keeps them connected and idle (reading and discarding everything the
//!   server sends, presence storms included), then reports the server's
//!   resident memory per connection and its CPU use while idle.
//!
//! Traffic goes to the address given (loopback by default) and nowhere else.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use polling::{Event, Events, Poller};

#[derive(Debug, Parser)]
#[command(
    name = "chatbench",
    version,
    about = "Load and measurement tool for chatserver"
)]
struct Args {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Print a credentials file with N users: `u<i> p<i>`.
    Credentials {
        /// How many users.
        count: usize,
    },
    /// Hold N logged-in idle connections and measure the server.
    Idle {
        /// The server's address.
        #[arg(long, default_value = "127.0.0.1:4000")]
        addr: SocketAddr,
        /// How many connections (users u0.. from `chatbench credentials`).
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// The server's process id, to read its memory and CPU time
        /// (Linux /proc).
        #[arg(long)]
        server_pid: Option<u32>,
        /// How long to watch the idle server's CPU time, in seconds.
        #[arg(long, default_value_t = 10)]
        idle_secs: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Mode::Credentials { count } => print_credentials(count).map_err(|e| e.to_string()),
        Mode::Idle {
            addr,
            connections,
            server_pid,
            idle_secs,
        } => idle(
            addr,
            connections,
            server_pid,
            Duration::from_secs(idle_secs),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_credentials(count: usize) -> io::Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    for i in 0..count {
        writeln!(out, "u{i} p{i}")?;
    }
    out.flush()
}

/// One benchmark connection: reads and counts frames, nothing else.
struct Conn {
    stream: TcpStream,
    partial: Vec<u8>,
    logged_in: bool,
}

fn idle(addr: SocketAddr, n: usize, pid: Option<u32>, idle_for: Duration) -> Result<(), String> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).map_err(|e| e.to_string())?;
    if (limit as usize) < n + 16 {
        return Err(format!(
            "the open-file limit ({limit}) is too low for {n} connections"
        ));
    }
    let before = pid.map(ProcessSample::read).transpose()?;
    if let Some(s) = &before {
        println!("server before: {:.1} MiB resident", mib(s.rss_bytes));
    }

    let started = Instant::now();
    // Declared before the poller so that the poller is dropped first: no
    // registered socket is ever closed while the poller still watches it.
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    let poller = Poller::new().map_err(|e| e.to_string())?;
    for i in 0..n {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connection {i}: {e}"))?;
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        (&stream)
            .write_all(format!("login u{i} p{i}\n").as_bytes())
            .map_err(|e| format!("connection {i}: {e}"))?;
        // SAFETY: `stream` is kept in `conns`, which outlives `poller`
        // (see the declaration order above).
        #[allow(unsafe_code)]
        unsafe {
            poller
                .add(&stream, Event::readable(i))
                .map_err(|e| e.to_string())?;
        }
        conns.push(Conn {
            stream,
            partial: Vec::new(),
            logged_in: false,
        });
        if i % 1000 == 999 {
            // Serve what has arrived so the server's output does not pile up.
            pump(&poller, &mut conns, Some(Duration::ZERO))?;
        }
    }
    let mut logged_in = count_logged_in(&conns);
    while logged_in < n {
        let frames = pump(&poller, &mut conns, Some(Duration::from_secs(5)))?;
        logged_in = count_logged_in(&conns);
        if frames == 0 {
            return Err(format!("stalled: {logged_in} of {n} logged in"));
        }
    }
    println!(
        "{n} connections logged in after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Let the presence storm drain: wait for a whole quiet second.
    let mut last_frame = Instant::now();
    while last_frame.elapsed() < Duration::from_secs(1) {
        if pump(&poller, &mut conns, Some(Duration::from_millis(200)))? > 0 {
            last_frame = Instant::now();
        }
    }
    println!(
        "presence storm drained after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    if let (Some(pid), Some(before)) = (pid, before) {
        let settled = ProcessSample::read(pid)?;
        let wait_start = Instant::now();
        let mut frames = 0;
        while wait_start.elapsed() < idle_for {
            frames += pump(
                &poller,
                &mut conns,
                Some(idle_for.saturating_sub(wait_start.elapsed())),
            )?;
        }
        let after = ProcessSample::read(pid)?;
        let per_conn = settled.rss_bytes.saturating_sub(before.rss_bytes) as f64 / n as f64;
        let cpu = (after.cpu_secs - settled.cpu_secs) / idle_for.as_secs_f64() * 100.0;
        println!(
            "server with {n} idle connections: {:.1} MiB resident",
            mib(settled.rss_bytes)
        );
        println!("memory per idle connection: {:.1} KiB", per_conn / 1024.0);
        println!(
            "server CPU while idle for {} s: {cpu:.2}% of one core ({frames} frames received meanwhile)",
            idle_for.as_secs()
        );
    }
    Ok(())
}

fn count_logged_in(conns: &[Conn]) -> usize {
    conns.iter().filter(|c| c.logged_in).count()
}

/// Waits once and reads every ready connection; returns frames read.
fn pump(poller: &Poller, conns: &mut [Conn], timeout: Option<Duration>) -> Result<usize, String> {
    let mut events = Events::new();
    poller
        .wait(&mut events, timeout)
        .map_err(|e| e.to_string())?;
    let mut frames = 0;
    let mut buf = [0u8; 64 * 1024];
    for event in events.iter() {
        let conn = &mut conns[event.key];
        loop {
            match (&conn.stream).read(&mut buf) {
                Ok(0) => return Err(format!("the server closed connection {}", event.key)),
                Ok(n) => frames += conn.take(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("connection {}: {e}", event.key)),
            }
        }
        poller
            .modify(&conn.stream, Event::readable(event.key))
            .map_err(|e| e.to_string())?;
    }
    Ok(frames)
}

impl Conn {
    /// Splits input into lines; notes the login answer.
    fn take(&mut self, mut bytes: &[u8]) -> Result<usize, String> {
        let mut frames = 0;
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let line = if self.partial.is_empty() {
                &bytes[..end]
            } else {
                self.partial.extend_from_slice(&bytes[..end]);
                &self.partial[..]
            };
            if !self.logged_in {
                if line.starts_with(b"{\"type\":\"error\"") {
                    return Err(format!("login refused: {}", String::from_utf8_lossy(line)));
                }
                self.logged_in = contains(line, b"\"cmd\":\"login\"");
            }
            frames += 1;
            self.partial.clear();
            bytes = &bytes[end + 1..];
        }
        self.partial.extend_from_slice(bytes);
        Ok(frames)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A process's resident memory and CPU time, from Linux's /proc.
struct ProcessSample {
    rss_bytes: u64,
    cpu_secs: f64,
}

impl ProcessSample {
    fn read(pid: u32) -> Result<ProcessSample, String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("cannot read /proc/{pid}/status (Linux only): {e}"))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or("no VmRSS in /proc status")?;
        let stat =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the whole line.
        let after_name = stat.rsplit_once(')').ok_or("malformed /proc stat")?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64, String> {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| "malformed /proc stat".to_owned())
        };
        let cpu_ticks = ticks(11)? + ticks(12)?;
        Ok(ProcessSample {
            rss_bytes: rss_kib * 1024,
            cpu_secs: cpu_ticks / clock_ticks_per_second(),
        })
    }
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
