//! The database that makes the core's lasting state durable: a SQLite
//! file ([`sqlite`]) or a PostgreSQL database ([`postgres`]), chosen by
//! the `--db` value ([`Location`]).
//!
//! The core reports every change to lasting state as a
//! [`Change`](chatproto::Change); the storage thread hands the changes of
//! one batch to [`Database::record`] and writes them in one transaction
//! ([`Database::commit`]). At start-up [`Database::open`] reads the state
//! back as a [`Snapshot`]: everything but the texts of offline messages, of
//! which it reads only each queue's size. Texts are read a page at a time
//! when their recipient logs in ([`Database::offline_page`]).
//!
//! Both keep a schema version, bring an older schema up to date, and refuse
//! a newer one rather than touch it.

use std::fmt;
#[cfg(feature = "sqlite")]
use std::path::Path;
use std::path::PathBuf;

use chatproto::{Change, ClaimId, QueueSize, QueuedMessage, Snapshot, Timestamp, Username};

use crate::node::{Beat, ClusterNode};

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// Where lasting state is kept: the `--db` value, told apart by its form.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (created if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL database, as a libpq connection string: a URL
    /// (`postgres://…`, `postgresql://…`) or `key=value` pairs.
    Postgres(String),
}

impl Location {
    /// Reads a `--db` value: one starting with `postgres://` or
    /// `postgresql://`, or holding `dbname=` or `host=`, names a
    /// PostgreSQL database; anything else is a SQLite path.
    ///
    /// ```
    /// use chatserver::database::Location;
    /// assert!(matches!(Location::parse("postgres://db/chat"), Location::Postgres(_)));
    /// assert!(matches!(Location::parse("host=/run/pg dbname=chat"), Location::Postgres(_)));
    /// assert!(matches!(Location::parse("/var/lib/chat.db"), Location::Sqlite(_)));
    /// ```
    pub fn parse(value: &str) -> Location {
        let lower = value.trim_start().to_ascii_lowercase();
        if lower.starts_with("postgres://")
            || lower.starts_with("postgresql://")
            || lower.contains("dbname=")
            || lower.contains("host=")
        {
            Location::Postgres(value.to_owned())
        } else {
            Location::Sqlite(PathBuf::from(value))
        }
    }

    /// Whether this is a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Location::Postgres(_))
    }
}

/// Shows a SQLite path as it is, and a PostgreSQL connection string with
/// its password replaced by `***`: it goes to logs and error messages.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "{}", path.display()),
            Location::Postgres(conn) => f.write_str(&redact(conn)),
        }
    }
}

/// Like `Display`: never shows a password.
impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Location::Postgres(_) => f.debug_tuple("Postgres").field(&self.to_string()).finish(),
        }
    }
}

/// Why the database cannot be used. SQLite errors name the file; PostgreSQL
/// errors the connection string, without its password.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // The fields are what the messages say.
pub enum DatabaseError {
    /// SQLite cannot open the file.
    #[cfg(feature = "sqlite")]
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The file is not SQLite.
    #[error("{path} is not a SQLite database (or is encrypted or damaged)")]
    NotADatabase { path: PathBuf },
    /// The file is empty: truncated, or not ours.
    #[error("{path} is empty (0 bytes): a chatserver database never is, so it was truncated or is not ours; refusing to start on it, which would lose what it held (delete it to start a new database)")]
    Empty { path: PathBuf },
    /// The file is another application's SQLite database.
    #[error("{path} is a SQLite database of another application (application_id {found:#x}); refusing to touch it")]
    Foreign { path: PathBuf, found: i32 },
    /// The file's schema is newer than this build.
    #[error("{path} has schema version {found}, newer than this build understands ({SCHEMA_VERSION}); use a newer chatserver")]
    Newer { path: PathBuf, found: i32 },
    /// The file fails its integrity check.
    #[error("{path} is damaged: {report}")]
    Corrupt { path: PathBuf, report: String },
    /// Another process holds the file.
    #[error("{path} is in use by another process")]
    Locked { path: PathBuf },
    /// A SQLite statement failed.
    #[cfg(feature = "sqlite")]
    #[error("{path}: cannot {doing}: {source}")]
    Sql {
        path: PathBuf,
        doing: &'static str,
        source: rusqlite::Error,
    },
    /// A SQLite row holds what this build cannot read.
    #[error("{path}: {what}")]
    BadRow { path: PathBuf, what: String },
    /// A PostgreSQL request failed (or the connection for it).
    #[cfg(feature = "postgres")]
    #[error(
        "PostgreSQL {location}: cannot {doing}: {}",
        postgres::describe(source)
    )]
    Postgres {
        location: String,
        doing: &'static str,
        source: ::postgres::Error,
    },
    /// The PostgreSQL connection string does not parse.
    #[cfg(feature = "postgres")]
    #[error(
        "PostgreSQL {location}: bad connection string: {}",
        postgres::describe(source)
    )]
    PostgresConfig {
        location: String,
        source: ::postgres::Error,
    },
    /// The PostgreSQL schema is newer than this build.
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL {location} has chatserver schema version {found}, newer than this build understands ({SCHEMA_VERSION}); use a newer chatserver")]
    PostgresNewer { location: String, found: i32 },
    /// A PostgreSQL row holds what this build cannot read.
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL {location}: {what}")]
    PostgresBadRow { location: String, what: String },
    /// Cluster mode: the database gave this node up (silent past its
    /// lease, or a session of its was taken over); its heartbeat tells it.
    #[error("PostgreSQL {location}: this node was given up by the cluster (silent past its lease); it claims no session until its heartbeat has closed its clients")]
    NodeExpired { location: String },
    /// The commit of a group of jobs failed (the storage thread commits
    /// jobs queued together at once); each of them fails with it.
    #[error("{location}: the commit of {jobs} jobs together failed: {reason}")]
    GroupCommit {
        location: String,
        jobs: usize,
        reason: String,
    },
    /// What this build or this database cannot do.
    #[error("{location}: {what}")]
    Unsupported { location: String, what: String },
    /// The storage thread is gone.
    #[error("the storage thread stopped: nothing more can be written or read")]
    Stopped,
}

