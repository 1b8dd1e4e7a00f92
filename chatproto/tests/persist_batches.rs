//! Durability as ordered output (`ServerConfig::durable`): changes leave in
//! `Output::Persist` batches, one in flight at a time; an output waits
//! while a batch that changed state it reads is unanswered, and nothing
//! else waits; a failed batch is undone, with every later one, newest
//! first, from what the core recorded (PROTOCOL.md rule 15).

mod common;

use chatproto::{ByeReason, ErrorCode, Persisted, Reply, ServerFrame};
use common::{presences, Sim};

/// A simulation whose storage answers only when the test says.
fn slow_storage() -> (Sim, chatproto::ConnId, chatproto::ConnId) {
    let mut sim = Sim::new();
    let alice = sim.login("alice");
    let dave = sim.login("dave");
    sim.take(alice);
    sim.auto_commit = false;
    (sim, alice, dave)
}

fn codes(frames: &[ServerFrame]) -> Vec<ErrorCode> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Error(e) => Some(e.code),
            _ => None,
        })
        .collect()
}

#[test]
fn one_batch_is_in_flight_and_changes_made_meanwhile_form_the_next() {
    let (mut sim, alice, _) = slow_storage();
    sim.send(alice, "message bob one");
    assert_eq!(sim.batches.len(), 1, "the first change leaves at once");
    sim.send(alice, "message carol two");
    sim.send(alice, "message eve three");
    assert_eq!(sim.batches.len(), 1, "the next waits for the answer");
    assert!(sim.take(alice).is_empty(), "both answers wait");
    sim.answer_batch(Persisted::Committed);
    // The first answer is out; the other two changes came as one batch.
    assert_eq!(sim.take(alice).len(), 1);
    assert_eq!(sim.batches.len(), 1);
    assert_eq!(sim.batches[0].1.len(), 2);
    sim.answer_batch(Persisted::Committed);
    assert_eq!(sim.take(alice).len(), 2);
    assert!(!sim.server.persist_pending());
}

#[test]
fn output_that_reads_nothing_unanswered_goes_out_at_once() {
    let (mut sim, alice, dave) = slow_storage();
    let eve = sim.connect();
    sim.send(alice, "message bob stored");
    // Dave and eve share nothing with the batch: not held.
    assert!(matches!(sim.ask(dave, "whoami")[..], [ServerFrame::Ok(_)]));
    assert!(matches!(sim.ask(eve, "help")[..], [ServerFrame::Ok(_)]));
    assert!(matches!(
        sim.ask(dave, "message alice hi")[..],
        [ServerFrame::Ok(_)]
    ));
    // Alice's own later answer waits behind her first: answers keep their
    // order. The message from dave waits with them.
    assert!(sim.ask(alice, "help").is_empty());
    sim.answer_batch(Persisted::Committed);
    let frames = sim.take(alice);
    assert!(
        matches!(
            &frames[..],
            [ServerFrame::Ok(a), ServerFrame::Message(_), ServerFrame::Ok(b)]
                if matches!(a.reply, Reply::Message { stored: true, .. }) && matches!(b.reply, Reply::Help { .. })
        ),
        "{frames:?}"
    );
}

#[test]
fn a_message_waits_for_its_recipients_login_and_is_refused_if_it_fails() {
    let (mut sim, alice, _) = slow_storage();
    let bob = sim.connect();
    sim.take(bob);
    sim.send(bob, "login bob pw-bob");
    assert!(sim.take(bob).is_empty(), "the login waits for its batch");
    assert!(sim.ask(alice, "message bob hi").is_empty());
    sim.answer_batch(Persisted::Failed);
    // Bob's login did not happen; alice's message was not delivered.
    assert_eq!(codes(&sim.take(bob)), [ErrorCode::Unavailable]);
    assert_eq!(codes(&sim.take(alice)), [ErrorCode::Unavailable]);
    sim.auto_commit = true;
    assert_eq!(sim.code(bob, "whoami"), ErrorCode::NotLoggedIn);
}

