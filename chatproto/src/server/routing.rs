//! Cluster mode: direct messages to a user on another node. The sender's
//! node sends the message to the node its directory names; the sender may
//! send more such messages meanwhile (one per recipient, up to
//! `MAX_IN_FLIGHT`), but its other input waits until that node answers
//! ([`RouteOutcome`]); the answers, each the sender's `ok` (`stored:
//! false`) or error, go out in the order the messages were sent. With no answer in
//! time it sends again once, then stores the message; a recipient who is
//! not there (any more) gets it stored too. The recipient's node delivers
//! under the same rules as for its own users, once per route.

use crate::accounts::UserId;
use crate::cluster::{BusMessage, BusTarget, NodeId, RouteOutcome};
use crate::error::RequestError;
use crate::ids::ConnId;
use crate::offline::{OfflineMessage, QueueSize};
use crate::routes::{InFlight, Route, RouteAnswer, MAX_ATTEMPTS};
use crate::server_frame::{MessageFrame, ServerFrame};
use crate::stats::Tally;
use crate::text::MessageText;
use crate::time::Timestamp;
use crate::username::Username;

use super::hub::MAX_UNSENT_NOTICES;
use super::state::Server;

/// A [`BusMessage::Deliver`] as it arrived: route `number` of
/// `sender_node`.
pub(super) struct Delivery {
    pub(super) sender_node: NodeId,
    pub(super) number: u64,
    pub(super) from: Username,
    pub(super) to: Username,
    pub(super) text: MessageText,
    pub(super) sent_at: Timestamp,
}

impl Server {
    /// The node to send a direct message for `to` to: where the directory
    /// has them, while the bus is up, unless a message for them was stored
    /// here lately (the next ones are stored behind it, in order).
    pub(super) fn route_for(&self, to: UserId) -> Option<NodeId> {
        if !self.hub.liveness.can_publish() || self.hub.stored_lately.has(&to, self.latest) {
            return None;
        }
        self.hub.directory.node_of(to)
    }

    /// Sends `route`'s message to its node; its sender's other input waits
    /// for the answer.
    pub(super) fn start_route(&mut self, route: Route, now: Timestamp) {
        let number = self.hub.routes.next_number();
        if let Some(c) = self.sessions.get_mut(route.conn) {
            c.routes.push_back(InFlight {
                number,
                to: route.to,
                answer: None,
            });
        }
        self.send_route(number, &route);
        let timeout = self.route_timeout();
        self.hub.routes.insert(number, route, now, timeout);
    }

    /// A message from another node for one of this node's users:
    /// delivered if it can be, and the sender's node told what became of
    /// it.
    pub(super) fn serve_delivery(&mut self, delivery: Delivery, now: Timestamp) {
        let (sender_node, number) = (delivery.sender_node, delivery.number);
        let outcome = self.deliver_routed(delivery, now);
        self.publish_to(BusTarget::Node(sender_node), |node| BusMessage::Routed {
            node,
            route: number,
            outcome,
        });
    }

    /// What `node` said became of route `number`: the sender is answered,
    /// or the message follows its recipient to where they are now, or is
    /// stored.
    pub(super) fn serve_route_answer(
        &mut self,
        node: NodeId,
        number: u64,
        outcome: RouteOutcome,
        now: Timestamp,
    ) {
        let Some(route) = self.hub.routes.answered(number, node) else {
            return; // answered already (a message sent twice), or given up
        };
        match outcome {
            RouteOutcome::Delivered => self.finish_route(number, route, Ok(false)),
            RouteOutcome::Blocked => {
                let error = RequestError::Blocked {
                    user: route.to_name.clone(),
                };
                self.finish_route(number, route, Err(error));
            }
            _ => self.reroute_or_store(number, route, now),
        }
    }

    /// The routes whose answers did not come in time by `now`: each is
    /// sent again (once), or stored.
    pub(super) fn expire_routes(&mut self, now: Timestamp) {
        for (number, route) in self.hub.routes.expired(now) {
            self.reroute_or_store(number, route, now);
        }
    }

    /// Sends `route` again, to where its recipient is now, if it has tries
    /// left and the bus is up; else stores it.
    fn reroute_or_store(&mut self, number: u64, mut route: Route, now: Timestamp) {
        match self.route_for(route.to) {
            Some(node) if route.attempts < MAX_ATTEMPTS => {
                route.attempts += 1;
                route.node = node;
                self.send_route(number, &route);
                let timeout = self.route_timeout();
                self.hub.routes.insert(number, route, now, timeout);
            }
            _ => {
                let message = OfflineMessage {
                    from: self.hub.accounts.name(route.from).clone(),
                    text: route.text.clone(),
                    sent_at: route.sent_at,
                };
                let to = route.to;
                self.finish_route_with(number, route, Ok(true), Some((to, message)));
            }
        }
    }

