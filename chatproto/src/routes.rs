//! Cluster mode: direct messages on their way to a user on another node.
//! The sender's node keeps each one ([`Routes`]) until that node answers
//! or a timeout runs out; the recipient's node remembers what it delivered
//! ([`Recent`]), so a message sent again after a lost answer is not
//! delivered twice, and which senders' messages it turned away, so a later
//! one already on its way is turned away too rather than overtake them.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use crate::accounts::UserId;
use crate::cluster::NodeId;
use crate::ids::ConnId;
use crate::request::RequestId;
use crate::text::MessageText;
use crate::time::Timestamp;
use crate::username::Username;

/// How many times a message is sent to a node before the sender's node
/// gives up on the route and stores it.
pub(crate) const MAX_ATTEMPTS: u32 = 2;

/// How many direct messages one connection may have on their way to other
/// nodes at once; its next line waits past that.
pub(crate) const MAX_IN_FLIGHT: usize = 16;

/// How many delivered messages (or turned-away senders) a node remembers
/// at most: a bound on memory (about 30 MiB when full), above what
/// arrives while a message may be sent again at the rates measured
/// (82,768 deliveries/s × 4 s). A key is never forgotten before its time:
/// when full, [`Recent::insert`] refuses, and the message is turned away
/// (stored by its sender's node) rather than risk a second delivery.
pub(crate) const MAX_REMEMBERED: usize = 1 << 19;

/// A direct message sent to another node, waiting for its answer.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The sender's connection, whose input waits for the answer.
    pub(crate) conn: ConnId,
    /// The request's id, for the answer.
    pub(crate) id: Option<RequestId>,
    pub(crate) from: UserId,
    pub(crate) to: UserId,
    pub(crate) to_name: Username,
    pub(crate) text: MessageText,
    pub(crate) sent_at: Timestamp,
    /// The node it was sent to, the last time.
    pub(crate) node: NodeId,
    /// How many times it was sent.
    pub(crate) attempts: u32,
    deadline: Timestamp,
}

/// The direct messages this node sent to others, by route number.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    pending: HashMap<u64, Route>,
    deadlines: BTreeSet<(Timestamp, u64)>,
    next: u64,
}

impl Routes {
    /// A number for a new route, never used before by this node.
    pub(crate) fn next_number(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Waits for the answer to `route`, sent to `route.node` at `now`,
    /// until `now + timeout`.
    pub(crate) fn insert(
        &mut self,
        number: u64,
        mut route: Route,
        now: Timestamp,
        timeout: Duration,
    ) {
        route.deadline = now + timeout;
        self.deadlines.insert((route.deadline, number));
        self.pending.insert(number, route);
    }

    /// The route answered by `node`, taken out; `None` if there is none
    /// (answered already, given up) or it was sent elsewhere last.
    pub(crate) fn answered(&mut self, number: u64, node: NodeId) -> Option<Route> {
        if self.pending.get(&number)?.node != node {
            return None;
        }
        let route = self.pending.remove(&number)?;
        self.deadlines.remove(&(route.deadline, number));
        Some(route)
    }

    /// The routes whose time ran out by `now`, taken out.
    pub(crate) fn expired(&mut self, now: Timestamp) -> Vec<(u64, Route)> {
        let mut expired = Vec::new();
        while let Some(&(at, number)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(route) = self.pending.remove(&number) {
                expired.push((number, route));
            }
        }
        expired
    }

    /// When the first route runs out of time.
    pub(crate) fn next_deadline(&self) -> Option<Timestamp> {
        self.deadlines.first().map(|&(at, _)| at)
    }
}

impl Route {
    /// A route for a message from `from` to `to` (named `to_name`), sent
    /// by `conn` in request `id`, to `node`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        conn: ConnId,
        id: Option<RequestId>,
        from: UserId,
        to: UserId,
        to_name: Username,
        text: MessageText,
        sent_at: Timestamp,
        node: NodeId,
    ) -> Route {
        Route {
            conn,
            id,
            from,
            to,
            to_name,
            text,
            sent_at,
            node,
            attempts: 1,
            deadline: sent_at,
        }
    }
}

