//! Output: units of work, whose outputs go out at once or wait for the
//! batches they read ([`Ledger`]); frames numbered for offline drains; a
//! failed batch's changes undone.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::accounts::UserId;
use crate::cluster::BusMessage;
use crate::drain::Drain;
use crate::durability::{Held, Kind, Ledger, Undo};
use crate::error::RequestError;
use crate::ids::ConnId;
use crate::output::{Event, Output};
use crate::request::RequestId;
use crate::server_frame::{ErrorFrame, OkFrame, Reply, ServerFrame, PROTOCOL_VERSION};
use crate::stats::{ServerStats, Tally};
use crate::time::Timestamp;
use crate::username::Username;

use super::session::Sessions;
use super::state::Server;

impl Server {
    pub(super) fn reply(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        reply: Reply,
        text: String,
    ) {
        self.answered(conn, id);
        self.send(conn, &ServerFrame::Ok(OkFrame { id, reply, text }));
    }

    pub(super) fn send_error(&mut self, conn: ConnId, id: Option<RequestId>, error: &RequestError) {
        self.answered(conn, id);
        self.send_error_frame(conn, id, error);
    }

    /// Notes an answer, which a failed batch it waits for turns into
    /// `unavailable`.
    #[inline]
    pub(super) fn answered(&mut self, _conn: ConnId, id: Option<RequestId>) {
        self.note_kind(Kind::Answer(id));
    }

    /// Notes what the next output is, for a failed batch to decide its
    /// fate (anything not noted is dropped with the batch).
    #[inline]
    pub(super) fn note_kind(&mut self, kind: Kind) {
        if self.ledger.enabled() {
            self.unit_kinds.push((self.outputs.len(), kind));
        }
    }

    /// Notes what the next output counts for in the stats: counted when
    /// it goes out (at once, unless it may wait for a batch).
    #[inline]
    pub(super) fn tally(&mut self, tally: Tally) {
        if self.tallies_wait() {
            self.unit_tallies.push((self.outputs.len(), tally));
        } else {
            self.stats.count(tally);
        }
    }

    /// Whether what the unit being served sends may wait for a batch, and
    /// so is counted when it goes out rather than now.
    #[inline]
    pub(super) fn tallies_wait(&self) -> bool {
        self.unit_depth > 0 && self.ledger.enabled()
    }

    pub(super) fn send_hello(&mut self, conn: ConnId, session: uuid::Uuid) {
        self.send(
            conn,
            &ServerFrame::Hello {
                session,
                version: PROTOCOL_VERSION,
            },
        );
    }

    pub(super) fn send_error_frame(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        error: &RequestError,
    ) {
        let code = error.code();
        let tally = match self.login_refusal.take() {
            Some(refused) if refused == code => Tally::LoginRefused(code),
            _ => Tally::Error(code),
        };
        self.tally(tally);
        self.transmit(conn, error_frame(id, error));
    }

    pub(super) fn send(&mut self, conn: ConnId, frame: &ServerFrame) {
        self.transmit(conn, frame.encode());
    }

    /// Queues `frame` for `conn`. Inside a unit of work it is settled
    /// (sent or held) with the unit; outside, it goes out at once.
    #[inline]
    pub(super) fn transmit(&mut self, conn: ConnId, frame: Bytes) {
        let drains = Drains {
            sessions: &mut self.sessions,
            closing: &mut self.closing_drains,
            draining: self.draining,
        };
        let settled_later = self.unit_depth > 0;
        queue_frame(
            &mut self.outputs,
            drains,
            &self.ledger,
            settled_later,
            conn,
            frame,
        );
    }

    /// Starts a unit of work (a frame served, a timer fired): its outputs
    /// are sent or held together, by what it read. Units nest; the
    /// outermost settles.
    #[inline]
    pub(super) fn begin(&mut self) -> usize {
        self.unit_depth += 1;
        self.outputs.len()
    }

    /// Ends the unit of work begun at `mark`: its outputs go out, or wait
    /// for the newest unanswered batch it read or changed, behind what
    /// their connections already hold.
    #[inline]
    pub(super) fn settle(&mut self, mark: usize) {
        self.unit_depth -= 1;
        if self.unit_depth > 0 || !self.ledger.enabled() {
            // (Without durability nothing waits, and frames were counted
            // as they were queued: there is nothing to settle.)
            return;
        }
        self.settle_outputs(mark);
        if std::mem::take(&mut self.lifted) {
            // A first-page wait was lifted in the unit (its connection
            // closed): what waited behind it goes, after the unit's own
            // outputs were held behind it.
            self.release_held();
        }
    }

