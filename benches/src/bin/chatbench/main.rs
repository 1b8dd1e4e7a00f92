//! `chatbench`: load and measurement tool for `chatserver`.
//!
//! - `chatbench credentials N` prints a credentials file of N users
//!   (`u0 p0`, `u1 p1`, ...) for the server to serve.
//! - `chatbench direct` and `chatbench fanout` drive a server with N
//!   clients sending direct messages or broadcasts, closed loop (a window
//!   of messages in flight) or open loop (`--rate`), and report
//!   deliveries/s, losses, latency percentiles and server CPU per delivery.
//! - `chatbench offline` has N clients message R users who never log in,
//!   so that the server stores every message, and reports the same figures
//!   for messages acknowledged stored (`"stored":true`).
//! - `chatbench connections` logs N users in, keeps them idle (reading and
//!   discarding everything the server sends, presence storms included),
//!   then reports the server's resident memory per connection and its CPU
//!   use while idle.
//!
//! With `--spawn PATH` it starts the server itself, on a free loopback
//! port, with a credentials file it writes and no database (`--no-db`), or
//! a new database file with `--server-db`; otherwise it uses `--addr`.
//! Traffic goes to loopback (or the address given) and nowhere else.

mod load;
mod process;

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use polling::{Event, Events, Poller};

use crate::load::{LoadConfig, Workload};
use crate::process::ProcessSample;

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
    /// Hold N logged-in idle connections; report the server's memory per
    /// connection and its idle CPU.
    #[command(alias = "idle")]
    Connections {
        #[command(flatten)]
        target: Target,
        /// How many connections.
        #[arg(long, alias = "connections", default_value_t = 10_000)]
        clients: usize,
        /// How long to hold the connections idle, watching the server's CPU
        /// time, before reading its memory, in seconds.
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
    },
    /// Every client keeps a window of direct messages in flight to random
    /// others.
    Direct {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Some clients broadcast to everyone.
    Fanout {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        load: LoadArgs,
        /// How many clients broadcast.
        #[arg(long, default_value_t = 1)]
        senders: usize,
    },
    /// Every client keeps a window of direct messages in flight to random
    /// users who never log in, so the server stores each one; a message is
    /// done when the server acknowledges it stored.
    Offline {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        load: LoadArgs,
        /// How many offline recipients: users u<clients>, u<clients + 1>,
        /// ... (they must be in the server's credentials file; --spawn
        /// writes them).
        #[arg(long, default_value_t = 1000)]
        recipients: usize,
    },
}

/// Which server to measure.
#[derive(Debug, clap::Args)]
struct Target {
    /// The server's address (unless --spawn).
    #[arg(long, default_value = "127.0.0.1:4000")]
    addr: SocketAddr,
    /// Start this chatserver binary on a free loopback port, with a
    /// credentials file for the clients, and measure it.
    #[arg(long, value_name = "PATH")]
    spawn: Option<PathBuf>,
    /// The server's process id, to read its CPU time and memory from /proc
    /// (known already with --spawn).
    #[arg(long)]
    server_pid: Option<u32>,
    /// With --spawn: give the server this SQLite database (`--db PATH`),
    /// which must not exist yet, instead of none (`--no-db`).
    #[arg(long, value_name = "PATH")]
    server_db: Option<PathBuf>,
    /// With --spawn: one more argument for the server (repeatable), e.g.
    /// `--server-arg=--verify-cpu-percent=25`.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<OsString>,
    /// Run the load generator on CPU N only (Linux), from after the server
    /// started (a spawned server keeps every CPU).
    #[arg(long, value_name = "N")]
    pin_cpu: Option<usize>,
}

