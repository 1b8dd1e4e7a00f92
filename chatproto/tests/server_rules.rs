//! Every numbered rule of PROTOCOL.md and every error code, driven through
//! the server core with a virtual clock.

mod common;

use std::time::Duration;

use chatproto::{
    ByeReason, Change, ConfigError, ErrorCode, Event, LastSeen, MessageFrame, PeerKey, RateLimit,
    Reply, ServerFrame, Timestamp, UnknownConnection,
};
use common::{names, presences, secs, Sim, T0};

// --- Connection start and request forms -----------------------------------

#[test]
fn a_connection_is_greeted_with_hello_and_a_session_from_the_given_bytes() {
    let mut sim = Sim::new();
    let conn = sim.server.accept(PeerKey::UNSPECIFIED, [0xab; 16], sim.now);
    sim.pump();
    let frames = sim.take(conn);
    let [ServerFrame::Hello { session, version }] = frames.as_slice() else {
        panic!("{frames:?}")
    };
    assert_eq!(*version, 1);
    assert_eq!(session.get_version_num(), 4);
    assert_eq!(session.as_bytes()[0], 0xab);
}

#[test]
fn json_requests_get_their_id_back_inline_ones_get_none() {
    let mut sim = Sim::new();
    let c = sim.connect();
    let ok = sim.ok(c, r#"{"cmd":"help","id":42}"#);
    assert_eq!(ok.id, Some(chatproto::RequestId(42)));
    let e = sim.err(c, r#"{"cmd":"whoami","id":43}"#);
    assert_eq!(
        (e.id, e.code),
        (Some(chatproto::RequestId(43)), ErrorCode::NotLoggedIn)
    );
    assert_eq!(sim.ok(c, "help").id, None);
}

#[test]
fn help_lists_every_command_with_its_usage() {
    let mut sim = Sim::new();
    let c = sim.connect();
    let Reply::Help { commands } = sim.ok(c, "help").reply else {
        panic!()
    };
    let listed: Vec<_> = commands.iter().map(|c| c.cmd.as_str()).collect();
    assert_eq!(
        listed,
        [
            "login",
            "logout",
            "message",
            "broadcast",
            "whoami",
            "whoelse",
            "whoelsesince",
            "block",
            "unblock",
            "help",
            "debug"
        ]
    );
    assert!(commands
        .iter()
        .any(|c| c.usage == "message <user> <text...>"));
}

// --- Framing errors ----------------------------------------------------------

#[test]
fn bad_frames_are_refused_and_the_connection_stays_usable() {
    let mut sim = Sim::new();
    let c = sim.login("alice");
    sim.take(c);
    sim.send_bytes(c, b"\xff\xfe\n");
    sim.send(c, "{not json");
    sim.send(c, r#"{"cmd":"whoami","id":"x"}"#);
    sim.send(c, r#"{"id":5}"#);
    let codes: Vec<_> = sim
        .take(c)
        .into_iter()
        .map(|f| match f {
            ServerFrame::Error(e) => e.code,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(codes, [ErrorCode::BadFrame; 4]);
    assert!(matches!(sim.ok(c, "whoami").reply, Reply::Whoami { .. }));
}

#[test]
fn an_over_long_frame_is_refused_once_and_the_connection_stays_usable() {
    let mut config = common::config();
    config.max_frame_bytes = 100;
    let mut sim = Sim::with_config(config);
    let c = sim.login("alice");
    sim.take(c);
    // Sent in pieces, far beyond the limit, with a good frame after it.
    sim.send_bytes(c, &[b'x'; 70]);
    for _ in 0..50 {
        sim.send_bytes(c, &[b'y'; 1000]);
        assert_eq!(sim.server.buffered_input(c), Some(0));
    }
    sim.send_bytes(c, b"zz\nwhoami\n");
    let frames = sim.take(c);
    assert_eq!(frames.len(), 2, "{frames:?}");
    let ServerFrame::Error(e) = &frames[0] else {
        panic!("{frames:?}")
    };
    assert_eq!(e.code, ErrorCode::FrameTooLarge);
    assert!(e.text.contains("100 bytes"), "{}", e.text);
    assert!(matches!(&frames[1], ServerFrame::Ok(ok) if matches!(ok.reply, Reply::Whoami { .. })));
}

#[test]
fn frames_split_across_reads_and_batched_in_one_read_are_all_answered() {
    let mut sim = Sim::new();
    let c = sim.connect();
    sim.take(c);
    for byte in b"login alice pw-alice\r\n" {
        sim.send_bytes(c, &[*byte]);
    }
    sim.send_bytes(c, b"whoami\n\n\r\n{\"cmd\":\"whoelse\",\"id\":1}\nhelp\n");
    let frames = sim.take(c);
    let cmds: Vec<_> = frames
        .iter()
        .map(|f| match f {
            ServerFrame::Ok(ok) => serde_json::to_value(&ok.reply).unwrap()["cmd"]
                .as_str()
                .unwrap()
                .to_owned(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(cmds, ["login", "whoami", "whoelse", "help"]);
}

#[test]
fn unknown_commands_and_bad_arguments_are_told_apart() {
    let mut sim = Sim::new();
    let c = sim.login("alice");
    assert_eq!(sim.code(c, "dance"), ErrorCode::UnknownCommand);
    assert_eq!(sim.code(c, r#"{"cmd":"dance"}"#), ErrorCode::UnknownCommand);
    assert_eq!(sim.code(c, "message"), ErrorCode::BadArguments);
    assert_eq!(sim.code(c, "whoelsesince soon"), ErrorCode::BadArguments);
    assert_eq!(sim.code(c, r#"{"cmd":"block"}"#), ErrorCode::BadArguments);
    assert_eq!(
        sim.code(c, r#"{"cmd":"whoelsesince","seconds":1.5}"#),
        ErrorCode::BadArguments
    );
}

// --- Rule 1: what is served before login ---------------------------------------

#[test]
fn rule1_before_login_only_login_and_help_are_served() {
    let mut sim = Sim::new();
    let c = sim.connect();
    for line in [
        "whoami",
        "whoelse",
        "whoelsesince 5",
        "message bob hi",
        "broadcast hi",
        "block bob",
        "unblock bob",
        "debug server",
    ] {
        assert_eq!(sim.code(c, line), ErrorCode::NotLoggedIn, "{line}");
    }
    assert!(matches!(sim.ok(c, "help").reply, Reply::Help { .. }));
}

#[test]
fn rule1_logout_before_login_closes() {
    let mut sim = Sim::new();
    let c = sim.connect();
    let frames = sim.ask(c, "logout");
    assert!(matches!(&frames[0], ServerFrame::Ok(ok) if ok.reply == Reply::Logout));
    assert_eq!(
        frames[1],
        ServerFrame::Bye {
            reason: ByeReason::Logout
        }
    );
    assert_eq!(sim.closed.get(&c), Some(&ByeReason::Logout));
}

#[test]
fn rule1_a_second_login_is_already_logged_in() {
    let mut sim = Sim::new();
    let c = sim.login("alice");
    assert_eq!(
        sim.code(c, "login alice pw-alice"),
        ErrorCode::AlreadyLoggedIn
    );
    assert_eq!(sim.code(c, "login bob pw-bob"), ErrorCode::AlreadyLoggedIn);
    // Bob was not logged in by that.
    let b = sim.login("bob");
    assert!(sim.server.is_open(b));
}

// --- Rule 2: lockout -------------------------------------------------------------

#[test]
fn rule2_three_failures_lock_the_name_and_the_password_is_not_checked() {
    let mut sim = Sim::new();
    let c1 = sim.connect();
    let c2 = sim.connect();
    assert_eq!(
        sim.code(c1, "login bob wrong1"),
        ErrorCode::InvalidCredentials
    );
    // Failures count across connections.
    assert_eq!(
        sim.code(c2, "login bob wrong2"),
        ErrorCode::InvalidCredentials
    );
    let locked = sim.err(c1, "login bob wrong3");
    assert_eq!(
        (locked.code, locked.retry_after),
        (ErrorCode::AccountLocked, Some(60))
    );
    sim.advance(secs(20));
    let e = sim.err(c2, "login bob pw-bob");
    assert_eq!(
        (e.code, e.retry_after),
        (ErrorCode::AccountLocked, Some(40))
    );
    assert!(e.text.contains("40 s"), "{}", e.text);
    // Other names are not affected.
    assert!(matches!(
        sim.ok(c2, "login alice pw-alice").reply,
        Reply::Login { .. }
    ));
    assert!(sim
        .events
        .iter()
        .any(|e| matches!(e, Event::Locked { user, .. } if user.as_str() == "bob")));
}

#[test]
fn rule2_a_lock_expires_on_time_and_the_count_starts_afresh() {
    let mut sim = Sim::new();
    let c = sim.connect();
    for _ in 0..3 {
        sim.send(c, "login bob nope");
    }
    assert_eq!(sim.server.debug_state(sim.now).locked_accounts, 1);
    // The lock's end is a deadline the core asks to be woken for.
    assert_eq!(sim.server.poll_timeout(), Some(sim.now + secs(60)));
    sim.advance(secs(59));
    assert_eq!(sim.err(c, "login bob pw-bob").retry_after, Some(1));
    sim.advance(secs(1));
    assert_eq!(sim.server.debug_state(sim.now).locked_accounts, 0);
    // Two more failures do not lock again: the count restarted.
    assert_eq!(sim.code(c, "login bob nope"), ErrorCode::InvalidCredentials);
    assert_eq!(sim.code(c, "login bob nope"), ErrorCode::InvalidCredentials);
    assert!(matches!(
        sim.ok(c, "login bob pw-bob").reply,
        Reply::Login { .. }
    ));
}

#[test]
fn rule2_retry_after_rounds_up() {
    let mut sim = Sim::new();
    let c = sim.connect();
    for _ in 0..3 {
        sim.send(c, "login bob nope");
    }
    sim.advance(std::time::Duration::from_millis(59_500));
    assert_eq!(sim.err(c, "login bob pw-bob").retry_after, Some(1));
}

#[test]
fn rule2_a_success_resets_the_count() {
    let mut sim = Sim::new();
    let c = sim.connect();
    sim.send(c, "login bob nope");
    sim.send(c, "login bob nope");
    sim.ok(c, "login bob pw-bob");
    sim.send(c, "logout");
    let c = sim.connect();
    assert_eq!(sim.code(c, "login bob nope"), ErrorCode::InvalidCredentials);
    assert_eq!(sim.code(c, "login bob nope"), ErrorCode::InvalidCredentials);
    assert_eq!(sim.code(c, "login bob nope"), ErrorCode::AccountLocked);
}

#[test]
fn rule2_unknown_users_look_exactly_like_wrong_passwords() {
    let mut sim = Sim::new();
    let c = sim.connect();
    let known: Vec<_> = (0..4).map(|_| sim.err(c, "login bob nope")).collect();
    let unknown: Vec<_> = (0..4).map(|_| sim.err(c, "login nobody nope")).collect();
    for (k, u) in known.iter().zip(&unknown) {
        assert_eq!((k.code, k.retry_after), (u.code, u.retry_after));
        assert_eq!(k.text.replace("bob", "X"), u.text.replace("nobody", "X"));
    }
    // Unknown names do not count as locked accounts.
    assert_eq!(sim.server.debug_state(sim.now).locked_accounts, 1);
}

#[test]
fn rule2_the_lock_is_written_to_the_store_and_survives_a_restart() {
    let mut sim = Sim::new();
    let c = sim.connect();
    for _ in 0..3 {
        sim.send(c, "login bob nope");
    }
    let snapshot = sim.store.clone();
    assert!(snapshot.lockouts["bob"].locked_until.is_some());
    let mut after = Sim::restarted(common::config(), &snapshot, sim.now + secs(10));
    let c = after.connect();
    assert_eq!(after.err(c, "login bob pw-bob").retry_after, Some(50));
    after.advance(secs(50));
    assert!(after.store.lockouts.is_empty());
    after.ok(c, "login bob pw-bob");
}

// --- Rule 3: one session per user ----------------------------------------------

#[test]
fn rule3_a_second_session_is_refused() {
    let mut sim = Sim::new();
    let first = sim.login("alice");
    let c = sim.connect();
    let e = sim.err(c, "login alice pw-alice");
    assert_eq!(e.code, ErrorCode::SessionElsewhere);
    assert!(sim.server.is_open(first));
    assert_eq!(sim.server.user(first).map(|u| u.as_str()), Some("alice"));
    // A wrong password for an online user is still just a wrong password.
    assert_eq!(
        sim.code(c, "login alice nope"),
        ErrorCode::InvalidCredentials
    );
}

// --- Rule 4: presence -----------------------------------------------------------

#[test]
fn rule4_presence_goes_to_everyone_else_on_login_and_every_way_of_leaving() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let b = sim.login("bob");
    assert_eq!(presences(&sim.take(a)), [("bob".into(), true)]);
    assert!(
        presences(&sim.take(b)).is_empty(),
        "no presence about oneself"
    );

    // Logout.
    sim.send(b, "logout");
    assert_eq!(presences(&sim.take(a)), [("bob".into(), false)]);
    // Abrupt disconnect.
    let b = sim.login("bob");
    sim.take(a);
    sim.disconnect(b);
    assert_eq!(presences(&sim.take(a)), [("bob".into(), false)]);
    // Idle timeout.
    let _b = sim.login("bob");
    sim.take(a);
    sim.advance(secs(300));
    sim.send(a, "whoami");
    sim.take(a);
    sim.advance(secs(300));
    assert_eq!(presences(&sim.take(a)), [("bob".into(), false)]);
    assert!(sim.server.is_open(a));
}

#[test]
fn rule4_users_blocked_by_someone_get_no_presence_about_them() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let b = sim.login("bob");
    let c = sim.login("carol");
    sim.ok(b, "block alice");
    sim.take(a);
    sim.take(c);
    sim.send(b, "logout");
    assert!(
        presences(&sim.take(a)).is_empty(),
        "alice is blocked by bob"
    );
    assert_eq!(presences(&sim.take(c)), [("bob".into(), false)]);
    let b = sim.login("bob");
    assert!(presences(&sim.take(a)).is_empty());
    assert_eq!(presences(&sim.take(c)), [("bob".into(), true)]);
    // Blocking is one way: bob still hears about alice.
    sim.send(a, "logout");
    assert_eq!(presences(&sim.take(b)), [("alice".into(), false)]);
}

// --- Rule 5: direct messages -------------------------------------------------------

#[test]
fn rule5_an_online_recipient_gets_the_message_at_once() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let b = sim.login("bob");
    sim.take(b);
    let ok = sim.ok(a, "message bob hi  there\t!");
    assert_eq!(
        ok.reply,
        Reply::Message {
            to: "bob".parse().unwrap(),
            stored: false
        }
    );
    assert_eq!(
        sim.take(b),
        [ServerFrame::Message(MessageFrame {
            from: "alice".parse().unwrap(),
            text: "hi  there\t!".parse().unwrap(),
            sent_at: sim.now,
            offline: false,
        })]
    );
}

#[test]
fn rule5_errors_unknown_self_and_blocked() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let b = sim.login("bob");
    assert_eq!(sim.code(a, "message zed hi"), ErrorCode::UnknownUser);
    assert_eq!(sim.code(a, "message alice hi"), ErrorCode::SelfTarget);
    sim.ok(b, "block alice");
    sim.take(b);
    assert_eq!(sim.code(a, "message bob hi"), ErrorCode::Blocked);
    assert!(sim.take(b).is_empty(), "nothing delivered");
    sim.send(b, "logout");
    assert_eq!(sim.code(a, "message bob hi"), ErrorCode::Blocked);
    assert_eq!(
        sim.server.debug_state(sim.now).queued_offline_messages,
        0,
        "nothing stored"
    );
}

#[test]
fn rule5_offline_messages_are_delivered_in_order_with_their_time_after_the_next_login() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let c = sim.login("carol");
    let mut sent = Vec::new();
    for (who, text) in [(a, "one"), (c, "two"), (a, "three")] {
        let ok = sim.ok(who, &format!("message bob {text}"));
        assert_eq!(
            ok.reply,
            Reply::Message {
                to: "bob".parse().unwrap(),
                stored: true
            }
        );
        sent.push((text, sim.now));
        sim.advance(secs(7));
    }
    let b = sim.connect();
    sim.take(b);
    let frames = sim.ask(b, "login bob pw-bob");
    assert!(matches!(&frames[0], ServerFrame::Ok(ok) if matches!(ok.reply, Reply::Login { .. })));
    let got: Vec<_> = frames[1..]
        .iter()
        .map(|f| match f {
            ServerFrame::Message(m) => {
                assert!(m.offline);
                (m.text.as_str(), m.sent_at)
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, sent);
    // Delivered once: not again at the next login.
    sim.send(b, "logout");
    let b = sim.connect();
    sim.take(b);
    assert_eq!(sim.ask(b, "login bob pw-bob").len(), 1);
}

#[test]
fn rule5_a_full_offline_queue_refuses_with_mailbox_full() {
    let mut config = common::config();
    config.offline_queue_capacity = 2;
    let mut sim = Sim::with_config(config);
    let a = sim.login("alice");
    sim.ok(a, "message bob 1");
    sim.ok(a, "message bob 2");
    let e = sim.err(a, "message bob 3");
    assert_eq!(e.code, ErrorCode::MailboxFull);
    assert!(e.text.contains("bob"), "{}", e.text);
    // Other mailboxes are separate; delivery empties bob's.
    sim.ok(a, "message carol 1");
    let b = sim.login("bob");
    sim.take(b);
    sim.ok(a, "message bob 3");
    assert_eq!(sim.take(b).len(), 1);
}

// --- Rule 6: broadcast -------------------------------------------------------------

#[test]
fn rule6_broadcast_reaches_everyone_else_except_who_blocked_the_sender() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let b = sim.login("bob");
    let c = sim.login("carol");
    let d = sim.login("dave");
    sim.ok(c, "block alice");
    for conn in [a, b, c, d] {
        sim.take(conn);
    }
    let ok = sim.ok(a, "broadcast hello all");
    assert_eq!(
        ok.reply,
        Reply::Broadcast {
            delivered: 2,
            skipped: 1
        }
    );
    assert!(ok.text.contains("could not be delivered"), "{}", ok.text);
    for conn in [b, d] {
        let frames = sim.take(conn);
        assert!(
            matches!(&frames[..], [ServerFrame::Broadcast(m)] if m.text.as_str() == "hello all" && m.from.as_str() == "alice")
        );
    }
    assert!(sim.take(c).is_empty());
    assert!(sim.take(a).is_empty(), "no echo to the sender");

    let ok = sim.ok(b, "broadcast hi");
    assert_eq!(
        ok.reply,
        Reply::Broadcast {
            delivered: 3,
            skipped: 0
        }
    );
    assert!(!ok.text.contains("could not"), "{}", ok.text);
}

#[test]
fn a_broadcast_is_encoded_once_and_shared_by_all_recipients() {
    let mut sim = Sim::new();
    let sender = sim.login("alice");
    let others: Vec<_> = ["bob", "carol", "dave", "eve", "root"]
        .iter()
        .map(|u| sim.login(u))
        .collect();
    for &c in &others {
        sim.take_raw(c);
    }
    sim.send(sender, "broadcast same bytes for all");
    let frames: Vec<_> = others
        .iter()
        .map(|&c| sim.take_raw(c).pop().unwrap())
        .collect();
    for f in &frames[1..] {
        assert_eq!(f.as_ptr(), frames[0].as_ptr(), "one allocation, shared");
        assert_eq!(f, &frames[0]);
    }
}

// --- Rules 7 and 8: whoelse and whoelsesince ---------------------------------------------

#[test]
fn rule7_whoelse_lists_the_others_sorted_leaving_out_who_blocked_me() {
    let mut sim = Sim::new();
    let d = sim.login("dave");
    let _b = sim.login("bob");
    let c = sim.login("carol");
    let a = sim.login("alice");
    let Reply::Whoelse { users } = sim.ok(a, "whoelse").reply else {
        panic!()
    };
    assert_eq!(names(&users), ["bob", "carol", "dave"]);
    sim.ok(c, "block alice");
    sim.ok(a, "block dave"); // blocking someone does not hide them from me
    let Reply::Whoelse { users } = sim.ok(a, "whoelse").reply else {
        panic!()
    };
    assert_eq!(names(&users), ["bob", "dave"]);
    let Reply::Whoelse { users } = sim.ok(d, "whoelse").reply else {
        panic!()
    };
    assert_eq!(names(&users), ["bob", "carol"], "alice blocked dave");
}

#[test]
fn rule8_whoelsesince_covers_users_online_now_or_gone_less_than_s_seconds_ago() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let b = sim.login("bob");
    let _c = sim.login("carol");
    sim.send(b, "logout");
    sim.advance(secs(10));
    let since = |sim: &mut Sim, s: u64| {
        let Reply::Whoelsesince { users } = sim.ok(a, &format!("whoelsesince {s}")).reply else {
            panic!()
        };
        names(&users)
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(since(&mut sim, 11), ["bob", "carol"]);
    assert_eq!(
        since(&mut sim, 10),
        ["carol"],
        "gone exactly 10 s ago is not less than 10 s"
    );
    assert_eq!(since(&mut sim, 0), ["carol"]);
    assert_eq!(since(&mut sim, u64::MAX), ["bob", "carol"]);
    // Never-seen users are never listed; blockers of the asker are left out.
    let d = sim.login("dave");
    sim.ok(d, "block alice");
    sim.send(d, "logout");
    assert_eq!(since(&mut sim, 100), ["bob", "carol"]);
}

// --- Rule 9: block and unblock ---------------------------------------------------------

#[test]
fn rule9_block_and_unblock_errors_and_idempotence() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    assert_eq!(sim.code(a, "block zed"), ErrorCode::UnknownUser);
    assert_eq!(sim.code(a, "block alice"), ErrorCode::SelfTarget);
    assert_eq!(sim.code(a, "unblock bob"), ErrorCode::NotBlocked);
    assert_eq!(sim.code(a, "unblock zed"), ErrorCode::UnknownUser);
    assert_eq!(sim.code(a, "unblock alice"), ErrorCode::SelfTarget);
    assert_eq!(
        sim.ok(a, "block bob").reply,
        Reply::Block {
            user: "bob".parse().unwrap()
        }
    );
    sim.ok(a, "block bob"); // blocking again is fine
    assert_eq!(
        sim.ok(a, "unblock bob").reply,
        Reply::Unblock {
            user: "bob".parse().unwrap()
        }
    );
    assert_eq!(sim.code(a, "unblock bob"), ErrorCode::NotBlocked);
}

#[test]
fn rule9_unblocking_restores_messages_broadcasts_presence_and_listings() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let b = sim.login("bob");
    sim.ok(a, "block bob");
    assert_eq!(sim.code(b, "message alice hi"), ErrorCode::Blocked);
    sim.ok(a, "unblock bob");
    sim.take(a);
    sim.ok(b, "message alice hi");
    sim.ok(b, "broadcast all");
    assert_eq!(sim.take(a).len(), 2);
    let Reply::Whoelse { users } = sim.ok(b, "whoelse").reply else {
        panic!()
    };
    assert_eq!(names(&users), ["alice"]);
}

#[test]
fn rule9_blocks_are_written_to_the_store_and_survive_a_restart() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    sim.ok(a, "block bob");
    sim.ok(a, "block carol");
    sim.ok(a, "unblock carol");
    let snapshot = sim.store.clone();
    let mut after = Sim::restarted(common::config(), &snapshot, sim.now);
    let b = after.login("bob");
    let c = after.login("carol");
    assert_eq!(after.code(b, "message alice hi"), ErrorCode::Blocked);
    assert_eq!(
        after.ok(c, "message alice hi").reply,
        Reply::Message {
            to: "alice".parse().unwrap(),
            stored: true
        }
    );
}

// --- Rule 10: idle timeout --------------------------------------------------------------

#[test]
fn rule10_an_idle_connection_gets_bye_and_is_closed_activity_postpones_it() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let anon = sim.connect();
    sim.take(a);
    sim.advance(secs(599));
    sim.send(a, "whoami");
    sim.advance(secs(1));
    assert_eq!(
        sim.closed.get(&anon),
        Some(&ByeReason::IdleTimeout),
        "not logged in: closed too"
    );
    assert_eq!(
        sim.take(anon).last(),
        Some(&ServerFrame::Bye {
            reason: ByeReason::IdleTimeout
        })
    );
    assert!(sim.server.is_open(a));
    sim.take(a);
    // Its last frame came at 599 s: it lasts until 1199 s.
    sim.advance(secs(598));
    assert!(sim.server.is_open(a));
    sim.advance(secs(1));
    assert_eq!(
        sim.take(a),
        [ServerFrame::Bye {
            reason: ByeReason::IdleTimeout
        }]
    );
    assert_eq!(sim.closed.get(&a), Some(&ByeReason::IdleTimeout));
    assert_eq!(
        sim.server.poll_timeout(),
        None,
        "no connection, no deadline"
    );
}

#[test]
fn rule10_handle_timeout_is_idempotent_and_early_calls_do_nothing() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let deadline = sim.server.poll_timeout().unwrap();
    sim.server.handle_timeout(Timestamp::from_unix_millis(T0));
    sim.server.handle_timeout(deadline.saturating_sub(secs(1)));
    sim.pump();
    assert!(sim.server.is_open(a));
    sim.server.handle_timeout(deadline);
    sim.server.handle_timeout(deadline);
    sim.pump();
    assert!(!sim.server.is_open(a));
}

#[test]
fn rule10_input_that_arrives_after_the_deadline_does_not_revive_the_connection() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    sim.take(a);
    // A driver that hands over input before telling the core the time.
    sim.now = sim.now + secs(700);
    sim.send(a, "whoami");
    assert_eq!(
        sim.take(a),
        [ServerFrame::Bye {
            reason: ByeReason::IdleTimeout
        }]
    );
    assert!(!sim.server.is_open(a));
}

#[test]
fn echoed_input_in_error_texts_is_shortened() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let junk = "\u{1}".repeat(5000);
    for line in [
        format!("whoelsesince {junk}"),
        format!("whoami {junk}"),
        format!("debug {junk}"),
        format!("{junk} x"),
    ] {
        let e = sim.err(a, &line);
        assert!(
            e.text.len() < 400,
            "{} bytes for {:?}",
            e.text.len(),
            e.code
        );
    }
}

// --- Rule 11: logout ----------------------------------------------------------------------

#[test]
fn rule11_logout_is_ok_then_bye_then_close_and_later_input_is_ignored() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    sim.take(a);
    sim.send_bytes(a, b"logout\nwhoami\n");
    let frames = sim.take(a);
    assert!(matches!(&frames[0], ServerFrame::Ok(ok) if ok.reply == Reply::Logout));
    assert_eq!(
        frames[1..],
        [ServerFrame::Bye {
            reason: ByeReason::Logout
        }]
    );
    assert_eq!(sim.closed.get(&a), Some(&ByeReason::Logout));
    assert_eq!(
        sim.server.handle_input(a, b"whoami\n", sim.now),
        Err(UnknownConnection(a))
    );
    assert_eq!(
        sim.server.handle_disconnect(a, sim.now),
        Err(UnknownConnection(a))
    );
}

// --- Rule 12: debug -------------------------------------------------------------------------

#[test]
fn rule12_debug_server_is_for_admins_and_holds_only_counters() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    assert_eq!(sim.code(a, "debug server"), ErrorCode::Forbidden);
    sim.ok(a, "message bob secret-text");
    let probe = sim.connect();
    sim.send(probe, "login carol secret-password");
    sim.send(probe, "login carol secret-password");
    sim.send(probe, "login carol secret-password");
    sim.advance(secs(5));
    let r = sim.login("root");
    let ok = sim.ok(r, "debug server");
    let Reply::Debug { state } = &ok.reply else {
        panic!()
    };
    assert_eq!((state.connections, state.users_online), (3, 2));
    assert_eq!(
        (
            state.queued_offline_messages,
            state.locked_accounts,
            state.uptime_secs
        ),
        (1, 1, 5)
    );
    let json = serde_json::to_string(&ServerFrame::Ok(ok)).unwrap();
    assert!(!json.contains("secret"), "{json}");
    assert_eq!(sim.code(r, "debug client"), ErrorCode::BadArguments);
}

// --- Rule 13: names and texts -----------------------------------------------------------------

#[test]
fn rule13_invalid_names_and_texts_are_bad_arguments() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let long = "x".repeat(33);
    for line in [
        format!("message {long} hi"),
        "message bo/b hi".to_owned(),
        "block b@b".to_owned(),
        r#"{"cmd":"message","to":"bob","text":"a\u0007b"}"#.to_owned(),
        r#"{"cmd":"message","to":"bob","text":"two\nlines"}"#.to_owned(),
        r#"{"cmd":"broadcast","text":"  "}"#.to_owned(),
        r#"{"cmd":"login","user":"","password":"x"}"#.to_owned(),
    ] {
        assert_eq!(sim.code(a, &line), ErrorCode::BadArguments, "{line}");
    }
    // 32 characters of the allowed set, and tabs and any Unicode in texts, are fine.
    assert_eq!(
        sim.code(a, &format!("message {} hi", "a._-9".repeat(6) + "zz")),
        ErrorCode::UnknownUser
    );
    sim.ok(a, "message bob tab\there, ünïcödé 🎉");
}

