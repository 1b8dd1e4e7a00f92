//! `GET /metrics` on the `--metrics` listener: what the server did and
//! holds, in the Prometheus text format, with the Prometheus project's
//! Rust client (`prometheus-client`).
//!
//! Three sources feed it:
//! - the core's own counters ([`chatproto::ServerStats`]: logins, messages,
//!   broadcasts, presence, errors) and state (users online, offline
//!   queues, locked accounts), with the reactor's sockets by transport:
//!   copied into [`Figures`] by the reactor just before it reads a
//!   request on the metrics listener (at most every 100 ms), so a scrape
//!   sees the state of its own moment and nothing is copied while nobody
//!   scrapes;
//! - what only the driver sees, kept live here: `bye` frames by reason,
//!   connections refused at the door, commit batches by result, and the
//!   latency histograms (password checks, commits, event-loop turns);
//! - the process (CPU, memory, descriptors), read from `/proc` at each
//!   scrape (Linux).
//!
//! Names follow the Prometheus conventions: a `chatserver_` prefix, base
//! units in the name (`_seconds`, `_bytes`), `_total` on counters (which
//! the encoder adds), the standard `process_` names. No label carries a
//! user name or a message: labels are closed sets (a transport, a result,
//! a reason, an error code).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chatproto::{ByeReason, ErrorCode, QueueSize, ServerStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The path served on the metrics listener.
pub const METRICS_PATH: &str = "/metrics";

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The server's metrics: one per server, shared by the reactor (which
/// records), the storage and check threads' results (recorded by the
/// reactor), and the metrics listener (which renders).
///
/// ```
/// use chatserver::metrics::{Figures, Metrics};
///
/// let metrics = Metrics::new();
/// metrics.set_figures(Figures { users_online: 3, ..Figures::default() });
/// let text = metrics.render();
/// assert!(text.contains("\nchatserver_users_online 3\n"));
/// assert!(text.contains("# TYPE chatserver_logins_total counter"));
/// ```
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    figures: Arc<Mutex<Figures>>,
    byes: Family<[(&'static str, &'static str); 1], Counter>,
    refused: Family<[(&'static str, &'static str); 1], Counter>,
    commit_batches: Family<[(&'static str, &'static str); 1], Counter>,
    commit_seconds: Histogram,
    password_check_seconds: Histogram,
    turn_seconds: Histogram,
    /// The text last rendered, and when: served again for
    /// [`RENDER_REUSE`].
    rendered: Mutex<Option<(Instant, Arc<str>)>>,
}

/// How long a rendering is served again: scrapes come every few seconds,
/// but a hostile client may ask for many at once.
const RENDER_REUSE: Duration = Duration::from_millis(100);

/// What the reactor copies in before a scrape.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// The core's counters.
    pub stats: ServerStats,
    /// Sockets open, by what they carry.
    pub connections: Connections,
    /// Users logged in on this server.
    pub users_online: usize,
    /// What the offline queues hold, all users together.
    pub offline: QueueSize,
    /// Accounts locked by failed logins now.
    pub locked_accounts: usize,
    /// Password checks asked for and not yet answered.
    pub pending_password_checks: usize,
    /// The core's connections, logged in or not (`debug server`'s
    /// `connections`).
    pub sessions: usize,
}

/// Sockets open, by transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connections {
    /// Protocol lines over plain TCP.
    pub tcp: usize,
    /// Protocol lines over TLS.
    pub tls: usize,
    /// WebSocket sessions (over TLS or not).
    pub websocket: usize,
    /// HTTP requests not (or not yet) upgraded: the page, health checks,
    /// scrapes.
    pub http: usize,
    /// Refused at the door, being told why (on a TLS listener, once the
    /// handshake is done).
    pub refusing: usize,
}

