//! Hashed passwords: the core asks its driver to check them
//! (`Output::VerifyPassword`) and goes on with the verdict, keeping the
//! connection's answers in order and the lockout rules whole.

mod common;

use chatproto::{Accounts, ByeReason, Credential, ErrorCode, HashedPassword, Reply, ServerFrame};
use common::{presences, Sim};

/// alice and bob hashed (test scheme `$test$<password>`), carol plaintext.
fn accounts() -> Accounts {
    let mut accounts = Accounts::new();
    for name in ["alice", "bob"] {
        let hash = HashedPassword::new(&format!("$test$pw-{name}")).unwrap();
        accounts.insert_hashed(name.parse().unwrap(), hash).unwrap();
    }
    accounts
        .insert("carol".parse().unwrap(), "pw-carol".parse().unwrap())
        .unwrap();
    accounts
}

fn sim() -> Sim {
    Sim::with_accounts(common::config(), accounts())
}

#[test]
fn a_hashed_login_waits_for_the_verdict_and_later_frames_wait_behind_it() {
    let mut sim = sim();
    let carol = sim.login("carol");
    let c = sim.connect();
    sim.take(c);
    sim.send_bytes(c, b"login alice pw-alice\nwhoami\n");
    assert!(sim.take(c).is_empty(), "answered before the check");
    assert_eq!(sim.verifications.len(), 1);
    let (_, hash, password) = &sim.verifications[0];
    assert_eq!(hash.as_str(), "$test$pw-alice");
    assert_eq!(password.expose(), "pw-alice");
    // More input while waiting also waits.
    sim.send(c, "whoelse");
    assert!(sim.take(c).is_empty());
    sim.verify_all();
    let frames = sim.take(c);
    let replies: Vec<_> = frames
        .iter()
        .map(|f| match f {
            ServerFrame::Ok(ok) => ok.reply.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(matches!(replies[0], Reply::Login { .. }));
    assert!(matches!(replies[1], Reply::Whoami { .. }));
    assert!(matches!(replies[2], Reply::Whoelse { .. }));
    assert_eq!(presences(&sim.take(carol)), [("alice".to_owned(), true)]);
}

#[test]
fn wrong_hashed_passwords_count_toward_the_lock() {
    let mut sim = sim();
    let c = sim.connect();
    for expected in [
        ErrorCode::InvalidCredentials,
        ErrorCode::InvalidCredentials,
        ErrorCode::AccountLocked,
    ] {
        sim.take(c);
        sim.send(c, "login bob nope");
        sim.verify_all();
        match sim.take(c).as_slice() {
            [ServerFrame::Error(e)] => assert_eq!(e.code, expected),
            other => panic!("{other:?}"),
        }
    }
    // Locked: refused at once, the password is not even checked.
    assert_eq!(sim.code(c, "login bob pw-bob"), ErrorCode::AccountLocked);
    assert!(sim.verifications.is_empty());
}

#[test]
fn unknown_names_cost_a_hash_check_like_wrong_passwords() {
    let mut sim = sim();
    let c = sim.connect();
    sim.take(c);
    // Even the decoy's own password does not log an unknown name in.
    sim.send(c, "login nobody pw-alice");
    assert_eq!(sim.verifications.len(), 1, "no check: timing would differ");
    sim.verify_all();
    let unknown = sim.take(c);
    sim.send(c, "login alice wrong");
    sim.verify_all();
    let wrong = sim.take(c);
    match (unknown.as_slice(), wrong.as_slice()) {
        ([ServerFrame::Error(u)], [ServerFrame::Error(w)]) => {
            assert_eq!((u.code, &u.text), (w.code, &w.text));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failure_counts_even_if_the_connection_left_before_the_verdict() {
    let mut sim = sim();
    for _ in 0..3 {
        let c = sim.connect();
        sim.send(c, "login bob nope");
        sim.disconnect(c);
        sim.verify_all();
    }
    let c = sim.connect();
    assert_eq!(sim.code(c, "login bob pw-bob"), ErrorCode::AccountLocked);
}

#[test]
fn too_much_input_while_waiting_is_a_flood() {
    let mut sim = sim();
    let c = sim.connect();
    sim.send(c, "login alice pw-alice");
    let limit = common::config().max_frame_bytes * 4;
    let line = format!("help {}\n", "x".repeat(1000));
    let mut sent = 0;
    while sent <= limit {
        sim.send_bytes(c, line.as_bytes());
        sent += line.len();
    }
    assert_eq!(sim.closed.get(&c), Some(&ByeReason::Flood));
    // The late verdict finds the connection gone and changes nothing.
    sim.verify_all();
    assert!(sim.server.user(c).is_none());
}

#[test]
fn plaintext_accounts_need_no_check_and_credentials_say_how_they_are_kept() {
    let mut sim = sim();
    sim.login("carol");
    assert!(sim.verifications.is_empty());
    let accounts = accounts();
    assert_eq!(accounts.plaintext_count(), 1);
    let kinds: Vec<bool> = accounts
        .iter()
        .map(|a| matches!(a.credential(), Credential::Hashed(_)))
        .collect();
    assert_eq!(kinds, [true, true, false]);
    assert!(!accounts
        .iter()
        .next()
        .unwrap()
        .check_password(&"pw-alice".parse().unwrap()));
}

#[test]
fn a_slow_check_does_not_turn_a_right_password_into_a_login_timeout() {
    let mut config = common::config();
    config.login_timeout = Some(common::secs(30));
    let mut sim = Sim::with_accounts(config, accounts());
    let c = sim.connect();
    sim.advance(common::secs(29));
    sim.send(c, "login alice pw-alice");
    // The check takes longer than what was left of the login timeout.
    sim.advance(common::secs(5));
    assert!(
        sim.closed.is_empty(),
        "closed while its password was checked"
    );
    sim.verify_all();
    assert_eq!(sim.server.user(c).map(|u| u.as_str()), Some("alice"));
    // A wrong password after a slow check: the login timeout applies again.
    let d = sim.connect();
    sim.advance(common::secs(29));
    sim.send(d, "login bob wrong");
    sim.advance(common::secs(5));
    sim.verify_all();
    sim.advance(common::secs(0));
    assert_eq!(sim.closed.get(&d), Some(&ByeReason::LoginTimeout));
}

#[test]
fn logins_past_the_pending_check_limit_are_refused_unavailable() {
    let mut config = common::config();
    config.max_pending_checks = 2;
    let mut sim = Sim::with_accounts(config, accounts());
    let conns: Vec<_> = (0..3).map(|_| sim.connect()).collect();
    for &c in &conns {
        sim.take(c);
        sim.send(c, "login nobody x");
    }
    assert_eq!(sim.verifications.len(), 2);
    match sim.take(conns[2]).as_slice() {
        [ServerFrame::Error(e)] => assert_eq!(e.code, ErrorCode::Unavailable),
        other => panic!("{other:?}"),
    }
    sim.verify_all();
    // Room again.
    sim.send(conns[2], "login alice pw-alice");
    sim.verify_all();
    assert_eq!(sim.server.user(conns[2]).map(|u| u.as_str()), Some("alice"));
}
