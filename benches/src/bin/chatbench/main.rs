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
//! - `chatbench offline-memory` reports the server's resident memory while
//!   offline queues grow: empty, after a few senders queued `--bytes` of
//!   messages (1 GiB by default) to `--recipients` users who never log in,
//!   and, with a database (`--server-db`), after the server is stopped
//!   (SIGTERM) and started again on it. Without a database it queues until
//!   the server's memory cap answers `mailbox_full`. Needs `--spawn`.
//! - `chatbench tls-flood` opens connections from another loopback address
//!   (127.0.0.2 by default) to a TLS address at `--rate` a second, each
//!   sending a recorded TLS ClientHello and closing. With `--spawn` it
//!   starts the server with an RSA-2048 certificate and compares the
//!   latency of a `direct` load on the plaintext address with and without
//!   the flood, in alternating rounds.
//! - `chatbench login-timing` times failed logins, one at a time on fresh
//!   connections: wrong passwords for plaintext accounts and names without
//!   an account, taking turns. With `--spawn` the credentials file also
//!   has hashed accounts unless `--all-plaintext`.
//! - `chatbench logins` measures a login storm: N idle users stay logged
//!   in (reading every presence notice the storm makes), while W workers
//!   each log in, out and in again on new connections; it reports logins/s,
//!   login latency and CPU per login, on one server or a cluster's nodes.
//! - `chatbench mixed` runs two open-loop loads at once on disjoint users:
//!   messages to users who never log in (stored; 20,000/s by default) and
//!   messages between online users (5,000/s), and reports stored messages
//!   acknowledged a second and the online messages' latency. It starts the
//!   server it measures (`--spawn`, alias `--server-bin`) with a new SQLite
//!   database, or `--no-db`, so that two builds, and each build with and
//!   without a database, can be compared (`benches/scripts/mixed-ab.sh`).
//!
//! With `--spawn PATH` it starts the server itself, on a free loopback
//! port, with a credentials file it writes and no database (`--no-db`), or
//! a new database file with `--server-db`; otherwise it uses `--addr`
//! (several for the nodes of a cluster, with `--cross-node` for direct
//! messages that cross nodes and `--cpu-of NAME` to count the CPU of every
//! process of that name; see `benches/scripts/cluster-bench.sh`).
//! Traffic goes to loopback (or the address given) and nowhere else.

mod load;
mod login_timing;
mod logins;
mod mixed;
mod offline_memory;
mod outbox;
mod presence;
mod process;
mod tls_flood;
mod ws;

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// The server's per-address connection and login limits (a load's clients
// all come from one loopback address), and its TLS handshake budgets: the
// server library's own lists of their flags.
use chatserver::admission::{
    ADDRESS_LIMIT_FLAGS as ADDRESS_LIMITS, TLS_BUDGET_FLAGS as TLS_BUDGETS,
};
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
    /// Queue offline messages for users who never log in and report the
    /// server's resident memory: empty, after queuing, and (with
    /// --server-db) after a restart on the same database. Needs --spawn.
    OfflineMemory {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        args: OfflineMemoryArgs,
    },
    /// Open connections from another loopback address to a TLS address,
    /// each sending a recorded ClientHello; with --spawn, compare a direct
    /// load's latency with and without the flood.
    TlsFlood {
        #[command(flatten)]
        args: TlsFloodArgs,
    },
    /// Time failed logins: wrong passwords of plaintext accounts against
    /// names without an account, one at a time on fresh connections.
    LoginTiming {
        #[command(flatten)]
        target: Target,
        /// Attempts of each kind measured.
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Attempts of each kind made first and not measured.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// With --spawn: hashed (Argon2id) accounts beside the plaintext
        /// ones, so the server answers a wrong plaintext password with a
        /// decoy hash check, as it does an unknown name.
        #[arg(long, default_value_t = 10)]
        hashed: usize,
        /// With --spawn: plaintext accounts only (no hashed ones).
        #[arg(long)]
        all_plaintext: bool,
    },
    /// Time a login on the first --addr reaching a user logged in on the
    /// second as a presence notice (a cluster's propagation delay); run it
    /// beside a load to measure it under load.
    Presence {
        #[command(flatten)]
        target: Target,
        /// Logins measured.
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Milliseconds between a logout and the next login.
        #[arg(long, default_value_t = 20)]
        pause_ms: u64,
        /// The prober's account, u<N> (one no load uses).
        #[arg(long, default_value_t = 999)]
        prober: usize,
        /// The observer's account, u<N>.
        #[arg(long, default_value_t = 998)]
        observer: usize,
    },
    /// A login storm: --online idle users stay logged in (each login and
    /// logout makes a presence notice for every one of them) while
    /// --workers connections each log in, wait for the ok, log out and
    /// connect again; reports logins/s, login latency and CPU per login.
    Logins {
        #[command(flatten)]
        target: Target,
        /// Idle users logged in throughout: u0 .. u<online - 1>, user i on
        /// the (i mod n)th --addr.
        #[arg(long, default_value_t = 100)]
        online: usize,
        /// Connections logging in and out in a loop: users u<online> ..,
        /// worker j on the (j mod n)th --addr.
        #[arg(long, default_value_t = 32)]
        workers: usize,
        /// Seconds measured.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Seconds of logins before measuring.
        #[arg(long, default_value_t = 2)]
        warmup_secs: u64,
    },
    /// Two open-loop loads at once on disjoint users: direct messages to
    /// users who never log in (stored, with a database on disk before the
    /// ok), and direct messages between online users; reports stored
    /// messages acknowledged a second and the online messages' latency.
    Mixed {
        #[command(flatten)]
        args: MixedArgs,
    },
}

#[derive(Debug, clap::Args)]
struct OfflineMemoryArgs {
    /// Bytes of message text to queue. Without a database, queuing stops
    /// earlier when the server's memory cap answers `mailbox_full`. With
    /// one, the file needs about this much free disk.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// How many offline recipients: users u<senders>, u<senders + 1>, ...,
    /// messaged in turn.
    #[arg(long, default_value_t = 1000)]
    recipients: usize,
    /// How many sender clients (users u0, u1, ...).
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Messages in flight per sender.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Bytes of text per message: the whole frame must stay within the
    /// server's default frame limit (16384 bytes).
    #[arg(long, default_value_t = 16_000)]
    text_bytes: usize,
    /// Stop queuing after this many seconds, whatever is stored by then.
    #[arg(long, default_value_t = 600)]
    max_secs: u64,
    /// Once the server is idle, wait this many seconds more before reading
    /// its memory: the allocator hands freed memory back on a delay.
    #[arg(long, default_value_t = 12)]
    settle_secs: u64,
    /// Keep the --server-db file afterwards (by default it is deleted, with
    /// its -wal and -shm files: chatbench made it).
    #[arg(long)]
    keep_db: bool,
}

#[derive(Debug, clap::Args)]
struct TlsFloodArgs {
    /// Without --spawn: the TLS address to flood (a loopback address).
    #[arg(long, default_value = "127.0.0.1:4443")]
    tls_addr: SocketAddr,
    /// The loopback address the flood's connections come from.
    #[arg(long, default_value = "127.0.0.2")]
    source: IpAddr,
    /// New flood connections a second.
    #[arg(long, default_value_t = 1200)]
    rate: u64,
    /// Seconds of flood; with --spawn, seconds each run measures.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// How long a flood connection waits for the server's answer or close
    /// before it closes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    read_ms: u64,
    /// Most flood connections open at once (more due are skipped).
    #[arg(long, default_value_t = 4096)]
    max_open: usize,
    /// Start this chatserver binary with TLS on a second loopback port
    /// (an RSA-2048 certificate, its TLS handshake budgets at their
    /// defaults unless --server-arg sets them, the other per-address
    /// limits off), and run a direct load on its plaintext port, in rounds
    /// without and with the flood.
    #[arg(long, value_name = "PATH")]
    spawn: Option<PathBuf>,
    /// With --spawn: one more argument for the server (repeatable), e.g.
    /// `--server-arg=--tls-handshakes=0`.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<OsString>,
    /// With --spawn: serve this certificate chain (PEM) instead of a new
    /// RSA-2048 one (made with openssl and rcgen).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// With --spawn: the private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With --spawn: rounds, each a run without the flood, then one with.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// With --spawn: the direct load's clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// With --spawn: the direct load's messages a second, all clients
    /// together (open loop).
    #[arg(long, default_value_t = 5000)]
    load_rate: u64,
    /// With --spawn: seconds of warm-up before each run is measured.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
}

