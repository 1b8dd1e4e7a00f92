//! Where the reactor keeps the core's lasting state: a database (SQLite
//! or PostgreSQL) on a thread of its own.
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
//! makes no batches and keeps offline texts itself. Nor is there one in a
//! build without the `sqlite` and `postgres` features: its types are still here,
//! uninhabited, so the reactor's code needs no feature gates.

#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use with_database::*;
#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
pub use without_database::*;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod with_database {
    use std::collections::VecDeque;
    use std::io;
    use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
    use std::sync::Arc;
    use std::thread;

    use chatproto::{BatchId, Change, ClaimId, ConnId, QueueSize, QueuedMessage, Username};
    use polling::Poller;
    use tracing::{error, info, warn};

    use crate::database::{Committed, Database, DatabaseError, GroupJob, GroupOutcome};
    use crate::node::{Beat, ClusterNode};

    /// What the storage thread finished.
    #[derive(Debug)]
    pub enum Done {
        /// A batch was committed, or failed (nothing of it was written).
        Persisted {
            /// Which batch.
            batch: BatchId,
            /// What became of it.
            result: Result<Committed, DatabaseError>,
        },
        /// A page of `conn`'s user's offline queue was read.
        Page {
            /// Whose page.
            conn: ConnId,
            /// The page, oldest first.
            result: Result<Vec<QueuedMessage>, DatabaseError>,
        },
        /// Cluster mode: a session claim was answered.
        Claimed {
            /// Which claim.
            claim: ClaimId,
            /// What the user's offline queue holds, if this node holds the
            /// session now.
            result: Result<Option<QueueSize>, DatabaseError>,
        },
        /// Cluster mode: a session was given back (or could not be).
        Released {
            /// Whose.
            user: Username,
            /// Which claim.
            claim: ClaimId,
            /// Whether it was written.
            result: Result<(), DatabaseError>,
        },
        /// Cluster mode: this node's heartbeat was written (or not).
        Beat(Result<Beat, DatabaseError>),
    }

    impl Done {
        /// Whether the database did what was asked.
        fn succeeded(&self) -> bool {
            match self {
                Done::Persisted { result, .. } => result.is_ok(),
                Done::Page { result, .. } => result.is_ok(),
                Done::Claimed { result, .. } => result.is_ok(),
                Done::Released { result, .. } => result.is_ok(),
                Done::Beat(result) => result.is_ok(),
            }
        }
    }

    /// Work for the storage thread, done in order.
    #[derive(Debug)]
    enum Job {
        /// Is the database there? (Asked while it is thought not to be.)
        Check,
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
        Claim {
            claim: ClaimId,
            user: Username,
        },
        Release {
            user: Username,
            claim: ClaimId,
        },
        Beat,
        Leave,
    }

    /// What the storage thread sends back: the answer to a job for the
    /// core, or to a check.
    #[derive(Debug)]
    enum Answer {
        Done(Done),
        Checked(Result<(), DatabaseError>),
    }

    /// What a job handed over was, to answer it if the thread is gone.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Asked {
        Check,
        Persist(BatchId),
        Page(ConnId),
        Claim(ClaimId),
        Release,
        Beat,
        Leave,
    }

    impl Asked {
        /// The answer when the storage thread can no longer give one: the
        /// batch failed (the core takes it back), the page cannot be read.
        fn failed(self) -> Option<Done> {
            match self {
                Asked::Check => None,
                Asked::Persist(batch) => Some(Done::Persisted {
                    batch,
                    result: Err(DatabaseError::Stopped),
                }),
                Asked::Page(conn) => Some(Done::Page {
                    conn,
                    result: Err(DatabaseError::Stopped),
                }),
                Asked::Claim(claim) => Some(Done::Claimed {
                    claim,
                    result: Err(DatabaseError::Stopped),
                }),
                // Nothing more can be written: nothing to try again.
                Asked::Release | Asked::Beat | Asked::Leave => None,
            }
        }
    }

    /// The storage thread and the channels to it.
    #[derive(Debug)]
    pub struct Storage {
        jobs: Option<Sender<Job>>,
        done: Receiver<Answer>,
        /// Jobs handed over and not yet answered, oldest first (answers come
        /// in the same order).
        outstanding: VecDeque<Asked>,
        thread: Option<thread::JoinHandle<()>>,
        /// Woken when a job cannot be handed over, so the failure is answered
        /// on the next turn.
        poller: Arc<Poller>,
        /// Whether the database answered the last job or check.
        reachable: bool,
    }

    impl Storage {
        /// Starts the storage thread on `db`; each answer wakes `poller`.
        /// `cluster` is this node, in cluster mode.
        pub fn start(
            db: Database,
            cluster: Option<ClusterNode>,
            poller: Arc<Poller>,
        ) -> io::Result<Storage> {
            let (jobs, inbox) = mpsc::channel();
            let (outbox, done) = mpsc::channel();
            let wake = poller.clone();
            let thread = thread::Builder::new()
                .name("storage".into())
                .spawn(move || {
                    // Should the thread die (a panic), the reactor wakes and
                    // finds the channel closed: it answers what was pending
                    // itself rather than wait for ever.
                    let _wake = WakeOnExit(&poller);
                    work(db, cluster.as_ref(), &inbox, &outbox, &poller);
                })?;
            Ok(Storage {
                jobs: Some(jobs),
                done,
                outstanding: VecDeque::new(),
                thread: Some(thread),
                poller: wake,
                reachable: true,
            })
        }

        /// Asks whether the database is there (the answer shows in
        /// [`Storage::reachable`] once [`Storage::finished`] has seen it).
        pub fn check(&mut self) {
            self.send(Job::Check);
        }

        /// Whether the database answered the last job or check: false from
        /// a failed commit or read until one succeeds again.
        pub fn reachable(&self) -> bool {
            self.reachable
        }

        /// Whether a check is under way.
        pub fn checking(&self) -> bool {
            self.outstanding.contains(&Asked::Check)
        }

        /// Queues `changes` to be committed as one transaction.
        pub fn persist(&mut self, batch: BatchId, changes: Vec<Change>) {
            self.send(Job::Persist { batch, changes });
        }

        /// Queues a read of `user`'s offline messages after `after_seq`.
        pub fn load_page(
            &mut self,
            conn: ConnId,
            user: Username,
            after_seq: u64,
            max_bytes: usize,
        ) {
            self.send(Job::LoadPage {
                conn,
                user,
                after_seq,
                max_bytes,
            });
        }

        /// Cluster mode: queues a claim of `user`'s session.
        pub fn claim(&mut self, claim: ClaimId, user: Username) {
            self.send(Job::Claim { claim, user });
        }

        /// Cluster mode: queues the release of `user`'s session made by
        /// `claim`.
        pub fn release(&mut self, user: Username, claim: ClaimId) {
            self.send(Job::Release { user, claim });
        }

        /// Cluster mode: queues this node's heartbeat (the first registers
        /// it).
        pub fn heartbeat(&mut self) {
            self.send(Job::Beat);
        }

        /// Whether a heartbeat is under way.
        pub fn beating(&self) -> bool {
            self.outstanding.contains(&Asked::Beat)
        }

        /// Cluster mode: queues this node's leaving (at a clean shutdown,
        /// after its releases): its row and any session left under it go.
        pub fn leave(&mut self) {
            self.send(Job::Leave);
        }

        /// Whether the thread is gone: nothing more can be written.
        pub fn stopped(&self) -> bool {
            self.jobs.is_none()
        }

        /// What the thread finished since the last call.
        /// If the thread has stopped, every job still pending is answered as
        /// failed: `Err(DatabaseError::Stopped)`.
        pub fn finished(&mut self) -> Vec<Done> {
            let mut done = Vec::new();
            loop {
                match self.done.try_recv() {
                    Ok(answer) => {
                        self.outstanding.pop_front();
                        match answer {
                            Answer::Done(answer) => {
                                self.set_reachable(answer.succeeded());
                                done.push(answer);
                            }
                            Answer::Checked(result) => self.set_reachable(result.is_ok()),
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if !self.outstanding.is_empty() {
                            error!(
                                "the storage thread stopped: failing every pending batch and read"
                            );
                        }
                        done.extend(self.outstanding.drain(..).filter_map(Asked::failed));
                        // Nothing more goes to it: later jobs fail at once.
                        self.jobs = None;
                        self.set_reachable(false);
                        break;
                    }
                }
            }
            done
        }

        fn set_reachable(&mut self, reachable: bool) {
            if reachable != self.reachable {
                if reachable {
                    info!("the database answers again: ready (/readyz 200)");
                } else {
                    warn!("the database cannot be reached: not ready (/readyz 503) until it answers; checking every second");
                }
            }
            self.reachable = reachable;
        }

        /// Whether every job handed over has been answered.
        pub fn idle(&self) -> bool {
            self.outstanding.is_empty()
        }

        fn send(&mut self, job: Job) {
            let asked = match &job {
                Job::Check => Asked::Check,
                Job::Persist { batch, .. } => Asked::Persist(*batch),
                Job::LoadPage { conn, .. } => Asked::Page(*conn),
                Job::Claim { claim, .. } => Asked::Claim(*claim),
                Job::Release { .. } => Asked::Release,
                Job::Beat => Asked::Beat,
                Job::Leave => Asked::Leave,
            };
            self.outstanding.push_back(asked);
            let sent = self
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send(job).is_ok());
            if !sent {
                // The thread is gone: `finished` answers it as failed (the
                // channel is closed, so the next look finds it).
                self.jobs = None;
                let _ = self.poller.notify();
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

    /// Wakes the reactor when the storage thread ends, however it ends.
    struct WakeOnExit<'a>(&'a Poller);

    impl Drop for WakeOnExit<'_> {
        fn drop(&mut self) {
            let _ = self.0.notify();
        }
    }

    /// The storage thread: runs jobs in order until the reactor hangs up.
    /// In cluster mode, batches, claims and releases queued together run
    /// as one group, with one commit ([`Database::run_group`]).
    fn work(
        mut db: Database,
        cluster: Option<&ClusterNode>,
        inbox: &Receiver<Job>,
        outbox: &Sender<Answer>,
        poller: &Poller,
    ) {
        let not_clustered = || DatabaseError::Unsupported {
            location: "storage".to_owned(),
            what: "a cluster job for a node not in a cluster".to_owned(),
        };
        let mut next = None;
        let mut group = Vec::new();
        loop {
            let job = match next.take() {
                Some(job) => job,
                None => match inbox.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                },
            };
            group.push(job);
            if let Some(node) = cluster.filter(|_| group[0].groups()) {
                while group.len() < MAX_GROUP {
                    match inbox.try_recv() {
                        Ok(job) if job.groups() => group.push(job),
                        Ok(job) => {
                            next = Some(job);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if group.len() > 1 {
                    if let Some(answers) = run_group(&mut db, node, &group) {
                        group.clear();
                        for done in answers {
                            if outbox.send(Answer::Done(done)).is_err() {
                                return;
                            }
                        }
                        let _ = poller.notify();
                        continue;
                    }
                }
            }
            // Alone, or the group each on its own (it rolled back).
            for job in group.drain(..) {
                let done = match job {
                    Job::Check => Answer::Checked(db.check()),
                    Job::Persist { batch, changes } => {
                        for change in changes {
                            db.record(change);
                        }
                        Answer::Done(Done::Persisted {
                            batch,
                            result: db.commit(),
                        })
                    }
                    Job::LoadPage {
                        conn,
                        user,
                        after_seq,
                        max_bytes,
                    } => Answer::Done(Done::Page {
                        conn,
                        result: db.offline_page(&user, after_seq, max_bytes),
                    }),
                    Job::Claim { claim, user } => Answer::Done(Done::Claimed {
                        claim,
                        result: cluster
                            .ok_or_else(not_clustered)
                            .and_then(|node| db.claim_session(node, &user, claim)),
                    }),
                    Job::Release { user, claim } => {
                        let result = cluster
                            .ok_or_else(not_clustered)
                            .and_then(|node| db.release_session(node, &user, claim));
                        Answer::Done(Done::Released {
                            user,
                            claim,
                            result,
                        })
                    }
                    Job::Beat => Answer::Done(Done::Beat(
                        cluster
                            .ok_or_else(not_clustered)
                            .and_then(|node| db.node_heartbeat(node)),
                    )),
                    Job::Leave => {
                        let left = cluster
                            .ok_or_else(not_clustered)
                            .and_then(|node| db.leave_cluster(node));
                        match &left {
                            Ok(()) => info!("left the cluster: this node's sessions are free for the others at once"),
                            Err(e) => warn!("{e}: the other nodes take this node's sessions over after its lease"),
                        }
                        Answer::Checked(left)
                    }
                };
                if outbox.send(done).is_err() {
                    return;
                }
                let _ = poller.notify();
            }
        }
    }

    /// Jobs run together at most: a group's locks are held until its
    /// commit, so it stays short.
    const MAX_GROUP: usize = 64;

    impl Job {
        /// Whether it may share a transaction with its neighbours.
        fn groups(&self) -> bool {
            matches!(
                self,
                Job::Persist { .. } | Job::Claim { .. } | Job::Release { .. }
            )
        }
    }

    /// Runs `jobs` (batches, claims and releases) in one transaction:
    /// their answers, in order, or `None` if it rolled back and each is to
    /// be run alone.
    fn run_group(db: &mut Database, node: &ClusterNode, jobs: &[Job]) -> Option<Vec<Done>> {
        let grouped: Vec<GroupJob<'_>> = jobs
            .iter()
            .map(|job| match job {
                Job::Persist { changes, .. } => GroupJob::Persist(changes),
                Job::Claim { claim, user } => GroupJob::Claim {
                    user,
                    claim: *claim,
                },
                Job::Release { user, claim } => GroupJob::Release {
                    user,
                    claim: *claim,
                },
                _ => unreachable!("only jobs that group are grouped"),
            })
            .collect();
        let outcomes = db.run_group(node, &grouped)?;
        let answers = jobs
            .iter()
            .zip(outcomes)
            .map(|(job, outcome)| match (job, outcome) {
                // An answer of another kind than its job would be a bug in
                // the database layer: the job fails rather than pass as done.
                (Job::Persist { batch, .. }, outcome) => Done::Persisted {
                    batch: *batch,
                    result: outcome.and_then(|o| match o {
                        GroupOutcome::Persisted(committed) => Ok(committed),
                        other => Err(mismatch(other)),
                    }),
                },
                (Job::Claim { claim, .. }, outcome) => Done::Claimed {
                    claim: *claim,
                    result: outcome.and_then(|o| match o {
                        GroupOutcome::Claimed(queued) => Ok(queued),
                        other => Err(mismatch(other)),
                    }),
                },
                (Job::Release { user, claim }, outcome) => Done::Released {
                    user: user.clone(),
                    claim: *claim,
                    result: outcome.map(drop),
                },
                _ => unreachable!("only jobs that group are grouped"),
            })
            .collect();
        Some(answers)
    }

    /// A group answer that does not fit its job.
    fn mismatch(outcome: GroupOutcome) -> DatabaseError {
        DatabaseError::Unsupported {
            location: "storage".to_owned(),
            what: format!("a group answered a job with {outcome:?}"),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn jobs_pending_when_the_thread_stops_are_answered_as_failed() {
            let poller = Arc::new(Poller::new().unwrap());
            let (jobs, inbox) = mpsc::channel();
            let (outbox, done) = mpsc::channel::<Answer>();
            let mut storage = Storage {
                jobs: Some(jobs),
                done,
                outstanding: VecDeque::new(),
                thread: None,
                poller,
                reachable: true,
            };
            storage.persist(BatchId::from_raw(7), Vec::new());
            storage.check();
            assert!(storage.finished().is_empty(), "still pending");
            assert!(storage.reachable() && storage.checking());
            // The thread dies with the jobs in hand: the batch is answered
            // failed, the check is not for the core, and the database counts
            // as unreachable.
            drop((inbox, outbox));
            let answers = storage.finished();
            assert!(!storage.reachable() && !storage.checking());
            assert!(matches!(
                answers[..],
                [Done::Persisted {
                    batch,
                    result: Err(DatabaseError::Stopped)
                }] if batch == BatchId::from_raw(7)
            ));
            // Later jobs fail at once.
            let now = chatproto::Timestamp::from_unix_millis(0);
            let mut core = chatproto::Server::new(
                chatproto::ServerConfig::default(),
                chatproto::Accounts::new(),
                now,
            )
            .unwrap();
            let conn = core.accept(chatproto::PeerKey::UNSPECIFIED, [0; 16], now);
            storage.load_page(conn, "bob".parse().unwrap(), 0, 1);
            assert!(matches!(
                storage.finished()[..],
                [Done::Page {
                    result: Err(DatabaseError::Stopped),
                    ..
                }]
            ));
            assert!(storage.idle());
        }
    }
}

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
mod without_database {
    use chatproto::{BatchId, Change, ClaimId, ConnId, QueueSize, QueuedMessage, Username};

    use crate::node::Beat;

    /// No database in this build: no storage thread exists.
    #[derive(Debug)]
    pub enum Storage {}

    /// Why storage failed (never, in this build).
    #[derive(Debug, thiserror::Error)]
    #[error("no database in this build")]
    pub enum NoDatabase {}

    /// What the storage thread finished (nothing, in this build).
    #[derive(Debug)]
    pub enum Done {
        /// A batch was committed, or failed.
        Persisted {
            /// Which batch.
            batch: BatchId,
            /// What became of it.
            result: Result<(), NoDatabase>,
        },
        /// A page of an offline queue was read.
        Page {
            /// Whose page.
            conn: ConnId,
            /// The page.
            result: Result<Vec<QueuedMessage>, NoDatabase>,
        },
        /// A session claim was answered.
        Claimed {
            /// Which claim.
            claim: ClaimId,
            /// What the user's offline queue holds, if this node holds the
            /// session now.
            result: Result<Option<QueueSize>, NoDatabase>,
        },
        /// A session was given back (or could not be).
        Released {
            /// Whose.
            user: Username,
            /// Which claim.
            claim: ClaimId,
            /// Whether it was written.
            result: Result<(), NoDatabase>,
        },
        /// This node's heartbeat was written (or not).
        Beat(Result<Beat, NoDatabase>),
    }

    // Each method matches on the uninhabited storage: none is ever called.
    #[allow(missing_docs)]
    impl Storage {
        pub fn persist(&mut self, _: BatchId, _: Vec<Change>) {
            match *self {}
        }
        pub fn load_page(&mut self, _: ConnId, _: Username, _: u64, _: usize) {
            match *self {}
        }
        pub fn finished(&mut self) -> Vec<Done> {
            match *self {}
        }
        pub fn idle(&self) -> bool {
            match *self {}
        }
        pub fn check(&mut self) {
            match *self {}
        }
        pub fn reachable(&self) -> bool {
            match *self {}
        }
        pub fn checking(&self) -> bool {
            match *self {}
        }
        pub fn claim(&mut self, _: ClaimId, _: Username) {
            match *self {}
        }
        pub fn release(&mut self, _: Username, _: ClaimId) {
            match *self {}
        }
        pub fn heartbeat(&mut self) {
            match *self {}
        }
        pub fn beating(&self) -> bool {
            match *self {}
        }
        pub fn leave(&mut self) {
            match *self {}
        }
        pub fn stopped(&self) -> bool {
            match *self {}
        }
    }
}
