//! Accounts changed while the server runs (`Server::handle_account_change`,
//! as a credentials reload drives it): new accounts log in at once, new
//! passwords apply from the next login, and a removed account's session
//! ends and what the service kept for it is deleted, in memory and in
//! storage.

mod common;

use chatproto::{
    AccountChange, AccountChangeError, ByeReason, Credential, ErrorCode, HashedPassword, Reply,
    Username,
};
use common::{presences, secs, Sim};

fn name(n: &str) -> Username {
    n.parse().unwrap()
}

/// A new account with a plaintext password.
fn added(user: &str, password: &str) -> AccountChange {
    AccountChange::Added {
        name: name(user),
        credential: plain(password),
    }
}

fn removed(user: &str) -> AccountChange {
    AccountChange::Removed { name: name(user) }
}

fn plain(password: &str) -> Credential {
    Credential::Plain(password.parse().unwrap())
}

fn change(sim: &mut Sim, change: AccountChange) -> Result<(), AccountChangeError> {
    let result = sim.server.handle_account_change(change, sim.now);
    sim.pump();
    result
}

/// A server whose only account, alice, has the hashed password
/// `password` (test scheme), and a connection whose login with it waits
/// for its check.
fn checking_alice(password: &str) -> (Sim, chatproto::ConnId) {
    let mut accounts = chatproto::Accounts::new();
    let hash = HashedPassword::new(&format!("$test${password}")).unwrap();
    accounts.insert_hashed(name("alice"), hash).unwrap();
    let mut sim = Sim::with_accounts(common::config(), accounts);
    let c = sim.connect();
    sim.take(c);
    sim.send(c, &format!("login alice {password}"));
    assert_eq!(sim.verifications.len(), 1);
    (sim, c)
}

#[test]
fn a_new_account_logs_in_at_once_and_a_duplicate_is_refused() {
    let mut sim = Sim::new();
    let c = sim.connect();
    assert_eq!(
        sim.code(c, "login zoe pw-zoe"),
        ErrorCode::InvalidCredentials
    );
    change(&mut sim, added("zoe", "pw-zoe")).unwrap();
    let ok = sim.ok(c, "login zoe pw-zoe");
    assert_eq!(ok.reply, Reply::Login { user: name("zoe") });
    // Everyone's per-user state has room for her.
    let alice = sim.login("alice");
    sim.ok(alice, "block zoe");
    sim.ok(alice, "message zoe hello");
    assert_eq!(
        change(&mut sim, added("zoe", "other"),),
        Err(AccountChangeError::Exists(name("zoe")))
    );
    assert_eq!(
        change(
            &mut sim,
            AccountChange::CredentialChanged {
                name: name("nobody"),
                credential: plain("x"),
            },
        ),
        Err(AccountChangeError::Unknown(name("nobody")))
    );
    assert_eq!(
        change(&mut sim, removed("nobody")),
        Err(AccountChangeError::Unknown(name("nobody")))
    );
}

#[test]
fn a_new_password_applies_from_the_next_login() {
    let mut sim = Sim::new();
    let bob = sim.login("bob");
    change(
        &mut sim,
        AccountChange::CredentialChanged {
            name: name("bob"),
            credential: plain("new-pw"),
        },
    )
    .unwrap();
    // The open session stays open.
    let ok = sim.ok(bob, "whoami");
    assert!(matches!(ok.reply, Reply::Whoami { .. }));
    sim.ok(bob, "logout");
    let c = sim.connect();
    assert_eq!(
        sim.code(c, "login bob pw-bob"),
        ErrorCode::InvalidCredentials
    );
    sim.ok(c, "login bob new-pw");
}

#[test]
fn a_removed_account_is_logged_out_and_leaves_nothing_behind() {
    let mut sim = Sim::new();
    let alice = sim.login("alice");
    let bob = sim.login("bob");
    let carol = sim.login("carol");
    sim.ok(bob, "block carol");
    sim.ok(carol, "block bob");
    sim.ok(bob, "logout");
    sim.ok(alice, "message bob queued-for-bob");
    let bob = sim.login("bob");
    sim.take(alice);
    // Queued again, and a failed login on record.
    sim.ok(bob, "logout");
    sim.ok(alice, "message bob second");
    let c = sim.connect();
    assert_eq!(
        sim.code(c, "login bob wrong"),
        ErrorCode::InvalidCredentials
    );
    let bob = sim.login("bob");
    // Bob's queue was delivered at that login; queue one more after.
    sim.take(bob);
    sim.take(alice);
    sim.take(carol);
    assert!(sim.store.blocks.contains_key(&name("bob")));

    change(&mut sim, removed("bob")).unwrap();
    let frames = sim.take(bob);
    assert!(
        matches!(
            frames.last(),
            Some(chatproto::ServerFrame::Bye {
                reason: ByeReason::AccountRemoved
            })
        ),
        "{frames:?}"
    );
    assert_eq!(sim.closed.get(&bob), Some(&ByeReason::AccountRemoved));
    assert_eq!(presences(&sim.take(alice)), [("bob".to_owned(), false)]);
    // Storage was told, after the logout.
    assert!(!sim.store.blocks.contains_key(&name("bob")));
    assert!(sim.store.blocks.values().all(|t| !t.contains(&name("bob"))));
    assert!(!sim.store.last_seen.contains_key(&name("bob")));
    assert!(!sim.store.lockouts.contains_key(&name("bob")));
    assert!(!sim.store.offline.contains_key(&name("bob")));
    // And the service forgot him.
    assert_eq!(sim.code(alice, "message bob hi"), ErrorCode::UnknownUser);
    let ok = sim.ok(alice, "whoelsesince 3600");
    assert_eq!(
        ok.reply,
        Reply::Whoelsesince {
            users: vec![name("carol")]
        }
    );
    let c = sim.connect();
    assert_eq!(
        sim.code(c, "login bob pw-bob"),
        ErrorCode::InvalidCredentials
    );
    // Carol's block of bob went with him: she is free of it.
    assert_eq!(sim.code(carol, "unblock bob"), ErrorCode::UnknownUser);

    // The same name again is a new account, with nothing of the old one.
    change(&mut sim, added("bob", "pw-bob")).unwrap();
    let bob = sim.login("bob");
    let frames = sim.take(bob);
    assert!(
        frames
            .iter()
            .all(|f| !matches!(f, chatproto::ServerFrame::Message(_))),
        "an old queued message came back: {frames:?}"
    );
    // carol's old block of him is gone: his messages reach her.
    sim.take(carol);
    sim.ok(bob, "message carol hi");
    let frames = sim.take(carol);
    assert!(
        matches!(&frames[..], [chatproto::ServerFrame::Message(_)]),
        "{frames:?}"
    );
    let ok = sim.ok(bob, "whoami");
    assert!(matches!(ok.reply, Reply::Whoami { .. }));
}

