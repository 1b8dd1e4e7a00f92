//! The command line: flags, the assignment-style positional form, and the
//! settings they make.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use chatproto::{OfflineTexts, Rate, RateLimit, ServerConfig, Username};
use clap::Parser;

use crate::bus::BusUrl;
use crate::database::Location;
use crate::origin::{Origin, PublicHost};
use crate::reactor::Limits;

/// Serves the chatproto instant-messaging protocol over TCP.
///
/// Also accepts the positional form `chatserver PORT BLOCK_DURATION TIMEOUT`:
/// listen on 127.0.0.1:PORT, lock accounts for BLOCK_DURATION seconds, and
/// time idle connections out after TIMEOUT seconds.
#[derive(Debug, Parser)]
#[command(name = "chatserver", version, after_help = AFTER_HELP)]
pub struct Args {
    /// Address to listen on (IPv4 or IPv6; port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Accounts file: one `username password` a line; blank lines and
    /// `#` comments are allowed.
    #[arg(long, value_name = "FILE", default_value = "credentials.txt")]
    credentials: PathBuf,

    /// Consecutive failed logins that lock a user name.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    lockout_attempts: u32,

    /// How long a lock lasts, in seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    lockout_secs: Option<u64>,

    /// Close connections that send nothing for this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_secs: Option<u64>,

    /// Largest frame (line) accepted, in bytes.
    #[arg(long, value_name = "N", default_value_t = chatproto::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,

    /// Most open connections; more are accepted and closed with `bye`
    /// reason `server_full`. Default: what the open-file limit allows.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,

    /// A user allowed `debug server` (repeatable).
    #[arg(long = "admin", value_name = "USER")]
    admins: Vec<Username>,

    /// Unsent output a connection may pile up before it is cut off as a
    /// slow consumer, in bytes.
    #[arg(long, value_name = "N", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    max_output_bytes: u64,

    /// Most messages one user's offline queue holds.
    #[arg(long, value_name = "N", default_value_t = chatproto::offline::DEFAULT_OFFLINE_QUEUE_CAPACITY)]
    offline_queue_cap: usize,

    /// Most bytes of text one user's offline queue holds; past it a sender
    /// gets `mailbox_full`.
    #[arg(long, value_name = "N", default_value_t = chatproto::offline::DEFAULT_OFFLINE_QUEUE_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    offline_queue_bytes: usize,

    /// Without a database (--no-db): most bytes of text all offline queues
    /// hold together in memory; past it a sender gets `mailbox_full`. With a
    /// database the texts are on disk and only the per-user caps apply.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_OFFLINE_MEMORY_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    offline_memory_bytes: usize,

    /// Frames a connection may send at once after a quiet spell.
    #[arg(long, value_name = "N", default_value_t = RateLimit::default().burst, value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit_burst: u32,

    /// Frames a second a connection may send, sustained.
    #[arg(long, value_name = "N", default_value_t = RateLimit::default().per_second, value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit_per_sec: u32,

    /// Frames refused in a row, past the rate limit, after which a
    /// connection is closed with `bye flood` (0: never).
    #[arg(long, value_name = "N", default_value_t = RateLimit::default().flood_after)]
    flood_after: u32,

    /// Bytes of frames a second a connection may send, sustained, beside
    /// the frame rate (0: no byte limit). Bursts of up to 4 seconds' worth
    /// (and at least one frame of the largest size) pass at once.
    #[arg(long, value_name = "N", default_value_t = Rate::BYTES_PER_CONNECTION.per_second)]
    rate_limit_bytes_per_sec: u32,

    /// Turn the per-connection rate limits (frames and bytes) off.
    #[arg(long, conflicts_with_all = ["rate_limit_burst", "rate_limit_per_sec", "flood_after", "rate_limit_bytes_per_sec"])]
    no_rate_limit: bool,

    /// Close connections that have not logged in this many seconds after
    /// connecting (0: never; the idle timeout still applies).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    login_timeout_secs: u64,

