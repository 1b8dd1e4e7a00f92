//! Lockout: too many failed logins lock a user name for a while.
//!
//! Failures are counted per user name, whether or not an account has that
//! name, so that a wrong password and an unknown user look the same from
//! outside (no account enumeration). Names with an account are few and
//! fixed; names without one come from anyone on the network, so they are
//! held in a bounded table that forgets the oldest first.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// When failed logins lock a name, and for how long.
///
/// ```
/// use chatproto::LockoutPolicy;
/// use std::time::Duration;
///
/// let policy = LockoutPolicy { max_failures: 5, ..LockoutPolicy::default() };
/// assert_eq!(policy.lock_duration, Duration::from_secs(60));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Consecutive failures that lock the name (at least 1; default 3).
    pub max_failures: u32,
    /// How long the lock holds (default 60 s).
    pub lock_duration: Duration,
    /// How many names without an account are tracked at once (default
    /// 10,000). Past it the oldest is forgotten, which bounds memory under a
    /// flood of made-up names.
    pub max_tracked_unknown: usize,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            max_failures: 3,
            lock_duration: Duration::from_secs(60),
            max_tracked_unknown: 10_000,
        }
    }
}

/// The failed-login record of one name, as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockoutState {
    /// Consecutive failures since the last success or lock.
    pub failures: u32,
    /// When the lock ends, while the name is locked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<Timestamp>,
}

/// Failed-login records for every name that has one.
#[derive(Debug)]
pub(crate) struct Lockout {
    policy: LockoutPolicy,
    entries: HashMap<Arc<str>, Entry>,
    /// Lock ends, earliest first.
    expiries: BTreeSet<(Timestamp, Arc<str>)>,
    /// Names without an account and not locked, oldest first, with the
    /// sequence number of their entry (a stale pair no longer matches it).
    unknown_order: VecDeque<(u64, Arc<str>)>,
    /// Locked names without an account, oldest first, likewise.
    locked_unknown_order: VecDeque<(u64, Arc<str>)>,
    unknown_count: usize,
    next_seq: u64,
    locked_known: usize,
}

#[derive(Debug)]
struct Entry {
    state: LockoutState,
    known: bool,
    seq: u64,
}

/// A lock that ended.
#[derive(Debug)]
pub(crate) struct Expired {
    pub(crate) name: Arc<str>,
    pub(crate) known: bool,
}

impl Lockout {
    pub(crate) fn new(policy: LockoutPolicy) -> Self {
        Lockout {
            policy,
            entries: HashMap::new(),
            expiries: BTreeSet::new(),
            unknown_order: VecDeque::new(),
            locked_unknown_order: VecDeque::new(),
            unknown_count: 0,
            next_seq: 0,
            locked_known: 0,
        }
    }

    /// When the lock on `name` ends, if it is locked at `now`.
    pub(crate) fn locked_until(&self, name: &str, now: Timestamp) -> Option<Timestamp> {
        let until = self.entries.get(name)?.state.locked_until?;
        (until > now).then_some(until)
    }

    /// Counts a failure; returns the new state, locked if this failure
    /// reached the limit.
    pub(crate) fn record_failure(
        &mut self,
        name: &str,
        known: bool,
        now: Timestamp,
    ) -> LockoutState {
        self.end_lock_if_over(name, now);
        if !self.entries.contains_key(name) {
            self.insert(name, known, LockoutState::default());
        }
        let seq = self.next_seq;
        let entry = self.entries.get_mut(name).expect("inserted above");
        entry.state.failures = entry.state.failures.saturating_add(1);
        if entry.state.failures < self.policy.max_failures {
            return entry.state;
        }
        let until = now + self.policy.lock_duration;
        entry.state = LockoutState {
            failures: 0,
            locked_until: Some(until),
        };
        let state = entry.state;
        let (key, _) = self.entries.get_key_value(name).expect("inserted above");
        let key = key.clone();
        self.expiries.insert((until, key.clone()));
        if known {
            self.locked_known += 1;
        } else {
            // Locked names are forgotten last, so a flood of made-up names
            // cannot end a lock early (which would tell them apart from
            // real accounts).
            self.next_seq += 1;
            self.entries.get_mut(name).expect("inserted above").seq = seq;
            self.locked_unknown_order.push_back((seq, key));
        }
        state
    }