#[derive(Debug, clap::Args)]
struct MixedArgs {
    /// The chatserver binary to start and measure, on a free loopback
    /// port with the per-address limits and the rate limit off (an old and
    /// a new build can be run in turn).
    #[arg(long, visible_alias = "server-bin", value_name = "PATH")]
    spawn: PathBuf,
    /// Run the server with `--no-db` (everything in memory) instead of a
    /// new SQLite database (WAL, `synchronous = FULL`: each stored message
    /// is fsync'd before its ok).
    #[arg(long, conflicts_with = "server_db")]
    no_db: bool,
    /// The database file for the server (it must not exist; it is deleted
    /// afterwards, with its -wal and -shm files). Default: a new file in
    /// the temporary directory (check that it is on a disk, not tmpfs).
    #[arg(long, value_name = "PATH")]
    server_db: Option<PathBuf>,
    /// Stored messages a second offered, all store senders together.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    store_rate: u64,
    /// Clients that send the stored messages (users after the online ones).
    /// The default keeps each under the server's default rate limit (100
    /// frames/s), though chatbench turns that limit off.
    #[arg(long, value_name = "N", default_value_t = 250)]
    store_senders: usize,
    /// Users who never log in, messaged in turn by the store senders: the
    /// last users. Enough that no offline queue reaches its cap.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    recipients: usize,
    /// Online messages a second offered, all online clients together.
    #[arg(long, value_name = "N", default_value_t = 5_000)]
    online_rate: u64,
    /// Logged-in users who message each other (u0, u1, ...).
    #[arg(long, value_name = "N", default_value_t = 100)]
    online_clients: usize,
    /// Bytes of text per message (at least what the send-time stamp
    /// takes, about 20).
    #[arg(long, value_name = "N", default_value_t = 64)]
    text_bytes: usize,
    /// Seconds both loads run before the measurement window.
    #[arg(long, value_name = "S", default_value_t = 2)]
    warmup_secs: u64,
    /// Seconds measured.
    #[arg(long, value_name = "S", default_value_t = 10)]
    secs: u64,
    /// Print one JSON line on stdout (the readable report goes to stderr).
    #[arg(long)]
    json: bool,
    /// One more argument for the server (repeatable), e.g.
    /// `--server-arg=--verify-threads=1`.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<OsString>,
    /// Run the load generator on CPU N only (Linux), from after the server
    /// started (the server keeps every CPU).
    #[arg(long, value_name = "N")]
    pin_cpu: Option<usize>,
}

/// Which server to measure.
#[derive(Debug, clap::Args)]
struct Target {
    /// The server's address (unless --spawn). Several, comma-separated or
    /// repeated, for the nodes of a cluster: client i connects to the
    /// (i mod n)th (direct, fanout and logins loads; the others use the
    /// first).
    #[arg(long, default_value = "127.0.0.1:4000", value_delimiter = ',')]
    addr: Vec<SocketAddr>,
    /// Start this chatserver binary on a free loopback port, with a
    /// credentials file for the clients, and measure it.
    #[arg(long, value_name = "PATH")]
    spawn: Option<PathBuf>,
    /// The server's process id, to read its CPU time and memory from /proc
    /// (known already with --spawn).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also count the CPU time of every process with this command name
    /// (`/proc/PID/comm`; repeatable), e.g. `--cpu-of chatserver --cpu-of
    /// nats-server --cpu-of postgres` for a whole cluster on one machine.
    #[arg(long = "cpu-of", value_name = "NAME")]
    cpu_of: Vec<String>,
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
    /// The addresses a load spreads its clients over: the spawned server's
    /// (`spawned`), or every --addr.
    fn nodes(&self, spawned: SocketAddr) -> Vec<SocketAddr> {
        if self.spawn.is_some() {
            vec![spawned]
        } else {
            self.addr.clone()
        }
    }

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
    /// Direct load on several addresses: every message goes to a user on
    /// another node than its sender's.
    #[arg(long)]
    cross_node: bool,
    /// Clients speak WebSocket (`GET /ws`): --addr is then the server's
    /// --http address (with --spawn, the spawned server gets one).
    #[arg(long)]
    ws: bool,
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
        Mode::Direct { target, load } => with_server_on(
            &target,
            load.clients,
            load.login_storm,
            load.ws,
            |addr, pid| load_run(&target.nodes(addr), pid, &target, &load, Workload::Direct),
        ),
        Mode::Fanout {
            target,
            load,
            senders,
        } => with_server_on(
            &target,
            load.clients,
            load.login_storm,
            load.ws,
            |addr, pid| {
                let workload = Workload::Fanout { senders };
                load_run(&target.nodes(addr), pid, &target, &load, workload)
            },
        ),
        Mode::Offline {
            target,
            load,
            recipients,
        } => with_server_on(
            &target,
            load.clients + recipients,
            load.login_storm,
            load.ws,
            |addr, pid| {
                let workload = Workload::Offline { recipients };
                load_run(&target.nodes(addr), pid, &target, &load, workload)
            },
        ),
        Mode::OfflineMemory { target, args } => offline_memory(&target, &args),
        Mode::TlsFlood { args } => tls_flood(&args),
        Mode::LoginTiming {
            target,
            count,
            warmup,
            hashed,
            all_plaintext,
        } => login_timing(
            &target,
            count,
            warmup,
            if all_plaintext { 0 } else { hashed },
        ),
        Mode::Mixed { args } => mixed(&args),
        Mode::Logins {
            target,
            online,
            workers,
            secs,
            warmup_secs,
        } => logins_run(&target, online, workers, secs, warmup_secs),
        Mode::Presence {
            target,
            count,
            pause_ms,
            prober,
            observer,
        } => presence_latency(&target, count, pause_ms, prober, observer),
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
    addrs: &[SocketAddr],
    server_pid: Option<u32>,
    target: &Target,
    args: &LoadArgs,
    workload: Workload,
) -> Result<(), String> {
    if args.cross_node && (addrs.len() < 2 || !matches!(workload, Workload::Direct)) {
        return Err("--cross-node needs a direct load and two --addr or more".to_owned());
    }
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
        addrs: addrs.to_vec(),
        cross_node: args.cross_node,
        cpu_of: target.cpu_of.clone(),
        clients: args.clients,
        workload,
        window: args.window.max(1),
        text_bytes: args.text_bytes,
        warmup: Duration::from_secs(args.warmup_secs),
        measure: Duration::from_secs(args.secs.max(1)),
        rate: args.rate,
        server_pid,
        login_storm: args.login_storm,
        websocket: args.ws,
    };
    let report = load::run(config.clone())?;
    report.print(&config);
    Ok(())
}

/// `chatbench logins`.
fn logins_run(
    target: &Target,
    online: usize,
    workers: usize,
    secs: u64,
    warmup_secs: u64,
) -> Result<(), String> {
    if workers < 1 || secs < 1 {
        return Err("--workers and --secs must be at least 1".to_owned());
    }
    // With --spawn the server gets an account for every user, and its
    // per-address and per-name limits (ADDRESS_LIMITS) off.
    with_server(target, online + workers, 0, |addr, pid| {
        let config = logins::LoginsConfig {
            addrs: target.nodes(addr),
            online,
            workers,
            warmup: Duration::from_secs(warmup_secs),
            measure: Duration::from_secs(secs),
            server_pid: pid,
            cpu_of: target.cpu_of.clone(),
        };
        let report = logins::run(&config)?;
        println!("{}", report.summary(&config));
        println!("{}", report.json(&config));
        Ok(())
    })
}

