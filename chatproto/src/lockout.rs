//! Lockout and login pacing per user name: too many failed logins lock a
//! name for a while, and logins for one name are rate limited.
//!
//! Every name tried is kept in one table under one rule, whether or not an
//! account has that name, so that nothing (an answer, a lock that outlives
//! a flood of made-up names, what survives a restart) tells accounts apart
//! from names that have none. An entry is forgotten only when nothing in it
//! matters any more: its failure count has expired (the lock duration
//! passed without a failure), it is not locked, and its login bucket is
//! full again. The table has a cap; while it is full, a login for a name
//! not in it is refused (`unavailable`), whatever the name.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rate_limit::{Rate, TokenBucket};
use crate::time::Timestamp;
use crate::username::Username;

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
    /// How long the lock holds (default 60 s); a failure count also
    /// starts again from zero once this long passes without a failure.
    pub lock_duration: Duration,
    /// How many names, with an account or not, are tracked at once
    /// (default 100,000). While the table is full, a login for a name not
    /// in it is answered `unavailable`.
    pub max_tracked_names: usize,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            max_failures: 3,
            lock_duration: Duration::from_secs(60),
            max_tracked_names: 100_000,
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
    /// When the last failure was; the count expires a lock duration later.
    /// `None` in records written before counts expired: taken as the time
    /// they are loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<Timestamp>,
}

impl LockoutState {
    /// Whether there is anything to keep: a count or a lock.
    pub fn is_empty(&self) -> bool {
        self.failures == 0 && self.locked_until.is_none()
    }
}

/// The name table is full and does not hold this name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableFull;

/// Failed-login records and login buckets for every name tried lately.
#[derive(Debug)]
pub(crate) struct Lockout {
    policy: LockoutPolicy,
    entries: HashMap<Username, Entry>,
    /// When each entry can be forgotten (or its lock ends), earliest first:
    /// one pair per entry.
    deadlines: BTreeSet<(Timestamp, Username)>,
    locked_known: usize,
}

#[derive(Debug)]
struct Entry {
    state: LockoutState,
    /// An account has this name (only for the `locked_accounts` count).
    known: bool,
    /// Logins for this name, when they are rate limited.
    attempts: Option<TokenBucket>,
    deadline: Timestamp,
}

/// An entry that was forgotten.
#[derive(Debug)]
pub(crate) struct Expired {
    pub(crate) name: Username,
    /// It held a stored record (a count or a lock), which storage drops.
    pub(crate) had_record: bool,
}

impl Lockout {
    pub(crate) fn new(policy: LockoutPolicy) -> Self {
        Lockout {
            policy,
            entries: HashMap::new(),
            deadlines: BTreeSet::new(),
            locked_known: 0,
        }
    }

    /// When the lock on `name` ends, if it is locked at `now`.
    pub(crate) fn locked_until(&self, name: &str, now: Timestamp) -> Option<Timestamp> {
        let until = self.entries.get(name)?.state.locked_until?;
        (until > now).then_some(until)
    }

    /// The failed-login record of `name` (empty if none).
    pub(crate) fn state(&self, name: &str) -> LockoutState {
        self.entries.get(name).map(|e| e.state).unwrap_or_default()
    }

    /// Sets the record of `name` back to `before`, as a failed batch takes
    /// back the changes made since.
    pub(crate) fn put_back(
        &mut self,
        name: &Username,
        known: bool,
        before: LockoutState,
        now: Timestamp,
    ) {
        if !self.entries.contains_key(name.as_str()) {
            if before.is_empty() {
                return;
            }
            self.insert(name, known, LockoutState::default(), now);
        }
        let entry = self.entries.get_mut(name.as_str()).expect("inserted above");
        if entry.known && entry.state.locked_until.is_some() {
            self.locked_known -= 1;
        }
        entry.state = before;
        if entry.known && before.locked_until.is_some() {
            self.locked_known += 1;
        }
        self.reschedule(name, now, None);
    }