/// The schema version this build reads and writes (the same number for
/// both databases: one migration list each, kept in step).
pub const SCHEMA_VERSION: i32 = 4;

/// One job of a group commit ([`Database::run_group`]).
#[derive(Debug, Clone, Copy)]
pub enum GroupJob<'a> {
    /// A batch of changes ([`Database::commit`]).
    Persist(&'a [Change]),
    /// A session claim ([`Database::claim_session`]).
    Claim {
        /// Whose.
        user: &'a Username,
        /// Which claim.
        claim: ClaimId,
    },
    /// A session given back ([`Database::release_session`]).
    Release {
        /// Whose.
        user: &'a Username,
        /// Which claim.
        claim: ClaimId,
    },
}

/// What became of one job of a committed group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupOutcome {
    /// The batch is written.
    Persisted(Committed),
    /// The claim holds, with what the user's queue holds (`Some`), or a
    /// node that is alive holds the session (`None`).
    Claimed(Option<QueueSize>),
    /// The release is written.
    Released,
}

/// What a commit wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// How many changes.
    pub changes: usize,
}

/// An open database.
#[derive(Debug)]
pub enum Database {
    /// A SQLite file.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlite::SqliteDatabase),
    /// A PostgreSQL database (boxed: its configuration is large, and
    /// the value moves once, to the storage thread).
    #[cfg(feature = "postgres")]
    Postgres(Box<postgres::PostgresDatabase>),
}

impl Database {
    /// Opens (creating if needed) the database at `location`, brings its
    /// schema up to date, and reads the lasting state back.
    pub fn open(location: &Location) -> Result<(Database, Snapshot), DatabaseError> {
        match location {
            #[cfg(feature = "sqlite")]
            Location::Sqlite(path) => {
                sqlite::SqliteDatabase::open(path).map(|(db, s)| (Database::Sqlite(db), s))
            }
            #[cfg(feature = "postgres")]
            Location::Postgres(conn) => postgres::PostgresDatabase::open(conn)
                .map(|(db, s)| (Database::Postgres(Box::new(db)), s)),
            #[allow(unreachable_patterns)]
            other => Err(DatabaseError::Unsupported {
                location: other.to_string(),
                what: "this build has no support for this kind of database".to_owned(),
            }),
        }
    }

    /// Whether the database answers (for `/readyz`, while a failed
    /// commit or read says it may not).
    pub fn check(&mut self) -> Result<(), DatabaseError> {
        match self {
            #[cfg(feature = "sqlite")]
            Database::Sqlite(db) => db.check(),
            #[cfg(feature = "postgres")]
            Database::Postgres(db) => db.check(),
        }
    }

