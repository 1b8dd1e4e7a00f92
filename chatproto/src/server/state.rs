//! What a [`Server`] holds: its configuration, the [`Hub`] (the service),
//! the [`Sessions`] (one per connection), the batches of changes and the
//! output waiting for them, and the timers. The logic is elsewhere: the
//! public entry points in `mod.rs`, requests in `requests.rs`, offline
//! delivery in `drains.rs`, output and units of work in `outbox.rs`.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::accounts::UserId;
use crate::drain::Drain;
use crate::durability::{Kind, Ledger};
use crate::ids::ConnId;
use crate::output::Output;
use crate::stats::{ServerStats, Tally};
use crate::time::Timestamp;

use super::config::ServerConfig;
use super::hub::Hub;
use super::session::Sessions;

/// The chat service's server side, without any I/O.
///
/// See the [crate docs](crate) for a walk through a session.
#[derive(Debug)]
pub struct Server {
    pub(super) config: ServerConfig,
    /// The service: accounts, presence, blocks, queues, lockouts.
    pub(super) hub: Hub,
    /// The open connections.
    pub(super) sessions: Sessions,
    /// Idle deadlines, earliest first. An entry may be early (the
    /// connection was active since); it is rescheduled when it fires.
    pub(super) idle_timers: BTreeSet<(Timestamp, ConnId)>,
    pub(super) outputs: VecDeque<Output>,
    pub(super) started_at: Timestamp,
    /// Batches of changes, and the outputs that wait for them.
    pub(super) ledger: Ledger,
    /// Answers and facts among the outputs of the unit of work being
    /// served, by position in `outputs`: what a failed batch does to each.
    pub(super) unit_kinds: Vec<(usize, Kind)>,
    /// Units of work open (they nest: the outermost settles).
    pub(super) unit_depth: u32,
    /// Drains that want their next page handed over, once nothing they
    /// follow waits for a batch.
    pub(super) page_due: Vec<ConnId>,
    /// Drains whose next page waits for a batch to be answered.
    pub(super) page_gated: Vec<ConnId>,
    /// Connections whose held input may go on: their first page went out.
    pub(super) input_due: Vec<ConnId>,
    /// The connection whose login, in the unit being served, started an
    /// offline drain: its answer waits for the first page too.
    pub(super) first_page_for: Option<ConnId>,
    /// A first-page wait was lifted inside the unit being served: what
    /// waited behind it is released when the unit settles.
    pub(super) lifted: bool,
    /// Connections with an offline drain in progress.
    pub(super) draining: usize,
    /// The latest time any call brought: an earlier one counts as this, so
    /// a clock that steps back fires no timer early and refills no bucket.
    pub(super) latest: Timestamp,
    /// Drains of closed connections whose last frames may still be being
    /// written: the driver says how many were, once it knows.
    pub(super) closing_drains: HashMap<ConnId, (UserId, Drain)>,
    /// When each closing drain is given up if no report came (a driver
    /// that never reports must not hold its user's queue back for ever).
    pub(super) closing_deadlines: BTreeSet<(Timestamp, ConnId)>,
    /// What was done since the start, for metrics.
    pub(super) stats: ServerStats,
    /// What the outputs of the unit of work being served count for, by
    /// position in `outputs`: counted as they go out.
    pub(super) unit_tallies: Vec<(usize, Tally)>,
    /// A login refusal's code, between `refuse_login` and the error frame
    /// that answers it.
    pub(super) login_refusal: Option<crate::error::ErrorCode>,
}