    /// Takes a login attempt for `name` from its bucket: whether it may go
    /// on. Fails when the table is full and does not hold the name yet.
    pub(crate) fn take_attempt(
        &mut self,
        name: &Username,
        known: bool,
        rate: Option<Rate>,
        now: Timestamp,
    ) -> Result<bool, TableFull> {
        if !self.entries.contains_key(name.as_str()) {
            if self.entries.len() >= self.policy.max_tracked_names {
                return Err(TableFull);
            }
            if rate.is_none() {
                // Nothing to keep until the attempt fails.
                return Ok(true);
            }
            self.insert(name, known, LockoutState::default(), now);
        }
        let Some(rate) = rate else {
            return Ok(true);
        };
        let entry = self.entries.get_mut(name.as_str()).expect("inserted above");
        let allowed = entry
            .attempts
            .get_or_insert_with(|| TokenBucket::full(rate.burst, now))
            .take(rate.burst, rate.per_second, now);
        self.reschedule(name, now, Some(rate));
        Ok(allowed)
    }

    /// Counts a failure; returns the new state, locked if this failure
    /// reached the limit.
    pub(crate) fn record_failure(
        &mut self,
        name: &Username,
        known: bool,
        rate: Option<Rate>,
        now: Timestamp,
    ) -> LockoutState {
        if !self.entries.contains_key(name.as_str()) {
            // Past the cap only for a login already let in (its check took
            // longer than its entry lived): bounded by the pending checks.
            self.insert(name, known, LockoutState::default(), now);
        }
        let lock_duration = self.policy.lock_duration;
        let max_failures = self.policy.max_failures;
        let entry = self.entries.get_mut(name.as_str()).expect("inserted above");
        let was_locked = entry.state.locked_until.is_some();
        entry.state = current(entry.state, lock_duration, now);
        entry.state.failures = entry.state.failures.saturating_add(1);
        entry.state.last_failure = Some(now);
        if entry.state.failures >= max_failures {
            entry.state.failures = 0;
            entry.state.locked_until = Some(now + lock_duration);
        }
        let state = entry.state;
        let known = entry.known;
        match (was_locked, state.locked_until.is_some()) {
            (false, true) if known => self.locked_known += 1,
            (true, false) if known => self.locked_known -= 1,
            _ => {}
        }
        self.reschedule(name, now, rate);
        state
    }

    /// Clears the record of `name` after a successful login; true if there
    /// was one (a count), which storage must drop too.
    pub(crate) fn record_success(
        &mut self,
        name: &Username,
        rate: Option<Rate>,
        now: Timestamp,
    ) -> bool {
        let Some(entry) = self.entries.get_mut(name.as_str()) else {
            return false;
        };
        let had_record = !entry.state.is_empty();
        if entry.known && entry.state.locked_until.is_some() {
            self.locked_known -= 1;
        }
        entry.state = LockoutState::default();
        self.reschedule(name, now, rate);
        had_record
    }

    /// Puts back a record read from storage; one that has run out by `now`
    /// is not put back (false).
    pub(crate) fn restore(
        &mut self,
        name: &Username,
        known: bool,
        state: LockoutState,
        now: Timestamp,
    ) -> bool {
        let state = LockoutState {
            last_failure: state.last_failure.or(Some(now)),
            ..state
        };
        let state = current(state, self.policy.lock_duration, now);
        if state.is_empty() {
            return false;
        }
        if !self.entries.contains_key(name.as_str()) {
            self.insert(name, known, LockoutState::default(), now);
        }
        let entry = self.entries.get_mut(name.as_str()).expect("inserted above");
        if entry.known && entry.state.locked_until.is_some() {
            self.locked_known -= 1;
        }
        entry.state = state;
        if entry.known && state.locked_until.is_some() {
            self.locked_known += 1;
        }
        self.reschedule(name, now, None);
        true
    }

    /// Deletes `name`'s failed-login record: its account was removed.
    pub(crate) fn clear_record(&mut self, name: &Username, now: Timestamp) {
        let Some(entry) = self.entries.get_mut(name.as_str()) else {
            return;
        };
        if entry.known && entry.state.locked_until.is_some() {
            self.locked_known -= 1;
        }
        entry.state = LockoutState::default();
        entry.known = false;
        self.reschedule(name, now, None);
    }