    /// Forgets the failures of `name` after a successful login; true if
    /// there were any.
    pub(crate) fn record_success(&mut self, name: &str) -> bool {
        self.remove(name)
    }

    /// Forgets the records of every account (not those of unknown names,
    /// which are not lasting state), before loading them again.
    pub(crate) fn forget_known(&mut self) {
        let known: Vec<Arc<str>> = self
            .entries
            .iter()
            .filter(|(_, e)| e.known)
            .map(|(name, _)| name.clone())
            .collect();
        for name in known {
            self.remove(&name);
        }
    }

    /// Puts back a state read from storage.
    pub(crate) fn restore(&mut self, name: &str, state: LockoutState, now: Timestamp) {
        self.remove(name);
        let state = match state.locked_until {
            Some(until) if until <= now => return,
            Some(_) => LockoutState {
                failures: 0,
                ..state
            },
            None => state,
        };
        if state.failures == 0 && state.locked_until.is_none() {
            return;
        }
        self.insert(name, true, state);
        if let Some(until) = state.locked_until {
            let (key, _) = self.entries.get_key_value(name).expect("inserted above");
            self.expiries.insert((until, key.clone()));
            self.locked_known += 1;
        }
    }

    /// Ends every lock due by `now`.
    pub(crate) fn expire(&mut self, now: Timestamp) -> Vec<Expired> {
        let mut ended = Vec::new();
        while let Some((until, name)) = self.expiries.first().cloned() {
            if until > now {
                break;
            }
            let known = self.entries.get(&*name).is_some_and(|e| e.known);
            self.remove(&name);
            ended.push(Expired { name, known });
        }
        ended
    }

    /// When the next lock ends.
    pub(crate) fn next_expiry(&self) -> Option<Timestamp> {
        self.expiries.first().map(|(t, _)| *t)
    }

    /// Accounts (names that exist) locked now.
    pub(crate) fn locked_accounts(&self) -> usize {
        self.locked_known
    }

    /// Names without an account being tracked.
    #[cfg(test)]
    pub(crate) fn tracked_unknown(&self) -> usize {
        self.unknown_count
    }

    /// A lock that has run out (but whose timer has not fired yet) counts
    /// as gone: the name starts afresh.
    fn end_lock_if_over(&mut self, name: &str, now: Timestamp) {
        let over = self
            .entries
            .get(name)
            .and_then(|e| e.state.locked_until)
            .is_some_and(|until| until <= now);
        if over {
            self.remove(name);
        }
    }

    fn insert(&mut self, name: &str, known: bool, state: LockoutState) {
        let key: Arc<str> = Arc::from(name);
        let seq = self.next_seq;
        self.next_seq += 1;
        if !known {
            while self.unknown_count >= self.policy.max_tracked_unknown.max(1) {
                if !self.evict_oldest_unknown() {
                    break;
                }
            }
            self.unknown_order.push_back((seq, key.clone()));
            self.unknown_count += 1;
            self.compact_unknown_order();
        }
        self.entries.insert(key, Entry { state, known, seq });
    }

    /// Forgets one name without an account: the oldest unlocked one, or
    /// failing that the oldest locked one.
    fn evict_oldest_unknown(&mut self) -> bool {
        for locked in [false, true] {
            let order = if locked {
                &mut self.locked_unknown_order
            } else {
                &mut self.unknown_order
            };
            while let Some((seq, name)) = order.pop_front() {
                if self.entries.get(&*name).is_some_and(|e| e.seq == seq) {
                    self.remove(&name);
                    return true;
                }
            }
        }
        false
    }

