//! Counters of what a server core did since it started: logins by result,
//! direct messages by outcome, broadcasts, presence frames and error
//! frames by code. A driver exports them as metrics (chatserver's
//! `/metrics`); the core only counts, so the numbers are the same whatever
//! runs it.
//!
//! Counts are of answers as the core made them: in the rare case a batch
//! fails and an answer turns into `unavailable`, both are counted.

use std::collections::BTreeMap;

use crate::error::ErrorCode;

/// What a [`Server`](crate::Server) did since it started
/// ([`Server::stats`](crate::Server::stats)).
///
/// ```
/// use chatproto::{Accounts, ErrorCode, PeerKey, Server, ServerConfig, Timestamp};
///
/// let now = Timestamp::from_unix_millis(0);
/// let mut accounts = Accounts::new();
/// accounts.insert("alice".parse().unwrap(), "wonderland".parse().unwrap()).unwrap();
/// let mut server = Server::new(ServerConfig::default(), accounts, now).unwrap();
/// let conn = server.accept(PeerKey::UNSPECIFIED, [0; 16], now);
/// server.handle_input(conn, b"login alice nope\nlogin alice wonderland\n", now).unwrap();
/// let stats = server.stats();
/// assert_eq!(stats.logins_ok, 1);
/// assert_eq!(stats.login_refusals().collect::<Vec<_>>(), [(ErrorCode::InvalidCredentials, 1)]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Logins answered `ok`.
    pub logins_ok: u64,
    /// Direct messages answered as delivered to an online recipient (on
    /// this node or, in cluster mode, another).
    pub messages_delivered: u64,
    /// Direct messages stored for a recipient offline.
    pub messages_stored: u64,
    /// Broadcasts sent by this node's users.
    pub broadcasts: u64,
    /// Broadcast frames handed to this node's users (from any node's).
    pub broadcast_deliveries: u64,
    /// Presence frames handed to this node's users.
    pub presence_frames: u64,
    login_refusals: BTreeMap<ErrorCode, u64>,
    errors: BTreeMap<ErrorCode, u64>,
}

impl ServerStats {
    /// Refused logins, by the error's code (`invalid_credentials`,
    /// `account_locked`, `session_elsewhere`, `unavailable`,
    /// `rate_limited`), in code order; codes never seen are left out.
    pub fn login_refusals(&self) -> impl Iterator<Item = (ErrorCode, u64)> + '_ {
        self.login_refusals.iter().map(|(&code, &n)| (code, n))
    }

    /// Error frames sent, by code (login refusals included), in code
    /// order; codes never seen are left out.
    pub fn errors(&self) -> impl Iterator<Item = (ErrorCode, u64)> + '_ {
        self.errors.iter().map(|(&code, &n)| (code, n))
    }

    /// Error frames sent with `code`.
    pub fn error_count(&self, code: ErrorCode) -> u64 {
        self.errors.get(&code).copied().unwrap_or(0)
    }

    pub(crate) fn count_error(&mut self, code: ErrorCode) {
        *self.errors.entry(code).or_default() += 1;
    }

    pub(crate) fn count_login_refusal(&mut self, code: ErrorCode) {
        *self.login_refusals.entry(code).or_default() += 1;
    }
}
