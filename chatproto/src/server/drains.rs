//! Offline delivery: handing a user's queue to their connection a page at
//! a time, paced by the reader, behind whatever that connection waits for.

use bytes::Bytes;

use crate::accounts::UserId;
use crate::drain::{Drain, Written};
use crate::durability::{Held, Kind};
use crate::ids::ConnId;
use crate::offline::{OfflineMessage, QueuedMessage};
use crate::output::Output;
use crate::server_frame::{MessageFrame, ServerFrame};
use crate::store::Change;

use super::state::Server;

impl Server {
    /// Starts handing `user`'s offline queue to `conn`, a page at a time.
    pub(super) fn start_drain(&mut self, conn: ConnId, user: UserId) {
        if self.hub.offline.size(user).messages == 0 {
            return;
        }
        if self.closing_drains.values().any(|(u, _)| *u == user) {
            // An earlier connection of this user may still be writing part
            // of the queue: this one waits for its last report (a close
            // grace at most), or it would get those messages twice.
            return;
        }
        if let Some(c) = self.sessions.get_mut(conn) {
            if c.drain.replace(Drain::default()).is_none() {
                self.draining += 1;
            }
            self.next_page(conn, user);
        }
    }

    /// Hands over the pages drains asked for, where nothing they follow
    /// waits for a batch: a page goes out at once, after every frame
    /// before it, so the drain's frame numbers match what the driver was
    /// given. A drain whose connection has held output, or whose user's
    /// queue has changes not yet durable, waits for the next batch's
    /// answer.
    #[inline]
    pub(super) fn pump_drains(&mut self) {
        if self.page_due.is_empty() && self.input_due.is_empty() {
            return;
        }
        for conn in std::mem::take(&mut self.page_due) {
            let Some(user) = self
                .sessions
                .get(conn)
                .filter(|c| c.drain.as_ref().is_some_and(|d| d.page_due))
                .and_then(|c| c.user)
            else {
                continue;
            };
            // A first page goes behind the login's held answer, which
            // waits for it; a later one waits until nothing is held.
            let started = self
                .sessions
                .get(conn)
                .and_then(|c| c.drain.as_ref())
                .is_some_and(|d| d.started);
            if (started && self.ledger.holds(conn)) || self.ledger.user_dirty(user) {
                if !self.page_gated.contains(&conn) {
                    self.page_gated.push(conn);
                }
                continue;
            }
            self.give_page(conn, user);
        }
        // Input that waited for a first page: served now, in order.
        while let Some(conn) = self.input_due.pop() {
            self.resume_input(conn);
        }
    }

    /// Gives up waiting for closed `conn`'s last report: its unsettled
    /// messages stay queued, and its user's drain may start.
    pub(super) fn give_up_closing_drain(&mut self, conn: ConnId) {
        self.closing_deadlines.retain(|&(_, c)| c != conn);
        if let Some((user, _)) = self.closing_drains.remove(&conn) {
            self.resume_drain(user);
        }
    }

    /// Starts `user`'s drain on the connection they are online on, if it
    /// waited for an earlier connection's drain to settle.
    pub(super) fn resume_drain(&mut self, user: UserId) {
        if let Some(conn) = self.hub.presence.session(user) {
            if !self.is_draining(conn) {
                self.start_drain(conn, user);
            }
        }
    }

    /// Asks for the next page of `user`'s queue for `conn`: handed over
    /// by [`Server::pump_drains`] once nothing it follows waits.
    pub(super) fn next_page(&mut self, conn: ConnId, user: UserId) {
        let Some(drain) = self.sessions.get_mut(conn).and_then(|c| c.drain.as_mut()) else {
            return;
        };
        if !self.ledger.enabled() {
            // Nothing is ever held: the page goes out now, in order.
            self.give_page(conn, user);
        } else if !drain.page_due {
            drain.page_due = true;
            self.page_due.push(conn);
        }
    }

    /// Hands `conn` the next page of `user`'s queue, from memory or by
    /// asking storage; ends the drain once everything is delivered.
    pub(super) fn give_page(&mut self, conn: ConnId, user: UserId) {
        let Some(drain) = self.sessions.get_mut(conn).and_then(|c| c.drain.as_mut()) else {
            return;
        };
        drain.page_due = false;
        let left = self.hub.offline.size(user).messages;
        if left <= drain.in_flight().messages {
            self.finish_drain_if_done(conn, user);
            return;
        }
        let max_bytes = self.config.offline_page_bytes;
        if drain.in_flight().bytes > max_bytes / 2 {
            // Over half a page still unwritten: the reader has not caught
            // up, whatever the driver's low-water mark says.
            return;
        }
        let after_seq = drain.after_seq();
        match self.hub.offline.page(user, after_seq, max_bytes) {
            Some(page) => self.hand_over(conn, page),
            None => {
                drain.loading = true;
                self.outputs.push_back(Output::LoadOffline {
                    conn,
                    user: self.hub.accounts.name(user).clone(),
                    after_seq,
                    max_bytes,
                });
            }
        }
    }