    /// Takes one change, to be written by the next [`Database::commit`].
    pub fn record(&mut self, change: Change) {
        match self {
            #[cfg(feature = "sqlite")]
            Database::Sqlite(db) => db.record(change),
            #[cfg(feature = "postgres")]
            Database::Postgres(db) => db.record(change),
        }
    }

    /// Writes every recorded change in one transaction. On failure nothing
    /// of it is written and the changes are dropped: the caller tells the
    /// core they were not made durable.
    pub fn commit(&mut self) -> Result<Committed, DatabaseError> {
        match self {
            #[cfg(feature = "sqlite")]
            Database::Sqlite(db) => db.commit(),
            #[cfg(feature = "postgres")]
            Database::Postgres(db) => db.commit(),
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
        match self {
            #[cfg(feature = "sqlite")]
            Database::Sqlite(db) => db.offline_page(to, after_seq, max_bytes),
            #[cfg(feature = "postgres")]
            Database::Postgres(db) => db.offline_page(to, after_seq, max_bytes),
        }
    }

    /// Cluster mode: makes `node` `user`'s one session under `claim`
    /// unless a node that is alive holds it; if it did, what the user's
    /// offline queue holds. PostgreSQL only.
    pub fn claim_session(
        &mut self,
        node: &ClusterNode,
        user: &Username,
        claim: ClaimId,
    ) -> Result<Option<QueueSize>, DatabaseError> {
        match self {
            #[cfg(feature = "sqlite")]
            Database::Sqlite(db) => {
                let _ = (node, user, claim);
                Err(cluster_needs_postgres(db.path()))
            }
            #[cfg(feature = "postgres")]
            Database::Postgres(db) => db.claim_session(node, user, claim),
        }
    }

    /// Cluster mode: runs `jobs` in one transaction with one commit, and
    /// says what became of each, in order; `None` if nothing was written
    /// and each should be run alone (which says which one failed, and
    /// why), and always with SQLite, whose commits the core already
    /// groups (cluster jobs are PostgreSQL's).
    pub fn run_group(
        &mut self,
        node: &ClusterNode,
        jobs: &[GroupJob<'_>],
    ) -> Option<Vec<Result<GroupOutcome, DatabaseError>>> {
        match self {
            #[cfg(feature = "sqlite")]
            Database::Sqlite(_) => {
                let _ = (node, jobs);
                None
            }
            #[cfg(feature = "postgres")]
            Database::Postgres(db) => db.run_group(node, jobs),
        }
    }

    /// Cluster mode: `node` gives back `user`'s session made by `claim`
    /// (removed only if it is still that one). PostgreSQL only.
    pub fn release_session(
        &mut self,
        node: &ClusterNode,
        user: &Username,
        claim: ClaimId,
    ) -> Result<(), DatabaseError> {
        match self {
            #[cfg(feature = "sqlite")]
            Database::Sqlite(db) => {
                let _ = (node, user, claim);
                Err(cluster_needs_postgres(db.path()))
            }
            #[cfg(feature = "postgres")]
            Database::Postgres(db) => db.release_session(node, user, claim),
        }
    }

    /// Cluster mode: `node` is alive; whether its sessions were taken
    /// over while it was silent. PostgreSQL only.
    pub fn node_heartbeat(&mut self, node: &ClusterNode) -> Result<Beat, DatabaseError> {
        match self {
            #[cfg(feature = "sqlite")]
            Database::Sqlite(db) => {
                let _ = node;
                Err(cluster_needs_postgres(db.path()))
            }
            #[cfg(feature = "postgres")]
            Database::Postgres(db) => db.node_heartbeat(node),
        }
    }

    /// Cluster mode: `node` leaves the cluster cleanly; its remaining
    /// sessions go with it. PostgreSQL only.
    pub fn leave_cluster(&mut self, node: &ClusterNode) -> Result<(), DatabaseError> {
        match self {
            #[cfg(feature = "sqlite")]
            Database::Sqlite(db) => {
                let _ = node;
                Err(cluster_needs_postgres(db.path()))
            }
            #[cfg(feature = "postgres")]
            Database::Postgres(db) => db.leave_cluster(node),
        }
    }

    /// Limits a SQLite file to `pages` pages, so tests can make commits
    /// fail as on a full disk (`--db-max-pages`).
    pub fn set_max_pages(&self, pages: u64) -> Result<(), DatabaseError> {
        match self {
            #[cfg(feature = "sqlite")]
            Database::Sqlite(db) => db.set_max_pages(pages),
            #[cfg(feature = "postgres")]
            Database::Postgres(db) => Err(DatabaseError::Unsupported {
                location: db.location().to_owned(),
                what: format!("a page limit ({pages}) applies to SQLite files only"),
            }),
        }
    }
}

/// The error for cluster mode on a SQLite file (which the command line
/// refuses before it comes to this).
#[cfg(feature = "sqlite")]
fn cluster_needs_postgres(path: &Path) -> DatabaseError {
    DatabaseError::Unsupported {
        location: path.display().to_string(),
        what: "cluster mode keeps its sessions in PostgreSQL, not SQLite".to_owned(),
    }
}

/// A time as both databases store it: Unix milliseconds in a 64-bit
/// signed integer.
fn millis(t: Timestamp) -> i64 {
    i64::try_from(t.as_unix_millis()).unwrap_or(i64::MAX)
}

/// A stored time back; `None` for one before 1970 (not ours).
fn timestamp(millis: i64) -> Option<Timestamp> {
    u64::try_from(millis).ok().map(Timestamp::from_unix_millis)
}

/// `conn` (a libpq connection string, URL or `key=value` form) with the
/// password replaced by `***`.
fn redact(conn: &str) -> String {
    let trimmed = conn.trim_start();
    let lower = trimmed.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        redact_url(trimmed)
    } else {
        redact_pairs(trimmed)
    }
}

/// `scheme://user:password@host/…?password=…`: both places.
fn redact_url(url: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (scheme, rest) = url.split_at(scheme_end);
    // The authority ends at the first '/' or '?' after the scheme; its
    // user information at its last '@'.
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{host}", &userinfo[..colon]),
                None => authority.to_owned(),
            }
        }
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}

