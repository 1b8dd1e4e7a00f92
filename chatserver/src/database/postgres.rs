//! The PostgreSQL database behind `--db postgres://…`: the same lasting
//! state as the SQLite file, in tables of the connection's schema.
//!
//! A batch is one transaction, committed before its outputs go out (with
//! the server's `synchronous_commit`, on by default: on disk, or on a
//! synchronous standby). The schema is created or brought up to date at
//! start-up inside a transaction that holds an advisory lock, so nodes
//! starting together migrate once; a schema newer than this build is a
//! start-up error, and nothing else in the database is touched.
//!
//! A lost connection fails the batch in hand (the core answers
//! `unavailable` and takes the batch back) and is made again for the next
//! job: the server never stops for it. A commit whose connection broke
//! while the `COMMIT` was in flight may in fact have been written; the
//! core, told it failed, takes it back, so such a change can be lost or
//! (an offline message) kept twice. PostgreSQL cannot tell a client which.

use std::time::Duration;

use chatproto::{
    Change, ClaimId, LastSeen, LockoutState, OfflineMessage, QueueSize, QueuedMessage, Snapshot,
    Timestamp, Username,
};
use postgres::{Client, Config, NoTls, Statement, Transaction};
use tracing::{info, warn};

use super::{
    millis, timestamp, Committed, DatabaseError, GroupJob, GroupOutcome, Location, SCHEMA_VERSION,
};
use crate::node::{Beat, ClusterNode};

/// `pg_advisory_xact_lock` key of the schema migration: "chtp".
const MIGRATION_LOCK: i64 = 0x6368_7470;

/// How long a connection attempt may take, unless the connection string
/// says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an unanswered socket may stay so before the kernel gives up on
/// it, so a commit to a server that vanished fails instead of hanging.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Server settings for every connection unless the connection string sets
/// `options`: how long a statement may wait for a lock, run at all, and a
/// transaction stay open doing nothing.
const SESSION_TIMEOUTS: &str =
    "-c lock_timeout=2000 -c statement_timeout=30000 -c idle_in_transaction_session_timeout=10000";

/// Schema migrations: entry `i` takes the schema from version `i` to
/// `i + 1`, as SQLite's list does (the same tables and columns).
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the first schema.
    "CREATE TABLE offline_message (
         seq BIGSERIAL PRIMARY KEY,
         recipient TEXT NOT NULL,
         sender TEXT NOT NULL,
         text TEXT NOT NULL,
         sent_at BIGINT NOT NULL
     );
     CREATE INDEX offline_message_by_recipient ON offline_message (recipient, seq);
     CREATE TABLE block (
         blocker TEXT NOT NULL,
         target TEXT NOT NULL,
         PRIMARY KEY (blocker, target)
     );
     CREATE TABLE last_seen (
         username TEXT PRIMARY KEY,
         online BOOLEAN NOT NULL,
         at BIGINT NOT NULL
     );
     CREATE TABLE lockout (
         username TEXT PRIMARY KEY,
         failures INTEGER NOT NULL,
         locked_until BIGINT
     );",
    // 1 -> 2: each message's size in bytes, in an index that covers the
    // start-up count.
    "ALTER TABLE offline_message ADD COLUMN size BIGINT NOT NULL DEFAULT 0;
     UPDATE offline_message SET size = octet_length(text);
     DROP INDEX offline_message_by_recipient;
     CREATE INDEX offline_message_by_recipient ON offline_message (recipient, seq, size);",
    // 2 -> 3: when a name's last failure was, so its count can expire.
    "ALTER TABLE lockout ADD COLUMN last_failure BIGINT;",
    // 3 -> 4: cluster mode. Each node's heartbeat (by the database's
    // clock, so nodes' clocks need not agree) and whether a claim took a
    // session from it while it was silent; each user's one session, held
    // by one node under one claim.
    "CREATE TABLE cluster_node (
         id TEXT PRIMARY KEY,
         name TEXT NOT NULL,
         heartbeat_at TIMESTAMPTZ NOT NULL,
         lease_ms BIGINT NOT NULL,
         expired BOOLEAN NOT NULL DEFAULT FALSE
     );
     CREATE TABLE cluster_session (
         username TEXT PRIMARY KEY,
         node TEXT NOT NULL REFERENCES cluster_node (id) ON DELETE CASCADE,
         claim BIGINT NOT NULL,
         since TIMESTAMPTZ NOT NULL
     );
     CREATE INDEX cluster_session_by_node ON cluster_session (node);",
];

