//! Checks the implementation against `tests/vectors/protocol-v1.json`, the
//! language-neutral test vectors that PROTOCOL.md points other
//! implementations to.
//!
//! After a deliberate change to what the server sends, regenerate the
//! transcript's expectations with `CHATPROTO_BLESS=1 cargo test -p chatproto
//! --test vectors`, and review the diff.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use chatproto::{
    Accounts, Command, ConnId, Output, PeerKey, Request, RequestId, Server, ServerConfig,
    ServerFrame, Timestamp,
};
use serde_json::{json, Value};

const START: u64 = 1_700_000_000_000;

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/protocol-v1.json")
}

fn vectors() -> Value {
    let text = std::fs::read_to_string(path()).expect("the vectors file is readable");
    serde_json::from_str(&text).expect("the vectors file is JSON")
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn inline_lines_parse_to_their_commands() {
    let vectors = vectors();
    let cases = vectors["inline"].as_array().unwrap();
    assert!(cases.len() > 20);
    for case in cases {
        let line = str_of(case, "line");
        match Command::parse(line) {
            Ok(command) => {
                assert_eq!(
                    serde_json::to_value(&command).unwrap(),
                    case["command"],
                    "{line:?}"
                );
                // Parsing what it renders gives it back.
                assert_eq!(Command::parse(&command.render()), Ok(command));
            }
            Err(e) => assert_eq!(e.code().as_str(), str_of(case, "error"), "{line:?}: {e}"),
        }
    }
}

#[test]
fn request_frames_parse_to_their_ids_and_commands() {
    let vectors = vectors();
    for case in vectors["requests"].as_array().unwrap() {
        let frame = str_of(case, "frame");
        let expected_id = case["id"].as_u64().map(RequestId);
        match Request::parse_frame(frame.as_bytes()) {
            Ok(request) => {
                assert_eq!(request.id, expected_id, "{frame}");
                assert_eq!(
                    serde_json::to_value(&request.command).unwrap(),
                    case["command"],
                    "{frame}"
                );
            }
            Err(rejected) => {
                assert_eq!(rejected.id, expected_id, "{frame}");
                assert_eq!(
                    rejected.error.code().as_str(),
                    str_of(case, "error"),
                    "{frame}"
                );
            }
        }
    }
}

#[test]
fn server_frames_decode_and_encode_to_the_same_bytes() {
    let vectors = vectors();
    for frame in vectors["server_frames"].as_array().unwrap() {
        let frame = frame.as_str().unwrap();
        let decoded =
            ServerFrame::decode(frame.as_bytes()).unwrap_or_else(|e| panic!("{frame}: {e}"));
        assert_eq!(decoded.encode(), frame.as_bytes(), "{frame}");
    }
}

#[test]
fn the_transcript_plays_back_exactly() {
    let mut vectors = vectors();
    let bless = std::env::var_os("CHATPROTO_BLESS").is_some();
    let transcript = &mut vectors["transcript"];

    let mut accounts = Accounts::new();
    for pair in transcript["accounts"].as_array().unwrap() {
        accounts
            .insert(
                pair[0].as_str().unwrap().parse().unwrap(),
                pair[1].as_str().unwrap().parse().unwrap(),
            )
            .unwrap();
    }
    let c = &transcript["config"];
    let mut config = ServerConfig::default();
    config.idle_timeout = Duration::from_secs(c["idle_timeout_secs"].as_u64().unwrap());
    config.lockout.max_failures = c["lockout_attempts"].as_u64().unwrap() as u32;
    config.lockout.lock_duration = Duration::from_secs(c["lockout_secs"].as_u64().unwrap());
    for admin in c["admins"].as_array().unwrap() {
        config
            .admins
            .insert(admin.as_str().unwrap().parse().unwrap());
    }
    let mut server = Server::new(config, accounts, Timestamp::from_unix_millis(START)).unwrap();

    let mut conns: HashMap<String, ConnId> = HashMap::new();
    let mut names: HashMap<ConnId, String> = HashMap::new();
    let mut mismatches = Vec::new();
    for (n, step) in transcript["steps"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        let now = Timestamp::from_unix_millis(START + step["at"].as_u64().unwrap());
        if let Some(name) = step["connect"].as_str() {
            let bytes = hex(str_of(step, "session_random"));
            let conn = server.accept(PeerKey::UNSPECIFIED, bytes, now);
            conns.insert(name.to_owned(), conn);
            names.insert(conn, name.to_owned());
        } else if let Some(name) = step["send"].as_str() {
            let line = format!("{}\n", str_of(step, "line"));
            server
                .handle_input(conns[name], line.as_bytes(), now)
                .unwrap();
        } else if let Some(name) = step["disconnect"].as_str() {
            server.handle_disconnect(conns[name], now).unwrap();
        } else if step["timeout"].as_bool() == Some(true) {
            server.handle_timeout(now);
        } else {
            panic!("step {n} does nothing: {step}");
        }
        let mut actual = Vec::new();
        while let Some(output) = server.poll_output() {
            match output {
                Output::Transmit { conn, frame } => actual.push(json!({
                    "to": names[&conn],
                    "frame": std::str::from_utf8(&frame).unwrap(),
                })),
                Output::Close { conn, reason } => {
                    actual.push(json!({ "close": names[&conn], "reason": reason.as_str() }))
                }
                _ => {}
            }
        }
        let actual = Value::Array(actual);
        if step["expect"] != actual {
            mismatches.push(format!(
                "step {n}: expected {}\n  got {actual}",
                step["expect"]
            ));
            step["expect"] = actual;
        }
    }
    if bless {
        std::fs::write(path(), format_vectors(&vectors)).unwrap();
        return;
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// The file's layout: one line per case, and per expected output.
fn format_vectors(v: &Value) -> String {
    let line = |v: &Value| serde_json::to_string(v).unwrap();
    let lines = |items: &Value, indent: &str| {
        let items: Vec<String> = items
            .as_array()
            .unwrap()
            .iter()
            .map(|i| format!("{indent}{}", line(i)))
            .collect();
        if items.is_empty() {
            "[]".to_owned()
        } else {
            format!("[\n{}\n{}]", items.join(",\n"), &indent[2..])
        }
    };
    let t = &v["transcript"];
    let steps: Vec<String> = t["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| {
            let mut head = step.clone();
            head.as_object_mut().unwrap().remove("expect");
            let head = line(&head);
            format!(
                "      {}, \"expect\": {}}}",
                &head[..head.len() - 1],
                lines(&step["expect"], "        ")
            )
        })
        .collect();
    format!(
        "{{\n  \"about\": {},\n  \"inline\": {},\n  \"requests\": {},\n  \"server_frames\": {},\n  \"transcript\": {{\n    \"accounts\": {},\n    \"config\": {},\n    \"steps\": [\n{}\n    ]\n  }}\n}}\n",
        line(&v["about"]),
        lines(&v["inline"], "    "),
        lines(&v["requests"], "    "),
        lines(&v["server_frames"], "    "),
        line(&t["accounts"]),
        line(&t["config"]),
        steps.join(",\n"),
    )
}

fn hex(s: &str) -> [u8; 16] {
    let mut out = [0; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}
