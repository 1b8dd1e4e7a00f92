//! Requests: one client-to-server frame, JSON or inline, into a [`Command`].
//!
//! A frame whose first non-blank byte is `{` is a JSON request object; any
//! other frame is an inline line for [`Command::parse`]. Both give the same
//! [`Command`], so the rest of the core never knows which form arrived.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

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
        // escaped string, a duplicate key, a number out of range) takes the
        // slower path through the object's members, which tells exactly
        // what is wrong.
        match serde_json::from_str::<TypedRequest<'_>>(json) {
            Ok(typed) => Request::from_typed(&typed),
            Err(_) => Request::from_json_object(json),
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

    fn from_json_object(json: &str) -> Result<Request, Rejected> {
        let members: Members<'_> = serde_json::from_str(json).map_err(|e| Rejected {
            id: None,
            error: RequestError::bad_frame(format!("not a JSON request object ({e})")),
        })?;
        // An id written twice cannot be trusted either way, so the answer
        // carries none, as for any id that cannot be read.
        let no_id = |error| Rejected { id: None, error };
        let id = match members.get("id").map_err(no_id)? {
            None => None,
            Some(raw) => Some(RequestId(serde_json::from_str(raw.get()).map_err(
                |_| {
                    no_id(RequestError::bad_frame(
                        "\"id\" must be an unsigned integer",
                    ))
                },
            )?)),
        };
        let reject = |error| Rejected { id, error };
        let word: String = match members.get("cmd").map_err(reject)? {
            Some(raw) => serde_json::from_str(raw.get())
                .map_err(|_| reject(RequestError::bad_frame("\"cmd\" must be a string")))?,
            None => return Err(reject(RequestError::bad_frame("missing \"cmd\""))),
        };
        let name = command_name(&word).map_err(reject)?;
        // A field of the command written twice is refused before any field
        // is read: which of the two was meant is not for the server to
        // guess. Other keys, unknown to this command, are ignored however
        // often they appear.
        for field in json_fields(name) {
            members.get(field).map_err(reject)?;
        }
        let fields = Fields {
            source: Source::Object(&members),
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

/// A JSON object as written: its members in order, each key unescaped and
/// each value left as its JSON text. Nothing in a value is decoded until
/// its field is read, so a number no type can hold (`1e400`, or thousands
/// of digits, which serde_json refuses outright) fails only the field it
/// is in, and a key written twice is seen rather than overwritten.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    /// The value of `key`; `bad_frame` if the key appears more than once.
    fn get(&self, key: &str) -> Result<Option<&'a RawValue>, RequestError> {
        let mut found = None;
        for (k, value) in &self.0 {
            if k == key {
                if found.is_some() {
                    return Err(RequestError::bad_frame(format!(
                        "\"{key}\" appears more than once"
                    )));
                }
                found = Some(*value);
            }
        }
        Ok(found)
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(Key(key)) = map.next_key()? {
                    members.push((key, map.next_value()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// An object key, borrowed from the frame unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }

            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }

            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }

            fn visit_string<E>(self, key: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key)))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