    /// Most open connections from one client address (an IPv6 /64 counts
    /// as one); more are accepted and closed with `bye` reason
    /// `too_many_connections` (0: no limit). Behind a TCP load balancer that
    /// hides client addresses, set this and the other per-address limits to
    /// 0.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_connections_per_ip: u32,

    /// Most connections not yet logged in, in percent of --max-connections;
    /// more are accepted and closed with `bye` reason `server_full` (0: no
    /// limit).
    #[arg(long, value_name = "PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    max_unauthenticated_percent: u8,

    /// Password checks waiting at most per client address; more logins are
    /// answered `unavailable` (0: no limit besides the 64 overall).
    #[arg(long, value_name = "N", default_value_t = 8)]
    max_pending_checks_per_ip: u32,

    /// Login attempts a second from one client address, sustained, with
    /// bursts of twice that; more are answered `rate_limited` (0: no limit).
    #[arg(long, value_name = "N", default_value_t = Rate::LOGINS_PER_PEER.per_second)]
    login_rate_per_ip: u32,

    /// Login attempts a second for one user name (account or not),
    /// sustained, with bursts of 5 times that; more are answered
    /// `rate_limited` (0: no limit).
    #[arg(long, value_name = "N", default_value_t = Rate::LOGINS_PER_NAME.per_second)]
    login_rate_per_name: u32,

    /// User names (accounts or not) whose failed logins are tracked at
    /// once; while the table is full, a login for a name not in it is
    /// answered `unavailable`.
    #[arg(long, value_name = "N", default_value_t = chatproto::LockoutPolicy::default().max_tracked_names, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_tracked_names: usize,

    /// A connection whose unsent output stays above --max-output-bytes this
    /// long is cut off as a slow consumer (it is cut off at once past 4
    /// times --max-output-bytes).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    slow_consumer_secs: u64,

    /// TCP keepalive on every connection: probes start after this many idle
    /// seconds and are sent every third of it, 3 unanswered ones end the
    /// connection (0: the system's default).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    tcp_keepalive_secs: u64,

    /// TCP_USER_TIMEOUT on every connection (Linux): data unacknowledged
    /// this long ends the connection (0: the system's default).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    tcp_user_timeout_secs: u64,

    /// TLS handshakes a second one client address may start, with bursts of
    /// twice that; past it a new TLS connection is closed at once (0: no
    /// limit). Handshakes run on the event loop: an RSA-2048 one takes it
    /// about 0.7 ms, an ECDSA one a fraction of that.
    #[arg(long, value_name = "N", default_value_t = 5)]
    tls_handshakes_per_ip: u32,

    /// TLS handshakes a second all clients together may start, with bursts
    /// of twice that; past it a new TLS connection is closed at once (0: no
    /// limit).
    #[arg(long, value_name = "N", default_value_t = 100)]
    tls_handshakes: u32,

    /// The database that keeps offline messages, blocks, last-seen times
    /// and locks across restarts: a SQLite file (created if missing), or a
    /// PostgreSQL database, given as a libpq connection string (a value
    /// starting with postgres:// or postgresql://, or holding dbname= or
    /// host=). The schema is created or updated at start-up. `:memory:`
    /// keeps nothing, like --no-db.
    #[arg(long, value_name = "PATH|URL", default_value = "chatserver.db")]
    db: PathBuf,

    /// Keep all state in memory only: a restart forgets it (tests, demos).
    #[arg(long, conflicts_with = "db")]
    no_db: bool,

    /// Join a cluster: this node and every other started with the same
    /// PostgreSQL --db and --nats act as one server (README "Running a
    /// cluster"). One NATS URL or several separated by commas
    /// (nats://, tls://, ws://, wss://), with credentials if needed
    /// (nats://user:password@host:4222). Needs a PostgreSQL --db.
    // A string, parsed in `into_settings`: clap's own error would echo
    // the value, password and all.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,

    /// The cluster's name, which prefixes every NATS subject it uses, so
    /// that several clusters can share one NATS server.
    #[arg(long, value_name = "NAME", default_value = "chat", requires = "nats", value_parser = parse_cluster_name)]
    cluster_name: String,

