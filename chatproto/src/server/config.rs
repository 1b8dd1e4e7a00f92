//! How a server core behaves: [`ServerConfig`], and the checks that keep
//! it in range.

use crate::cluster::ClusterConfig;
use std::collections::HashSet;
use std::time::Duration;

use crate::framing::DEFAULT_MAX_FRAME_BYTES;
use crate::lockout::LockoutPolicy;
use crate::offline::{
    OfflineTexts, QueueLimits, DEFAULT_OFFLINE_PAGE_BYTES, DEFAULT_OFFLINE_QUEUE_BYTES,
    DEFAULT_OFFLINE_QUEUE_CAPACITY,
};
use crate::rate_limit::{Rate, RateLimit};
use crate::username::Username;

/// How a server core behaves. Start from [`ServerConfig::default`] and set
/// what differs.
///
/// ```
/// use chatproto::ServerConfig;
/// use std::time::Duration;
///
/// let mut config = ServerConfig::default();
/// config.idle_timeout = Duration::from_secs(30);
/// config.admins.insert("root".parse().unwrap());
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Largest frame accepted, in bytes (default 16 KiB; 64 to 16 MiB).
    pub max_frame_bytes: usize,
    /// A connection that sends no frame for this long is closed (default
    /// 600 s).
    pub idle_timeout: Duration,
    /// When failed logins lock a name.
    pub lockout: LockoutPolicy,
    /// Most messages one user's offline queue holds (default 1,000).
    pub offline_queue_capacity: usize,
    /// Most bytes of text one user's offline queue holds (default 4 MiB).
    pub offline_queue_bytes: usize,
    /// Most bytes of text all offline queues hold together, or `None` for
    /// no such cap (default). Set it when the texts are kept in memory.
    pub offline_total_bytes: Option<usize>,
    /// Where queued texts are kept (default: in the core's memory).
    pub offline_texts: OfflineTexts,
    /// Bytes of queued text handed to a connection at a time (default 64
    /// KiB; a page holds at least one message). The next page follows when
    /// the driver reports the backlog low ([`Server::handle_drained`](crate::Server::handle_drained)).
    pub offline_page_bytes: usize,
    /// Users allowed `debug server`.
    pub admins: HashSet<Username>,
    /// Frames per connection, or `None` for no limit (default:
    /// [`RateLimit::default`]).
    pub rate_limit: Option<RateLimit>,
    /// Bytes of frames per connection, or `None` for no limit (default:
    /// [`Rate::BYTES_PER_CONNECTION`]). A frame past it is refused like one
    /// past `rate_limit`, and counts toward its flood limit. The burst must
    /// hold a frame of the largest size.
    pub byte_rate: Option<Rate>,
    /// Password checks ([`Output::VerifyPassword`](crate::Output::VerifyPassword)) waiting for a verdict
    /// at most; logins beyond are refused with `unavailable`, so a flood of
    /// logins cannot queue unbounded work ahead of real users (default 64).
    pub max_pending_checks: usize,
    /// Password checks waiting for a verdict at most per [`PeerKey`](crate::PeerKey), so
    /// that one address cannot take every slot; logins beyond are refused
    /// with `unavailable` (default 8, `None`: no such limit).
    pub max_pending_checks_per_peer: Option<usize>,
    /// Login attempts per [`PeerKey`](crate::PeerKey); beyond, a login is answered
    /// `rate_limited` (default [`Rate::LOGINS_PER_PEER`]).
    pub login_rate_per_peer: Option<Rate>,
    /// Login attempts per user name, account or not; beyond, a login is
    /// answered `rate_limited` (default [`Rate::LOGINS_PER_NAME`]).
    pub login_rate_per_name: Option<Rate>,
    /// A connection that has not logged in this long after it opened is
    /// closed with `bye` reason `login_timeout`, so idle unauthenticated
    /// sockets cannot pile up (default 30 s; `None`: only the idle
    /// timeout applies).
    pub login_timeout: Option<Duration>,
    /// Changes to lasting state leave as [`Output::Persist`](crate::Output::Persist) batches, and
    /// what depends on a batch waits in the core until the driver answers
    /// it with [`Server::handle_persisted`](crate::Server::handle_persisted) (PROTOCOL.md rule 15). Default
    /// `false`: nothing lasts past the process, and nothing waits.
    pub durable: bool,
    /// Cluster mode: this server is one node of several that act as one
    /// service ([`crate::cluster`]). Default `None`: one
    /// server alone.
    pub cluster: Option<ClusterConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            idle_timeout: Duration::from_secs(600),
            lockout: LockoutPolicy::default(),
            offline_queue_capacity: DEFAULT_OFFLINE_QUEUE_CAPACITY,
            offline_queue_bytes: DEFAULT_OFFLINE_QUEUE_BYTES,
            offline_total_bytes: None,
            offline_texts: OfflineTexts::InMemory,
            offline_page_bytes: DEFAULT_OFFLINE_PAGE_BYTES,
            admins: HashSet::new(),
            rate_limit: Some(RateLimit::default()),
            byte_rate: Some(Rate::BYTES_PER_CONNECTION),
            login_timeout: Some(Duration::from_secs(30)),
            max_pending_checks: 64,
            max_pending_checks_per_peer: Some(8),
            login_rate_per_peer: Some(Rate::LOGINS_PER_PEER),
            login_rate_per_name: Some(Rate::LOGINS_PER_NAME),
            durable: false,
            cluster: None,
        }
    }
}