    /// Forgets every entry due by `now`: counts expired, locks ended,
    /// buckets full.
    pub(crate) fn expire(&mut self, now: Timestamp) -> Vec<Expired> {
        let mut ended = Vec::new();
        while let Some((due, name)) = self.deadlines.first().cloned() {
            if due > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(entry) = self.entries.remove(name.as_str()) else {
                continue;
            };
            if entry.known && entry.state.locked_until.is_some() {
                self.locked_known -= 1;
            }
            ended.push(Expired {
                had_record: !entry.state.is_empty(),
                name,
            });
        }
        ended
    }

    /// When the next entry is due to be forgotten.
    pub(crate) fn next_expiry(&self) -> Option<Timestamp> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Accounts (names that exist) locked now.
    pub(crate) fn locked_accounts(&self) -> usize {
        self.locked_known
    }

    /// Names tracked.
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.entries.len()
    }

    fn insert(&mut self, name: &Username, known: bool, state: LockoutState, now: Timestamp) {
        self.entries.insert(
            name.clone(),
            Entry {
                state,
                known,
                attempts: None,
                deadline: now,
            },
        );
        self.deadlines.insert((now, name.clone()));
    }

    /// Moves `name`'s deadline to when nothing in its entry matters: the
    /// lock has ended, the count has expired, the bucket is full.
    fn reschedule(&mut self, name: &Username, now: Timestamp, rate: Option<Rate>) {
        let lock_duration = self.policy.lock_duration;
        let Some(entry) = self.entries.get_mut(name.as_str()) else {
            return;
        };
        let record = match entry.state {
            LockoutState {
                locked_until: Some(until),
                ..
            } => until,
            LockoutState {
                failures: 1..,
                last_failure,
                ..
            } => last_failure.unwrap_or(now) + lock_duration,
            _ => now,
        };
        let bucket = match (&entry.attempts, rate) {
            (Some(bucket), Some(rate)) => bucket.full_at(rate.burst, rate.per_second),
            _ => now,
        };
        let deadline = record.max(bucket);
        if deadline <= now {
            // Nothing in it matters any more.
            self.deadlines.remove(&(entry.deadline, name.clone()));
            if let Some(entry) = self.entries.remove(name.as_str()) {
                if entry.known && entry.state.locked_until.is_some() {
                    self.locked_known -= 1;
                }
            }
            return;
        }
        if deadline != entry.deadline {
            self.deadlines.remove(&(entry.deadline, name.clone()));
            self.deadlines.insert((deadline, name.clone()));
            entry.deadline = deadline;
        }
    }
}