    /// This node's name, in logs and `debug server` only (default: the
    /// host name and the --listen port).
    #[arg(long, value_name = "NAME", requires = "nats")]
    node_name: Option<String>,

    /// How long a node not heard from is still taken for alive, in
    /// seconds: when one is killed, its users show offline on the others
    /// after this long. Nodes say they are alive ten times a lease (at
    /// most once a second).
    #[arg(long, value_name = "SECS", default_value_t = 10, requires = "nats", value_parser = clap::value_parser!(u64).range(1..=3600))]
    node_lease_secs: u64,

    /// Cap the database file at N pages of 4 KiB, so that commits fail as
    /// on a full disk (for testing the failure path).
    #[arg(long, value_name = "N", hide = true)]
    db_max_pages: Option<u64>,

    /// Serve TLS with this certificate chain (PEM). With --tls-key; the
    /// --listen address serves TLS unless --tls-listen is given.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Serve TLS on this address beside plaintext on --listen.
    #[arg(long, value_name = "ADDR", requires = "tls_cert")]
    tls_listen: Option<SocketAddr>,

    /// Serve the chat page (GET /) and a WebSocket carrying the protocol
    /// (GET /ws) on this address; HTTPS and WSS with --tls-cert.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,

    /// A name (or address) browsers reach the chat page at, with the port
    /// if it is not the --http one (e.g. chat.example.com; repeatable):
    /// the page loaded from it may open a WebSocket. The --http address,
    /// and localhost on a loopback address, need none; a wildcard address
    /// (0.0.0.0, ::) needs one for browsers to get a session.
    #[arg(long = "public-host", value_name = "HOST[:PORT]", requires = "http", value_parser = crate::origin::parse_public_host)]
    public_hosts: Vec<PublicHost>,

    /// An origin besides the page's own whose pages may open a WebSocket
    /// (e.g. https://chat.example.com; repeatable).
    #[arg(long = "allow-origin", value_name = "ORIGIN", requires = "http", value_parser = crate::origin::parse_origin)]
    allowed_origins: Vec<Origin>,

    /// Serve GET /metrics (Prometheus text format), /healthz and /readyz
    /// on this address, apart from the chat listeners (e.g.
    /// 127.0.0.1:9100; keep it off the public network).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// Worker threads that check password hashes, off the event loop.
    /// Default: one per CPU but one (at least one).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    verify_threads: Option<u16>,

    /// Pin the event loop to this CPU (Linux); password checks then keep
    /// off it (without it they keep off the first CPU).
    #[arg(long, value_name = "N")]
    reactor_cpu: Option<usize>,

    /// The share of its CPU each password-check thread may use, in
    /// percent: after a check it rests for as long as keeps it under this.
    /// Lower keeps message latency steadier during a login storm, at the
    /// cost of slower logins.
    #[arg(long, value_name = "PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=100))]
    verify_cpu_percent: u8,

    /// How long shutdown waits for output to drain, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    shutdown_grace_ms: u64,

    /// Read flags from this TOML file, whose keys are the long flag names
    /// (`lockout-attempts = 5`; an array for a repeatable flag, a bool for
    /// one without a value). The command line wins over the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Write the server's process id to this file once it serves (and
    /// remove it at a clean stop), so that `chatserver user … --pid-file
    /// FILE` can tell it to reload its credentials.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,

    /// Print the effective configuration (the file's, the command line's
    /// and the defaults, passwords left out) as a file --config reads, and
    /// exit.
    #[arg(long)]
    print_config: bool,

    /// Positional form: PORT BLOCK_DURATION TIMEOUT.
    #[arg(value_name = "PORT BLOCK_DURATION TIMEOUT", num_args = 0..=3, hide = true)]
    positional: Vec<String>,
}

const AFTER_HELP: &str = "\
`chatserver hash-password` reads a password (without echo on a terminal, or
one line of standard input) and prints its Argon2id hash for the credentials
file. `chatserver user add|passwd|remove|list` edits that file; SIGHUP makes
a running server reload it (SIGINT or SIGTERM stop it).

