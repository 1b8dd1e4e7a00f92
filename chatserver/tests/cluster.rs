//! Cluster mode end to end: several `chatserver` processes on one
//! PostgreSQL database (a fresh one per test, on `CHATSERVER_TEST_PG`) and
//! one NATS (`CHATSERVER_TEST_NATS` with a cluster name of the test's own,
//! or a private nats-server for the tests that stop it), clients on
//! different nodes. What is built so far: presence, `whoelse`, broadcast,
//! direct messages and blocks across nodes; a killed node's users going offline after its
//! lease, a stopped node's at once; a node frozen past its lease closing
//! its clients when it runs again; presence repaired after NATS restarts;
//! `/readyz` following NATS.

mod common;
#[path = "common/nats.rs"]
mod nats;
#[path = "common/postgres.rs"]
mod test_database;

use std::time::{Duration, Instant};

use common::{frame_kinds, http_exchange, run, Client, TestServer, CREDENTIALS};
use nats::PrivateNats;
use test_database::TestDatabase;

const LISTEN: &[&str] = &["--listen", "127.0.0.1:0"];

/// A cluster name no other test (or test run) uses: subjects of the
/// shared NATS server are not crossed.
fn cluster_name() -> String {
    nats::unique_prefix().replace('.', "-")
}

/// Starts `n` nodes of one cluster, each with `args` besides, and waits
/// until each has joined the bus (so nothing said at a login is missed:
/// a node that joins later learns it from the rosters anyway).
fn start_nodes(n: usize, db: &TestDatabase, nats_url: &str, args: &[&str]) -> Vec<TestServer> {
    let name = cluster_name();
    (0..n)
        .map(|i| start_node(&name, i, CREDENTIALS, db, nats_url, args))
        .collect()
}

/// Starts node `i` of cluster `name` with `credentials`.
fn start_node(
    name: &str,
    i: usize,
    credentials: &str,
    db: &TestDatabase,
    nats_url: &str,
    args: &[&str],
) -> TestServer {
    let node_name = format!("node-{i}");
    let mut all = vec![
        "--db",
        &db.url,
        "--nats",
        nats_url,
        "--cluster-name",
        name,
        "--node-name",
        &node_name,
        "--admin",
        "root",
        "--http",
        "127.0.0.1:0",
    ];
    all.extend_from_slice(args);
    let node = TestServer::start_with(credentials, LISTEN, &all);
    node.wait_for_log("connected to NATS");
    node
}

/// The next presence frame about `user` within `within`, skipping others.
fn presence_of(client: &mut Client, user: &str, within: Duration) -> Option<bool> {
    let until = Instant::now() + within;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        let frame = client.recv_within(left)?;
        if frame["type"] == "presence" && frame["user"] == user {
            return frame["online"].as_bool();
        }
    }
    None
}

/// Who `client` is told went offline, until no presence frame comes for
/// `quiet`.
fn offline_told(client: &mut Client, quiet: Duration) -> Vec<String> {
    let mut users = Vec::new();
    while let Some(frame) = client.recv_within(quiet) {
        if frame["type"] == "presence" && frame["online"] == false {
            users.push(frame["user"].as_str().unwrap().to_owned());
        }
    }
    users
}

/// `whoelse` as a sorted list of names.
fn whoelse(client: &mut Client) -> Vec<String> {
    let ok = client.ask("whoelse");
    let mut users: Vec<String> = ok["users"]
        .as_array()
        .unwrap_or_else(|| panic!("{ok}"))
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    users.sort();
    users
}

