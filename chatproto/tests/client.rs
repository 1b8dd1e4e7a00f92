//! The client state machine against the real server core, in memory.

mod common;

use chatproto::{
    ByeReason, Client, ClientEvent, Command, ConnId, DebugTarget, ErrorCode, Reply, SendError,
};
use common::Sim;

/// Moves frames both ways until neither side has anything to send.
fn exchange(sim: &mut Sim, conn: ConnId, client: &mut Client) {
    while let Some(frame) = client.poll_transmit() {
        sim.send_bytes(conn, &frame);
    }
    // As a line transport carries them: each frame, then `\n`.
    for frame in sim.take_raw(conn) {
        client.handle_input(&frame);
        client.handle_input(b"\n");
    }
}

fn events(client: &mut Client) -> Vec<ClientEvent> {
    std::iter::from_fn(|| client.poll_event()).collect()
}

#[test]
fn a_client_session_tracks_ids_user_and_counts() {
    let mut sim = Sim::new();
    let conn = sim.connect();
    let mut client = Client::new();
    exchange(&mut sim, conn, &mut client);
    assert!(matches!(
        events(&mut client)[..],
        [ClientEvent::Connected { version: 1, .. }]
    ));
    let session = client.state().session.unwrap();

    let bad = client
        .send(Command::parse("login alice nope").unwrap())
        .unwrap();
    let good = client
        .send(Command::parse("login alice pw-alice").unwrap())
        .unwrap();
    assert_eq!(client.state().pending.len(), 2);
    assert!(client.state().queued_output_bytes > 0);
    exchange(&mut sim, conn, &mut client);
    let ev = events(&mut client);
    match &ev[..] {
        [ClientEvent::Error {
            request: Some(r1),
            frame: e,
        }, ClientEvent::Ok {
            request: Some(r2),
            frame: ok,
        }] => {
            assert_eq!((r1.id, e.code), (bad, ErrorCode::InvalidCredentials));
            assert_eq!(r2.id, good);
            assert!(matches!(ok.reply, Reply::Login { .. }));
        }
        other => panic!("{other:?}"),
    }
    let state = client.state();
    assert_eq!(state.user.unwrap().as_str(), "alice");
    assert_eq!(state.session, Some(session));
    assert!(state.pending.is_empty());
    assert_eq!((state.frames_sent, state.frames_received), (2, 3));
    assert_eq!(state.queued_output_bytes, 0);
    // The password never shows in the state's debug output.
    assert!(!format!("{:?}", client.state()).contains("pw-alice"));
}

#[test]
fn incoming_messages_and_presence_become_events() {
    let mut sim = Sim::new();
    let conn = sim.connect();
    let mut client = Client::new();
    client
        .send(Command::parse("login bob pw-bob").unwrap())
        .unwrap();
    exchange(&mut sim, conn, &mut client);
    events(&mut client);

    let alice = sim.login("alice");
    sim.send(alice, "message bob hi bob");
    sim.send(alice, "broadcast hi all");
    sim.send(alice, "logout");
    exchange(&mut sim, conn, &mut client);
    let ev = events(&mut client);
    assert!(matches!(&ev[0], ClientEvent::Presence(p) if p.online && p.user.as_str() == "alice"));
    assert!(matches!(&ev[1], ClientEvent::Message(m) if m.text.as_str() == "hi bob" && !m.offline));
    assert!(matches!(&ev[2], ClientEvent::Broadcast(b) if b.text.as_str() == "hi all"));
    assert!(matches!(&ev[3], ClientEvent::Presence(p) if !p.online));
}

#[test]
fn logout_closes_the_client_and_debug_client_stays_local() {
    let mut sim = Sim::new();
    let conn = sim.connect();
    let mut client = Client::new();
    assert_eq!(
        client.send(Command::Debug {
            target: DebugTarget::Client
        }),
        Err(SendError::LocalCommand)
    );
    client
        .send(Command::parse("login carol pw-carol").unwrap())
        .unwrap();
    client.send(Command::Logout).unwrap();
    exchange(&mut sim, conn, &mut client);
    let ev = events(&mut client);
    assert!(matches!(
        ev.last(),
        Some(ClientEvent::Closed {
            reason: ByeReason::Logout
        })
    ));
    assert!(client.is_closed());
    assert_eq!(client.user(), None);
    assert_eq!(
        client.send(Command::Whoami),
        Err(SendError::Closed(ByeReason::Logout))
    );
}

#[test]
fn an_answer_this_version_cannot_read_still_settles_its_request() {
    let mut client = Client::new();
    let id = client.send(Command::Help).unwrap();
    client.handle_input(
        format!(
            "{{\"type\":\"ok\",\"id\":{},\"cmd\":\"teleport\",\"text\":\"new\"}}\n",
            id.0
        )
        .as_bytes(),
    );
    let ev = events(&mut client);
    assert!(
        matches!(&ev[..], [ClientEvent::Invalid { request: Some(r), .. }] if r.id == id),
        "{ev:?}"
    );
    assert!(!client.has_pending());
}

#[test]
fn undecodable_lines_are_reported_not_fatal() {
    let mut client = Client::with_max_frame_bytes(64);
    client.handle_input(b"not json\n{\"type\":\"mystery\"}\n");
    client.handle_input(&[b'x'; 100]);
    client.handle_input(b"\n{\"type\":\"presence\",\"user\":\"bob\",\"online\":true}\n");
    let ev = events(&mut client);
    assert_eq!(ev.len(), 4);
    assert!(ev[..3]
        .iter()
        .all(|e| matches!(e, ClientEvent::Invalid { .. })));
    assert!(matches!(&ev[3], ClientEvent::Presence(_)));
}

#[test]
fn every_pipelined_request_is_answered_and_matched() {
    // A smoke test of the two state machines together over many requests.
    let mut sim = Sim::new();
    let conn = sim.connect();
    let mut client = Client::new();
    client
        .send(Command::parse("login dave pw-dave").unwrap())
        .unwrap();
    for i in 0..50 {
        client
            .send(Command::parse(&format!("message eve note {i}")).unwrap())
            .unwrap();
    }
    exchange(&mut sim, conn, &mut client);
    let oks = events(&mut client)
        .into_iter()
        .filter(|e| matches!(e, ClientEvent::Ok { frame, .. } if matches!(frame.reply, Reply::Message { stored: true, .. })))
        .count();
    assert_eq!(oks, 50);
    assert_eq!(sim.server.debug_state(sim.now).queued_offline_messages, 50);
    assert!(!client.has_pending());
}