Connect with the reference client (`chatcli 127.0.0.1:4000`) or any line-based
tool (`nc 127.0.0.1 4000`), then type `login alice wonderland` with the demo
credentials.txt. Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more.";

/// Everything the server needs to start.
#[derive(Debug)]
pub struct Settings {
    /// Where lines (and TLS, without `tls_listen`) are served.
    pub listen: SocketAddr,
    /// The accounts file.
    pub credentials: PathBuf,
    /// The database, unless state is kept in memory only.
    pub database: Option<Location>,
    /// A cap on the database's pages (a hidden flag, for tests of a full
    /// disk).
    pub db_max_pages: Option<u64>,
    /// The core's configuration.
    pub core: ServerConfig,
    /// Cluster mode: how to reach the others (`--nats`).
    pub cluster: Option<ClusterSettings>,
    /// The most connections at once; `None`: what the open-file limit
    /// allows.
    pub max_connections: Option<usize>,
    /// Unsent output past which a connection is a slow consumer.
    pub max_output_bytes: usize,
    /// Per-socket and per-address limits.
    pub limits: Limits,
    /// Threads that check password hashes.
    pub verify_threads: usize,
    /// The share of a CPU each check thread may use, in percent.
    pub verify_cpu_percent: u8,
    /// The CPU to pin the event loop to.
    pub reactor_cpu: Option<usize>,
    /// Certificate chain and key files, when serving TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Where TLS is served beside plaintext; `None` with `tls`: on `listen`.
    pub tls_listen: Option<SocketAddr>,
    /// Where the chat page and its WebSocket are served.
    pub http: Option<SocketAddr>,
    /// Where `/metrics` is served.
    pub metrics: Option<SocketAddr>,
    /// Names browsers reach the chat page at, besides its address.
    pub public_hosts: Vec<PublicHost>,
    /// Origins allowed to open a WebSocket besides the page's own.
    pub allowed_origins: Vec<Origin>,
    /// How long a stop waits for the last `bye` frames to go out.
    pub shutdown_grace: Duration,
    /// The configuration file read at start-up (`--config`): a reload
    /// says when it changed since, since only a restart applies it.
    pub config_file: Option<PathBuf>,
    /// Where the process id is written (`--pid-file`).
    pub pid_file: Option<PathBuf>,
}

/// How this node joins its cluster (`--nats` and the flags beside it).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// The NATS servers.
    pub nats: BusUrl,
    /// The prefix of every subject.
    pub name: String,
    /// This node's name, for people.
    pub node_name: String,
    /// How long a node not heard from is taken for alive.
    pub lease: Duration,
    /// How often this node says it is alive.
    pub heartbeat_every: Duration,
}

/// A command line that parses but does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The positional form with other than three values.
    #[error(
        "the positional form takes exactly three numbers: PORT BLOCK_DURATION TIMEOUT (got {0})"
    )]
    PositionalCount(usize),
    /// A positional value out of range.
    #[error("{what} must be a whole number{range} (got {value:?})")]
    PositionalValue {
        /// Which value.
        what: &'static str,
        /// Its range, as words.
        range: &'static str,
        /// What was given.
        value: String,
    },
    /// The positional form and the flags it stands for, together.
    #[error(
        "use either the positional form or --listen/--lockout-secs/--idle-timeout-secs, not both"
    )]
    Mixed,
    /// The core refuses the configuration.
    #[error("{0}")]
    Config(#[from] chatproto::ConfigError),
    /// `--db-max-pages` with a PostgreSQL `--db`.
    #[error("--db-max-pages applies to a SQLite --db only")]
    PagesWithoutSqlite,
    /// A `--nats` value that is no NATS address (shown without its
    /// password).
    #[error("--nats: {0}")]
    Nats(crate::bus::BusUrlError),
    /// `--nats` without a PostgreSQL `--db`.
    #[error("--nats needs a PostgreSQL --db (postgres://... or host=... dbname=...) shared by every node of the cluster, not {0}, which would keep this node's state to itself")]
    NatsWithoutPostgres(String),
}