#[test]
fn broadcast_whoelse_and_whoelsesince_wait_for_the_set_of_users_online() {
    let (mut sim, alice, dave) = slow_storage();
    let bob = sim.connect();
    sim.send(bob, "login bob pw-bob");
    assert!(sim.ask(dave, "whoelse").is_empty());
    assert!(sim.ask(dave, "whoelsesince 60").is_empty());
    assert!(sim.ask(dave, "broadcast hello").is_empty());
    assert!(sim.take(alice).is_empty(), "no presence, no broadcast yet");
    sim.answer_batch(Persisted::Committed);
    let frames = sim.take(dave);
    let lists: Vec<_> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Ok(ok) => match &ok.reply {
                Reply::Whoelse { users } | Reply::Whoelsesince { users } => {
                    Some(common::names(users).join(","))
                }
                Reply::Broadcast { delivered, .. } => Some(format!("broadcast {delivered}")),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(lists, ["alice,bob", "alice,bob", "broadcast 2"]);
    assert_eq!(presences(&sim.take(alice)), [("bob".to_owned(), true)]);
}

#[test]
fn an_answer_that_read_a_block_not_yet_durable_waits_for_it() {
    let (mut sim, alice, dave) = slow_storage();
    sim.send(dave, "block alice");
    // Refused because of the block: that refusal depends on it.
    assert!(sim.ask(alice, "message dave hi").is_empty());
    sim.answer_batch(Persisted::Failed);
    // The block did not happen: so the refusal did not either.
    assert_eq!(codes(&sim.take(dave)), [ErrorCode::Unavailable]);
    assert_eq!(codes(&sim.take(alice)), [ErrorCode::Unavailable]);
    sim.auto_commit = true;
    assert!(matches!(
        sim.ask(alice, "message dave hi")[..],
        [ServerFrame::Ok(_)]
    ));
}

#[test]
fn a_login_refusal_waits_for_the_failure_count_it_read() {
    let (mut sim, _, _) = slow_storage();
    let c = sim.connect();
    let d = sim.connect();
    sim.take(c);
    sim.take(d);
    sim.send(c, "login nobody x");
    assert!(
        sim.take(c).is_empty(),
        "the failure count is not durable yet"
    );
    // Another connection trying the same name reads that count.
    assert!(sim.ask(d, "login nobody y").is_empty());
    sim.answer_batch(Persisted::Committed);
    assert_eq!(codes(&sim.take(c)), [ErrorCode::InvalidCredentials]);
    sim.answer_batch(Persisted::Committed);
    assert_eq!(codes(&sim.take(d)), [ErrorCode::InvalidCredentials]);
}

#[test]
fn a_failed_batch_and_every_later_one_are_undone_newest_first() {
    let (mut sim, alice, _) = slow_storage();
    sim.ok_later(alice, "block bob");
    sim.ok_later(alice, "unblock bob");
    sim.ok_later(alice, "message carol queued");
    assert_eq!(sim.batches.len(), 1, "block in flight, the rest open");
    sim.answer_batch(Persisted::Failed);
    assert_eq!(codes(&sim.take(alice)), [ErrorCode::Unavailable; 3]);
    sim.auto_commit = true;
    // Undone newest first: the unblock, then the block. Oldest first would
    // have left bob blocked.
    assert_eq!(sim.code(alice, "unblock bob"), ErrorCode::NotBlocked);
    let carol = sim.login("carol");
    assert!(!sim
        .take(carol)
        .iter()
        .any(|f| matches!(f, ServerFrame::Message(_))));
    // Nothing was reloaded: the same undo left storage as it was.
    assert!(sim.store.blocks.is_empty() && sim.store.offline.is_empty());
}

#[test]
fn a_bye_and_close_in_the_same_wake_up_as_a_failed_batch_still_go_out() {
    let (mut sim, alice, _) = slow_storage();
    // One read: a message to store, then logout, closing the connection.
    sim.send_bytes(alice, b"message bob stored?\nlogout\n");
    assert!(sim.take(alice).is_empty(), "all behind the stored message");
    assert!(sim.closed.is_empty());
    sim.answer_batch(Persisted::Failed);
    let frames = sim.take(alice);
    assert_eq!(codes(&frames), [ErrorCode::Unavailable]);
    assert!(
        matches!(
            &frames[..],
            [
                ServerFrame::Error(_),
                ServerFrame::Ok(ok),
                ServerFrame::Bye { reason: ByeReason::Logout }
            ] if matches!(ok.reply, Reply::Logout)
        ),
        "{frames:?}"
    );
    assert_eq!(sim.closed.get(&alice), Some(&ByeReason::Logout));
    // Alice's logout is a fact: recorded, whatever became of the batch.
    sim.auto_commit = true;
    sim.answer_batch(Persisted::Committed);
    assert!(matches!(
        sim.store.last_seen["alice"],
        chatproto::LastSeen::Offline { .. }
    ));
}

#[test]
fn a_logins_answer_waits_for_its_first_offline_page_and_goes_out_with_it() {
    let (mut sim, alice, _) = slow_storage();
    sim.auto_commit = true;
    sim.ok(alice, "message bob queued");
    sim.auto_commit = false;
    let bob = sim.connect();
    sim.take(bob);
    sim.send(bob, "login bob pw-bob");
    // Input after the login waits for the first page, as it would for a
    // password check: its answer comes after the queue.
    sim.send(bob, "whoami");
    assert!(sim.take(bob).is_empty());
    sim.answer_batch(Persisted::Committed);
    let frames = sim.take(bob);
    assert!(
        matches!(
            &frames[..],
            [ServerFrame::Ok(login), ServerFrame::Message(m), ServerFrame::Ok(who)]
                if matches!(login.reply, Reply::Login { .. })
                    && m.offline
                    && matches!(who.reply, Reply::Whoami { .. })
        ),
        "{frames:?}"
    );
}

#[test]
fn a_committed_login_waiting_for_its_first_page_is_not_refused_by_a_later_failed_batch() {
    let (mut sim, alice, _) = slow_storage();
    sim.auto_commit = true;
    sim.ok(alice, "message bob queued");
    sim.auto_commit = false;
    let bob = sim.connect();
    sim.take(bob);
    sim.send(bob, "login bob pw-bob");
    assert_eq!(sim.batches.len(), 1, "the login is in flight");
    // While the login is written, a message joins bob's queue: the next
    // batch, and bob's first page waits for it.
    assert!(sim.ask(alice, "message bob more").is_empty());
    sim.answer_batch(Persisted::Committed);
    assert!(sim.take(bob).is_empty(), "the page waits for the queue");
    // The second batch fails: the login is durable, only the message is
    // undone.
    sim.answer_batch(Persisted::Failed);
    assert_eq!(codes(&sim.take(alice)), [ErrorCode::Unavailable]);
    let frames = sim.take(bob);
    assert!(
        matches!(
            &frames[..],
            [ServerFrame::Ok(login), ServerFrame::Message(m)]
                if matches!(login.reply, Reply::Login { .. }) && m.offline
        ),
        "{frames:?}"
    );
    sim.auto_commit = true;
    assert!(matches!(sim.ask(bob, "whoami")[..], [ServerFrame::Ok(_)]));
}

#[test]
fn a_first_page_held_behind_a_notice_is_delivered_once_when_the_connection_closes_first() {
    let (mut sim, alice, _) = slow_storage();
    sim.auto_commit = true;
    sim.ok(alice, "message bob queued");
    sim.auto_commit = false;
    let bob = sim.connect();
    sim.take(bob);
    sim.send(bob, "login bob pw-bob");
    // While bob's login is written, carol logs in: her presence notice to
    // bob waits for the next batch, behind bob's login answer.
    let carol = sim.connect();
    sim.send(carol, "login carol pw-carol");
    sim.answer_batch(Persisted::Committed);
    // Bob's first page is handed over behind carol's notice; the login
    // answer goes out. Bob logs out before the notice is released.
    let frames = sim.take(bob);
    assert!(
        matches!(&frames[..], [ServerFrame::Ok(ok)] if matches!(ok.reply, Reply::Login { .. })),
        "{frames:?}"
    );
    sim.send(bob, "logout");
    sim.answer_batch(Persisted::Committed);
    let frames = sim.take(bob);
    let offline = frames
        .iter()
        .filter(|f| matches!(f, ServerFrame::Message(m) if m.offline))
        .count();
    assert_eq!(offline, 1, "{frames:?}");
    // Written to bob's connection (the driver reported everything
    // written): delivered, so the next login does not get it again.
    sim.auto_commit = true;
    while !sim.batches.is_empty() {
        sim.answer_batch(Persisted::Committed);
    }
    let bob = sim.connect();
    sim.take(bob);
    let again: Vec<_> = sim
        .ask(bob, "login bob pw-bob")
        .into_iter()
        .filter(|f| matches!(f, ServerFrame::Message(_)))
        .collect();
    assert!(again.is_empty(), "delivered twice: {again:?}");
}

#[test]
fn a_connection_closed_while_its_login_waits_for_the_first_page_still_gets_its_bye_and_close() {
    let (mut sim, alice, _) = slow_storage();
    sim.auto_commit = true;
    sim.ok(alice, "message bob queued");
    sim.auto_commit = false;
    let bob = sim.connect();
    sim.take(bob);
    sim.send(bob, "login bob pw-bob");
    // Input after the login waits for the first page; past the bound on
    // held input, the connection is cut off as a flood.
    let flood = "whoami\n".repeat(12_000);
    sim.send_bytes(bob, flood.as_bytes());
    sim.answer_batch(Persisted::Committed);
    while !sim.batches.is_empty() {
        sim.answer_batch(Persisted::Committed);
    }
    let frames = sim.take(bob);
    assert!(
        matches!(
            &frames[..],
            [ServerFrame::Ok(ok), ServerFrame::Bye { reason: ByeReason::Flood }]
                if matches!(ok.reply, Reply::Login { .. })
        ),
        "{frames:?}"
    );
    assert_eq!(sim.closed.get(&bob), Some(&ByeReason::Flood));
    assert!(!sim.server.holds_output(bob));
}

#[test]
fn what_a_batch_frees_goes_out_in_the_order_it_was_made_across_connections() {
    let (mut sim, alice, dave) = slow_storage();
    let bob = sim.connect();
    sim.send(bob, "login bob pw-bob");
    sim.take(bob);
    // Both answers read bob's session, changed by the login in flight:
    // held. Dave asked first (and alice's connection is the older one, so
    // an order by connection would put her first).
    sim.send(dave, "message bob from dave");
    sim.send(alice, "message bob from alice");
    assert!(sim.take(dave).is_empty() && sim.take(alice).is_empty());
    let (batch, _) = sim.batches.remove(0);
    sim.server
        .handle_persisted(batch, Persisted::Committed, sim.now);
    let mut order = Vec::new();
    while let Some(output) = sim.server.poll_output() {
        if let chatproto::Output::Transmit { conn, frame } = output {
            order.push((conn, String::from_utf8_lossy(&frame).into_owned()));
        }
    }
    let position = |conn, needle: &str| {
        order
            .iter()
            .position(|(c, f)| *c == conn && f.contains(needle))
            .unwrap_or_else(|| panic!("no {needle} for {conn} in {order:?}"))
    };
    // Made in this order: bob's presence to the others, dave's answer,
    // alice's answer.
    assert!(position(dave, r#""type":"presence""#) < position(dave, r#""cmd":"message""#));
    assert!(
        position(dave, r#""cmd":"message""#) < position(alice, r#""cmd":"message""#),
        "{order:?}"
    );
}

#[test]
fn a_closed_connections_slot_is_not_reused_before_its_close_is_out() {
    // A driver finds the socket by `ConnId::index` until it has the
    // `Output::Close`: a new connection given that index while the close
    // waits behind a batch would leave the old socket open for ever.
    let (mut sim, alice, _) = slow_storage();
    // Her answer waits for the message's batch; her goodbye behind it.
    sim.send(alice, "message bob stored");
    sim.send(alice, "logout");
    assert!(
        sim.take(alice).is_empty(),
        "the goodbye waits for the batch"
    );
    assert!(!sim.closed.contains_key(&alice));
    let newcomers: Vec<_> = (0..3).map(|_| sim.connect()).collect();
    assert!(
        newcomers.iter().all(|c| c.index() != alice.index()),
        "{alice} shares its index with one of {newcomers:?}"
    );
    sim.answer_batch(Persisted::Committed);
    sim.answer_batch(Persisted::Committed);
    assert_eq!(sim.closed.get(&alice), Some(&ByeReason::Logout));
    // Out: the slot serves again.
    let later = sim.connect();
    assert_eq!(
        later.index(),
        alice.index(),
        "{later} {alice} {newcomers:?}"
    );
}
