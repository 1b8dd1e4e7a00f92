//! The reactor: one thread, one poller, every socket non-blocking.
//!
//! Each turn it waits for socket readiness or the next deadline (the core's
//! `poll_timeout`, a link's), feeds what it read to the core through each
//! socket's [`Link`], drains the core's outputs into the links (and its
//! batches to the storage thread), and writes each socket that has output
//! once, with vectored writes. It holds no chat logic (that is all in
//! `chatproto::Server`), no transport logic (the links) and no admission
//! policy ([`Admission`]): it owns poll, accept, read, write, the storage
//! hand-off and deadline dispatch.
//!
//! [`Reactor::new`] takes listeners already bound, so a test can run a
//! reactor in process on loopback sockets, a turn at a time
//! ([`Reactor::turn`]) or until stopped ([`Reactor::run`],
//! [`StopHandle`]).

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chatproto::{
    AccountChange, Accounts, BatchId, ByeReason, ClaimId, ClaimOutcome, ConnId, Event as CoreEvent,
    MessageError, Output, PeerKey, Persisted, Rate, Server, Timestamp, Username, VerifyTicket,
};
use polling::{Event, Events, PollMode, Poller};
use tracing::{debug, error, info, warn};

use crate::admission::{Admission, Refusal, Verdict};
#[cfg(feature = "nats")]
use crate::bus::{Bus, BusEvent};
use crate::bus::{BusUrl, Subjects};
use crate::clock::Clock;
use crate::health::Health;
use crate::http::HttpConfig;
use crate::link::{Backlog, Expired, Link, LinkConfig, LinkEvent, Phase, Transport, Written};
use crate::metrics::{Connections, Figures, Metrics};
use crate::node::Beat;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use crate::node::ClusterNode;
use crate::output_queue::OutputQueue;
use crate::registration::Registered;
use crate::storage::{Done, Storage};
use crate::tls::TlsConfig;
use crate::verifier::Verifier;

/// What the reactor needs besides the core.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    /// The most sockets open at once.
    pub max_connections: usize,
    /// Unsent output past which a connection is a slow consumer.
    pub max_output_bytes: usize,
    /// Per-socket and per-address limits.
    pub limits: Limits,
    /// How long a stop waits for the last `bye` frames to go out.
    pub shutdown_grace: Duration,
    /// Worker threads for password checks.
    pub verify_threads: usize,
    /// The share of a CPU each of them may use, in percent.
    pub verify_cpu_percent: u8,
    /// The CPU the reactor is pinned to, which the checks keep off.
    pub reactor_cpu: Option<usize>,
    /// Where the reactor says whether it can serve (`/readyz`): the same
    /// `Health` as the HTTP listeners'.
    pub health: Health,
    /// What `/metrics` reports (`--metrics`); `None` records nothing.
    pub metrics: Option<Arc<Metrics>>,
    /// Cluster mode: the bus to the other nodes (the core's
    /// `ServerConfig::cluster` says which node this is).
    pub bus: Option<BusConfig>,
}

/// How the reactor reaches the other nodes of its cluster.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// The NATS servers.
    pub url: BusUrl,
    /// The cluster's subjects, as this node sees them.
    pub subjects: Subjects,
    /// The name NATS shows for this connection.
    pub client_name: String,
}

/// The limits the reactor enforces per socket and per client address;
/// `None` is no limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Sockets open from one client address.
    pub max_connections_per_ip: Option<u32>,
    /// The share of `max_connections` that may be sockets without a
    /// logged-in user, in percent.
    pub max_unauthenticated_percent: Option<u8>,
    /// How long a backlog may stay over `max_output_bytes`.
    pub slow_consumer_after: Duration,
    /// TCP keepalive: idle time before the first probe.
    pub tcp_keepalive: Option<Duration>,
    /// `TCP_USER_TIMEOUT`: how long data may stay unacknowledged (Linux).
    pub tcp_user_timeout: Option<Duration>,
    /// TLS handshakes one client address may start.
    pub tls_handshakes_per_ip: Option<Rate>,
    /// TLS handshakes all addresses together may start.
    pub tls_handshakes: Option<Rate>,
}

impl Default for Limits {
    /// The defaults of the flags (`chatserver --help`).
    fn default() -> Self {
        Limits {
            max_connections_per_ip: Some(256),
            max_unauthenticated_percent: Some(50),
            slow_consumer_after: Duration::from_secs(10),
            tcp_keepalive: Some(Duration::from_secs(30)),
            tcp_user_timeout: Some(Duration::from_secs(60)),
            tls_handshakes_per_ip: Some(Rate {
                burst: 10,
                per_second: 5,
            }),
            tls_handshakes: Some(Rate {
                burst: 200,
                per_second: 100,
            }),
        }
    }
}

/// Bytes read from one socket per wake-up, so one fast sender cannot
/// starve the others.
const READ_BUDGET: usize = 256 * 1024;
/// The read buffer: reads land in it and go on as shared `Bytes`.
const READ_CHUNK: usize = 64 * 1024;
/// Room left in the read buffer below which it is refilled.
const MIN_READ: usize = 16 * 1024;
/// Connections accepted per wake-up, for the same reason.
const ACCEPT_BUDGET: usize = 256;
/// The kernel send buffer of every accepted socket (`SO_SNDBUF`).
pub const SEND_BUFFER_BYTES: usize = 256 * 1024;
/// Write-and-refill rounds per wake-up before the reactor polls again, so
/// a fast reader draining a long queue cannot hold the loop.
const MAX_FLUSH_ROUNDS: usize = 16;
/// How often an unreachable database is checked again.
const DATABASE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Bus messages served per turn, before the sockets get a look: once
/// past it, no further payload is taken (so at most one payload more, of
/// at most `bus::MAX_PAYLOAD_BYTES`).
#[cfg(feature = "nats")]
const BUS_MESSAGES_PER_TURN: usize = 1024;
/// How long to stop accepting after running out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// The listeners' poller keys count down from here; sockets use their
/// slab index.
const LISTENER_KEY: usize = usize::MAX - 1;
/// At most this many listeners (lines, TLS, HTTP, metrics, and room).
const MAX_LISTENERS: usize = 8;
/// Sockets of the metrics listener open at once, at most: it is kept out
/// of the chat's connection limits (a full server must still answer its
/// scrapes and health checks), so it has a small limit of its own; past
/// it a new one is closed at once.
const MAX_METRICS_SOCKETS: usize = 16;
/// The figures `/metrics` reports are copied from the core at most this
/// often (and the text rendered as often): a scraper that trickles its
/// request a byte at a time costs no more than one that does not.
const METRICS_REFRESH: Duration = Duration::from_millis(100);

/// A listening socket, the TLS its connections speak, if any, and whether
/// it serves HTTP (the chat page and WebSocket) rather than lines.
#[derive(Debug)]
pub struct Listener {
    /// The bound socket.
    pub socket: TcpListener,
    /// TLS on its connections.
    pub tls: Option<TlsConfig>,
    /// HTTP (the chat page, WebSocket) instead of lines.
    pub http: Option<Arc<HttpConfig>>,
}

#[derive(Debug)]
struct Listening {
    socket: Registered<TcpListener>,
    tls: Option<TlsConfig>,
    http: Option<Arc<HttpConfig>>,
}

/// Asks a running reactor to stop (from a signal handler, or a test): it
/// says `bye` to everyone, flushes, and returns from [`Reactor::run`].
#[derive(Debug, Clone)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    poller: Arc<Poller>,
}

impl StopHandle {
    /// Requests the stop and wakes the reactor.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // A failed wake-up only delays the stop to the next event.
        let _ = self.poller.notify();
    }
}

/// Hands a running reactor a new table of accounts, from any thread (the
/// signal thread, which read the credentials file off the event loop): at
/// its next wake-up the reactor applies the differences to the core
/// ([`chatproto::Server::handle_account_change`]) and logs them.
#[derive(Debug, Clone)]
pub struct AccountsHandle {
    next: Arc<Mutex<Option<NewAccounts>>>,
    poller: Arc<Poller>,
}