impl Metrics {
    /// Every metric, at zero.
    pub fn new() -> Arc<Metrics> {
        let figures = Arc::new(Mutex::new(Figures::default()));
        let byes: Family<[(&'static str, &'static str); 1], Counter> = Family::default();
        let refused: Family<[(&'static str, &'static str); 1], Counter> = Family::default();
        let commit_batches: Family<[(&'static str, &'static str); 1], Counter> = Family::default();
        // Every series from the start, at zero: a rate over the first
        // event, and an alert on absence, need them there before it.
        for reason in ByeReason::ALL {
            let _ = byes.get_or_create(&[("reason", reason.as_str())]);
            let _ = refused.get_or_create(&[("reason", reason.as_str())]);
        }
        let _ = refused.get_or_create(&[("reason", SILENT)]);
        for result in ["committed", "failed"] {
            let _ = commit_batches.get_or_create(&[("result", result)]);
        }
        // From 100 µs (a group commit on a local disk) to 5 s.
        let commit_seconds = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0,
        ]);
        // Argon2id takes tens of milliseconds; a queue behind a login
        // storm, seconds.
        let password_check_seconds = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        // From 10 µs (one frame) to 1 s (a stall).
        let turn_seconds = Histogram::new([
            0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
            0.05, 0.1, 0.25, 0.5, 1.0,
        ]);
        let mut registry = Registry::default();
        registry.register(
            "chatserver_byes",
            "Sessions ended with a bye frame, by reason",
            byes.clone(),
        );
        registry.register(
            "chatserver_connections_refused",
            "Connections refused at the door, by reason (silent: closed without a word)",
            refused.clone(),
        );
        registry.register(
            "chatserver_commit_batches",
            "Batches of changes answered by the database, by result",
            commit_batches.clone(),
        );
        registry.register(
            "chatserver_commit_duration_seconds",
            "Time from a batch's hand-over to the storage thread to its answer",
            commit_seconds.clone(),
        );
        registry.register(
            "chatserver_password_check_duration_seconds",
            "Time from a password check's request to its verdict, queueing included",
            password_check_seconds.clone(),
        );
        registry.register(
            "chatserver_event_loop_turn_duration_seconds",
            "Time the event loop spent serving one wake-up",
            turn_seconds.clone(),
        );
        registry.register_collector(Box::new(FiguresCollector(figures.clone())));
        registry.register_collector(Box::new(ProcessCollector));
        Arc::new(Metrics {
            registry,
            figures,
            byes,
            refused,
            commit_batches,
            commit_seconds,
            password_check_seconds,
            turn_seconds,
            rendered: Mutex::new(None),
        })
    }

    /// Everything, in the Prometheus text format (version 0.0.4); the
    /// same text for 100 ms.
    pub fn render(&self) -> Arc<str> {
        let mut rendered = self.rendered.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some((at, text)) = rendered.as_ref() {
            if now.saturating_duration_since(*at) < RENDER_REUSE {
                return text.clone();
            }
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        let text: Arc<str> = text.into();
        *rendered = Some((now, text.clone()));
        text
    }

    /// The figures a scrape reports from now on.
    pub fn set_figures(&self, figures: Figures) {
        *self.figures.lock().unwrap_or_else(PoisonError::into_inner) = figures;
    }

    /// A session was ended with a `bye`.
    pub fn count_bye(&self, reason: ByeReason) {
        self.byes
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    /// A connection was refused at the door: told `reason` (its `bye`, or
    /// a 503 on an HTTP listener), or closed without a word (`None`).
    pub fn count_refused(&self, reason: Option<ByeReason>) {
        let reason = reason.map_or(SILENT, ByeReason::as_str);
        self.refused.get_or_create(&[("reason", reason)]).inc();
    }

    /// A batch was answered (`committed` or not), `took` after it went to
    /// the storage thread.
    pub fn observe_commit(&self, took: Duration, committed: bool) {
        let result = if committed { "committed" } else { "failed" };
        self.commit_batches
            .get_or_create(&[("result", result)])
            .inc();
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// A password check was answered, `took` after it was asked for.
    pub fn observe_password_check(&self, took: Duration) {
        self.password_check_seconds.observe(took.as_secs_f64());
    }

    /// The event loop served a wake-up in `took`.
    pub fn observe_turn(&self, took: Duration) {
        self.turn_seconds.observe(took.as_secs_f64());
    }
}

/// The `reason` of a refusal without a word.
const SILENT: &str = "silent";

/// Renders [`Figures`] at each scrape.
#[derive(Debug)]
struct FiguresCollector(Arc<Mutex<Figures>>);

impl Collector for FiguresCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let stats = &f.stats;
        let c = f.connections;
        family(
            &mut encoder,
            "chatserver_connections",
            "Connections open, by transport",
            "transport",
            vec![
                ("tcp", gauge(c.tcp)),
                ("tls", gauge(c.tls)),
                ("websocket", gauge(c.websocket)),
                ("http", gauge(c.http)),
                ("refusing", gauge(c.refusing)),
            ],
        )?;
        metric(
            &mut encoder,
            "chatserver_sessions",
            "The core's connections, logged in or not (debug server's connections)",
            gauge(f.sessions),
        )?;
        metric(
            &mut encoder,
            "chatserver_users_online",
            "Users logged in on this server",
            gauge(f.users_online),
        )?;
        let refused = |code| ConstCounter::new(stats.login_refusal_count(code));
        family(
            &mut encoder,
            "chatserver_logins",
            "Logins answered, by result",
            "result",
            vec![
                ("ok", ConstCounter::new(stats.logins_ok)),
                ("invalid", refused(ErrorCode::InvalidCredentials)),
                ("locked", refused(ErrorCode::AccountLocked)),
                ("elsewhere", refused(ErrorCode::SessionElsewhere)),
                ("unavailable", refused(ErrorCode::Unavailable)),
                ("rate_limited", refused(ErrorCode::RateLimited)),
            ],
        )?;
        let errors = |code| ConstCounter::new(stats.error_count(code));
        family(
            &mut encoder,
            "chatserver_messages",
            "Direct messages, by outcome",
            "outcome",
            vec![
                ("delivered", ConstCounter::new(stats.messages_delivered)),
                ("stored", ConstCounter::new(stats.messages_stored)),
                ("blocked", errors(ErrorCode::Blocked)),
                ("mailbox_full", errors(ErrorCode::MailboxFull)),
            ],
        )?;
        metric(
            &mut encoder,
            "chatserver_broadcasts",
            "Broadcasts sent by this server's users",
            ConstCounter::new(stats.broadcasts),
        )?;
        metric(
            &mut encoder,
            "chatserver_broadcast_deliveries",
            "Broadcast frames handed to this server's users",
            ConstCounter::new(stats.broadcast_deliveries),
        )?;
        metric(
            &mut encoder,
            "chatserver_presence_frames",
            "Presence frames handed to this server's users",
            ConstCounter::new(stats.presence_frames),
        )?;
        // Every code, seen or not, so each series exists from the start.
        family(
            &mut encoder,
            "chatserver_errors",
            "Error frames sent, by code",
            "code",
            ErrorCode::ALL
                .into_iter()
                .map(|code| (code.as_str(), errors(code)))
                .collect(),
        )?;
        metric(
            &mut encoder,
            "chatserver_offline_messages",
            "Messages waiting in offline queues",
            gauge(f.offline.messages),
        )?;
        metric(
            &mut encoder,
            "chatserver_offline_bytes",
            "Bytes of the messages waiting in offline queues",
            gauge(f.offline.bytes),
        )?;
        metric(
            &mut encoder,
            "chatserver_locked_accounts",
            "Accounts locked by failed logins",
            gauge(f.locked_accounts),
        )?;
        metric(
            &mut encoder,
            "chatserver_password_checks_pending",
            "Password checks asked for and not yet answered",
            gauge(f.pending_password_checks),
        )
    }
}