/// `key=value key='quoted value'`: the value of `password`.
fn redact_pairs(conn: &str) -> String {
    let mut out = String::with_capacity(conn.len());
    let mut rest = conn;
    while let Some(eq) = rest.find('=') {
        let before = rest[..eq].trim_end();
        let key = &before[before.rfind(char::is_whitespace).map_or(0, |i| i + 1)..];
        out.push_str(&rest[..=eq]);
        let after = &rest[eq + 1..];
        let value_len = value_len(after);
        if key.eq_ignore_ascii_case("password") {
            out.push_str("***");
        } else {
            out.push_str(&after[..value_len]);
        }
        rest = &after[value_len..];
    }
    out.push_str(rest);
    out
}

/// The length of a `key=value` value at the start of `s`: quoted (with
/// `\` escapes) up to its closing quote, or up to whitespace.
fn value_len(s: &str) -> usize {
    let leading = s.len() - s.trim_start().len();
    let body = &s[leading..];
    if let Some(quoted) = body.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => return leading + 1 + i + 1,
                _ => {}
            }
        }
        s.len()
    } else {
        leading + body.find(char::is_whitespace).unwrap_or(body.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_of_the_value_tells_postgres_from_sqlite() {
        for pg in [
            "postgres://chat@db.example/chat",
            "postgresql://db/chat",
            "POSTGRES://db/chat",
            "host=/run/postgresql dbname=chat",
            "dbname=chat",
        ] {
            assert!(Location::parse(pg).is_postgres(), "{pg}");
        }
        for file in [
            "chatserver.db",
            "/var/lib/chat.db",
            ":memory:",
            "postgres.db",
        ] {
            assert_eq!(Location::parse(file), Location::Sqlite(file.into()));
        }
    }

    #[test]
    fn passwords_never_show() {
        let cases = [
            (
                "postgres://chat:s3cret@db:5432/chat",
                "postgres://chat:***@db:5432/chat",
            ),
            ("postgres://chat@db/chat", "postgres://chat@db/chat"),
            (
                "postgresql://u:p%40ss@h/db?sslmode=require&password=x",
                "postgresql://u:***@h/db?sslmode=require&password=***",
            ),
            (
                "postgres://u:pw@h?password=x",
                "postgres://u:***@h?password=***",
            ),
            (
                "host=db user=chat password=s3cret dbname=chat",
                "host=db user=chat password=*** dbname=chat",
            ),
            (
                "host=db password='it\\'s a s3cret' dbname=chat",
                "host=db password=*** dbname=chat",
            ),
            ("password = 'a b c' host=db", "password =*** host=db"),
            ("host=db PASSWORD=x", "host=db PASSWORD=***"),
        ];
        for (input, shown) in cases {
            let location = Location::parse(input);
            assert_eq!(location.to_string(), shown, "{input}");
            assert!(!format!("{location:?}").contains("s3cret"));
        }
    }
}
