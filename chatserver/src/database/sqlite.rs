//! The SQLite file behind `--db PATH`: one writer (an exclusive lock),
//! WAL with `synchronous = FULL`, so a commit is on disk before the server
//! answers. [`SqliteDatabase::commit`] writes a batch's changes in one
//! transaction; [`SqliteDatabase::open`] reads the state back as a
//! [`Snapshot`], with offline queues as their sizes only; texts are read a
//! page at a time ([`SqliteDatabase::offline_page`]).
//!
//! The file is ours when its `application_id` says so; its `user_version`
//! is the schema version, and [`MIGRATIONS`] brings an older file up to
//! date. A file that is not SQLite, belongs to something else, is newer
//! than this build or fails its integrity check is refused, never reset.

use std::path::{Path, PathBuf};

use chatproto::{
    Change, LastSeen, LockoutState, OfflineMessage, QueueSize, QueuedMessage, Snapshot, Timestamp,
    Username,
};
use rusqlite::{params, Connection, ErrorCode, OpenFlags, Transaction};

use super::{millis, timestamp, Committed, DatabaseError, SCHEMA_VERSION};

/// `PRAGMA application_id` of a chatserver database: "chtp".
pub const APPLICATION_ID: i32 = 0x6368_7470;

/// Schema migrations: entry `i` takes a database from version `i` to
/// `i + 1`. The schema version this build writes is `MIGRATIONS.len()`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the first schema.
    "CREATE TABLE offline_message (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         recipient TEXT NOT NULL,
         sender TEXT NOT NULL,
         text TEXT NOT NULL,
         sent_at INTEGER NOT NULL
     );
     CREATE INDEX offline_message_by_recipient ON offline_message (recipient, seq);
     CREATE TABLE block (
         blocker TEXT NOT NULL,
         target TEXT NOT NULL,
         PRIMARY KEY (blocker, target)
     ) WITHOUT ROWID;
     CREATE TABLE last_seen (
         user TEXT PRIMARY KEY,
         online INTEGER NOT NULL,
         at INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE lockout (
         user TEXT PRIMARY KEY,
         failures INTEGER NOT NULL,
         locked_until INTEGER
     ) WITHOUT ROWID;",
    // 1 -> 2: each message's size in bytes, in an index that covers the
    // start-up count, so counting queues never reads their texts.
    "ALTER TABLE offline_message ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
     UPDATE offline_message SET size = length(CAST(text AS BLOB));
     DROP INDEX offline_message_by_recipient;
     CREATE INDEX offline_message_by_recipient ON offline_message (recipient, seq, size);",
    // 2 -> 3: when a name's last failure was, so its count can expire. The
    // table now holds every name tried, account or not.
    "ALTER TABLE lockout ADD COLUMN last_failure INTEGER;",
    // 3 -> 4: the cluster's nodes and sessions, which only PostgreSQL
    // keeps (cluster mode needs it): nothing changes in a SQLite file.
    "",
];

// One migration per schema version, in step with PostgreSQL's.
const _: () = assert!(MIGRATIONS.len() as i32 == SCHEMA_VERSION);

/// An open chatserver SQLite database.
#[derive(Debug)]
pub struct SqliteDatabase {
    path: PathBuf,
    conn: Connection,
    /// Changes recorded since the last commit, in order.
    pending: Vec<Change>,
}

impl SqliteDatabase {
    /// Opens (creating if needed) the database at `path`, brings its schema
    /// up to date, and reads the lasting state back.
    pub fn open(path: &Path) -> Result<(SqliteDatabase, Snapshot), DatabaseError> {
        // SQLite takes an empty file for a new database; here it is far more
        // likely a database truncated by accident, and starting on it would
        // silently drop everything queued. Only a file this call creates is
        // new. (An empty file beside a write-ahead log with data is a
        // database SQLite can recover, and is opened.)
        if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            let mut wal = path.as_os_str().to_owned();
            wal.push("-wal");
            if !std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
                return Err(DatabaseError::Empty {
                    path: path.to_owned(),
                });
            }
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| DatabaseError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut db = SqliteDatabase {
            path: path.to_owned(),
            conn,
            pending: Vec::new(),
        };
        let objects = db.configure()?;
        db.check_and_migrate(objects)?;
        let snapshot = db.load()?;
        Ok((db, snapshot))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes one change, to be written by the next [`SqliteDatabase::commit`].
    pub fn record(&mut self, change: Change) {
        self.pending.push(change);
    }

