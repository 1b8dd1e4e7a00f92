//! What the core did since its driver last made the store's changes
//! durable: enough to take it back when a commit fails.
//!
//! A driver that commits after each batch of work (see
//! [`ServerConfig::track_commits`](crate::ServerConfig::track_commits))
//! holds that batch's output until the commit succeeds. If it fails, the
//! driver discards the output and calls
//! [`Server::commit_failed`](crate::Server::commit_failed): the core puts
//! its lasting state back to what was committed, logs out sessions whose
//! login was not recorded, answers every request of the batch with
//! `unavailable`, and says again what cannot be taken back (new connections
//! get their `hello`; users who went offline are still offline).

use crate::accounts::UserId;
use crate::connection::ConnId;
use crate::request::RequestId;
use crate::time::Timestamp;

/// The work since the last successful commit.
#[derive(Debug, Default)]
pub(crate) struct Uncommitted {
    /// Connections accepted (their `hello` went with the discarded output).
    pub(crate) accepted: Vec<ConnId>,
    /// Every answer given, `ok` or `error`, in order.
    pub(crate) answered: Vec<(ConnId, Option<RequestId>)>,
    /// Connections that logged in.
    pub(crate) logins: Vec<ConnId>,
    /// Sessions that ended.
    pub(crate) ended: Vec<EndedSession>,
}

/// A session that ended: a fact no failed commit can undo.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EndedSession {
    pub(crate) conn: ConnId,
    pub(crate) user: UserId,
    pub(crate) at: Timestamp,
    /// Its offline presence was already sent again after an earlier failed
    /// commit; only its record is still owed.
    pub(crate) announced_again: bool,
}

impl Uncommitted {
    /// Forgets everything: it is all durable now.
    pub(crate) fn clear(&mut self) {
        self.accepted.clear();
        self.answered.clear();
        self.logins.clear();
        self.ended.clear();
    }
}
