//! Where the reactor keeps the core's lasting state: a SQLite [`Database`]
//! on a thread of its own.
//!
//! A commit ends in an fsync, which takes milliseconds; on the event loop
//! it would stall every connection for each batch. So the database lives
//! on the storage thread: the reactor hands it each
//! [`Output::Persist`](chatproto::Output::Persist) batch and each offline
//! page read, in the order the core asked, and carries on serving everyone
//! whose output does not wait for the batch. Each answer wakes the poller.
//! Jobs run in order, so a page read asked for after a commit sees it.
//!
//! Without a database (`--no-db`) there is no storage thread: the core
//! makes no batches and keeps offline texts itself.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;

use chatproto::{BatchId, Change, ConnId, QueuedMessage, Username};
use polling::Poller;

use crate::database::{Committed, Database, DatabaseError};

/// What the storage thread finished.
#[derive(Debug)]
pub enum Done {
    /// A batch was committed, or failed (nothing of it was written).
    Persisted {
        batch: BatchId,
        result: Result<Committed, DatabaseError>,
    },
    /// A page of `conn`'s user's offline queue was read.
    Page {
        conn: ConnId,
        result: Result<Vec<QueuedMessage>, DatabaseError>,
    },
}

/// Work for the storage thread, done in order.
#[derive(Debug)]
enum Job {
    Persist {
        batch: BatchId,
        changes: Vec<Change>,
    },
    LoadPage {
        conn: ConnId,
        user: Username,
        after_seq: u64,
        max_bytes: usize,
    },
}

/// The storage thread and the channels to it.
#[derive(Debug)]
pub struct Storage {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    /// Jobs handed over and not yet answered.
    outstanding: usize,
    thread: Option<thread::JoinHandle<()>>,
}

impl Storage {
    /// Starts the storage thread on `db`; each answer wakes `poller`.
    pub fn start(db: Database, poller: Arc<Poller>) -> io::Result<Storage> {
        let (jobs, inbox) = mpsc::channel();
        let (outbox, done) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("storage".into())
            .spawn(move || work(db, &inbox, &outbox, &poller))?;
        Ok(Storage {
            jobs: Some(jobs),
            done,
            outstanding: 0,
            thread: Some(thread),
        })
    }

    /// Queues `changes` to be committed as one transaction.
    pub fn persist(&mut self, batch: BatchId, changes: Vec<Change>) {
        self.send(Job::Persist { batch, changes });
    }

    /// Queues a read of `user`'s offline messages after `after_seq`.
    pub fn load_page(&mut self, conn: ConnId, user: Username, after_seq: u64, max_bytes: usize) {
        self.send(Job::LoadPage {
            conn,
            user,
            after_seq,
            max_bytes,
        });
    }

    /// What the thread finished since the last call.
    pub fn finished(&mut self) -> Vec<Done> {
        let done: Vec<Done> = self.done.try_iter().collect();
        self.outstanding -= done.len().min(self.outstanding);
        done
    }

    /// Whether every job handed over has been answered.
    pub fn idle(&self) -> bool {
        self.outstanding == 0
    }

    fn send(&mut self, job: Job) {
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if sent {
            self.outstanding += 1;
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        // The thread finishes the jobs queued, then sees the channel closed.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The storage thread: runs jobs in order until the reactor hangs up.
fn work(mut db: Database, inbox: &Receiver<Job>, outbox: &Sender<Done>, poller: &Poller) {
    for job in inbox {
        let done = match job {
            Job::Persist { batch, changes } => {
                for change in changes {
                    db.record(change);
                }
                Done::Persisted {
                    batch,
                    result: db.commit(),
                }
            }
            Job::LoadPage {
                conn,
                user,
                after_seq,
                max_bytes,
            } => Done::Page {
                conn,
                result: db.offline_page(&user, after_seq, max_bytes),
            },
        };
        if outbox.send(done).is_err() {
            return;
        }
        let _ = poller.notify();
    }
}