/// `state` as of `now`: a lock that has run out is gone, and so is a
/// count whose last failure is a lock duration old.
fn current(state: LockoutState, lock_duration: Duration, now: Timestamp) -> LockoutState {
    match state {
        LockoutState {
            locked_until: Some(until),
            ..
        } if until <= now => LockoutState::default(),
        LockoutState {
            locked_until: None,
            last_failure: Some(at),
            ..
        } if at + lock_duration <= now => LockoutState::default(),
        state => state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_unix_millis(secs * 1000)
    }

    fn name(s: &str) -> Username {
        s.parse().unwrap()
    }

    fn lockout(max_names: usize) -> Lockout {
        Lockout::new(LockoutPolicy {
            max_failures: 3,
            lock_duration: Duration::from_secs(60),
            max_tracked_names: max_names,
        })
    }

    #[test]
    fn locks_on_the_third_failure_and_expires() {
        let mut l = lockout(10);
        let bob = name("bob");
        assert_eq!(l.record_failure(&bob, true, None, at(0)).failures, 1);
        assert_eq!(l.record_failure(&bob, true, None, at(1)).failures, 2);
        let s = l.record_failure(&bob, true, None, at(2));
        assert_eq!(s.locked_until, Some(at(62)));
        assert_eq!(l.locked_until("bob", at(61)), Some(at(62)));
        assert_eq!(l.locked_accounts(), 1);
        assert_eq!(l.next_expiry(), Some(at(62)));
        assert!(l.expire(at(61)).is_empty());
        let ended = l.expire(at(62));
        assert_eq!(ended.len(), 1);
        assert!(ended[0].had_record);
        assert_eq!(l.locked_until("bob", at(62)), None);
        assert_eq!(l.locked_accounts(), 0);
        assert_eq!(l.record_failure(&bob, true, None, at(63)).failures, 1);
    }

    #[test]
    fn a_count_expires_a_lock_duration_after_the_last_failure() {
        let mut l = lockout(10);
        let bob = name("bob");
        l.record_failure(&bob, true, None, at(0));
        l.record_failure(&bob, true, None, at(30));
        assert_eq!(l.next_expiry(), Some(at(90)));
        // Not yet: the third failure locks.
        assert!(l
            .record_failure(&bob, true, None, at(89))
            .locked_until
            .is_some());
        let carol = name("carol");
        l.record_failure(&carol, false, None, at(100));
        l.record_failure(&carol, false, None, at(100));
        // A lock duration later the count starts again, even before the
        // timer has fired.
        assert_eq!(l.record_failure(&carol, false, None, at(160)).failures, 1);
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut l = lockout(10);
        let bob = name("bob");
        l.record_failure(&bob, true, None, at(0));
        l.record_failure(&bob, true, None, at(0));
        assert!(l.record_success(&bob, None, at(0)));
        assert!(!l.record_success(&bob, None, at(0)));
        assert_eq!(l.record_failure(&bob, true, None, at(0)).failures, 1);
    }

    #[test]
    fn a_full_table_refuses_new_names_and_keeps_every_record_until_it_expires() {
        let mut l = lockout(3);
        let real = name("bob");
        for _ in 0..2 {
            assert_eq!(l.take_attempt(&real, true, None, at(0)), Ok(true));
            l.record_failure(&real, true, None, at(0));
        }
        for i in 0..2 {
            let ghost = name(&format!("ghost{i}"));
            assert_eq!(l.take_attempt(&ghost, false, None, at(1)), Ok(true));
            l.record_failure(&ghost, false, None, at(1));
        }
        assert_eq!(l.tracked(), 3);
        // Full: a new name is refused, account or not, and nothing is
        // evicted to make room.
        assert_eq!(
            l.take_attempt(&name("ghost9"), false, None, at(2)),
            Err(TableFull)
        );
        assert_eq!(
            l.take_attempt(&name("alice"), true, None, at(2)),
            Err(TableFull)
        );
        // Names in the table go on.
        assert_eq!(l.take_attempt(&real, true, None, at(2)), Ok(true));
        assert!(l
            .record_failure(&real, true, None, at(2))
            .locked_until
            .is_some());
        // Once counts expire, room comes back.
        assert_eq!(l.expire(at(61)).len(), 2);
        assert_eq!(
            l.take_attempt(&name("ghost9"), false, None, at(61)),
            Ok(true)
        );
    }

    #[test]
    fn logins_per_name_are_rate_limited_and_the_entry_lives_until_the_bucket_is_full() {
        let mut l = lockout(10);
        let rate = Some(Rate {
            burst: 2,
            per_second: 1,
        });
        let bob = name("bob");
        assert_eq!(l.take_attempt(&bob, true, rate, at(0)), Ok(true));
        assert_eq!(l.take_attempt(&bob, true, rate, at(0)), Ok(true));
        assert_eq!(l.take_attempt(&bob, true, rate, at(0)), Ok(false));
        assert_eq!(l.next_expiry(), Some(at(2)));
        assert!(l.expire(at(1)).is_empty());
        let ended = l.expire(at(2));
        assert_eq!(ended.len(), 1);
        assert!(!ended[0].had_record);
    }

    #[test]
    fn a_restored_count_past_the_limit_locks_at_the_next_failure() {
        let mut l = lockout(3);
        let state = LockoutState {
            failures: u32::MAX,
            locked_until: None,
            last_failure: None,
        };
        let bob = name("bob");
        l.restore(&bob, true, state, at(0));
        assert!(l
            .record_failure(&bob, true, None, at(0))
            .locked_until
            .is_some());
    }

    #[test]
    fn a_restored_record_that_ran_out_is_dropped() {
        let mut l = lockout(3);
        let ghost = name("ghost");
        let old = LockoutState {
            failures: 2,
            locked_until: None,
            last_failure: Some(at(0)),
        };
        l.restore(&ghost, false, old, at(60));
        assert_eq!(l.tracked(), 0);
        l.restore(&ghost, false, old, at(59));
        assert_eq!(l.tracked(), 1);
    }
}
