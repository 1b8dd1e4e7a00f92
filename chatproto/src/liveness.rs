//! Cluster mode: which other nodes are alive, judged by when each was last
//! heard from on the bus, and when this node's own heartbeat is due.
//!
//! Every message a node publishes shows it alive; a node with nothing to
//! say sends a heartbeat every [`ClusterConfig::heartbeat_every`]. One not
//! heard from for a [`ClusterConfig::lease`] is given up for dead: its
//! users are offline from the moment it was last heard from.
//!
//! [`ClusterConfig::heartbeat_every`]: crate::ClusterConfig::heartbeat_every
//! [`ClusterConfig::lease`]: crate::ClusterConfig::lease

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::NodeId;
use crate::time::Timestamp;

/// The other nodes this one has heard from, and its own heartbeat.
#[derive(Debug)]
pub(crate) struct Liveness {
    lease: Duration,
    heartbeat_every: Duration,
    /// When each other node was last heard from. Ordered, so that nodes
    /// given up at one moment go in one order on every run.
    heard: BTreeMap<NodeId, Heard>,
    /// When this node's next heartbeat is due; `None` while the bus is
    /// down (a heartbeat could not leave, and would arrive stale).
    next_heartbeat: Option<Timestamp>,
    /// When this node last said it was alive, while the bus is up: a
    /// heartbeat overdue by a lease means the others have given it up.
    last_beat: Option<Timestamp>,
    /// This node said it is leaving: it says nothing more, so that no
    /// node takes it for alive again.
    left: bool,
    /// When this node last closed its clients and joined again.
    rejoined_at: Option<Timestamp>,
}

#[derive(Debug, Clone)]
struct Heard {
    at: Timestamp,
    /// The accounts digest of its last heartbeat (`None` before one).
    accounts: Option<String>,
    /// When this node last asked it for its roster (a count in its
    /// heartbeat did not match): asked at most once a lease.
    roster_asked: Option<Timestamp>,
}

impl Liveness {
    /// Nobody heard from yet; the first heartbeat is due when the bus is
    /// up ([`Liveness::bus_up`]).
    pub(crate) fn new(heartbeat_every: Duration, lease: Duration) -> Liveness {
        Liveness {
            lease,
            heartbeat_every,
            heard: BTreeMap::new(),
            next_heartbeat: None,
            last_beat: None,
            left: false,
            rejoined_at: None,
        }
    }

    /// This node closed its clients and joined again at `now`.
    pub(crate) fn rejoined(&mut self, now: Timestamp) {
        self.rejoined_at = Some(now);
    }

    /// Whether this node closed its clients since `since`: a silence that
    /// began then needs no second close.
    pub(crate) fn rejoined_since(&self, since: Timestamp) -> bool {
        self.rejoined_at.is_some_and(|at| at >= since)
    }

    /// `node` was heard from at `now`. True if it was not known alive.
    pub(crate) fn heard(&mut self, node: NodeId, now: Timestamp) -> bool {
        match self.heard.get_mut(&node) {
            Some(heard) => {
                heard.at = heard.at.max(now);
                false
            }
            None => {
                self.heard.insert(
                    node,
                    Heard {
                        at: now,
                        accounts: None,
                        roster_asked: None,
                    },
                );
                true
            }
        }
    }

    /// Whether to ask `node` for its roster now, because its heartbeat's
    /// count disagrees with the directory: at most once a lease, so a
    /// disagreement that persists does not make a request every beat.
    pub(crate) fn should_ask_roster(&mut self, node: NodeId, now: Timestamp) -> bool {
        let lease = self.lease;
        match self.heard.get_mut(&node) {
            Some(heard) if heard.roster_asked.map_or(true, |at| now >= at + lease) => {
                heard.roster_asked = Some(now);
                true
            }
            _ => false,
        }
    }

    /// `node`'s heartbeat gave its accounts digest. True if that differs
    /// from `mine` and from what it gave before (so a difference is
    /// reported once, not every beat).
    pub(crate) fn accounts_of(&mut self, node: NodeId, digest: String, mine: &str) -> bool {
        let Some(heard) = self.heard.get_mut(&node) else {
            return false;
        };
        let changed = heard.accounts.as_deref() != Some(digest.as_str());
        let differs = digest != mine;
        heard.accounts = Some(digest);
        changed && differs
    }