    /// Drops stale pairs once they outnumber live ones, so the order queues
    /// stay proportional to the table.
    fn compact_unknown_order(&mut self) {
        let entries = &self.entries;
        for order in [&mut self.unknown_order, &mut self.locked_unknown_order] {
            if order.len() > 2 * self.unknown_count + 16 {
                order.retain(|(seq, name)| entries.get(&**name).is_some_and(|e| e.seq == *seq));
            }
        }
    }

    fn remove(&mut self, name: &str) -> bool {
        let Some((key, entry)) = self.entries.remove_entry(name) else {
            return false;
        };
        if let Some(until) = entry.state.locked_until {
            self.expiries.remove(&(until, key));
            if entry.known {
                self.locked_known -= 1;
            }
        }
        if !entry.known {
            self.unknown_count -= 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_unix_millis(secs * 1000)
    }

    fn lockout(max_unknown: usize) -> Lockout {
        Lockout::new(LockoutPolicy {
            max_failures: 3,
            lock_duration: Duration::from_secs(60),
            max_tracked_unknown: max_unknown,
        })
    }

    #[test]
    fn locks_on_the_third_failure_and_expires() {
        let mut l = lockout(10);
        assert_eq!(l.record_failure("bob", true, at(0)).failures, 1);
        assert_eq!(l.record_failure("bob", true, at(1)).failures, 2);
        let s = l.record_failure("bob", true, at(2));
        assert_eq!(s.locked_until, Some(at(62)));
        assert_eq!(l.locked_until("bob", at(61)), Some(at(62)));
        assert_eq!(l.locked_accounts(), 1);
        assert_eq!(l.next_expiry(), Some(at(62)));
        assert!(l.expire(at(61)).is_empty());
        let ended = l.expire(at(62));
        assert_eq!(ended.len(), 1);
        assert!(ended[0].known);
        assert_eq!(l.locked_until("bob", at(62)), None);
        assert_eq!(l.locked_accounts(), 0);
        assert_eq!(l.record_failure("bob", true, at(63)).failures, 1);
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut l = lockout(10);
        l.record_failure("bob", true, at(0));
        l.record_failure("bob", true, at(0));
        assert!(l.record_success("bob"));
        assert_eq!(l.record_failure("bob", true, at(0)).failures, 1);
    }

    #[test]
    fn unknown_names_are_bounded_and_oldest_go_first() {
        let mut l = lockout(3);
        for i in 0..1000 {
            l.record_failure(&format!("ghost{i}"), false, at(0));
            assert!(l.tracked_unknown() <= 3);
            assert!(l.unknown_order.len() <= 2 * 3 + 16 + 1);
        }
        assert!(l.entries.contains_key("ghost999"));
        assert!(!l.entries.contains_key("ghost0"));
    }

    #[test]
    fn a_flood_of_made_up_names_does_not_end_a_lock_early() {
        let mut l = lockout(3);
        for _ in 0..3 {
            l.record_failure("ghost", false, at(0));
        }
        for i in 0..100 {
            l.record_failure(&format!("filler{i}"), false, at(1));
        }
        assert_eq!(l.locked_until("ghost", at(2)), Some(at(60)));
        assert!(l.tracked_unknown() <= 3);
    }

    #[test]
    fn a_restored_count_past_the_limit_locks_at_the_next_failure() {
        let mut l = lockout(3);
        let state = LockoutState {
            failures: u32::MAX,
            locked_until: None,
        };
        l.restore("bob", state, at(0));
        assert!(l.record_failure("bob", true, at(0)).locked_until.is_some());
    }

    #[test]
    fn evicting_a_locked_unknown_name_drops_its_timer() {
        let mut l = lockout(1);
        for _ in 0..3 {
            l.record_failure("ghost", false, at(0));
        }
        assert!(l.next_expiry().is_some());
        l.record_failure("other", false, at(0));
        assert_eq!(l.next_expiry(), None);
        assert_eq!(l.locked_accounts(), 0);
    }
}
