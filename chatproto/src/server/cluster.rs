//! Cluster mode ([`crate::cluster`]): what this node tells the others,
//! and what it does with what they tell it. The entry points are in
//! `mod.rs`; the directory of users on other nodes is in the `Hub`.

use crate::accounts::UserId;
use crate::cluster::{BusMessage, BusTarget, NodeId};
use crate::durability::Kind;
use crate::ids::ConnId;
use crate::output::{Event, Output};
use crate::server_frame::ByeReason;
use crate::server_frame::{BroadcastFrame, ServerFrame};
use crate::stats::Tally;
use crate::time::Timestamp;
use crate::username::Username;

use super::outbox::{queue_frame, Drains};
use super::routing::Delivery;
use super::state::Server;

impl Server {
    /// This node, in cluster mode.
    #[inline]
    pub(super) fn node(&self) -> Option<NodeId> {
        self.config.cluster.as_ref().map(|c| c.node)
    }

    /// This node's accounts digest (empty outside cluster mode).
    fn accounts_digest(&self) -> &str {
        self.config
            .cluster
            .as_ref()
            .map_or("", |c| c.accounts_digest.as_str())
    }

    /// Publishes to every node what `message` makes of this node's id, in
    /// cluster mode; nothing otherwise.
    pub(super) fn publish(&mut self, message: impl FnOnce(NodeId) -> BusMessage) {
        self.publish_to(BusTarget::All, message);
    }

    /// Publishes to `to` what `message` makes of this node's id, in
    /// cluster mode, until the node has said it is leaving; nothing
    /// otherwise.
    pub(super) fn publish_to(&mut self, to: BusTarget, message: impl FnOnce(NodeId) -> BusMessage) {
        if self.hub.liveness.has_left() {
            return;
        }
        if let Some(node) = self.node() {
            self.outputs.push_back(Output::Publish {
                to,
                message: message(node),
            });
        }
    }

    /// Tells `to` who is online here, asking for theirs if `reply`.
    pub(super) fn publish_roster(&mut self, to: BusTarget, reply: bool) {
        let mut users: Vec<Username> = self
            .hub
            .presence
            .online()
            .iter()
            .map(|&u| self.hub.accounts.name(u).clone())
            .collect();
        users.sort_unstable();
        self.publish_to(to, |node| BusMessage::Roster { node, users, reply });
    }

    /// Cluster mode's deadlines due by `now`: this node's heartbeat, and
    /// the leases of nodes not heard from.
    pub(super) fn cluster_timers(&mut self, now: Timestamp) {
        if let Some(silent_for) = self.hub.liveness.silent_for_a_lease(now) {
            self.rejoin(silent_for, now);
        }
        if self.hub.liveness.heartbeat_due(now) {
            let online = u32::try_from(self.hub.presence.online().len()).unwrap_or(u32::MAX);
            let accounts = self.accounts_digest().to_owned();
            self.publish(|node| BusMessage::Heartbeat {
                node,
                online,
                accounts,
            });
        }
        self.expire_routes(now);
        self.retry_claims(now);
        self.purge_removed_accounts();
        for (node, last_heard) in self.hub.liveness.expire(now) {
            self.outputs
                .push_back(Output::Event(Event::NodeLost { node, last_heard }));
            self.remove_node(node, last_heard);
        }
    }