    /// Sends or holds the outputs of the outermost unit begun at `mark`.
    fn settle_outputs(&mut self, mark: usize) {
        let after = self.ledger.take_reads();
        let first_page_for = self.first_page_for.take();
        let fast = after == 0
            && first_page_for.is_none()
            && (!self.ledger.holds_any()
                || !self.outputs.range(mark..).any(|o| match o {
                    Output::Transmit { conn, .. } | Output::Close { conn, .. } => {
                        self.ledger.holds(*conn)
                    }
                    Output::ClaimSession { claim, .. } => self
                        .hub
                        .claims
                        .get(claim)
                        .is_some_and(|p| self.ledger.holds(p.conn)),
                    _ => false,
                }));
        if fast {
            self.unit_kinds.clear();
            for (_, tally) in self.unit_tallies.drain(..) {
                self.stats.count(tally);
            }
            // (Without durability, frames were counted as they were queued.)
            let counted = !self.ledger.enabled();
            if !counted && (self.draining > 0 || !self.closing_drains.is_empty()) {
                for output in self.outputs.range(mark..) {
                    if let Output::Transmit { conn, .. } = output {
                        let drains = Drains {
                            sessions: &mut self.sessions,
                            closing: &mut self.closing_drains,
                            draining: self.draining,
                        };
                        count_frame(drains, *conn);
                    }
                }
            }
            return;
        }
        let tail: Vec<Output> = self.outputs.drain(mark..).collect();
        let mut kinds = std::mem::take(&mut self.unit_kinds).into_iter().peekable();
        let mut tallies = std::mem::take(&mut self.unit_tallies)
            .into_iter()
            .peekable();
        for (at, output) in (mark..).zip(tail) {
            let noted = kinds.next_if(|&(i, _)| i == at).map(|(_, kind)| kind);
            let tally = tallies.next_if(|&(i, _)| i == at).map(|(_, t)| t);
            let claimant = match &output {
                Output::ClaimSession { claim, .. } => self.hub.claims.get(claim).map(|p| p.conn),
                _ => None,
            };
            let (conn, kind) = match &output {
                Output::Transmit { conn, .. } => (*conn, noted.unwrap_or(Kind::Caused)),
                Output::Close { conn, .. } => (*conn, Kind::Fact),
                // A claim counts the queue in storage: it waits, behind
                // its connection's output, for what the login read.
                Output::ClaimSession { .. } if claimant.is_some() => {
                    (claimant.expect("checked"), Kind::Fact)
                }
                // Events, password checks and page reads wait for nothing.
                _ => {
                    self.outputs.push_back(output);
                    continue;
                }
            };
            let first_page = matches!(kind, Kind::Answer(_)) && first_page_for == Some(conn);
            if self.ledger.must_hold(conn, after, first_page) {
                self.ledger.hold(
                    conn,
                    Held {
                        after,
                        first_page,
                        output,
                        kind,
                        tally,
                    },
                );
            } else {
                let drains = Drains {
                    sessions: &mut self.sessions,
                    closing: &mut self.closing_drains,
                    draining: self.draining,
                };
                release_into(
                    &mut self.outputs,
                    drains,
                    &mut self.stats,
                    output,
                    Kind::Caused,
                    tally,
                );
            }
        }
    }

    /// Takes back one change of a failed batch; for a login, returns the
    /// connection whose session it was.
    pub(super) fn undo(&mut self, undo: Undo, now: Timestamp) -> Option<ConnId> {
        match undo {
            Undo::Queued { to, bytes } => self.hub.offline.pop_back(to, bytes),
            Undo::Blocked { blocker, target } => {
                self.hub.blocks.unblock(blocker, target);
                // The other nodes were told at once: they are told again.
                let (blocker, target) = self.names(blocker, target);
                self.publish(|node| BusMessage::Unblocked {
                    node,
                    blocker,
                    target,
                });
            }
            Undo::Unblocked { blocker, target } => {
                self.hub.blocks.block(blocker, target);
                let (blocker, target) = self.names(blocker, target);
                self.publish(|node| BusMessage::Blocked {
                    node,
                    blocker,
                    target,
                });
            }
            Undo::LoggedIn {
                user,
                conn,
                last_seen,
            } => {
                let still_on = self
                    .sessions
                    .get(conn)
                    .is_some_and(|c| c.user == Some(user));
                if still_on {
                    self.end_drain(conn);
                    let claim = self.sessions.get_mut(conn).and_then(|c| {
                        c.user = None;
                        c.claim.take()
                    });
                    // The other nodes were told of the login at once.
                    let name = self.hub.accounts.name(user).clone();
                    self.publish(|node| BusMessage::Offline {
                        node,
                        user: name,
                        at: now,
                    });
                    if let Some(claim) = claim {
                        // Not logged in after all: the cluster's session
                        // goes back, or no other node could take it.
                        self.outputs.push_back(Output::ReleaseSession {
                            user: self.hub.accounts.name(user).clone(),
                            claim,
                        });
                    }
                    self.hub.presence.log_out(user, now);
                    // Logged out again: the login timeout applies again.
                    self.reschedule(conn);
                }
                self.hub.presence.set_last_seen(user, last_seen);
                return Some(conn);
            }
            Undo::Lockout { name, before } => {
                let known = self.hub.accounts.contains(name.as_str());
                self.hub.lockout.put_back(&name, known, before, now);
            }
        }
        None
    }

