//! Commands: the typed form of every request, and the inline syntax people
//! type (`message bob hello there`), parsed and rendered.
//!
//! The server parses inline frames with [`Command::parse`]; the CLI parses
//! what its user types with the same function, so both agree on every line.
//! [`Command::render`] is the inverse: `Command::parse(&c.render()) == Ok(c)`.
//!
//! Grammar: the command word (any ASCII case) and its fixed arguments are
//! separated by runs of spaces or tabs. A trailing free text (`<text...>`)
//! starts after exactly one separator following the last fixed argument, and
//! runs to the end of the line untouched, so inner and trailing spacing is
//! kept as typed.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{shorten, RequestError};
use crate::password::Password;
use crate::text::MessageText;
use crate::username::Username;

/// A request, whatever form it arrived in.
///
/// ```
/// use chatproto::Command;
///
/// let c = Command::parse("message bob hello  there").unwrap();
/// assert_eq!(
///     c,
///     Command::Message { to: "bob".parse().unwrap(), text: "hello  there".parse().unwrap() }
/// );
/// assert_eq!(c.render(), "message bob hello  there");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Command {
    /// `login <user> <password>`
    Login {
        /// Who to log in as.
        user: Username,
        /// Their password.
        password: Password,
    },
    /// `logout`
    Logout,
    /// `message <user> <text...>`
    Message {
        /// The recipient.
        to: Username,
        /// What to say.
        text: MessageText,
    },
    /// `broadcast <text...>`
    Broadcast {
        /// What to say.
        text: MessageText,
    },
    /// `whoami`
    Whoami,
    /// `whoelse`
    Whoelse,
    /// `whoelsesince <seconds>`
    Whoelsesince {
        /// How far back to look.
        seconds: u64,
    },
    /// `block <user>`
    Block {
        /// Who to block.
        user: Username,
    },
    /// `unblock <user>`
    Unblock {
        /// Who to unblock.
        user: Username,
    },
    /// `help`
    Help,
    /// `debug server` (or `debug client`, which a client answers itself)
    Debug {
        /// Whose state to show.
        target: DebugTarget,
    },
}

/// The name of a command, without its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CommandName {
    /// `login`
    Login,
    /// `logout`
    Logout,
    /// `message`
    Message,
    /// `broadcast`
    Broadcast,
    /// `whoami`
    Whoami,
    /// `whoelse`
    Whoelse,
    /// `whoelsesince`
    Whoelsesince,
    /// `block`
    Block,
    /// `unblock`
    Unblock,
    /// `help`
    Help,
    /// `debug`
    Debug,
}

/// Whose state `debug` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DebugTarget {
    /// The server's counters (administrators only).
    Server,
    /// The client's own session state; never sent to a server.
    Client,
}

impl CommandName {
    /// Every command, in the order `help` lists them.
    pub const ALL: [CommandName; 11] = [
        CommandName::Login,
        CommandName::Logout,
        CommandName::Message,
        CommandName::Broadcast,
        CommandName::Whoami,
        CommandName::Whoelse,
        CommandName::Whoelsesince,
        CommandName::Block,
        CommandName::Unblock,
        CommandName::Help,
        CommandName::Debug,
    ];

    /// The command word.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Login => "login",
            CommandName::Logout => "logout",
            CommandName::Message => "message",
            CommandName::Broadcast => "broadcast",
            CommandName::Whoami => "whoami",
            CommandName::Whoelse => "whoelse",
            CommandName::Whoelsesince => "whoelsesince",
            CommandName::Block => "block",
            CommandName::Unblock => "unblock",
            CommandName::Help => "help",
            CommandName::Debug => "debug",
        }
    }

    /// How to type it, as `help` shows.
    pub fn usage(self) -> &'static str {
        match self {
            CommandName::Login => "login <user> <password>",
            CommandName::Logout => "logout",
            CommandName::Message => "message <user> <text...>",
            CommandName::Broadcast => "broadcast <text...>",
            CommandName::Whoami => "whoami",
            CommandName::Whoelse => "whoelse",
            CommandName::Whoelsesince => "whoelsesince <seconds>",
            CommandName::Block => "block <user>",
            CommandName::Unblock => "unblock <user>",
            CommandName::Help => "help",
            CommandName::Debug => "debug server",
        }
    }

    /// Looks up a command word, ignoring ASCII case.
    pub fn from_word(word: &str) -> Option<CommandName> {
        CommandName::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(word))
    }
}

impl fmt::Display for CommandName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DebugTarget {
    /// The target word.
    pub fn as_str(self) -> &'static str {
        match self {
            DebugTarget::Server => "server",
            DebugTarget::Client => "client",
        }
    }
}