    /// Serves another node's message (one of this node's own, echoed by
    /// the bus, was dropped before).
    pub(super) fn serve_bus(&mut self, message: BusMessage, now: Timestamp) {
        let sender = message.node();
        let new_node = self.hub.liveness.heard(sender, now);
        if new_node
            && !matches!(
                message,
                BusMessage::Roster { .. } | BusMessage::Leaving { .. }
            )
        {
            // A node this one did not know (it started while the bus was
            // away here, or was given up and is back): who is on it?
            self.publish_to(BusTarget::Node(sender), |node| BusMessage::RosterWanted {
                node,
            });
            self.hub.liveness.should_ask_roster(sender, now);
        }
        match message {
            BusMessage::Online { node, user } => {
                self.count_remote_login(&user, true, now);
                if let Some(user) = self.remote_user(&user) {
                    if self.hub.directory.came(user, node) {
                        self.announce(user, true);
                    }
                }
            }
            BusMessage::LoginFailed { user, .. } => self.count_remote_login(&user, false, now),
            BusMessage::Offline { node, user, at } => {
                if let Some(user) = self.remote_user(&user) {
                    if self.hub.directory.went(user, node) {
                        self.went_offline_elsewhere(user, at);
                    }
                }
            }
            BusMessage::Roster { node, users, reply } => {
                let users: Vec<UserId> = users.iter().filter_map(|u| self.remote_user(u)).collect();
                let (came, went) = self.hub.directory.replace(node, users);
                for user in came {
                    self.announce(user, true);
                }
                for user in went {
                    // Its logout was lost on the way: it happened by now.
                    self.went_offline_elsewhere(user, now);
                }
                if reply {
                    self.publish_roster(BusTarget::Node(node), false);
                    // It has just (re)joined the bus: what it may have
                    // missed of the "stored for you" notices is said again.
                    self.resend_notices(node, now);
                }
            }
            BusMessage::Heartbeat {
                node,
                online,
                accounts,
            } => {
                let mine = self.accounts_digest().to_owned();
                if self.hub.liveness.accounts_of(node, accounts, &mine) {
                    self.outputs
                        .push_back(Output::Event(Event::AccountsDiffer { node }));
                }
                let known = self.hub.directory.count_on(node);
                if u32::try_from(known).ok() != Some(online)
                    && self.hub.liveness.should_ask_roster(node, now)
                {
                    // A presence message was lost on the way.
                    self.publish_to(BusTarget::Node(node), |me| BusMessage::RosterWanted {
                        node: me,
                    });
                }
            }
            BusMessage::RosterWanted { node } => {
                self.publish_roster(BusTarget::Node(node), false);
            }
            BusMessage::Leaving { node, at } => self.remove_node(node, at.min(now)),
            BusMessage::Deliver {
                node,
                route,
                from,
                to,
                text,
                sent_at,
            } => {
                let delivery = Delivery {
                    sender_node: node,
                    number: route,
                    from,
                    to,
                    text,
                    sent_at,
                };
                self.serve_delivery(delivery, now);
            }
            BusMessage::Routed {
                node,
                route,
                outcome,
            } => self.serve_route_answer(node, route, outcome, now),
            BusMessage::Queued { user, .. } => self.serve_queued_notice(&user),
            BusMessage::Broadcast {
                from,
                text,
                sent_at,
                ..
            } => {
                if let Some(sender) = self.hub.accounts.id(from.as_str()) {
                    let frame = ServerFrame::Broadcast(BroadcastFrame {
                        from,
                        text,
                        sent_at,
                    });
                    self.deliver_broadcast(sender, &frame);
                }
            }
            BusMessage::Blocked {
                blocker, target, ..
            } => {
                if let Some((blocker, target)) = self.pair(&blocker, &target) {
                    self.hub.blocks.block(blocker, target);
                }
            }
            BusMessage::Unblocked {
                blocker, target, ..
            } => {
                if let Some((blocker, target)) = self.pair(&blocker, &target) {
                    self.hub.blocks.unblock(blocker, target);
                }
            }
        }
    }

    /// This node said nothing for `silent_for`, a lease or more, while the
    /// bus was up: the others have given it up, and its users may have
    /// logged in elsewhere since. It closes every connection (`bye
    /// node_expired`), then joins again as a node with nobody on it,
    /// asking the others who is on theirs.
    pub(super) fn rejoin(&mut self, silent_for: std::time::Duration, now: Timestamp) {
        self.hub.liveness.rejoined(now);
        self.outputs
            .push_back(Output::Event(Event::NodeExpired { silent_for }));
        let ids: Vec<ConnId> = self.sessions.ids().collect();
        for conn in ids {
            self.note_kind(Kind::Fact);
            self.send(
                conn,
                &ServerFrame::Bye {
                    reason: ByeReason::NodeExpired,
                },
            );
            self.outputs.push_back(Output::Close {
                conn,
                reason: ByeReason::NodeExpired,
            });
            self.sessions.keep_slot(conn);
            // Its users were announced offline by the others when they
            // gave this node up: nobody is left here to tell.
            self.forget(conn, now, false);
        }
        self.publish_roster(BusTarget::All, true);
    }