/// `chatbench presence`.
fn presence_latency(
    target: &Target,
    count: usize,
    pause_ms: u64,
    prober: usize,
    observer: usize,
) -> Result<(), String> {
    let [login_addr, observer_addr, ..] = target.addr[..] else {
        return Err("presence needs two --addr: where to log in, where to watch".to_owned());
    };
    if target.spawn.is_some() || count == 0 || prober == observer {
        return Err(
            "presence measures servers already running (no --spawn), with --count above 0 \
             and two different accounts"
                .to_owned(),
        );
    }
    let config = presence::PresenceConfig {
        login_addr,
        observer_addr,
        prober,
        observer,
        count,
        pause: Duration::from_millis(pause_ms),
    };
    let mut delays: Vec<f64> = presence::run(&config)?
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    delays.sort_by(f64::total_cmp);
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
    println!(
        "presence: {count} logins on {login_addr} seen on {observer_addr}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    println!(
        "{{\"workload\":\"presence\",\"count\":{count},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

/// The server's default frame limit (`--max-frame-bytes`).
const MAX_FRAME_BYTES: usize = 16 * 1024;

/// The server's default `--offline-memory-bytes`.
const DEFAULT_OFFLINE_MEMORY_BYTES: u64 = 256 * 1024 * 1024;

/// `chatbench offline-memory`.
fn offline_memory(target: &Target, args: &OfflineMemoryArgs) -> Result<(), String> {
    let Some(binary) = &target.spawn else {
        return Err(
            "offline-memory needs --spawn: it reads the memory of the server it starts, and restarts it"
                .to_owned(),
        );
    };
    if args.senders < 1 || args.recipients < 1 || args.window < 1 || args.text_bytes < 1 {
        return Err(
            "--senders, --recipients, --window and --text-bytes must be at least 1".to_owned(),
        );
    }
    let frame = format!("message u{} ", args.senders + args.recipients - 1).len() + args.text_bytes;
    if frame > MAX_FRAME_BYTES {
        return Err(format!(
            "--text-bytes {}: a message frame would be {frame} bytes, over the server's frame limit ({MAX_FRAME_BYTES})",
            args.text_bytes
        ));
    }
    let db_args = target.server_db_args()?;
    // The database is chatbench's (it must not have existed): removed at
    // the end, whatever happens, unless --keep-db.
    let _db_files = target
        .server_db
        .as_ref()
        .filter(|_| !args.keep_db)
        .map(|db| RemoveOnDrop::database(db));
    let credentials = TempFile::write(
        "credentials.txt",
        &credentials_text(args.senders + args.recipients, 0)?,
    )?;
    // Room for each recipient's share twice over: the per-user caps are
    // not what is measured. u0 may ask `debug server` how many messages
    // are queued.
    let per_user = args
        .bytes
        .div_ceil(args.recipients as u64)
        .saturating_mul(2)
        .max(4 << 20);
    let command = ServerCommand::new(
        binary,
        &target.server_args,
        &credentials.0,
        db_args,
        0,
        &[
            ("--offline-queue-bytes", per_user.to_string().into()),
            ("--admin", "u0".into()),
        ],
        &[&ADDRESS_LIMITS[..], &TLS_BUDGETS[..]].concat(),
    );
    let settle = Duration::from_secs(args.settle_secs);
    let storage = match &target.server_db {
        Some(db) => format!("database {}", db.display()),
        None => {
            let cap = server_value(&target.server_args, "--offline-memory-bytes")
                .unwrap_or_else(|| format!("{DEFAULT_OFFLINE_MEMORY_BYTES} (the default)"));
            format!("no database, --offline-memory-bytes {cap}")
        }
    };
    println!(
        "offline-memory: {} senders queue up to {:.1} MiB in {}-byte texts, window {}, to {} recipients; {storage}",
        args.senders,
        mib(args.bytes),
        args.text_bytes,
        args.window,
        args.recipients
    );

    let mut server = command.start()?;
    pin(target.pin_cpu)?;
    println!("server started in {:.3} s", server.startup.as_secs_f64());
    let empty = memory_at_rest(server.pid(), settle, "empty server")?;

    let queued = offline_memory::queue(
        &offline_memory::QueueConfig {
            addr: server.addr,
            senders: args.senders,
            recipients: args.recipients,
            window: args.window,
            text_bytes: args.text_bytes,
            bytes: args.bytes,
            max_time: Duration::from_secs(args.max_secs),
        },
        Some(server.pid()),
    )?;
    let secs = queued.elapsed.as_secs_f64();
    println!(
        "queued {} bytes ({:.1} MiB) in {} messages, acknowledged stored, in {secs:.1} s ({:.1} MiB/s){}{}",
        queued.bytes,
        mib(queued.bytes),
        queued.messages,
        mib(queued.bytes) / secs.max(1e-9),
        if queued.mailbox_full > 0 {
            format!(
                "; then {} refused mailbox_full",
                queued.mailbox_full
            )
        } else {
            String::new()
        },
        if queued.timed_out {
            format!("; stopped at --max-secs {} before --bytes", args.max_secs)
        } else {
            String::new()
        }
    );
    if let (Some(end), Some(peak)) = (queued.rss_at_end, queued.peak_rss) {
        println!(
            "server when the last answer came: {:.1} MiB resident (at most {:.1} MiB while queuing)",
            mib(end),
            mib(peak)
        );
    }
    let after = memory_at_rest(server.pid(), settle, "after queuing")?;
    if let Some(db) = &target.server_db {
        let size = |suffix: &str| {
            let mut name = db.as_os_str().to_owned();
            name.push(suffix);
            std::fs::metadata(PathBuf::from(name)).map_or(0, |m| m.len())
        };
        println!(
            "database on disk: {:.1} MiB, write-ahead log {:.1} MiB",
            mib(size("")),
            mib(size("-wal"))
        );
    }
    let count = queued_offline_messages(server.addr)?;
    println!("the server counts {count} queued offline messages");
    if count != queued.messages {
        return Err(format!(
            "the server counts {count} queued offline messages, {} were acknowledged stored",
            queued.messages
        ));
    }

    let mut restart = None;
    if target.server_db.is_some() {
        let stopped = server.terminate(Duration::from_secs(60))?;
        println!("server stopped (SIGTERM) in {:.2} s", stopped.as_secs_f64());
        let again = command.start()?;
        println!(
            "server started again on the same database in {:.3} s",
            again.startup.as_secs_f64()
        );
        let rss = memory_at_rest(again.pid(), settle, "after the restart")?;
        let count = queued_offline_messages(again.addr)?;
        println!("the restarted server counts {count} queued offline messages");
        if count != queued.messages {
            return Err(format!(
                "after the restart the server counts {count} queued offline messages, {} were acknowledged stored",
                queued.messages
            ));
        }
        restart = Some((rss, again.startup));
    }

    let growth = |rss: u64| mib(rss) - mib(empty.settled);
    println!(
        "summary: empty {:.1} MiB; after queuing {:.1} MiB ({:+.1} MiB){}",
        mib(empty.settled),
        mib(after.settled),
        growth(after.settled),
        restart.as_ref().map_or(String::new(), |(r, _)| format!(
            "; after the restart {:.1} MiB ({:+.1} MiB)",
            mib(r.settled),
            growth(r.settled)
        ))
    );
    if let Some((r, _)) = &restart {
        let met = growth(after.settled) <= 64.0 && growth(r.settled) <= 64.0;
        println!(
            "goal (after queuing and after the restart within 64 MiB of the empty server): {}",
            if met { "met" } else { "not met" }
        );
    }
    println!(
        "{{\"mode\":\"offline-memory\",\"database\":{},\"bytes_stored\":{},\"messages\":{},\"mailbox_full\":{},\"seconds\":{secs:.1},\"empty_rss_mib\":{:.1},\"end_rss_mib\":{},\"after_idle_rss_mib\":{:.1},\"after_rss_mib\":{:.1},\"restart_rss_mib\":{},\"restart_secs\":{}}}",
        target.server_db.is_some(),
        queued.bytes,
        queued.messages,
        queued.mailbox_full,
        mib(empty.settled),
        queued.rss_at_end.map_or("null".to_owned(), |r| format!("{:.1}", mib(r))),
        mib(after.idle),
        mib(after.settled),
        restart.as_ref().map_or("null".to_owned(), |(r, _)| format!("{:.1}", mib(r.settled))),
        restart.as_ref().map_or("null".to_owned(), |(_, t)| format!("{:.2}", t.as_secs_f64())),
    );
    Ok(())
}

/// A server's resident memory at rest: once its CPU is idle, and `settle`
/// later.
struct AtRest {
    idle: u64,
    settled: u64,
}

/// Waits for the server to be idle (under 2% of a core for a second, at
/// most 2 minutes), reads its memory, waits `settle`, reads it again;
/// prints both under `label`.
fn memory_at_rest(pid: u32, settle: Duration, label: &str) -> Result<AtRest, String> {
    let started = Instant::now();
    let mut last = ProcessSample::read(pid)?.cpu_secs;
    let mut idle = false;
    while !idle && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_secs(1));
        let cpu = ProcessSample::read(pid)?.cpu_secs;
        idle = cpu - last < 0.02;
        last = cpu;
    }
    let at_idle = ProcessSample::read(pid)?.rss_bytes;
    let waited = started.elapsed();
    std::thread::sleep(settle);
    let settled = ProcessSample::read(pid)?.rss_bytes;
    println!(
        "{label}: {:.1} MiB resident {} ({:.1} s), {:.1} MiB {} s later",
        mib(at_idle),
        if idle {
            "once idle"
        } else {
            "(still busy after 120 s)"
        },
        waited.as_secs_f64(),
        mib(settled),
        settle.as_secs()
    );
    Ok(AtRest {
        idle: at_idle,
        settled,
    })
}

