//! Cluster mode: direct messages to a user on another node. The sender's
//! node sends the message to the node its directory names and holds the
//! sender's input until that node answers ([`RouteOutcome`]); the answer
//! is the sender's `ok` (`stored: false`) or error. With no answer in
//! time it sends again once, then stores the message; a recipient who is
//! not there (any more) gets it stored too. The recipient's node delivers
//! under the same rules as for its own users, once per route.

use crate::accounts::UserId;
use crate::cluster::{BusMessage, BusTarget, NodeId, RouteOutcome};
use crate::error::RequestError;
use crate::offline::OfflineMessage;
use crate::routes::{Route, MAX_ATTEMPTS};
use crate::server_frame::{MessageFrame, ServerFrame};
use crate::text::MessageText;
use crate::time::Timestamp;
use crate::username::Username;

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
    /// has them, while the bus is up.
    pub(super) fn route_for(&self, to: UserId) -> Option<NodeId> {
        if !self.hub.liveness.can_publish() {
            return None;
        }
        self.hub.directory.node_of(to)
    }

    /// Sends `route`'s message to its node; its sender's input waits for
    /// the answer.
    pub(super) fn start_route(&mut self, route: Route, now: Timestamp) {
        let number = self.hub.routes.next_number();
        if let Some(c) = self.sessions.get_mut(route.conn) {
            c.route = Some(number);
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
                let result = self
                    .queue_offline(route.to, &route.to_name, message)
                    .map(|()| true);
                self.finish_route(number, route, result);
            }
        }
    }

    /// Answers `route`'s sender (if its connection still waits for it)
    /// with `result` (stored or not, or an error), and lets its input go
    /// on.
    fn finish_route(&mut self, number: u64, route: Route, result: Result<bool, RequestError>) {
        let waiting = self
            .sessions
            .get_mut(route.conn)
            .filter(|c| c.route == Some(number));
        let Some(c) = waiting else {
            return; // closed meanwhile: nobody to answer
        };
        c.route = None;
        match result {
            Ok(stored) => self.answer_message(route.conn, route.id, route.to_name, stored),
            Err(error) => self.send_error(route.conn, route.id, &error),
        }
        self.input_due.push(route.conn);
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
        if self.hub.delivered.contains(key) {
            // Sent again after a lost answer: delivered once already.
            return RouteOutcome::Delivered;
        }
        let (Some(sender), Some(recipient)) = (
            self.hub.accounts.id(from.as_str()),
            self.hub.accounts.id(to.as_str()),
        ) else {
            return RouteOutcome::NotHere;
        };
        let Some(their_conn) = self.hub.presence.session(recipient) else {
            return RouteOutcome::NotHere;
        };
        if self.hub.blocks.has_blocked(recipient, sender) {
            return RouteOutcome::Blocked;
        }
        if self.hub.offline.size(recipient).messages > 0 || self.is_draining(their_conn) {
            // Their queue is being handed over: a live message would
            // overtake it. The sender's node stores it instead.
            return RouteOutcome::NotHere;
        }
        let frame = ServerFrame::Message(MessageFrame {
            from,
            text,
            sent_at,
            offline: false,
        });
        self.send(their_conn, &frame);
        let keep = self.route_timeout() * (MAX_ATTEMPTS + 1);
        self.hub.delivered.insert(key, now, keep);
        RouteOutcome::Delivered
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
