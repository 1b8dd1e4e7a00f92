//! Durability: changes to lasting state leave the core in batches, in the
//! same ordered output stream as the frames, and what depends on a batch
//! waits for its answer.
//!
//! Every change the core makes to lasting state goes into the open batch.
//! When no batch is being written, the open batch leaves as
//! [`Output::Persist`]; changes made while it is
//! written form the next one, so there is one batch in flight at a time and
//! a slow disk makes batches bigger, not more numerous.
//!
//! An output is held while a batch that changed state it read is
//! unanswered (PROTOCOL.md rule 15): the answer to a message stored for an
//! offline user waits for the batch that stores it, and so does a message
//! to a user whose login is being written. Outputs of one connection keep
//! their order, so a held frame holds back the frames after it on that
//! connection; everyone else's output goes out at once. Dependencies are
//! kept per user (their session, offline queue, blocks), per name (its
//! failed-login record) and for the set of users online.
//!
//! A batch that fails is undone, with every later one, newest first, from
//! what the core recorded when it made each change; nothing is reloaded.
//! Facts that cannot be undone (a user went offline, a message was written
//! to its recipient) are recorded again in the next batch. Held answers of
//! undone requests become `unavailable`; a `bye` and a close are facts and
//! still go out.

use std::collections::{HashMap, VecDeque};

use crate::accounts::UserId;
use crate::error::ErrorCode;
pub use crate::ids::BatchId;
use crate::ids::ConnId;
use crate::lockout::LockoutState;
use crate::output::Output;
use crate::request::RequestId;
use crate::stats::Tally;
use crate::store::Change;
use crate::time::Timestamp;
use crate::username::Username;

/// What became of an [`Output::Persist`] batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Persisted {
    /// Every change of the batch is durable.
    Committed,
    /// None of them is: storage is as it was before the batch.
    Failed,
}

/// How to take back one change, recorded when it was made.
#[derive(Debug)]
pub(crate) enum Undo {
    /// A message joined the end of `to`'s queue.
    Queued {
        to: UserId,
        bytes: usize,
    },
    Blocked {
        blocker: UserId,
        target: UserId,
    },
    Unblocked {
        blocker: UserId,
        target: UserId,
    },
    /// `user` logged in on `conn`; before, they were last seen at
    /// `last_seen`.
    LoggedIn {
        user: UserId,
        conn: ConnId,
        last_seen: Option<Timestamp>,
    },
    /// The failed-login record of `name` was `before`.
    Lockout {
        name: Username,
        before: LockoutState,
    },
}

/// Changes made together, and how to take them back.
#[derive(Debug, Default)]
struct Batch {
    id: u64,
    changes: Vec<Change>,
    undo: Vec<Undo>,
    facts: Vec<Fact>,
}

/// What a held output is, which decides its fate if a batch it waits for
/// fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An answer to a request: it becomes `unavailable`.
    Answer(Option<RequestId>),
    /// A `bye` or a close: it goes out anyway.
    Fact,
    /// Anything else a request caused (a message, a notice): dropped.
    Caused,
    /// A queued message handed over behind held output: numbered in its
    /// connection's drain when it goes out.
    Page,
}

/// An output waiting for a batch.
#[derive(Debug)]
pub(crate) struct Held {
    /// The newest batch it waits for.
    pub(crate) after: u64,
    /// A login's answer, when the login starts an offline drain: it waits
    /// for the drain's first page too, besides its batch, so that the
    /// answer and the first page go out together ([`Ledger::lift`]). Kept
    /// apart from `after` (it used to replace it) so that a failed batch
    /// turns the answer into `unavailable` only if the login's own batch,
    /// or an earlier one it read, is undone, not any later batch.
    pub(crate) first_page: bool,
    pub(crate) output: Output,
    pub(crate) kind: Kind,
    /// What it counts for in the server's stats once it goes out.
    pub(crate) tally: Option<Tally>,
}

/// A key whose state an output may depend on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Key<'a> {
    /// A user's session, offline queue and blocks (both ways).
    User(UserId),
    /// A name's failed-login record.
    Name(&'a Username),
    /// The set of users online (and when each was last seen).
    Online,
}

/// The batches, what each change depends on, and the outputs that wait.
#[derive(Debug)]
pub(crate) struct Ledger {
    enabled: bool,
    open: Batch,
    in_flight: Option<Batch>,
    /// Every batch up to this id is answered (or undone).
    answered: u64,
    /// The newest unanswered batch that changed each key.
    users: HashMap<UserId, u64>,
    names: HashMap<Username, u64>,
    online: u64,
    /// The newest unanswered batch with any change that can be undone.
    any: u64,
    /// The newest batch the unit of work being served has read.
    reads: u64,
    /// Outputs that wait, per connection, in order, each numbered in the
    /// order it was held: what a batch frees goes out in that order across
    /// connections too (not in the map's order, which varies run to run).
    held: HashMap<ConnId, VecDeque<(u64, Held)>>,
    /// The number of the next output held.
    next_held: u64,
}