    /// The names of two users.
    fn names(&self, a: UserId, b: UserId) -> (Username, Username) {
        let accounts = &self.hub.accounts;
        (accounts.name(a).clone(), accounts.name(b).clone())
    }

    pub(super) fn event(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }

    /// Hands the driver every held output that no longer waits.
    pub(super) fn release_held(&mut self) {
        let outputs = &mut self.outputs;
        let sessions = &mut self.sessions;
        let closing = &mut self.closing_drains;
        let draining = self.draining;
        let stats = &mut self.stats;
        self.ledger.release(|output, kind, tally| {
            let drains = Drains {
                sessions: &mut *sessions,
                closing: &mut *closing,
                draining,
            };
            release_into(outputs, drains, stats, output, kind, tally);
        });
    }
}

/// Queues a frame for `conn` made in the unit of work being served (when
/// `in_unit`): settled with the unit, or, without durability (nothing
/// waits) or outside a unit, out at once, numbered in its connection's
/// drain.
///
/// The output is built in place at the end: built first and passed down
/// by value, the 64-byte `Output` was copied through the stack per frame,
/// which cost about a fifth of a 64-message read (criterion's
/// `direct_message_batch64`).
#[inline]
pub(super) fn queue_frame(
    outputs: &mut VecDeque<Output>,
    drains: Drains<'_>,
    ledger: &Ledger,
    in_unit: bool,
    conn: ConnId,
    frame: Bytes,
) {
    if !(in_unit && ledger.enabled()) {
        count_frame(drains, conn);
    }
    outputs.push_back(Output::Transmit { conn, frame });
}

/// Puts a settled output in the queue the driver polls, numbering it in
/// its connection's drain if one is in progress, and counts it for what
/// `tally` says.
#[inline]
pub(super) fn release_into(
    outputs: &mut VecDeque<Output>,
    drains: Drains<'_>,
    stats: &mut ServerStats,
    output: Output,
    kind: Kind,
    tally: Option<Tally>,
) {
    if let Output::Transmit { conn, .. } = &output {
        if kind == Kind::Page {
            // The connection may have closed while the page was held (its
            // drain is then a closing one): the frame is numbered there, or
            // it would never count as written and come again at the next
            // login. With no drain at all (ended: what it had in flight
            // stays queued), the message must not go out.
            let drain = match drains.sessions.get_mut(*conn) {
                Some(c) => c.drain.as_mut(),
                None => drains.closing.get_mut(conn).map(|(_, drain)| drain),
            };
            match drain {
                Some(drain) => drain.number_held_frame(),
                None => return,
            }
        } else {
            count_frame(drains, *conn);
        }
    }
    if let Some(tally) = tally {
        stats.count(tally);
    }
    outputs.push_back(output);
}

/// The encoded `error` frame for request `id`.
pub(super) fn error_frame(id: Option<RequestId>, error: &RequestError) -> Bytes {
    ServerFrame::Error(ErrorFrame {
        id,
        code: error.code(),
        text: error.to_string(),
        retry_after: error.retry_after(),
    })
    .encode()
}

/// Counts a frame handed over for `conn`, if its offline queue is being
/// drained, or was when it closed (the drain needs every frame's number);
/// free when none is.
#[inline]
pub(super) fn count_frame(drains: Drains<'_>, conn: ConnId) {
    if drains.draining > 0 {
        if let Some(drain) = drains.sessions.get_mut(conn).and_then(|c| c.drain.as_mut()) {
            drain.count_frame();
            return;
        }
    }
    if !drains.closing.is_empty() {
        if let Some((_, drain)) = drains.closing.get_mut(&conn) {
            drain.count_frame();
        }
    }
}

/// Where frames handed over are counted: the open connections' drains and
/// those of connections that closed mid-drain.
pub(super) struct Drains<'a> {
    pub(super) sessions: &'a mut Sessions,
    pub(super) closing: &'a mut HashMap<ConnId, (UserId, Drain)>,
    pub(super) draining: usize,
}
