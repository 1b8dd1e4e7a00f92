//! A PostgreSQL database of the test's own, on the server that
//! `CHATSERVER_TEST_PG` names (a libpq connection string of a role allowed
//! to create databases). `.ci/test` starts a private server and sets it
//! when it is not set. The database is dropped when the test ends, however
//! it ends; nothing else on that server is touched.
// Each test binary that includes this uses only part of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use postgres::{Client, NoTls};

/// A database created for one test, dropped on drop.
#[derive(Debug)]
pub struct TestDatabase {
    admin: String,
    name: String,
    /// The connection string of this database, for `--db`.
    pub url: String,
}

impl TestDatabase {
    /// Creates a new, empty database.
    pub fn create() -> TestDatabase {
        let admin = std::env::var("CHATSERVER_TEST_PG").unwrap_or_else(|_| {
            panic!(
                "CHATSERVER_TEST_PG is not set: run the test suite with .ci/test (which starts a \
                 private PostgreSQL), or set it to a libpq connection string of a role that may \
                 create databases, e.g. 'host=127.0.0.1 user=postgres'"
            )
        });
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "chatserver_test_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        admin_client(&admin)
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e}"));
        let url = with_dbname(&admin, &name);
        TestDatabase { admin, name, url }
    }

    /// A client connected to this database.
    pub fn client(&self) -> Client {
        Client::connect(&self.url, NoTls).unwrap()
    }

    /// Ends every connection the server under test has to this database,
    /// as a PostgreSQL restart or an administrator would.
    pub fn terminate_server_connections(&self) -> usize {
        let rows = admin_client(&self.admin)
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = 'chatserver'",
                &[&self.name],
            )
            .unwrap();
        rows.len()
    }
}

impl TestDatabase {
    /// Lets new connections to this database in, or keeps them out (those
    /// open stay: see [`TestDatabase::terminate_server_connections`]), as
    /// a database that is down or in maintenance would.
    pub fn allow_connections(&self, allowed: bool) {
        admin_client(&self.admin)
            .batch_execute(&format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS {allowed}",
                self.name
            ))
            .unwrap();
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // FORCE ends the connections a killed server left behind.
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = admin_client(&self.admin).batch_execute(&drop) {
            eprintln!("cannot drop the test database {}: {e}", self.name);
        }
    }
}

fn admin_client(admin: &str) -> Client {
    Client::connect(admin, NoTls)
        .unwrap_or_else(|e| panic!("cannot connect to CHATSERVER_TEST_PG ({admin}): {e}"))
}

/// `conn` (URL or `key=value` form) with its database replaced by `name`.
fn with_dbname(conn: &str, name: &str) -> String {
    let lower = conn.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        let scheme_end = conn.find("://").unwrap() + 3;
        let (base, query) = match conn.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (conn, None),
        };
        let host_end = base[scheme_end..]
            .find('/')
            .map_or(base.len(), |i| scheme_end + i);
        let mut url = format!("{}/{name}", &base[..host_end]);
        if let Some(query) = query {
            url.push('?');
            url.push_str(query);
        }
        url
    } else {
        // A later keyword overrides an earlier one.
        format!("{conn} dbname={name}")
    }
}