    /// Answers `route`'s sender (if its connection still waits for it)
    /// with `result` (stored or not, or an error), once every message it
    /// sent across before this one is answered, and lets its input go on
    /// when none is left.
    fn finish_route(&mut self, number: u64, route: Route, result: Result<bool, RequestError>) {
        self.finish_route_with(number, route, result, None);
    }

    fn finish_route_with(
        &mut self,
        number: u64,
        route: Route,
        result: Result<bool, RequestError>,
        store: Option<(UserId, OfflineMessage)>,
    ) {
        let conn = route.conn;
        let slot = self
            .sessions
            .get_mut(conn)
            .and_then(|c| c.routes.iter_mut().find(|r| r.number == number));
        let Some(slot) = slot else {
            // closed meanwhile: nobody to answer, but stored all the same
            // (and counted, with no answer to count it by)
            if let Some((to, message)) = store {
                if self.queue_offline(to, &route.to_name, message).is_ok() {
                    self.stats.count(Tally::MessageStored);
                }
            }
            return;
        };
        slot.answer = Some(RouteAnswer {
            id: route.id,
            to: route.to_name,
            result,
            store,
        });
        // Answered (and stored) in its turn, each in a unit of its own
        // outside this one, by `release_route_answers`: a `stored: true`
        // then waits for its own batch, which a failure turns into
        // `unavailable`.
        self.input_due.push(conn);
    }

    /// Sends `conn`'s route answers that are next in order, each in its
    /// own unit of work (a stored one waits for its own batch only).
    /// Called outside any unit.
    pub(super) fn release_route_answers(&mut self, conn: ConnId) {
        loop {
            let Some(c) = self.sessions.get_mut(conn) else {
                return;
            };
            let Some(mut answer) = c.routes.front_mut().and_then(|r| r.answer.take()) else {
                return;
            };
            c.routes.pop_front();
            let me = c.user;
            let mark = self.begin();
            if let Some((to, message)) = answer.store.take() {
                answer.result = if me.is_some_and(|me| self.hub.blocks.has_blocked(to, me)) {
                    // Blocked meanwhile (a block made on their node, heard
                    // of since): not stored.
                    Err(RequestError::Blocked {
                        user: answer.to.clone(),
                    })
                } else {
                    self.queue_offline(to, &answer.to, message).map(|()| true)
                };
            }
            match answer.result {
                Ok(stored) => self.answer_message(conn, answer.id, answer.to, stored),
                Err(error) => self.send_error(conn, answer.id, &error),
            }
            self.settle(mark);
        }
    }

    /// Hands a message from another node to its recipient here, if they
    /// can take it live: online, with no offline queue being handed over,
    /// and not blocking the sender.
    fn deliver_routed(&mut self, delivery: Delivery, now: Timestamp) -> RouteOutcome {
        let Delivery {
            sender_node,
            number,
            from,
            to,
            text,
            sent_at,
        } = delivery;
        let key = (sender_node, number);
        if self.hub.delivered.contains(&key, now) {
            // Sent again after a lost answer: delivered once already.
            return RouteOutcome::Delivered;
        }
        let (Some(sender), Some(recipient)) = (
            self.hub.accounts.id(from.as_str()),
            self.hub.accounts.id(to.as_str()),
        ) else {
            return RouteOutcome::NotHere;
        };
        if self.hub.blocks.has_blocked(recipient, sender) {
            return RouteOutcome::Blocked;
        }
        let pair = (sender_node, from, to);
        if self.hub.refused.contains(&pair, now) {
            return RouteOutcome::NotHere;
        }
        let (_, from, to) = pair;
        let Some(their_conn) = self.hub.presence.session(recipient) else {
            return self.turn_away(sender_node, from, to, now);
        };
        if self.hub.delivered.is_full(now) {
            // Delivered now, it could not be told from a copy sent again
            // later: its sender's node stores it.
            return self.turn_away(sender_node, from, to, now);
        }
        if self.hub.offline.size(recipient).messages > 0 || self.is_draining(their_conn) {
            // Their queue is being handed over: a live message would
            // overtake it. The sender's node stores it instead.
            return self.turn_away(sender_node, from, to, now);
        }
        let frame = ServerFrame::Message(MessageFrame {
            from,
            text,
            sent_at,
            offline: false,
        });
        self.send(their_conn, &frame);
        // As long as it may be sent again: until its last try's answer was
        // due.
        let keep = self.route_timeout() * MAX_ATTEMPTS;
        self.hub.delivered.insert(key, now, keep);
        RouteOutcome::Delivered
    }

