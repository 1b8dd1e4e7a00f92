//! `Server::handle_message`: frames from a transport that keeps message
//! boundaries itself (WebSocket) are served exactly as lines are.

mod common;

use chatproto::{
    ConnId, ErrorCode, HashedPassword, MessageError, RateLimit, Reply, ServerFrame,
    UnknownConnection,
};
use common::Sim;

fn message(sim: &mut Sim, conn: ConnId, text: &str) -> Result<(), MessageError> {
    let now = sim.now;
    let result = sim.server.handle_message(conn, text.as_bytes(), now);
    sim.pump();
    result
}

#[test]
fn a_message_is_served_as_the_same_line_would_be() {
    let mut by_line = Sim::new();
    let mut by_message = Sim::new();
    let a = by_line.connect();
    let b = by_message.connect();
    assert_eq!(by_line.take(a), by_message.take(b));
    for frame in [
        "login alice pw-alice",
        r#"{"id":7,"cmd":"whoami"}"#,
        "message bob hi",
        "",
        "{broken",
        "nonsense",
    ] {
        by_line.send(a, frame);
        message(&mut by_message, b, frame).unwrap();
        assert_eq!(by_line.take(a), by_message.take(b), "after {frame:?}");
    }
}

#[test]
fn a_message_over_the_frame_limit_is_refused_and_the_next_one_served() {
    let mut sim = Sim::new();
    let c = sim.connect();
    sim.take(c);
    let limit = sim.server.config().max_frame_bytes;
    message(&mut sim, c, &"x".repeat(limit + 1)).unwrap();
    let frames = sim.take(c);
    assert!(
        matches!(&frames[..], [ServerFrame::Error(e)] if e.code == ErrorCode::FrameTooLarge),
        "{frames:?}"
    );
    // Exactly at the limit is a frame (an unknown command here).
    message(&mut sim, c, &"x".repeat(limit)).unwrap();
    let frames = sim.take(c);
    assert!(
        matches!(&frames[..], [ServerFrame::Error(e)] if e.code == ErrorCode::UnknownCommand),
        "{frames:?}"
    );
    message(&mut sim, c, "whoami").unwrap();
    assert!(
        matches!(&sim.take(c)[..], [ServerFrame::Error(e)] if e.code == ErrorCode::NotLoggedIn)
    );
}

#[test]
fn a_message_with_a_line_break_is_not_taken_at_all() {
    let mut sim = Sim::new();
    let c = sim.connect();
    sim.take(c);
    assert_eq!(
        message(&mut sim, c, "login alice pw-alice\nwhoami"),
        Err(MessageError::LineBreak)
    );
    assert!(sim.take(c).is_empty());
    assert!(sim.server.user(c).is_none());
    // Nothing was left half-read: the next message stands alone.
    message(&mut sim, c, "login alice pw-alice").unwrap();
    assert!(
        matches!(&sim.take(c)[..], [ServerFrame::Ok(ok)] if matches!(ok.reply, Reply::Login { .. }))
    );
}

#[test]
fn one_line_ending_at_the_end_of_a_message_is_its_end() {
    let mut sim = Sim::new();
    let c = sim.connect();
    sim.take(c);
    message(&mut sim, c, "login alice pw-alice\n").unwrap();
    assert!(
        matches!(&sim.take(c)[..], [ServerFrame::Ok(ok)] if matches!(ok.reply, Reply::Login { .. }))
    );
    message(&mut sim, c, "whoami\r\n").unwrap();
    assert!(
        matches!(&sim.take(c)[..], [ServerFrame::Ok(ok)] if matches!(ok.reply, Reply::Whoami { .. }))
    );
    // A lone line ending is an empty frame, ignored as an empty line is.
    message(&mut sim, c, "\n").unwrap();
    assert!(sim.take(c).is_empty());
    // Two are a line break inside the message.
    for two in ["whoami\n\n", "whoami\r\n\r\n", "\nwhoami"] {
        assert_eq!(
            message(&mut sim, c, two),
            Err(MessageError::LineBreak),
            "{two:?}"
        );
    }
    assert!(sim.take(c).is_empty());
}

#[test]
fn a_message_for_a_closed_connection_is_an_error() {
    let mut sim = Sim::new();
    let c = sim.connect();
    sim.disconnect(c);
    assert_eq!(
        message(&mut sim, c, "whoami"),
        Err(MessageError::UnknownConnection(UnknownConnection(c)))
    );
}

#[test]
fn messages_count_against_the_rate_limit() {
    let mut config = common::config();
    config.rate_limit = Some(RateLimit {
        burst: 2,
        per_second: 1,
        flood_after: 0,
    });
    let mut sim = Sim::with_config(config);
    let c = sim.connect();
    sim.take(c);
    for _ in 0..3 {
        message(&mut sim, c, "help").unwrap();
    }
    let codes: Vec<_> = sim
        .take(c)
        .into_iter()
        .map(|f| match f {
            ServerFrame::Error(e) => Some(e.code),
            _ => None,
        })
        .collect();
    assert_eq!(codes, [None, None, Some(ErrorCode::RateLimited)]);
}

#[test]
fn messages_behind_a_password_check_wait_for_it_and_keep_their_order() {
    let mut accounts = common::accounts();
    accounts
        .insert_hashed(
            "hashed".parse().unwrap(),
            HashedPassword::new("$test$secret").unwrap(),
        )
        .unwrap();
    let mut sim = Sim::with_accounts(common::config(), accounts);
    let c = sim.connect();
    sim.take(c);
    message(&mut sim, c, "login hashed secret").unwrap();
    message(&mut sim, c, r#"{"id":2,"cmd":"whoami"}"#).unwrap();
    assert!(sim.take(c).is_empty());
    sim.verify_all();
    let replies: Vec<_> = sim
        .take(c)
        .into_iter()
        .map(|f| match f {
            ServerFrame::Ok(ok) => ok.reply,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(matches!(
        replies[..],
        [Reply::Login { .. }, Reply::Whoami { .. }]
    ));
}