    /// Whether `mine` is the accounts digest of more than half the nodes
    /// alive that have sent one, this node included. With two nodes that
    /// disagree neither can tell which is right, and neither is.
    pub(crate) fn accounts_agree(&self, mine: &str) -> bool {
        let digests: Vec<&str> = self
            .heard
            .values()
            .filter_map(|heard| heard.accounts.as_deref())
            .collect();
        let same = digests.iter().filter(|&&d| d == mine).count() + 1;
        same * 2 > digests.len() + 1
    }

    /// `node` left, or was given up: forgotten.
    pub(crate) fn forget(&mut self, node: NodeId) {
        self.heard.remove(&node);
    }

    /// The nodes not heard from for a lease by `now`, each with when it was
    /// last heard from; they are forgotten.
    pub(crate) fn expire(&mut self, now: Timestamp) -> Vec<(NodeId, Timestamp)> {
        let lease = self.lease;
        let expired: Vec<(NodeId, Timestamp)> = self
            .heard
            .iter()
            .filter(|(_, heard)| heard.at + lease <= now)
            .map(|(&node, heard)| (node, heard.at))
            .collect();
        for (node, _) in &expired {
            self.heard.remove(node);
        }
        expired
    }

    /// When the first node alive now runs out of lease, if nothing is heard
    /// from it before.
    pub(crate) fn next_expiry(&self) -> Option<Timestamp> {
        self.heard.values().map(|heard| heard.at + self.lease).min()
    }

    /// How many other nodes are alive, as far as this one knows.
    pub(crate) fn nodes_alive(&self) -> usize {
        self.heard.len()
    }

    /// The bus is up at `now`: a heartbeat is due at once (unless this
    /// node has left).
    pub(crate) fn bus_up(&mut self, now: Timestamp) {
        if !self.left {
            self.next_heartbeat = Some(now);
        }
    }

    /// This node is leaving the cluster: no more heartbeats, or anything
    /// else ([`Liveness::has_left`]).
    pub(crate) fn leave(&mut self) {
        self.left = true;
        self.next_heartbeat = None;
    }

    /// Whether this node has left.
    pub(crate) fn has_left(&self) -> bool {
        self.left
    }

    /// The bus is down: no heartbeats until it is up again.
    pub(crate) fn bus_down(&mut self) {
        self.next_heartbeat = None;
        self.last_beat = None;
    }

    /// How long this node has said nothing while the bus was up, if that
    /// is a lease or more by `now`: it was frozen (or its loop stalled),
    /// and the others have given it up. Its heartbeats start again from
    /// `now`.
    pub(crate) fn silent_for_a_lease(&mut self, now: Timestamp) -> Option<Duration> {
        let silent = now.saturating_since(self.last_beat?);
        if silent < self.lease {
            return None;
        }
        self.last_beat = Some(now);
        self.next_heartbeat = Some(now);
        Some(silent)
    }

    /// Whether the bus is up (as the driver last said) and this node has
    /// not left: whether what it publishes may arrive.
    pub(crate) fn can_publish(&self) -> bool {
        self.next_heartbeat.is_some()
    }

    /// When this node's next heartbeat is due.
    pub(crate) fn next_heartbeat(&self) -> Option<Timestamp> {
        self.next_heartbeat
    }

