//! `chatserver`: serves the chatproto protocol over TCP.
//!
//! This binary owns what the sans-IO core leaves out: sockets (a `polling`
//! reactor), time, signals, configuration and logs.

mod cli;
mod clock;
mod cpu;
mod credentials;
mod database;
mod hash_password;
mod http;
mod logging;
mod origin;
mod output_queue;
mod reactor;
mod registration;
mod storage;
mod tls;
mod verifier;
mod websocket;

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chatproto::{Output, Persisted, Server, Snapshot};
use clap::Parser;
use tracing::{info, warn};

use crate::cli::{Args, Settings};
use crate::clock::Clock;
use crate::database::Database;
use crate::reactor::{Listener, Reactor, ReactorConfig};
use crate::storage::Storage;

#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Descriptors kept free of connections: the listener, the poller, logs.
const RESERVED_DESCRIPTORS: u64 = 32;

fn main() -> ExitCode {
    // A subcommand beside the positional form `PORT BLOCK TIMEOUT`, so it
    // is told apart by hand.
    if std::env::args().nth(1).as_deref() == Some("hash-password") {
        return hash_password::run(std::env::args().skip(2).collect());
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            eprintln!(
                "chatserver: {}; try 'chatserver --help'",
                first_line(&e.to_string())
            );
            return ExitCode::from(2);
        }
    };
    let settings = match args.into_settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("chatserver: {e}; try 'chatserver --help'");
            return ExitCode::from(2);
        }
    };
    logging::init();
    match serve(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatserver: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(settings: Settings) -> Result<(), String> {
    let accounts = credentials::load(&settings.credentials).map_err(|e| e.to_string())?;
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
        // Past the open-file limit, accepts would fail with EMFILE and the
        // server would stall instead of saying `server_full`.
        Some(n) if n > allowed => {
            return Err(format!(
                "--max-connections {n} is more than the open-file limit allows ({allowed}: {descriptors} descriptors, less {RESERVED_DESCRIPTORS} for the server itself); raise the limit (ulimit -n) or lower --max-connections"
            ))
        }
        Some(n) => n,
        None => allowed,
    };

    let tls = match &settings.tls {
        Some((cert, key)) => Some(tls::server_config(cert, key).map_err(|e| e.to_string())?),
        None => None,
    };
    let listener = TcpListener::bind(settings.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let mut listeners = vec![Listener {
        socket: listener,
        // TLS on --listen itself, unless it has an address of its own.
        tls: tls.clone().filter(|_| settings.tls_listen.is_none()),
        http: None,
    }];
    let mut tls_local = None;
    if let (Some(addr), Some(tls)) = (settings.tls_listen, &tls) {
        let socket =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tls_local = Some(socket.local_addr().map_err(|e| e.to_string())?);
        listeners.push(Listener {
            socket,
            tls: Some(tls.clone()),
            http: None,
        });
    }
    let mut http_url = None;
    if let Some(addr) = settings.http {
        let socket =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let bound = socket.local_addr().map_err(|e| e.to_string())?;
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
            http: Some(Arc::new(http::HttpConfig { origins })),
        });
    }

    let (database, snapshot) = match &settings.database {
        Some(path) => {
            let (db, snapshot) = Database::open(path).map_err(|e| e.to_string())?;
            if let Some(pages) = settings.db_max_pages {
                db.set_max_pages(pages).map_err(|e| e.to_string())?;
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
    // Changes leave the core in batches for the storage thread; output
    // waits for the batches it depends on, and a failed one is taken back.
    core_config.durable = database.is_some();
    let (mut core, restored) = Server::with_snapshot(core_config, accounts, &snapshot, clock.now())
        .map_err(|e| e.to_string())?;
    if let Some(path) = &settings.database {
        info!(
            offline_messages = restored.offline_messages,
            blocks = restored.blocks,
            last_seen = restored.last_seen,
            lockouts = restored.lockouts,
            skipped = restored.skipped,
            "loaded {}",
            path.display()
        );
        if restored.skipped > 0 {
            warn!(
                skipped = restored.skipped,
                "the database names users the credentials file does not have; their entries are kept in the file but not used"
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
                db.commit()
                    .map_err(|e| format!("cannot write to the database: {e}"))?;
                core.handle_persisted(batch, Persisted::Committed, clock.now());
            }
        }
    }

    let poller =
        Arc::new(polling::Poller::new().map_err(|e| format!("cannot create the poller: {e}"))?);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (stop, poller) = (stop.clone(), poller.clone());
        ctrlc::set_handler(move || {
            stop.store(true, Ordering::SeqCst);
            let _ = poller.notify();
        })
        .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    }
    let config = ReactorConfig {
        max_connections,
        max_output_bytes: settings.max_output_bytes,
        limits: settings.limits,
        verify_threads: settings.verify_threads,
        verify_cpu_percent: settings.verify_cpu_percent,
        reactor_cpu: settings.reactor_cpu,
        shutdown_grace: settings.shutdown_grace,
    };
    if let Some(n) = settings.reactor_cpu {
        let allowed = cpu::allowed().unwrap_or_default();
        if !allowed.contains(&n) {
            return Err(format!(
                "--reactor-cpu {n}: not a CPU this process may run on (it may use {allowed:?})"
            ));
        }
    }
    let storage = database
        .map(|db| Storage::start(db, poller.clone()))
        .transpose()
        .map_err(|e| format!("cannot start the storage thread: {e}"))?;
    let mut reactor = Reactor::new(listeners, core, storage, clock, config, stop, poller)
        .map_err(|e| e.to_string())?;
    // After the check threads started (they must not inherit it).
    if let Some(n) = settings.reactor_cpu {
        cpu::pin_current_thread(&[n]).map_err(|e| format!("--reactor-cpu {n}: {e}"))?;
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
    reactor
        .run()
        .map_err(|e| format!("the event loop failed: {e}"))?;
    info!("stopped");
    Ok(())
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

fn first_line(s: &str) -> &str {
    let line = s.lines().next().unwrap_or(s);
    line.strip_prefix("error: ").unwrap_or(line)
}
