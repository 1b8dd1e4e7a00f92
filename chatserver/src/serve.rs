//! Start-up: from [`Settings`] to a running reactor. Reads the accounts,
//! sizes the connection limit to the open-file limit, binds the listeners,
//! opens the database, builds the core, installs the signal handlers, and
//! serves until a signal stops it. SIGHUP reloads the credentials file
//! (as ngIRCd and InspIRCd rehash): read on the signal thread, off the
//! event loop, and handed to the reactor ([`AccountsHandle`]); a file with
//! a mistake leaves the accounts in use as they are.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chatproto::{ClusterConfig, NodeId, Output, Persisted, Server, Snapshot};
use tracing::{error, info, warn};

use crate::bus::Subjects;
use crate::cli::Settings;
use crate::clock::Clock;
use crate::credentials::{self, CredentialsError};
use crate::database::{Database, DatabaseError};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::reactor::{AccountsHandle, BusConfig, Listener, Reactor, ReactorConfig, StopHandle};
use crate::tls::{self, TlsError};
use crate::{cpu, http, origin};

/// Descriptors kept free of connections: the listener, the poller, logs.
const RESERVED_DESCRIPTORS: u64 = 32;

/// Why the server could not start, or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The credentials file.
    #[error("{0}")]
    Credentials(#[from] CredentialsError),
    /// `--max-connections` past what the open-file limit allows: accepts
    /// would fail with EMFILE and the server would stall instead of saying
    /// `server_full`.
    #[error("--max-connections {requested} is more than the open-file limit allows ({allowed}: {descriptors} descriptors, less {RESERVED_DESCRIPTORS} for the server itself); raise the limit (ulimit -n) or lower --max-connections")]
    TooManyConnections {
        /// What was asked for.
        requested: usize,
        /// What the limit allows.
        allowed: usize,
        /// The open-file limit.
        descriptors: u64,
    },
    /// The TLS certificate or key.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// A listener cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A bound listener's address cannot be read.
    #[error("{0}")]
    LocalAddr(io::Error),
    /// The database cannot be opened or used.
    #[error("{0}")]
    Database(#[from] DatabaseError),
    /// The first commit (users online when the last run stopped, now
    /// recorded offline) failed.
    #[error("cannot write to the database: {0}")]
    FirstCommit(DatabaseError),
    /// The core refuses its configuration.
    #[error("{0}")]
    Config(#[from] chatproto::ConfigError),
    /// `--reactor-cpu` names a CPU this process may not use.
    #[error("--reactor-cpu {cpu}: not a CPU this process may run on (it may use {allowed:?})")]
    ReactorCpu {
        /// The CPU asked for.
        cpu: usize,
        /// The CPUs allowed.
        allowed: Vec<usize>,
    },
    /// The event loop cannot be pinned to its CPU.
    #[error("--reactor-cpu {cpu}: {source}")]
    Pin {
        /// The CPU asked for.
        cpu: usize,
        /// Why.
        source: io::Error,
    },
    /// The reactor (its poller, its listeners, its check and storage
    /// threads) cannot start.
    #[error("cannot start the event loop: {0}")]
    Start(io::Error),
    /// SIGINT, SIGTERM and SIGHUP cannot be caught.
    #[error("cannot install the signal handlers: {0}")]
    Signals(io::Error),
    /// `--pid-file` cannot be written.
    #[error("--pid-file {}: {source}", path.display())]
    PidFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The event loop failed.
    #[error("the event loop failed: {0}")]
    EventLoop(io::Error),
}

/// Serves with `settings` until SIGINT or SIGTERM (then says `bye` to
/// every connection, flushes, and returns `Ok`); SIGHUP reloads the
/// credentials file.
pub fn serve(settings: Settings) -> Result<(), ServeError> {
    let accounts = credentials::load(&settings.credentials)?;
    // What the configuration file said at start-up: a reload compares.
    let config_file = settings.config_file.clone().map(|path| {
        let text = std::fs::read(&path).unwrap_or_default();
        (path, text)
    });
    let demo = credentials::demo_accounts_in(&accounts);
    if !demo.is_empty() {
        warn!(
            "serving demo accounts with published passwords ({}): use your own credentials file for anything but a demo",
            demo.join(", ")
        );
    }
    let plaintext = accounts.plaintext_count();
    if plaintext > 0 {
        warn!(
            "{plaintext} of {} accounts in {} have plaintext passwords: replace them with hashes from `chatserver hash-password`",
            accounts.len(),
            settings.credentials.display()
        );
    }
    for admin in &settings.core.admins {
        if !accounts.contains(admin.as_str()) {
            warn!(
                "--admin {admin}: no such account in {}",
                settings.credentials.display()
            );
        }
    }

    let descriptors = raise_descriptor_limit();
    let allowed = usize::try_from(descriptors.saturating_sub(RESERVED_DESCRIPTORS).max(1))
        .unwrap_or(usize::MAX);
    let max_connections = match settings.max_connections {
        Some(requested) if requested > allowed => {
            return Err(ServeError::TooManyConnections {
                requested,
                allowed,
                descriptors,
            })
        }
        Some(n) => n,
        None => allowed,
    };

    let tls = match &settings.tls {
        Some((cert, key)) => Some(tls::server_config(cert, key)?),
        None => None,
    };
    let listener = bind(settings.listen)?;
    let local = listener.local_addr().map_err(ServeError::LocalAddr)?;
    let mut listeners = vec![Listener {
        socket: listener,
        // TLS on --listen itself, unless it has an address of its own.
        tls: tls.clone().filter(|_| settings.tls_listen.is_none()),
        http: None,
    }];
    let mut tls_local = None;
    if let (Some(addr), Some(tls)) = (settings.tls_listen, &tls) {
        let socket = bind(addr)?;
        tls_local = Some(socket.local_addr().map_err(ServeError::LocalAddr)?);
        listeners.push(Listener {
            socket,
            tls: Some(tls.clone()),
            http: None,
        });
    }
    let mut http_url = None;
    // What `/readyz` reports: the reactor writes it, the listener reads it.
    let health = Health::default();
    if let Some(addr) = settings.http {
        let socket = bind(addr)?;
        let bound = socket.local_addr().map_err(ServeError::LocalAddr)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        http_url = Some(format!("{scheme}://{bound}/"));
        let origins = origin::Origins::new(
            tls.is_some(),
            bound,
            &settings.public_hosts,
            settings.allowed_origins.clone(),
        );
        if !origins.knows_the_pages_own() {
            warn!(
                "--http {bound} listens on every address, so which name browsers reach the page at is unknown: their WebSocket sessions will be refused (403) unless --public-host names it (or --allow-origin its origin)"
            );
        }
        listeners.push(Listener {
            socket,
            // With TLS configured, the page and its WebSocket are HTTPS/WSS.
            tls: tls.clone(),
            http: Some(Arc::new(http::HttpConfig {
                origins,
                health: health.clone(),
                tls: tls.is_some(),
                metrics: None,
            })),
        });
    }
    // Apart from the public listeners: plain HTTP, /metrics and the
    // health checks only.
    let mut metrics = None;
    let mut metrics_url = None;
    if let Some(addr) = settings.metrics {
        let socket = bind(addr)?;
        let bound = socket.local_addr().map_err(ServeError::LocalAddr)?;
        metrics_url = Some(format!("http://{bound}{}", crate::metrics::METRICS_PATH));
        let registry = Metrics::new();
        listeners.push(Listener {
            socket,
            tls: None,
            http: Some(Arc::new(http::HttpConfig {
                origins: origin::Origins::new(false, bound, &[], Vec::new()),
                health: health.clone(),
                tls: false,
                metrics: Some(registry.clone()),
            })),
        });
        metrics = Some(registry);
    }

    let (database, snapshot) = match &settings.database {
        Some(location) => {
            let (db, snapshot) = Database::open(location)?;
            if let Some(pages) = settings.db_max_pages {
                db.set_max_pages(pages)?;
            }
            (Some(db), snapshot)
        }
        None => {
            info!("no database: state lasts until the server stops");
            (None, Snapshot::default())
        }
    };

    let clock = Clock::start();
    let account_count = accounts.len();
    let mut core_config = settings.core;
    // A new node id at every start: a node given up for dead that comes
    // back is a new node to the others.
    let bus = settings.cluster.as_ref().map(|cluster| {
        let node = NodeId::new(uuid::Uuid::new_v4());
        let mut config = ClusterConfig::new(node);
        config.lease = cluster.lease;
        config.heartbeat_every = cluster.heartbeat_every;
        config.name = cluster.node_name.clone();
        config.accounts_digest = credentials::digest(&accounts);
        core_config.cluster = Some(config);
        info!(
            node = %node.as_uuid(),
            name = %cluster.node_name,
            cluster = %cluster.name,
            nats = %cluster.nats,
            lease_secs = cluster.lease.as_secs(),
            "cluster mode: joining"
        );
        BusConfig {
            url: cluster.nats.clone(),
            subjects: Subjects::new(&cluster.name, node),
            client_name: format!("chatserver {} ({})", cluster.node_name, node.as_uuid()),
        }
    });
    // Changes leave the core in batches for the storage thread; output
    // waits for the batches it depends on, and a failed one is taken back.
    core_config.durable = database.is_some();
    let (mut core, restored) =
        Server::with_snapshot(core_config, accounts, &snapshot, clock.now())?;
    if let Some(location) = &settings.database {
        info!(
            offline_messages = restored.offline_messages,
            blocks = restored.blocks,
            last_seen = restored.last_seen,
            lockouts = restored.lockouts,
            skipped = restored.skipped,
            "loaded {}",
            location
        );
        if restored.skipped > 0 {
            warn!(
                skipped = restored.skipped,
                "the database names users the credentials file does not have; their entries are kept, unused: they come back if the accounts are in the file at a later start, but an account of such a name added by a reload (SIGHUP) starts empty and its old entries are deleted"
            );
        }
    }
    // Users online when the last run stopped are now recorded offline,
    // before serving: a database that cannot be written to is a start-up
    // error, not a first batch that fails.
    let mut database = database;
    if let Some(db) = database.as_mut() {
        while let Some(output) = core.poll_output() {
            if let Output::Persist { batch, changes } = output {
                for change in changes {
                    db.record(change);
                }
                db.commit().map_err(ServeError::FirstCommit)?;
                core.handle_persisted(batch, Persisted::Committed, clock.now());
            }
        }
    }

    let config = ReactorConfig {
        max_connections,
        max_output_bytes: settings.max_output_bytes,
        limits: settings.limits,
        verify_threads: settings.verify_threads,
        verify_cpu_percent: settings.verify_cpu_percent,
        reactor_cpu: settings.reactor_cpu,
        shutdown_grace: settings.shutdown_grace,
        health,
        metrics,
        bus,
    };
    if let Some(cpu) = settings.reactor_cpu {
        let allowed = cpu::allowed().unwrap_or_default();
        if !allowed.contains(&cpu) {
            return Err(ServeError::ReactorCpu { cpu, allowed });
        }
    }
    let mut reactor = match database {
        Some(db) => Reactor::with_database(listeners, core, db, clock, config),
        None => Reactor::new(listeners, core, clock, config),
    }
    .map_err(ServeError::Start)?;
    let reload = Reload {
        accounts: reactor.accounts_handle(),
        credentials: settings.credentials.clone(),
        config_file,
        cluster: settings.cluster.is_some(),
    };
    handle_signals(reactor.stop_handle(), reload)?;
    // After the check threads started (they must not inherit it).
    if let Some(cpu) = settings.reactor_cpu {
        cpu::pin_current_thread(&[cpu]).map_err(|source| ServeError::Pin { cpu, source })?;
    }
    match (tls.is_some(), tls_local) {
        (true, None) => info!(
            accounts = account_count,
            max_connections, "listening on {local} with TLS (connect with: chatcli --tls {local})"
        ),
        (_, Some(tls_local)) => info!(
            accounts = account_count,
            max_connections,
            "listening on {local} (connect with: chatcli {local}, or nc); TLS on {tls_local}"
        ),
        _ => info!(
            accounts = account_count,
            max_connections, "listening on {local} (connect with: chatcli {local}, or nc)"
        ),
    }
    if let Some(url) = http_url {
        info!("serving the chat page on {url} (WebSocket at {url}ws)");
    }
    if let Some(url) = metrics_url {
        info!("serving metrics on {url} (and /healthz, /readyz)");
    }
    let pid_file = settings
        .pid_file
        .as_deref()
        .map(PidFile::write)
        .transpose()?;
    crate::service::ready(&format!("serving on {local}"));
    reactor.run().map_err(ServeError::EventLoop)?;
    drop(pid_file);
    info!("stopped");
    Ok(())
}

/// What SIGHUP reloads.
struct Reload {
    accounts: AccountsHandle,
    credentials: PathBuf,
    /// The configuration file and what it held at start-up.
    config_file: Option<(PathBuf, Vec<u8>)>,
    cluster: bool,
}

impl Reload {
    /// Reads the credentials file again and hands its accounts to the
    /// reactor; a file with a mistake changes nothing.
    fn run(&self) {
        info!("SIGHUP: reloading {}", self.credentials.display());
        match credentials::load(&self.credentials) {
            Ok(accounts) => {
                let digest = credentials::digest(&accounts);
                self.accounts.replace(accounts, digest);
                if self.cluster {
                    info!("cluster mode: every node's credentials file must hold the same accounts, each node reloaded; a node whose accounts differ from most nodes' is not ready (/readyz) until they agree");
                }
            }
            Err(e) => error!("{e}: the accounts in use are unchanged"),
        }
        if let Some((path, loaded)) = &self.config_file {
            match std::fs::read(path) {
                Ok(now) if now == *loaded => {}
                Ok(_) => warn!(
                    "{} changed since start-up: restart the server to apply it (SIGHUP reloads only the credentials file)",
                    path.display()
                ),
                Err(e) => warn!("cannot read {}: {e}", path.display()),
            }
        }
    }
}

/// SIGINT and SIGTERM stop the reactor (a second one ends the process at
/// once); SIGHUP reloads. Signals are taken on a thread of their own and
/// reloads run on another, so that neither a slow file (a FIFO, a hung
/// network mount) nor the event loop holds the other up.
#[cfg(unix)]
fn handle_signals(stop: StopHandle, reload: Reload) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .map_err(ServeError::Signals)?;
    // One reload waiting is enough: it reads the file as it is by then.
    let (ask, asked) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("reload".to_owned())
        .spawn(move || {
            for () in asked {
                reload.run();
            }
        })
        .map_err(ServeError::Signals)?;
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            let mut stopping = false;
            for signal in signals.forever() {
                match signal {
                    SIGHUP => {
                        let _ = ask.try_send(());
                    }
                    _ if stopping => {
                        // Every acknowledged change is committed already:
                        // only the goodbyes of the shutdown are cut short.
                        error!("a second stop signal: exiting at once");
                        std::process::exit(1);
                    }
                    _ => {
                        stopping = true;
                        stop.stop();
                    }
                }
            }
        })
        .map_err(ServeError::Signals)?;
    Ok(())
}

