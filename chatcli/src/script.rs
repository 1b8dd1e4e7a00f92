//! Scripted use: commands from standard input, one answer or event per line
//! on standard output.

use std::io::{BufRead, Write};
use std::time::Duration;

use chatproto::{Command, DebugTarget};
use serde_json::json;

use crate::display::Style;
use crate::session::{Format, Session, Sink, WaitError};
use crate::transport::Transport;
use crate::Credentials;

/// How long to wait for an answer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the scripted client; returns the exit status.
pub fn run(
    session: Session,
    stream: Transport,
    credentials: Option<Credentials>,
    json: bool,
) -> u8 {
    let format = if json {
        Format::Json
    } else {
        Format::Text(Style::Plain)
    };
    session.start_receiving(
        stream,
        format,
        Box::new(StdoutSink),
        Box::new(move |_sink, line, code| {
            // In JSON mode the bye frame already said it; people get a line.
            if json {
                eprintln!("chatcli: {line}");
            } else {
                StdoutSink.line(line);
            }
            std::process::exit(i32::from(code));
        }),
    );

    match session.wait_connected(DRAIN_TIMEOUT) {
        Ok(()) => {}
        Err(WaitError::Ended) => park_forever(),
        Err(WaitError::TimedOut) => {
            eprintln!("chatcli: the server did not greet us");
            return 1;
        }
    }
    if let Some(c) = credentials {
        let Ok(id) = session.send(Command::Login {
            user: c.user,
            password: c.password,
        }) else {
            return 1;
        };
        match session.wait_login(id, DRAIN_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return 1, // the error line is already out
            Err(WaitError::Ended) => park_forever(),
            Err(WaitError::TimedOut) => {
                eprintln!("chatcli: no answer to the login");
                return 1;
            }
        }
    }

    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            continue;
        }
        match Command::parse(line) {
            Ok(Command::Debug {
                target: DebugTarget::Client,
            }) => {
                let debug = session.state().debug_line();
                if json {
                    StdoutSink.line(json!({"type": "debug_client", "text": debug}).to_string());
                } else {
                    StdoutSink.line(debug);
                }
            }
            Ok(command) => {
                let logout = matches!(command, Command::Logout);
                if session.send(command).is_err() {
                    break;
                }
                // One command at a time: output follows input order, and
                // `debug client` sees the effect of the lines before it.
                if let Err(WaitError::Ended) = session.wait_answered(DRAIN_TIMEOUT) {
                    park_forever();
                }
                if logout {
                    // The `bye` follows the answer, and the receiving
                    // thread ends the process on it (with its line).
                    if session.wait_ended(DRAIN_TIMEOUT) {
                        park_forever();
                    }
                    eprintln!("chatcli: the server did not close the session after logout");
                    return 1;
                }
            }
            Err(e) => {
                if json {
                    let frame = json!({"type": "error", "code": e.code(), "text": e.to_string(), "local": true});
                    StdoutSink.line(frame.to_string());
                } else {
                    StdoutSink.line(format!("error: {e}"));
                }
            }
        }
    }
    match session.wait_answered(DRAIN_TIMEOUT) {
        Ok(()) => 0,
        Err(WaitError::Ended) => park_forever(),
        Err(WaitError::TimedOut) => {
            eprintln!("chatcli: gave up waiting for the server's answers");
            1
        }
    }
}

/// The receiving thread is ending the process; wait for it.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

struct StdoutSink;

impl Sink for StdoutSink {
    fn line(&mut self, line: String) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}
