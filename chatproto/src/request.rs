//! Requests: one client-to-server frame, JSON or inline, into a [`Command`].
//!
//! A frame whose first non-blank byte is `{` is a JSON request object; any
//! other frame is an inline line for [`Command::parse`]. Both give the same
//! [`Command`], so the rest of the core never knows which form arrived.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::command::{usage, Command, CommandName, DebugTarget};
use crate::error::{shorten, RequestError};
use crate::framing::encode_frame;
use crate::password::Password;
use crate::text::MessageText;
use crate::username::Username;

/// The `id` a client puts on a JSON request; the server copies it into the
/// `ok` or `error` that answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One decoded client frame.
///
/// ```
/// use chatproto::{Command, Request, RequestId};
///
/// let r = Request::parse_frame(br#"{"cmd":"whoelsesince","seconds":60,"id":7}"#).unwrap();
/// assert_eq!(r.id, Some(RequestId(7)));
/// assert_eq!(r.command, Command::Whoelsesince { seconds: 60 });
///
/// let r = Request::parse_frame(b"whoelsesince 60").unwrap();
/// assert_eq!((r.id, r.command), (None, Command::Whoelsesince { seconds: 60 }));
///
/// let rejected = Request::parse_frame(br#"{"cmd":"fly","id":8}"#).unwrap_err();
/// assert_eq!(rejected.id, Some(RequestId(8)));
/// assert_eq!(rejected.error.code(), chatproto::ErrorCode::UnknownCommand);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The id to copy into the answer (JSON requests only).
    pub id: Option<RequestId>,
    /// What is asked.
    pub command: Command,
}

/// A frame that is not a valid request, with the id to answer it under
/// when one could be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct Rejected {
    /// The request's id, if the frame got far enough to have one.
    pub id: Option<RequestId>,
    /// Why it was refused.
    pub error: RequestError,
}

impl Request {
    /// Decodes one frame (as yielded by [`crate::FrameDecoder`]).
    pub fn parse_frame(frame: &[u8]) -> Result<Request, Rejected> {
        let text = std::str::from_utf8(frame).map_err(|e| Rejected {
            id: None,
            error: RequestError::bad_frame(format!(
                "not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            )),
        })?;
        if text.trim_start_matches([' ', '\t']).starts_with('{') {
            Request::from_json(text)
        } else {
            Command::parse(text)
                .map(|command| Request { id: None, command })
                .map_err(|error| Rejected { id: None, error })
        }
    }

    /// Decodes a JSON request object.
    pub fn from_json(json: &str) -> Result<Request, Rejected> {
        // The common case, every field of the expected type, decodes
        // straight into borrowed fields; anything else (a type mismatch, an
        // escaped string, a duplicate key) takes the slower path through a
        // JSON map, which tells exactly what is wrong.
        match serde_json::from_str::<TypedRequest<'_>>(json) {
            Ok(typed) => Request::from_typed(&typed),
            Err(_) => Request::from_json_map(json),
        }
    }

    fn from_typed(typed: &TypedRequest<'_>) -> Result<Request, Rejected> {
        let id = typed.id.map(RequestId);
        let name = command_name(typed.cmd).map_err(|error| Rejected { id, error })?;
        let fields = Fields {
            source: Source::Typed(typed),
            name,
        };
        command_from_fields(&fields)
            .map(|command| Request { id, command })
            .map_err(|error| Rejected { id, error })
    }

    fn from_json_map(json: &str) -> Result<Request, Rejected> {
        let mut object: Map<String, Value> = serde_json::from_str(json).map_err(|e| Rejected {
            id: None,
            error: RequestError::bad_frame(format!("not a JSON request object ({e})")),
        })?;
        let id = match object.remove("id") {
            None => None,
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().map(RequestId),
            Some(_) => {
                return Err(Rejected {
                    id: None,
                    error: RequestError::bad_frame("\"id\" must be an unsigned integer"),
                })
            }
        };
        let reject = |error| Rejected { id, error };
        let word = match object.get("cmd") {
            Some(Value::String(word)) => word.as_str(),
            Some(_) => return Err(reject(RequestError::bad_frame("\"cmd\" must be a string"))),
            None => return Err(reject(RequestError::bad_frame("missing \"cmd\""))),
        };
        let name = command_name(word).map_err(reject)?;
        let fields = Fields {
            source: Source::Map(&object),
            name,
        };
        command_from_fields(&fields)
            .map(|command| Request { id, command })
            .map_err(reject)
    }

    /// The JSON request object for this request.
    pub fn to_json(&self) -> String {
        /// The wire layout: the command's fields, then the id.
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(flatten)]
            command: &'a Command,
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<RequestId>,
        }
        let wire = Wire {
            command: &self.command,
            id: self.id,
        };
        // Commands hold only strings and integers: serializing cannot fail.
        serde_json::to_string(&wire).expect("requests always serialize")
    }

    /// The JSON request as a frame, newline included, ready to send.
    pub fn encode(&self) -> Bytes {
        encode_frame(self.to_json().as_bytes())
    }
}