impl Target {
    /// The database arguments of a spawned server; checks --server-db.
    fn server_db_args(&self) -> Result<Vec<OsString>, String> {
        let Some(path) = &self.server_db else {
            return Ok(vec!["--no-db".into()]);
        };
        if self.spawn.is_none() {
            return Err(
                "--server-db needs --spawn: it sets the database of the server chatbench starts \
                 (start your own server with --db instead)"
                    .to_owned(),
            );
        }
        // A link to nothing counts as existing too: SQLite would create its
        // target.
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(format!(
                "{} exists; give a new path (chatbench does not reuse old data)",
                path.display()
            ));
        }
        Ok(vec!["--db".into(), path.into()])
    }
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// How many clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Messages in flight per sender (closed loop).
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 64)]
    text_bytes: usize,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Open loop: messages per second in all, at fixed intervals.
    #[arg(long)]
    rate: Option<u64>,
    /// Also run N connections that keep logging in to Argon2id-hashed
    /// accounts with a wrong password (a storm of password checks); with
    /// --spawn the server gets those accounts and no lockout.
    #[arg(long, value_name = "N", default_value_t = 0)]
    login_storm: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Mode::Credentials { count } => print_credentials(count).map_err(|e| e.to_string()),
        Mode::Connections {
            target,
            clients,
            idle_secs,
        } => with_server(&target, clients, 0, |addr, pid| {
            idle(addr, clients, pid, Duration::from_secs(idle_secs))
        }),
        Mode::Direct { target, load } => {
            with_server(&target, load.clients, load.login_storm, |addr, pid| {
                load_run(addr, pid, &load, Workload::Direct)
            })
        }
        Mode::Fanout {
            target,
            load,
            senders,
        } => with_server(&target, load.clients, load.login_storm, |addr, pid| {
            load_run(addr, pid, &load, Workload::Fanout { senders })
        }),
        Mode::Offline {
            target,
            load,
            recipients,
        } => with_server(
            &target,
            load.clients + recipients,
            load.login_storm,
            |addr, pid| load_run(addr, pid, &load, Workload::Offline { recipients }),
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

fn load_run(
    addr: SocketAddr,
    server_pid: Option<u32>,
    args: &LoadArgs,
    workload: Workload,
) -> Result<(), String> {
    match workload {
        Workload::Offline { recipients } => {
            if args.clients < 1 || recipients < 1 {
                return Err("at least 1 client and 1 recipient are needed".to_owned());
            }
        }
        Workload::Direct | Workload::Fanout { .. } => {
            if args.clients < 2 {
                return Err("at least 2 clients are needed".to_owned());
            }
        }
    }
    let config = LoadConfig {
        addr,
        clients: args.clients,
        workload,
        window: args.window.max(1),
        text_bytes: args.text_bytes,
        warmup: Duration::from_secs(args.warmup_secs),
        measure: Duration::from_secs(args.secs.max(1)),
        rate: args.rate,
        server_pid,
        login_storm: args.login_storm,
    };
    let report = load::run(config.clone())?;
    report.print(&config);
    Ok(())
}

/// An Argon2id hash (the server's default parameters) of a password no
/// storm login sends.
fn storm_hash() -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"chatbench-storm!").map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(b"the-right-one", &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// The server's per-address limits, each turned off (set to 0) unless
/// `server_args` sets it.
fn address_limits_off(server_args: &[OsString]) -> Vec<String> {
    const LIMITS: [&str; 7] = [
        "--max-connections-per-ip",
        "--max-unauthenticated-percent",
        "--max-pending-checks-per-ip",
        "--login-rate-per-ip",
        "--login-rate-per-name",
        "--tls-handshakes-per-ip",
        "--tls-handshakes",
    ];
    LIMITS
        .iter()
        .filter(|flag| !server_args.iter().any(|a| a == **flag))
        .flat_map(|flag| [flag.to_string(), "0".to_owned()])
        .collect()
}

/// Runs `f` against the target server, starting it first with --spawn
/// with `users` accounts (`u<i>` with password `p<i>`) and `storm` hashed
/// accounts `s<j>` for the login storm.
fn with_server(
    target: &Target,
    users: usize,
    storm: usize,
    f: impl FnOnce(SocketAddr, Option<u32>) -> Result<(), String>,
) -> Result<(), String> {
    let db_args = target.server_db_args()?;
    let Some(binary) = &target.spawn else {
        pin(target.pin_cpu)?;
        return f(target.addr, target.server_pid);
    };
    let credentials = std::env::temp_dir().join(format!("chatbench-{}.txt", std::process::id()));
    let mut text: String = (0..users).map(|i| format!("u{i} p{i}\n")).collect();
    if storm > 0 {
        let hash = storm_hash()?;
        text.extend((0..storm).map(|j| format!("s{j} {hash}\n")));
    }
    std::fs::write(&credentials, text).map_err(|e| format!("{}: {e}", credentials.display()))?;
    // The server's limits that would cut a measurement short are lifted:
    // the rate limit, the output a fast sender may pile up, and the offline
    // queue cap (1,000 a recipient by default, which `offline` fills within
    // seconds: every message would then be refused `mailbox_full`).
    let mut child = std::process::Command::new(binary)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-rate-limit",
            "--max-output-bytes",
            "268435456",
            "--offline-queue-cap",
            "1000000000",
        ])
        // The storm's wrong passwords must keep costing a hash check, not
        // hit a lock, on connections that never log in.
        .args(if storm > 0 {
            &[
                "--lockout-attempts",
                "4000000000",
                "--login-timeout-secs",
                "0",
            ][..]
        } else {
            &[][..]
        })
        .arg("--credentials")
        .arg(&credentials)
        .args(&db_args)
        .args(&target.server_args)
        // Every load client comes from one loopback address: the
        // per-address limits are off, unless --server-arg sets one.
        .args(address_limits_off(&target.server_args))
        // Connection logs off: the measurement is of the server, not of
        // its log volume.
        .env("RUST_LOG", "warn,chatserver=info,chatserver::reactor=warn")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(at) = line.find("listening on ") {
                let addr = line[at + 13..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let _ = tx.send(addr);
            }
        }
    });
    let result = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => match addr.parse() {
            Ok(addr) => pin(target.pin_cpu).and_then(|()| f(addr, Some(child.id()))),
            Err(_) => Err(format!("the server printed an unreadable address {addr:?}")),
        },
        Err(_) => Err("the spawned server did not start".to_owned()),
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&credentials);
    result
}