impl Command {
    /// Parses one inline line, as a person types it.
    ///
    /// Errors are [`RequestError::UnknownCommand`] for an unknown command
    /// word and [`RequestError::BadArguments`] (with the usage) for anything
    /// wrong after it; an empty line is `BadArguments` too.
    pub fn parse(line: &str) -> Result<Command, RequestError> {
        let mut rest = Args::new(line);
        let Some(word) = rest.word() else {
            return Err(RequestError::bad_arguments(
                "empty command: type 'help' for the list",
            ));
        };
        let name =
            CommandName::from_word(word).ok_or_else(|| RequestError::unknown_command(word))?;
        let command = match name {
            CommandName::Login => {
                let user = rest.username(name)?;
                let password = rest.word().ok_or_else(|| usage(name, "missing password"))?;
                let password = Password::new(password).map_err(|e| usage(name, &e.to_string()))?;
                rest.end(name)?;
                Command::Login { user, password }
            }
            CommandName::Message => {
                let to = rest.username(name)?;
                let text = rest.text(name)?;
                Command::Message { to, text }
            }
            CommandName::Broadcast => Command::Broadcast {
                text: rest.text(name)?,
            },
            CommandName::Whoelsesince => {
                let word = rest
                    .word()
                    .ok_or_else(|| usage(name, "missing number of seconds"))?;
                let seconds = parse_seconds(word).map_err(|e| usage(name, &e))?;
                rest.end(name)?;
                Command::Whoelsesince { seconds }
            }
            CommandName::Block | CommandName::Unblock => {
                let user = rest.username(name)?;
                rest.end(name)?;
                if name == CommandName::Block {
                    Command::Block { user }
                } else {
                    Command::Unblock { user }
                }
            }
            CommandName::Debug => {
                let target = match rest.word() {
                    Some(w) if w.eq_ignore_ascii_case("server") => DebugTarget::Server,
                    Some(w) if w.eq_ignore_ascii_case("client") => DebugTarget::Client,
                    Some(w) => {
                        let problem = format!("unknown debug target {:?}", shorten(w, 32));
                        return Err(usage(name, &problem));
                    }
                    None => return Err(usage(name, "missing target")),
                };
                rest.end(name)?;
                Command::Debug { target }
            }
            CommandName::Logout
            | CommandName::Whoami
            | CommandName::Whoelse
            | CommandName::Help => {
                rest.end(name)?;
                match name {
                    CommandName::Logout => Command::Logout,
                    CommandName::Whoami => Command::Whoami,
                    CommandName::Whoelse => Command::Whoelse,
                    _ => Command::Help,
                }
            }
        };
        Ok(command)
    }

    /// The inline line for this command; [`Command::parse`] gives it back.
    /// A `login`'s password is written out in full, since the line is
    /// meant to be sent; `Display` and `Debug` print it as `***`.
    pub fn render(&self) -> String {
        match self {
            Command::Login { user, password } => format!("login {user} {}", password.expose()),
            other => other.to_string(),
        }
    }

    /// The command's name.
    pub fn name(&self) -> CommandName {
        match self {
            Command::Login { .. } => CommandName::Login,
            Command::Logout => CommandName::Logout,
            Command::Message { .. } => CommandName::Message,
            Command::Broadcast { .. } => CommandName::Broadcast,
            Command::Whoami => CommandName::Whoami,
            Command::Whoelse => CommandName::Whoelse,
            Command::Whoelsesince { .. } => CommandName::Whoelsesince,
            Command::Block { .. } => CommandName::Block,
            Command::Unblock { .. } => CommandName::Unblock,
            Command::Help => CommandName::Help,
            Command::Debug { .. } => CommandName::Debug,
        }
    }
}

impl fmt::Display for Command {
    /// The inline form, fit for logs: a `login`'s password shows as `***`
    /// (use [`Command::render`] for the line to send).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        match self {
            Command::Login { user, password } => write!(f, "{name} {user} {password}"),
            Command::Message { to, text } => write!(f, "{name} {to} {text}"),
            Command::Broadcast { text } => write!(f, "{name} {text}"),
            Command::Whoelsesince { seconds } => write!(f, "{name} {seconds}"),
            Command::Block { user } | Command::Unblock { user } => write!(f, "{name} {user}"),
            Command::Debug { target } => write!(f, "{name} {}", target.as_str()),
            Command::Logout | Command::Whoami | Command::Whoelse | Command::Help => {
                f.write_str(name.as_str())
            }
        }
    }
}

