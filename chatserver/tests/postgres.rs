//! `--db` with a PostgreSQL connection string: the same durability as with
//! SQLite (what the server acknowledged survives a restart, graceful or
//! `SIGKILL`), the schema created once however many servers start
//! together, a newer schema refused, a lost connection made again without
//! a restart, `/readyz` following the database down and back, and no
//! password in the log.
//!
//! Each test gets a database of its own on the server `CHATSERVER_TEST_PG`
//! names (`.ci/test` starts a private one).

mod common;
// Not in `common`: chatcli's tests include that too, without the
// PostgreSQL client.
#[path = "common/postgres.rs"]
mod test_database;

use std::path::Path;

use common::{http_exchange, run, TestServer, CREDENTIALS};
use test_database::TestDatabase;

const LISTEN: &[&str] = &["--listen", "127.0.0.1:0"];

fn start(dir: &Path, db: &TestDatabase) -> TestServer {
    TestServer::start_in(dir, CREDENTIALS, LISTEN, &["--db", &db.url])
}

/// bob's offline messages, read up to the `ok` of a `whoami` after login.
fn bobs_messages(server: &TestServer) -> Vec<String> {
    let mut bob = server.login("bob");
    bob.send("whoami");
    let mut texts = Vec::new();
    loop {
        let v = bob.recv();
        if v["type"] == "ok" && v["cmd"] == "whoami" {
            return texts;
        }
        if v["type"] == "message" {
            assert_eq!(v["offline"], true, "{v}");
            texts.push(v["text"].as_str().unwrap().to_owned());
        }
    }
}

fn restart_keeps_state(kill: bool) {
    let db = TestDatabase::create();
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &db);
    let mut alice = server.login("alice");
    for i in 0..5 {
        let ok = alice.ask(&format!("message bob note {i}"));
        assert_eq!(ok["stored"], true, "{ok}");
    }
    assert_eq!(alice.ask("block carol")["type"], "ok");
    // Two wrong passwords for dave: the count is kept.
    let mut c = server.connect();
    for _ in 0..2 {
        assert_eq!(c.ask("login dave wrong")["code"], "invalid_credentials");
    }
    if kill {
        server.signal("KILL");
    } else {
        server.signal("TERM");
    }
    server.wait_exit();

    let server = start(dir.path(), &db);
    assert_eq!(
        bobs_messages(&server),
        (0..5).map(|i| format!("note {i}")).collect::<Vec<_>>()
    );
    // The block survived: carol's message to alice is refused.
    let alice = server.login("alice");
    let mut carol = server.login("carol");
    assert_eq!(carol.ask("message alice hi")["code"], "blocked");
    // Delivered messages are gone from the database.
    let left: i64 = db
        .client()
        .query_one("SELECT count(*) FROM offline_message", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let failures: i32 = db
        .client()
        .query_one("SELECT failures FROM lockout WHERE username = 'dave'", &[])
        .unwrap()
        .get(0);
    assert_eq!(failures, 2);
    alice.shutdown();
}

#[test]
fn what_was_acknowledged_survives_a_clean_restart() {
    restart_keeps_state(false);
}

#[test]
fn what_was_acknowledged_survives_sigkill() {
    restart_keeps_state(true);
}