/// Asks `whoelse` until it is `want` (presence crosses the bus: a few
/// milliseconds on loopback), for at most 5 s.
fn whoelse_becomes(client: &mut Client, want: &[&str]) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let users = whoelse(client);
        if users == want {
            return;
        }
        assert!(Instant::now() < until, "whoelse is {users:?}, not {want:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Logs `user` in on `node`, trying again while the answer is
/// `session_elsewhere` (another node's lease has not run out yet), for at
/// most 5 s.
fn login_when_free(node: &TestServer, user: &str) -> Client {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let mut client = node.connect();
        let answer = client.ask(&format!("login {user} pw-{user}"));
        if answer["type"] == "ok" {
            return client;
        }
        assert_eq!(answer["code"], "session_elsewhere", "{answer}");
        assert!(Instant::now() < until, "{user} is still held elsewhere");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/readyz`'s status code, and the whole response.
fn readyz_status(node: &TestServer) -> (u16, String) {
    let response = readyz(node);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, response)
}

fn readyz(node: &TestServer) -> String {
    http_exchange(
        node.http_addr(),
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
}

#[test]
fn users_on_different_nodes_act_as_on_one_server() {
    let db = TestDatabase::create();
    let nodes = start_nodes(3, &db, &nats::shared_url(), &[]);
    let mut alice = nodes[0].login("alice");
    let mut bob = nodes[1].login("bob");
    assert_eq!(
        presence_of(&mut alice, "bob", Duration::from_secs(5)),
        Some(true)
    );
    let mut carol = nodes[2].login("carol");
    let mut dave = nodes[2].login("dave");
    whoelse_becomes(&mut alice, &["bob", "carol", "dave"]);
    whoelse_becomes(&mut bob, &["alice", "carol", "dave"]);

    // carol (node 2) blocks alice (node 0): the broadcast skips her, and
    // the counts are the cluster's.
    assert_eq!(carol.ask("block alice")["type"], "ok");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let ok = alice.ask("broadcast hello everyone");
        if ok["skipped"] == 1 {
            assert_eq!(ok["delivered"], 2, "{ok}");
            break;
        }
        assert!(
            Instant::now() < until,
            "the block never reached node 0: {ok}"
        );
    }
    for client in [&mut bob, &mut dave] {
        let frame = client.recv_type("broadcast");
        assert_eq!(frame["from"], "alice");
    }

    // debug server: this node's figures, and the cluster's.
    let mut root = nodes[1].login("root");
    let state = root.ask("debug server")["state"].clone();
    assert_eq!(state["cluster_node"], "node-1", "{state}");
    assert_eq!(state["cluster_nodes"], 3, "{state}");
    assert_eq!(state["users_online"], 2, "{state}");
    assert_eq!(state["cluster_users_online"], 5, "{state}");

    // bob leaves: alice, on another node, is told.
    bob.ask("logout");
    assert_eq!(
        presence_of(&mut alice, "bob", Duration::from_secs(5)),
        Some(false)
    );
    // (carol, who blocked alice, is not shown to her.)
    whoelse_becomes(&mut alice, &["dave", "root"]);
    assert!(readyz(&nodes[0]).starts_with("HTTP/1.1 200"));
}

#[test]
fn a_direct_message_to_another_node_is_delivered_at_once() {
    let db = TestDatabase::create();
    let nodes = start_nodes(2, &db, &nats::shared_url(), &[]);
    let mut alice = nodes[0].login("alice");
    let mut bob = nodes[1].login("bob");
    assert_eq!(
        presence_of(&mut alice, "bob", Duration::from_secs(5)),
        Some(true)
    );
    for i in 0..3 {
        let ok = alice.ask(&format!("message bob hello {i}"));
        assert_eq!(
            (ok["type"].as_str(), ok["stored"].as_bool()),
            (Some("ok"), Some(false)),
            "{ok}"
        );
        let frame = bob.recv_type("message");
        assert_eq!(
            (frame["from"].as_str(), frame["text"].as_str()),
            (Some("alice"), Some(format!("hello {i}").as_str()))
        );
        assert_eq!(frame["offline"], false);
    }
    // And back, the other way.
    assert_eq!(bob.ask("message alice hi")["stored"], false);
    assert_eq!(alice.recv_type("message")["text"], "hi");

    // bob's block holds, decided on his node.
    assert_eq!(bob.ask("block alice")["type"], "ok");
    let error = alice.ask("message bob still there?");
    assert_eq!(error["code"], "blocked", "{error}");
    assert_eq!(bob.ask("unblock alice")["type"], "ok");

    // bob leaves: the message is stored, and handed to him at his next
    // login on alice's node.
    bob.ask("logout");
    assert_eq!(
        presence_of(&mut alice, "bob", Duration::from_secs(5)),
        Some(false)
    );
    let ok = alice.ask("message bob later");
    assert_eq!(ok["stored"], true, "{ok}");
    let mut bob = nodes[0].login("bob");
    let frame = bob.recv_type("message");
    assert_eq!(
        (frame["text"].as_str(), frame["offline"].as_bool()),
        (Some("later"), Some(true))
    );
    // Stored by one node, delivered at a login on another: the queue is
    // in PostgreSQL, and the login's claim counts it.
    bob.ask("logout");
    for i in 0..3 {
        let ok = alice.ask(&format!("message bob queued {i}"));
        assert_eq!(ok["stored"], true, "{ok}");
    }
    let mut bob = nodes[1].connect();
    bob.login("bob");
    bob.send("whoami");
    let mut texts = Vec::new();
    loop {
        let frame = bob.recv();
        if frame["type"] == "ok" {
            break;
        }
        if frame["type"] == "message" {
            assert_eq!(frame["offline"], true, "{frame}");
            texts.push(frame["text"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(texts, ["queued 0", "queued 1", "queued 2"]);
    // Once: a login on the other node again gets none of them.
    bob.ask("logout");
    let mut bob = nodes[0].connect();
    bob.login("bob");
    assert_eq!(bob.ask("whoami")["type"], "ok");
    assert!(bob.recv_within(Duration::from_millis(300)).is_none());
}

#[test]
fn a_user_has_one_session_in_the_whole_cluster() {
    let db = TestDatabase::create();
    let nodes = start_nodes(3, &db, &nats::shared_url(), &["--node-lease-secs", "1"]);
    let mut alice = nodes[0].login("alice");
    for node in &nodes {
        let mut again = node.connect();
        let answer = again.ask("login alice pw-alice");
        assert_eq!(answer["code"], "session_elsewhere", "{answer}");
    }
    // Logins at once on two nodes: exactly one gets in, every round.
    for round in 0..5 {
        let (a, b) = (nodes[1].addr, nodes[2].addr);
        let racers: Vec<_> = [a, b]
            .into_iter()
            .map(|addr| {
                std::thread::spawn(move || {
                    let mut client = Client::connect(addr);
                    let answer = client.ask("login bob pw-bob");
                    (answer["type"] == "ok", client)
                })
            })
            .collect();
        let mut results: Vec<(bool, Client)> =
            racers.into_iter().map(|r| r.join().unwrap()).collect();
        let winners = results.iter().filter(|(ok, _)| *ok).count();
        assert_eq!(winners, 1, "round {round}");
        let (_, winner) = results.iter_mut().find(|(ok, _)| *ok).unwrap();
        assert_eq!(winner.ask("logout")["type"], "ok");
    }
    // Once alice logs out, another node takes her at once.
    assert_eq!(alice.ask("logout")["type"], "ok");
    let mut alice = login_when_free(&nodes[2], "alice");
    // Her node is killed: within its lease (1 s) she logs in elsewhere.
    nodes[2].signal("KILL");
    let killed = Instant::now();
    let _alice_again = login_when_free(&nodes[1], "alice");
    assert!(
        killed.elapsed() < Duration::from_secs(4),
        "{:?}",
        killed.elapsed()
    );
    assert!(alice.recv_to_end().len() < 100);
}

#[test]
fn postgres_going_away_and_coming_back_is_survived_by_every_node() {
    let db = TestDatabase::create();
    let nodes = start_nodes(2, &db, &nats::shared_url(), &[]);
    let mut alice = nodes[0].login("alice");
    let _bob = nodes[1].login("bob");
    assert_eq!(
        presence_of(&mut alice, "bob", Duration::from_secs(5)),
        Some(true)
    );
    // PostgreSQL goes away: its connections are ended, new ones refused.
    db.allow_connections(false);
    assert!(db.terminate_server_connections() >= 2);
    // Between online users, messages keep flowing: no database needed.
    let ok = alice.ask("message bob still here");
    assert_eq!(ok["stored"], false, "{ok}");
    // What needs it is answered `unavailable`: a login (its session
    // claim), a message to store.
    let answer = nodes[0].connect().ask("login carol pw-carol");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    let answer = alice.ask("message dave later");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    let (status, _) = readyz_status(&nodes[0]);
    assert_eq!(status, 503);
    // Back: every node finds it by itself, and logins work again.
    db.allow_connections(true);
    for node in &nodes {
        let until = Instant::now() + Duration::from_secs(10);
        while readyz_status(node).0 != 200 {
            assert!(
                Instant::now() < until,
                "not ready 10 s after PostgreSQL came back"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mut carol = nodes[1].login("carol");
    assert_eq!(alice.ask("message dave later")["stored"], true);
    assert_eq!(carol.ask("message bob welcome back")["stored"], false);
}

#[test]
fn wrong_passwords_on_three_nodes_lock_the_name_on_all() {
    let db = TestDatabase::create();
    let nodes = start_nodes(3, &db, &nats::shared_url(), &[]);
    for (i, node) in nodes.iter().enumerate() {
        let mut client = node.connect();
        let answer = client.ask("login dave wrong");
        let want = if i < 2 {
            "invalid_credentials"
        } else {
            "account_locked"
        };
        assert_eq!(answer["code"], want, "node {i}: {answer}");
        // The failure reaches the other nodes over the bus before the
        // next attempt (a few milliseconds on loopback).
        std::thread::sleep(Duration::from_millis(100));
    }
    for node in &nodes {
        let answer = node.connect().ask("login dave pw-dave");
        assert_eq!(answer["code"], "account_locked", "{answer}");
    }
}

#[test]
fn a_killed_nodes_users_go_offline_after_its_lease() {
    let db = TestDatabase::create();
    let nodes = start_nodes(2, &db, &nats::shared_url(), &["--node-lease-secs", "1"]);
    let mut alice = nodes[0].login("alice");
    let _bob = nodes[1].login("bob");
    assert_eq!(
        presence_of(&mut alice, "bob", Duration::from_secs(5)),
        Some(true)
    );
    nodes[1].signal("KILL");
    let killed = Instant::now();
    assert_eq!(
        presence_of(&mut alice, "bob", Duration::from_secs(5)),
        Some(false)
    );
    // A 1 s lease, heard from every 100 ms: gone within about a second.
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(whoelse(&mut alice), Vec::<String>::new());
    let since = alice.ask("whoelsesince 60");
    assert_eq!(since["users"], serde_json::json!(["bob"]), "{since}");
    nodes[0].wait_for_log("was not heard from for its lease");
}

#[test]
fn a_node_frozen_past_its_lease_closes_its_clients_when_it_runs_again() {
    let db = TestDatabase::create();
    let nodes = start_nodes(2, &db, &nats::shared_url(), &["--node-lease-secs", "1"]);
    let mut alice = nodes[0].login("alice");
    let mut bob = nodes[1].login("bob");
    assert_eq!(
        presence_of(&mut alice, "bob", Duration::from_secs(5)),
        Some(true)
    );
    nodes[1].signal("STOP");
    assert_eq!(
        presence_of(&mut alice, "bob", Duration::from_secs(5)),
        Some(false),
        "given up after its lease"
    );
    // bob's session was given up: he may log in on node 0 now (once the
    // database, too, has not heard from node 1 for a lease).
    let mut bob_again = login_when_free(&nodes[0], "bob");
    nodes[1].signal("CONT");
    let frames = bob.recv_to_end();
    assert_eq!(
        frame_kinds(&frames).last().map(String::as_str),
        Some("bye node_expired"),
        "{frames:?}"
    );
    nodes[1].wait_for_log("silent for longer than its lease");
    // Node 1 is back in the cluster, with nobody on it until a login.
    let mut carol = nodes[1].login("carol");
    assert_eq!(
        presence_of(&mut alice, "carol", Duration::from_secs(5)),
        Some(true)
    );
    whoelse_becomes(&mut carol, &["alice", "bob"]);
    whoelse_becomes(&mut bob_again, &["alice", "carol"]);
}

#[test]
fn a_stopped_nodes_users_go_offline_at_once() {
    let db = TestDatabase::create();
    // A long lease: what alice is told comes from the node's goodbye.
    let mut nodes = start_nodes(2, &db, &nats::shared_url(), &["--node-lease-secs", "60"]);
    let mut alice = nodes[0].login("alice");
    let mut bob = nodes[1].login("bob");
    let mut carol = nodes[1].login("carol");
    whoelse_becomes(&mut alice, &["bob", "carol"]);
    nodes[1].signal("TERM");
    // Its own clients get bye, and no presence of each other leaving.
    for client in [&mut bob, &mut carol] {
        let frames = client.recv_to_end();
        assert_eq!(
            frame_kinds(&frames).last().map(String::as_str),
            Some("bye server_shutdown"),
            "{frames:?}"
        );
        assert!(frames.iter().all(|f| f["online"] != false), "{frames:?}");
    }
    assert!(nodes[1].wait_exit().success());
    // alice hears of both at once, not a minute later.
    let mut told = offline_told(&mut alice, Duration::from_secs(3));
    told.sort();
    assert_eq!(told, ["bob", "carol"]);
    let state = nodes[0].login("root").ask("debug server")["state"].clone();
    assert_eq!(state["cluster_nodes"], 1, "forgotten at once: {state}");
}

#[test]
fn presence_missed_while_nats_was_down_is_repaired() {
    let db = TestDatabase::create();
    let mut bus = PrivateNats::start();
    let nodes = start_nodes(2, &db, &bus.url(), &["--node-lease-secs", "30"]);
    let mut alice = nodes[0].login("alice");
    let mut bob = nodes[1].login("bob");
    whoelse_becomes(&mut alice, &["bob"]);

    bus.kill();
    nodes[0].wait_for_log("lost the NATS connection");
    nodes[1].wait_for_log("lost the NATS connection");
    let down = readyz(&nodes[0]);
    assert!(down.starts_with("HTTP/1.1 503"), "{down}");
    assert!(
        down.ends_with("not ready: NATS cannot be reached\n"),
        "{down}"
    );
    // Each node goes on serving its own clients.
    bob.ask("logout");
    let mut carol = nodes[1].login("carol");
    assert_eq!(whoelse(&mut carol), ["alice"], "node 1 still has alice");
    assert_eq!(whoelse(&mut alice), ["bob"], "nobody could tell node 0");
    // carol is online on node 1, which node 0 cannot reach: stored.
    let ok = alice.ask("message carol while nats was away");
    assert_eq!(ok["stored"], true, "{ok}");

    bus.restart();
    // Once NATS is back, node 0 says it stored a message for carol, and
    // node 1 hands it over at once.
    let message = carol.recv_type("message");
    assert_eq!(
        (message["text"].as_str(), message["offline"].as_bool()),
        (Some("while nats was away"), Some(true)),
        "{message}"
    );
    assert_eq!(
        presence_of(&mut alice, "bob", Duration::from_secs(10)),
        Some(false)
    );
    whoelse_becomes(&mut alice, &["carol"]);
    whoelse_becomes(&mut carol, &["alice"]);
    let until = Instant::now() + Duration::from_secs(5);
    while !readyz(&nodes[0]).starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < until, "never ready again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_node_with_other_accounts_is_not_ready() {
    let db = TestDatabase::create();
    let name = cluster_name();
    let url = nats::shared_url();
    let nodes: Vec<TestServer> = [CREDENTIALS, CREDENTIALS, "alice another-password\n"]
        .iter()
        .enumerate()
        .map(|(i, credentials)| start_node(&name, i, credentials, &db, &url, &[]))
        .collect();
    let until = Instant::now() + Duration::from_secs(5);
    let odd = loop {
        let odd = readyz(&nodes[2]);
        if odd.starts_with("HTTP/1.1 503") || Instant::now() > until {
            break odd;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        odd.ends_with("not ready: this node serves other accounts than the cluster (compare the credentials files)\n"),
        "{odd}"
    );
    nodes[2].wait_for_log("a node serves other accounts than this one");
    nodes[0].wait_for_log("a node serves other accounts than this one");
    for node in &nodes[..2] {
        assert!(readyz(node).starts_with("HTTP/1.1 200"));
    }
}

#[test]
fn cluster_flags_are_checked() {
    let (code, err) = run(&["--nats", "nats://127.0.0.1:4222", "--no-db"]);
    assert_eq!(code, 2);
    assert!(err.contains("--nats needs a PostgreSQL --db"), "{err}");
    assert!(err.contains("not --no-db"), "{err}");
    let (code, err) = run(&["--nats", "nats://127.0.0.1:4222", "--db", "chat.db"]);
    assert_eq!(code, 2);
    assert!(err.contains("not --db chat.db"), "{err}");
    let (code, err) = run(&["--cluster-name", "a"]);
    assert_eq!(code, 2);
    assert!(err.contains("--nats <URL>"), "{err}");
    let (code, err) = run(&[
        "--nats",
        "nats://127.0.0.1:4222",
        "--db",
        "postgres://db/chat",
        "--cluster-name",
        "a.b",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("letters, digits"), "{err}");
    let (code, err) = run(&[
        "--nats",
        "http://chat:s3cret@host",
        "--db",
        "postgres://db/chat",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("use nats://"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}