/// Parses `<seconds>`: plain decimal digits that fit in a `u64`.
fn parse_seconds(word: &str) -> Result<u64, String> {
    let shown = shorten(word, 32);
    if word.is_empty() || !word.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{shown:?} is not a whole number of seconds"));
    }
    word.parse::<u64>()
        .map_err(|_| format!("{shown:?} is too large a number of seconds"))
}

/// A `bad_arguments` error that shows how to type the command.
pub(crate) fn usage(name: CommandName, problem: &str) -> RequestError {
    RequestError::bad_arguments(format!("{problem}: usage: {}", name.usage()))
}

/// The unparsed remainder of an inline line.
struct Args<'a> {
    rest: &'a str,
}

impl<'a> Args<'a> {
    fn new(line: &'a str) -> Self {
        Args { rest: line }
    }

    /// The next word, skipping separators before it.
    fn word(&mut self) -> Option<&'a str> {
        let trimmed = self.rest.trim_start_matches(is_separator);
        if trimmed.is_empty() {
            self.rest = trimmed;
            return None;
        }
        let end = trimmed.find(is_separator).unwrap_or(trimmed.len());
        let (word, rest) = trimmed.split_at(end);
        self.rest = rest;
        Some(word)
    }

    fn username(&mut self, name: CommandName) -> Result<Username, RequestError> {
        let word = self
            .word()
            .ok_or_else(|| usage(name, "missing user name"))?;
        Username::new(word).map_err(|e| usage(name, &e.to_string()))
    }

    /// Everything after the one separator that ends the previous word.
    fn text(&mut self, name: CommandName) -> Result<MessageText, RequestError> {
        let text = match self.rest.chars().next() {
            Some(c) if is_separator(c) => &self.rest[c.len_utf8()..],
            _ => self.rest,
        };
        self.rest = "";
        if text.trim().is_empty() {
            return Err(usage(name, "missing message text"));
        }
        MessageText::new(text).map_err(|e| usage(name, &e.to_string()))
    }

    fn end(&mut self, name: CommandName) -> Result<(), RequestError> {
        match self.word() {
            None => Ok(()),
            Some(extra) => Err(usage(name, &format!("unexpected {:?}", shorten(extra, 32)))),
        }
    }
}

fn is_separator(c: char) -> bool {
    c == ' ' || c == '\t'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn code(line: &str) -> ErrorCode {
        Command::parse(line).unwrap_err().code()
    }

    #[test]
    fn parses_each_command() {
        assert_eq!(Command::parse("logout"), Ok(Command::Logout));
        assert_eq!(Command::parse("  WhoAmI  "), Ok(Command::Whoami));
        assert_eq!(
            Command::parse("whoelsesince 300"),
            Ok(Command::Whoelsesince { seconds: 300 })
        );
        assert_eq!(
            Command::parse("debug server"),
            Ok(Command::Debug {
                target: DebugTarget::Server
            })
        );
        assert_eq!(
            Command::parse("broadcast \t hi  "),
            Ok(Command::Broadcast {
                text: MessageText::new("\t hi  ").unwrap()
            })
        );
    }

    #[test]
    fn rejects_bad_lines_with_the_right_code() {
        assert_eq!(code("mesage bob hi"), ErrorCode::UnknownCommand);
        assert_eq!(code(""), ErrorCode::BadArguments);
        assert_eq!(code("message bob"), ErrorCode::BadArguments);
        assert_eq!(code("message bob  "), ErrorCode::BadArguments);
        assert_eq!(code("message b!b hi"), ErrorCode::BadArguments);
        assert_eq!(code("whoelsesince -1"), ErrorCode::BadArguments);
        assert_eq!(
            code("whoelsesince 99999999999999999999"),
            ErrorCode::BadArguments
        );
        assert_eq!(code("whoami now"), ErrorCode::BadArguments);
        assert_eq!(code("login bob"), ErrorCode::BadArguments);
        assert_eq!(code("login bob pw extra"), ErrorCode::BadArguments);
        assert_eq!(code("debug"), ErrorCode::BadArguments);
        assert_eq!(code("debug everything"), ErrorCode::BadArguments);
    }

    #[test]
    fn usage_is_in_the_error_text() {
        let e = Command::parse("block").unwrap_err();
        assert_eq!(e.to_string(), "missing user name: usage: block <user>");
    }

    #[test]
    fn login_debug_hides_the_password() {
        let c = Command::parse("login bob s3cret").unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.to_string(), "login bob ***");
        assert_eq!(c.render(), "login bob s3cret");
    }
}
