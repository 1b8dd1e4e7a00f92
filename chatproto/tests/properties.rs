//! Property tests: framing is independent of chunking, rendering and
//! parsing are inverse, and no input makes the server core panic or break
//! its invariants.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chatproto::{
    Command, ConnId, DebugTarget, FrameDecoder, FrameError, MessageText, Output, Password, PeerKey,
    Persisted, Request, RequestId, Server, ServerFrame, Timestamp, Username,
};
use proptest::prelude::*;

// --- Framing -------------------------------------------------------------------

/// Decodes `stream` cut at `cuts`, checking the buffer bound on the way.
fn decode_chunked(max: usize, stream: &[u8], cuts: &[usize]) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut decoder = FrameDecoder::new(max);
    let mut out = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(0);
    points.push(stream.len());
    points.sort_unstable();
    for pair in points.windows(2) {
        let mut input = &stream[pair[0]..pair[1]];
        while let Some(frame) = decoder.decode(&mut input) {
            out.push(frame.map(<[u8]>::to_vec));
        }
        assert!(
            decoder.buffered() <= max,
            "buffered {} > {max}",
            decoder.buffered()
        );
    }
    out
}

/// A stream of lines, some empty, some with `\r\n`, some over the limit.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        4 => proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..24),
        1 => proptest::collection::vec(Just(b'x'), 25..80),
    ];
    let ending = prop_oneof![Just(&b"\n"[..]), Just(&b"\r\n"[..])];
    proptest::collection::vec((line, ending), 0..20).prop_map(|lines| {
        let mut bytes = Vec::new();
        for (line, ending) in lines {
            bytes.extend_from_slice(&line);
            bytes.extend_from_slice(ending);
        }
        bytes
    })
}

proptest! {
    #[test]
    fn any_chunking_yields_the_same_frames(
        stream in stream(),
        cuts in proptest::collection::vec(any::<usize>(), 0..30),
        trailing in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let max = 24;
        let mut input = stream.clone();
        input.extend_from_slice(&trailing); // an unfinished last line
        let whole = decode_chunked(max, &input, &[]);
        let chunked = decode_chunked(max, &input, &cuts);
        prop_assert_eq!(&whole, &chunked);
        let byte_by_byte = decode_chunked(max, &input, &(0..input.len()).collect::<Vec<_>>());
        prop_assert_eq!(&whole, &byte_by_byte);
        for frame in whole.iter().flatten() {
            prop_assert!(!frame.is_empty() && frame.len() <= max);
            prop_assert!(!frame.contains(&b'\n'));
        }
    }
}

// --- Commands ------------------------------------------------------------------

fn username() -> impl Strategy<Value = Username> {
    "[A-Za-z0-9_.-]{1,32}".prop_map(|s| Username::new(&s).unwrap())
}

fn password() -> impl Strategy<Value = Password> {
    "[^\\s\\p{Cc}]{1,16}".prop_map(|s| Password::new(&s).unwrap())
}

fn text() -> impl Strategy<Value = MessageText> {
    "([^\\p{Cc}]|\\t){1,40}"
        .prop_filter_map("needs a visible character", |s| MessageText::new(&s).ok())
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (username(), password()).prop_map(|(user, password)| Command::Login { user, password }),
        Just(Command::Logout),
        (username(), text()).prop_map(|(to, text)| Command::Message { to, text }),
        text().prop_map(|text| Command::Broadcast { text }),
        Just(Command::Whoami),
        Just(Command::Whoelse),
        any::<u64>().prop_map(|seconds| Command::Whoelsesince { seconds }),
        username().prop_map(|user| Command::Block { user }),
        username().prop_map(|user| Command::Unblock { user }),
        Just(Command::Help),
        prop_oneof![Just(DebugTarget::Server), Just(DebugTarget::Client)]
            .prop_map(|target| Command::Debug { target }),
    ]
}

proptest! {
    #[test]
    fn parse_of_render_is_identity(c in command()) {
        prop_assert_eq!(Command::parse(&c.render()), Ok(c.clone()));
        // And the server, reading the rendered line as a frame, agrees.
        let r = Request::parse_frame(c.render().as_bytes()).unwrap();
        prop_assert_eq!(r.command, c);
    }

    #[test]
    fn json_requests_round_trip(c in command(), id in proptest::option::of(any::<u64>())) {
        let request = Request { id: id.map(RequestId), command: c };
        let frame = request.encode();
        prop_assert_eq!(frame.last(), Some(&b'\n'));
        prop_assert!(!frame[..frame.len() - 1].contains(&b'\n'));
        prop_assert_eq!(Request::parse_frame(&frame[..frame.len() - 1]), Ok(request));
    }

    #[test]
    fn the_parser_never_panics_and_classifies_every_line(line in "\\PC{0,64}") {
        match Command::parse(&line) {
            Ok(c) => prop_assert_eq!(Command::parse(&c.render()), Ok(c)),
            Err(e) => prop_assert!(matches!(
                e.code(),
                chatproto::ErrorCode::UnknownCommand | chatproto::ErrorCode::BadArguments
            )),
        }
    }

    #[test]
    fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = Request::parse_frame(&bytes);
    }
}

// --- The server core -----------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Connect,
    Send(usize, Vec<u8>),
    Advance(u64),
    Disconnect(usize),
    /// Storage fails the next batch.
    FailNextBatch,
}