/// The default cap on offline texts kept in memory (without a database).
pub const DEFAULT_OFFLINE_MEMORY_BYTES: usize = 256 * 1024 * 1024;

/// Where the server listens without `--listen`.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 4000);

impl Args {
    /// Whether `--print-config` was given.
    pub fn print_config(&self) -> bool {
        self.print_config
    }

    /// The settings these flags make, checked.
    pub fn into_settings(self) -> Result<Settings, UsageError> {
        let mut listen = self.listen.unwrap_or(DEFAULT_LISTEN);
        let mut lockout_secs = self.lockout_secs.unwrap_or(60);
        let mut idle_secs = self.idle_timeout_secs.unwrap_or(600);
        if !self.positional.is_empty() {
            if self.positional.len() != 3 {
                return Err(UsageError::PositionalCount(self.positional.len()));
            }
            if self.listen.is_some()
                || self.lockout_secs.is_some()
                || self.idle_timeout_secs.is_some()
            {
                return Err(UsageError::Mixed);
            }
            let port: u16 = positional(&self.positional[0], "PORT", " from 0 to 65535")?;
            lockout_secs = positional(
                &self.positional[1],
                "BLOCK_DURATION",
                " of seconds, at least 1",
            )?;
            idle_secs = positional(&self.positional[2], "TIMEOUT", " of seconds, at least 1")?;
            if lockout_secs == 0 {
                return Err(bad_positional(
                    "BLOCK_DURATION",
                    " of seconds, at least 1",
                    "0",
                ));
            }
            if idle_secs == 0 {
                return Err(bad_positional("TIMEOUT", " of seconds, at least 1", "0"));
            }
            listen = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        }

        let limits = self.limits()?;
        let mut core = ServerConfig::default();
        core.max_frame_bytes = self.max_frame_bytes;
        core.idle_timeout = Duration::from_secs(idle_secs);
        core.lockout.max_failures = self.lockout_attempts;
        core.lockout.lock_duration = Duration::from_secs(lockout_secs);
        core.offline_queue_capacity = self.offline_queue_cap;
        core.offline_queue_bytes = self.offline_queue_bytes;
        let database = (!self.no_db && self.db.as_os_str() != ":memory:").then(|| {
            match self.db.to_str() {
                Some(value) => Location::parse(value),
                // Not UTF-8: no connection string, so a file name.
                None => Location::Sqlite(self.db),
            }
        });
        if self.db_max_pages.is_some() && database.as_ref().is_some_and(Location::is_postgres) {
            return Err(UsageError::PagesWithoutSqlite);
        }
        let cluster = match self.nats {
            None => None,
            Some(nats) => {
                let nats: BusUrl = nats.parse().map_err(UsageError::Nats)?;
                if !database.as_ref().is_some_and(Location::is_postgres) {
                    let given = match &database {
                        Some(location) => format!("--db {location}"),
                        None if self.no_db => "--no-db".to_owned(),
                        None => "--db :memory:".to_owned(),
                    };
                    return Err(UsageError::NatsWithoutPostgres(given));
                }
                let lease = Duration::from_secs(self.node_lease_secs);
                Some(ClusterSettings {
                    nats,
                    name: self.cluster_name,
                    node_name: self.node_name.unwrap_or_else(|| default_node_name(listen)),
                    lease,
                    heartbeat_every: (lease / 10).min(Duration::from_secs(1)),
                })
            }
        };
        if database.is_some() {
            // Texts stay on disk and are read a page at a time at login.
            core.offline_texts = OfflineTexts::External;
        } else {
            core.offline_total_bytes = Some(self.offline_memory_bytes);
        }
        core.admins = self.admins.into_iter().collect();
        core.rate_limit = (!self.no_rate_limit).then_some(RateLimit {
            burst: self.rate_limit_burst,
            per_second: self.rate_limit_per_sec,
            flood_after: self.flood_after,
        });
        core.byte_rate = (!self.no_rate_limit && self.rate_limit_bytes_per_sec > 0).then(|| {
            let per_second = self.rate_limit_bytes_per_sec;
            let frame = u32::try_from(self.max_frame_bytes).unwrap_or(u32::MAX);
            Rate {
                burst: per_second.saturating_mul(4).max(frame),
                per_second,
            }
        });
        core.max_pending_checks_per_peer = nonzero(self.max_pending_checks_per_ip)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        core.login_rate_per_peer = nonzero(self.login_rate_per_ip).map(|per_second| Rate {
            burst: per_second.saturating_mul(2),
            per_second,
        });
        core.login_rate_per_name = nonzero(self.login_rate_per_name).map(|per_second| Rate {
            burst: per_second.saturating_mul(5),
            per_second,
        });
        core.lockout.max_tracked_names = self.max_tracked_names;
        core.login_timeout =
            (self.login_timeout_secs > 0).then(|| Duration::from_secs(self.login_timeout_secs));
        core.validate()?;

        Ok(Settings {
            listen,
            credentials: self.credentials,
            database,
            db_max_pages: self.db_max_pages,
            core,
            cluster,
            max_connections: self
                .max_connections
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            max_output_bytes: usize::try_from(self.max_output_bytes).unwrap_or(usize::MAX),
            limits,
            tls: self.tls_cert.zip(self.tls_key),
            tls_listen: self.tls_listen,
            http: self.http,
            metrics: self.metrics,
            public_hosts: self.public_hosts,
            allowed_origins: self.allowed_origins,
            verify_cpu_percent: self.verify_cpu_percent,
            reactor_cpu: self.reactor_cpu,
            verify_threads: self.verify_threads.map_or_else(
                || {
                    std::thread::available_parallelism()
                        .map_or(1, |n| n.get().saturating_sub(1).max(1))
                },
                usize::from,
            ),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            config_file: self.config,
            pid_file: self.pid_file,
        })
    }
}