    /// Whether changes are waiting for a commit.
    #[cfg(test)]
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the database file can be read.
    pub fn check(&self) -> Result<(), DatabaseError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
            .map(|_| ())
            .map_err(sql_error(&self.path, "check the database"))
    }

    /// Writes every pending change in one transaction. On failure nothing
    /// of it is written and the pending changes are dropped: the caller
    /// tells the core they were not made durable.
    pub fn commit(&mut self) -> Result<Committed, DatabaseError> {
        if self.pending.is_empty() {
            return Ok(Committed::default());
        }
        let pending = std::mem::take(&mut self.pending);
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql_error(path, "begin a transaction"))?;
        for change in &pending {
            write_change(&tx, change).map_err(sql_error(path, "write a change"))?;
        }
        tx.commit().map_err(sql_error(path, "commit"))?;
        Ok(Committed {
            changes: pending.len(),
        })
    }

    /// Reads the lasting state: offline queues as their sizes only.
    pub fn load(&self) -> Result<Snapshot, DatabaseError> {
        let mut snapshot = Snapshot::default();
        let sizes = self.rows(
            "SELECT recipient, count(*), sum(size) FROM offline_message GROUP BY recipient",
            "count offline messages",
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
        )?;
        for (to, messages, bytes) in sizes {
            let size = QueueSize {
                messages: usize::try_from(messages).unwrap_or(0),
                bytes: usize::try_from(bytes).unwrap_or(0),
            };
            let to = self.name(to, "offline message recipient")?;
            snapshot.offline_sizes.insert(to, size);
        }
        let blocks = self.rows("SELECT blocker, target FROM block", "read blocks", |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        for (blocker, target) in blocks {
            let blocker = self.name(blocker, "blocker")?;
            let target = self.name(target, "blocked user")?;
            snapshot.blocks.entry(blocker).or_default().insert(target);
        }
        let seen = self.rows(
            "SELECT user, online, at FROM last_seen",
            "read last-seen times",
            |r| Ok((r.get(0)?, r.get::<_, bool>(1)?, r.get(2)?)),
        )?;
        for (user, online, at) in seen {
            let at = self.time(at, "last seen at")?;
            let seen = if online {
                LastSeen::Online { since: at }
            } else {
                LastSeen::Offline { at }
            };
            snapshot
                .last_seen
                .insert(self.name(user, "last-seen user")?, seen);
        }
        let lockouts = self.rows(
            "SELECT user, failures, locked_until, last_failure FROM lockout",
            "read lockouts",
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            },
        )?;
        for (user, failures, locked_until, last_failure) in lockouts {
            let state = LockoutState {
                failures,
                locked_until: self.optional_time(locked_until, "locked until")?,
                last_failure: self.optional_time(last_failure, "last failure")?,
            };
            snapshot
                .lockouts
                .insert(self.name(user, "lockout user")?, state);
        }
        Ok(snapshot)
    }

    /// `to`'s queued messages after `after_seq`, oldest first: up to
    /// `max_bytes` of text, but at least one message if any is left. Reads
    /// what is committed, so commit before asking.
    pub fn offline_page(
        &self,
        to: &Username,
        after_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<QueuedMessage>, DatabaseError> {
        let doing = "read offline messages";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, sender, text, sent_at, size FROM offline_message
                 WHERE recipient = ?1 AND seq > ?2 ORDER BY seq",
            )
            .map_err(sql_error(&self.path, doing))?;
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let mut rows = stmt
            .query(params![to.as_str(), after])
            .map_err(sql_error(&self.path, doing))?;
        let mut page = Vec::new();
        let mut bytes = 0;
        while let Some(row) = rows.next().map_err(sql_error(&self.path, doing))? {
            let fields = (|| {
                Ok::<_, rusqlite::Error>((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, i64>(4)?,
                ))
            })();
            let (seq, from, text, sent_at, size) = fields.map_err(sql_error(&self.path, doing))?;
            let size = usize::try_from(size).unwrap_or(0);
            if !page.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            let message = (|| {
                Ok::<_, DatabaseError>(QueuedMessage {
                    seq: u64::try_from(seq)
                        .map_err(|_| self.bad(format!("offline message seq {seq}")))?,
                    message: OfflineMessage {
                        from: self.name(from, "offline message sender")?,
                        text: text
                            .parse()
                            .map_err(|e| self.bad(format!("offline message text: {e}")))?,
                        sent_at: self.time(sent_at, "sent_at")?,
                    },
                })
            })();
            match message {
                Ok(message) => page.push(message),
                // One damaged row must not block the whole queue at every
                // login: it is said and passed over. (It still counts in
                // the queue's length, so it leaves with the first delivery
                // after it, and one message may then come twice: a damaged
                // database is past what the server can promise.)
                Err(e) => tracing::error!("{e} (offline message {seq} for {to}, skipped)"),
            }
        }
        Ok(page)
    }

    /// Every row of `query`, each taken apart by `row`.
    fn rows<T>(
        &self,
        query: &str,
        doing: &'static str,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, DatabaseError> {
        let mut stmt = self
            .conn
            .prepare(query)
            .map_err(sql_error(&self.path, doing))?;
        let rows = stmt
            .query_map([], row)
            .map_err(sql_error(&self.path, doing))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql_error(&self.path, doing))
    }

    /// A user name read from a row.
    fn name(&self, name: String, what: &str) -> Result<Username, DatabaseError> {
        name.parse()
            .map_err(|e| self.bad(format!("{what} {name:?}: {e}")))
    }

    /// A time read from a row, where there may be none.
    fn optional_time(
        &self,
        millis: Option<i64>,
        what: &str,
    ) -> Result<Option<Timestamp>, DatabaseError> {
        millis.map(|t| self.time(t, what)).transpose()
    }

    /// A time read from a row.
    fn time(&self, millis: i64, what: &str) -> Result<Timestamp, DatabaseError> {
        timestamp(millis).ok_or_else(|| self.bad(format!("{what} {millis}")))
    }

    fn bad(&self, what: String) -> DatabaseError {
        DatabaseError::BadRow {
            path: self.path.clone(),
            what,
        }
    }

    /// Sets the connection up; returns how many schema objects the file
    /// holds.
    fn configure(&mut self) -> Result<i64, DatabaseError> {
        let path = self.path.clone();
        let classify = move |source: rusqlite::Error| match source.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => DatabaseError::NotADatabase { path: path.clone() },
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                DatabaseError::Locked { path: path.clone() }
            }
            _ => DatabaseError::Sql {
                path: path.clone(),
                doing: "configure the database",
                source,
            },
        };
        // One server per file: an exclusive lock, taken by the first write
        // below and held while the connection is open.
        self.conn
            .pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(&classify)?;
        // Reading the schema is the first access: a file that is not SQLite
        // fails here.
        let objects: i64 = self
            .conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(&classify)?;
        // WAL: commits append to the log, readers never block. FULL: a
        // commit is on disk before the server answers, so acknowledged
        // state survives a power cut as well as a killed process.
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(&classify)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DatabaseError::Sql {
                path: self.path.clone(),
                doing: "switch to WAL mode",
                source: rusqlite::Error::InvalidQuery,
            });
        }
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(&classify)?;
        self.conn
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(&classify)?;
        Ok(objects)
    }

    fn check_and_migrate(&mut self, objects: i64) -> Result<(), DatabaseError> {
        let path = self.path.clone();
        let sql = |doing| sql_error(&path, doing);
        let app_id: i32 = self
            .conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(sql("read the application id"))?;
        let version: i32 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql("read the schema version"))?;
        let fresh = app_id == 0 && version == 0 && objects == 0;
        if !fresh && app_id != APPLICATION_ID {
            return Err(DatabaseError::Foreign {
                path: self.path.clone(),
                found: app_id,
            });
        }
        if version > SCHEMA_VERSION {
            return Err(DatabaseError::Newer {
                path: self.path.clone(),
                found: version,
            });
        }
        if !fresh {
            let report: String = self
                .conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(sql("check the database"))?;
            if report != "ok" {
                return Err(DatabaseError::Corrupt {
                    path: self.path.clone(),
                    report,
                });
            }
        }
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
            .map_err(sql("begin the schema migration"))?;
        for (from, migration) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            tx.execute_batch(migration).map_err(sql(match from {
                0 => "create the schema",
                _ => "migrate the schema",
            }))?;
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(sql("set the application id"))?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql("set the schema version"))?;
        tx.commit().map_err(sql("commit the schema"))?;
        Ok(())
    }

    /// Limits the file to `pages` pages, so tests can make commits fail as
    /// on a full disk.
    pub fn set_max_pages(&self, pages: u64) -> Result<(), DatabaseError> {
        let _: i64 = self
            .conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get(0)
            })
            .map_err(|source| DatabaseError::Sql {
                path: self.path.clone(),
                doing: "limit the database size",
                source,
            })?;
        Ok(())
    }
}