/// Lines that exercise the rules, with names from the accounts (and not).
fn line() -> impl Strategy<Value = Vec<u8>> {
    let user = prop_oneof![
        Just("alice"),
        Just("bob"),
        Just("carol"),
        Just("dave"),
        Just("root"),
        Just("nobody"),
        Just("b@d")
    ];
    let password = prop_oneof![
        Just("pw-alice"),
        Just("pw-bob"),
        Just("pw-carol"),
        Just("pw-root"),
        Just("wrong")
    ];
    let text = prop_oneof![Just("hi"), Just("hello there"), Just("\u{7}"), Just("é🎉")];
    prop_oneof![
        (user.clone(), password).prop_map(|(u, p)| format!("login {u} {p}\n").into_bytes()),
        (user.clone(), text.clone()).prop_map(|(u, t)| format!("message {u} {t}\n").into_bytes()),
        text.prop_map(|t| format!("broadcast {t}\n").into_bytes()),
        user.clone()
            .prop_map(|u| format!("block {u}\n").into_bytes()),
        user.prop_map(
            |u| format!("{{\"cmd\":\"unblock\",\"user\":\"{u}\",\"id\":3}}\n").into_bytes()
        ),
        (0u64..100).prop_map(|s| format!("whoelsesince {s}\n").into_bytes()),
        prop_oneof![
            Just("whoami\n"),
            Just("whoelse\n"),
            Just("help\n"),
            Just("logout\n"),
            Just("debug server\n"),
            Just("{\"cmd\":\n")
        ]
        .prop_map(|s| s.as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 0..300),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Connect),
        6 => (0usize..6, line()).prop_map(|(c, bytes)| Op::Send(c, bytes)),
        2 => (0u64..400_000).prop_map(Op::Advance),
        1 => (0usize..6).prop_map(Op::Disconnect),
        1 => Just(Op::FailNextBatch),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_input_makes_the_server_panic_or_break_its_invariants(ops in proptest::collection::vec(op(), 1..80)) {
        let mut config = common::config();
        config.max_frame_bytes = 128;
        config.offline_queue_capacity = 3;
        let max_frame = config.max_frame_bytes;
        let mut now = Timestamp::from_unix_millis(common::T0);
        let mut server = Server::new(config, common::accounts(), now).unwrap();
        let mut conns: Vec<ConnId> = Vec::new();
        let mut closed: HashSet<ConnId> = HashSet::new();
        let mut logged_in: HashMap<ConnId, String> = HashMap::new();
        let mut fail_next = false;
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Connect => conns.push(server.accept(PeerKey::UNSPECIFIED, [step as u8; 16], now)),
                Op::Send(i, bytes) => {
                    if let Some(&c) = conns.get(i % conns.len().max(1)) {
                        let open = server.is_open(c);
                        prop_assert_eq!(server.handle_input(c, &bytes, now).is_ok(), open);
                    }
                }
                Op::Advance(ms) => {
                    now = now + Duration::from_millis(ms);
                    server.handle_timeout(now);
                }
                Op::Disconnect(i) => {
                    if let Some(&c) = conns.get(i % conns.len().max(1)) {
                        let open = server.is_open(c);
                        prop_assert_eq!(server.handle_disconnect(c, now).is_ok(), open);
                        closed.insert(c);
                    }
                }
                Op::FailNextBatch => fail_next = true,
            }
            // Storage answers every batch: committed, or failed when asked.
            let mut batch = None;
            loop {
                if let Some(b) = batch.take() {
                    let outcome = if std::mem::take(&mut fail_next) {
                        Persisted::Failed
                    } else {
                        Persisted::Committed
                    };
                    server.handle_persisted(b, outcome, now);
                }
            while let Some(output) = server.poll_output() {
                match output {
                    Output::Transmit { conn, frame } => {
                        prop_assert!(!closed.contains(&conn), "frame for closed {}", conn);
                        // One frame's payload: no terminator, no line break.
                        let line = &frame[..];
                        prop_assert!(!line.contains(&b'\n'));
                        let decoded = ServerFrame::decode(line);
                        prop_assert!(decoded.is_ok(), "{:?}", String::from_utf8_lossy(line));
                    }
                    Output::Close { conn, .. } => {
                        prop_assert!(closed.insert(conn), "closed twice");
                    }
                    Output::Persist { batch: b, .. } => batch = Some(b),
                    _ => {}
                }
            }
                if batch.is_none() {
                    break;
                }
            }
            prop_assert!(!server.persist_pending(), "every batch answered");
            // The online set is exactly the logged-in open connections.
            logged_in.clear();
            for &c in &conns {
                prop_assert_eq!(server.is_open(c), !closed.contains(&c));
                if let Some(user) = server.user(c) {
                    prop_assert!(logged_in.insert(c, user.to_string()).is_none());
                }
                if let Some(buffered) = server.buffered_input(c) {
                    prop_assert!(buffered <= max_frame);
                }
            }
            let distinct: HashSet<&String> = logged_in.values().collect();
            prop_assert_eq!(distinct.len(), logged_in.len(), "one session per user");
            prop_assert_eq!(server.debug_state(now).users_online, logged_in.len());
            // Every open connection has an idle deadline, so there is a next one.
            if server.debug_state(now).connections > 0 {
                prop_assert!(server.poll_timeout().is_some_and(|t| t > now));
            }
        }
    }
}