/// Ctrl-C (or the console closing) stops the reactor; there is no SIGHUP
/// to reload on.
#[cfg(not(unix))]
fn handle_signals(stop: StopHandle, reload: Reload) -> Result<(), ServeError> {
    drop(reload);
    ctrlc::set_handler(move || stop.stop()).map_err(|e| ServeError::Signals(io::Error::other(e)))
}

/// `--pid-file`: written once the server serves, removed when it stops.
struct PidFile {
    path: PathBuf,
    contents: String,
}

impl PidFile {
    /// Writes this process's id, replacing the file in one rename (a
    /// reader never sees it half written). The temporary file is a new
    /// one of a random name, so a link planted beside the target cannot
    /// redirect the write.
    fn write(path: &Path) -> Result<PidFile, ServeError> {
        use std::io::Write;
        let error = |source| ServeError::PidFile {
            path: path.to_owned(),
            source,
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let contents = format!("{}\n", std::process::id());
        let mut temporary = tempfile::NamedTempFile::new_in(dir).map_err(error)?;
        temporary.write_all(contents.as_bytes()).map_err(error)?;
        // Readable by the `user` commands of whoever may signal us.
        #[cfg(unix)]
        std::fs::set_permissions(
            temporary.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .map_err(error)?;
        temporary.persist(path).map_err(|e| error(e.error))?;
        Ok(PidFile {
            path: path.to_owned(),
            contents,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // A server started while this one finished its shutdown may have
        // written its own id there since: that file is left alone.
        match std::fs::read_to_string(&self.path) {
            Ok(contents) if contents == self.contents => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).map_err(|source| ServeError::Listen { addr, source })
}

/// Raises the soft open-file limit to the hard limit; returns the limit in
/// force.
fn raise_descriptor_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            warn!("cannot raise the open-file limit: {e}");
            1024
        }
    }
}
