//! `ServerConfig::durable`: when a batch fails, the core takes back that
//! batch and everything made since, answers the requests that depended on
//! them with `unavailable`, and records again only what cannot be taken
//! back.

mod common;

use chatproto::{BatchId, ErrorCode, LastSeen, Persisted, ServerFrame};
use common::{presences, secs, Sim};

/// A simulation whose storage answers batches when the test says.
struct Durable {
    sim: Sim,
}

impl Durable {
    fn new() -> Durable {
        Durable::with_sim(Sim::new())
    }

    fn with_sim(sim: Sim) -> Durable {
        Durable { sim }
    }

    /// Storage turns slow: batches wait for `commit` or `fail`.
    fn begin(&mut self) {
        self.sim.auto_commit = false;
    }

    /// Every waiting batch is committed, and from now on each as it comes.
    fn commit(&mut self) {
        while !self.sim.batches.is_empty() {
            self.sim.answer_batch(Persisted::Committed);
        }
        self.sim.auto_commit = true;
        self.sim.pump();
    }

    /// The batch in flight fails.
    fn fail(&mut self) {
        self.sim.answer_batch(Persisted::Failed);
    }
}

/// The ids of the `unavailable` errors among `frames`.
fn unavailable(frames: &[ServerFrame]) -> Vec<Option<u64>> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Error(e) if e.code == ErrorCode::Unavailable => Some(e.id.map(|id| id.0)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_queued_message_is_taken_back_and_refused_as_unavailable() {
    let mut d = Durable::new();
    let alice = d.sim.login("alice");
    d.begin();
    // Rule 15: the `ok` (stored) waits for the batch that stores it.
    assert!(d.sim.ask(alice, "message bob hello").is_empty());
    d.fail();
    let frames = d.sim.take(alice);
    assert_eq!(unavailable(&frames), [None], "{frames:?}");
    d.commit();
    let bob = d.sim.login("bob");
    let got = d.sim.take(bob);
    assert!(
        !got.iter().any(|f| matches!(f, ServerFrame::Message(_))),
        "a refused message was delivered: {got:?}"
    );
}

#[test]
fn every_answer_since_the_commit_is_refused_under_its_own_id() {
    let mut d = Durable::new();
    let alice = d.sim.login("alice");
    d.begin();
    d.sim.send(alice, r#"{"id":7,"cmd":"block","user":"bob"}"#);
    d.sim.send(alice, r#"{"id":8,"cmd":"whoami"}"#);
    d.sim.send(alice, "whoelse");
    d.fail();
    assert_eq!(unavailable(&d.sim.take(alice)), [Some(7), Some(8), None]);
    d.commit();
    // The block did not happen.
    assert_eq!(d.sim.code(alice, "unblock bob"), ErrorCode::NotBlocked);
}

#[test]
fn a_login_not_recorded_did_not_happen() {
    let mut d = Durable::new();
    let alice = d.sim.login("alice");
    d.begin();
    let c = d.sim.connect();
    d.sim.send(c, "login bob pw-bob");
    d.fail();
    let frames = d.sim.take(c);
    // The hello depends on nothing: it went out at once, first.
    assert!(matches!(frames[0], ServerFrame::Hello { .. }), "{frames:?}");
    assert_eq!(unavailable(&frames), [None]);
    // alice never hears of bob, and bob is not logged in.
    assert!(presences(&d.sim.take(alice)).is_empty());
    d.commit();
    assert_eq!(d.sim.code(c, "whoami"), ErrorCode::NotLoggedIn);
    assert_eq!(
        d.sim.ok(alice, "whoelse").reply,
        chatproto::Reply::Whoelse { users: vec![] }
    );
    // And can log in for real.
    d.sim.ok(c, "login bob pw-bob");
}

#[test]
fn offline_messages_handed_over_by_an_unrecorded_login_are_kept() {
    let mut d = Durable::new();
    let alice = d.sim.login("alice");
    d.sim.ok(alice, "message bob first");
    let first = d.sim.store.offline["bob"][0].clone();

    d.begin();
    let bob = d.sim.connect();
    d.sim.send(bob, "login bob pw-bob");
    d.fail();
    d.commit();
    let messages: Vec<_> = d
        .sim
        .ask(bob, "login bob pw-bob")
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Message(m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].text, first.text);
    assert_eq!(messages[0].sent_at, first.sent_at, "its original time");
    assert!(messages[0].offline);
}

#[test]
fn users_who_left_stay_gone_and_are_announced_and_recorded_again() {
    let mut d = Durable::new();
    let alice = d.sim.login("alice");
    let carol = d.sim.login("carol");
    d.sim.take(alice);
    d.begin();
    d.sim.advance(secs(5));
    let left_at = d.sim.now;
    d.sim.disconnect(carol);
    // Carol's session was durable: her leaving depends on nothing that can
    // be taken back, so alice hears of it at once.
    assert_eq!(presences(&d.sim.take(alice)), [("carol".to_owned(), false)]);
    d.fail();
    // The logout is recorded again in the next batch; a second failure
    // records it again but announces nothing twice.
    assert_eq!(d.sim.batches.len(), 1);
    d.fail();
    assert!(presences(&d.sim.take(alice)).is_empty());
    d.commit();
    assert_eq!(
        d.sim.store.last_seen["carol"],
        LastSeen::Offline { at: left_at }
    );
    let users = d.sim.ok(alice, "whoelsesince 60").reply;
    assert_eq!(
        users,
        chatproto::Reply::Whoelsesince {
            users: vec!["carol".parse().unwrap()]
        }
    );
}

#[test]
fn a_lock_not_recorded_did_not_happen_for_any_name() {
    let mut d = Durable::new();
    let c = d.sim.connect();
    d.begin();
    for _ in 0..3 {
        d.sim.send(c, "login bob wrong");
    }
    d.sim.send(c, "login nobody x");
    d.sim.send(c, "login nobody x");
    d.fail();
    assert_eq!(unavailable(&d.sim.take(c)), [None; 5]);
    d.commit();
    // Failure counts are lasting state for every name, account or not (so
    // that nothing tells them apart): the unrecorded ones did not happen.
    // Two more failures for the unknown name do not lock it; a third does.
    assert_eq!(
        d.sim.code(c, "login nobody x"),
        ErrorCode::InvalidCredentials
    );
    assert_eq!(
        d.sim.code(c, "login nobody x"),
        ErrorCode::InvalidCredentials
    );
    assert_eq!(d.sim.code(c, "login nobody x"), ErrorCode::AccountLocked);
    d.sim.ok(c, "login bob pw-bob");
}

#[test]
fn without_durability_a_failed_batch_changes_nothing() {
    let mut config = common::config();
    config.durable = false;
    let mut sim = Sim::with_config(config);
    let alice = sim.login("alice");
    sim.ok(alice, "block bob");
    assert!(!sim.server.persist_pending());
    sim.server
        .handle_persisted(BatchId::from_raw(1), Persisted::Failed, sim.now);
    sim.pump();
    assert!(sim.take(alice).is_empty());
    assert_eq!(sim.code(alice, "block alice"), ErrorCode::SelfTarget);
    assert_eq!(sim.ok(alice, "unblock bob").text, "bob is unblocked");
}

#[test]
fn an_undone_login_is_under_the_login_timeout_again() {
    let mut config = common::config();
    config.login_timeout = Some(secs(30));
    let mut d = Durable::with_sim(Sim::with_config(config));
    let c = d.sim.connect();
    d.begin();
    d.sim.advance(secs(10));
    d.sim.send(c, "login alice pw-alice");
    // Past the login timeout: logged in, so only the idle timeout counts.
    d.sim.advance(secs(25));
    assert!(d.sim.closed.is_empty());
    d.fail();
    d.commit();
    d.sim.advance(secs(1));
    assert_eq!(
        d.sim.closed.get(&c),
        Some(&chatproto::ByeReason::LoginTimeout)
    );
}

/// A delivery is a fact: written to the recipient's connection, it stays
/// delivered when the batch recording it fails. It is recorded again, not
/// handed over twice, and a new message to the recipient goes straight
/// through.
#[test]
fn a_delivery_in_a_failed_batch_is_recorded_again_not_handed_over_twice() {
    let mut d = Durable::new();
    let alice = d.sim.login("alice");
    d.sim.ok(alice, "message bob first");
    // Bob logs in (committed); his queue is handed over and written, and
    // its delivery recorded in the next batch, which fails.
    d.begin();
    let bob = d.sim.connect();
    d.sim.send(bob, "login bob pw-bob");
    d.sim.answer_batch(Persisted::Committed);
    let got = d.sim.take(bob);
    assert!(got
        .iter()
        .any(|f| matches!(f, ServerFrame::Message(m) if m.offline && m.text.as_str() == "first")));
    // Written (the simulation reports it): delivered, and recorded in the
    // batch now in flight.
    assert_eq!(
        d.sim.server.debug_state(d.sim.now).queued_offline_messages,
        0
    );
    assert_eq!(d.sim.batches.len(), 1);
    d.fail();
    d.commit();
    assert!(
        !d.sim
            .take(bob)
            .iter()
            .any(|f| matches!(f, ServerFrame::Message(_))),
        "handed over twice"
    );
    assert!(d.sim.store.offline.is_empty(), "the delivery is recorded");
    let ok = d.sim.ok(alice, "message bob second");
    assert_eq!(
        ok.reply,
        chatproto::Reply::Message {
            to: "bob".parse().unwrap(),
            stored: false
        }
    );
    assert!(d.sim.take(bob).iter().any(
        |f| matches!(f, ServerFrame::Message(m) if !m.offline && m.text.as_str() == "second")
    ));
}