/// Logs in as u0 (an administrator) and asks `debug server` how many
/// offline messages the server holds.
fn queued_offline_messages(addr: SocketAddr) -> Result<u64, String> {
    use std::io::BufRead;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    (&stream)
        .write_all(b"login u0 p0\ndebug server\n")
        .map_err(|e| e.to_string())?;
    let mut reader = io::BufReader::new(&stream);
    let key = "\"queued_offline_messages\":";
    // The hello, the login's ok, then the answer: a few lines at most.
    for _ in 0..16 {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("debug server: {e}")),
        }
        if line.starts_with("{\"type\":\"error\"") {
            return Err(format!("debug server: {}", line.trim_end()));
        }
        if let Some(at) = line.find(key) {
            let digits: String = line[at + key.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let _ = (&stream).write_all(b"logout\n");
            return digits
                .parse()
                .map_err(|_| format!("debug server: unreadable {}", line.trim_end()));
        }
    }
    Err("debug server: no answer".to_owned())
}

/// Files removed when dropped.
struct RemoveOnDrop(Vec<PathBuf>);

impl RemoveOnDrop {
    /// A SQLite database and its write-ahead log files.
    fn database(path: &Path) -> RemoveOnDrop {
        let with = |suffix: &str| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        RemoveOnDrop(vec![path.to_owned(), with("-wal"), with("-shm")])
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The server's default `--offline-queue-bytes`.
const DEFAULT_OFFLINE_QUEUE_BYTES: u64 = 4 * 1024 * 1024;

/// The `--offline-queue-cap` chatbench gives a spawned server (unless
/// `--server-arg` sets one): high enough never to be what is measured.
const OFFLINE_QUEUE_CAP_LIFTED: &str = "1000000000";

/// The most a rate may be: beyond what one load generator can send.
const MAX_RATE: u64 = 1_000_000;

impl MixedArgs {
    /// The load's settings against a server at `addr`.
    fn config(&self, addr: SocketAddr, server_pid: Option<u32>) -> mixed::MixedConfig {
        mixed::MixedConfig {
            addr,
            online_clients: self.online_clients,
            online_rate: self.online_rate,
            store_senders: self.store_senders,
            store_rate: self.store_rate,
            recipients: self.recipients,
            text_bytes: self.text_bytes,
            warmup: Duration::from_secs(self.warmup_secs),
            measure: Duration::from_secs(self.secs),
            server_pid,
        }
    }

    /// Refuses settings that cannot run, or that would hit one of the
    /// server's caps (which would measure the cap, not the server), before
    /// anything starts.
    fn check(&self) -> Result<(), String> {
        for (flag, rate) in [
            ("--store-rate", self.store_rate),
            ("--online-rate", self.online_rate),
        ] {
            if !(1..=MAX_RATE).contains(&rate) {
                return Err(format!(
                    "{flag} {rate}: give 1 to {MAX_RATE} messages a second"
                ));
            }
        }
        if self.online_clients < 2 {
            return Err("--online-clients must be at least 2 (they message each other)".to_owned());
        }
        if self.store_senders < 1 || self.recipients < 1 {
            return Err("--store-senders and --recipients must be at least 1".to_owned());
        }
        if !(1..=3600).contains(&self.secs) || self.warmup_secs > 600 {
            return Err("--secs must be 1 to 3600, --warmup-secs at most 600".to_owned());
        }
        // The frame is `message u<N> ` and the text: keep it well within
        // the server's default frame limit.
        if !(1..=MAX_FRAME_BYTES - 64).contains(&self.text_bytes) {
            return Err(format!(
                "--text-bytes {}: give 1 to {} (a message must fit the server's frame limit, {MAX_FRAME_BYTES} bytes)",
                self.text_bytes,
                MAX_FRAME_BYTES - 64
            ));
        }
        let config = self.config(SocketAddr::from(([127, 0, 0, 1], 0)), None);
        // The text is the padding, or the stamp when that is longer.
        let text = self.text_bytes.max(32) as u64;
        let per_recipient = config.stored_per_recipient();
        let server_limit = |flag: &str, default: u64| {
            server_value(&self.server_args, flag)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(default)
        };
        let too_few = |what: String| {
            Err(format!(
                "{what}: use more --recipients, or a lower --store-rate or shorter run"
            ))
        };
        let queue_bytes = server_limit("--offline-queue-bytes", DEFAULT_OFFLINE_QUEUE_BYTES);
        if per_recipient * text > queue_bytes {
            return too_few(format!(
                "each of {} recipients would be sent up to {per_recipient} messages, {} bytes of text, over the server's --offline-queue-bytes ({queue_bytes})",
                self.recipients,
                per_recipient * text
            ));
        }
        let queue_cap = server_limit(
            "--offline-queue-cap",
            OFFLINE_QUEUE_CAP_LIFTED.parse().unwrap_or(u64::MAX),
        );
        if per_recipient > queue_cap {
            return too_few(format!(
                "each of {} recipients would be sent up to {per_recipient} messages, over the server's --offline-queue-cap ({queue_cap})",
                self.recipients
            ));
        }
        if self.no_db {
            let total = per_recipient * self.recipients as u64 * text;
            let memory = server_limit("--offline-memory-bytes", DEFAULT_OFFLINE_MEMORY_BYTES);
            if total > memory {
                return Err(format!(
                    "--no-db: up to {total} bytes of offline text would be stored, over the server's --offline-memory-bytes ({memory}): use a lower --store-rate or a shorter run"
                ));
            }
        }
        Ok(())
    }
}

/// `chatbench mixed`.
fn mixed(args: &MixedArgs) -> Result<(), String> {
    args.check()?;
    let db = (!args.no_db).then(|| {
        args.server_db.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("chatbench-{}-mixed.db", std::process::id()))
        })
    });
    if let Some(path) = &db {
        // A link to nothing counts as existing too: SQLite would create
        // its target.
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(format!(
                "{} exists; give a new path (chatbench does not reuse old data)",
                path.display()
            ));
        }
    }
    // Declared before the server, so dropped after it: the server is
    // killed before its database files are removed.
    let _db_files = db.as_deref().map(RemoveOnDrop::database);
    let db_args: Vec<OsString> = match &db {
        Some(path) => vec!["--db".into(), path.into()],
        None => vec!["--no-db".into()],
    };
    // The address and process id are the spawned server's, set below.
    let mut config = args.config(SocketAddr::from(([127, 0, 0, 1], 0)), None);
    let credentials = TempFile::write("credentials.txt", &credentials_text(config.users(), 0)?)?;
    let command = ServerCommand::new(
        &args.spawn,
        &args.server_args,
        &credentials.0,
        db_args,
        0,
        &[],
        &[&ADDRESS_LIMITS[..], &TLS_BUDGETS[..]].concat(),
    );
    let server = command.start()?;
    pin(args.pin_cpu)?;
    config.addr = server.addr;
    config.server_pid = Some(server.pid());
    let report = mixed::run(&config)?;
    drop(server);

    let storage = match &db {
        Some(path) => format!(
            "SQLite database {} (WAL, synchronous = FULL)",
            path.display()
        ),
        None => "no database (--no-db)".to_owned(),
    };
    let us = mixed::MixedReport::us;
    let max_us = mixed::MixedReport::max_us;
    let (stored, online) = (&report.stored_latency, &report.online_latency);
    let summary = format!(
        "summary: mixed {}: {:.0} stored/s acknowledged (of {} offered), online p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs; errors {}",
        if db.is_some() { "sqlite" } else { "no-db" },
        report.stored_per_sec(),
        args.store_rate,
        us(online, 0.5),
        us(online, 0.99),
        max_us(online),
        report.error_count(),
    );
    let mut lines = vec![
        format!(
            "mixed: server {}, {storage}; {} s warm-up, {} s measured",
            args.spawn.display(),
            args.warmup_secs,
            args.secs
        ),
        format!(
            "store load: {} messages/s offered by {} senders to {} offline recipients: {} due in the window, {:.0} stored/s acknowledged; due to ok p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            args.store_rate,
            args.store_senders,
            args.recipients,
            report.stored_sent,
            report.stored_per_sec(),
            us(stored, 0.5),
            us(stored, 0.99),
            max_us(stored),
        ),
        format!(
            "online load: {} messages/s among {} users: {} due in the window, {} delivered; latency p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
            args.online_rate,
            args.online_clients,
            report.online_sent,
            report.online_delivered,
            us(online, 0.5),
            us(online, 0.99),
            us(online, 0.999),
            max_us(online),
        ),
    ];
    if let Some(cpu) = report.server_cpu_secs {
        lines.push(format!(
            "server CPU: {:.0}% of one core",
            cpu / report.seconds * 100.0
        ));
    }
    let lag = &report.send_lag;
    lines.push(format!(
        "load generator: messages queued late by p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs{}",
        us(lag, 0.5),
        us(lag, 0.99),
        max_us(lag),
        if us(lag, 0.99) > MIXED_LAG_WARNING_US {
            " (WARNING: it fell behind its schedule, so the latencies include its own delay: is the machine busy?)"
        } else {
            ""
        }
    ));
    if args.json {
        for line in &lines {
            eprintln!("{line}");
        }
        eprintln!("{summary}");
        println!("{}", mixed_json(args, db.is_some(), &report));
    } else {
        for line in &lines {
            println!("{line}");
        }
        println!("{summary}");
    }
    let errors = report.error_count();
    if errors > 0 {
        // Loudly, on stderr whatever --json says, and as a failed exit.
        eprintln!(
            "ERRORS: {errors} requests were not answered as expected ({}); this run's figures do not count",
            report.error_kinds()
        );
        for error in &report.first_errors {
            eprintln!("  {error}");
        }
        if report.errors.contains_key("mailbox_full") {
            eprintln!("  (mailbox_full: the offline queues filled up: use more --recipients)");
        }
        return Err(format!("the mixed run had {errors} errors"));
    }
    Ok(())
}