const _: () = assert!(MIGRATIONS.len() as i32 == SCHEMA_VERSION);

/// An open chatserver PostgreSQL database.
#[derive(Debug)]
pub struct PostgresDatabase {
    config: Config,
    /// The connection string without its password, for messages.
    location: String,
    /// The connection and its prepared statements; `None` after it broke,
    /// until the next job makes it again.
    session: Option<Session>,
    /// Changes recorded since the last commit, in order.
    pending: Vec<Change>,
    /// Cluster mode: whether this node's row was written once, so a
    /// heartbeat that finds none knows it was removed.
    registered: bool,
}

/// A connection with the statements prepared on it.
struct Session {
    client: Client,
    statements: Statements,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("closed", &self.client.is_closed())
            .finish_non_exhaustive()
    }
}

/// Every statement a commit or a page read runs, prepared once per
/// connection.
struct Statements {
    queue: Statement,
    deliver: Statement,
    deliver_exactly: Statement,
    block: Statement,
    unblock: Statement,
    seen: Statement,
    lockout: Statement,
    clear_lockout: Statement,
    remove_account: Statement,
    page: Statement,
    claim_new: Statement,
    queue_size: Statement,
    claim_holder: Statement,
    claim_take: Statement,
    expire_node: Statement,
    claimant_alive: Statement,
    release: Statement,
    node_before: Statement,
    heartbeat: Statement,
}

impl PostgresDatabase {
    /// Connects to the database `conn` names (a libpq connection string),
    /// creates or updates the schema, and reads the lasting state back.
    pub fn open(conn: &str) -> Result<(PostgresDatabase, Snapshot), DatabaseError> {
        let location = Location::Postgres(conn.to_owned()).to_string();
        let mut config: Config = conn
            .parse()
            .map_err(|source| DatabaseError::PostgresConfig {
                location: location.clone(),
                source,
            })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        config.application_name("chatserver");
        if config.get_options().is_none() {
            // No statement may wait for ever: a lock held by a node that
            // froze mid-transaction would otherwise stall this one's
            // storage thread (its commits, claims and heartbeats) behind
            // it, and a transaction left open by a stalled node would hold
            // its locks for ever. Shorter than the default lease.
            config.options(SESSION_TIMEOUTS);
        }
        let mut db = PostgresDatabase {
            config,
            location,
            session: None,
            pending: Vec::new(),
            registered: false,
        };
        db.migrate()?;
        let snapshot = db.load()?;
        Ok((db, snapshot))
    }

    /// The connection string without its password.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Takes one change, to be written by the next commit.
    pub fn record(&mut self, change: Change) {
        self.pending.push(change);
    }

    /// Whether the server answers, connecting first if the connection is
    /// gone.
    pub fn check(&mut self) -> Result<(), DatabaseError> {
        self.with_session_again("check the connection", |session| {
            session.client.simple_query("SELECT 1").map(|_| ())
        })
    }

    /// Writes every pending change in one transaction. On failure nothing
    /// of it is written (short of a connection lost during `COMMIT`, see
    /// the module doc) and the pending changes are dropped.
    pub fn commit(&mut self) -> Result<Committed, DatabaseError> {
        if self.pending.is_empty() {
            return Ok(Committed::default());
        }
        let pending = std::mem::take(&mut self.pending);
        let unknown = self.with_session("commit a batch", |session| {
            let mut tx = session.client.transaction()?;
            for change in &pending {
                if !write_change(&mut tx, &session.statements, change)? {
                    // Dropping the transaction rolls it back.
                    return Ok(Some(format!("{change:?}")));
                }
            }
            tx.commit().map(|()| None)
        })?;
        match unknown {
            // A change kind added to the core after this build: nothing
            // here knows how to keep it, so the batch fails rather than
            // lose it.
            Some(change) => Err(DatabaseError::Unsupported {
                location: self.location.clone(),
                what: format!("cannot store an unknown change {change}"),
            }),
            None => Ok(Committed {
                changes: pending.len(),
            }),
        }
    }

