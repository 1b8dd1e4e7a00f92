//! Storage: the boundary between the core and whatever keeps state across
//! restarts.
//!
//! The core keeps its working state in memory and hands every change to
//! lasting state to its driver as a [`Change`] in an
//! [`Output::Persist`](crate::Output::Persist) batch: a plain, serializable
//! record that a database writes in the same transaction as the rest of its
//! batch. At start-up the driver reads the lasting state back
//! as a [`Snapshot`] and hands it to the core. [`Snapshot::apply`] defines
//! what each change means, so replaying a journal of changes over an empty
//! snapshot gives the state the core had.
//!
//! Accounts are not lasting state of the core: the driver supplies them
//! (see [`crate::Accounts`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::lockout::LockoutState;
use crate::offline::{OfflineMessage, QueueSize};
use crate::time::Timestamp;
use crate::username::Username;

/// One change to lasting state.
///
/// ```
/// use chatproto::{Change, Snapshot, Timestamp};
///
/// let mut snapshot = Snapshot::default();
/// let alice: chatproto::Username = "alice".parse().unwrap();
/// snapshot.apply(&Change::Blocked { blocker: alice.clone(), target: "bob".parse().unwrap() });
/// assert_eq!(snapshot.blocks[&alice].len(), 1);
/// let json = serde_json::to_string(&Change::LoggedIn { user: alice, at: Timestamp::ZERO }).unwrap();
/// assert_eq!(json, r#"{"change":"logged_in","user":"alice","at":0}"#);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Change {
    /// A message joined the end of `to`'s offline queue.
    MessageQueued {
        /// The recipient.
        to: Username,
        /// The message.
        message: OfflineMessage,
    },
    /// The first `count` messages of `to`'s offline queue were handed to
    /// their connection.
    MessagesDelivered {
        /// The recipient.
        to: Username,
        /// How many, from the front.
        count: usize,
    },
    /// The queued messages of `to`'s numbered `seqs` (their
    /// [`QueuedMessage::seq`](crate::QueuedMessage::seq)s, oldest first)
    /// were handed to their connection. Recorded instead of
    /// [`Change::MessagesDelivered`] in cluster mode, where other nodes may
    /// add to the queue meanwhile: a store removes exactly these.
    OfflineDelivered {
        /// The recipient.
        to: Username,
        /// Which messages.
        seqs: Vec<u64>,
    },
    /// `blocker` blocked `target`.
    Blocked {
        /// Who blocks.
        blocker: Username,
        /// Who is blocked.
        target: Username,
    },
    /// `blocker` unblocked `target`.
    Unblocked {
        /// Who unblocks.
        blocker: Username,
        /// Who is unblocked.
        target: Username,
    },
    /// `user` logged in.
    LoggedIn {
        /// Who.
        user: Username,
        /// When.
        at: Timestamp,
    },
    /// `user` went offline (logout, timeout, disconnect, shutdown).
    LoggedOut {
        /// Who.
        user: Username,
        /// When.
        at: Timestamp,
    },
    /// `user`'s failed-login record changed (a failure, or a lock).
    LockoutChanged {
        /// Whose.
        user: Username,
        /// The new record.
        state: LockoutState,
    },
    /// `user`'s failed-login record is gone (a success, or a lock ended).
    LockoutCleared {
        /// Whose.
        user: Username,
    },
    /// `user`'s account was removed: their offline queue, their blocks
    /// (theirs and others' of them), when they were last seen and their
    /// failed-login record are deleted.
    AccountRemoved {
        /// Whose.
        user: Username,
    },
}

/// All lasting state, as loaded at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Offline queues, oldest message first, with their texts: for a core
    /// that keeps texts in memory ([`crate::OfflineTexts::InMemory`]).
    pub offline: BTreeMap<Username, Vec<OfflineMessage>>,
    /// The sizes of offline queues whose texts stay in storage, for a core
    /// that reads them a page at a time ([`crate::OfflineTexts::External`]).
    /// [`Snapshot::apply`] leaves it alone: a store that fills it keeps
    /// the texts itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub offline_sizes: BTreeMap<Username, QueueSize>,
    /// For each user, the users they have blocked.
    pub blocks: BTreeMap<Username, BTreeSet<Username>>,
    /// When each user was last seen.
    pub last_seen: BTreeMap<Username, LastSeen>,
    /// Failed-login records of accounts.
    pub lockouts: BTreeMap<Username, LockoutState>,
}

/// When a user was last seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LastSeen {
    /// Logged in at `since` and not logged out since: the server stopped
    /// while they were online. On restore they count as seen until then.
    Online {
        /// Login time.
        since: Timestamp,
    },
    /// Went offline at `at`.
    Offline {
        /// Logout time.
        at: Timestamp,
    },
}

impl Snapshot {
    /// Applies one change.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::MessageQueued { to, message } => {
                self.offline
                    .entry(to.clone())
                    .or_default()
                    .push(message.clone());
            }
            Change::MessagesDelivered { to, count } => {
                if let Some(queue) = self.offline.get_mut(to) {
                    queue.drain(..(*count).min(queue.len()));
                    if queue.is_empty() {
                        self.offline.remove(to);
                    }
                }
            }
            Change::OfflineDelivered { to, seqs } => {
                // A snapshot's queues hold no storage numbers: the oldest go,
                // as many as were delivered.
                if let Some(queue) = self.offline.get_mut(to) {
                    queue.drain(..seqs.len().min(queue.len()));
                    if queue.is_empty() {
                        self.offline.remove(to);
                    }
                }
            }
            Change::Blocked { blocker, target } => {
                self.blocks
                    .entry(blocker.clone())
                    .or_default()
                    .insert(target.clone());
            }
            Change::Unblocked { blocker, target } => {
                if let Some(set) = self.blocks.get_mut(blocker) {
                    set.remove(target);
                    if set.is_empty() {
                        self.blocks.remove(blocker);
                    }
                }
            }
            Change::LoggedIn { user, at } => {
                self.last_seen
                    .insert(user.clone(), LastSeen::Online { since: *at });
            }
            Change::LoggedOut { user, at } => {
                self.last_seen
                    .insert(user.clone(), LastSeen::Offline { at: *at });
            }
            Change::LockoutChanged { user, state } => {
                self.lockouts.insert(user.clone(), *state);
            }
            Change::AccountRemoved { user } => {
                self.offline.remove(user);
                self.offline_sizes.remove(user);
                self.blocks.remove(user);
                self.blocks.retain(|_, targets| {
                    targets.remove(user);
                    !targets.is_empty()
                });
                self.last_seen.remove(user);
                self.lockouts.remove(user);
            }
            Change::LockoutCleared { user } => {
                self.lockouts.remove(user);
            }
        }
    }

    /// Messages waiting in all offline queues.
    pub fn queued_messages(&self) -> usize {
        self.offline.values().map(Vec::len).sum::<usize>()
            + self
                .offline_sizes
                .values()
                .map(|s| s.messages)
                .sum::<usize>()
    }
}
