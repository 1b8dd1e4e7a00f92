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