    /// `to`'s queued messages after `after_seq`, oldest first: up to
    /// `max_bytes` of text, but at least one message if any is left.
    pub fn offline_page(
        &mut self,
        to: &Username,
        after_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<QueuedMessage>, DatabaseError> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        // Rows are taken in slices, so a long queue is not read whole for
        // one page.
        let limit = i64::try_from(max_bytes / 16 + 1)
            .unwrap_or(i64::MAX)
            .min(1000);
        let rows = self.with_session_again("read offline messages", |session| {
            session
                .client
                .query(&session.statements.page, &[&to.as_str(), &after, &limit])
        })?;
        let mut page = Vec::new();
        let mut bytes = 0;
        for row in rows {
            let seq: i64 = row.get(0);
            let size = usize::try_from(row.get::<_, i64>(4)).unwrap_or(0);
            if !page.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            let message = (|| {
                Ok::<_, DatabaseError>(QueuedMessage {
                    seq: u64::try_from(seq)
                        .map_err(|_| self.bad(format!("offline message seq {seq}")))?,
                    message: OfflineMessage {
                        from: self.name(row.get(1), "offline message sender")?,
                        text: row
                            .get::<_, String>(2)
                            .parse()
                            .map_err(|e| self.bad(format!("offline message text: {e}")))?,
                        sent_at: self.time(row.get(3), "sent_at")?,
                    },
                })
            })();
            match message {
                Ok(message) => page.push(message),
                // As with SQLite: one damaged row is said and passed over,
                // not allowed to block the queue at every login.
                Err(e) => tracing::error!("{e} (offline message {seq} for {to}, skipped)"),
            }
        }
        Ok(page)
    }

    /// Cluster mode: makes `node` `user`'s one session under `claim`,
    /// unless a node that is alive holds it. Alive means heard from within
    /// its lease by the database's clock. A session held by a silent node
    /// is taken over, and that node marked expired, so its next heartbeat
    /// tells it to close its clients; one held by `node` itself (a release
    /// not yet written) is taken over too. With the session, what the
    /// user's offline queue holds; `None` if another node holds it.
    pub fn claim_session(
        &mut self,
        node: &ClusterNode,
        user: &Username,
        claim: ClaimId,
    ) -> Result<Option<QueueSize>, DatabaseError> {
        let claimed = self.with_session_again("claim a session", |session| {
            let mut tx = session.client.transaction()?;
            // The claiming node must not have been given up: a node whose
            // sessions may have been taken over claims nothing until its
            // heartbeat has told it. Claiming counts as a heartbeat.
            if tx.execute(&session.statements.claimant_alive, &[&node.id.as_str()])? == 0 {
                return Ok(None);
            }
            let size = claim_in(&mut tx, &session.statements, node, user, claim)?;
            tx.commit()?;
            Ok(Some(size))
        })?;
        claimed.ok_or_else(|| DatabaseError::NodeExpired {
            location: self.location.clone(),
        })
    }