/// Applies one change inside `tx`, with cached statements.
fn write_change(tx: &Transaction<'_>, change: &Change) -> rusqlite::Result<()> {
    match change {
        Change::MessageQueued { to, message } => {
            tx.prepare_cached(
                "INSERT INTO offline_message (recipient, sender, text, sent_at, size) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                to.as_str(),
                message.from.as_str(),
                message.text.as_str(),
                millis(message.sent_at),
                i64::try_from(message.size()).unwrap_or(i64::MAX)
            ])?;
        }
        Change::OfflineDelivered { to, seqs } => {
            let mut delete =
                tx.prepare_cached("DELETE FROM offline_message WHERE recipient = ?1 AND seq = ?2")?;
            for &seq in seqs {
                delete.execute(params![to.as_str(), i64::try_from(seq).unwrap_or(i64::MAX)])?;
            }
        }
        Change::MessagesDelivered { to, count } => {
            tx.prepare_cached(
                "DELETE FROM offline_message WHERE seq IN
                     (SELECT seq FROM offline_message WHERE recipient = ?1 ORDER BY seq LIMIT ?2)",
            )?
            .execute(params![
                to.as_str(),
                i64::try_from(*count).unwrap_or(i64::MAX)
            ])?;
        }
        Change::Blocked { blocker, target } => {
            tx.prepare_cached("INSERT OR IGNORE INTO block (blocker, target) VALUES (?1, ?2)")?
                .execute(params![blocker.as_str(), target.as_str()])?;
        }
        Change::Unblocked { blocker, target } => {
            tx.prepare_cached("DELETE FROM block WHERE blocker = ?1 AND target = ?2")?
                .execute(params![blocker.as_str(), target.as_str()])?;
        }
        Change::LoggedIn { user, at } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO last_seen (user, online, at) VALUES (?1, 1, ?2)",
            )?
            .execute(params![user.as_str(), millis(*at)])?;
        }
        Change::LoggedOut { user, at } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO last_seen (user, online, at) VALUES (?1, 0, ?2)",
            )?
            .execute(params![user.as_str(), millis(*at)])?;
        }
        Change::LockoutChanged { user, state } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO lockout (user, failures, locked_until, last_failure) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                user.as_str(),
                state.failures,
                state.locked_until.map(millis),
                state.last_failure.map(millis)
            ])?;
        }
        Change::LockoutCleared { user } => {
            tx.prepare_cached("DELETE FROM lockout WHERE user = ?1")?
                .execute(params![user.as_str()])?;
        }
        Change::AccountRemoved { user } => {
            for sql in [
                "DELETE FROM offline_message WHERE recipient = ?1",
                "DELETE FROM block WHERE blocker = ?1 OR target = ?1",
                "DELETE FROM last_seen WHERE user = ?1",
                "DELETE FROM lockout WHERE user = ?1",
            ] {
                tx.prepare_cached(sql)?.execute(params![user.as_str()])?;
            }
        }
        // A change kind added to the core after this build: nothing here
        // knows how to keep it, and dropping it silently would break the
        // durability rule, so it fails the commit.
        _ => {
            return Err(rusqlite::Error::ToSqlConversionFailure(
                format!("unknown change {change:?}").into(),
            ))
        }
    }
    Ok(())
}