/// The standard process metrics, read at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    #[cfg(target_os = "linux")]
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A metric /proc does not give is left out, not made up.
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        if let Ok(stat) = me.stat() {
            let ticks = procfs::ticks_per_second() as f64;
            metric(
                &mut encoder,
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                ConstCounter::new((stat.utime + stat.stime) as f64 / ticks),
            )?;
            let rss = stat.rss.saturating_mul(procfs::page_size());
            metric(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                gauge(rss),
            )?;
            metric(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                gauge(stat.vsize),
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                metric(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch, in seconds",
                    ConstGauge::new(boot as f64 + stat.starttime as f64 / ticks),
                )?;
            }
        }
        if let Ok(open) = me.fd_count() {
            metric(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                gauge(open),
            )?;
        }
        if let Ok(limits) = me.limits() {
            if let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit {
                metric(
                    &mut encoder,
                    "process_max_fds",
                    "The most file descriptors the process may open",
                    gauge(max),
                )?;
            }
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn encode(&self, _: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

/// One metric of one value, described.
fn metric(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One metric per value of `label`, described once.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: Vec<(&'static str, M)>,
) -> Result<(), std::fmt::Error> {
    let Some(kind) = values.first().map(|(_, m)| m.metric_type()) else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (value, m) in values {
        m.encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

/// A gauge of a count or a size.
fn gauge(n: impl TryInto<i64>) -> ConstGauge {
    ConstGauge::new(n.try_into().unwrap_or(i64::MAX))
}