#[test]
fn a_removed_account_deletes_its_offline_queue_and_lock() {
    let mut sim = Sim::new();
    let alice = sim.login("alice");
    sim.ok(alice, "message dave one");
    sim.ok(alice, "message dave two");
    assert_eq!(sim.store.offline[&name("dave")].len(), 2);
    let c = sim.connect();
    for _ in 0..3 {
        sim.code(c, "login dave wrong");
    }
    assert!(sim.store.lockouts.contains_key(&name("dave")));
    change(&mut sim, removed("dave")).unwrap();
    assert!(!sim.store.offline.contains_key(&name("dave")));
    assert!(!sim.store.lockouts.contains_key(&name("dave")));
    let debug = sim.server.debug_state(sim.now);
    assert_eq!(debug.queued_offline_messages, 0);
    assert_eq!(debug.locked_accounts, 0);
    // Re-added, the name is not locked.
    change(&mut sim, added("dave", "pw-dave")).unwrap();
    sim.advance(secs(1));
    sim.login("dave");
}

#[test]
fn a_login_being_checked_when_its_account_goes_fails() {
    let (mut sim, c) = checking_alice("pw-alice");
    change(&mut sim, removed("alice")).unwrap();
    sim.verify_all();
    let frames = sim.take(c);
    assert!(
        matches!(&frames[..], [chatproto::ServerFrame::Error(e)] if e.code == ErrorCode::InvalidCredentials),
        "{frames:?}"
    );
    assert!(sim.server.is_open(c));
    assert_eq!(sim.server.users_online(), 0);
}

/// The accounts of `common::USERS` but `skip`.
fn accounts_without(skip: &str) -> chatproto::Accounts {
    let mut accounts = chatproto::Accounts::new();
    for (user, password) in common::USERS {
        if user != skip {
            accounts
                .insert(name(user), password.parse().unwrap())
                .unwrap();
        }
    }
    accounts
}

/// bob's account left the file while the server was down (or the batch
/// of his removal never committed): storage still holds his state, which
/// the restart skips. A new account of the name starts with none of it.
#[test]
fn a_name_added_again_starts_with_nothing_stored() {
    let mut sim = Sim::new();
    let alice = sim.login("alice");
    let carol = sim.login("carol");
    sim.ok(carol, "block bob");
    sim.ok(alice, "message bob for-the-old-bob");
    let snapshot = sim.store.clone();
    let mut sim = Sim::restarted_with(
        common::config(),
        accounts_without("bob"),
        &snapshot,
        sim.now,
    );
    assert_eq!(sim.store.offline[&name("bob")].len(), 1, "kept, unused");
    change(&mut sim, added("bob", "pw-bob")).unwrap();
    assert!(!sim.store.offline.contains_key(&name("bob")));
    assert!(sim.store.blocks.values().all(|t| !t.contains(&name("bob"))));
    // The next restart, with bob in the file, finds nothing of the old one.
    let snapshot = sim.store.clone();
    let mut sim = Sim::restarted(common::config(), &snapshot, sim.now);
    let bob = sim.login("bob");
    let frames = sim.take(bob);
    assert!(
        frames
            .iter()
            .all(|f| !matches!(f, chatproto::ServerFrame::Message(_))),
        "{frames:?}"
    );
}

/// A login whose hashed password is being checked when the password
/// changes is refused: the old password (a leaked one, say) no longer
/// lets anyone in, even one check late.
#[test]
fn a_login_checked_across_a_password_change_is_refused() {
    let (mut sim, c) = checking_alice("old");
    change(
        &mut sim,
        AccountChange::CredentialChanged {
            name: name("alice"),
            credential: Credential::Hashed(HashedPassword::new("$test$new").unwrap()),
        },
    )
    .unwrap();
    sim.verify_all();
    let frames = sim.take(c);
    assert!(
        matches!(&frames[..], [chatproto::ServerFrame::Error(e)] if e.code == ErrorCode::InvalidCredentials),
        "{frames:?}"
    );
    // Not counted toward a lock: the attempt was not a wrong guess.
    assert!(!sim.store.lockouts.contains_key(&name("alice")));
    sim.send(c, "login alice new");
    sim.verify_all();
    assert!(sim.server.user(c).is_some());
}

/// A login checked across its account's removal leaves no failed-login
/// record behind the removal.
#[test]
fn a_login_checked_across_a_removal_leaves_no_record() {
    let (mut sim, c) = checking_alice("pw");
    change(&mut sim, removed("alice")).unwrap();
    // The connection went too, before the verdict.
    sim.disconnect(c);
    sim.verify_all();
    assert!(sim.store.lockouts.is_empty(), "{:?}", sim.store.lockouts);
}