/// A load generator late by more than this (p99) is said to have fallen
/// behind: its delay then shows in the latencies it reports.
const MIXED_LAG_WARNING_US: f64 = 1000.0;

/// `chatbench mixed --json`: one line.
fn mixed_json(args: &MixedArgs, database: bool, report: &mixed::MixedReport) -> String {
    let us = mixed::MixedReport::us;
    let max_us = mixed::MixedReport::max_us;
    let (stored, online) = (&report.stored_latency, &report.online_latency);
    let kinds = report
        .errors
        .iter()
        .map(|(kind, n)| format!("{}:{n}", json_string(kind)))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "{{\"mode\":\"mixed\",\"server\":{},\"database\":{database},\"seconds\":{:.1},\"warmup_secs\":{},\"store_rate\":{},\"store_senders\":{},\"recipients\":{},\"stored_sent\":{},\"stored_per_sec\":{:.0},\"stored_ack_p50_us\":{:.1},\"stored_ack_p99_us\":{:.1},\"stored_ack_max_us\":{:.1},\"online_rate\":{},\"online_clients\":{},\"online_sent\":{},\"online_delivered\":{},\"online_p50_us\":{:.1},\"online_p99_us\":{:.1},\"online_p999_us\":{:.1},\"online_max_us\":{:.1},\"send_lag_p99_us\":{:.1},\"send_lag_max_us\":{:.1},\"server_cpu_percent\":{},\"errors\":{},\"error_kinds\":{{{kinds}}}}}",
        json_string(&args.spawn.to_string_lossy()),
        report.seconds,
        args.warmup_secs,
        args.store_rate,
        args.store_senders,
        args.recipients,
        report.stored_sent,
        report.stored_per_sec(),
        us(stored, 0.5),
        us(stored, 0.99),
        max_us(stored),
        args.online_rate,
        args.online_clients,
        report.online_sent,
        report.online_delivered,
        us(online, 0.5),
        us(online, 0.99),
        us(online, 0.999),
        max_us(online),
        us(&report.send_lag, 0.99),
        max_us(&report.send_lag),
        report
            .server_cpu_secs
            .map_or("null".to_owned(), |cpu| format!("{:.1}", cpu / report.seconds * 100.0)),
        report.error_count(),
    )
}

/// `text` as a JSON string, quoted and escaped.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// How long a flood may go on past its run's measurement, at most: the
/// load's logins (up to 120 s) and its wait for stragglers.
const FLOOD_ALLOWANCE: Duration = Duration::from_secs(130);