fn command_from_fields(f: &Fields<'_>) -> Result<Command, RequestError> {
    Ok(match f.name {
        CommandName::Login => Command::Login {
            user: f.username("user")?,
            password: Password::new(&f.string("password")?)
                .map_err(|e| f.invalid("password", e))?,
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
            target: match &*f.string("target")? {
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
    /// Read member by member, each value decoded as its field asks.
    Object(&'a Members<'a>),
}

impl<'a> Fields<'a> {
    fn string(&self, field: &str) -> Result<Cow<'a, str>, RequestError> {
        let members = match self.source {
            Source::Typed(t) => {
                let value = match field {
                    "user" => t.user,
                    "password" => t.password,
                    "to" => t.to,
                    "text" => t.text,
                    "target" => t.target,
                    _ => None,
                };
                return value
                    .map(Cow::Borrowed)
                    .ok_or_else(|| self.problem(field, "is missing"));
            }
            Source::Object(members) => members,
        };
        match members.get(field)? {
            // Owned: the text may have had escapes to undo.
            Some(raw) => serde_json::from_str::<String>(raw.get())
                .map(Cow::Owned)
                .map_err(|_| self.problem(field, "must be a string")),
            None => Err(self.problem(field, "is missing")),
        }
    }

    fn username(&self, field: &str) -> Result<Username, RequestError> {
        Username::new(&self.string(field)?).map_err(|e| self.invalid(field, e))
    }

    fn text(&self) -> Result<MessageText, RequestError> {
        MessageText::new(&self.string("text")?).map_err(|e| self.invalid("text", e))
    }

    fn seconds(&self) -> Result<u64, RequestError> {
        let members = match self.source {
            Source::Typed(t) => {
                return t
                    .seconds
                    .ok_or_else(|| self.problem("seconds", "is missing"))
            }
            Source::Object(members) => members,
        };
        match members.get("seconds")? {
            // Anything but a whole number from 0 to 2^64 - 1 (a sign, a
            // fraction, an exponent, too many digits) is not a count of
            // seconds.
            Some(raw) => serde_json::from_str::<u64>(raw.get())
                .map_err(|_| self.problem("seconds", "must be an unsigned integer")),
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

/// The fields a JSON request of `name` reads.
fn json_fields(name: CommandName) -> &'static [&'static str] {
    match name {
        CommandName::Login => &["user", "password"],
        CommandName::Message => &["to", "text"],
        CommandName::Broadcast => &["text"],
        CommandName::Whoelsesince => &["seconds"],
        CommandName::Block | CommandName::Unblock => &["user"],
        CommandName::Debug => &["target"],
        CommandName::Logout | CommandName::Whoami | CommandName::Whoelse | CommandName::Help => &[],
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

    #[test]
    fn a_number_out_of_range_is_judged_by_the_field_it_is_in() {
        let huge = "9".repeat(5_000);
        for number in ["1e400", "-1e400", huge.as_str()] {
            // In a command field: that field is invalid, and the answer
            // keeps the request's id.
            let frame = format!(r#"{{"cmd":"whoelsesince","seconds":{number},"id":3}}"#);
            assert_eq!(
                rejected(&frame),
                (Some(RequestId(3)), ErrorCode::BadArguments),
                "{frame}"
            );
            let frame = format!(r#"{{"cmd":"block","user":{number},"id":3}}"#);
            assert_eq!(
                rejected(&frame),
                (Some(RequestId(3)), ErrorCode::BadArguments),
                "{frame}"
            );
            // In the id: no id can be read.
            let frame = format!(r#"{{"cmd":"help","id":{number}}}"#);
            assert_eq!(rejected(&frame), (None, ErrorCode::BadFrame), "{frame}");
            // Elsewhere: ignored, as any unknown field is, whichever path
            // reads the frame (an escaped text takes the slower one).
            for frame in [
                format!(r#"{{"cmd":"help","x":{number},"id":4}}"#),
                format!(r#"{{"cmd":"whoami","seconds":{number},"id":4}}"#),
                format!(r#"{{"cmd":"block","user":"b\u006fb","x":[{number}],"id":4}}"#),
            ] {
                let request = Request::parse_frame(frame.as_bytes()).unwrap();
                assert_eq!(request.id, Some(RequestId(4)), "{frame}");
            }
        }
    }

    #[test]
    fn a_key_written_twice_is_a_bad_frame() {
        // The command word: once logged the second one won.
        assert_eq!(
            rejected(r#"{"cmd":"whoami","cmd":"logout","id":5}"#),
            (Some(RequestId(5)), ErrorCode::BadFrame)
        );
        // Even when the copies agree, and however the key is spelled.
        assert_eq!(
            rejected(r#"{"cmd":"help","\u0063md":"help","id":5}"#),
            (Some(RequestId(5)), ErrorCode::BadFrame)
        );
        // The id itself: no id to answer under.
        assert_eq!(
            rejected(r#"{"cmd":"help","id":5,"id":6}"#),
            (None, ErrorCode::BadFrame)
        );
        assert_eq!(
            rejected(r#"{"id":5,"cmd":"help","id":5}"#),
            (None, ErrorCode::BadFrame)
        );
        // A field of the command, before its values are judged.
        assert_eq!(
            rejected(r#"{"cmd":"block","user":"bob","user":"carol","id":7}"#),
            (Some(RequestId(7)), ErrorCode::BadFrame)
        );
        assert_eq!(
            rejected(r#"{"cmd":"login","user":"no way","password":"a","password":"b","id":8}"#),
            (Some(RequestId(8)), ErrorCode::BadFrame)
        );
        // A key the command does not read is ignored, however often.
        let request =
            Request::parse_frame(br#"{"cmd":"whoami","user":"a","user":"b","x":1,"x":2,"id":9}"#)
                .unwrap();
        assert_eq!(
            (request.id, request.command),
            (Some(RequestId(9)), Command::Whoami)
        );
    }

    proptest::proptest! {
        /// The fast typed path and the precise map path agree on every
        /// object, well-formed or not.
        #[test]
        fn both_json_paths_agree(fields in proptest::collection::vec((0usize..9, 0usize..10), 0..7)) {
            const KEYS: [&str; 9] = ["cmd", "id", "user", "password", "to", "text", "target", "seconds", "extra"];
            const VALUES: [&str; 10] = [
                "\"message\"", "\"login\"", "\"bob\"", "\"a\\\"b\"", "7", "null", "true", "-1", "\"server\"", "1e400",
            ];
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{}\":{}", KEYS[*k], VALUES[*v])).collect();
            let json = format!("{{{}}}", body.join(","));
            let fast = Request::from_json(&json);
            let precise = Request::from_json_object(&json);
            proptest::prop_assert_eq!(fast, precise, "{}", json);
        }
    }
}
