//! `ServerConfig::track_commits`: when the driver's commit fails, the core
//! takes back everything since the last successful commit, answers it with
//! `unavailable`, and says again only what cannot be taken back.

mod common;

use chatproto::{ErrorCode, LastSeen, ServerFrame, Snapshot};
use common::{presences, secs, Sim};

/// A simulation whose driver commits; `committed` is what storage holds.
struct Durable {
    sim: Sim,
    committed: Snapshot,
}

impl Durable {
    fn new() -> Durable {
        let mut config = common::config();
        config.track_commits = true;
        let mut d = Durable {
            sim: Sim::with_config(config),
            committed: Snapshot::default(),
        };
        d.commit();
        d
    }

    /// The commit succeeds: the memory store's state is now durable.
    fn commit(&mut self) {
        self.committed = self.sim.server.store().snapshot().clone();
        self.sim.server.commit_succeeded();
    }

    /// The commit fails: the driver drops what it held for `conns` (here:
    /// the frames the simulation collected), and tells the core.
    fn fail(&mut self, conns: &[chatproto::ConnId]) {
        for &c in conns {
            self.sim.take(c);
        }
        self.sim.server.commit_failed(&self.committed, self.sim.now);
        self.sim.pump();
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
    d.commit();
    assert!(
        d.sim.ok(alice, "message bob hello").reply
            == chatproto::Reply::Message {
                to: "bob".parse().unwrap(),
                stored: true
            }
    );
    d.fail(&[alice]);
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
    d.commit();
    d.sim.send(alice, r#"{"id":7,"cmd":"block","user":"bob"}"#);
    d.sim.send(alice, r#"{"id":8,"cmd":"whoami"}"#);
    d.sim.send(alice, "whoelse");
    d.fail(&[alice]);
    assert_eq!(unavailable(&d.sim.take(alice)), [Some(7), Some(8), None]);
    d.commit();
    // The block did not happen.
    assert_eq!(d.sim.code(alice, "unblock bob"), ErrorCode::NotBlocked);
}

#[test]
fn a_login_not_recorded_did_not_happen() {
    let mut d = Durable::new();
    let alice = d.sim.login("alice");
    d.commit();
    let c = d.sim.connect();
    d.sim.send(c, "login bob pw-bob");
    d.fail(&[alice, c]);
    let frames = d.sim.take(c);
    // The hello went with the discarded output: it comes again, first.
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
    d.commit();
    let first = d.committed.offline["bob"][0].clone();

    let bob = d.sim.connect();
    d.sim.send(bob, "login bob pw-bob");
    d.fail(&[alice, bob]);
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
    d.commit();
    d.sim.advance(secs(5));
    let left_at = d.sim.now;
    d.sim.disconnect(carol);
    d.fail(&[alice]);
    // The first notice went with the discarded output; alice hears again.
    assert_eq!(presences(&d.sim.take(alice)), [("carol".to_owned(), false)]);
    assert_eq!(
        d.sim.server.store().snapshot().last_seen["carol"],
        LastSeen::Offline { at: left_at }
    );
    // A second failure records it again but does not announce it twice.
    d.fail(&[alice]);
    assert!(presences(&d.sim.take(alice)).is_empty());
    d.commit();
    assert_eq!(
        d.committed.last_seen["carol"],
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
    d.commit();
    for _ in 0..3 {
        d.sim.send(c, "login bob wrong");
    }
    d.sim.send(c, "login nobody x");
    d.sim.send(c, "login nobody x");
    d.fail(&[c]);
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
fn without_tracking_a_failed_commit_changes_nothing() {
    let mut sim = Sim::new();
    let alice = sim.login("alice");
    sim.ok(alice, "block bob");
    sim.server.commit_failed(&Snapshot::default(), sim.now);
    sim.pump();
    assert!(sim.take(alice).is_empty());
    assert_eq!(sim.code(alice, "block alice"), ErrorCode::SelfTarget);
    assert_eq!(sim.ok(alice, "unblock bob").text, "bob is unblocked");
}

#[test]
fn an_undone_login_is_under_the_login_timeout_again() {
    let mut config = common::config();
    config.track_commits = true;
    config.login_timeout = Some(secs(30));
    let mut d = Durable {
        sim: Sim::with_config(config),
        committed: Snapshot::default(),
    };
    let c = d.sim.connect();
    d.commit();
    d.sim.advance(secs(10));
    d.sim.send(c, "login alice pw-alice");
    // Past the login timeout: logged in, so only the idle timeout counts.
    d.sim.advance(secs(25));
    assert!(d.sim.closed.is_empty());
    d.fail(&[c]);
    d.commit();
    d.sim.advance(secs(1));
    assert_eq!(
        d.sim.closed.get(&c),
        Some(&chatproto::ByeReason::LoginTimeout)
    );
}

/// A delivery recorded in a failed batch is taken back: the messages are
/// queued again and handed to their recipient, still online, at once; and
/// a new message to them is not held behind a queue nobody drains.
#[test]
fn offline_messages_whose_delivery_was_not_recorded_come_again_to_an_online_user() {
    use chatproto::{MemoryStore, Output, PeerKey, Server, Timestamp};
    let mut config = common::config();
    config.track_commits = true;
    let now = Timestamp::from_unix_millis(common::T0);
    let mut server = Server::new(config, common::accounts(), MemoryStore::new(), now).unwrap();
    let frames_to = |server: &mut Server<MemoryStore>, conn| {
        let mut got = Vec::new();
        while let Some(output) = server.poll_output() {
            if let Output::Transmit { conn: c, frame } = output {
                if c == conn {
                    got.push(ServerFrame::decode(&frame).unwrap());
                }
            }
        }
        got
    };
    let alice = server.accept(PeerKey::UNSPECIFIED, [1; 16], now);
    server
        .handle_input(alice, b"login alice pw-alice\nmessage bob first\n", now)
        .unwrap();
    frames_to(&mut server, alice);
    server.commit_succeeded();
    // Bob logs in (committed); his queue is handed over, written, and its
    // delivery recorded in the next batch, whose commit fails.
    let bob = server.accept(PeerKey::UNSPECIFIED, [2; 16], now);
    server
        .handle_input(bob, b"login bob pw-bob\n", now)
        .unwrap();
    let got = frames_to(&mut server, bob);
    assert!(got
        .iter()
        .any(|f| matches!(f, ServerFrame::Message(m) if m.offline)));
    server.commit_succeeded();
    let committed = server.store().snapshot().clone();
    server.handle_drained(bob, 0, now).unwrap();
    assert_eq!(server.debug_state(now).queued_offline_messages, 0);
    server.commit_failed(&committed, now);
    let again = frames_to(&mut server, bob);
    assert!(
        again.iter().any(
            |f| matches!(f, ServerFrame::Message(m) if m.offline && m.text.as_str() == "first")
        ),
        "{again:?}"
    );
    server.commit_succeeded();
    server.handle_drained(bob, 0, now).unwrap();
    frames_to(&mut server, bob);
    server
        .handle_input(alice, b"message bob second\n", now)
        .unwrap();
    let got = frames_to(&mut server, bob);
    assert!(
        got.iter().any(
            |f| matches!(f, ServerFrame::Message(m) if !m.offline && m.text.as_str() == "second")
        ),
        "delivered at once: {got:?}"
    );
}