    /// Whether a heartbeat is due by `now`; if so, the next one is
    /// scheduled a period later.
    pub(crate) fn heartbeat_due(&mut self, now: Timestamp) -> bool {
        match self.next_heartbeat {
            Some(due) if due <= now => {
                self.next_heartbeat = Some(now + self.heartbeat_every);
                self.last_beat = Some(now);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_unix_millis(secs * 1000)
    }

    #[test]
    fn a_node_not_heard_from_for_a_lease_expires_from_when_it_was_last_heard() {
        let mut liveness = Liveness::new(Duration::from_secs(1), Duration::from_secs(10));
        let (a, b) = (NodeId::from_u128(1), NodeId::from_u128(2));
        assert!(liveness.heard(a, at(0)));
        assert!(liveness.heard(b, at(3)));
        assert!(!liveness.heard(a, at(5)));
        assert_eq!(liveness.next_expiry(), Some(at(13)));
        assert_eq!(liveness.expire(at(12)), vec![]);
        assert_eq!(liveness.expire(at(13)), vec![(b, at(3))]);
        assert_eq!(liveness.nodes_alive(), 1);
        assert_eq!(liveness.next_expiry(), Some(at(15)));
    }

    #[test]
    fn heartbeats_run_only_while_the_bus_is_up() {
        let mut liveness = Liveness::new(Duration::from_secs(1), Duration::from_secs(10));
        assert!(!liveness.heartbeat_due(at(0)));
        liveness.bus_up(at(0));
        assert!(liveness.heartbeat_due(at(0)));
        assert!(!liveness.heartbeat_due(at(0)));
        assert_eq!(liveness.next_heartbeat(), Some(at(1)));
        liveness.bus_down();
        assert!(!liveness.heartbeat_due(at(5)));
        assert_eq!(liveness.next_heartbeat(), None);
        liveness.bus_up(at(6));
        liveness.leave();
        assert_eq!(liveness.next_heartbeat(), None);
        liveness.bus_up(at(7));
        assert!(
            !liveness.heartbeat_due(at(8)),
            "a node that left stays quiet"
        );
    }

    #[test]
    fn a_node_silent_for_a_lease_while_the_bus_was_up_knows_it() {
        let mut liveness = Liveness::new(Duration::from_secs(1), Duration::from_secs(10));
        assert_eq!(liveness.silent_for_a_lease(at(100)), None, "never beat");
        liveness.bus_up(at(0));
        assert!(liveness.heartbeat_due(at(0)));
        assert_eq!(liveness.silent_for_a_lease(at(9)), None);
        assert_eq!(
            liveness.silent_for_a_lease(at(12)),
            Some(Duration::from_secs(12))
        );
        assert_eq!(liveness.silent_for_a_lease(at(13)), None, "once");
        // Silence while the bus is down is the bus's, not this node's.
        liveness.bus_down();
        assert_eq!(liveness.silent_for_a_lease(at(60)), None);
    }

    #[test]
    fn accounts_agree_with_most_nodes_or_not_at_all() {
        let mut liveness = Liveness::new(Duration::from_secs(1), Duration::from_secs(10));
        let (a, b, c) = (
            NodeId::from_u128(1),
            NodeId::from_u128(2),
            NodeId::from_u128(3),
        );
        assert!(liveness.accounts_agree("x"), "alone");
        liveness.heard(a, at(0));
        assert!(liveness.accounts_agree("x"), "no digest heard yet");
        assert!(liveness.accounts_of(a, "y".into(), "x"), "reported");
        assert!(!liveness.accounts_of(a, "y".into(), "x"), "once");
        assert!(!liveness.accounts_agree("x"), "one against one");
        liveness.heard(b, at(0));
        liveness.accounts_of(b, "x".into(), "x");
        assert!(liveness.accounts_agree("x"), "two against one");
        assert!(!liveness.accounts_agree("z"), "a third digest, alone");
        liveness.heard(c, at(0));
        liveness.accounts_of(c, "y".into(), "x");
        assert!(!liveness.accounts_agree("x"), "two against two");
        liveness.forget(c);
        assert!(liveness.accounts_agree("x"));
    }

    #[test]
    fn a_roster_is_asked_for_at_most_once_a_lease() {
        let mut liveness = Liveness::new(Duration::from_secs(1), Duration::from_secs(10));
        let a = NodeId::from_u128(1);
        assert!(!liveness.should_ask_roster(a, at(0)), "unknown node");
        liveness.heard(a, at(0));
        assert!(liveness.should_ask_roster(a, at(0)));
        assert!(!liveness.should_ask_roster(a, at(9)));
        assert!(liveness.should_ask_roster(a, at(10)));
    }
}
