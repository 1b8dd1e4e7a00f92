//! The chat service's state: accounts, who is online, blocks, offline
//! queues, failed-login records, per-address limits and the logins being
//! checked. One [`Hub`] serves every session; the rules that change it
//! are in `requests.rs` (a request from one session) and `drains.rs`
//! (offline delivery).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::accounts::{Accounts, UserId};
use crate::blocking::BlockList;
use crate::cluster::NodeId;
use crate::directory::Directory;
use crate::ids::{ClaimId, ConnId, VerifyTicket};
use crate::liveness::Liveness;
use crate::lockout::Lockout;
use crate::offline::{OfflineQueues, QueueSize};
use crate::password::Password;
use crate::peer::{PeerKey, Peers};
use crate::presence::Presence;
use crate::request::RequestId;
use crate::routes::{Recent, Routes};
use crate::time::Timestamp;
use crate::username::Username;

use super::config::{queue_limits, ServerConfig};

/// The service, apart from any one connection.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) accounts: Accounts,
    pub(crate) presence: Presence,
    pub(crate) blocks: BlockList,
    pub(crate) offline: OfflineQueues,
    pub(crate) lockout: Lockout,
    /// Cluster mode: who is online on the other nodes.
    pub(crate) directory: Directory,
    /// Cluster mode: which other nodes are alive, and this node's
    /// heartbeat.
    pub(crate) liveness: Liveness,
    /// Cluster mode: direct messages sent to other nodes' users, waiting
    /// for their answers.
    pub(crate) routes: Routes,
    /// Cluster mode: direct messages from other nodes delivered lately.
    pub(crate) delivered: Recent<(NodeId, u64)>,
    /// Cluster mode: the senders (node, sender, recipient) whose direct
    /// messages this node turned away lately (`NotHere`): the next ones,
    /// already on their way, are turned away too, so that none overtakes
    /// the ones their node stores.
    pub(crate) refused: Recent<(NodeId, Username, Username)>,
    /// Cluster mode: logins waiting for their session claims, by claim.
    pub(crate) claims: HashMap<ClaimId, PendingClaim>,
    /// Cluster mode: the users of `claims`, with what was queued for each
    /// here since its claim went out (which the claim's count may miss):
    /// one claim per user at a time.
    pub(crate) claiming: HashMap<UserId, QueueSize>,
    pub(crate) next_claim: u64,
    /// Cluster mode: users this node stored messages for while they may be
    /// online elsewhere, with the batch that stored each, oldest first:
    /// told to the other nodes ([`BusMessage::Queued`](crate::BusMessage::Queued))
    /// once durable.
    pub(crate) queued_notices: std::collections::VecDeque<(u64, UserId)>,
    /// Users whose notice is durable and not yet sent (the bus is away),
    /// at most [`MAX_UNSENT_NOTICES`].
    pub(crate) unsent_notices: BTreeSet<UserId>,
    /// Notices sent lately, oldest first, with when: said again to a node
    /// that (re)joins the bus within a lease, since the bus may have lost
    /// them while it was away.
    pub(crate) sent_notices: std::collections::VecDeque<(Timestamp, UserId)>,
    /// Cluster mode: recipients this node stored a message for lately while
    /// they may be online elsewhere: its next messages to them are stored
    /// too for a while, so none goes live before the stored ones are
    /// handed over.
    pub(crate) stored_lately: Recent<UserId>,
    /// Cluster mode: claims answered "elsewhere" to be asked again, when.
    pub(crate) claim_retries: BTreeSet<(Timestamp, ClaimId)>,
    /// Per-address limits.
    pub(crate) peers: Peers,
    /// Logins waiting for a password check, by ticket.
    pub(crate) verifications: HashMap<VerifyTicket, PendingLogin>,
    /// Cluster mode: removed accounts whose stored state is deleted once
    /// this node's accounts agree with most nodes' (one node's mistaken
    /// reload must not delete what the cluster shares).
    pub(crate) pending_purges: Vec<Username>,
    pub(crate) next_ticket: u64,
}

impl Hub {
    /// An empty service for `accounts`.
    pub(crate) fn new(config: &ServerConfig, accounts: Accounts) -> Self {
        Hub {
            presence: Presence::new(&accounts),
            blocks: BlockList::new(&accounts),
            offline: OfflineQueues::new(&accounts, queue_limits(config), config.offline_texts),
            lockout: Lockout::new(config.lockout.clone()),
            directory: Directory::default(),
            liveness: match &config.cluster {
                Some(cluster) => Liveness::new(cluster.heartbeat_every, cluster.lease),
                None => Liveness::new(Duration::MAX, Duration::MAX),
            },
            routes: Routes::default(),
            delivered: Recent::default(),
            refused: Recent::default(),
            claims: HashMap::new(),
            claiming: HashMap::new(),
            next_claim: 0,
            claim_retries: BTreeSet::new(),
            stored_lately: Recent::default(),
            queued_notices: std::collections::VecDeque::new(),
            unsent_notices: BTreeSet::new(),
            sent_notices: std::collections::VecDeque::new(),
            peers: Peers::new(),
            verifications: HashMap::new(),
            pending_purges: Vec::new(),
            next_ticket: 0,
            accounts,
        }
    }
}

impl Hub {
    /// Makes room in the per-user tables for the accounts added since.
    pub(crate) fn grow(&mut self) {
        self.presence.grow(&self.accounts);
        self.blocks.grow(&self.accounts);
        self.offline.grow_accounts(&self.accounts);
    }
}

/// A login waiting for its password check.
#[derive(Debug)]
pub(crate) struct PendingLogin {
    pub(crate) conn: ConnId,
    pub(crate) peer: PeerKey,
    pub(crate) id: Option<RequestId>,
    pub(crate) name: Username,
    /// `None` for a name without an account (checked against a decoy).
    pub(crate) account: Option<UserId>,
    /// The verdict on a plaintext password, known already (wrong): the
    /// check against a decoy hash only makes it cost what a hashed one
    /// costs.
    pub(crate) plain_verdict: Option<bool>,
    /// The account's password changed, or the account went, while it was
    /// checked: the verdict is about a password no longer in force.
    pub(crate) stale: bool,
}

/// Input a connection may send while its login is being checked, beyond
/// which it is cut off as a flood (in frame limits).
pub(crate) const HELD_INPUT_FRAMES: usize = 4;

/// Compared with the password of a login for an unknown name when no
/// account is hashed, so it costs what a wrong password costs.
pub(crate) static DECOY_PASSWORD: std::sync::LazyLock<Password> =
    std::sync::LazyLock::new(|| Password::new("decoy-password-never-matches").expect("valid"));

/// How many users' "stored for you" notices wait for the bus at most; past
/// it the rest reach their users at their next login.
pub(crate) const MAX_UNSENT_NOTICES: usize = 1 << 16;

/// A login waiting for its session claim (cluster mode): its password
/// was right.
#[derive(Debug)]
pub(crate) struct PendingClaim {
    pub(crate) conn: ConnId,
    pub(crate) id: Option<RequestId>,
    pub(crate) name: Username,
    pub(crate) user: UserId,
    /// How many times it was answered "elsewhere" so far.
    pub(crate) refusals: u32,
    /// When it is to be asked again, while it waits to be (not asked).
    pub(crate) retry_at: Option<Timestamp>,
}