    /// Sends a page of queued messages to `conn`, noting each in its drain.
    /// Never inside a unit of work: the frames go out at once, numbered.
    pub(super) fn hand_over(&mut self, conn: ConnId, page: Vec<QueuedMessage>) {
        debug_assert!(self.unit_depth == 0 || !self.ledger.enabled());
        let first = self
            .sessions
            .get(conn)
            .and_then(|c| c.drain.as_ref())
            .is_some_and(|d| !d.started);
        if first {
            self.input_due.push(conn);
        }
        if self.ledger.holds(conn) {
            // Behind the login's answer: held, numbered as they go out.
            for QueuedMessage { seq, message } in page {
                let bytes = message.size();
                let frame = offline_frame(message);
                if let Some(drain) = self.sessions.get_mut(conn).and_then(|c| c.drain.as_mut()) {
                    drain.hand_over_held(seq, bytes);
                }
                let output = Output::Transmit { conn, frame };
                let held = Held {
                    after: 0,
                    first_page: false,
                    output,
                    kind: Kind::Page,
                    tally: None,
                };
                self.ledger.hold(conn, held);
            }
            self.ledger.lift(conn);
            self.release_held();
            return;
        }
        for QueuedMessage { seq, message } in page {
            let bytes = message.size();
            let frame = offline_frame(message);
            self.outputs.push_back(Output::Transmit { conn, frame });
            if let Some(drain) = self.sessions.get_mut(conn).and_then(|c| c.drain.as_mut()) {
                drain.hand_over(seq, bytes);
            }
        }
    }

    /// Ends `conn`'s drain if nothing is queued or in flight any more.
    pub(super) fn finish_drain_if_done(&mut self, conn: ConnId, user: UserId) {
        let done = self
            .sessions
            .get(conn)
            .and_then(|c| c.drain.as_ref())
            .is_some_and(|d| d.in_flight().messages == 0 && !d.loading)
            && self.hub.offline.size(user).messages == 0;
        if done {
            self.end_drain(conn);
        }
    }

    /// Drops `conn`'s drain, if any: what it had in flight stays queued.
    pub(super) fn end_drain(&mut self, conn: ConnId) -> Option<Drain> {
        let drain = self.sessions.get_mut(conn)?.drain.take()?;
        self.draining -= 1;
        if !drain.started {
            // Its later input, and its login's answer, waited for the
            // first page: they go on.
            self.input_due.push(conn);
            self.ledger.lift(conn);
            self.release_held();
        }
        Some(drain)
    }

    /// The driver has `unsent_frames` of open `conn`'s frames left: the
    /// queued messages its drain now knows written leave the queue.
    pub(super) fn record_written(&mut self, conn: ConnId, unsent_frames: usize) {
        let Some(c) = self.sessions.get_mut(conn) else {
            return;
        };
        if let (Some(user), Some(drain)) = (c.user, c.drain.as_mut()) {
            let written = drain.written(unsent_frames);
            self.delivered(user, written);
        }
    }

    /// Offline messages of `user`'s are now written to their connection:
    /// they leave the queue.
    pub(super) fn delivered(&mut self, user: UserId, written: Written) {
        if written.size.messages == 0 {
            return;
        }
        self.hub.offline.remove_front(user, written.size);
        // Written to the connection: delivered, whatever storage says.
        let to = self.hub.accounts.name(user).clone();
        let change = if self.node().is_some() && self.hub.offline.external() {
            // Other nodes may add to the queue while it is handed over:
            // exactly these leave it.
            Change::OfflineDelivered {
                to,
                seqs: written.seqs,
            }
        } else {
            Change::MessagesDelivered {
                to,
                count: written.size.messages,
            }
        };
        self.ledger.record_fact(change, None);
    }

    /// Whether `conn` is being handed its offline queue.
    pub(super) fn is_draining(&self, conn: ConnId) -> bool {
        self.draining > 0 && self.sessions.get(conn).is_some_and(|c| c.drain.is_some())
    }
}

/// The frame that hands over a queued message.
fn offline_frame(message: OfflineMessage) -> Bytes {
    ServerFrame::Message(MessageFrame {
        from: message.from,
        text: message.text,
        sent_at: message.sent_at,
        offline: true,
    })
    .encode()
}
