//! Accounts changed while the server runs (an operator reloaded the
//! credentials file): what an added, changed or removed account does to
//! the service.

use crate::accounts::{AccountChange, AccountChangeError, UserId};
use crate::ids::ConnId;
use crate::server_frame::ByeReason;
use crate::store::Change;
use crate::time::Timestamp;

use super::Server;

impl Server {
    /// Applies one account change, inside the caller's unit of work.
    pub(super) fn change_account(
        &mut self,
        change: AccountChange,
        now: Timestamp,
    ) -> Result<(), AccountChangeError> {
        let removed = matches!(change, AccountChange::Removed { .. });
        let user = self.hub.accounts.apply(change)?;
        // Added, changed and removed all leave the per-user tables sized
        // for every account ever held (a removed one keeps its slot).
        self.hub.grow();
        if removed {
            self.remove_account(user, now);
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
        self.hub.unsent_notices.remove(&user);
        // Whatever becomes of its batch: the account is gone from the
        // credentials file, so a restart would not serve it either.
        self.ledger
            .record_fact(Change::AccountRemoved { user: name }, None);
    }
}
