//! `Server::stats`: what the core counts for metrics agrees with what its
//! clients were answered.

mod common;

use chatproto::ErrorCode;
use common::Sim;

#[test]
fn the_counters_follow_a_scripted_session() {
    let mut config = common::config();
    config.offline_queue_capacity = 1;
    let mut sim = Sim::with_config(config);
    let alice = sim.login("alice");
    let bob = sim.login("bob");
    let carol = sim.login("carol");
    // Presence: bob's login told alice; carol's told alice and bob.
    assert_eq!(sim.server.stats().presence_frames, 3);

    let c = sim.connect();
    assert_eq!(
        sim.code(c, "login dave wrong"),
        ErrorCode::InvalidCredentials
    );
    assert_eq!(
        sim.code(c, "login alice pw-alice"),
        ErrorCode::SessionElsewhere
    );

    sim.ok(alice, "message bob hi");
    sim.ok(alice, "message dave stored");
    assert_eq!(sim.code(alice, "message dave full"), ErrorCode::MailboxFull);
    sim.ok(carol, "block alice");
    assert_eq!(sim.code(alice, "message carol hi"), ErrorCode::Blocked);
    sim.ok(alice, "broadcast hello");
    sim.ok(bob, "broadcast hello");
    assert_eq!(sim.code(bob, "nonsense"), ErrorCode::UnknownCommand);

    let stats = sim.server.stats();
    assert_eq!(stats.logins_ok, 3);
    assert_eq!(
        stats.login_refusals().collect::<Vec<_>>(),
        [
            (ErrorCode::SessionElsewhere, 1),
            (ErrorCode::InvalidCredentials, 1)
        ]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
    assert_eq!(stats.messages_delivered, 1);
    assert_eq!(stats.messages_stored, 1);
    assert_eq!(stats.error_count(ErrorCode::MailboxFull), 1);
    assert_eq!(stats.error_count(ErrorCode::Blocked), 1);
    assert_eq!(stats.error_count(ErrorCode::UnknownCommand), 1);
    assert_eq!(stats.error_count(ErrorCode::InvalidCredentials), 1);
    assert_eq!(stats.broadcasts, 2);
    // alice's reached bob, not carol (who blocked her); bob's reached both.
    assert_eq!(stats.broadcast_deliveries, 3);
    assert_eq!(stats.errors().map(|(_, n)| n).sum::<u64>(), 5);
    let _ = c;
}

/// An answer that waits for a batch counts once it goes out: as what it
/// was if the batch commits, as `unavailable` if it fails, and a frame
/// dropped with a failed batch not at all. The counters never go back.
#[test]
fn answers_held_for_a_batch_count_as_they_go_out() {
    let mut sim = Sim::new();
    let alice = sim.login("alice");
    let bob = sim.login("bob");
    sim.take(alice);
    let before = sim.server.stats().clone();
    sim.auto_commit = false;

    // Stored, then the batch fails: counted as unavailable only.
    sim.send(alice, "message dave one");
    assert_eq!(sim.server.stats(), &before, "counted before it went out");
    sim.answer_batch(chatproto::Persisted::Failed);
    let stats = sim.server.stats();
    assert_eq!(stats.messages_stored, before.messages_stored);
    assert_eq!(stats.error_count(ErrorCode::Unavailable), 1);

    // A login whose batch fails: a login refused `unavailable`, and its
    // presence frame to alice (dropped) not counted.
    sim.ok(bob, "logout");
    sim.answer_batch(chatproto::Persisted::Committed);
    let presence_before = sim.server.stats().presence_frames;
    let logins_before = sim.server.stats().logins_ok;
    let c = sim.connect();
    sim.send(c, "login bob pw-bob");
    sim.answer_batch(chatproto::Persisted::Failed);
    let stats = sim.server.stats();
    assert_eq!(stats.logins_ok, logins_before);
    assert_eq!(stats.presence_frames, presence_before);
    assert!(stats
        .login_refusals()
        .any(|(code, n)| code == ErrorCode::Unavailable && n == 1));

    // Stored, and the batch commits: counted then.
    sim.send(alice, "message dave two");
    let stored = sim.server.stats().messages_stored;
    sim.answer_batch(chatproto::Persisted::Committed);
    assert_eq!(sim.server.stats().messages_stored, stored + 1);
}