#[derive(Debug)]
struct NewAccounts {
    accounts: Accounts,
    digest: String,
}

impl AccountsHandle {
    /// Serve `accounts` from now on; `digest` is theirs
    /// ([`crate::credentials::digest`]), which a cluster's nodes compare.
    /// A table handed over before the reactor took the last one replaces
    /// it.
    pub fn replace(&self, accounts: Accounts, digest: String) {
        *self.next.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(NewAccounts { accounts, digest });
        // A failed wake-up only delays the change to the next event.
        let _ = self.poller.notify();
    }
}

/// Whether the reactor goes on after a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// It serves on.
    Running,
    /// It stopped: everyone was said goodbye to (or the grace ran out).
    Stopped,
}

/// The event loop: sockets, their links, and the core.
pub struct Reactor {
    poller: Arc<Poller>,
    /// What the last wait found (taken while it is served).
    events: Option<Events>,
    listeners: Vec<Listening>,
    socket_mode: PollMode,
    core: Server,
    /// The storage thread, with a database (`None` without one).
    storage: Option<Storage>,
    /// The bus thread, in cluster mode.
    #[cfg(feature = "nats")]
    bus: Option<Bus>,
    /// Whether the bus refused the last publish (logged once per run of
    /// refusals, not once per message).
    #[cfg(feature = "nats")]
    publish_refused: bool,
    clock: Clock,
    config: ReactorConfig,
    link_config: Arc<LinkConfig>,
    admission: Admission,
    sockets: Vec<Option<Socket>>,
    free_keys: Vec<usize>,
    /// Socket key for each open core connection, by `ConnId::index`.
    by_conn: Vec<Option<(ConnId, usize)>>,
    /// Sockets this reactor ended itself (`end_session`) and keeps mapped
    /// for the output the core still holds for them, once the core has
    /// given their index to a newer connection.
    by_conn_ended: HashMap<ConnId, usize>,
    /// Sockets with output or interest to update this turn.
    dirty: Vec<usize>,
    /// The links' deadlines (`Link::deadline`), as registered.
    deadlines: BTreeSet<(Instant, usize)>,
    accept_paused_until: Option<Instant>,
    /// When to ask the storage thread whether the database is back, while
    /// a failure says it may not be.
    database_check_at: Option<Instant>,
    /// Cluster mode: when this node's next heartbeat goes to the
    /// database (the first, which registers it, at once).
    node_beat_at: Option<Instant>,
    /// Cluster mode: sessions whose release could not be written, tried
    /// again with each heartbeat until they are.
    unreleased: Vec<(Username, ClaimId)>,
    stop: Arc<AtomicBool>,
    /// Accounts to serve from the next wake-up ([`AccountsHandle`]).
    next_accounts: Arc<Mutex<Option<NewAccounts>>>,
    shutdown_deadline: Option<Instant>,
    stopped: bool,
    read_buf: ReadBuffer,
    /// When this wake-up began: the clock is read once per wake-up, and
    /// everything in it happens at that time.
    instant: Instant,
    /// Runs password checks off this thread.
    verifier: Verifier,
    /// Sockets of the metrics listener open.
    metrics_sockets: usize,
    /// When the figures of `/metrics` were last copied in.
    metrics_refreshed: Option<Instant>,
    /// With `--metrics`: when each check in flight was asked for.
    checks_started: HashMap<VerifyTicket, Instant>,
    /// With `--metrics`: when each batch in flight went to storage.
    commits_started: HashMap<BatchId, Instant>,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("open", &self.admission.open())
            .field("listeners", &self.listeners.len())
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

struct Socket {
    stream: Registered<TcpStream>,
    peer: SocketAddr,
    /// The core's connection, until the core closes it.
    conn: Option<ConnId>,
    /// The core's connection after it closed, while the socket writes its
    /// last frames: the core hears how many were written when it is gone.
    closed_conn: Option<ConnId>,
    /// The transport: what the bytes are, TLS, output, closing.
    link: Link,
    /// What the poller is armed for; `None` once an event disarmed it
    /// (oneshot mode only).
    armed: Option<(bool, bool)>,
    dirty: bool,
    /// The link's deadline as listed in `Reactor::deadlines`.
    deadline: Option<Instant>,
    /// It came to the metrics listener: before its requests are read, the
    /// reactor copies in the figures they report.
    scrapes: bool,
}

/// The read buffer. A read is handed on as `Bytes` split off it, without a
/// copy; its memory is reused once every piece handed on is dropped.
#[derive(Debug)]
struct ReadBuffer(BytesMut);

impl ReadBuffer {
    fn new() -> ReadBuffer {
        ReadBuffer(BytesMut::new())
    }

    /// One read from `stream`: empty at the end of the stream.
    fn read_from(&mut self, stream: &TcpStream) -> io::Result<Bytes> {
        if self.0.len() < MIN_READ {
            // Reclaims the allocation when nothing handed on is alive (the
            // usual case: the core does not keep input), else a new one.
            self.0.clear();
            self.0.reserve(READ_CHUNK);
            self.0.resize(READ_CHUNK, 0);
        }
        let n = (&*stream).read(&mut self.0[..])?;
        Ok(self.0.split_to(n).freeze())
    }

    /// Room for the next read: a read that fills it may not have drained
    /// the socket.
    fn room(&self) -> usize {
        if self.0.len() < MIN_READ {
            READ_CHUNK
        } else {
            self.0.len()
        }
    }
}

impl Reactor {
    /// A reactor serving `listeners` with `core`, on `clock`'s time,
    /// without a database (the core is not durable). It starts the
    /// password-check threads; nothing is served before [`Reactor::run`]
    /// or [`Reactor::turn`].
    pub fn new(
        listeners: Vec<Listener>,
        core: Server,
        clock: Clock,
        config: ReactorConfig,
    ) -> io::Result<Reactor> {
        Reactor::build(listeners, core, clock, config, |_| Ok(None))
    }

    /// A reactor whose core's batches go to `database`, on a storage
    /// thread of its own.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn with_database(
        listeners: Vec<Listener>,
        core: Server,
        database: crate::database::Database,
        clock: Clock,
        config: ReactorConfig,
    ) -> io::Result<Reactor> {
        let cluster = core.config().cluster.as_ref().map(|c| ClusterNode {
            id: c.node.as_uuid().to_string(),
            name: c.name.clone(),
            lease: c.lease,
        });
        Reactor::build(listeners, core, clock, config, |poller| {
            Storage::start(database, cluster, poller.clone()).map(Some)
        })
    }

