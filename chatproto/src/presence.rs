//! Presence: who is online now, on which connection, and when each user was
//! last seen, which is what `whoelse` and `whoelsesince` ask.

use crate::accounts::{Accounts, PerUser, UserId};
use crate::ids::ConnId;
use crate::time::Timestamp;

/// Who is online, and who was.
#[derive(Debug)]
pub(crate) struct Presence {
    session: PerUser<Option<ConnId>>,
    /// When each user last went offline.
    last_seen: PerUser<Option<Timestamp>>,
    /// The users online, densely packed for fan-out.
    online: Vec<UserId>,
    /// Where each online user sits in `online`.
    position: PerUser<usize>,
}

impl Presence {
    pub(crate) fn new(accounts: &Accounts) -> Self {
        Presence {
            session: PerUser::new(accounts),
            last_seen: PerUser::new(accounts),
            online: Vec::new(),
            position: PerUser::new(accounts),
        }
    }

    /// Adds slots for the accounts added since.
    pub(crate) fn grow(&mut self, accounts: &Accounts) {
        self.session.grow(accounts);
        self.last_seen.grow(accounts);
        self.position.grow(accounts);
    }

    /// The connection `user` is logged in on.
    pub(crate) fn session(&self, user: UserId) -> Option<ConnId> {
        self.session[user]
    }

    /// Everyone online, in no particular order.
    pub(crate) fn online(&self) -> &[UserId] {
        &self.online
    }

    pub(crate) fn log_in(&mut self, user: UserId, conn: ConnId) {
        debug_assert!(self.session[user].is_none());
        self.session[user] = Some(conn);
        self.position[user] = self.online.len();
        self.online.push(user);
    }

    pub(crate) fn log_out(&mut self, user: UserId, now: Timestamp) {
        if self.session[user].take().is_none() {
            return;
        }
        self.last_seen[user] = Some(now);
        let at = self.position[user];
        self.online.swap_remove(at);
        if let Some(&moved) = self.online.get(at) {
            self.position[moved] = at;
        }
    }

    /// When `user` last went offline.
    pub(crate) fn last_seen(&self, user: UserId) -> Option<Timestamp> {
        self.last_seen[user]
    }

    /// Sets when `user` last went offline, as a taken-back login leaves it.
    pub(crate) fn set_last_seen(&mut self, user: UserId, at: Option<Timestamp>) {
        self.last_seen[user] = at;
    }

    /// Records a last-seen time from storage, keeping the later one.
    pub(crate) fn restore_last_seen(&mut self, user: UserId, at: Timestamp) {
        let seen = &mut self.last_seen[user];
        *seen = (*seen).max(Some(at));
    }

    /// Whether `user` is online, or went offline after `since`.
    pub(crate) fn seen_since(&self, user: UserId, since: Timestamp) -> bool {
        self.session[user].is_some() || self.last_seen[user].is_some_and(|t| t > since)
    }
}