    /// Runs `jobs` in one transaction, with one commit, and says what
    /// became of each, in order: the storage thread's group commit, so a
    /// login storm's claims, releases and batches share their round trips
    /// and their wait for the disk.
    ///
    /// `None` if the group was rolled back before its commit (an error, a
    /// change this build cannot store): nothing of it was written, and the
    /// caller runs each job alone, which says which one failed and why. If
    /// the `COMMIT` itself fails, every job fails with it, as a lone batch
    /// whose commit fails does.
    pub fn run_group(
        &mut self,
        node: &ClusterNode,
        jobs: &[GroupJob<'_>],
    ) -> Option<Vec<Result<GroupOutcome, DatabaseError>>> {
        let mut committing = false;
        let done = self.with_session("commit a group", |session| {
            let statements = &session.statements;
            let mut tx = session.client.transaction()?;
            let claims = jobs.iter().any(|job| matches!(job, GroupJob::Claim { .. }));
            // One liveness check for every claim of the group.
            let alive =
                !claims || tx.execute(&statements.claimant_alive, &[&node.id.as_str()])? > 0;
            let mut outcomes = Vec::with_capacity(jobs.len());
            for job in jobs {
                outcomes.push(match job {
                    GroupJob::Persist(changes) => {
                        for change in *changes {
                            if !write_change(&mut tx, statements, change)? {
                                // Rolled back: run alone, it fails alone.
                                return Ok(None);
                            }
                        }
                        Some(GroupOutcome::Persisted(Committed {
                            changes: changes.len(),
                        }))
                    }
                    GroupJob::Claim { .. } if !alive => None,
                    GroupJob::Claim { user, claim } => Some(GroupOutcome::Claimed(claim_in(
                        &mut tx, statements, node, user, *claim,
                    )?)),
                    GroupJob::Release { user, claim } => {
                        let claim = i64::try_from(claim.into_raw()).unwrap_or(i64::MAX);
                        tx.execute(
                            &statements.release,
                            &[&user.as_str(), &node.id.as_str(), &claim],
                        )?;
                        Some(GroupOutcome::Released)
                    }
                });
            }
            committing = true;
            tx.commit()?;
            Ok(Some(outcomes))
        });
        let location = &self.location;
        match done {
            Ok(outcomes) => outcomes.map(|outcomes| {
                outcomes
                    .into_iter()
                    .map(|outcome| {
                        // A claim of a node given up.
                        outcome.ok_or_else(|| DatabaseError::NodeExpired {
                            location: location.clone(),
                        })
                    })
                    .collect()
            }),
            Err(e) if committing => {
                let reason = e.to_string();
                Some(
                    jobs.iter()
                        .map(|_| {
                            Err(DatabaseError::GroupCommit {
                                location: location.clone(),
                                jobs: jobs.len(),
                                reason: reason.clone(),
                            })
                        })
                        .collect(),
                )
            }
            Err(_) => None,
        }
    }

    /// Cluster mode: `node` no longer holds `user`'s session made by
    /// `claim`; removed only if it is still that one.
    pub fn release_session(
        &mut self,
        node: &ClusterNode,
        user: &Username,
        claim: ClaimId,
    ) -> Result<(), DatabaseError> {
        let claim = i64::try_from(claim.into_raw()).unwrap_or(i64::MAX);
        self.with_session_again("release a session", |session| {
            session
                .client
                .execute(
                    &session.statements.release,
                    &[&user.as_str(), &node.id.as_str(), &claim],
                )
                .map(drop)
        })
    }

    /// Cluster mode: `node` is alive, by the database's clock. The first
    /// heartbeat registers it (and removes nodes silent for a day, with
    /// their sessions). [`Beat::Expired`] if a claim took one of its
    /// sessions while it was silent past its lease, or its row is gone:
    /// it must close its clients; it is alive again from this heartbeat.
    pub fn node_heartbeat(&mut self, node: &ClusterNode) -> Result<Beat, DatabaseError> {
        let registered = self.registered;
        let lease = lease_millis(node);
        let beat = self.with_session_again("write this node's heartbeat", |session| {
            let mut tx = session.client.transaction()?;
            if !registered {
                // Sessions first, then nodes: the order a claim locks them.
                tx.batch_execute(
                    "DELETE FROM cluster_session WHERE node IN
                         (SELECT id FROM cluster_node WHERE heartbeat_at < now() - interval '1 day');
                     DELETE FROM cluster_node WHERE heartbeat_at < now() - interval '1 day';",
                )?;
            }
            let before = tx.query_opt(&session.statements.node_before, &[&node.id.as_str()])?;
            tx.execute(
                &session.statements.heartbeat,
                &[&node.id.as_str(), &node.name.as_str(), &lease],
            )?;
            tx.commit()?;
            Ok(match before {
                Some(row) if row.get::<_, bool>(0) => Beat::Expired {
                    silent_for: Duration::from_millis(
                        u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                    ),
                },
                Some(_) => Beat::Alive,
                None if registered => Beat::Expired {
                    silent_for: node.lease,
                },
                None => Beat::Alive,
            })
        })?;
        self.registered = true;
        Ok(beat)
    }

    /// Cluster mode: `node` leaves the cluster (a clean shutdown, after its
    /// releases): its row goes, and with it any session still under it,
    /// so other nodes need not wait out its lease.
    pub fn leave_cluster(&mut self, node: &ClusterNode) -> Result<(), DatabaseError> {
        self.with_session_again("remove this node from the cluster", |session| {
            let mut tx = session.client.transaction()?;
            tx.execute(
                "DELETE FROM cluster_session WHERE node = $1",
                &[&node.id.as_str()],
            )?;
            tx.execute(
                "DELETE FROM cluster_node WHERE id = $1",
                &[&node.id.as_str()],
            )?;
            tx.commit()
        })
    }

    /// Reads the lasting state: offline queues as their sizes only.
    fn load(&mut self) -> Result<Snapshot, DatabaseError> {
        let (sizes, blocks, seen, lockouts) = self.with_session("read the state", |session| {
            let client = &mut session.client;
            Ok((
                client.query(
                    "SELECT recipient, count(*), sum(size)::BIGINT FROM offline_message GROUP BY recipient",
                    &[],
                )?,
                client.query("SELECT blocker, target FROM block", &[])?,
                client.query("SELECT username, online, at FROM last_seen", &[])?,
                client.query(
                    "SELECT username, failures, locked_until, last_failure FROM lockout",
                    &[],
                )?,
            ))
        })?;
        let mut snapshot = Snapshot::default();
        for row in sizes {
            let size = QueueSize {
                messages: usize::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                bytes: usize::try_from(row.get::<_, Option<i64>>(2).unwrap_or(0)).unwrap_or(0),
            };
            let to = self.name(row.get(0), "offline message recipient")?;
            snapshot.offline_sizes.insert(to, size);
        }
        for row in blocks {
            let blocker = self.name(row.get(0), "blocker")?;
            let target = self.name(row.get(1), "blocked user")?;
            snapshot.blocks.entry(blocker).or_default().insert(target);
        }
        for row in seen {
            let at = self.time(row.get(2), "last seen at")?;
            let seen = if row.get(1) {
                LastSeen::Online { since: at }
            } else {
                LastSeen::Offline { at }
            };
            snapshot
                .last_seen
                .insert(self.name(row.get(0), "last-seen user")?, seen);
        }
        for row in lockouts {
            let state = LockoutState {
                failures: u32::try_from(row.get::<_, i32>(1))
                    .map_err(|_| self.bad("negative lockout failure count".to_owned()))?,
                locked_until: self.optional_time(row.get(2), "locked until")?,
                last_failure: self.optional_time(row.get(3), "last failure")?,
            };
            snapshot
                .lockouts
                .insert(self.name(row.get(0), "lockout user")?, state);
        }
        Ok(snapshot)
    }

    /// Creates or updates the schema, once however many nodes start
    /// together: the version is read and changed under an advisory lock
    /// held by the transaction.
    fn migrate(&mut self) -> Result<(), DatabaseError> {
        let location = self.location.clone();
        let doing = "create or update the schema";
        let error = |source| DatabaseError::Postgres {
            location: location.clone(),
            doing,
            source,
        };
        // A connection of its own: the statements a session prepares name
        // tables this may be about to create.
        let mut client = self.config.connect(NoTls).map_err(error)?;
        let found = (|| {
            let mut tx = client.transaction()?;
            // However long another node's migration takes, or this one.
            tx.batch_execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS chatserver_schema (
                     version INTEGER NOT NULL,
                     only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row)
                 )",
            )?;
            let version: i32 = tx
                .query_opt("SELECT version FROM chatserver_schema", &[])?
                .map_or(0, |row| row.get(0));
            if version > SCHEMA_VERSION {
                return Ok(version);
            }
            for migration in MIGRATIONS.iter().skip(version.max(0) as usize) {
                tx.batch_execute(migration)?;
            }
            if version < SCHEMA_VERSION {
                tx.execute(
                    "INSERT INTO chatserver_schema (version) VALUES ($1)
                     ON CONFLICT (only_row) DO UPDATE SET version = EXCLUDED.version",
                    &[&SCHEMA_VERSION],
                )?;
            }
            tx.commit()?;
            if version < SCHEMA_VERSION {
                info!(
                    from = version,
                    to = SCHEMA_VERSION,
                    "PostgreSQL {location}: schema created or updated"
                );
            }
            Ok(version)
        })()
        .map_err(error)?;
        if found > SCHEMA_VERSION {
            return Err(DatabaseError::PostgresNewer {
                location: self.location.clone(),
                found,
            });
        }
        Ok(())
    }

    /// As [`PostgresDatabase::with_session`], but if `work` finds the
    /// connection it was given broken (the server restarted, or an
    /// administrator ended it), it runs once more on a new one. Only for
    /// work that is safe to run twice: reads, and writes that do the same
    /// again (a claim, a release, a heartbeat), never a batch commit, whose
    /// `COMMIT` may have been written before the connection broke.
    fn with_session_again<T>(
        &mut self,
        doing: &'static str,
        mut work: impl FnMut(&mut Session) -> Result<T, postgres::Error>,
    ) -> Result<T, DatabaseError> {
        let had_session = self.session.is_some();
        match self.with_session(doing, &mut work) {
            Err(DatabaseError::Postgres { .. }) if had_session && self.session.is_none() => {
                self.with_session(doing, work)
            }
            done => done,
        }
    }

    /// Runs `work` on the connection, making it first if there is none.
    /// An error that broke the connection drops it, so the next call makes
    /// a new one.
    fn with_session<T>(
        &mut self,
        doing: &'static str,
        work: impl FnOnce(&mut Session) -> Result<T, postgres::Error>,
    ) -> Result<T, DatabaseError> {
        let location = &self.location;
        let error = |source| DatabaseError::Postgres {
            location: location.clone(),
            doing,
            source,
        };
        if self.session.as_ref().is_some_and(|s| s.client.is_closed()) {
            self.session = None;
        }
        let session = match &mut self.session {
            Some(session) => session,
            None => {
                let session = connect(&self.config).map_err(error)?;
                info!("PostgreSQL {location}: connected");
                self.session.insert(session)
            }
        };
        match work(session) {
            Ok(value) => Ok(value),
            Err(source) => {
                if session.client.is_closed() || source.is_closed() {
                    warn!(
                        "PostgreSQL {location}: the connection broke ({}); it is made again for the next request",
                        describe(&source)
                    );
                    self.session = None;
                }
                Err(error(source))
            }
        }
    }

    fn name(&self, name: String, what: &str) -> Result<Username, DatabaseError> {
        name.parse()
            .map_err(|e| self.bad(format!("{what} {name:?}: {e}")))
    }

    fn optional_time(
        &self,
        millis: Option<i64>,
        what: &str,
    ) -> Result<Option<Timestamp>, DatabaseError> {
        millis.map(|t| self.time(t, what)).transpose()
    }

    fn time(&self, millis: i64, what: &str) -> Result<Timestamp, DatabaseError> {
        timestamp(millis).ok_or_else(|| self.bad(format!("{what} {millis}")))
    }

    fn bad(&self, what: String) -> DatabaseError {
        DatabaseError::PostgresBadRow {
            location: self.location.clone(),
            what,
        }
    }
}