/// `chatbench tls-flood`.
fn tls_flood(args: &TlsFloodArgs) -> Result<(), String> {
    if !args.source.is_loopback() {
        return Err(format!(
            "--source {}: not a loopback address (chatbench sends nothing off this machine)",
            args.source
        ));
    }
    if !(1..=100_000).contains(&args.rate) || args.secs < 1 || args.max_open < 1 {
        return Err("--rate must be 1 to 100000, --secs and --max-open at least 1".to_owned());
    }
    let hello = tls_flood::client_hello()?;
    let flood_config = |target: SocketAddr, duration: Duration| tls_flood::FloodConfig {
        target,
        source: args.source,
        rate: args.rate,
        duration,
        read_wait: Duration::from_millis(args.read_ms.clamp(1, 10_000)),
        max_open: args.max_open,
    };
    let Some(binary) = &args.spawn else {
        if !args.tls_addr.ip().is_loopback() {
            return Err(format!(
                "--tls-addr {}: not a loopback address (chatbench sends nothing off this machine)",
                args.tls_addr
            ));
        }
        let stop = AtomicBool::new(false);
        let report = tls_flood::flood(
            &flood_config(args.tls_addr, Duration::from_secs(args.secs)),
            &hello,
            &stop,
        )?;
        println!(
            "tls-flood from {} to {}: {}",
            args.source,
            args.tls_addr,
            report.summary()
        );
        return Ok(());
    };
    if args.clients < 2 || args.rounds < 1 || args.load_rate < 1 {
        return Err("--clients must be at least 2, --rounds and --load-rate at least 1".to_owned());
    }
    let generated;
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let (cert, key) = tls_flood::rsa_certificate()?;
            // A throwaway key for a loopback benchmark, removed at the end.
            generated = (
                TempFile::write("cert.pem", &cert)?,
                TempFile::write("key.pem", &key)?,
            );
            (generated.0 .0.clone(), generated.1 .0.clone())
        }
    };
    let credentials = TempFile::write("credentials.txt", &credentials_text(args.clients, 0)?)?;
    let command = ServerCommand::new(
        binary,
        &args.server_args,
        &credentials.0,
        vec!["--no-db".into()],
        0,
        &[
            ("--tls-cert", cert.into()),
            ("--tls-key", key.into()),
            ("--tls-listen", "127.0.0.1:0".into()),
        ],
        // The direct load's clients all come from 127.0.0.1; the TLS
        // budgets, what is measured, keep their defaults.
        &ADDRESS_LIMITS,
    );
    let server = command.start()?;
    let tls_addr = server
        .tls_addr
        .ok_or("the server did not say its TLS address")?;
    let budget = |flag| server_value(&args.server_args, flag).unwrap_or("default".to_owned());
    println!(
        "server: plaintext {}, TLS {} ({}); --tls-handshakes-per-ip {}, --tls-handshakes {}",
        server.addr,
        tls_addr,
        if args.tls_cert.is_some() {
            "the given certificate"
        } else {
            "an RSA-2048 certificate"
        },
        budget("--tls-handshakes-per-ip"),
        budget("--tls-handshakes"),
    );
    let load_config = LoadConfig {
        addrs: vec![server.addr],
        cross_node: false,
        cpu_of: Vec::new(),
        clients: args.clients,
        workload: Workload::Direct,
        window: 4,
        text_bytes: 64,
        warmup: Duration::from_secs(args.warmup_secs),
        measure: Duration::from_secs(args.secs),
        rate: Some(args.load_rate),
        server_pid: Some(server.pid()),
        login_storm: 0,
        websocket: false,
    };
    let mut p99 = [Vec::new(), Vec::new()];
    for round in 1..=args.rounds {
        for flooded in [false, true] {
            let stop = Arc::new(AtomicBool::new(false));
            let flood = flooded.then(|| {
                let config = flood_config(
                    tls_addr,
                    load_config.warmup + load_config.measure + FLOOD_ALLOWANCE,
                );
                let (stop, hello) = (stop.clone(), hello.clone());
                std::thread::spawn(move || tls_flood::flood(&config, &hello, &stop))
            });
            let load = load::run(load_config.clone());
            stop.store(true, Ordering::Relaxed);
            let flood = flood
                .map(|thread| thread.join().map_err(|_| "the flood thread panicked"))
                .transpose()?
                .transpose()?;
            let report = load?;
            let condition = if flooded { "with the flood" } else { "quiet" };
            println!("round {round}, {condition}:");
            report.print(&load_config);
            if let Some(flood) = flood {
                println!("flood: {}", flood.summary());
            }
            p99[usize::from(flooded)].push(report.latency.value_at_quantile(0.99) as f64 / 1000.0);
            // Let the flood's leftovers (sockets closing) clear before the
            // next run.
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (quiet, flooded) = (median(&p99[0]), median(&p99[1]));
    println!(
        "p99 latency, quiet: {} µs (median {quiet:.0} µs); with the flood: {} µs (median {flooded:.0} µs); ratio {:.2}",
        list(&p99[0]),
        list(&p99[1]),
        flooded / quiet
    );
    println!(
        "{{\"mode\":\"tls-flood\",\"flood_rate\":{},\"tls_handshakes_per_ip\":\"{}\",\"tls_handshakes\":\"{}\",\"rounds\":{},\"quiet_p99_us\":[{}],\"flood_p99_us\":[{}],\"quiet_median_p99_us\":{quiet:.0},\"flood_median_p99_us\":{flooded:.0},\"ratio\":{:.2}}}",
        args.rate,
        budget("--tls-handshakes-per-ip"),
        budget("--tls-handshakes"),
        args.rounds,
        list(&p99[0]),
        list(&p99[1]),
        flooded / quiet
    );
    Ok(())
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// `chatbench login-timing`.
fn login_timing(target: &Target, count: usize, warmup: usize, hashed: usize) -> Result<(), String> {
    if count < 1 {
        return Err("--count must be at least 1".to_owned());
    }
    let accounts = count + warmup;
    with_server(target, accounts, hashed, |addr, _| {
        let timings = login_timing::run(&login_timing::TimingConfig {
            addr,
            count,
            warmup,
            // Without --spawn the server's accounts are the caller's
            // business (`chatbench credentials` writes u<i> p<i>).
            accounts: if target.spawn.is_some() {
                accounts
            } else {
                usize::MAX
            },
        })?;
        match (&target.spawn, hashed) {
            (None, _) => println!(
                "login-timing: {count} failed logins of each kind against {addr}, one at a time (after {warmup} of each unmeasured)"
            ),
            (Some(_), 0) => println!(
                "login-timing: {count} failed logins of each kind, one at a time (after {warmup} of each unmeasured); {accounts} plaintext accounts, none hashed"
            ),
            (Some(_), _) => println!(
                "login-timing: {count} failed logins of each kind, one at a time (after {warmup} of each unmeasured); {accounts} plaintext accounts and {hashed} Argon2id-hashed ones"
            ),
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let show = |name: &str, times: &[Duration]| {
            println!(
                "{name}: p10 {:.3} ms, median {:.3} ms, p90 {:.3} ms, max {:.3} ms",
                ms(login_timing::quantile(times, 0.1)),
                ms(login_timing::quantile(times, 0.5)),
                ms(login_timing::quantile(times, 0.9)),
                ms(login_timing::quantile(times, 1.0)),
            );
        };
        show(
            "wrong password (plaintext account)",
            &timings.wrong_password,
        );
        show("unknown name", &timings.unknown_name);
        let wrong = ms(login_timing::quantile(&timings.wrong_password, 0.5));
        let unknown = ms(login_timing::quantile(&timings.unknown_name, 0.5));
        let difference = (unknown - wrong) / wrong * 100.0;
        println!(
            "medians: the unknown name's is {difference:+.1}% of the wrong password's ({})",
            if difference.abs() < 10.0 {
                "under 10% apart"
            } else {
                "10% or more apart"
            }
        );
        let q = |times: &[Duration], p| format!("{:.3}", ms(login_timing::quantile(times, p)));
        println!(
            "{{\"mode\":\"login-timing\",\"count\":{count},\"hashed_accounts\":{hashed},\"wrong_password_ms\":{{\"p10\":{},\"p50\":{},\"p90\":{}}},\"unknown_name_ms\":{{\"p10\":{},\"p50\":{},\"p90\":{}}},\"median_difference_percent\":{difference:.1}}}",
            q(&timings.wrong_password, 0.1),
            q(&timings.wrong_password, 0.5),
            q(&timings.wrong_password, 0.9),
            q(&timings.unknown_name, 0.1),
            q(&timings.unknown_name, 0.5),
            q(&timings.unknown_name, 0.9),
        );
        Ok(())
    })
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

/// Whether `server_args` sets `flag`, as `--flag VALUE` or `--flag=VALUE`.
fn sets(server_args: &[OsString], flag: &str) -> bool {
    server_value(server_args, flag).is_some()
}

/// The value `server_args` gives `flag` (`--flag VALUE` or `--flag=VALUE`;
/// empty for a switch).
fn server_value(server_args: &[OsString], flag: &str) -> Option<String> {
    let args: Vec<_> = server_args.iter().map(|a| a.to_string_lossy()).collect();
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == flag {
            Some(args.get(i + 1).map_or(String::new(), |v| v.to_string()))
        } else {
            arg.strip_prefix(flag)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        }
    })
}

/// `limits`, each turned off (set to 0) unless `server_args` sets it.
fn limits_off(server_args: &[OsString], limits: &[&str]) -> Vec<String> {
    limits
        .iter()
        .filter(|flag| !sets(server_args, flag))
        .flat_map(|flag| [flag.to_string(), "0".to_owned()])
        .collect()
}

/// A credentials file's text: `users` plaintext accounts `u<i>` with
/// password `p<i>`, and `hashed` Argon2id-hashed accounts `s<j>`.
fn credentials_text(users: usize, hashed: usize) -> Result<String, String> {
    let mut text: String = (0..users).map(|i| format!("u{i} p{i}\n")).collect();
    if hashed > 0 {
        let hash = storm_hash()?;
        text.extend((0..hashed).map(|j| format!("s{j} {hash}\n")));
    }
    Ok(text)
}

/// A file chatbench wrote in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn write(name: &str, contents: &str) -> Result<TempFile, String> {
        // The process id keeps concurrent runs apart.
        let path = std::env::temp_dir().join(format!("chatbench-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How to start a server: its binary and every argument, kept so that it
/// can be started again the same way.
struct ServerCommand {
    binary: PathBuf,
    args: Vec<OsString>,
}

impl ServerCommand {
    /// The server on a free loopback port, with `credentials`, the database
    /// arguments `db_args`, `hashed` hashed accounts among the credentials,
    /// the mode's own `extra` flags, `server_args`, and `limits` off.
    /// Chatbench's choices give way to a flag `server_args` sets.
    fn new(
        binary: &Path,
        server_args: &[OsString],
        credentials: &Path,
        db_args: Vec<OsString>,
        hashed: usize,
        extra: &[(&str, OsString)],
        limits: &[&str],
    ) -> ServerCommand {
        // The server's limits that would cut a measurement short are
        // lifted: the rate limit, the output a fast sender may pile up, and
        // the offline queue cap (1,000 a recipient by default, which
        // `offline` fills within seconds: every message would then be
        // refused `mailbox_full`).
        let mut defaults: Vec<(&str, Option<OsString>)> = vec![
            ("--listen", Some("127.0.0.1:0".into())),
            ("--no-rate-limit", None),
            ("--max-output-bytes", Some("268435456".into())),
            ("--offline-queue-cap", Some(OFFLINE_QUEUE_CAP_LIFTED.into())),
        ];
        if hashed > 0 {
            // Wrong passwords for hashed accounts must keep costing a hash
            // check, not hit a lock, on connections that never log in.
            defaults.push(("--lockout-attempts", Some("4000000000".into())));
            defaults.push(("--login-timeout-secs", Some("0".into())));
        }
        defaults.extend(
            extra
                .iter()
                .map(|(flag, value)| (*flag, Some(value.clone()))),
        );
        let mut args: Vec<OsString> = Vec::new();
        for (flag, value) in defaults {
            if !sets(server_args, flag) {
                args.push(flag.into());
                args.extend(value);
            }
        }
        args.push("--credentials".into());
        args.push(credentials.into());
        args.extend(db_args);
        args.extend(server_args.iter().cloned());
        // Every load client comes from one loopback address: the limits
        // are off, unless --server-arg sets one.
        args.extend(
            limits_off(server_args, limits)
                .into_iter()
                .map(OsString::from),
        );
        ServerCommand {
            binary: binary.to_owned(),
            args,
        }
    }

    /// Starts the server and waits until it listens.
    fn start(&self) -> Result<Spawned, String> {
        let started = Instant::now();
        let mut child = std::process::Command::new(&self.binary)
            .args(&self.args)
            // Connection logs off: the measurement is of the server, not
            // of its log volume.
            .env("RUST_LOG", "warn,chatserver=info,chatserver::reactor=warn")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            // Lines go to the channel until the server listens; after
            // that, its warnings and errors go to our stderr, and the rest
            // is read and dropped so that the server never blocks on a
            // full pipe.
            let mut listening = false;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if listening {
                    if line.contains(" WARN ") || line.contains(" ERROR ") {
                        eprintln!("chatserver: {line}");
                    }
                    continue;
                }
                listening = line.contains("listening on ");
                let _ = tx.send(line);
            }
        });
        let deadline = started + SERVER_START_TIMEOUT;
        let mut said = Vec::new();
        let line = loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains("listening on ") => break line,
                Ok(line) => said.push(line),
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait().map_or(String::new(), |s| format!(" ({s})"));
                    let what = match e {
                        std::sync::mpsc::RecvTimeoutError::Timeout => {
                            format!("did not start within {} s", SERVER_START_TIMEOUT.as_secs())
                        }
                        std::sync::mpsc::RecvTimeoutError::Disconnected => {
                            format!("exited{status}")
                        }
                    };
                    let tail = said.len().saturating_sub(10);
                    return Err(format!(
                        "the spawned server {what}; it said:\n{}",
                        said[tail..].join("\n")
                    ));
                }
            }
        };
        let word_after = |key: &str| {
            line.find(key).map(|at| {
                line[at + key.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
            })
        };
        let parse = |text: &str| {
            text.parse::<SocketAddr>()
                .map_err(|_| format!("the server printed an unreadable address {text:?}"))
        };
        let addr = parse(word_after("listening on ").unwrap_or(""))?;
        let tls_addr = word_after("TLS on ").map(parse).transpose()?;
        Ok(Spawned {
            child,
            addr,
            tls_addr,
            startup: started.elapsed(),
        })
    }
}