/// `--pin-cpu`: confines this (the load generator's) thread to CPU `n`.
fn pin(cpu: Option<usize>) -> Result<(), String> {
    let Some(n) = cpu else { return Ok(()) };
    #[cfg(target_os = "linux")]
    {
        if n >= libc::CPU_SETSIZE as usize {
            return Err(format!("--pin-cpu {n}: no such CPU"));
        }
        // SAFETY: cpu_set_t is plain data (all-zero is the empty set);
        // CPU_SET writes within it (n is checked above); sched_setaffinity
        // reads it and changes only this thread.
        #[allow(unsafe_code)]
        let result = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(n, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if result != 0 {
            return Err(format!(
                "--pin-cpu {n}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    Err(format!("--pin-cpu {n}: only supported on Linux"))
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
    // Every connection gets its hello and its login's ok, then a presence
    // notice for each later login: the storm is over when all have come.
    let expected = 2 * n + n * n.saturating_sub(1) / 2;
    let mut received = 0;
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
            received += pump(&poller, &mut conns, Some(Duration::ZERO))?;
        }
    }
    let mut logged_in = count_logged_in(&conns);
    while logged_in < n {
        let frames = pump(&poller, &mut conns, Some(Duration::from_secs(5)))?;
        received += frames;
        logged_in = count_logged_in(&conns);
        if frames == 0 {
            return Err(format!("stalled: {logged_in} of {n} logged in"));
        }
    }
    println!(
        "{n} connections logged in after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Let the presence storm drain: every frame has arrived, and (when we
    // can see it) the server is idle, so nothing is still queued in it
    // when its memory is read.
    let mut last_frame = Instant::now();
    let mut last_cpu = pid
        .map(ProcessSample::read)
        .transpose()?
        .map(|s| s.cpu_secs);
    loop {
        let frames = pump(&poller, &mut conns, Some(Duration::from_millis(200)))?;
        received += frames;
        if frames > 0 {
            last_frame = Instant::now();
        } else if last_frame.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "the presence storm stalled: {received} of {expected} frames arrived"
            ));
        }
        if received < expected {
            continue;
        }
        std::thread::sleep(Duration::from_secs(1));
        let cpu = pid
            .map(ProcessSample::read)
            .transpose()?
            .map(|s| s.cpu_secs);
        let server_idle = match (last_cpu, cpu) {
            (Some(a), Some(b)) => b - a < 0.02,
            _ => true,
        };
        last_cpu = cpu;
        if server_idle {
            break;
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
        // Idle memory is what the server holds once it has been idle for
        // a while: allocators hand freed memory back to the system on a
        // delay, so the figure just after the storm is shown too.
        let per_conn = |rss: u64| rss.saturating_sub(before.rss_bytes) as f64 / n as f64 / 1024.0;
        let cpu = (after.cpu_secs - settled.cpu_secs) / idle_for.as_secs_f64() * 100.0;
        println!(
            "server with {n} idle connections: {:.1} MiB resident after {} s idle ({:.1} MiB just after the storm)",
            mib(after.rss_bytes),
            idle_for.as_secs(),
            mib(settled.rss_bytes)
        );
        println!(
            "memory per idle connection: {:.1} KiB ({:.1} KiB just after the storm)",
            per_conn(after.rss_bytes),
            per_conn(settled.rss_bytes)
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::try_parse_from(std::iter::once("chatbench").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn offline_mode() {
        let args = parse(&[
            "offline",
            "--spawn",
            "target/release/chatserver",
            "--clients",
            "100",
            "--recipients",
            "1000",
            "--window",
            "4",
            "--text-bytes",
            "32",
            "--warmup-secs",
            "1",
            "--secs",
            "10",
            "--rate",
            "5000",
        ])
        .unwrap();
        let Mode::Offline {
            target,
            load,
            recipients,
        } = args.command
        else {
            panic!("not the offline mode: {:?}", args.command);
        };
        assert_eq!(recipients, 1000);
        assert_eq!(load.clients, 100);
        assert_eq!(load.window, 4);
        assert_eq!(load.text_bytes, 32);
        assert_eq!(load.warmup_secs, 1);
        assert_eq!(load.secs, 10);
        assert_eq!(load.rate, Some(5000));
        assert_eq!(target.spawn, Some("target/release/chatserver".into()));
        assert_eq!(target.server_db_args().unwrap(), ["--no-db"]);

        let Mode::Offline { recipients, .. } = parse(&["offline"]).unwrap().command else {
            panic!("not the offline mode");
        };
        assert_eq!(recipients, 1000);
    }

    #[test]
    fn server_db() {
        let dir = std::env::temp_dir().join(format!("chatbench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let new = dir.join("new.db");
        let old = dir.join("old.db");
        std::fs::write(&old, b"").unwrap();
        let target = |extra: &[&str]| {
            let mut args = vec!["direct"];
            args.extend_from_slice(extra);
            match parse(&args).unwrap().command {
                Mode::Direct { target, .. } => target,
                other => panic!("not the direct mode: {other:?}"),
            }
        };
        let new_s = new.to_str().unwrap();
        let old_s = old.to_str().unwrap();

        let args = target(&["--spawn", "chatserver", "--server-db", new_s])
            .server_db_args()
            .unwrap();
        assert_eq!(args, [OsString::from("--db"), new.clone().into()]);

        let err = target(&["--spawn", "chatserver", "--server-db", old_s])
            .server_db_args()
            .unwrap_err();
        assert!(err.contains("exists; give a new path"), "{err}");

        let err = target(&["--server-db", new_s])
            .server_db_args()
            .unwrap_err();
        assert!(err.contains("needs --spawn"), "{err}");
        // Refused before anything runs.
        let err = with_server(&target(&["--server-db", new_s]), 1, 0, |_, _| {
            panic!("ran without --spawn")
        })
        .unwrap_err();
        assert!(err.contains("needs --spawn"), "{err}");

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
