//! How server events look to a person: one line each, with a timestamp,
//! who, and the text; colour only when it is wanted.

use chatproto::{ByeReason, ClientEvent, ErrorCode, ErrorFrame, Reply, Timestamp};
use chrono::{Local, TimeZone};

/// Whether to colour output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    Color,
}

impl Style {
    /// Colour on a terminal, unless `NO_COLOR` is set (to anything).
    pub fn detect(is_terminal: bool) -> Style {
        if is_terminal && std::env::var_os("NO_COLOR").is_none() {
            Style::Color
        } else {
            Style::Plain
        }
    }

    fn paint(self, code: &str, text: &str) -> String {
        match self {
            Style::Plain => text.to_owned(),
            Style::Color => format!("\x1b[{code}m{text}\x1b[0m"),
        }
    }

    pub fn error(self, text: &str) -> String {
        self.paint("1;31", text)
    }

    fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }

    fn name(self, text: &str) -> String {
        self.paint("1;36", text)
    }
}

/// The line for an event, or `None` for events not worth a line.
pub fn event_line(event: &ClientEvent, style: Style, now: Timestamp) -> Option<String> {
    match event {
        ClientEvent::Connected { .. } => None,
        ClientEvent::Ok { frame, .. } => Some(ok_line(&frame.reply, &frame.text)),
        ClientEvent::Error { frame, .. } => {
            Some(style.error(&format!("error: {}", error_text(frame))))
        }
        ClientEvent::Message(m) => {
            let who = style.name(m.from.as_str());
            let tag = if m.offline {
                " (sent while you were offline)"
            } else {
                ""
            };
            Some(format!("{} {who}{tag}: {}", time(m.sent_at, style), m.text))
        }
        ClientEvent::Broadcast(b) => {
            let who = style.name(b.from.as_str());
            Some(format!(
                "{} {who} (to everyone): {}",
                time(b.sent_at, style),
                b.text
            ))
        }
        ClientEvent::Presence(p) => {
            let what = if p.online {
                "is online"
            } else {
                "went offline"
            };
            Some(format!(
                "{} {}",
                time(now, style),
                style.dim(&format!("* {} {what}", p.user))
            ))
        }
        ClientEvent::Closed { .. } => None,
        ClientEvent::Invalid { error, .. } => Some(style.error(&format!("warning: {error}"))),
        _ => None,
    }
}

/// The answer to a request, in one line.
fn ok_line(reply: &Reply, text: &str) -> String {
    match reply {
        Reply::Help { commands } => {
            let usages: Vec<&str> = commands.iter().map(|c| c.usage.as_str()).collect();
            format!("commands: {}, debug client", usages.join(", "))
        }
        _ => text.to_owned(),
    }
}

/// An error as a person should read it.
pub fn error_text(frame: &ErrorFrame) -> String {
    match (frame.code, frame.retry_after) {
        (ErrorCode::InvalidCredentials, _) => "invalid user name or password".to_owned(),
        (ErrorCode::AccountLocked, Some(secs)) => {
            format!("account locked after too many failed logins: try again in {secs} s")
        }
        _ => frame.text.clone(),
    }
}

/// Why the session ended, in one line, and the exit status that says so.
pub fn closed(reason: Option<ByeReason>) -> (String, u8) {
    match reason {
        Some(ByeReason::Logout) => ("Logged out.".to_owned(), 0),
        Some(ByeReason::IdleTimeout) => ("Disconnected: idle for too long.".to_owned(), 3),
        Some(ByeReason::ServerShutdown) => {
            ("Disconnected: the server is shutting down.".to_owned(), 4)
        }
        Some(ByeReason::NodeExpired) => (
            "Disconnected: the server lost touch with its cluster; connect again.".to_owned(),
            4,
        ),
        Some(ByeReason::AccountRemoved) => (
            "Disconnected: your account was removed by the server's operator.".to_owned(),
            6,
        ),
        Some(ByeReason::LoginTimeout) => ("Disconnected: did not log in in time.".to_owned(), 3),
        Some(ByeReason::Flood) => ("Disconnected: too many requests, too fast.".to_owned(), 6),
        Some(ByeReason::TooManyConnections) => (
            "Refused: too many connections from this address.".to_owned(),
            6,
        ),
        None => ("Connection to the server lost.".to_owned(), 5),
        Some(other) => (format!("Disconnected by the server ({other})."), 6),
    }
}

/// `[HH:MM:SS]` in local time.
fn time(at: Timestamp, style: Style) -> String {
    let millis = i64::try_from(at.as_unix_millis()).unwrap_or(i64::MAX);
    let text = match Local.timestamp_millis_opt(millis).single() {
        Some(t) => t.format("[%H:%M:%S]").to_string(),
        None => "[--:--:--]".to_owned(),
    };
    style.dim(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_style_has_no_escape_codes() {
        let event = ClientEvent::Message(chatproto::MessageFrame {
            from: "bob".parse().unwrap(),
            text: "hi".parse().unwrap(),
            sent_at: Timestamp::from_unix_millis(1_700_000_000_000),
            offline: true,
        });
        let line = event_line(&event, Style::Plain, Timestamp::ZERO).unwrap();
        assert!(!line.contains('\x1b'));
        assert!(
            line.ends_with("bob (sent while you were offline): hi"),
            "{line}"
        );
        let colored = event_line(&event, Style::Color, Timestamp::ZERO).unwrap();
        assert!(colored.contains("\x1b["));
    }

    #[test]
    fn exit_statuses_tell_endings_apart() {
        let codes: Vec<u8> = [
            Some(ByeReason::Logout),
            Some(ByeReason::IdleTimeout),
            Some(ByeReason::ServerShutdown),
            None,
        ]
        .into_iter()
        .map(|r| closed(r).1)
        .collect();
        assert_eq!(codes, [0, 3, 4, 5]);
    }
}
