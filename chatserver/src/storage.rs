//! Where the reactor keeps the core's lasting state: a SQLite
//! [`Database`], or nowhere (`--no-db`).
//!
//! The core hands every change to [`Storage`] as it makes it; the reactor
//! calls [`Storage::commit`] once per wake-up, before it writes any of that
//! wake-up's output (group commit).

use chatproto::{Change, QueuedMessage, Snapshot, Store, Username};

use crate::database::{Committed, Database, DatabaseError};

#[derive(Debug)]
pub enum Storage {
    /// Nothing survives a restart.
    Volatile,
    Database(Database),
}

impl Storage {
    /// Makes every change recorded so far durable.
    pub fn commit(&mut self) -> Result<Committed, DatabaseError> {
        match self {
            Storage::Volatile => Ok(Committed::default()),
            Storage::Database(db) => db.commit(),
        }
    }

    /// The lasting state as committed.
    pub fn load(&self) -> Result<Snapshot, DatabaseError> {
        match self {
            Storage::Volatile => Ok(Snapshot::default()),
            Storage::Database(db) => db.load(),
        }
    }

    /// A page of `to`'s offline queue (see [`Database::offline_page`]).
    /// Without a database the core keeps texts itself and never asks.
    pub fn offline_page(
        &self,
        to: &Username,
        after_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<QueuedMessage>, DatabaseError> {
        match self {
            Storage::Volatile => Ok(Vec::new()),
            Storage::Database(db) => db.offline_page(to, after_seq, max_bytes),
        }
    }

    /// Whether changes are waiting for [`Storage::commit`].
    pub fn has_pending(&self) -> bool {
        match self {
            Storage::Volatile => false,
            Storage::Database(db) => db.has_pending(),
        }
    }
}

impl Store for Storage {
    fn record(&mut self, change: Change) {
        match self {
            Storage::Volatile => {}
            Storage::Database(db) => db.record(change),
        }
    }
}
