//! Limits on logins that keep one client from denying or probing the
//! others: per-address and per-name login rates, per-address password
//! checks, one table for every name tried (no account enumeration), and
//! the cost of a wrong password in a mixed credentials file.

mod common;

use chatproto::{
    Accounts, Change, ErrorCode, HashedPassword, LockoutState, PeerKey, Rate, Server, ServerConfig,
    ServerFrame, Snapshot, Timestamp,
};
use common::{secs, Sim};

fn peer(n: u8) -> PeerKey {
    PeerKey::from_bytes([n; 16])
}

/// The error code and id of the last frame on `conn`.
fn last_error(sim: &mut Sim, conn: chatproto::ConnId) -> (ErrorCode, Option<u64>) {
    match sim.take(conn).pop() {
        Some(ServerFrame::Error(e)) => (e.code, e.id.map(|id| id.0)),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn logins_from_one_address_are_rate_limited_under_their_id() {
    let mut config = common::config();
    config.login_rate_per_peer = Some(Rate {
        burst: 3,
        per_second: 1,
    });
    let mut sim = Sim::with_config(config);
    let c = sim.connect_from(peer(1));
    for name in ["alice", "dave", "eve"] {
        assert_eq!(
            sim.code(c, &format!("login {name} wrong")),
            ErrorCode::InvalidCredentials
        );
    }
    sim.take(c);
    sim.send(
        c,
        r#"{"cmd":"login","user":"bob","password":"pw-bob","id":7}"#,
    );
    assert_eq!(last_error(&mut sim, c), (ErrorCode::RateLimited, Some(7)));
    // Another address is not held back; a second later this one goes on.
    let other = sim.connect_from(peer(2));
    sim.ok(other, "login bob pw-bob");
    sim.advance(secs(1));
    sim.ok(c, "login carol pw-carol");
}

#[test]
fn logins_for_one_name_are_rate_limited_account_or_not() {
    let mut config = common::config();
    config.login_rate_per_name = Some(Rate::LOGINS_PER_NAME);
    // Locks would answer first: they are not what this is about.
    config.lockout.max_failures = 100;
    let mut sim = Sim::with_config(config);
    for name in ["alice", "ghost"] {
        let c = sim.connect();
        for _ in 0..5 {
            assert_eq!(
                sim.code(c, &format!("login {name} wrong")),
                ErrorCode::InvalidCredentials
            );
        }
        assert_eq!(
            sim.code(c, &format!("login {name} wrong")),
            ErrorCode::RateLimited,
            "{name}"
        );
    }
    // A second restores one attempt.
    sim.advance(secs(1));
    let c = sim.connect();
    sim.ok(c, "login alice pw-alice");
}

#[test]
fn login_and_logout_cycles_are_bounded_by_the_per_name_rate() {
    let mut config = common::config();
    config.login_rate_per_name = Some(Rate::LOGINS_PER_NAME);
    let mut sim = Sim::with_config(config);
    let watcher = sim.login("bob");
    sim.take(watcher);
    let mut logged_in = 0;
    for _ in 0..50 {
        let c = sim.connect();
        sim.take(c);
        sim.send(c, "login alice pw-alice");
        if matches!(sim.take(c).first(), Some(ServerFrame::Ok(_))) {
            logged_in += 1;
            sim.send(c, "logout");
        }
    }
    // Within one instant: the burst, no more; so at most 2 presence
    // frames per cycle reach each online user.
    assert_eq!(logged_in, 5);
    assert_eq!(common::presences(&sim.take(watcher)).len(), 10);
}

/// Two failures for a name, then `filler` made-up names, then the third
/// failure: what it is answered, and whether the name is locked.
fn third_failure(name: &str, filler: usize, restart: bool) -> (ErrorCode, ErrorCode) {
    let mut config = common::config();
    config.lockout.max_tracked_names = 100_000;
    config.rate_limit = None;
    let mut sim = Sim::with_config(config.clone());
    let c = sim.connect();
    for _ in 0..2 {
        assert_eq!(
            sim.code(c, &format!("login {name} wrong")),
            ErrorCode::InvalidCredentials
        );
    }
    for i in 0..filler {
        sim.send(c, &format!("login made-up-{i} wrong"));
    }
    sim.take(c);
    if restart {
        let snapshot = sim.store.clone();
        sim = Sim::restarted(config, &snapshot, sim.now + secs(1));
    }
    let c = sim.connect();
    let third = sim.code(c, &format!("login {name} wrong"));
    let after = sim.code(c, &format!("login {name} wrong"));
    (third, after)
}

#[test]
fn a_real_name_and_a_made_up_one_answer_alike_after_a_flood_of_names() {
    for restart in [false, true] {
        let real = third_failure("alice", 10_000, restart);
        let made_up = third_failure("nobody", 10_000, restart);
        assert_eq!(
            real,
            (ErrorCode::AccountLocked, ErrorCode::AccountLocked),
            "restart {restart}"
        );
        assert_eq!(real, made_up, "restart {restart}");
    }
}

#[test]
fn made_up_names_are_stored_as_accounts_are() {
    let mut sim = Sim::new();
    let c = sim.connect();
    sim.send(c, "login nobody wrong");
    let snapshot = &sim.store;
    assert_eq!(snapshot.lockouts["nobody"].failures, 1);
    assert_eq!(snapshot.lockouts["nobody"].last_failure, Some(sim.now));
    // The count expires a lock duration after the last failure, and the
    // record goes with it.
    sim.advance(secs(60));
    assert!(sim.store.lockouts.is_empty());
}

#[test]
fn a_full_name_table_refuses_new_names_whatever_they_are() {
    let mut config = common::config();
    config.lockout.max_tracked_names = 3;
    let mut sim = Sim::with_config(config);
    let c = sim.connect();
    for name in ["x1", "x2", "alice"] {
        sim.send(c, &format!("login {name} wrong"));
    }
    sim.take(c);
    for name in ["bob", "x4"] {
        assert_eq!(
            sim.code(c, &format!("login {name} wrong")),
            ErrorCode::Unavailable,
            "{name}"
        );
    }
    // Names already in the table go on; room comes back as counts expire.
    assert_eq!(
        sim.code(c, "login alice wrong"),
        ErrorCode::InvalidCredentials
    );
    sim.advance(secs(60));
    sim.ok(c, "login bob pw-bob");
}

#[test]
fn an_old_record_without_a_last_failure_expires_a_lock_duration_after_loading() {
    let mut snapshot = Snapshot::default();
    snapshot.lockouts.insert(
        "nobody".parse().unwrap(),
        LockoutState {
            failures: 2,
            locked_until: None,
            last_failure: None,
        },
    );
    let mut sim = Sim::restarted(
        common::config(),
        &snapshot,
        Timestamp::from_unix_millis(common::T0),
    );
    let c = sim.connect();
    assert_eq!(sim.code(c, "login nobody x"), ErrorCode::AccountLocked);
}

/// alice hashed, carol plaintext: a mixed credentials file.
fn mixed() -> Accounts {
    let mut accounts = Accounts::new();
    let hash = HashedPassword::new("$test$pw-alice").unwrap();
    accounts
        .insert_hashed("alice".parse().unwrap(), hash)
        .unwrap();
    accounts
        .insert("carol".parse().unwrap(), "pw-carol".parse().unwrap())
        .unwrap();
    accounts
}

#[test]
fn in_a_mixed_file_a_wrong_plaintext_password_costs_a_hash_check() {
    let mut sim = Sim::with_accounts(common::config(), mixed());
    let c = sim.connect();
    sim.take(c);
    sim.send(c, "login carol wrong");
    assert!(sim.take(c).is_empty(), "answered before the check");
    assert_eq!(sim.verifications.len(), 1);
    assert_eq!(sim.verifications[0].1.as_str(), "$test$pw-alice");
    // Even a worker that says "matches" (the decoy's own password) does
    // not let the wrong password in.
    let (ticket, _, _) = sim.verifications.remove(0);
    sim.server.handle_verification(ticket, true, sim.now);
    sim.pump();
    assert!(matches!(
        sim.take(c).as_slice(),
        [ServerFrame::Error(e)] if e.code == ErrorCode::InvalidCredentials
    ));
    // The right password needs no check.
    sim.ok(c, "login carol pw-carol");
    assert!(sim.verifications.is_empty());
}

#[test]
fn a_plaintext_only_file_checks_in_place() {
    let mut sim = Sim::new();
    let c = sim.connect();
    assert_eq!(
        sim.code(c, "login carol wrong"),
        ErrorCode::InvalidCredentials
    );
    assert!(sim.verifications.is_empty());
}

#[test]
fn one_address_cannot_take_every_password_check() {
    let mut config = common::config();
    config.max_pending_checks = 64;
    config.max_pending_checks_per_peer = Some(8);
    let mut accounts = Accounts::new();
    for name in ["alice", "bob"] {
        let hash = HashedPassword::new(&format!("$test$pw-{name}")).unwrap();
        accounts.insert_hashed(name.parse().unwrap(), hash).unwrap();
    }
    let mut sim = Sim::with_accounts(config, accounts);
    let flood: Vec<_> = (0..64)
        .map(|i| {
            let c = sim.connect_from(peer(2));
            sim.send(c, &format!("login made-up-{i} x"));
            c
        })
        .collect();
    assert_eq!(sim.verifications.len(), 8, "8 checks pending for one peer");
    let refused = flood
        .iter()
        .filter(|&&c| {
            matches!(sim.take(c).last(), Some(ServerFrame::Error(e)) if e.code == ErrorCode::Unavailable)
        })
        .count();
    assert_eq!(refused, 56);
    // Another address still gets a check at once.
    let user = sim.connect_from(peer(1));
    sim.take(user);
    sim.send(user, "login alice pw-alice");
    assert_eq!(sim.verifications.len(), 9);
    sim.verify_all();
    assert!(matches!(sim.take(user).first(), Some(ServerFrame::Ok(_))));
}

#[test]
fn peer_keys_group_ipv6_by_64_and_see_through_mapped_ipv4() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(
        PeerKey::from_ip(ip("2001:db8::1")),
        PeerKey::from_ip(ip("2001:db8::ffff:1"))
    );
    assert_ne!(
        PeerKey::from_ip(ip("2001:db8:0:1::1")),
        PeerKey::from_ip(ip("2001:db8:0:2::1"))
    );
    assert_eq!(
        PeerKey::from_ip(ip("127.0.0.2")),
        PeerKey::from_ip(ip("::ffff:127.0.0.2"))
    );
    assert_eq!(
        PeerKey::from_ip(ip("2001:db8::1")).to_string(),
        "2001:db8::/64"
    );
}

#[test]
fn login_limits_out_of_range_are_config_errors() {
    let accounts = common::accounts;
    let now = Timestamp::from_unix_millis(0);
    let mut config = ServerConfig::default();
    config.login_rate_per_name = Some(Rate {
        burst: 0,
        per_second: 1,
    });
    assert!(Server::new(config, accounts(), now).is_err());
    let mut config = ServerConfig::default();
    config.max_pending_checks_per_peer = Some(0);
    assert!(Server::new(config, accounts(), now).is_err());
    let mut config = ServerConfig::default();
    config.lockout.max_tracked_names = 0;
    assert!(Server::new(config, accounts(), now).is_err());
}

#[test]
fn a_failed_login_for_any_name_is_journaled() {
    let (mut server, _) = Server::with_snapshot(
        common::config(),
        common::accounts(),
        &Snapshot::default(),
        Timestamp::from_unix_millis(common::T0),
    )
    .unwrap();
    let now = Timestamp::from_unix_millis(common::T0);
    let c = server.accept(PeerKey::UNSPECIFIED, [1; 16], now);
    server.handle_input(c, b"login nobody x\n", now).unwrap();
    let mut journal = Vec::new();
    common::drain_journal(&mut server, now, &mut journal);
    assert!(journal.iter().any(
        |change| matches!(change, Change::LockoutChanged { user, .. } if user.as_str() == "nobody")
    ));
}