impl Args {
    /// The reactor's limits these flags set.
    fn limits(&self) -> Result<Limits, UsageError> {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        let per_second = |n: u32| {
            nonzero(n).map(|per_second| Rate {
                burst: per_second.saturating_mul(2),
                per_second,
            })
        };
        Ok(Limits {
            max_connections_per_ip: nonzero(self.max_connections_per_ip),
            max_unauthenticated_percent: (self.max_unauthenticated_percent > 0)
                .then_some(self.max_unauthenticated_percent),
            slow_consumer_after: Duration::from_secs(self.slow_consumer_secs),
            tcp_keepalive: secs(self.tcp_keepalive_secs),
            tcp_user_timeout: secs(self.tcp_user_timeout_secs),
            tls_handshakes_per_ip: per_second(self.tls_handshakes_per_ip),
            tls_handshakes: per_second(self.tls_handshakes),
        })
    }
}

/// `n`, where 0 means "no limit".
/// A cluster name: one NATS subject token of letters, digits, `-` and `_`
/// (no dots, spaces or wildcards, which would change what a subject
/// matches).
fn parse_cluster_name(value: &str) -> Result<String, String> {
    let fits = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if fits {
        Ok(value.to_owned())
    } else {
        Err("1 to 64 letters, digits, '-' or '_'".to_owned())
    }
}

/// This host's name and the listening port, for a node's name.
fn default_node_name(listen: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", listen.port())
}

fn nonzero(n: u32) -> Option<u32> {
    (n > 0).then_some(n)
}

fn positional<T: std::str::FromStr>(
    value: &str,
    what: &'static str,
    range: &'static str,
) -> Result<T, UsageError> {
    value
        .parse()
        .map_err(|_| bad_positional(what, range, value))
}

