//! Whether this server is alive, and whether it should be sent clients:
//! what `GET /healthz` and `GET /readyz` on the `--http` listener answer.
//!
//! `/healthz` says only that the process runs and answers (200 whenever
//! it can answer at all). `/readyz` is for a load balancer: 200 while the
//! server can serve a login end to end, 503 with the reason otherwise:
//! its database cannot be reached (the last commit or read failed, and no
//! check since has succeeded; the reactor checks again every second until
//! one does), in cluster mode its NATS connection is down, its lease is
//! not held (its last heartbeat failed, or the database had given it up)
//! or it serves other accounts than most nodes, or it is shutting down.
//! Both are answered on `--http` and on `--metrics`.
//!
//! The reactor writes the state as it learns it; HTTP requests read it.
//! A [`Health`] is cheap to clone, and every clone shows the same state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The state behind `/healthz` and `/readyz`, shared.
///
/// ```
/// use chatserver::health::{Health, Readiness};
/// let health = Health::default();
/// assert_eq!(health.readiness(), Readiness::Ready);
/// health.set_lease_held(false);
/// assert!(matches!(health.readiness(), Readiness::NotReady(why) if why.contains("lease")));
/// health.set_lease_held(true);
/// health.set_database_reachable(false);
/// assert_eq!(health.readiness(), Readiness::NotReady("the database cannot be reached"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct Health(Arc<State>);

#[derive(Debug, Default)]
struct State {
    database_unreachable: AtomicBool,
    bus_unreachable: AtomicBool,
    accounts_differ: AtomicBool,
    lease_lost: AtomicBool,
    stopping: AtomicBool,
}

/// What `/readyz` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// 200: send it clients.
    Ready,
    /// 503, with why.
    NotReady(&'static str),
}

impl Health {
    /// Records whether the database answered the last time it was asked.
    pub fn set_database_reachable(&self, reachable: bool) {
        self.0
            .database_unreachable
            .store(!reachable, Ordering::Relaxed);
    }

    /// Whether the database answered the last time it was asked (true
    /// without a database).
    pub fn database_reachable(&self) -> bool {
        !self.0.database_unreachable.load(Ordering::Relaxed)
    }

    /// Records whether the cluster's bus (NATS) is connected.
    pub fn set_bus_reachable(&self, reachable: bool) {
        self.0.bus_unreachable.store(!reachable, Ordering::Relaxed);
    }

    /// Whether the bus is connected (true outside cluster mode).
    pub fn bus_reachable(&self) -> bool {
        !self.0.bus_unreachable.load(Ordering::Relaxed)
    }

    /// Records whether this cluster node serves the accounts most nodes
    /// serve.
    pub fn set_accounts_agree(&self, agree: bool) {
        self.0.accounts_differ.store(!agree, Ordering::Relaxed);
    }

    /// Records whether this cluster node's lease is held: its last
    /// heartbeat reached the database, and the database had not given the
    /// node up.
    pub fn set_lease_held(&self, held: bool) {
        self.0.lease_lost.store(!held, Ordering::Relaxed);
    }

    /// Records that the server is shutting down: not ready from now on.
    pub fn set_stopping(&self) {
        self.0.stopping.store(true, Ordering::Relaxed);
    }

    /// What `/readyz` answers now.
    pub fn readiness(&self) -> Readiness {
        if self.0.stopping.load(Ordering::Relaxed) {
            Readiness::NotReady("the server is shutting down")
        } else if !self.database_reachable() {
            Readiness::NotReady("the database cannot be reached")
        } else if !self.bus_reachable() {
            Readiness::NotReady("NATS cannot be reached")
        } else if self.0.lease_lost.load(Ordering::Relaxed) {
            Readiness::NotReady(
                "this node's lease is not held (its heartbeat did not reach the database)",
            )
        } else if self.0.accounts_differ.load(Ordering::Relaxed) {
            Readiness::NotReady(
                "this node serves other accounts than the cluster (compare the credentials files)",
            )
        } else {
            Readiness::Ready
        }
    }
}