/// Keys remembered for a while, at most [`MAX_REMEMBERED`] of them: the
/// messages from other nodes delivered lately (by sender node and route
/// number), or the senders whose messages were turned away lately.
#[derive(Debug)]
pub(crate) struct Recent<K> {
    /// Each key, with when it may be forgotten.
    known: HashMap<K, Timestamp>,
    /// Oldest first, with when each may be forgotten.
    order: VecDeque<(Timestamp, K)>,
}

impl<K> Default for Recent<K> {
    fn default() -> Self {
        Recent {
            known: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> Recent<K> {
    /// Whether `key` is remembered (and not yet forgotten by `now`).
    pub(crate) fn contains(&mut self, key: &K, now: Timestamp) -> bool {
        self.forget_old(now);
        self.known.contains_key(key)
    }

    /// Whether `key` is remembered and not yet due to be forgotten by
    /// `now`, without forgetting anything (for a `&self` caller).
    pub(crate) fn has(&self, key: &K, now: Timestamp) -> bool {
        self.known.get(key).is_some_and(|until| *until > now)
    }

    /// Whether no more can be remembered by `now` (none has expired).
    pub(crate) fn is_full(&mut self, now: Timestamp) -> bool {
        self.forget_old(now);
        self.order.len() >= MAX_REMEMBERED
    }

    /// `key` happened at `now`: remembered for `keep` (for a delivery, at
    /// least as long as its sender may send it again). False if it cannot
    /// be: the set is full ([`Recent::is_full`]).
    pub(crate) fn insert(&mut self, key: K, now: Timestamp, keep: Duration) -> bool {
        if self.is_full(now) {
            return false;
        }
        if !self.known.contains_key(&key) {
            self.known.insert(key.clone(), now + keep);
            self.order.push_back((now + keep, key));
        }
        true
    }

    fn forget_old(&mut self, now: Timestamp) {
        while self.order.front().is_some_and(|(until, _)| *until <= now) {
            if let Some((_, key)) = self.order.pop_front() {
                self.known.remove(&key);
            }
        }
    }
}

/// A message a connection sent to another node's user, in the order sent:
/// its answer, once known, goes out only after those of the ones before.
#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) number: u64,
    /// Its recipient: one message at a time goes across to each, so that
    /// a message sent again after a loss cannot fall behind a later one.
    pub(crate) to: UserId,
    pub(crate) answer: Option<RouteAnswer>,
}

/// What a connection is to be answered for a direct message sent across.
#[derive(Debug)]
pub(crate) struct RouteAnswer {
    pub(crate) id: Option<RequestId>,
    pub(crate) to: Username,
    /// Stored or not, or the error.
    pub(crate) result: Result<bool, crate::error::RequestError>,
    /// To be stored for this recipient when answered: in the unit that
    /// sends the answer, so the answer waits for the store's batch.
    pub(crate) store: Option<(UserId, crate::offline::OfflineMessage)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    #[test]
    fn delivered_messages_are_remembered_for_a_while() {
        let mut delivered = Recent::default();
        let key = (NodeId::from_u128(1), 7);
        delivered.insert(key, at(0), Duration::from_secs(4));
        assert!(delivered.contains(&key, at(0)));
        delivered.insert((NodeId::from_u128(1), 8), at(3_999), Duration::from_secs(4));
        assert!(delivered.contains(&key, at(3_999)));
        assert!(!delivered.contains(&key, at(4_000)));
        assert!(delivered.contains(&(NodeId::from_u128(1), 8), at(4_000)));
    }

    #[test]
    fn a_full_set_refuses_rather_than_forget_early() {
        let mut recent = Recent::default();
        for i in 0..MAX_REMEMBERED as u64 {
            assert!(recent.insert(i, at(0), Duration::from_secs(4)));
        }
        assert!(recent.is_full(at(3_999)));
        assert!(!recent.insert(u64::MAX, at(3_999), Duration::from_secs(4)));
        assert!(recent.contains(&0, at(3_999)), "nothing forgotten early");
        assert!(recent.insert(u64::MAX, at(4_000), Duration::from_secs(4)));
        assert!(!recent.contains(&0, at(4_000)));
    }
}