/// Turns a SQLite error into one that says which file and what was being
/// done.
fn sql_error<'a>(
    path: &'a Path,
    doing: &'static str,
) -> impl FnOnce(rusqlite::Error) -> DatabaseError + 'a {
    move |source| DatabaseError::Sql {
        path: path.to_owned(),
        doing,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> chatproto::Username {
        name.parse().unwrap()
    }

    fn message(from: &str, text: &str, at: u64) -> OfflineMessage {
        OfflineMessage {
            from: user(from),
            text: text.parse().unwrap(),
            sent_at: Timestamp::from_unix_millis(at),
        }
    }

    /// What `Snapshot::apply` makes of `changes`, with offline queues as
    /// the database loads them: sizes only.
    fn as_loaded(mut snapshot: Snapshot) -> Snapshot {
        for (to, queue) in std::mem::take(&mut snapshot.offline) {
            let size = QueueSize {
                messages: queue.len(),
                bytes: queue.iter().map(OfflineMessage::size).sum(),
            };
            snapshot.offline_sizes.insert(to, size);
        }
        snapshot
    }

    /// Every kind of change, committed and read back, gives the state
    /// `Snapshot::apply` defines; the texts come back a page at a time.
    #[test]
    fn what_is_committed_loads_back_as_the_same_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let changes = vec![
            Change::MessageQueued {
                to: user("bob"),
                message: message("alice", "one", 10),
            },
            Change::MessageQueued {
                to: user("bob"),
                message: message("carol", "two", 11),
            },
            Change::MessageQueued {
                to: user("bob"),
                message: message("alice", "three", 12),
            },
            Change::MessageQueued {
                to: user("dave"),
                message: message("alice", "for dave", 13),
            },
            Change::MessagesDelivered {
                to: user("bob"),
                count: 1,
            },
            Change::Blocked {
                blocker: user("alice"),
                target: user("carol"),
            },
            Change::Blocked {
                blocker: user("alice"),
                target: user("dave"),
            },
            Change::Unblocked {
                blocker: user("alice"),
                target: user("dave"),
            },
            Change::LoggedIn {
                user: user("alice"),
                at: Timestamp::from_unix_millis(5),
            },
            Change::LoggedIn {
                user: user("bob"),
                at: Timestamp::from_unix_millis(6),
            },
            Change::LoggedOut {
                user: user("bob"),
                at: Timestamp::from_unix_millis(7),
            },
            Change::LockoutChanged {
                user: user("carol"),
                state: LockoutState {
                    failures: 2,
                    locked_until: Some(Timestamp::from_unix_millis(99)),
                    last_failure: Some(Timestamp::from_unix_millis(98)),
                },
            },
            Change::LockoutChanged {
                user: user("dave"),
                state: LockoutState {
                    failures: 1,
                    locked_until: None,
                    last_failure: None,
                },
            },
            Change::LockoutCleared { user: user("dave") },
            // A removed account leaves nothing behind, in either direction.
            Change::MessageQueued {
                to: user("erin"),
                message: message("alice", "for erin", 14),
            },
            Change::Blocked {
                blocker: user("erin"),
                target: user("alice"),
            },
            Change::Blocked {
                blocker: user("bob"),
                target: user("erin"),
            },
            Change::LoggedOut {
                user: user("erin"),
                at: Timestamp::from_unix_millis(8),
            },
            Change::LockoutChanged {
                user: user("erin"),
                state: LockoutState {
                    failures: 1,
                    locked_until: None,
                    last_failure: Some(Timestamp::from_unix_millis(9)),
                },
            },
            Change::AccountRemoved { user: user("erin") },
        ];
        let mut expected = Snapshot::default();
        {
            let (mut db, empty) = SqliteDatabase::open(&path).unwrap();
            assert_eq!(empty, Snapshot::default());
            // In two commits, to cover changes spread over wake-ups.
            for (i, change) in changes.iter().enumerate() {
                expected.apply(change);
                db.record(change.clone());
                if i == 5 {
                    assert_eq!(db.commit().unwrap().changes, 6);
                }
            }
            assert!(db.has_pending());
            db.commit().unwrap();
            assert!(!db.has_pending());
            assert_eq!(db.load().unwrap(), as_loaded(expected.clone()));
        }
        let (db, loaded) = SqliteDatabase::open(&path).unwrap();
        assert_eq!(loaded, as_loaded(expected.clone()));
        assert_eq!(
            loaded.offline_sizes[&user("bob")],
            QueueSize {
                messages: 2,
                bytes: 8
            }
        );
        let texts = |page: Vec<QueuedMessage>| {
            page.into_iter()
                .map(|m| m.message)
                .collect::<Vec<OfflineMessage>>()
        };
        assert_eq!(
            texts(db.offline_page(&user("bob"), 0, 1000).unwrap()),
            expected.offline[&user("bob")]
        );
        // A page holds at least one message, and starts after `after_seq`.
        let first = db.offline_page(&user("bob"), 0, 1).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].message.text.as_str(), "two");
        let rest = db.offline_page(&user("bob"), first[0].seq, 1).unwrap();
        assert_eq!(rest[0].message.text.as_str(), "three");
        assert!(db
            .offline_page(&user("bob"), rest[0].seq, 1)
            .unwrap()
            .is_empty());
        assert!(db.offline_page(&user("nobody"), 0, 1).unwrap().is_empty());
    }

    #[test]
    fn a_version_1_database_is_migrated_with_its_queue_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute(
                "INSERT INTO offline_message (recipient, sender, text, sent_at) VALUES ('bob', 'alice', 'héllo', 5)",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "application_id", APPLICATION_ID)
                .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let (db, loaded) = SqliteDatabase::open(&path).unwrap();
        assert_eq!(
            loaded.offline_sizes[&user("bob")],
            QueueSize {
                messages: 1,
                bytes: 6
            },
            "bytes, not characters"
        );
        let page = db.offline_page(&user("bob"), 0, 10).unwrap();
        assert_eq!(page[0].message.text.as_str(), "héllo");
    }

    #[test]
    fn a_new_database_gets_the_current_schema_and_our_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        drop(SqliteDatabase::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let id: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap();
        let version: i32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!((id, version), (APPLICATION_ID, SCHEMA_VERSION));
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_failed_commit_writes_nothing_and_keeps_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let (mut db, _) = SqliteDatabase::open(&path).unwrap();
        db.record(Change::MessageQueued {
            to: user("bob"),
            message: message("alice", "kept", 1),
        });
        db.commit().unwrap();
        let pages: i64 = db
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        db.set_max_pages(pages as u64).unwrap();
        let long = "x".repeat(3000);
        for i in 0..20 {
            db.record(Change::MessageQueued {
                to: user("bob"),
                message: message("alice", &long, 2 + i),
            });
        }
        let err = db.commit().unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        assert!(!db.has_pending());
        let loaded = db.load().unwrap();
        assert_eq!(loaded.offline_sizes[&user("bob")].messages, 1);
        let page = db.offline_page(&user("bob"), 0, usize::MAX).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].message.text.as_str(), "kept");
    }
}