/// A [`ServerConfig`] value out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `max_frame_bytes` is out of range.
    #[error(
        "the frame limit must be between {MIN_FRAME_BYTES} and {MAX_FRAME_BYTES} bytes (got {0})"
    )]
    FrameLimit(usize),
    /// `idle_timeout` is zero.
    #[error("the idle timeout must be longer than zero")]
    ZeroIdleTimeout,
    /// `lockout.max_failures` is zero.
    #[error("the number of failed logins before a lock must be at least 1")]
    ZeroLockoutAttempts,
    /// `lockout.lock_duration` is zero.
    #[error("the lockout duration must be longer than zero")]
    ZeroLockDuration,
    /// `lockout.max_tracked_names` is zero.
    #[error("at least one user name must be tracked for lockout")]
    ZeroTrackedNames,
    /// A login rate allows no logins at all.
    #[error("a login rate needs a burst and a rate of at least 1 login")]
    ZeroRate,
    /// `byte_rate` cannot let a frame of the largest size through.
    #[error("the byte rate limit needs a burst of at least the frame limit ({frame_limit} bytes) and a rate of at least 1 byte")]
    ByteRateBelowFrameLimit {
        /// The frame limit in force.
        frame_limit: usize,
    },
    /// `max_pending_checks_per_peer` is zero (use `None` for no limit).
    #[error("at least one password check per peer must be allowed")]
    ZeroPendingChecksPerPeer,
    /// `rate_limit` allows no frames at all.
    #[error("a rate limit needs a burst and a rate of at least 1 frame")]
    ZeroRateLimit,
    /// `login_timeout` is zero (use `None` for no login timeout).
    #[error("the login timeout must be at least 1 ms")]
    ZeroLoginTimeout,
    /// `offline_page_bytes` is zero.
    #[error("an offline page must hold at least 1 byte")]
    ZeroOfflinePage,
}

/// The smallest frame limit accepted.
pub const MIN_FRAME_BYTES: usize = 64;

/// The largest frame limit accepted.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

impl ServerConfig {
    /// Checks every value is in range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err(ConfigError::FrameLimit(self.max_frame_bytes));
        }
        if self.idle_timeout.is_zero() {
            return Err(ConfigError::ZeroIdleTimeout);
        }
        if self.lockout.max_failures == 0 {
            return Err(ConfigError::ZeroLockoutAttempts);
        }
        if self.lockout.lock_duration.is_zero() {
            return Err(ConfigError::ZeroLockDuration);
        }
        if self.lockout.max_tracked_names == 0 {
            return Err(ConfigError::ZeroTrackedNames);
        }
        if [self.login_rate_per_peer, self.login_rate_per_name]
            .iter()
            .flatten()
            .any(|r| r.burst == 0 || r.per_second == 0)
        {
            return Err(ConfigError::ZeroRate);
        }
        if self
            .byte_rate
            .is_some_and(|r| (r.burst as usize) < self.max_frame_bytes || r.per_second == 0)
        {
            return Err(ConfigError::ByteRateBelowFrameLimit {
                frame_limit: self.max_frame_bytes,
            });
        }
        if self.max_pending_checks_per_peer == Some(0) {
            return Err(ConfigError::ZeroPendingChecksPerPeer);
        }
        if self
            .rate_limit
            .is_some_and(|r| r.burst == 0 || r.per_second == 0)
        {
            return Err(ConfigError::ZeroRateLimit);
        }
        if self.login_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::ZeroLoginTimeout);
        }
        if self.offline_page_bytes == 0 {
            return Err(ConfigError::ZeroOfflinePage);
        }
        Ok(())
    }
}

/// The caps on offline queues `config` sets.
pub(super) fn queue_limits(config: &ServerConfig) -> QueueLimits {
    QueueLimits {
        messages: config.offline_queue_capacity,
        bytes: config.offline_queue_bytes,
        total_bytes: config.offline_total_bytes,
    }
}
