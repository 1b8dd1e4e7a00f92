//! Cluster mode: who is online on the other nodes, as their bus messages
//! say. A node's own users are in `Presence`, not here.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::accounts::UserId;
use crate::cluster::NodeId;

/// The users online on other nodes, and where.
#[derive(Debug, Default)]
pub(crate) struct Directory {
    node_of: HashMap<UserId, NodeId>,
    /// Ordered, so that what a node's loss announces comes in one order
    /// on every run (replays stay exact).
    users_of: BTreeMap<NodeId, BTreeSet<UserId>>,
}

impl Directory {
    /// Where `user` is online, if on another node.
    pub(crate) fn node_of(&self, user: UserId) -> Option<NodeId> {
        self.node_of.get(&user).copied()
    }

    /// Every user online on another node (in no particular order).
    pub(crate) fn users(&self) -> impl Iterator<Item = UserId> + '_ {
        self.node_of.keys().copied()
    }

    /// How many users are online on other nodes.
    pub(crate) fn len(&self) -> usize {
        self.node_of.len()
    }

    /// How many users are online on `node`.
    pub(crate) fn count_on(&self, node: NodeId) -> usize {
        self.users_of.get(&node).map_or(0, BTreeSet::len)
    }

    /// `user` is online on `node`. False if that was known already.
    pub(crate) fn came(&mut self, user: UserId, node: NodeId) -> bool {
        match self.node_of.insert(user, node) {
            Some(old) if old == node => false,
            Some(old) => {
                // On another node now (its logout there was lost): one
                // place only.
                self.remove_from(old, user);
                self.users_of.entry(node).or_default().insert(user);
                false
            }
            None => {
                self.users_of.entry(node).or_default().insert(user);
                true
            }
        }
    }

    /// `user` went offline on `node`. False if they were not known to be
    /// online there (a late message about an older session).
    pub(crate) fn went(&mut self, user: UserId, node: NodeId) -> bool {
        if self.node_of.get(&user) != Some(&node) {
            return false;
        }
        self.node_of.remove(&user);
        self.remove_from(node, user);
        true
    }

    /// `user` logged in on this node: wherever the directory had them (a
    /// logout elsewhere that was lost), this session is the one.
    pub(crate) fn forget(&mut self, user: UserId) {
        if let Some(node) = self.node_of.remove(&user) {
            self.remove_from(node, user);
        }
    }

    /// `node`'s users are exactly `users` now: returns who came and who
    /// went, each in id order.
    pub(crate) fn replace(
        &mut self,
        node: NodeId,
        users: impl IntoIterator<Item = UserId>,
    ) -> (Vec<UserId>, Vec<UserId>) {
        let now: BTreeSet<UserId> = users.into_iter().collect();
        let before = self.users_of.get(&node).cloned().unwrap_or_default();
        let went: Vec<UserId> = before.difference(&now).copied().collect();
        for &user in &went {
            self.went(user, node);
        }
        let came: Vec<UserId> = now
            .difference(&before)
            .copied()
            .filter(|&user| self.came(user, node))
            .collect();
        (came, went)
    }

    /// `node` is gone: returns its users, in id order, now offline.
    pub(crate) fn remove_node(&mut self, node: NodeId) -> Vec<UserId> {
        let users: Vec<UserId> = self
            .users_of
            .remove(&node)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for user in &users {
            self.node_of.remove(user);
        }
        users
    }

    fn remove_from(&mut self, node: NodeId, user: UserId) {
        if let Some(users) = self.users_of.get_mut(&node) {
            users.remove(&user);
            if users.is_empty() {
                self.users_of.remove(&node);
            }
        }
    }
}