#[test]
fn servers_starting_together_create_the_schema_once() {
    let db = TestDatabase::create();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let starts: Vec<_> = dirs
        .iter()
        .map(|dir| {
            let path = dir.path().to_owned();
            let url = db.url.clone();
            std::thread::spawn(move || {
                TestServer::start_in(&path, CREDENTIALS, LISTEN, &["--db", &url])
            })
        })
        .collect();
    let servers: Vec<TestServer> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    let created = servers
        .iter()
        .flat_map(|s| s.log())
        .filter(|line| line.contains("schema created or updated"))
        .count();
    assert_eq!(created, 1, "exactly one server creates the schema");
    let version: i32 = db
        .client()
        .query_one("SELECT version FROM chatserver_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, chatserver::database::SCHEMA_VERSION);
}

#[test]
fn a_newer_schema_is_a_clear_start_up_error() {
    let db = TestDatabase::create();
    let dir = tempfile::tempdir().unwrap();
    drop(start(dir.path(), &db));
    db.client()
        .batch_execute("UPDATE chatserver_schema SET version = 99")
        .unwrap();
    let credentials = dir.path().join("credentials.txt");
    let (code, stderr) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--credentials",
        credentials.to_str().unwrap(),
        "--db",
        &db.url,
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("schema version 99, newer than this build understands"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_database_is_a_clear_start_up_error_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.txt");
    std::fs::write(&credentials, CREDENTIALS).unwrap();
    // Port 1 on loopback: nothing listens there.
    let (code, stderr) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--credentials",
        credentials.to_str().unwrap(),
        "--db",
        "postgres://chat:hunter2@127.0.0.1:1/chat?connect_timeout=2",
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("PostgreSQL postgres://chat:***@127.0.0.1:1/chat"),
        "{stderr}"
    );
    assert!(stderr.contains("cannot"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn a_lost_connection_is_made_again_and_nothing_acknowledged_is_lost() {
    let db = TestDatabase::create();
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &db);
    let mut alice = server.login("alice");
    assert_eq!(alice.ask("message bob before")["stored"], true);
    assert!(db.terminate_server_connections() >= 1);
    // The next batch finds the connection gone: it is answered
    // `unavailable` (rule 15) or, if the server saw the connection close
    // first, written on a new one. Either way the server serves on.
    let mut acknowledged = vec!["before".to_owned()];
    for i in 0..3 {
        let answer = alice.ask(&format!("message bob after {i}"));
        match answer["type"].as_str() {
            Some("ok") => acknowledged.push(format!("after {i}")),
            Some("error") => assert_eq!(answer["code"], "unavailable", "{answer}"),
            _ => panic!("{answer}"),
        }
    }
    // By now the connection was made again.
    assert_eq!(alice.ask("message bob last")["stored"], true);
    acknowledged.push("last".to_owned());
    server.wait_for_log("connected");
    assert!(
        server
            .log()
            .iter()
            .any(|l| l.contains("connection broke") || l.contains("cannot commit a batch")),
        "{:#?}",
        server.log()
    );
    server.signal("KILL");
    server.wait_exit();
    let server = start(dir.path(), &db);
    assert_eq!(bobs_messages(&server), acknowledged);
}

#[test]
fn the_password_of_the_database_never_reaches_the_log() {
    let db = TestDatabase::create();
    // The test server trusts every local connection: a password is
    // accepted and ignored, which is enough to see where it would show.
    let url = if db.url.contains("://") {
        db.url.replacen("://", "://postgres:hunter2@", 1)
    } else {
        format!("{} password=hunter2", db.url)
    };
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), CREDENTIALS, LISTEN, &["--db", &url]);
    let mut alice = server.login("alice");
    assert_eq!(alice.ask("message bob hi")["stored"], true);
    let mut root = server.login("root");
    let debug = root.ask("debug server");
    assert!(!debug.to_string().contains("hunter2"), "{debug}");
    let log = server.log().join("\n");
    assert!(log.contains("***"), "{log}");
    assert!(!log.contains("hunter2"), "{log}");
}

/// The status `/readyz` answers, and the response.
fn readyz(server: &TestServer) -> (u16, String) {
    let response = http_exchange(
        server.http_addr(),
        b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    (response[9..12].parse().unwrap(), response)
}

#[test]
fn readyz_follows_the_database_down_and_back() {
    let db = TestDatabase::create();
    let dir = tempfile::tempdir().unwrap();
    let http = ["--http", "127.0.0.1:0"];
    let server = TestServer::start_in(
        dir.path(),
        CREDENTIALS,
        LISTEN,
        &[&["--db", &db.url][..], &http].concat(),
    );
    assert_eq!(readyz(&server).0, 200);
    let healthz = http_exchange(
        server.http_addr(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(healthz.starts_with("HTTP/1.1 200 OK"), "{healthz}");

    let mut alice = server.login("alice");
    // The database goes away: new connections are refused, the open one
    // is ended. The next batch fails, so the server is not ready.
    db.allow_connections(false);
    assert!(db.terminate_server_connections() >= 1);
    let answer = alice.ask("message bob while down");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    let (status, response) = readyz(&server);
    assert_eq!(status, 503, "{response}");
    assert!(
        response.ends_with("not ready: the database cannot be reached\n"),
        "{response}"
    );
    // Alive all the same, and still answering what needs no database.
    let healthz = http_exchange(
        server.http_addr(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(healthz.starts_with("HTTP/1.1 200 OK"), "{healthz}");
    assert_eq!(alice.ask("whoami")["type"], "ok");

    // Back: the server notices by itself (it checks every second), with
    // no request needing the database meanwhile.
    db.allow_connections(true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while readyz(&server).0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready 10 s after the database came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    server.wait_for_log("the database answers again");
    assert_eq!(alice.ask("message bob when back")["stored"], true);
}

/// Cluster sessions in the database itself: one holder per user, taken
/// over only from a node silent past its lease (which its next heartbeat
/// learns), released only by the claim that made it, and of two claims
/// at once exactly one wins.
#[test]
fn cluster_sessions_have_one_holder() {
    use chatproto::ClaimId;
    use chatserver::database::{Database, Location};
    use chatserver::node::{Beat, ClusterNode};
    use std::time::Duration;

    let db = TestDatabase::create();
    let location = Location::parse(&db.url);
    let open = || Database::open(&location).unwrap().0;
    let node = |id: &str| cluster_node(id, Duration::from_millis(300));
    let (a, b, mut da, mut db_b) = two_nodes(&location, Duration::from_millis(300));
    let alice: chatproto::Username = "alice".parse().unwrap();
    let claim = ClaimId::from_raw;

    let claimed = |db: &mut Database, node: &ClusterNode, id: u64| {
        db.claim_session(node, &alice, claim(id)).unwrap().is_some()
    };
    // What alice's queue holds comes with her session.
    let message: chatproto::OfflineMessage = chatproto::OfflineMessage {
        from: "bob".parse().unwrap(),
        text: "hello".parse().unwrap(),
        sent_at: chatproto::Timestamp::from_unix_millis(1),
    };
    db_b.record(chatproto::Change::MessageQueued {
        to: alice.clone(),
        message,
    });
    db_b.commit().unwrap();
    let queued = da.claim_session(&a, &alice, claim(1)).unwrap();
    assert_eq!(
        queued,
        Some(chatproto::QueueSize {
            messages: 1,
            bytes: 5
        })
    );
    assert!(!claimed(&mut db_b, &b, 1));
    // Its own node takes it over (a release not yet written).
    assert!(claimed(&mut da, &a, 2));
    // A late release names the old claim: it removes nothing.
    da.release_session(&a, &alice, claim(1)).unwrap();
    assert!(!claimed(&mut db_b, &b, 7));

    // a goes silent past its lease: b takes alice over; a claims nothing
    // until its next heartbeat has said so, once.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(db_b.node_heartbeat(&b).unwrap(), Beat::Alive);
    assert!(claimed(&mut db_b, &b, 7));
    assert!(matches!(
        da.claim_session(&a, &"bob".parse().unwrap(), claim(4)),
        Err(chatserver::database::DatabaseError::NodeExpired { .. })
    ));
    match da.node_heartbeat(&a).unwrap() {
        Beat::Expired { silent_for } => assert!(silent_for >= Duration::from_millis(300)),
        other => panic!("{other:?}"),
    }
    assert_eq!(da.node_heartbeat(&a).unwrap(), Beat::Alive);
    // a's release of its old session leaves b's alone.
    da.release_session(&a, &alice, claim(2)).unwrap();
    assert!(!claimed(&mut da, &a, 3));
    db_b.release_session(&b, &alice, claim(7)).unwrap();
    assert!(claimed(&mut da, &a, 3));

    // Late heartbeats alone (a node under load) do not stop a node from
    // claiming: only a session taken from it does.
    let slow = ClusterNode {
        lease: Duration::from_millis(100),
        ..node("slow")
    };
    let mut ds = open();
    assert_eq!(ds.node_heartbeat(&slow).unwrap(), Beat::Alive);
    std::thread::sleep(Duration::from_millis(200));
    let carol: chatproto::Username = "carol".parse().unwrap();
    assert!(ds.claim_session(&slow, &carol, claim(1)).unwrap().is_some());
    assert_eq!(ds.node_heartbeat(&slow).unwrap(), Beat::Alive);

    // A node that leaves takes its sessions with it.
    da.leave_cluster(&a).unwrap();
    assert_eq!(db_b.node_heartbeat(&b).unwrap(), Beat::Alive);
    assert!(claimed(&mut db_b, &b, 8));

    // Claims at once from two connections of two live nodes: exactly one
    // wins each round.
    let live = |id: &str| ClusterNode {
        lease: Duration::from_secs(60),
        ..node(id)
    };
    let (a, b) = (live("c"), live("d"));
    assert_eq!(open().node_heartbeat(&a).unwrap(), Beat::Alive);
    assert_eq!(open().node_heartbeat(&b).unwrap(), Beat::Alive);
    for round in 0..20u64 {
        let user: chatproto::Username = format!("racer{round}").parse().unwrap();
        let racers: Vec<_> = [(a.clone(), open()), (b.clone(), open())]
            .into_iter()
            .map(|(node, mut conn)| {
                let user = user.clone();
                std::thread::spawn(move || {
                    conn.claim_session(&node, &user, claim(round))
                        .unwrap()
                        .is_some()
                })
            })
            .collect();
        let won: Vec<bool> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        assert_eq!(
            won.iter().filter(|w| **w).count(),
            1,
            "round {round}: {won:?}"
        );
    }
}

/// The storage thread's group commit: batches, claims and releases queued
/// together run in one transaction and answer as each would alone; two
/// groups of two live nodes claiming the same users in opposite orders
/// (which can deadlock) still give each user exactly one holder.
#[test]
fn a_group_of_jobs_answers_as_each_alone_would() {
    use chatproto::{Change, ClaimId, OfflineMessage, QueueSize, Timestamp, Username};
    use chatserver::database::{Database, DatabaseError, GroupJob, GroupOutcome, Location};
    use chatserver::node::{Beat, ClusterNode};
    use std::time::Duration;

    let db = TestDatabase::create();
    let location = Location::parse(&db.url);
    let open = || Database::open(&location).unwrap().0;
    let node = |id: &str| cluster_node(id, Duration::from_secs(60));
    let (a, b, mut da, mut db_b) = two_nodes(&location, Duration::from_secs(60));
    let name = |n: &str| -> Username { n.parse().unwrap() };
    let (alice, bob, carol) = (name("alice"), name("bob"), name("carol"));
    assert!(db_b
        .claim_session(&b, &carol, ClaimId::from_raw(1))
        .unwrap()
        .is_some());

    let batch = [Change::MessageQueued {
        to: bob.clone(),
        message: OfflineMessage {
            from: alice.clone(),
            text: "hi".parse().unwrap(),
            sent_at: Timestamp::from_unix_millis(1),
        },
    }];
    let jobs = [
        GroupJob::Claim {
            user: &alice,
            claim: ClaimId::from_raw(1),
        },
        // Sees the batch before it, in the same transaction.
        GroupJob::Persist(&batch),
        GroupJob::Claim {
            user: &bob,
            claim: ClaimId::from_raw(2),
        },
        // Held by b, alive.
        GroupJob::Claim {
            user: &carol,
            claim: ClaimId::from_raw(3),
        },
        GroupJob::Release {
            user: &alice,
            claim: ClaimId::from_raw(1),
        },
    ];
    let outcomes: Vec<GroupOutcome> = da
        .run_group(&a, &jobs)
        .expect("committed")
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        outcomes,
        [
            GroupOutcome::Claimed(Some(QueueSize::default())),
            GroupOutcome::Persisted(chatserver::database::Committed { changes: 1 }),
            GroupOutcome::Claimed(Some(QueueSize {
                messages: 1,
                bytes: 2
            })),
            GroupOutcome::Claimed(None),
            GroupOutcome::Released,
        ]
    );
    // Written: alice is free again, bob is a's.
    assert!(db_b
        .claim_session(&b, &alice, ClaimId::from_raw(5))
        .unwrap()
        .is_some());
    assert!(db_b
        .claim_session(&b, &bob, ClaimId::from_raw(6))
        .unwrap()
        .is_none());

    // A node given up: every claim of its group is refused, the rest of
    // the group is written.
    let mut dc = open();
    let c = ClusterNode {
        lease: Duration::from_millis(100),
        ..node("c")
    };
    assert_eq!(dc.node_heartbeat(&c).unwrap(), Beat::Alive);
    let dave = name("dave");
    assert!(dc
        .claim_session(&c, &dave, ClaimId::from_raw(1))
        .unwrap()
        .is_some());
    std::thread::sleep(Duration::from_millis(200));
    assert!(db_b
        .claim_session(&b, &dave, ClaimId::from_raw(7))
        .unwrap()
        .is_some());
    let answers = dc
        .run_group(
            &c,
            &[
                GroupJob::Claim {
                    user: &name("erin"),
                    claim: ClaimId::from_raw(2),
                },
                GroupJob::Persist(&batch),
            ],
        )
        .expect("committed");
    assert!(matches!(answers[0], Err(DatabaseError::NodeExpired { .. })));
    assert!(answers[1].is_ok());

    // Two live nodes claim the same users at once, in opposite orders.
    for round in 0..10u64 {
        let users: Vec<Username> = (0..4).map(|i| name(&format!("r{round}x{i}"))).collect();
        let racers: Vec<_> = [(a.clone(), open(), false), (b.clone(), open(), true)]
            .into_iter()
            .map(|(node, mut conn, reverse)| {
                let mut users = users.clone();
                if reverse {
                    users.reverse();
                }
                std::thread::spawn(move || {
                    let jobs: Vec<GroupJob<'_>> = users
                        .iter()
                        .map(|user| GroupJob::Claim {
                            user,
                            claim: ClaimId::from_raw(round),
                        })
                        .collect();
                    // Rolled back (a deadlock broken by PostgreSQL): each
                    // alone, as the storage thread does.
                    let won: Vec<bool> = match conn.run_group(&node, &jobs) {
                        Some(outcomes) => outcomes
                            .into_iter()
                            .map(|o| matches!(o, Ok(GroupOutcome::Claimed(Some(_)))))
                            .collect(),
                        None => users
                            .iter()
                            .map(|user| {
                                conn.claim_session(&node, user, ClaimId::from_raw(round))
                                    .unwrap()
                                    .is_some()
                            })
                            .collect(),
                    };
                    users.into_iter().zip(won).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut holders = std::collections::HashMap::new();
        for racer in racers {
            for (user, won) in racer.join().unwrap() {
                *holders.entry(user).or_insert(0) += usize::from(won);
            }
        }
        assert!(
            holders.values().all(|&n| n == 1),
            "round {round}: {holders:?}"
        );
    }
}

/// A cluster node named `id` (its name too) with `lease`.
fn cluster_node(id: &str, lease: std::time::Duration) -> chatserver::node::ClusterNode {
    chatserver::node::ClusterNode {
        id: id.to_owned(),
        name: id.to_owned(),
        lease,
    }
}

/// Nodes "a" and "b" with `lease`, each on a connection of its own to the
/// database at `location`, both registered by a first heartbeat.
fn two_nodes(
    location: &chatserver::database::Location,
    lease: std::time::Duration,
) -> (
    chatserver::node::ClusterNode,
    chatserver::node::ClusterNode,
    chatserver::database::Database,
    chatserver::database::Database,
) {
    use chatserver::database::Database;
    use chatserver::node::Beat;
    let (a, b) = (cluster_node("a", lease), cluster_node("b", lease));
    let (mut da, mut db) = (
        Database::open(location).unwrap().0,
        Database::open(location).unwrap().0,
    );
    assert_eq!(da.node_heartbeat(&a).unwrap(), Beat::Alive);
    assert_eq!(db.node_heartbeat(&b).unwrap(), Beat::Alive);
    (a, b, da, db)
}

/// A removed account's rows go, in every table and in both directions of
/// a block; everyone else's stay.
#[test]
fn a_removed_account_leaves_nothing_behind() {
    use chatproto::{Change, LockoutState, OfflineMessage, Timestamp, Username};
    use chatserver::database::{Database, Location};

    let db = TestDatabase::create();
    let location = Location::parse(&db.url);
    let name = |n: &str| -> Username { n.parse().unwrap() };
    let (alice, bob, erin) = (name("alice"), name("bob"), name("erin"));
    let message = |text: &str| OfflineMessage {
        from: alice.clone(),
        text: text.parse().unwrap(),
        sent_at: Timestamp::from_unix_millis(1),
    };
    let (mut database, _) = Database::open(&location).unwrap();
    for change in [
        Change::MessageQueued {
            to: erin.clone(),
            message: message("for-erin"),
        },
        Change::MessageQueued {
            to: bob.clone(),
            message: message("for-bob"),
        },
        Change::Blocked {
            blocker: erin.clone(),
            target: alice.clone(),
        },
        Change::Blocked {
            blocker: bob.clone(),
            target: erin.clone(),
        },
        Change::Blocked {
            blocker: bob.clone(),
            target: alice.clone(),
        },
        Change::LoggedOut {
            user: erin.clone(),
            at: Timestamp::from_unix_millis(2),
        },
        Change::LoggedOut {
            user: bob.clone(),
            at: Timestamp::from_unix_millis(3),
        },
        Change::LockoutChanged {
            user: erin.clone(),
            state: LockoutState {
                failures: 1,
                locked_until: None,
                last_failure: Some(Timestamp::from_unix_millis(4)),
            },
        },
    ] {
        database.record(change);
    }
    database.commit().unwrap();
    database.record(Change::AccountRemoved { user: erin.clone() });
    database.commit().unwrap();
    drop(database);

    let (_, loaded) = Database::open(&location).unwrap();
    assert!(!loaded.offline_sizes.contains_key(&erin));
    assert_eq!(loaded.offline_sizes[&bob].messages, 1);
    assert_eq!(
        loaded.blocks.keys().collect::<Vec<_>>(),
        [&bob],
        "{loaded:?}"
    );
    assert_eq!(loaded.blocks[&bob].iter().collect::<Vec<_>>(), [&alice]);
    assert!(!loaded.last_seen.contains_key(&erin));
    assert!(loaded.last_seen.contains_key(&bob));
    assert!(loaded.lockouts.is_empty());
}