    /// A reactor with the storage `storage` starts, which wakes the poller
    /// it is given.
    fn build(
        listeners: Vec<Listener>,
        core: Server,
        clock: Clock,
        config: ReactorConfig,
        storage: impl FnOnce(&Arc<Poller>) -> io::Result<Option<Storage>>,
    ) -> io::Result<Reactor> {
        let poller = Arc::new(Poller::new()?);
        let storage = storage(&poller)?;
        #[cfg(feature = "nats")]
        let bus = match &config.bus {
            Some(bus) => {
                // Not ready until the first connection is made.
                config.health.set_bus_reachable(false);
                Some(Bus::start(
                    &bus.url,
                    &bus.client_name,
                    bus.subjects.subscriptions(),
                    poller.clone(),
                )?)
            }
            None => None,
        };
        #[cfg(not(feature = "nats"))]
        if config.bus.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cluster mode needs the `nats` feature, which this build lacks",
            ));
        }
        let verifier = Verifier::start(
            config.verify_threads,
            config.verify_cpu_percent,
            config.reactor_cpu,
            poller.clone(),
        )?;
        let mut listening = Vec::new();
        if listeners.len() > MAX_LISTENERS {
            return Err(io::Error::other(format!(
                "{} listeners: at most {MAX_LISTENERS}",
                listeners.len()
            )));
        }
        for (i, listener) in listeners.into_iter().enumerate() {
            listener.socket.set_nonblocking(true)?;
            listening.push(Listening {
                socket: Registered::new(
                    poller.clone(),
                    listener.socket,
                    Event::readable(LISTENER_KEY - i),
                    PollMode::Oneshot,
                )?,
                tls: listener.tls,
                http: listener.http,
            });
        }
        // Level-triggered sockets need no re-arming after each event: one
        // syscall fewer per read. Where the platform lacks it, oneshot.
        let socket_mode = if poller.supports_level() {
            PollMode::Level
        } else {
            PollMode::Oneshot
        };
        let link_config = Arc::new(LinkConfig {
            max_frame_bytes: core.config().max_frame_bytes,
            max_output_bytes: config.max_output_bytes,
            slow_consumer_after: config.limits.slow_consumer_after,
        });
        let node_beat_at = core.config().cluster.as_ref().map(|_| Instant::now());
        Ok(Reactor {
            poller,
            events: Some(Events::new()),
            listeners: listening,
            socket_mode,
            core,
            storage,
            #[cfg(feature = "nats")]
            bus,
            #[cfg(feature = "nats")]
            publish_refused: false,
            clock,
            admission: Admission::new(config.max_connections, config.limits.clone()),
            config,
            link_config,
            sockets: Vec::new(),
            free_keys: Vec::new(),
            by_conn: Vec::new(),
            by_conn_ended: HashMap::new(),
            dirty: Vec::new(),
            deadlines: BTreeSet::new(),
            accept_paused_until: None,
            database_check_at: None,
            node_beat_at,
            unreleased: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            next_accounts: Arc::new(Mutex::new(None)),
            shutdown_deadline: None,
            stopped: false,
            read_buf: ReadBuffer::new(),
            instant: Instant::now(),
            verifier,
            checks_started: HashMap::new(),
            commits_started: HashMap::new(),
            metrics_sockets: 0,
            metrics_refreshed: None,
        })
    }

    /// A handle that stops this reactor, from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            stop: self.stop.clone(),
            poller: self.poller.clone(),
        }
    }

    /// A handle that gives this reactor new accounts, from any thread.
    pub fn accounts_handle(&self) -> AccountsHandle {
        AccountsHandle {
            next: self.next_accounts.clone(),
            poller: self.poller.clone(),
        }
    }

    /// The core, to look at between turns.
    pub fn core(&self) -> &Server {
        &self.core
    }

    /// Sockets open.
    pub fn open_sockets(&self) -> usize {
        self.admission.open()
    }

    /// Serves until a stop is requested and every connection has been said
    /// goodbye to (or the grace period ran out).
    pub fn run(&mut self) -> io::Result<()> {
        while self.turn(None)? == Turn::Running {}
        Ok(())
    }

    /// One wake-up: waits for a socket, a password check, a stop or the
    /// next deadline (but at most `max_wait`), then serves what is ready.
    pub fn turn(&mut self, max_wait: Option<Duration>) -> io::Result<Turn> {
        if self.stopped {
            return Ok(Turn::Stopped);
        }
        self.instant = Instant::now();
        if self.stop.load(Ordering::SeqCst) && self.shutdown_deadline.is_none() {
            self.begin_shutdown()?;
        }
        if let Some(deadline) = self.shutdown_deadline {
            // Done once every socket is closed and every change the core
            // made (the logouts of the shutdown included) is durable.
            let persisted =
                !self.core.persist_pending() && self.storage.as_ref().map_or(true, Storage::idle);
            if (self.admission.open() == 0 && persisted) || self.instant >= deadline {
                if !persisted {
                    error!("shutdown grace period over with changes not yet durable");
                }
                if self.admission.open() > 0 {
                    warn!(
                        connections = self.admission.open(),
                        "shutdown grace period over: closing the rest"
                    );
                }
                self.stopped = true;
                return Ok(Turn::Stopped);
            }
        }
        let timeout = self
            .next_wakeup()
            .map(|at| at.saturating_duration_since(self.instant));
        let timeout = match (timeout, max_wait) {
            (Some(t), Some(max)) => Some(t.min(max)),
            (t, max) => t.or(max),
        };
        let mut events = self.events.take().unwrap_or_default();
        events.clear();
        let waited = self.poller.wait(&mut events, timeout);
        self.instant = Instant::now();
        if let Err(e) = waited {
            self.events = Some(events);
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(Turn::Running),
                _ => Err(e),
            };
        }
        self.take_verdicts();
        self.take_storage();
        self.check_database();
        self.beat_database();
        self.take_bus();
        self.take_accounts();
        for event in events.iter() {
            if event.key > LISTENER_KEY - MAX_LISTENERS {
                self.accept_ready(LISTENER_KEY - event.key);
            } else {
                self.socket_ready(event.key, event.readable);
            }
        }
        self.events = Some(events);
        self.handle_deadlines();
        self.flush()?;
        // What the wake-up published goes to the bus thread in one hand-over.
        #[cfg(feature = "nats")]
        if let Some(bus) = self.bus.as_mut() {
            bus.flush();
        }
        if self.config.bus.is_some() {
            self.config
                .health
                .set_accounts_agree(self.core.cluster_accounts_agree());
        }
        if let Some(metrics) = &self.config.metrics {
            metrics.observe_turn(self.instant.elapsed());
        }
        Ok(Turn::Running)
    }

    // ------------------------------------------------------------------
    // The storage hand-off: batches and page reads go to the storage
    // thread (`drain_core_outputs`); what it finished comes back here.
    // ------------------------------------------------------------------

    /// Writes what the wake-up queued. A flush can make more output (a
    /// write error logs a user out; a drained connection gets its next
    /// offline page): flush until nothing is left, so nothing waits for an
    /// unrelated wake-up, for a bounded number of rounds (what is left is
    /// flushed on the next turn).
    fn flush(&mut self) -> io::Result<()> {
        for _ in 0..MAX_FLUSH_ROUNDS {
            if self.dirty.is_empty() {
                break;
            }
            self.flush_dirty()?;
        }
        Ok(())
    }

    /// Hands the core what the storage thread finished: batches committed
    /// (or failed), and offline pages read.
    fn take_storage(&mut self) {
        let Some(storage) = self.storage.as_mut() else {
            return;
        };
        let finished = storage.finished();
        if storage.stopped() && self.node_beat_at.is_some() && !self.stop.load(Ordering::SeqCst) {
            // Without its storage a node can neither claim sessions nor
            // say it is alive: the others will take its sessions over, so
            // its clients must not stay.
            error!(
                "the storage thread stopped: a cluster node cannot go on without it; shutting down"
            );
            self.stop.store(true, Ordering::SeqCst);
            let _ = self.poller.notify();
        }
        for done in finished {
            let now = self.now();
            match done {
                Done::Persisted { batch, result } => {
                    if let (Some(metrics), Some(started)) =
                        (&self.config.metrics, self.commits_started.remove(&batch))
                    {
                        metrics.observe_commit(
                            self.instant.saturating_duration_since(started),
                            result.is_ok(),
                        );
                    }
                    let outcome = match result {
                        Ok(_) => Persisted::Committed,
                        Err(e) => {
                            error!(%batch, "{e}: taking the batch back; its requests are answered `unavailable`");
                            Persisted::Failed
                        }
                    };
                    self.core.handle_persisted(batch, outcome, now);
                }
                Done::Claimed { claim, result } => {
                    let outcome = match result {
                        Ok(Some(queued)) => ClaimOutcome::Claimed { queued },
                        Ok(None) => ClaimOutcome::Elsewhere,
                        Err(e) => {
                            error!(%claim, "{e}: cannot claim the session; the login is answered `unavailable`");
                            ClaimOutcome::Failed
                        }
                    };
                    self.core.handle_claim(claim, outcome, now);
                }
                Done::Released {
                    user,
                    claim,
                    result,
                } => {
                    if let Err(e) = result {
                        warn!(%user, %claim, "{e}: cannot give the session back yet; trying again with the next heartbeat");
                        self.unreleased.push((user, claim));
                    }
                }
                Done::Beat(result) => match result {
                    Ok(Beat::Alive) => self.config.health.set_lease_held(true),
                    Ok(Beat::Expired { silent_for }) => {
                        // Joined again as a new node: held from its next beat.
                        self.config.health.set_lease_held(false);
                        error!(
                            silent_for_ms = silent_for.as_millis() as u64,
                            "the database says this node was silent past its lease and another node took over a session: closing every connection (bye node_expired)"
                        );
                        self.core.handle_node_expired(silent_for, now);
                    }
                    Err(e) => {
                        self.config.health.set_lease_held(false);
                        warn!("{e}: cannot write this node's heartbeat; trying again");
                    }
                },
                Done::Page { conn, result } => match result {
                    Ok(page) => {
                        let _ = self.core.handle_offline_page(conn, page, now);
                    }
                    Err(e) => {
                        // The messages stay queued; the connection is cut
                        // off so its next login tries again, rather than
                        // wait forever.
                        error!(%conn, "{e}: cannot read offline messages; closing the connection");
                        if let Some(key) = self.key_of(conn) {
                            self.report_written(key);
                            self.transport_closed(key, "its offline messages cannot be read");
                        }
                    }
                },
            }
            self.drain_core();
        }
    }

    /// Cluster mode: sends this node's heartbeat to the database every
    /// heartbeat period (one at a time), with the releases that failed.
    fn beat_database(&mut self) {
        let (Some(at), Some(storage)) = (self.node_beat_at, self.storage.as_mut()) else {
            return;
        };
        if self.instant < at || storage.beating() {
            return;
        }
        storage.heartbeat();
        if storage.reachable() {
            for (user, claim) in self.unreleased.drain(..) {
                storage.release(user, claim);
            }
        }
        let every = self
            .core
            .config()
            .cluster
            .as_ref()
            .map_or(DATABASE_CHECK_EVERY, |c| c.heartbeat_every);
        self.node_beat_at = Some(self.instant + every);
    }

    /// While the database may be unreachable (a commit or read failed),
    /// asks the storage thread every [`DATABASE_CHECK_EVERY`] whether it is
    /// back, so `/readyz` recovers without waiting for a client's request
    /// (which a load balancer would not send while it says 503).
    fn check_database(&mut self) {
        let Some(storage) = self.storage.as_mut() else {
            return;
        };
        self.config
            .health
            .set_database_reachable(storage.reachable());
        if storage.reachable() || storage.checking() {
            self.database_check_at = None;
            return;
        }
        match self.database_check_at {
            Some(at) if self.instant >= at => {
                storage.check();
                self.database_check_at = None;
            }
            Some(_) => {}
            None => self.database_check_at = Some(self.instant + DATABASE_CHECK_EVERY),
        }
    }

    // ------------------------------------------------------------------
    // The bus (cluster mode): what the core publishes goes to the bus
    // thread; what the other nodes publish, and the connection's ups and
    // downs, come back here.
    // ------------------------------------------------------------------

    /// Hands the core what came from the bus since the last turn.
    #[cfg(feature = "nats")]
    fn take_bus(&mut self) {
        // Bounded, so a flood from the bus cannot starve the sockets; the
        // rest waits for the next turn, which comes at once.
        let mut served = 0;
        while served < BUS_MESSAGES_PER_TURN {
            let Some(event) = self.bus.as_mut().and_then(Bus::next_event) else {
                return;
            };
            let now = self.now();
            match event {
                BusEvent::Connected => {
                    info!("connected to NATS: announcing this node's users");
                    self.config.health.set_bus_reachable(true);
                    self.core.handle_bus_restored(now);
                }
                BusEvent::Disconnected => {
                    warn!("lost the NATS connection: reconnecting; this node serves its own clients meanwhile");
                    self.config.health.set_bus_reachable(false);
                    self.core.handle_bus_lost(now);
                }
                BusEvent::Message { subject, payload } => {
                    for message in chatproto::BusMessage::decode_all(&payload) {
                        served += 1;
                        match message {
                            Ok(message) => self.core.handle_bus(message, now),
                            Err(e) => warn!(%subject, "dropped a bus message: {e}"),
                        }
                    }
                }
                BusEvent::Warning(warning) => warn!("NATS: {warning}"),
            }
            served += 1;
            self.drain_core();
        }
        let _ = self.poller.notify();
    }

    #[cfg(not(feature = "nats"))]
    fn take_bus(&mut self) {}

    /// Publishes what the core asked for. A refusal (NATS away for long
    /// enough that the bus holds its limit) is logged once per run of
    /// refusals: the core repairs what is lost when the bus is back.
    fn publish(&mut self, to: chatproto::BusTarget, message: &chatproto::BusMessage) {
        #[cfg(feature = "nats")]
        if let (Some(bus), Some(bus_config)) = (self.bus.as_mut(), self.config.bus.as_ref()) {
            match bus.publish(&bus_config.subjects.of(to), message) {
                Ok(()) => self.publish_refused = false,
                Err(e) if !self.publish_refused => {
                    self.publish_refused = true;
                    warn!("not published to the other nodes: {e}");
                }
                Err(_) => {}
            }
            return;
        }
        debug!(?to, "no bus to publish {message:?} on");
    }

    // ------------------------------------------------------------------
    // The core and the password checks.
    // ------------------------------------------------------------------

    /// Hands the core the password checks the workers finished.
    fn take_verdicts(&mut self) {
        let verdicts: Vec<_> = self.verifier.verdicts().collect();
        for (ticket, matches) in verdicts {
            if let (Some(metrics), Some(started)) =
                (&self.config.metrics, self.checks_started.remove(&ticket))
            {
                metrics.observe_password_check(self.instant.saturating_duration_since(started));
            }
            let now = self.now();
            self.core.handle_verification(ticket, matches, now);
            self.drain_core();
        }
    }

    /// Copies what `/metrics` reports from the core and the sockets (at
    /// most every [`METRICS_REFRESH`]).
    fn refresh_metrics(&mut self) {
        let Some(metrics) = &self.config.metrics else {
            return;
        };
        if self
            .metrics_refreshed
            .is_some_and(|at| self.instant.saturating_duration_since(at) < METRICS_REFRESH)
        {
            return;
        }
        self.metrics_refreshed = Some(self.instant);
        let mut connections = Connections::default();
        for socket in self.sockets.iter().flatten() {
            let link = &socket.link;
            if link.is_refusing() {
                connections.refusing += 1;
                continue;
            }
            let count = if link.is_websocket() {
                &mut connections.websocket
            } else if !link.is_lines() {
                &mut connections.http
            } else if link.is_tls() {
                &mut connections.tls
            } else {
                &mut connections.tcp
            };
            *count += 1;
        }
        let debug = self.core.debug_state(self.now());
        metrics.set_figures(Figures {
            stats: self.core.stats().clone(),
            connections,
            users_online: debug.users_online,
            offline: self.core.queued_offline(),
            locked_accounts: debug.locked_accounts,
            pending_password_checks: self.core.pending_password_checks(),
            sessions: debug.connections,
        });
    }

    /// Serves the accounts an [`AccountsHandle`] handed over, if any.
    fn take_accounts(&mut self) {
        let next = self
            .next_accounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(NewAccounts { accounts, digest }) = next else {
            return;
        };
        if self.shutdown_deadline.is_some() {
            warn!("credentials reload ignored: the server is stopping");
            return;
        }
        let changes = self.core.accounts().changes_to(&accounts);
        let count = |kind| changes.iter().filter(|c| c.kind() == kind).count();
        let (added, changed, removed) = (
            count("added"),
            count("credential_changed"),
            count("removed"),
        );
        let held = self.core.accounts().len();
        if held > 2 && removed * 2 > held {
            // A file cut short by mistake (`>` for `>>`) would delete most
            // users' queues and blocks at once: a restart applies such a
            // file and deletes nothing.
            error!(
                removals = removed,
                accounts = held,
                "credentials reload refused: it would remove more than half of the accounts, and what they have stored; if that is meant, restart the server with the new file (a restart deletes nothing)"
            );
            return;
        }
        for change in changes {
            if let AccountChange::Removed { name } = &change {
                info!(
                    user = %name,
                    "account removed: its session ends and what the server kept for it is deleted"
                );
            }
            let now = self.now();
            if let Err(e) = self.core.handle_account_change(change, now) {
                // The changes come from the core's own table: none can
                // misfit, but if one did it changes nothing.
                error!("account change refused: {e}");
            }
            self.drain_core();
        }
        self.core.set_accounts_digest(digest);
        info!(
            accounts = self.core.accounts().len(),
            added, changed, removed, "credentials reloaded"
        );
    }

    /// This wake-up's time, as the core's clock.
    fn now(&self) -> Timestamp {
        self.clock.at(self.instant)
    }

    /// The earliest moment something is due.
    fn next_wakeup(&self) -> Option<Instant> {
        [
            self.core.poll_timeout().map(|t| self.clock.instant(t)),
            // A link's deadline: an HTTP request, a close's grace, a
            // backlog judged even if nothing else happens by then.
            self.deadlines.first().map(|(at, _)| *at),
            self.accept_paused_until,
            self.database_check_at,
            self.node_beat_at,
            self.shutdown_deadline,
            // Flush rounds ran out with sockets still to write: go on at
            // once, after a look at the others.
            (!self.dirty.is_empty()).then_some(self.instant),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Moves every core output to where it goes.
    fn drain_core(&mut self) {
        // Slow consumers found on the way are cut off only once the core
        // has nothing more queued, one at a time: the core has counted
        // every frame it queued for a connection, so reporting what a
        // socket wrote while some of its frames are still in the core
        // would count those as written.
        let mut cut = Vec::new();
        loop {
            self.drain_core_outputs(&mut cut);
            let Some(key) = cut.pop() else {
                return;
            };
            if let Some(conn) = self.conn_of(key) {
                self.cut_off_slow_consumer(key, conn);
            }
        }
    }

    /// Moves the core's outputs to where they go until there are none;
    /// notes in `cut` the sockets whose backlog calls for a cut-off.
    fn drain_core_outputs(&mut self, cut: &mut Vec<usize>) {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Transmit { conn, frame } => {
                    let Some(key) = self.key_of(conn) else {
                        continue;
                    };
                    let socket = self.sockets[key].as_mut().expect("keys point at sockets");
                    // The core's frames are bare payloads: the link frames
                    // them for its transport, without copying them.
                    socket.link.push_frame(frame);
                    self.mark_dirty(key);
                    if self.backlog_due(key) && !cut.contains(&key) {
                        cut.push(key);
                    }
                }
                Output::Close { conn, reason } => {
                    if let Some(metrics) = &self.config.metrics {
                        metrics.count_bye(reason);
                    }
                    let Some(key) = self.key_of(conn) else {
                        continue;
                    };
                    let socket = self.sockets[key].as_mut().expect("keys point at sockets");
                    info!(peer = %socket.peer, %conn, "closing: {reason}");
                    socket.conn = None;
                    socket.closed_conn = Some(conn);
                    self.forget_conn(conn);
                    self.start_closing(key, Some(reason));
                }
                Output::Event(event) => log_event(&event, self.core.accounts()),
                Output::VerifyPassword {
                    ticket,
                    peer,
                    hash,
                    password,
                } => {
                    if self.config.metrics.is_some() {
                        self.checks_started.insert(ticket, Instant::now());
                    }
                    self.verifier.submit(ticket, peer, hash, password);
                }
                Output::LoadOffline {
                    conn,
                    user,
                    after_seq,
                    max_bytes,
                } => match self.storage.as_mut() {
                    Some(storage) => storage.load_page(conn, user, after_seq, max_bytes),
                    // Texts stay in the core without a database: never asked.
                    None => error!(%conn, "an offline page was asked for without a database"),
                },
                Output::Persist { batch, changes } => match self.storage.as_mut() {
                    Some(storage) => {
                        if self.config.metrics.is_some() {
                            self.commits_started.insert(batch, Instant::now());
                        }
                        storage.persist(batch, changes);
                    }
                    None => {
                        // Not durable without a database: the core makes no
                        // batches then, but if it did, nothing could fail.
                        let now = self.now();
                        self.core.handle_persisted(batch, Persisted::Committed, now);
                    }
                },
                Output::Publish { to, message } => self.publish(to, &message),
                Output::ClaimSession { claim, user } => match self.storage.as_mut() {
                    Some(storage) => storage.claim(claim, user),
                    None => {
                        // Cluster mode needs a database: never asked.
                        error!(%claim, "a session claim was asked for without a database");
                        let now = self.now();
                        self.core.handle_claim(claim, ClaimOutcome::Failed, now);
                    }
                },
                Output::ReleaseSession { user, claim } => match self.storage.as_mut() {
                    Some(storage) => storage.release(user, claim),
                    None => error!(%claim, "a session release was asked for without a database"),
                },
                other => debug!("unhandled core output {other:?}"),
            }
        }
    }

    // ------------------------------------------------------------------
    // Accepting.
    // ------------------------------------------------------------------

    fn accept_ready(&mut self, index: usize) {
        for _ in 0..ACCEPT_BUDGET {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            let tls = listener.tls.clone();
            let http = listener.http.clone();
            match listener.socket.get().accept() {
                Ok((stream, peer)) => self.admit(stream, peer, tls, http),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_out_of_descriptors(&e) => {
                    warn!("cannot accept: {e}; pausing accepts for {ACCEPT_PAUSE:?}");
                    self.accept_paused_until = Some(self.instant + ACCEPT_PAUSE);
                    return;
                }
                // A connection that failed between the handshake and accept
                // (ECONNABORTED and the like) concerns only that peer.
                Err(e) => debug!("accept failed: {e}"),
            }
        }
        self.rearm_listener(index);
    }

    fn rearm_listener(&self, index: usize) {
        if let Some(listener) = self.listeners.get(index) {
            if let Err(e) = listener.socket.rearm(Event::readable(LISTENER_KEY - index)) {
                warn!("cannot re-arm a listener: {e}");
            }
        }
    }

    /// Lets a new connection in, as [`Admission`] judges it: with a link
    /// of its listener's kind, or refused.
    fn admit(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<TlsConfig>,
        http: Option<Arc<HttpConfig>>,
    ) {
        let now = self.now();
        let scrapes = http.as_ref().is_some_and(|config| config.metrics.is_some());
        let verdict = if scrapes {
            // Apart from the chat's limits, under its own.
            if self.metrics_sockets >= MAX_METRICS_SOCKETS {
                Verdict::Close
            } else {
                Verdict::Accept
            }
        } else {
            self.admission
                .judge(peer, tls.is_some(), self.core.users_online(), now)
        };
        let transport = match verdict {
            Verdict::Close => {
                if let Some(metrics) = &self.config.metrics {
                    metrics.count_refused(None);
                }
                return;
            }
            Verdict::Refuse(reason) => {
                if let Some(metrics) = &self.config.metrics {
                    metrics.count_refused(Some(reason));
                }
                let refusal = Refusal::new(reason, self.core.refusal(reason), http.is_some());
                if tls.is_none() {
                    refuse(stream, &refusal);
                    return;
                }
                Transport::Refused(refusal)
            }
            Verdict::Accept => match http {
                Some(config) => Transport::Http(config),
                None => Transport::Lines,
            },
        };
        let lines = matches!(transport, Transport::Lines);
        if let Err(e) = stream
            .set_nonblocking(true)
            .and_then(|()| configure_socket(&stream, &self.config.limits))
        {
            warn!(%peer, "cannot set up the socket: {e}");
            return;
        }
        let link = match Link::new(
            self.link_config.clone(),
            transport,
            tls.as_ref(),
            self.instant,
        ) {
            Ok(link) => link,
            Err(e) => {
                warn!(%peer, "{e}");
                return;
            }
        };
        let key = self.free_keys.pop().unwrap_or(self.sockets.len());
        let stream = match Registered::new(
            self.poller.clone(),
            stream,
            Event::readable(key),
            self.socket_mode,
        ) {
            Ok(stream) => stream,
            Err(e) => {
                warn!(%peer, "cannot register the socket: {e}");
                self.free_keys.push(key);
                return;
            }
        };
        // Counted from here on; `remove` uncounts it.
        if scrapes {
            self.metrics_sockets += 1;
        } else {
            self.admission.opened(peer);
        }
        let socket = Socket {
            stream,
            peer,
            conn: None,
            closed_conn: None,
            link,
            armed: Some((true, false)),
            dirty: false,
            deadline: None,
            scrapes,
        };
        if key == self.sockets.len() {
            self.sockets.push(Some(socket));
        } else {
            self.sockets[key] = Some(socket);
        }
        // A refusal without a handshake to wait for is queued already.
        self.mark_dirty(key);
        self.sync_deadline(key);
        if lines {
            self.start_session(key);
        } else {
            debug!(%peer, "HTTP connection");
        }
    }

    /// Opens the core's connection for the socket at `key`.
    fn start_session(&mut self, key: usize) {
        let now = self.now();
        let socket = self.sockets[key].as_ref().expect("keys point at sockets");
        let peer = PeerKey::from_ip(socket.peer.ip());
        let conn = self
            .core
            .accept(peer, *uuid::Uuid::new_v4().as_bytes(), now);
        if self.by_conn.len() <= conn.index() {
            self.by_conn.resize(conn.index() + 1, None);
        }
        if let Some((old, old_key)) = self.by_conn[conn.index()] {
            // Only a connection ended here (`end_session`) is still mapped
            // once the core reuses its index: the core does not reuse one
            // whose `Output::Close` is still to come.
            self.by_conn_ended.insert(old, old_key);
        }
        self.by_conn[conn.index()] = Some((conn, key));
        let socket = self.sockets[key].as_mut().expect("keys point at sockets");
        socket.conn = Some(conn);
        let kind = if socket.link.is_websocket() {
            " (WebSocket)"
        } else {
            ""
        };
        info!(peer = %socket.peer, %conn, "connected{kind}");
        self.drain_core();
    }

    // ------------------------------------------------------------------
    // Reading.
    // ------------------------------------------------------------------

    fn socket_ready(&mut self, key: usize, readable: bool) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        if self.socket_mode == PollMode::Oneshot {
            socket.armed = None;
        }
        let phase = socket.link.phase();
        let scrapes = socket.scrapes;
        // Whatever the event, the socket is flushed (if writable, that is
        // the point) and its interest updated at the end of the turn.
        self.mark_dirty(key);
        if !readable {
            return;
        }
        if scrapes && phase == Phase::Open {
            self.refresh_metrics();
        }
        match phase {
            Phase::Open => self.read_input(key),
            Phase::Draining => self.discard_input(key),
            Phase::Flushing => {}
        }
        self.sync_deadline(key);
    }

    /// Reads up to the budget and hands what arrives to the socket's link.
    fn read_input(&mut self, key: usize) {
        let mut total = 0;
        while total < READ_BUDGET {
            let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
                break;
            };
            if !socket.link.takes_input() {
                break;
            }
            let room = self.read_buf.room();
            match self.read_buf.read_from(socket.stream.get()) {
                Ok(data) if data.is_empty() => {
                    let ended = socket.link.eof();
                    self.link_event(key, ended);
                    break;
                }
                Ok(data) => {
                    let short = data.len() < room;
                    total += data.len();
                    self.deliver(key, data);
                    if short && self.socket_mode == PollMode::Level {
                        // Drained for now; a level-triggered poller reports
                        // anything more, so skip the read that would only
                        // say "would block".
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let output_lost = socket.link.output_lost();
                    self.link_event(
                        key,
                        LinkEvent::Ended {
                            why: e.to_string(),
                            output_lost,
                        },
                    );
                    break;
                }
            }
        }
    }

    /// Hands bytes read from the socket at `key` to its link, and what they
    /// carry to the core, one event at a time.
    fn deliver(&mut self, key: usize, data: Bytes) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        socket.link.received(data);
        let now = self.instant;
        while let Some(event) = self
            .sockets
            .get_mut(key)
            .and_then(Option::as_mut)
            .and_then(|s| s.link.poll_event(now))
        {
            if !self.link_event(key, event) {
                break;
            }
        }
    }

    /// Acts on what a link made; whether its input still goes on.
    fn link_event(&mut self, key: usize, event: LinkEvent) -> bool {
        let conn = self.conn_of(key);
        let now = self.now();
        match event {
            LinkEvent::Lines(bytes) => {
                if let Some(conn) = conn {
                    if self.core.handle_input(conn, &bytes, now).is_ok() {
                        self.drain_core();
                    }
                }
            }
            LinkEvent::Message(message) => {
                let Some(conn) = conn else {
                    return true;
                };
                match self.core.handle_message(conn, &message, now) {
                    Ok(()) => self.drain_core(),
                    Err(MessageError::LineBreak) => {
                        let socket = self.sockets[key].as_mut().expect("keys point at sockets");
                        let ended = socket.link.refuse_message();
                        return self.link_event(key, ended);
                    }
                    Err(_) => {}
                }
            }
            LinkEvent::Upgraded => {
                self.mark_dirty(key);
                self.start_session(key);
            }
            LinkEvent::Replied => {
                self.mark_dirty(key);
                // Pongs count toward the backlog like any output: a peer
                // that pings and never reads is a slow consumer.
                if self.enforce_backlog(key) {
                    self.drain_core();
                }
            }
            LinkEvent::Ended { why, output_lost } => {
                if output_lost {
                    // The alert that says why goes out before the close;
                    // nothing else can.
                    if let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
                        let _ = socket.link.write_to(&mut socket.stream.get());
                    }
                }
                self.transport_closed(key, &why);
                if output_lost {
                    self.discard_output(key);
                }
                return false;
            }
        }
        true
    }

    /// Reads and throws away input of a connection being closed.
    fn discard_input(&mut self, key: usize) {
        let mut total = 0;
        let mut finished = false;
        while let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
            match self.read_buf.read_from(socket.stream.get()) {
                Ok(data) if data.is_empty() => finished = true,
                Ok(data) if total + data.len() < READ_BUDGET => {
                    total += data.len();
                    continue;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => finished = true,
            }
            break;
        }
        if finished {
            self.remove(key);
        }
    }

    // ------------------------------------------------------------------
    // Ends of sessions and of sockets.
    // ------------------------------------------------------------------

    /// The transport failed or ended: tell the core, keep flushing what is
    /// queued in case only the peer's sending half closed.
    fn transport_closed(&mut self, key: usize, why: &str) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        if let Some(conn) = socket.conn {
            info!(peer = %socket.peer, %conn, "disconnected: {why}");
            self.end_session(key, conn);
        }
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        // Answers waiting in the core for a commit (and a `bye` behind
        // them) still go out to a peer that closed only its sending half.
        let held = socket
            .closed_conn
            .is_some_and(|conn| self.core.holds_output(conn));
        if socket.link.is_empty() && !held {
            self.remove(key);
        } else {
            self.start_closing(key, None);
        }
    }

    /// Tells the core the session on `key` is gone: what is written so far
    /// counts as delivered; the rest may still go out (only the peer's
    /// sending half may be closed), and the socket's last report settles
    /// it (`remove`).
    fn end_session(&mut self, key: usize, conn: ConnId) {
        self.report_written(key);
        if let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
            socket.conn = None;
            socket.closed_conn = Some(conn);
        }
        // Still mapped (until `remove`): output the core held for a batch
        // reaches the closing socket once the batch is answered.
        let now = self.now();
        if self.core.handle_disconnect(conn, now).is_ok() {
            self.drain_core();
        }
    }

    /// Flushes what is queued on `key`, then hangs up; a WebSocket says
    /// goodbye with the close status for `reason` (the `bye`'s).
    fn start_closing(&mut self, key: usize, reason: Option<ByeReason>) {
        let socket = self.sockets[key].as_mut().expect("keys point at sockets");
        socket.link.start_closing(reason, self.instant);
        self.mark_dirty(key);
    }

    /// Tells the core how much of the output of the socket at `key` is
    /// written, before any of the rest is dropped.
    fn report_written(&mut self, key: usize) {
        let Some(socket) = self.sockets.get(key).and_then(Option::as_ref) else {
            return;
        };
        let Some(conn) = socket.conn.or(socket.closed_conn) else {
            return;
        };
        let unsent = socket.link.unsent_frames();
        let now = self.now();
        if self.core.handle_drained(conn, unsent, now).is_ok() {
            self.drain_core();
        }
    }

    /// Drops the output queued on `key`, unwritten, after telling the core
    /// (for the last time) how much of it was written before.
    fn discard_output(&mut self, key: usize) {
        self.report_written(key);
        if let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
            // That report settled the closed connection's drain: none follows.
            let closed = if socket.conn.is_none() {
                socket.closed_conn.take()
            } else {
                None
            };
            socket.link.discard_output();
            if let Some(conn) = closed {
                // Nor does any output: nothing more is written.
                self.forget_conn(conn);
            }
        }
    }

    /// Drops a socket: the poller forgets it and the descriptor closes.
    fn remove(&mut self, key: usize) {
        if let Some(conn) = self.conn_of(key) {
            // Dropped without the core closing it: it ends here, while the
            // socket can still take what the core hands it meanwhile.
            self.end_session(key, conn);
        }
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::take) else {
            return;
        };
        if let Some(conn) = socket.closed_conn {
            // The socket is gone: whatever the core still sends its closed
            // session is dropped.
            self.forget_conn(conn);
        }
        if let Some(at) = socket.deadline {
            self.deadlines.remove(&(at, key));
        }
        let now = self.now();
        let unsent = socket.link.unsent_frames();
        if let Some(conn) = socket.closed_conn {
            // Its last frames are written, or never will be: that settles
            // which of its offline messages were delivered.
            if self.core.handle_drained(conn, unsent, now).is_ok() {
                self.drain_core();
            }
        }
        debug!(peer = %socket.peer, "socket closed");
        if socket.scrapes {
            self.metrics_sockets -= 1;
        } else {
            self.admission.closed(socket.peer);
        }
        self.free_keys.push(key);
    }

    // ------------------------------------------------------------------
    // Backlogs: the slow-consumer policy is the link's; cutting off is the
    // core's.
    // ------------------------------------------------------------------

    /// Cuts the connection on `key` off as a slow consumer if its unsent
    /// output is over the limit; whether it did.
    fn enforce_backlog(&mut self, key: usize) -> bool {
        if !self.backlog_due(key) {
            return false;
        }
        let socket = self.sockets[key].as_ref().expect("keys point at sockets");
        if let Some(conn) = socket.conn {
            self.cut_off_slow_consumer(key, conn);
        }
        true
    }

    /// Whether the backlog on `key` calls for a cut-off now; starts its
    /// clock when it first goes over the limit.
    fn backlog_due(&mut self, key: usize) -> bool {
        let socket = self.sockets[key].as_mut().expect("keys point at sockets");
        if socket.conn.is_none() {
            return false;
        }
        socket.link.backlog_check(self.instant) == Backlog::CutOff
    }

    /// After a write: a backlog back under the limit starts its clock
    /// afresh.
    fn backlog_written(&mut self, key: usize) {
        if let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
            socket.link.backlog_written();
        }
    }

    /// Cuts `conn` on `key` off as a slow consumer. Only while the core
    /// has no output queued (see `drain_core`); the caller drains the core
    /// after.
    fn cut_off_slow_consumer(&mut self, key: usize, conn: ConnId) {
        let socket = self.sockets[key].as_mut().expect("keys point at sockets");
        let backlog = socket.link.backlog();
        warn!(peer = %socket.peer, %conn, backlog, "slow consumer: cutting it off");
        // What was written counts as delivered; what it has not started
        // reading is dropped (its offline messages stay queued, as the core
        // ends the drain), so the bye goes out next rather than after a
        // megabyte it will never read.
        let unsent = socket.link.unsent_frames();
        socket.link.drop_unstarted();
        let now = self.now();
        // The bye and the close come out of the core with the next outputs.
        let _ = self.core.cut_off_slow_consumer(conn, unsent, now);
    }

    // ------------------------------------------------------------------
    // Deadlines.
    // ------------------------------------------------------------------

    fn handle_deadlines(&mut self) {
        let now = self.instant;
        if let Some((_, timer)) = self
            .core
            .next_timer()
            .filter(|&(t, _)| self.clock.instant(t) <= now)
        {
            debug!("woke for the core's {timer}");
            self.core.handle_timeout(self.clock.at(now));
            self.drain_core();
        }
        while let Some(&(at, key)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
                continue;
            };
            socket.deadline = None;
            match socket.link.timeout(now) {
                Some(Expired::GiveUp) => {
                    debug!(peer = %socket.peer, "close grace period over");
                    self.remove(key);
                    continue;
                }
                Some(Expired::Backlog) => {
                    // Still over since then (a write under the limit stops
                    // the clock; a backlog found under it starts it afresh).
                    self.backlog_written(key);
                    if self.enforce_backlog(key) {
                        // The bye, the close and the presence wait in the core.
                        self.drain_core();
                    }
                }
                None => {}
            }
            self.sync_deadline(key);
        }
        if self.accept_paused_until.is_some_and(|until| until <= now) {
            self.accept_paused_until = None;
            for index in 0..self.listeners.len() {
                self.rearm_listener(index);
            }
        }
    }

    /// Lists the link's deadline on `key` in `deadlines`, as it is now.
    fn sync_deadline(&mut self, key: usize) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        let due = socket.link.deadline();
        if socket.deadline != due {
            if let Some(at) = socket.deadline {
                self.deadlines.remove(&(at, key));
            }
            if let Some(at) = due {
                self.deadlines.insert((at, key));
            }
            socket.deadline = due;
        }
    }

    // ------------------------------------------------------------------
    // Writing.
    // ------------------------------------------------------------------

    /// Writes every socket with new output once, and re-arms interest.
    fn flush_dirty(&mut self) -> io::Result<()> {
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
                continue;
            };
            socket.dirty = false;
            let held = socket
                .closed_conn
                .is_some_and(|conn| self.core.holds_output(conn));
            socket.link.expect_more(held);
            match socket.link.write_to(&mut socket.stream.get()) {
                Ok(Written::ShutDown) => {
                    // Our side is done; the link hears the peer out.
                    let _ = socket.stream.get().shutdown(Shutdown::Write);
                }
                Ok(Written::All | Written::Blocked) => {}
                Err(e) => {
                    // Nothing more can be written: what is queued is
                    // dropped with the socket (and not counted as written).
                    let why = format!("write failed: {e}");
                    self.transport_closed(key, &why);
                    self.remove(key);
                    continue;
                }
            }
            self.backlog_written(key);
            let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
                continue;
            };
            // What is written is delivered; the core hands over the next
            // offline page once at most half a page is unwritten.
            if let Some(conn) = socket.conn {
                let unsent = socket.link.unsent_frames();
                let now = self.now();
                if self.core.handle_drained(conn, unsent, now).is_ok() {
                    self.drain_core();
                }
            }
            self.rearm(key);
            self.sync_deadline(key);
        }
        // Keep the allocation for the next turn.
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
        Ok(())
    }

    fn rearm(&mut self, key: usize) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        let (read, write) = socket.link.interest();
        if socket.armed == Some((read, write)) {
            return;
        }
        let interest = match (read, write) {
            (true, true) => Event::all(key),
            (true, false) => Event::readable(key),
            (false, true) => Event::writable(key),
            (false, false) => Event::none(key),
        };
        match socket.stream.rearm(interest) {
            Ok(()) => socket.armed = Some((read, write)),
            Err(e) => {
                let why = format!("cannot re-arm: {e}");
                self.transport_closed(key, &why);
                self.remove(key);
            }
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) {
            if !socket.dirty {
                socket.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    // ------------------------------------------------------------------
    // Stopping, and the connection table.
    // ------------------------------------------------------------------

    fn begin_shutdown(&mut self) -> io::Result<()> {
        self.config.health.set_stopping();
        let deadline = self.instant + self.config.shutdown_grace;
        info!(
            connections = self.admission.open(),
            "shutting down: saying bye to every connection"
        );
        crate::service::stopping();
        self.shutdown_deadline = Some(deadline);
        self.listeners.clear();
        // Requests still being read have no session to say bye to; a kept
        // HTTP connection still writing an answer finishes it first.
        let requests: Vec<usize> = (0..self.sockets.len())
            .filter(|&key| {
                self.sockets[key]
                    .as_ref()
                    .is_some_and(|s| s.link.is_http_request())
            })
            .collect();
        for key in requests {
            let answering = self.sockets[key]
                .as_ref()
                .is_some_and(|s| s.link.has_output());
            if answering {
                self.start_closing(key, None);
            } else {
                self.remove(key);
            }
        }
        self.accept_paused_until = None;
        let now = self.now();
        self.core.shutdown(now);
        self.drain_core();
        #[cfg(feature = "nats")]
        if let Some(bus) = self.bus.as_mut() {
            bus.flush();
        }
        if self.node_beat_at.take().is_some() {
            // After the shutdown's releases, in order: no heartbeat after.
            if let Some(storage) = self.storage.as_mut() {
                storage.leave();
            }
        }
        self.flush_dirty()
    }

    /// The core connection of the socket at `key`, while it has one.
    fn conn_of(&self, key: usize) -> Option<ConnId> {
        self.sockets
            .get(key)
            .and_then(Option::as_ref)
            .and_then(|s| s.conn)
    }

    fn key_of(&self, conn: ConnId) -> Option<usize> {
        match self.by_conn.get(conn.index()) {
            Some(Some((c, key))) if *c == conn => Some(*key),
            _ if self.by_conn_ended.is_empty() => None,
            _ => self.by_conn_ended.get(&conn).copied(),
        }
    }

    fn forget_conn(&mut self, conn: ConnId) {
        if let Some(slot) = self.by_conn.get_mut(conn.index()) {
            if matches!(slot, Some((c, _)) if *c == conn) {
                *slot = None;
                return;
            }
        }
        self.by_conn_ended.remove(&conn);
    }
}

/// Refused at once (no TLS to wait for): say why and hang up. The answer
/// is tiny and the socket's send buffer empty, so one non-blocking write
/// suffices.
fn refuse(stream: TcpStream, refusal: &Refusal) {
    let _ = stream.set_nonblocking(true);
    let mut output = OutputQueue::default();
    refusal.queue(&mut output);
    let _ = output.write_to(&mut &stream);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Socket options every accepted connection gets.
fn configure_socket(stream: &TcpStream, limits: &Limits) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    // A backlog must not hide in the kernel, where the slow-consumer check
    // cannot see it (Linux grows send buffers to megabytes).
    socket.set_send_buffer_size(SEND_BUFFER_BYTES)?;
    // A peer that vanishes without a FIN or RST (its network gone) is found
    // dead by keepalive probes, or by unacknowledged data.
    if let Some(idle) = limits.tcp_keepalive {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval((idle / 3).max(Duration::from_secs(1)))
            .with_retries(3);
        socket.set_tcp_keepalive(&keepalive)?;
    }
    #[cfg(target_os = "linux")]
    if let Some(timeout) = limits.tcp_user_timeout {
        socket.set_tcp_user_timeout(Some(timeout))?;
    }
    Ok(())
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE and ENFILE; `io::ErrorKind` has no stable kind for them.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Logs a core event. A name typed at a login is logged only if it is an
/// account: people type passwords into the name field too.
fn log_event(event: &CoreEvent, accounts: &chatproto::Accounts) {
    match event {
        CoreEvent::LoggedIn { conn, user } => info!(%conn, %user, "logged in"),
        CoreEvent::LoginRefused { conn, user, code } if accounts.contains(user.as_str()) => {
            info!(%conn, %user, %code, "login refused")
        }
        CoreEvent::LoginRefused { conn, code, .. } => {
            info!(%conn, %code, "login refused (the name is no account)")
        }
        CoreEvent::Locked { user, .. } if !accounts.contains(user.as_str()) => {
            warn!("a name that is no account locked after failed logins")
        }
        CoreEvent::Locked { user, until } => warn!(%user, %until, "locked after failed logins"),
        CoreEvent::LoggedOut { conn, user } => info!(%conn, %user, "logged out"),
        CoreEvent::Flooding { conn } => warn!(%conn, "flooding past its rate limit: closing"),
        CoreEvent::NodeLost { node, last_heard } => warn!(
            node = %node.as_uuid(),
            %last_heard,
            "a node was not heard from for its lease: its users are offline"
        ),
        CoreEvent::AccountsDiffer { node } => error!(
            node = %node.as_uuid(),
            "a node serves other accounts than this one: every node must load the same credentials; /readyz is 503 on whichever nodes differ from most"
        ),
        CoreEvent::NodeExpired { silent_for } => error!(
            silent_ms = silent_for.as_millis(),
            "this node was silent for longer than its lease (frozen, or its event loop stalled), so the cluster gave it up: closed every connection (bye node_expired) and joined again"
        ),
        other => debug!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_get_keepalive_a_user_timeout_and_a_small_send_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let limits = Limits {
            tcp_keepalive: Some(Duration::from_secs(30)),
            tcp_user_timeout: Some(Duration::from_secs(60)),
            ..Limits::default()
        };
        configure_socket(&accepted, &limits).unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(60))
        );
        // Linux reports twice what was set (it counts its own overhead).
        let sndbuf = socket.send_buffer_size().unwrap();
        assert!(sndbuf <= 2 * SEND_BUFFER_BYTES, "{sndbuf}");
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn reads_are_handed_on_without_a_copy_and_the_buffer_is_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let mut buf = ReadBuffer::new();
        io::Write::write_all(&mut client, &[7; 100]).unwrap();
        let first = buf.read_from(&accepted).unwrap();
        assert_eq!(&first[..], &[7; 100]);
        let base = first.as_ptr();
        drop(first);
        // Filled past the refill point, with nothing kept: the same memory.
        let mut pieces = 0;
        while buf.0.len() >= MIN_READ {
            io::Write::write_all(&mut client, &[8; 4096]).unwrap();
            let mut got = 0;
            while got < 4096 {
                got += buf.read_from(&accepted).unwrap().len();
            }
            pieces += 1;
        }
        assert!(pieces > 1);
        io::Write::write_all(&mut client, b"x").unwrap();
        assert_eq!(buf.read_from(&accepted).unwrap().as_ptr(), base);
        drop(client);
        assert!(buf.read_from(&accepted).unwrap().is_empty(), "the end");
    }
}
