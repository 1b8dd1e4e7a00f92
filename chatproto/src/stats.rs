//! Counters of what a server core did since it started: logins by result,
//! direct messages by outcome, broadcasts, presence frames and error
//! frames by code. A driver exports them as metrics (chatserver's
//! `/metrics`); the core only counts, so the numbers are the same whatever
//! runs it.
//!
//! Everything is counted when its frame is handed to the driver, not when
//! it is made: an answer that waits for a batch is counted once the batch
//! commits, and if the batch fails, as the `unavailable` it becomes (a
//! frame dropped with the batch is not counted at all). So the counters
//! only ever grow, as Prometheus counters must, and say what clients got.

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

    /// Logins refused with `code`.
    pub fn login_refusal_count(&self, code: ErrorCode) -> u64 {
        self.login_refusals.get(&code).copied().unwrap_or(0)
    }

    /// Error frames sent with `code`.
    pub fn error_count(&self, code: ErrorCode) -> u64 {
        self.errors.get(&code).copied().unwrap_or(0)
    }

    /// Counts a frame handed to the driver.
    pub(crate) fn count(&mut self, tally: Tally) {
        match tally {
            Tally::LoginOk => self.logins_ok += 1,
            Tally::LoginRefused(code) => {
                *self.login_refusals.entry(code).or_default() += 1;
                *self.errors.entry(code).or_default() += 1;
            }
            Tally::Error(code) => *self.errors.entry(code).or_default() += 1,
            Tally::MessageDelivered => self.messages_delivered += 1,
            Tally::MessageStored => self.messages_stored += 1,
            Tally::Broadcast => self.broadcasts += 1,
            Tally::BroadcastDelivery => self.broadcast_deliveries += 1,
            Tally::Presence => self.presence_frames += 1,
        }
    }
}

/// What one frame counts for, once it is handed to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tally {
    /// A login's `ok`.
    LoginOk,
    /// A login's error.
    LoginRefused(ErrorCode),
    /// Any other error.
    Error(ErrorCode),
    /// A direct message's `ok`, delivered.
    MessageDelivered,
    /// A direct message's `ok`, stored.
    MessageStored,
    /// A broadcast's `ok`.
    Broadcast,
    /// A broadcast frame to a recipient.
    BroadcastDelivery,
    /// A presence frame.
    Presence,
}

impl Tally {
    /// What an answer counts for once a failed batch turned it into
    /// `unavailable`.
    pub(crate) fn unavailable(self) -> Tally {
        match self {
            Tally::LoginOk | Tally::LoginRefused(_) => Tally::LoginRefused(ErrorCode::Unavailable),
            _ => Tally::Error(ErrorCode::Unavailable),
        }
    }
}