    /// Turns a message from `from` (on `sender_node`) to `to` away: its
    /// node stores it. The next ones of that sender's to that recipient,
    /// which may already be on their way, are turned away too for a while,
    /// so none is delivered before the ones stored.
    fn turn_away(
        &mut self,
        sender_node: NodeId,
        from: Username,
        to: Username,
        now: Timestamp,
    ) -> RouteOutcome {
        // As long as a message already sent may take to arrive; no longer,
        // or a recipient who logs in here meanwhile would miss live ones.
        let keep = self.route_timeout();
        self.hub.refused.insert((sender_node, from, to), now, keep);
        RouteOutcome::NotHere
    }

    /// Publishes `route`'s message to its node.
    fn send_route(&mut self, number: u64, route: &Route) {
        let from = self.hub.accounts.name(route.from).clone();
        let (to, text, sent_at) = (route.to_name.clone(), route.text.clone(), route.sent_at);
        self.publish_to(BusTarget::Node(route.node), |node| BusMessage::Deliver {
            node,
            route: number,
            from,
            to,
            text,
            sent_at,
        });
    }

    fn route_timeout(&self) -> std::time::Duration {
        self.config
            .cluster
            .as_ref()
            .map_or(std::time::Duration::from_secs(2), |c| c.route_timeout)
    }
}

impl Server {
    /// A message for `recipient` was stored here. If they may be online on
    /// another node (the bus is away, or the directory has them there), that
    /// node is told once the message is durable, and hands their queue over
    /// at once ([`BusMessage::Queued`]).
    pub(super) fn note_stored(&mut self, recipient: UserId) {
        if self.node().is_none()
            || !self.hub.offline.external()
            || self.hub.presence.session(recipient).is_some()
        {
            return;
        }
        let bus_up = self.hub.liveness.can_publish();
        if bus_up && self.hub.directory.node_of(recipient).is_none() {
            return; // offline everywhere: their next login hands it over
        }
        let batch = self.ledger.open_id();
        self.hub.queued_notices.push_back((batch, recipient));
        let now = self.latest;
        let keep = self.route_timeout();
        self.hub.stored_lately.insert(recipient, now, keep);
        if !self.ledger.enabled() {
            self.flush_notices();
        }
    }

    /// Tells the other nodes of the users whose stored messages are now
    /// durable, if the bus is up; else keeps them for when it is back.
    pub(super) fn flush_notices(&mut self) {
        let durable = if self.ledger.enabled() {
            self.ledger.answered_id()
        } else {
            u64::MAX
        };
        while let Some(&(batch, user)) = self.hub.queued_notices.front() {
            if batch > durable {
                break;
            }
            self.hub.queued_notices.pop_front();
            if self.hub.unsent_notices.len() < MAX_UNSENT_NOTICES {
                self.hub.unsent_notices.insert(user);
            }
        }
        if !self.hub.liveness.can_publish() {
            return;
        }
        let now = self.latest;
        for user in std::mem::take(&mut self.hub.unsent_notices) {
            let name = self.hub.accounts.name(user).clone();
            // To every node: after an outage the directory may be behind.
            self.publish(|node| BusMessage::Queued { node, user: name });
            if self.hub.sent_notices.len() >= MAX_UNSENT_NOTICES {
                self.hub.sent_notices.pop_front();
            }
            self.hub.sent_notices.push_back((now, user));
        }
    }

    /// Says again, to `node`, which has just (re)joined the bus, the
    /// notices sent within a lease: the bus may have lost them on their
    /// way to it (core NATS delivers at most once, and each node
    /// reconnects in its own time).
    pub(super) fn resend_notices(&mut self, node: NodeId, now: Timestamp) {
        let lease = self
            .config
            .cluster
            .as_ref()
            .map_or(std::time::Duration::from_secs(10), |c| c.lease);
        while self
            .hub
            .sent_notices
            .front()
            .is_some_and(|&(at, _)| at + lease <= now)
        {
            self.hub.sent_notices.pop_front();
        }
        let users: Vec<UserId> = self.hub.sent_notices.iter().map(|&(_, u)| u).collect();
        for user in users {
            let name = self.hub.accounts.name(user).clone();
            self.publish_to(BusTarget::Node(node), |me| BusMessage::Queued {
                node: me,
                user: name,
            });
        }
    }

    /// Another node stored a message for `name`: if they are online here,
    /// their queue is handed over now (what storage holds, from the start:
    /// a count one too high ends where storage ends).
    pub(super) fn serve_queued_notice(&mut self, name: &Username) {
        let Some(user) = self.hub.accounts.id(name.as_str()) else {
            return;
        };
        let Some(conn) = self.hub.presence.session(user) else {
            return;
        };
        if !self.hub.offline.external() {
            return;
        }
        let size = self.hub.offline.size(user);
        let grown = QueueSize {
            messages: size.messages + 1,
            bytes: size.bytes,
        };
        self.hub.offline.set_size(user, grown);
        if !self.is_draining(conn) {
            self.start_drain(conn, user);
        }
    }
}