    /// Counts a login attempt for `name` made on another node (`ok`: its
    /// password was right) toward the name's login limit and lockout, as
    /// if made here. What this node stores is its own attempts: the node
    /// that made this one stores its record.
    fn count_remote_login(&mut self, name: &Username, ok: bool, now: Timestamp) {
        let known = self.hub.accounts.id(name.as_str()).is_some();
        let rate = self.config.login_rate_per_name;
        // A full table refuses new names here too: the attempt then
        // counts where it was made only.
        if self
            .hub
            .lockout
            .take_attempt(name, known, rate, now)
            .is_err()
        {
            return;
        }
        if ok {
            self.hub.lockout.record_success(name, rate, now);
        } else {
            self.hub.lockout.record_failure(name, known, rate, now);
        }
    }

    /// `node` is gone (shut down, or given up for dead): its users went
    /// offline at `at`.
    pub(super) fn remove_node(&mut self, node: NodeId, at: Timestamp) {
        self.hub.liveness.forget(node);
        for user in self.hub.directory.remove_node(node) {
            self.went_offline_elsewhere(user, at);
        }
    }

    /// Hands a broadcast from `sender` (of this node or another) to this
    /// node's users, except the sender and whoever blocked them. Returns
    /// how many got it, and how many did not because they blocked the
    /// sender.
    pub(super) fn deliver_broadcast(
        &mut self,
        sender: UserId,
        frame: &ServerFrame,
    ) -> (usize, usize) {
        // One encoding, shared by every recipient.
        let frame = frame.encode();
        let in_unit = self.tallies_wait();
        let blockers = self.hub.blocks.blockers_of(sender);
        let (mut delivered, mut skipped) = (0, 0);
        for &user in self.hub.presence.online() {
            if user == sender {
                continue;
            }
            if blockers.contains(&user) {
                skipped += 1;
                continue;
            }
            if let Some(their_conn) = self.hub.presence.session(user) {
                // (`tally`, with the fields apart from `blockers`; outside
                // a durable unit, counted once below.)
                if in_unit {
                    self.unit_tallies
                        .push((self.outputs.len(), Tally::BroadcastDelivery));
                }
                let drains = Drains {
                    sessions: &mut self.sessions,
                    closing: &mut self.closing_drains,
                    draining: self.draining,
                };
                let frame = frame.clone();
                queue_frame(
                    &mut self.outputs,
                    drains,
                    &self.ledger,
                    true,
                    their_conn,
                    frame,
                );
                delivered += 1;
            }
        }
        if !in_unit {
            self.stats.broadcast_deliveries += delivered as u64;
        }
        (delivered, skipped)
    }

    /// A user of another node went offline at `at`: this node's users are
    /// told, and `whoelsesince` counts them until then.
    fn went_offline_elsewhere(&mut self, user: UserId, at: Timestamp) {
        self.hub.presence.restore_last_seen(user, at);
        self.announce(user, false);
    }

    /// The account a name from another node is, unless its user is online
    /// here (one session per user: this node's own is the one it knows).
    fn remote_user(&self, name: &Username) -> Option<UserId> {
        self.hub
            .accounts
            .id(name.as_str())
            .filter(|&u| self.hub.presence.session(u).is_none())
    }

    /// Both accounts, if this node has them (every node should serve the
    /// same accounts; one that does not ignores what it cannot place).
    fn pair(&self, a: &Username, b: &Username) -> Option<(UserId, UserId)> {
        Some((
            self.hub.accounts.id(a.as_str())?,
            self.hub.accounts.id(b.as_str())?,
        ))
    }
}
