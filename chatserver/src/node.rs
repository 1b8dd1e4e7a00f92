//! This node as the cluster's database knows it (cluster mode): its id,
//! name and lease ([`ClusterNode`]), and what its heartbeat finds
//! ([`Beat`]). The database keeps each user's one session under the node
//! that claimed it; a node silent past its lease may have its sessions
//! taken over, and its next heartbeat tells it so.

/// This node as a cluster's database knows it (cluster mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// Its id ([`chatproto::NodeId`]), new at every start.
    pub id: String,
    /// Its name, for people (`--node-name`).
    pub name: String,
    /// How long it may stay silent before its sessions may be taken over.
    pub lease: std::time::Duration,
}

/// What a node's heartbeat found ([`Database::node_heartbeat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Nothing happened behind its back.
    Alive,
    /// It was silent past its lease and another node took over at least
    /// one of its sessions: it must close its clients.
    Expired {
        /// How long it had been silent.
        silent_for: std::time::Duration,
    },
}