// --- rate_limited ----------------------------------------------------------------------------

#[test]
fn frames_over_the_rate_limit_are_refused_with_rate_limited() {
    let mut config = common::config();
    config.rate_limit = Some(RateLimit {
        burst: 3,
        per_second: 1,
        flood_after: 0,
    });
    let mut sim = Sim::with_config(config);
    let c = sim.connect();
    sim.take(c);
    sim.send_bytes(c, b"help\nhelp\nhelp\n{\"cmd\":\"help\",\"id\":9}\n");
    let frames = sim.take(c);
    assert_eq!(frames.len(), 4);
    let ServerFrame::Error(e) = &frames[3] else {
        panic!("{frames:?}")
    };
    assert_eq!(
        (e.code, e.id),
        (ErrorCode::RateLimited, Some(chatproto::RequestId(9)))
    );
    sim.advance(secs(1));
    sim.ok(c, "help");
}

#[test]
fn a_connection_that_keeps_flooding_is_closed_with_bye_flood() {
    let mut config = common::config();
    config.rate_limit = Some(RateLimit {
        burst: 2,
        per_second: 1,
        flood_after: 3,
    });
    let mut sim = Sim::with_config(config);
    let bob = sim.login("bob");
    let c = sim.connect();
    sim.ok(c, "login alice pw-alice");
    sim.take(bob);
    // One frame of the burst is left; then three refusals are tolerated,
    // and the fourth in a row ends it.
    sim.send_bytes(
        c,
        "whoami
"
        .repeat(10)
        .as_bytes(),
    );
    let frames = sim.take(c);
    let codes: Vec<_> = frames
        .iter()
        .map(|f| match f {
            ServerFrame::Ok(_) => "ok".to_owned(),
            ServerFrame::Error(e) => e.code.to_string(),
            ServerFrame::Bye { reason } => format!("bye {reason}"),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        codes,
        [
            "ok",
            "rate_limited",
            "rate_limited",
            "rate_limited",
            "bye flood"
        ]
    );
    assert_eq!(sim.closed.get(&c), Some(&ByeReason::Flood));
    assert!(sim
        .events
        .iter()
        .any(|e| matches!(e, Event::Flooding { conn } if *conn == c)));
    // Others see the user leave.
    assert_eq!(presences(&sim.take(bob)), [("alice".to_owned(), false)]);
}

#[test]
fn slowing_down_after_a_refusal_starts_the_count_again() {
    let mut config = common::config();
    config.rate_limit = Some(RateLimit {
        burst: 1,
        per_second: 1,
        flood_after: 2,
    });
    let mut sim = Sim::with_config(config);
    let c = sim.connect();
    for _ in 0..5 {
        // One let through, two refused: never three refusals in a row.
        sim.send_bytes(
            c,
            b"help
help
help
",
        );
        sim.advance(secs(1));
    }
    assert!(sim.closed.is_empty());
    let refused = sim
        .take(c)
        .iter()
        .filter(|f| matches!(f, ServerFrame::Error(e) if e.code == ErrorCode::RateLimited))
        .count();
    assert_eq!(refused, 10);
}

// --- Login timeout ---------------------------------------------------------------------------

#[test]
fn a_connection_that_does_not_log_in_in_time_is_closed() {
    let mut config = common::config();
    config.login_timeout = Some(secs(30));
    let mut sim = Sim::with_config(config);
    let idle = sim.connect();
    let chatty = sim.connect();
    let logged_in = sim.login("alice");
    // Activity does not postpone the login timeout: only a login does.
    for _ in 0..5 {
        sim.advance(secs(5));
        sim.send(chatty, "help");
    }
    sim.advance(secs(4));
    assert!(sim.closed.is_empty());
    sim.advance(secs(1));
    assert_eq!(sim.closed.get(&idle), Some(&ByeReason::LoginTimeout));
    assert_eq!(sim.closed.get(&chatty), Some(&ByeReason::LoginTimeout));
    assert!(matches!(
        sim.take(idle).last(),
        Some(ServerFrame::Bye {
            reason: ByeReason::LoginTimeout
        })
    ));
    // A logged-in connection only has the idle timeout.
    sim.advance(secs(500));
    assert!(!sim.closed.contains_key(&logged_in));
    sim.advance(secs(100));
    assert_eq!(sim.closed.get(&logged_in), Some(&ByeReason::IdleTimeout));
}

#[test]
fn a_zero_login_timeout_is_a_config_error() {
    let mut config = common::config();
    config.login_timeout = Some(Duration::ZERO);
    assert_eq!(config.validate(), Err(ConfigError::ZeroLoginTimeout));
}

// --- Lasting state: the store sees every change --------------------------------------------------

#[test]
fn every_lasting_change_reaches_the_store_in_order() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    sim.ok(a, "block carol");
    sim.ok(a, "message bob first");
    let b = sim.login("bob");
    sim.send(b, "logout");
    sim.ok(a, "unblock carol");

    let mut journal: Vec<Change> = Vec::new();
    let mut server = chatproto::Server::new(common::config(), common::accounts(), sim.now).unwrap();
    let now = sim.now;
    let c = server.accept(PeerKey::UNSPECIFIED, [0; 16], now);
    for line in [
        "login alice pw-alice",
        "block carol",
        "message bob first",
        "unblock carol",
        "logout",
    ] {
        server
            .handle_input(c, format!("{line}\n").as_bytes(), now)
            .unwrap();
        common::drain_journal(&mut server, now, &mut journal);
    }
    let kinds: Vec<_> = journal
        .iter()
        .map(|c| {
            serde_json::to_value(c).unwrap()["change"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "logged_in",
            "blocked",
            "message_queued",
            "unblocked",
            "logged_out"
        ]
    );

    let snapshot = &sim.store;
    assert!(
        snapshot.offline.is_empty(),
        "delivered messages leave the store"
    );
    assert!(snapshot.blocks.is_empty());
    assert_eq!(snapshot.last_seen["bob"], LastSeen::Offline { at: sim.now });
    assert!(matches!(
        snapshot.last_seen["alice"],
        LastSeen::Online { .. }
    ));
}

#[test]
fn a_restart_keeps_offline_messages_and_recent_presence() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    sim.ok(a, "message bob kept across the restart");
    let sent_at = sim.now;
    let c = sim.login("carol");
    sim.send(c, "logout");
    sim.advance(secs(30));
    // The server stops with alice still online.
    let snapshot = sim.store.clone();
    let mut after = Sim::restarted(common::config(), &snapshot, sim.now + secs(5));

    let d = after.login("dave");
    let Reply::Whoelsesince { users } = after.ok(d, "whoelsesince 60").reply else {
        panic!()
    };
    assert_eq!(
        names(&users),
        ["alice", "carol"],
        "alice counts as seen until the restart"
    );
    let Reply::Whoelsesince { users } = after.ok(d, "whoelsesince 20").reply else {
        panic!()
    };
    assert_eq!(names(&users), ["alice"]);

    let b = after.connect();
    after.take(b);
    let frames = after.ask(b, "login bob pw-bob");
    assert_eq!(
        frames[1],
        ServerFrame::Message(MessageFrame {
            from: "alice".parse().unwrap(),
            text: "kept across the restart".parse().unwrap(),
            sent_at,
            offline: true,
        })
    );
}