/// A command word exactly as the protocol spells it (JSON is not typed by
/// people, so no case folding).
fn command_name(word: &str) -> Result<CommandName, RequestError> {
    CommandName::from_word(word)
        .filter(|n| n.as_str() == word)
        .ok_or_else(|| RequestError::unknown_command(word))
}

/// Every field any request has, each of its expected type, borrowed from
/// the frame. Unknown fields are ignored, as the protocol says.
#[derive(Deserialize)]
struct TypedRequest<'a> {
    cmd: &'a str,
    #[serde(default, deserialize_with = "present")]
    id: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    user: Option<&'a str>,
    #[serde(default, deserialize_with = "present")]
    password: Option<&'a str>,
    #[serde(default, deserialize_with = "present")]
    to: Option<&'a str>,
    #[serde(default, deserialize_with = "present")]
    text: Option<&'a str>,
    #[serde(default, deserialize_with = "present")]
    target: Option<&'a str>,
    #[serde(default, deserialize_with = "present")]
    seconds: Option<u64>,
}

/// A field that is there must hold a value: `null` is a type error (and
/// so takes the precise path), not an absent field.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

fn command_from_fields(f: &Fields<'_>) -> Result<Command, RequestError> {
    Ok(match f.name {
        CommandName::Login => Command::Login {
            user: f.username("user")?,
            password: Password::new(f.string("password")?).map_err(|e| f.invalid("password", e))?,
        },
        CommandName::Logout => Command::Logout,
        CommandName::Message => Command::Message {
            to: f.username("to")?,
            text: f.text()?,
        },
        CommandName::Broadcast => Command::Broadcast { text: f.text()? },
        CommandName::Whoami => Command::Whoami,
        CommandName::Whoelse => Command::Whoelse,
        CommandName::Whoelsesince => Command::Whoelsesince {
            seconds: f.seconds()?,
        },
        CommandName::Block => Command::Block {
            user: f.username("user")?,
        },
        CommandName::Unblock => Command::Unblock {
            user: f.username("user")?,
        },
        CommandName::Help => Command::Help,
        CommandName::Debug => Command::Debug {
            target: match f.string("target")? {
                "server" => DebugTarget::Server,
                "client" => DebugTarget::Client,
                other => {
                    let problem = format!("unknown debug target {:?}", shorten(other, 32));
                    return Err(usage(f.name, &problem));
                }
            },
        },
    })
}

/// The fields of one JSON request, read with errors that name the field.
struct Fields<'a> {
    source: Source<'a>,
    name: CommandName,
}

/// Where the fields come from.
enum Source<'a> {
    /// Decoded with every field of its expected type.
    Typed(&'a TypedRequest<'a>),
    /// Decoded as a plain JSON object.
    Map(&'a Map<String, Value>),
}