/// How long a spawned server may take to listen (it loads its database
/// first).
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(120);

/// A server chatbench started; killed when dropped.
struct Spawned {
    child: std::process::Child,
    /// Its --listen address.
    addr: SocketAddr,
    /// Its --tls-listen address, if any.
    tls_addr: Option<SocketAddr>,
    /// From starting it to its saying it listens.
    startup: Duration,
}

impl Spawned {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server as an operator would (SIGTERM) and waits for it to
    /// exit, up to `within`; returns how long it took.
    fn terminate(&mut self, within: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        send_sigterm(self.child.id())?;
        while started.elapsed() < within {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(started.elapsed()),
                Ok(Some(status)) => {
                    return Err(format!("the server exited with {status} on SIGTERM"))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("waiting for the server: {e}")),
            }
        }
        Err(format!(
            "the server did not stop within {} s of SIGTERM",
            within.as_secs()
        ))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Exited already (terminated): only reaped.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[cfg(unix)]
fn send_sigterm(pid: u32) -> Result<(), String> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| format!("process id {pid} out of range"))?;
    // SAFETY: kill(2) touches no memory of ours; `pid` is our child, not
    // yet waited for, so the id is not anyone else's.
    #[allow(unsafe_code)]
    let result = unsafe { libc::kill(pid, libc::SIGTERM) };
    if result != 0 {
        return Err(format!(
            "cannot send SIGTERM to the server: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn send_sigterm(_pid: u32) -> Result<(), String> {
    Err("stopping the server with SIGTERM needs a Unix system".to_owned())
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
    with_server_on(target, users, storm, false, f)
}

/// [`with_server`], where a spawned server also serves `--http` if `http`
/// (on a port chosen here), and `f` gets that address instead.
fn with_server_on(
    target: &Target,
    users: usize,
    storm: usize,
    http: bool,
    f: impl FnOnce(SocketAddr, Option<u32>) -> Result<(), String>,
) -> Result<(), String> {
    let db_args = target.server_db_args()?;
    let Some(binary) = &target.spawn else {
        pin(target.pin_cpu)?;
        return f(target.addr[0], target.server_pid);
    };
    let credentials = TempFile::write("credentials.txt", &credentials_text(users, storm)?)?;
    // A port free a moment ago (the server's log names it only after the
    // line chatbench waits for).
    let http_addr = match http {
        true => Some(
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("no free port for --http: {e}"))?,
        ),
        false => None,
    };
    let extra: Vec<(&str, OsString)> = http_addr
        .iter()
        .map(|addr| ("--http", OsString::from(addr.to_string())))
        .collect();
    let command = ServerCommand::new(
        binary,
        &target.server_args,
        &credentials.0,
        db_args,
        storm,
        &extra,
        &[&ADDRESS_LIMITS[..], &TLS_BUDGETS[..]].concat(),
    );
    // Dropped (killed) before `credentials` is removed.
    let server = command.start()?;
    pin(target.pin_cpu)?;
    f(http_addr.unwrap_or(server.addr), Some(server.pid()))
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

    #[test]
    fn new_modes_and_their_defaults() {
        let Mode::OfflineMemory { target, args } = parse(&["offline-memory"]).unwrap().command
        else {
            panic!("not the offline-memory mode");
        };
        assert_eq!(args.bytes, 1 << 30);
        assert_eq!(args.recipients, 1000);
        assert_eq!(args.text_bytes, 16_000);
        assert!(!args.keep_db);
        // It needs a server of its own.
        let err = offline_memory(&target, &args).unwrap_err();
        assert!(err.contains("needs --spawn"), "{err}");

        let Mode::TlsFlood { args } = parse(&["tls-flood"]).unwrap().command else {
            panic!("not the tls-flood mode");
        };
        assert_eq!(args.rate, 1200);
        assert_eq!(args.source, IpAddr::from([127, 0, 0, 2]));
        assert_eq!(args.rounds, 3);
        assert_eq!(args.clients, 100);
        assert_eq!(args.load_rate, 5000);
        // Off-machine addresses are refused before anything is sent.
        let Mode::TlsFlood { args } = parse(&["tls-flood", "--tls-addr", "192.0.2.1:443"])
            .unwrap()
            .command
        else {
            panic!("not the tls-flood mode");
        };
        let err = tls_flood(&args).unwrap_err();
        assert!(err.contains("not a loopback address"), "{err}");
        let Mode::TlsFlood { args } = parse(&["tls-flood", "--source", "192.0.2.1"])
            .unwrap()
            .command
        else {
            panic!("not the tls-flood mode");
        };
        assert!(tls_flood(&args).is_err());
        // A certificate needs its key.
        assert!(parse(&["tls-flood", "--tls-cert", "c.pem"]).is_err());

        let Mode::LoginTiming {
            count,
            warmup,
            hashed,
            all_plaintext,
            ..
        } = parse(&["login-timing", "--all-plaintext"]).unwrap().command
        else {
            panic!("not the login-timing mode");
        };
        assert_eq!((count, warmup, hashed, all_plaintext), (200, 10, 10, true));

        let Mode::Logins {
            target,
            online,
            workers,
            secs,
            warmup_secs,
        } = parse(&["logins", "--addr", "127.0.0.1:4000,127.0.0.1:4001"])
            .unwrap()
            .command
        else {
            panic!("not the logins mode");
        };
        assert_eq!((online, workers, secs, warmup_secs), (100, 32, 10, 2));
        assert_eq!(target.addr.len(), 2);
        let err = logins_run(&target, 10, 0, 1, 0).unwrap_err();
        assert!(err.contains("--workers"), "{err}");
    }

    fn mixed_args(args: &[&str]) -> Result<MixedArgs, String> {
        let mut all = vec!["mixed"];
        all.extend_from_slice(args);
        match parse(&all)?.command {
            Mode::Mixed { args } => Ok(args),
            other => panic!("not the mixed mode: {other:?}"),
        }
    }

    #[test]
    fn mixed_mode_defaults_and_flags() {
        let args = mixed_args(&["--server-bin", "/tmp/chatserver-old"]).unwrap();
        assert_eq!(args.spawn, PathBuf::from("/tmp/chatserver-old"));
        assert_eq!((args.store_rate, args.online_rate), (20_000, 5_000));
        assert_eq!(
            (args.store_senders, args.online_clients, args.recipients),
            (250, 100, 1000)
        );
        assert_eq!((args.warmup_secs, args.secs, args.text_bytes), (2, 10, 64));
        assert!(!args.no_db && !args.json && args.server_db.is_none());
        args.check().unwrap();
        // Each store sender stays within the server's default rate limit
        // (100 frames/s), should it be on.
        assert!(args.store_rate / args.store_senders as u64 <= 100);

        let args = mixed_args(&[
            "--spawn",
            "new",
            "--no-db",
            "--json",
            "--secs",
            "5",
            "--store-rate",
            "1000",
            "--online-rate=500",
            "--server-arg=--verify-threads=1",
        ])
        .unwrap();
        assert!(args.no_db && args.json);
        assert_eq!(
            (args.secs, args.store_rate, args.online_rate),
            (5, 1000, 500)
        );
        assert_eq!(args.server_args, [OsString::from("--verify-threads=1")]);
        args.check().unwrap();

        // The server is required, and a database path contradicts --no-db.
        assert!(mixed_args(&[]).is_err());
        let err = mixed_args(&["--spawn", "s", "--no-db", "--server-db", "x.db"]).unwrap_err();
        assert!(err.contains("cannot be used with"), "{err}");
        assert!(mixed_args(&["--spawn", "s", "--store-rate", "-5"]).is_err());
    }

    #[test]
    fn mixed_mode_refuses_what_cannot_be_measured() {
        let check = |extra: &[&str]| {
            let mut args = vec!["--spawn", "s"];
            args.extend_from_slice(extra);
            mixed_args(&args).unwrap().check()
        };
        let refused = |extra: &[&str], wanted: &str| {
            let err = check(extra).unwrap_err();
            assert!(err.contains(wanted), "{extra:?}: {err}");
        };
        refused(&["--store-rate", "0"], "--store-rate 0");
        refused(&["--online-rate", "2000000"], "--online-rate 2000000");
        refused(&["--online-clients", "1"], "--online-clients");
        refused(&["--store-senders", "0"], "--store-senders");
        refused(&["--recipients", "0"], "--recipients");
        refused(&["--secs", "0"], "--secs");
        refused(&["--text-bytes", "0"], "--text-bytes 0");
        refused(&["--text-bytes", "16384"], "frame limit");
        // 20,000/s for 12 s over 10 recipients, 1,000 bytes each: 24 MB a
        // queue, over the 4 MiB default.
        refused(
            &["--recipients", "10", "--text-bytes", "1000"],
            "--offline-queue-bytes (4194304)",
        );
        // A cap set for the server counts.
        refused(
            &["--server-arg=--offline-queue-cap=100"],
            "--offline-queue-cap (100)",
        );
        refused(
            &[
                "--server-arg",
                "--offline-queue-bytes",
                "--server-arg",
                "1000",
            ],
            "--offline-queue-bytes (1000)",
        );
        refused(
            &["--no-db", "--server-arg=--offline-memory-bytes=1000000"],
            "--offline-memory-bytes (1000000)",
        );
        // The same load with a database keeps texts on disk.
        check(&["--server-arg=--offline-memory-bytes=1000000"]).unwrap();
        // Enough recipients make room.
        check(&["--recipients", "100", "--text-bytes", "1000"]).unwrap();
    }

    #[test]
    fn mixed_json_is_one_parsable_line() {
        let args = mixed_args(&["--spawn", "/tmp/a \"quoted\" path"]).unwrap();
        let mut latency =
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        latency.record(150_000).unwrap();
        let report = mixed::MixedReport {
            seconds: 10.0,
            stored_sent: 200_000,
            stored_acked: 199_000,
            stored_latency: latency.clone(),
            online_sent: 50_000,
            online_delivered: 50_000,
            online_latency: latency.clone(),
            send_lag: latency,
            server_cpu_secs: Some(5.0),
            errors: [("mailbox_full".to_owned(), 3)].into_iter().collect(),
            first_errors: Vec::new(),
        };
        let line = mixed_json(&args, true, &report);
        assert!(!line.contains('\n'));
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["mode"], "mixed");
        assert_eq!(json["server"], "/tmp/a \"quoted\" path");
        assert_eq!(json["database"], true);
        assert_eq!(json["stored_per_sec"], 19_900);
        assert_eq!(json["online_delivered"], 50_000);
        assert_eq!(json["online_p99_us"].as_f64().map(f64::round), Some(150.0));
        assert_eq!(json["server_cpu_percent"], 50.0);
        assert_eq!(
            json["send_lag_p99_us"].as_f64().map(f64::round),
            Some(150.0)
        );
        assert_eq!(json["errors"], 3);
        assert_eq!(json["error_kinds"]["mailbox_full"], 3);
        assert_eq!(report.error_kinds(), "mailbox_full 3");
        assert_eq!(json_string("a\\b\u{1}"), "\"a\\\\b\\u0001\"");
    }

    #[test]
    fn server_args_override_chatbenchs_choices() {
        let server_args: Vec<OsString> = [
            "--offline-queue-cap",
            "5",
            "--tls-handshakes=0",
            "--no-rate-limit",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(
            server_value(&server_args, "--offline-queue-cap").as_deref(),
            Some("5")
        );
        assert_eq!(
            server_value(&server_args, "--tls-handshakes").as_deref(),
            Some("0")
        );
        // A prefix of another flag is not that flag.
        assert!(!sets(&server_args, "--tls-handshake"));
        assert!(!sets(&server_args, "--offline-queue-bytes"));

        let command = ServerCommand::new(
            Path::new("chatserver"),
            &server_args,
            Path::new("creds.txt"),
            vec!["--no-db".into()],
            0,
            &[("--offline-queue-bytes", "9".into())],
            &[&ADDRESS_LIMITS[..], &TLS_BUDGETS[..]].concat(),
        );
        let args: Vec<String> = command
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let count = |flag: &str| {
            args.iter()
                .filter(|a| *a == flag || a.starts_with(&format!("{flag}=")))
                .count()
        };
        // Each flag once: the server refuses a repeated one.
        for flag in [
            "--offline-queue-cap",
            "--tls-handshakes",
            "--no-rate-limit",
            "--offline-queue-bytes",
            "--tls-handshakes-per-ip",
            "--login-rate-per-name",
            "--listen",
        ] {
            assert_eq!(count(flag), 1, "{flag} in {args:?}");
        }
        let at = args
            .iter()
            .position(|a| a == "--offline-queue-cap")
            .unwrap();
        assert_eq!(args[at + 1], "5");
        let at = args
            .iter()
            .position(|a| a == "--offline-queue-bytes")
            .unwrap();
        assert_eq!(args[at + 1], "9");
    }

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let times: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(
            login_timing::quantile(&times, 0.5),
            Duration::from_millis(5)
        );
        assert_eq!(
            login_timing::quantile(&times, 0.1),
            Duration::from_millis(1)
        );
        assert_eq!(
            login_timing::quantile(&times, 0.9),
            Duration::from_millis(9)
        );
        assert_eq!(
            login_timing::quantile(&times, 1.0),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn the_recorded_client_hello_is_a_tls_handshake_record() {
        let hello = tls_flood::client_hello().unwrap();
        // A handshake record (22) whose first message is a ClientHello (1).
        assert_eq!(hello[0], 0x16);
        assert_eq!(hello[5], 0x01);
        let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
        assert_eq!(hello.len(), 5 + len);
        assert!(contains(&hello, b"localhost"));
    }

    /// The flood against a listener that closes every connection at once,
    /// as the server does past its handshake budget.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_flood_comes_from_its_source_address_at_its_rate() {
        use std::sync::atomic::AtomicUsize;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let target = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let from_source = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stop, from_source) = (stop.clone(), from_source.clone());
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(20);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            if peer.ip() == IpAddr::from([127, 0, 0, 2]) {
                                from_source.fetch_add(1, Ordering::Relaxed);
                            }
                            drop(stream);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            })
        };
        let hello = tls_flood::client_hello().unwrap();
        let report = tls_flood::flood(
            &tls_flood::FloodConfig {
                target,
                source: IpAddr::from([127, 0, 0, 2]),
                rate: 200,
                duration: Duration::from_secs(1),
                read_wait: Duration::from_millis(500),
                max_open: 1000,
            },
            &hello,
            &AtomicBool::new(false),
        )
        .unwrap();
        stop.store(true, Ordering::Relaxed);
        acceptor.join().unwrap();
        assert_eq!(report.started, 200, "{report:?}");
        assert_eq!(report.answered, 0, "{report:?}");
        assert_eq!(
            report.closed_at_once + report.unanswered + report.failed,
            200,
            "{report:?}"
        );
        assert!(report.closed_at_once >= 190, "{report:?}");
        assert_eq!(from_source.load(Ordering::Relaxed), 200);
    }
}
