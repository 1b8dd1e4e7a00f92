//! Accounts changed while the server runs (an operator reloaded the
//! credentials file): what an added, changed or removed account does to
//! the service, and when storage forgets a removed account.
//!
//! A server alone tells storage at once ([`Change::AccountRemoved`]), and
//! again when a name is added, so that nothing an earlier account of that
//! name left behind (removed while the server was down, or by a removal
//! whose batch never committed) comes back to the new one: the core holds
//! nothing of it in memory, and a new account must not find it in storage
//! later. (A name missing from the file a server starts with keeps its
//! stored state until then, and gets it back if it is in the file at a
//! later start.)
//!
//! A cluster node waits until its accounts agree with most nodes' before
//! it deletes what the nodes share: one node reloaded with a mistaken file
//! forgets the account in memory, but the cluster's stored queues and
//! blocks stay until every node has made the same change.

use crate::accounts::{AccountChange, AccountChangeError, UserId};
use crate::ids::ConnId;
use crate::server_frame::ByeReason;
use crate::store::Change;
use crate::time::Timestamp;
use crate::username::Username;

use super::Server;

impl Server {
    /// Applies one account change, inside the caller's unit of work.
    pub(super) fn change_account(
        &mut self,
        change: AccountChange,
        now: Timestamp,
    ) -> Result<(), AccountChangeError> {
        let added = matches!(change, AccountChange::Added { .. });
        let removed = matches!(change, AccountChange::Removed { .. });
        let name = change.name().clone();
        let user = self.hub.accounts.apply(change)?;
        // Added, changed and removed all leave the per-user tables sized
        // for every account ever held (a removed one keeps its slot).
        self.hub.grow();
        // A login being checked against the password in force until now
        // is judged by it no more.
        for pending in self.hub.verifications.values_mut() {
            if pending.account == Some(user) {
                pending.stale = true;
            }
        }
        if removed {
            self.remove_account(user, now);
        } else if added && self.node().is_none() {
            // Whatever storage still holds under the name belongs to an
            // earlier account.
            self.forget_stored(name);
        }
        Ok(())
    }

    /// Ends `user`'s session and deletes what the service keeps for them.
    /// Their account is gone from the table already, so nothing from here
    /// on (a login being checked, a message, a bus message) finds it.
    fn remove_account(&mut self, user: UserId, now: Timestamp) {
        let name = self.hub.accounts.name(user).clone();
        // Its session, and a login of it waiting for its session claim
        // (whose claim, answered later, is given back as for any closed
        // connection).
        let conns: Vec<ConnId> = self
            .hub
            .presence
            .session(user)
            .into_iter()
            .chain(
                self.hub
                    .claims
                    .values()
                    .filter(|p| p.user == user)
                    .map(|p| p.conn),
            )
            .collect();
        for conn in conns {
            if self.sessions.get(conn).is_some() {
                self.say_bye(conn, ByeReason::AccountRemoved, now);
            }
        }
        // A closed connection's last report would count deliveries from a
        // queue that is gone.
        let closing: Vec<ConnId> = self
            .closing_drains
            .iter()
            .filter(|(_, (u, _))| *u == user)
            .map(|(&conn, _)| conn)
            .collect();
        for conn in closing {
            self.closing_drains.remove(&conn);
            self.closing_deadlines.retain(|&(_, c)| c != conn);
        }
        self.hub.offline.clear(user);
        self.hub.blocks.remove_user(user);
        self.hub.presence.set_last_seen(user, None);
        self.hub.lockout.clear_record(&name, now);
        // Online on another node: not listed, counted or told of here
        // any more (that node ends the session when it reloads).
        self.hub.directory.forget(user);
        self.hub.unsent_notices.remove(&user);
        self.hub.queued_notices.retain(|&(_, u)| u != user);
        self.hub.sent_notices.retain(|&(_, u)| u != user);
        if self.node().is_some() {
            // Judged at the next heartbeat, by the digest the driver sets
            // once the whole reload is in.
            self.hub.pending_purges.push(name);
        } else {
            // Whatever becomes of its batch: the account is gone from the
            // credentials file, so a restart would not serve it either.
            self.forget_stored(name);
        }
    }

    /// Cluster mode (at each heartbeat): deletes the stored state of the
    /// accounts removed here, once this node's accounts agree with most
    /// nodes'. A name added back meanwhile keeps its state (the removal
    /// was a mistake put right).
    pub(super) fn purge_removed_accounts(&mut self) {
        if self.hub.pending_purges.is_empty() || !self.cluster_accounts_agree() {
            return;
        }
        for name in std::mem::take(&mut self.hub.pending_purges) {
            if !self.hub.accounts.contains(name.as_str()) {
                self.forget_stored(name);
            }
        }
    }

    fn forget_stored(&mut self, name: Username) {
        self.ledger
            .record_fact(Change::AccountRemoved { user: name }, None);
    }
}
