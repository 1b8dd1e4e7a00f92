//! Cluster mode: one session per user in the whole cluster. Once a
//! login's password is right, the node asks the cluster's database to
//! make it the user's one session ([`Output::ClaimSession`]); the answer
//! ([`ClaimOutcome`]) logs the user in, or refuses the login with
//! `session_elsewhere` or `unavailable`. A node claims for one user at a
//! time, and gives each session back when it ends
//! ([`Output::ReleaseSession`]), naming the claim, so a late release never
//! removes a newer session.

use crate::accounts::UserId;
use crate::cluster::ClaimOutcome;
use crate::durability::Kind;
use crate::error::RequestError;
use crate::ids::{ClaimId, ConnId};
use crate::offline::QueueSize;
use crate::output::Output;
use crate::request::RequestId;
use crate::time::Timestamp;
use crate::username::Username;

use super::hub::PendingClaim;

/// How many times a claim is asked before `session_elsewhere`.
const CLAIM_TRIES: u32 = 3;

/// How long after an "elsewhere" a claim is asked again, times the
/// refusals so far: 100 ms, then 200 ms, which covers a release still on
/// its way after a logout on another node.
const CLAIM_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
use super::state::Server;

impl Server {
    /// Asks for `user`'s session for `conn`; its input waits meanwhile.
    pub(super) fn start_claim(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        name: Username,
        user: UserId,
    ) {
        let claim = ClaimId(self.hub.next_claim);
        self.hub.next_claim += 1;
        if let Some(c) = self.sessions.get_mut(conn) {
            c.claiming = Some(claim);
        }
        self.hub.claiming.insert(user, QueueSize::default());
        self.hub.claims.insert(
            claim,
            PendingClaim {
                conn,
                id,
                name: name.clone(),
                user,
                refusals: 0,
                retry_at: None,
            },
        );
        // Held, like the login's answer, behind any batch not yet durable
        // that changed the user's queue: the claim counts what storage
        // holds.
        self.note_kind(Kind::Fact);
        self.outputs
            .push_back(Output::ClaimSession { claim, user: name });
    }

    /// The database's answer to `claim`: the login goes on, or is
    /// refused. A session claimed for a connection that closed meanwhile
    /// is given back at once.
    pub(super) fn serve_claim(&mut self, claim: ClaimId, outcome: ClaimOutcome, now: Timestamp) {
        let Some(pending) = self.hub.claims.get_mut(&claim) else {
            return;
        };
        let waiting = self
            .sessions
            .get(pending.conn)
            .is_some_and(|c| c.claiming == Some(claim));
        if outcome == ClaimOutcome::Elsewhere && waiting && pending.refusals < CLAIM_TRIES - 1 {
            // The session may be on its way out: a logout on another node
            // answers its client before its release is written. Asked
            // again shortly, before `session_elsewhere`.
            pending.refusals += 1;
            let at = now + CLAIM_RETRY * pending.refusals;
            pending.retry_at = Some(at);
            self.hub.claim_retries.insert((at, claim));
            return;
        }
        let Some(PendingClaim {
            conn,
            id,
            name,
            user,
            ..
        }) = self.hub.claims.remove(&claim)
        else {
            return;
        };
        let meanwhile = self.hub.claiming.remove(&user).unwrap_or_default();
        let waiting = self
            .sessions
            .get_mut(conn)
            .filter(|c| c.claiming == Some(claim));
        // A failed claim may have been written all the same (a connection
        // lost during its commit): given back too, which removes nothing if
        // it was not.
        let release = matches!(outcome, ClaimOutcome::Claimed { .. } | ClaimOutcome::Failed);
        let Some(c) = waiting else {
            if release {
                self.outputs
                    .push_back(Output::ReleaseSession { user: name, claim });
            }
            return;
        };
        c.claiming = None;
        self.reschedule(conn);
        let refused = match outcome {
            ClaimOutcome::Claimed { queued } => {
                if self.hub.offline.external() {
                    // The queue as every node left it, and what this node
                    // queued since the claim went out (counted twice if the
                    // claim saw it too: a drain finds the end either way).
                    let size = QueueSize {
                        messages: queued.messages + meanwhile.messages,
                        bytes: queued.bytes + meanwhile.bytes,
                    };
                    self.hub.offline.set_size(user, size);
                }
                self.log_in(conn, id, name, user, Some(claim), now);
                return;
            }
            ClaimOutcome::Elsewhere => RequestError::SessionElsewhere { user: name.clone() },
            _ => {
                if release {
                    self.outputs.push_back(Output::ReleaseSession {
                        user: name.clone(),
                        claim,
                    });
                }
                RequestError::Unavailable
            }
        };
        if let Err(error) = self.refuse_login(conn, &name, refused) {
            self.send_error(conn, id, &error);
        }
    }
}

impl Server {
    /// Asks again the claims due by `now`.
    pub(super) fn retry_claims(&mut self, now: Timestamp) {
        while let Some(&(at, claim)) = self.hub.claim_retries.first() {
            if at > now {
                break;
            }
            self.hub.claim_retries.pop_first();
            let Some(pending) = self.hub.claims.get_mut(&claim) else {
                continue;
            };
            pending.retry_at = None;
            let user = pending.name.clone();
            self.note_kind(Kind::Fact);
            self.outputs.push_back(Output::ClaimSession { claim, user });
        }
    }
}

impl Server {
    /// `conn` closes while its login's claim waits to be asked again: it is
    /// dropped (nothing was written), so the user may log in again here at
    /// once. A claim the database has not answered stays until it is, to
    /// be given back if it was made.
    pub(super) fn drop_waiting_claim(&mut self, claim: ClaimId) {
        let Some(at) = self.hub.claims.get(&claim).and_then(|p| p.retry_at) else {
            return;
        };
        self.hub.claim_retries.remove(&(at, claim));
        if let Some(pending) = self.hub.claims.remove(&claim) {
            self.hub.claiming.remove(&pending.user);
        }
    }
}