impl Ledger {
    /// A ledger; without `enabled` it records nothing and holds nothing.
    pub(crate) fn new(enabled: bool) -> Self {
        Ledger {
            enabled,
            open: Batch {
                id: 1,
                ..Batch::default()
            },
            in_flight: None,
            answered: 0,
            users: HashMap::new(),
            names: HashMap::new(),
            online: 0,
            any: 0,
            reads: 0,
            held: HashMap::new(),
            next_held: 0,
        }
    }

    /// Whether changes are recorded at all.
    #[inline]
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Records a change that a failed batch takes back with `undo`; it
    /// changed the state of `keys`, which the unit being served now
    /// depends on too.
    pub(crate) fn record(&mut self, change: Change, undo: Undo, keys: &[Key<'_>]) {
        if !self.enabled {
            return;
        }
        let id = self.open.id;
        for key in keys {
            match *key {
                Key::User(user) => {
                    self.users.insert(user, id);
                }
                Key::Name(name) => {
                    self.names.insert(name.clone(), id);
                }
                Key::Online => self.online = id,
            }
        }
        self.any = id;
        self.reads = id;
        self.open.changes.push(change);
        self.open.undo.push(undo);
    }

    /// Records a fact: nothing waits for it, and a failed batch records it
    /// again.
    pub(crate) fn record_fact(&mut self, change: Change, session: Option<ConnId>) {
        if !self.enabled {
            return;
        }
        self.open.changes.push(change.clone());
        self.open.facts.push(Fact { change, session });
    }

    /// The unit being served reads the state of `key`.
    #[inline]
    pub(crate) fn read(&mut self, key: Key<'_>) {
        if !self.enabled {
            return;
        }
        let batch = match key {
            Key::User(user) if !self.users.is_empty() => self.users.get(&user).copied(),
            Key::Name(name) if !self.names.is_empty() => self.names.get(name).copied(),
            Key::Online => Some(self.online),
            _ => None,
        };
        if let Some(batch) = batch.filter(|&b| b > self.answered) {
            self.reads = self.reads.max(batch);
        }
    }

    /// The unit being served reads everything (a debug view).
    pub(crate) fn read_all(&mut self) {
        if self.any > self.answered {
            self.reads = self.reads.max(self.any);
        }
    }

    /// Whether `user`'s state has changes not yet answered.
    pub(crate) fn user_dirty(&self, user: UserId) -> bool {
        !self.users.is_empty() && self.users.get(&user).is_some_and(|&b| b > self.answered)
    }

    /// Ends a unit of work: the batch its outputs wait for, if any
    /// unanswered one (0 when none).
    pub(crate) fn take_reads(&mut self) -> u64 {
        let reads = std::mem::take(&mut self.reads);
        if reads > self.answered {
            reads
        } else {
            0
        }
    }

    /// Whether an output for `conn` has to wait: it waits for batch
    /// `after`, or `conn` has outputs waiting before it.
    pub(crate) fn must_hold(&self, conn: ConnId, after: u64, first_page: bool) -> bool {
        first_page
            || after > self.answered
            || (!self.held.is_empty() && self.held.contains_key(&conn))
    }

    /// Whether anything at all is held.
    pub(crate) fn holds_any(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether `conn` has outputs waiting.
    pub(crate) fn holds(&self, conn: ConnId) -> bool {
        !self.held.is_empty() && self.held.contains_key(&conn)
    }

    /// Holds `output` for `conn` behind what it already holds.
    pub(crate) fn hold(&mut self, conn: ConnId, held: Held) {
        self.held
            .entry(conn)
            .or_default()
            .push_back((self.next_held, held));
        self.next_held += 1;
    }

    /// The open batch, to send, if it has changes and none is in flight.
    pub(crate) fn take_batch(&mut self) -> Option<(BatchId, Vec<Change>)> {
        if self.in_flight.is_some() || self.open.changes.is_empty() {
            return None;
        }
        let next = Batch {
            id: self.open.id + 1,
            ..Batch::default()
        };
        let mut batch = std::mem::replace(&mut self.open, next);
        let changes = std::mem::take(&mut batch.changes);
        let id = BatchId(batch.id);
        self.in_flight = Some(batch);
        Some((id, changes))
    }

    /// Whether any change is not yet answered (in flight or still open).
    pub(crate) fn pending(&self) -> bool {
        self.in_flight.is_some() || !self.open.changes.is_empty()
    }

    /// The batch in flight is durable: what waited only for it may go.
    /// Calls `release` with each output now free, per connection in
    /// order. False for a batch not in flight (ignored).
    /// The id of the batch changes recorded now go into.
    pub(crate) fn open_id(&self) -> u64 {
        self.open.id
    }

    /// Every batch up to this id is answered (committed, or undone).
    pub(crate) fn answered_id(&self) -> u64 {
        self.answered
    }

    pub(crate) fn committed(
        &mut self,
        batch: BatchId,
        release: impl FnMut(Output, Kind, Option<Tally>),
    ) -> bool {
        if self.in_flight.as_ref().map(|b| b.id) != Some(batch.0) {
            return false;
        }
        self.in_flight = None;
        self.answered = batch.0;
        let answered = self.answered;
        self.users.retain(|_, b| *b > answered);
        self.names.retain(|_, b| *b > answered);
        self.release(release);
        true
    }

    /// The batch in flight failed: it and the open batch are undone,
    /// newest first. Returns what the caller applies: the undo records,
    /// newest first, and the facts of both batches, oldest first, to
    /// record again. `None` for a batch not in flight (ignored).
    ///
    /// Held outputs that waited for an undone batch are settled by
    /// `unavailable`: an answer becomes what it returns for the answer's
    /// request id, a `bye` or close stays, anything else is dropped. Then
    /// what is free goes to `release`.
    pub(crate) fn failed(
        &mut self,
        batch: BatchId,
        unavailable: impl Fn(ConnId, Option<RequestId>) -> Output,
        release: impl FnMut(Output, Kind, Option<Tally>),
    ) -> Option<Failure> {
        if self.in_flight.as_ref().map(|b| b.id) != Some(batch.0) {
            return None;
        }
        let in_flight = self.in_flight.take().expect("checked above");
        let open = std::mem::take(&mut self.open);
        let mut undo: Vec<Undo> = open.undo.into_iter().rev().collect();
        undo.extend(in_flight.undo.into_iter().rev());
        let mut facts = in_flight.facts;
        facts.extend(open.facts);
        // The undone ids count as answered: nothing waits for them now.
        self.answered = open.id;
        self.open = Batch {
            id: open.id + 1,
            ..Batch::default()
        };
        self.users.clear();
        self.names.clear();
        self.online = 0;
        self.any = 0;
        self.reads = 0;
        let from = in_flight.id;
        for (&conn, queue) in &mut self.held {
            let mut kept = VecDeque::with_capacity(queue.len());
            for (number, held) in queue.drain(..) {
                if held.after < from {
                    kept.push_back((number, held));
                    continue;
                }
                match held.kind {
                    Kind::Answer(id) => {
                        kept.push_back((
                            number,
                            Held {
                                after: 0,
                                first_page: false,
                                output: unavailable(conn, id),
                                kind: Kind::Answer(id),
                                tally: Some(held.tally.map_or(
                                    Tally::Error(ErrorCode::Unavailable),
                                    Tally::unavailable,
                                )),
                            },
                        ))
                    }
                    Kind::Fact => kept.push_back((
                        number,
                        Held {
                            after: 0,
                            first_page: false,
                            ..held
                        },
                    )),
                    Kind::Caused | Kind::Page => {}
                }
            }
            *queue = kept;
        }
        self.release(release);
        Some(Failure { undo, facts })
    }

    /// Hands every held output that no longer waits to `release`, in the
    /// order they were held (so per connection in order).
    pub(crate) fn release(&mut self, mut release: impl FnMut(Output, Kind, Option<Tally>)) {
        let answered = self.answered;
        let mut free = Vec::new();
        self.held.retain(|_, queue| {
            while queue
                .front()
                .is_some_and(|(_, h)| h.after <= answered && !h.first_page)
            {
                free.push(queue.pop_front().expect("checked above"));
            }
            !queue.is_empty()
        });
        free.sort_unstable_by_key(|&(number, _)| number);
        for (_, held) in free {
            release(held.output, held.kind, held.tally);
        }
    }

    /// `conn`'s first offline page is handed over (or there is none): what
    /// waited for it no longer does.
    pub(crate) fn lift(&mut self, conn: ConnId) {
        if let Some(queue) = self.held.get_mut(&conn) {
            for (_, held) in queue.iter_mut() {
                held.first_page = false;
            }
        }
    }
}

/// What a failed batch leaves the caller to do.
#[derive(Debug)]
pub(crate) struct Failure {
    /// How to take the undone changes back, newest first.
    pub(crate) undo: Vec<Undo>,
    /// Facts to record again (with [`Ledger::record_fact`]), oldest first.
    pub(crate) facts: Vec<Fact>,
}

/// A fact: a change that happened whatever storage says, recorded again
/// if its batch fails.
#[derive(Debug)]
pub(crate) struct Fact {
    pub(crate) change: Change,
    /// For a logout, the connection the session was on: a logout whose
    /// login was undone is not recorded again.
    pub(crate) session: Option<ConnId>,
}
