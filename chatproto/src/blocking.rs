//! Block lists: who refuses to hear from whom.
//!
//! The relation is kept in both directions, so that "whom has Alice
//! blocked" (for her presence notices) and "who has blocked Bob" (for his
//! broadcasts, whoelse and messages) are each one lookup.

use std::collections::HashSet;

use crate::accounts::{Accounts, PerUser, UserId};

/// Every user's block list.
#[derive(Debug)]
pub(crate) struct BlockList {
    /// `blocks[a]`: the users `a` has blocked.
    blocks: PerUser<HashSet<UserId>>,
    /// `blockers[b]`: the users who have blocked `b`.
    blockers: PerUser<HashSet<UserId>>,
}

impl BlockList {
    pub(crate) fn new(accounts: &Accounts) -> Self {
        BlockList {
            blocks: PerUser::new(accounts),
            blockers: PerUser::new(accounts),
        }
    }

    /// `blocker` blocks `target`; false when it already did.
    pub(crate) fn block(&mut self, blocker: UserId, target: UserId) -> bool {
        let added = self.blocks[blocker].insert(target);
        self.blockers[target].insert(blocker);
        added
    }

    /// Deletes `user`'s blocks in both directions: their account was
    /// removed.
    pub(crate) fn remove_user(&mut self, user: UserId) {
        for target in std::mem::take(&mut self.blocks[user]) {
            self.blockers[target].remove(&user);
        }
        for blocker in std::mem::take(&mut self.blockers[user]) {
            self.blocks[blocker].remove(&user);
        }
    }

    /// Adds empty lists for the accounts added since.
    pub(crate) fn grow(&mut self, accounts: &Accounts) {
        self.blocks.grow(accounts);
        self.blockers.grow(accounts);
    }

    /// `blocker` unblocks `target`; false when it had not blocked them.
    pub(crate) fn unblock(&mut self, blocker: UserId, target: UserId) -> bool {
        self.blockers[target].remove(&blocker);
        self.blocks[blocker].remove(&target)
    }

    /// Whether `blocker` has blocked `target`.
    pub(crate) fn has_blocked(&self, blocker: UserId, target: UserId) -> bool {
        self.blocks[blocker].contains(&target)
    }

    /// The users `blocker` has blocked.
    pub(crate) fn targets_of(&self, blocker: UserId) -> &HashSet<UserId> {
        &self.blocks[blocker]
    }

    /// The users who have blocked `target`.
    pub(crate) fn blockers_of(&self, target: UserId) -> &HashSet<UserId> {
        &self.blockers[target]
    }
}