/// A PostgreSQL error as one line: the server's message (with its detail)
/// when there is one, else the client's.
pub fn describe(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_owned(),
        },
        None => {
            // The client's own errors name their cause in the source.
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

/// Connects and prepares the statements. TLS to PostgreSQL is not built
/// in: `sslmode=require` (or stricter) fails here with the client's error.
fn connect(config: &Config) -> Result<Session, postgres::Error> {
    let mut client = config.connect(NoTls)?;
    let statements = Statements {
        queue: client.prepare(
            "INSERT INTO offline_message (recipient, sender, text, sent_at, size) VALUES ($1, $2, $3, $4, $5)",
        )?,
        deliver: client.prepare(
            "DELETE FROM offline_message WHERE seq IN
                 (SELECT seq FROM offline_message WHERE recipient = $1 ORDER BY seq LIMIT $2)",
        )?,
        deliver_exactly: client.prepare(
            "DELETE FROM offline_message WHERE recipient = $1 AND seq = ANY($2)",
        )?,
        block: client.prepare(
            "INSERT INTO block (blocker, target) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )?,
        unblock: client.prepare("DELETE FROM block WHERE blocker = $1 AND target = $2")?,
        seen: client.prepare(
            "INSERT INTO last_seen (username, online, at) VALUES ($1, $2, $3)
             ON CONFLICT (username) DO UPDATE SET online = EXCLUDED.online, at = EXCLUDED.at
             WHERE last_seen.at <= EXCLUDED.at",
        )?,
        lockout: client.prepare(
            "INSERT INTO lockout (username, failures, locked_until, last_failure) VALUES ($1, $2, $3, $4)
             ON CONFLICT (username) DO UPDATE SET failures = EXCLUDED.failures,
                 locked_until = EXCLUDED.locked_until, last_failure = EXCLUDED.last_failure",
        )?,
        clear_lockout: client.prepare("DELETE FROM lockout WHERE username = $1")?,
        // One statement, so that it is one round trip.
        remove_account: client.prepare(
            "WITH queue AS (DELETE FROM offline_message WHERE recipient = $1),
                  blocks AS (DELETE FROM block WHERE blocker = $1 OR target = $1),
                  seen AS (DELETE FROM last_seen WHERE username = $1)
             DELETE FROM lockout WHERE username = $1",
        )?,
        page: client.prepare(
            "SELECT seq, sender, text, sent_at, size FROM offline_message
             WHERE recipient = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )?,
        queue_size: client.prepare(
            "SELECT count(*), coalesce(sum(size), 0)::BIGINT FROM offline_message WHERE recipient = $1",
        )?,
        claim_new: client.prepare(
            "INSERT INTO cluster_session (username, node, claim, since) VALUES ($1, $2, $3, now())
             ON CONFLICT (username) DO NOTHING",
        )?,
        // Who holds the session, and whether it is free to take: held by
        // the claiming node itself, or by one silent past the lease.
        claim_holder: client.prepare(
            "SELECT s.node, s.node = $2 OR n.expired
                 OR n.heartbeat_at < now() - n.lease_ms * interval '1 millisecond'
             FROM cluster_session s JOIN cluster_node n ON n.id = s.node
             WHERE s.username = $1 FOR UPDATE OF s",
        )?,
        claim_take: client.prepare(
            "UPDATE cluster_session SET node = $2, claim = $3, since = now() WHERE username = $1",
        )?,
        expire_node: client.prepare("UPDATE cluster_node SET expired = TRUE WHERE id = $1")?,
        // Not given up: silent past its lease is not enough (a node whose
        // heartbeats are late under load is alive: it is claiming), only a
        // session taken over from it (`expired`) or its row removed is.
        claimant_alive: client.prepare(
            "UPDATE cluster_node SET heartbeat_at = now() WHERE id = $1 AND NOT expired",
        )?,
        release: client.prepare(
            "DELETE FROM cluster_session WHERE username = $1 AND node = $2 AND claim = $3",
        )?,
        node_before: client.prepare(
            "SELECT expired, (extract(epoch FROM now() - heartbeat_at) * 1000)::BIGINT
             FROM cluster_node WHERE id = $1 FOR UPDATE",
        )?,
        heartbeat: client.prepare(
            "INSERT INTO cluster_node (id, name, heartbeat_at, lease_ms) VALUES ($1, $2, now(), $3)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), expired = FALSE,
                 name = EXCLUDED.name, lease_ms = EXCLUDED.lease_ms",
        )?,
    };
    Ok(Session { client, statements })
}

/// The claim of `user`'s session by `node` under `claim`, in `tx` (whose
/// caller checked that `node` was not given up): what the user's offline
/// queue holds if `node` has the session now, `None` if a node that is
/// alive holds it.
fn claim_in(
    tx: &mut Transaction<'_>,
    statements: &Statements,
    node: &ClusterNode,
    user: &Username,
    claim: ClaimId,
) -> Result<Option<QueueSize>, postgres::Error> {
    let claim = i64::try_from(claim.into_raw()).unwrap_or(i64::MAX);
    let args: [&(dyn postgres::types::ToSql + Sync); 3] =
        [&user.as_str(), &node.id.as_str(), &claim];
    let queued = |tx: &mut Transaction<'_>| {
        let row = tx.query_one(&statements.queue_size, &[&user.as_str()])?;
        Ok::<_, postgres::Error>(QueueSize {
            messages: usize::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            bytes: usize::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        })
    };
    // A new row, unless one is there: two claims at once for the same user
    // wait on the key, and the second finds the first's.
    if tx.execute(&statements.claim_new, &args)? == 1 {
        return queued(tx).map(Some);
    }
    let holder = tx.query_opt(
        &statements.claim_holder,
        &[&user.as_str(), &node.id.as_str()],
    )?;
    let taken = match holder {
        Some(row) if row.get::<_, bool>(1) => {
            let old: String = row.get(0);
            if old != node.id {
                tx.execute(&statements.expire_node, &[&old])?;
            }
            tx.execute(&statements.claim_take, &args)?;
            true
        }
        Some(_) => false,
        // Released between the two statements: claim it afresh.
        None => tx.execute(&statements.claim_new, &args)? == 1,
    };
    if taken {
        queued(tx).map(Some)
    } else {
        Ok(None)
    }
}

/// Applies one change inside `tx`; false for a change kind this build
/// does not know.
fn write_change(
    tx: &mut Transaction<'_>,
    statements: &Statements,
    change: &Change,
) -> Result<bool, postgres::Error> {
    match change {
        Change::MessageQueued { to, message } => {
            tx.execute(
                &statements.queue,
                &[
                    &to.as_str(),
                    &message.from.as_str(),
                    &message.text.as_str(),
                    &millis(message.sent_at),
                    &i64::try_from(message.size()).unwrap_or(i64::MAX),
                ],
            )?;
        }
        Change::MessagesDelivered { to, count } => {
            tx.execute(
                &statements.deliver,
                &[&to.as_str(), &i64::try_from(*count).unwrap_or(i64::MAX)],
            )?;
        }
        Change::OfflineDelivered { to, seqs } => {
            let seqs: Vec<i64> = seqs
                .iter()
                .map(|&seq| i64::try_from(seq).unwrap_or(i64::MAX))
                .collect();
            tx.execute(&statements.deliver_exactly, &[&to.as_str(), &seqs])?;
        }
        Change::Blocked { blocker, target } => {
            tx.execute(&statements.block, &[&blocker.as_str(), &target.as_str()])?;
        }
        Change::Unblocked { blocker, target } => {
            tx.execute(&statements.unblock, &[&blocker.as_str(), &target.as_str()])?;
        }
        Change::LoggedIn { user, at } => {
            tx.execute(&statements.seen, &[&user.as_str(), &true, &millis(*at)])?;
        }
        Change::LoggedOut { user, at } => {
            tx.execute(&statements.seen, &[&user.as_str(), &false, &millis(*at)])?;
        }
        Change::LockoutChanged { user, state } => {
            tx.execute(
                &statements.lockout,
                &[
                    &user.as_str(),
                    &i32::try_from(state.failures).unwrap_or(i32::MAX),
                    &state.locked_until.map(millis),
                    &state.last_failure.map(millis),
                ],
            )?;
        }
        Change::LockoutCleared { user } => {
            tx.execute(&statements.clear_lockout, &[&user.as_str()])?;
        }
        Change::AccountRemoved { user } => {
            tx.execute(&statements.remove_account, &[&user.as_str()])?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// `node`'s lease in milliseconds, as the statements take it.
fn lease_millis(node: &ClusterNode) -> i64 {
    i64::try_from(node.lease.as_millis()).unwrap_or(i64::MAX)
}