// --- Driver-initiated ends ---------------------------------------------------------------------

#[test]
fn close_and_shutdown_send_bye_with_their_reason() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let b = sim.login("bob");
    let anon = sim.connect();
    sim.take(a);
    sim.server
        .close(b, chatproto::CloseReason::SlowConsumer, sim.now)
        .unwrap();
    sim.pump();
    assert_eq!(
        sim.take(b),
        [ServerFrame::Bye {
            reason: ByeReason::SlowConsumer
        }]
    );
    assert_eq!(presences(&sim.take(a)), [("bob".into(), false)]);
    assert_eq!(
        sim.server
            .close(b, chatproto::CloseReason::SlowConsumer, sim.now),
        Err(UnknownConnection(b))
    );

    sim.take(anon);
    sim.server.shutdown(sim.now);
    sim.pump();
    for conn in [a, anon] {
        assert_eq!(
            sim.take(conn),
            [ServerFrame::Bye {
                reason: ByeReason::ServerShutdown
            }]
        );
        assert_eq!(sim.closed.get(&conn), Some(&ByeReason::ServerShutdown));
    }
    assert_eq!(sim.server.debug_state(sim.now).connections, 0);
    assert!(matches!(
        sim.store.last_seen["alice"],
        LastSeen::Offline { .. }
    ));
}