fn bad_positional(what: &'static str, range: &'static str, value: &str) -> UsageError {
    UsageError::PositionalValue {
        what,
        range,
        value: value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Result<Settings, String> {
        let args = Args::try_parse_from(std::iter::once("chatserver").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        args.into_settings().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.listen, DEFAULT_LISTEN);
        assert_eq!(s.core.idle_timeout, Duration::from_secs(600));
        assert_eq!(s.core.lockout.lock_duration, Duration::from_secs(60));
        assert_eq!(s.core.lockout.max_failures, 3);
        assert_eq!(s.max_output_bytes, 1024 * 1024);
        assert_eq!(s.database, Some(Location::Sqlite("chatserver.db".into())));
        assert_eq!(s.core.login_timeout, Some(Duration::from_secs(30)));
        assert_eq!(s.core.rate_limit.unwrap().flood_after, 100);
        // The per-address limits, and what they turn into.
        assert_eq!(s.limits.max_connections_per_ip, Some(256));
        assert_eq!(s.limits.max_unauthenticated_percent, Some(50));
        assert_eq!(s.core.max_pending_checks_per_peer, Some(8));
        assert_eq!(s.core.login_rate_per_peer, Some(Rate::LOGINS_PER_PEER));
        assert_eq!(s.core.login_rate_per_name, Some(Rate::LOGINS_PER_NAME));
        assert_eq!(s.core.byte_rate, Some(Rate::BYTES_PER_CONNECTION));
        assert_eq!(s.core.lockout.max_tracked_names, 100_000);
        assert_eq!(s.limits.slow_consumer_after, Duration::from_secs(10));
        assert_eq!(s.limits.tcp_keepalive, Some(Duration::from_secs(30)));
        assert_eq!(s.limits.tcp_user_timeout, Some(Duration::from_secs(60)));
        assert!(s.limits.tls_handshakes_per_ip.is_some() && s.limits.tls_handshakes.is_some());
        assert_eq!(
            s.limits,
            Limits::default(),
            "the library's defaults are the flags'"
        );
        // Without a database, queued texts are in memory, capped overall.
        let s = settings(&["--no-db"]).unwrap();
        assert_eq!(
            s.core.offline_total_bytes,
            Some(DEFAULT_OFFLINE_MEMORY_BYTES)
        );
        assert_eq!(s.core.offline_texts, OfflineTexts::InMemory);
        let s = settings(&[]).unwrap();
        assert_eq!(s.core.offline_total_bytes, None);
        assert_eq!(s.core.offline_texts, OfflineTexts::External);
    }

    #[test]
    fn zero_turns_a_per_address_limit_off() {
        // Every per-address limit the shared lists name, which the test
        // harnesses turn off this way, and the other limits 0 turns off.
        use crate::admission::{ADDRESS_LIMIT_FLAGS, TLS_BUDGET_FLAGS};
        let others = [
            "--rate-limit-bytes-per-sec",
            "--tcp-keepalive-secs",
            "--tcp-user-timeout-secs",
        ];
        let args: Vec<&str> = ADDRESS_LIMIT_FLAGS
            .iter()
            .chain(&TLS_BUDGET_FLAGS)
            .chain(&others)
            .flat_map(|flag| [*flag, "0"])
            .collect();
        let s = settings(&args).unwrap();
        assert_eq!(s.limits.max_connections_per_ip, None);
        assert_eq!(s.limits.max_unauthenticated_percent, None);
        assert_eq!(s.core.max_pending_checks_per_peer, None);
        assert_eq!(s.core.login_rate_per_peer, None);
        assert_eq!(s.core.login_rate_per_name, None);
        assert_eq!(s.limits.tls_handshakes_per_ip, None);
        assert_eq!(s.limits.tls_handshakes, None);
        assert_eq!(s.core.byte_rate, None);
        assert_eq!(s.limits.tcp_keepalive, None);
        assert_eq!(s.limits.tcp_user_timeout, None);
        assert!(settings(&["--max-unauthenticated-percent", "101"]).is_err());
        assert!(settings(&["--slow-consumer-secs", "0"]).is_err());
        assert!(settings(&["--max-tracked-names", "0"]).is_err());
    }

    #[test]
    fn limits() {
        let s = settings(&[
            "--login-timeout-secs",
            "0",
            "--flood-after",
            "7",
            "--max-connections-per-ip",
            "3",
        ])
        .unwrap();
        assert_eq!(s.core.login_timeout, None);
        assert_eq!(s.core.rate_limit.unwrap().flood_after, 7);
        assert_eq!(s.limits.max_connections_per_ip, Some(3));
        let both = settings(&["--no-rate-limit", "--flood-after", "3"]).unwrap_err();
        assert!(both.contains("cannot be used with"), "{both}");
    }

    #[test]
    fn database_choices() {
        let db = |args: &[&str]| settings(args).unwrap().database;
        assert_eq!(
            db(&["--db", "/var/lib/chat.db"]),
            Some(Location::Sqlite("/var/lib/chat.db".into()))
        );
        assert_eq!(
            db(&["--db", "postgres://chat:pw@db.example/chat"]),
            Some(Location::Postgres(
                "postgres://chat:pw@db.example/chat".into()
            ))
        );
        assert_eq!(
            db(&["--db", "host=/run/postgresql dbname=chat"]),
            Some(Location::Postgres(
                "host=/run/postgresql dbname=chat".into()
            ))
        );
        let pages = settings(&["--db", "dbname=chat", "--db-max-pages", "9"]).unwrap_err();
        assert!(pages.contains("SQLite --db only"), "{pages}");
        assert_eq!(db(&["--db", ":memory:"]), None);
        assert_eq!(db(&["--no-db"]), None);
        let both = settings(&["--no-db", "--db", "x.db"]).unwrap_err();
        assert!(both.contains("cannot be used with"), "{both}");
    }

    #[test]
    fn the_positional_form() {
        let s = settings(&["4321", "10", "30"]).unwrap();
        assert_eq!(s.listen, "127.0.0.1:4321".parse().unwrap());
        assert_eq!(s.core.lockout.lock_duration, Duration::from_secs(10));
        assert_eq!(s.core.idle_timeout, Duration::from_secs(30));
        assert!(settings(&["4321", "10"])
            .unwrap_err()
            .contains("exactly three"));
        assert!(settings(&["http", "10", "30"])
            .unwrap_err()
            .contains("PORT"));
        assert!(settings(&["4321", "0", "30"])
            .unwrap_err()
            .contains("BLOCK_DURATION"));
        assert!(settings(&["4321", "10", "30", "--listen", "[::1]:5"])
            .unwrap_err()
            .contains("not both"));
    }

    #[test]
    fn flags() {
        let s = settings(&[
            "--listen",
            "[::1]:0",
            "--admin",
            "root",
            "--admin",
            "ops",
            "--lockout-attempts",
            "5",
            "--no-rate-limit",
            "--max-connections",
            "10",
        ])
        .unwrap();
        assert!(s.listen.is_ipv6());
        assert_eq!(s.core.admins.len(), 2);
        assert_eq!(s.core.lockout.max_failures, 5);
        assert_eq!(s.core.rate_limit, None);
        assert_eq!(s.max_connections, Some(10));
        assert!(settings(&["--admin", "no way"]).is_err());
        assert!(settings(&["--lockout-attempts", "0"]).is_err());
        assert!(settings(&["--max-frame-bytes", "3"])
            .unwrap_err()
            .contains("frame limit"));
    }

    #[test]
    fn public_hosts_and_allowed_origins() {
        let s = settings(&[
            "--http",
            "0.0.0.0:8080",
            "--public-host",
            "Chat.Example.com",
            "--public-host",
            "[2001:db8::7]:443",
            "--allow-origin",
            "https://app.example.com",
        ])
        .unwrap();
        assert_eq!(s.public_hosts.len(), 2);
        assert_eq!(s.public_hosts[0].host.to_string(), "chat.example.com");
        assert_eq!(s.public_hosts[1].port, Some(443));
        assert_eq!(s.allowed_origins[0].to_string(), "https://app.example.com");
        // Checked as the command line is read, with the reason.
        for bad in [
            "http://chat.example.com",
            "chat.example.com:0",
            "2001:db8::7",
        ] {
            let e = settings(&["--http", "0.0.0.0:8080", "--public-host", bad]).unwrap_err();
            assert!(
                e.contains("expected the host name or IP address browsers reach"),
                "{bad}: {e}"
            );
        }
        let alone = settings(&["--public-host", "chat.example.com"]).unwrap_err();
        assert!(alone.contains("--http"), "{alone}");
    }
}