impl<'a> Fields<'a> {
    fn string(&self, field: &str) -> Result<&'a str, RequestError> {
        let object = match self.source {
            Source::Typed(t) => {
                let value = match field {
                    "user" => t.user,
                    "password" => t.password,
                    "to" => t.to,
                    "text" => t.text,
                    "target" => t.target,
                    _ => None,
                };
                return value.ok_or_else(|| self.problem(field, "is missing"));
            }
            Source::Map(object) => object,
        };
        match object.get(field) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.problem(field, "must be a string")),
            None => Err(self.problem(field, "is missing")),
        }
    }

    fn username(&self, field: &str) -> Result<Username, RequestError> {
        Username::new(self.string(field)?).map_err(|e| self.invalid(field, e))
    }

    fn text(&self) -> Result<MessageText, RequestError> {
        MessageText::new(self.string("text")?).map_err(|e| self.invalid("text", e))
    }

    fn seconds(&self) -> Result<u64, RequestError> {
        let object = match self.source {
            Source::Typed(t) => {
                return t
                    .seconds
                    .ok_or_else(|| self.problem("seconds", "is missing"))
            }
            Source::Map(object) => object,
        };
        match object.get("seconds") {
            Some(Value::Number(n)) => n
                .as_u64()
                .ok_or_else(|| self.problem("seconds", "must be an unsigned integer")),
            Some(_) => Err(self.problem("seconds", "must be an unsigned integer")),
            None => Err(self.problem("seconds", "is missing")),
        }
    }

    fn invalid(&self, field: &str, e: impl std::fmt::Display) -> RequestError {
        self.problem(field, &format!("is invalid ({e})"))
    }

    fn problem(&self, field: &str, what: &str) -> RequestError {
        RequestError::bad_arguments(format!(
            "\"{field}\" {what}: {} takes {}",
            self.name,
            json_usage(self.name)
        ))
    }
}

fn json_usage(name: CommandName) -> &'static str {
    match name {
        CommandName::Login => "\"user\" and \"password\"",
        CommandName::Message => "\"to\" and \"text\"",
        CommandName::Broadcast => "\"text\"",
        CommandName::Whoelsesince => "\"seconds\"",
        CommandName::Block | CommandName::Unblock => "\"user\"",
        CommandName::Debug => "\"target\": \"server\"",
        _ => "no fields",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn rejected(frame: &str) -> (Option<RequestId>, ErrorCode) {
        let r = Request::parse_frame(frame.as_bytes()).unwrap_err();
        (r.id, r.error.code())
    }

    #[test]
    fn json_and_inline_give_the_same_command() {
        let json =
            Request::parse_frame(br#"{"cmd":"message","to":"bob","text":"hi there"}"#).unwrap();
        let inline = Request::parse_frame(b"message bob hi there").unwrap();
        assert_eq!(json, inline);
    }

    #[test]
    fn classifies_bad_json() {
        assert_eq!(rejected("{"), (None, ErrorCode::BadFrame));
        assert_eq!(rejected("{}"), (None, ErrorCode::BadFrame));
        assert_eq!(
            rejected(r#"{"cmd":1,"id":4}"#),
            (Some(RequestId(4)), ErrorCode::BadFrame)
        );
        assert_eq!(
            rejected(r#"{"cmd":"help","id":-1}"#),
            (None, ErrorCode::BadFrame)
        );
        assert_eq!(rejected(r#"[1,2]"#), (None, ErrorCode::UnknownCommand));
        assert_eq!(
            rejected(r#"{"cmd":"Help","id":2}"#),
            (Some(RequestId(2)), ErrorCode::UnknownCommand)
        );
        assert_eq!(
            rejected(r#"{"cmd":"message","to":"bob","id":3}"#),
            (Some(RequestId(3)), ErrorCode::BadArguments)
        );
        assert_eq!(
            rejected(r#"{"cmd":"whoelsesince","seconds":-5}"#),
            (None, ErrorCode::BadArguments)
        );
    }

    #[test]
    fn not_utf8_is_a_bad_frame() {
        let r = Request::parse_frame(b"message bob \xff").unwrap_err();
        assert_eq!(r.error.code(), ErrorCode::BadFrame);
    }

    #[test]
    fn to_json_round_trips() {
        let r = Request {
            id: Some(RequestId(9)),
            command: Command::parse("login alice pw").unwrap(),
        };
        assert_eq!(Request::from_json(&r.to_json()), Ok(r));
    }

    proptest::proptest! {
        /// The fast typed path and the precise map path agree on every
        /// object, well-formed or not.
        #[test]
        fn both_json_paths_agree(fields in proptest::collection::vec((0usize..9, 0usize..9), 0..7)) {
            const KEYS: [&str; 9] = ["cmd", "id", "user", "password", "to", "text", "target", "seconds", "extra"];
            const VALUES: [&str; 9] = [
                "\"message\"", "\"login\"", "\"bob\"", "\"a\\\"b\"", "7", "null", "true", "-1", "\"server\"",
            ];
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{}\":{}", KEYS[*k], VALUES[*v])).collect();
            let json = format!("{{{}}}", body.join(","));
            let fast = Request::from_json(&json);
            let precise = Request::from_json_map(&json);
            proptest::prop_assert_eq!(fast, precise, "{}", json);
        }
    }
}