#[test]
fn events_tell_the_driver_about_logins_refusals_and_logouts() {
    let mut sim = Sim::new();
    let a = sim.login("alice");
    let c = sim.connect();
    sim.send(c, "login bob nope");
    sim.send(a, "logout");
    let kinds: Vec<_> = sim
        .events
        .iter()
        .map(|e| match e {
            Event::LoggedIn { user, .. } => format!("in {user}"),
            Event::LoginRefused { user, code, .. } => format!("refused {user} {code}"),
            Event::LoggedOut { user, .. } => format!("out {user}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        ["in alice", "refused bob invalid_credentials", "out alice"]
    );
}

#[test]
fn a_bad_config_is_refused() {
    let mut config = common::config();
    config.max_frame_bytes = 10;
    let err = chatproto::Server::new(config, common::accounts(), Timestamp::ZERO).unwrap_err();
    assert_eq!(err, chatproto::ConfigError::FrameLimit(10));
}

// --- Time that steps back --------------------------------------------------------------------

/// A `now` earlier than the latest the core has seen counts as the latest:
/// a frame does not date the connection's activity back (so its idle
/// timeout does not come early), and rate limits do not refill.
#[test]
fn a_clock_that_steps_back_is_taken_as_the_latest_time_seen() {
    let mut config = common::config();
    config.rate_limit = Some(chatproto::RateLimit {
        burst: 2,
        per_second: 1,
        flood_after: 0,
    });
    let idle = config.idle_timeout;
    let mut sim = Sim::with_config(config);
    let a = sim.login("alice");
    let start = sim.now;
    sim.now = start + secs(5);
    assert!(matches!(sim.ask(a, "whoami")[0], ServerFrame::Ok(_)));
    assert!(matches!(sim.ask(a, "whoami")[0], ServerFrame::Ok(_)));
    // Back by 4 s: no refill (the bucket is empty at +5 s).
    sim.now = start + secs(1);
    let frames = sim.ask(a, "whoami");
    assert!(
        matches!(&frames[0], ServerFrame::Error(e) if e.code == ErrorCode::RateLimited),
        "{frames:?}"
    );
    // That frame came at +5 s as far as the core knows: the connection is
    // idle from then, not from +1 s.
    sim.advance(idle + secs(3));
    assert!(
        sim.server.is_open(a),
        "timed out from the stepped-back time"
    );
    sim.advance(secs(3));
    assert!(!sim.server.is_open(a));
}
