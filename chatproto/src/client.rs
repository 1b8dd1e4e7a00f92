//! The client state machine: commands out as frames, frames in as typed
//! events, and the session's bookkeeping.
//!
//! It is the client-side mirror of [`crate::Server`], and just as free of
//! I/O: feed it what the socket read ([`Client::handle_input`]), send what
//! [`Client::poll_transmit`] gives, and act on [`Client::poll_event`].

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use uuid::Uuid;

use crate::command::{Command, DebugTarget};
use crate::framing::{FrameDecoder, FrameError};
use crate::request::{Request, RequestId};
use crate::server_frame::{
    BroadcastFrame, ByeReason, ErrorFrame, MessageFrame, OkFrame, PresenceFrame, Reply, ServerFrame,
};
use crate::username::Username;

/// The default largest frame a client accepts (1 MiB): answers such as a
/// `whoelse` on a busy server are larger than any request.
pub const DEFAULT_CLIENT_MAX_FRAME_BYTES: usize = 1024 * 1024;

/// One client session.
///
/// ```
/// use chatproto::{Client, ClientEvent, Command};
///
/// let mut client = Client::new();
/// let id = client.send(Command::parse("login alice wonderland").unwrap()).unwrap();
/// let frame = client.poll_transmit().unwrap();
/// assert_eq!(&frame[..], b"{\"cmd\":\"login\",\"user\":\"alice\",\"password\":\"wonderland\",\"id\":1}\n");
///
/// client.handle_input(b"{\"type\":\"ok\",\"id\":1,\"cmd\":\"login\",\"user\":\"alice\",\"text\":\"welcome\"}\n");
/// match client.poll_event() {
///     Some(ClientEvent::Ok { request: Some(r), .. }) => assert_eq!(r.id, id),
///     other => panic!("{other:?}"),
/// }
/// assert_eq!(client.state().user.unwrap().as_str(), "alice");
/// ```
#[derive(Debug)]
pub struct Client {
    decoder: FrameDecoder,
    transmit: VecDeque<Bytes>,
    queued_bytes: usize,
    events: VecDeque<ClientEvent>,
    next_id: u64,
    pending: BTreeMap<RequestId, PendingRequest>,
    session: Option<Uuid>,
    version: Option<u32>,
    user: Option<Username>,
    frames_sent: u64,
    frames_received: u64,
    closed: Option<ByeReason>,
}

/// A request sent and not yet answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRequest {
    /// Its id.
    pub id: RequestId,
    /// What was asked (a login's password prints as `***`).
    pub command: Command,
}

/// What the server told the client.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The server's greeting.
    Connected {
        /// This session's id.
        session: Uuid,
        /// The server's protocol version.
        version: u32,
    },
    /// A request succeeded.
    Ok {
        /// The request answered, when the answer's id matched one.
        request: Option<PendingRequest>,
        /// The answer.
        frame: OkFrame,
    },
    /// A request (or a frame) was refused.
    Error {
        /// The request refused, when the answer's id matched one.
        request: Option<PendingRequest>,
        /// The error.
        frame: ErrorFrame,
    },
    /// A direct message.
    Message(MessageFrame),
    /// A broadcast.
    Broadcast(BroadcastFrame),
    /// Someone came or went.
    Presence(PresenceFrame),
    /// The server said `bye`; it closes the connection next.
    Closed {
        /// Why.
        reason: ByeReason,
    },
    /// A line from the server that this version cannot read (perhaps from
    /// a newer server).
    Invalid {
        /// What was wrong with it.
        error: String,
        /// The request it answers, when its `id` could still be read: the
        /// request is no longer pending.
        request: Option<PendingRequest>,
    },
}

/// The session as the client sees it: what `debug client` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientState {
    /// The session id from `hello`.
    pub session: Option<Uuid>,
    /// The server's protocol version.
    pub version: Option<u32>,
    /// Who is logged in.
    pub user: Option<Username>,
    /// Frames handed to the transport.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Requests awaiting an answer, oldest first.
    pub pending: Vec<PendingRequest>,
    /// Bytes queued and not yet handed to the transport.
    pub queued_output_bytes: usize,
    /// The `bye` reason, once the server said it.
    pub closed: Option<ByeReason>,
}

/// A command the client will not send.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// `debug client` is answered locally: see [`Client::state`].
    #[error("'debug client' is answered by the client itself")]
    LocalCommand,
    /// The server has said `bye`.
    #[error("the server closed this session ({0})")]
    Closed(ByeReason),
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    /// A client for a fresh connection.
    pub fn new() -> Self {
        Client::with_max_frame_bytes(DEFAULT_CLIENT_MAX_FRAME_BYTES)
    }

    /// A client that accepts server frames of up to `max_frame_bytes`.
    pub fn with_max_frame_bytes(max_frame_bytes: usize) -> Self {
        Client {
            decoder: FrameDecoder::new(max_frame_bytes),
            transmit: VecDeque::new(),
            queued_bytes: 0,
            events: VecDeque::new(),
            next_id: 1,
            pending: BTreeMap::new(),
            session: None,
            version: None,
            user: None,
            frames_sent: 0,
            frames_received: 0,
            closed: None,
        }
    }

    /// Queues `command` as a JSON request with a fresh id, and returns the
    /// id its answer will carry.
    pub fn send(&mut self, command: Command) -> Result<RequestId, SendError> {
        if let Some(reason) = self.closed {
            return Err(SendError::Closed(reason));
        }
        if matches!(
            command,
            Command::Debug {
                target: DebugTarget::Client
            }
        ) {
            return Err(SendError::LocalCommand);
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let request = Request {
            id: Some(id),
            command,
        };
        let frame = request.encode();
        self.queued_bytes += frame.len();
        self.transmit.push_back(frame);
        self.pending.insert(
            id,
            PendingRequest {
                id,
                command: request.command,
            },
        );
        Ok(id)
    }

    /// The next frame to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        let frame = self.transmit.pop_front()?;
        self.queued_bytes -= frame.len();
        self.frames_sent += 1;
        Some(frame)
    }

    /// Bytes read from the server, cut anywhere.
    pub fn handle_input(&mut self, data: &[u8]) {
        let mut decoder = std::mem::replace(&mut self.decoder, FrameDecoder::new(0));
        let mut input = data;
        while let Some(frame) = decoder.decode(&mut input) {
            self.handle_frame(frame);
        }
        self.decoder = decoder;
    }

    /// One whole frame from the server, already split from the stream
    /// (without its line ending), or the framing error in its place: for a
    /// caller that splits frames itself, such as one that also prints
    /// them raw, or a transport that keeps message boundaries.
    ///
    /// ```
    /// # use chatproto::{Client, ClientEvent};
    /// let mut client = Client::default();
    /// client.handle_frame(Ok(br#"{"type":"presence","user":"bob","online":true}"#));
    /// assert!(matches!(client.poll_event(), Some(ClientEvent::Presence(_))));
    /// ```
    pub fn handle_frame(&mut self, frame: Result<&[u8], FrameError>) {
        self.frames_received += 1;
        let event = match frame {
            Ok(frame) => match ServerFrame::decode(frame) {
                Ok(frame) => self.on_frame(frame),
                Err(e) => ClientEvent::Invalid {
                    error: e.to_string(),
                    request: answer_id(frame).and_then(|id| self.pending.remove(&id)),
                },
            },
            Err(e @ FrameError::TooLarge { .. }) => ClientEvent::Invalid {
                error: e.to_string(),
                request: None,
            },
        };
        self.events.push_back(event);
    }

    /// The next event, if any. Drain it after every `handle_input`.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// The session's state.
    pub fn state(&self) -> ClientState {
        ClientState {
            session: self.session,
            version: self.version,
            user: self.user.clone(),
            frames_sent: self.frames_sent,
            frames_received: self.frames_received,
            pending: self.pending.values().cloned().collect(),
            queued_output_bytes: self.queued_bytes,
            closed: self.closed,
        }
    }

    /// Who is logged in.
    pub fn user(&self) -> Option<&Username> {
        self.user.as_ref()
    }

    /// Whether requests are awaiting answers.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the server has said `bye`.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    fn on_frame(&mut self, frame: ServerFrame) -> ClientEvent {
        match frame {
            ServerFrame::Hello { session, version } => {
                self.session = Some(session);
                self.version = Some(version);
                ClientEvent::Connected { session, version }
            }
            ServerFrame::Ok(frame) => {
                match &frame.reply {
                    Reply::Login { user } => self.user = Some(user.clone()),
                    Reply::Logout => self.user = None,
                    _ => {}
                }
                let request = frame.id.and_then(|id| self.pending.remove(&id));
                ClientEvent::Ok { request, frame }
            }
            ServerFrame::Error(frame) => {
                let request = frame.id.and_then(|id| self.pending.remove(&id));
                ClientEvent::Error { request, frame }
            }
            ServerFrame::Message(m) => ClientEvent::Message(m),
            ServerFrame::Broadcast(b) => ClientEvent::Broadcast(b),
            ServerFrame::Presence(p) => ClientEvent::Presence(p),
            ServerFrame::Bye { reason } => {
                self.closed = Some(reason);
                self.user = None;
                ClientEvent::Closed { reason }
            }
        }
    }
}

/// The `id` of an `ok` or `error` frame this version cannot otherwise read,
/// so that its request does not stay pending for ever.
fn answer_id(frame: &[u8]) -> Option<RequestId> {
    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        id: Option<u64>,
    }
    let answer: Answer<'_> = serde_json::from_slice(frame).ok()?;
    matches!(&*answer.kind, "ok" | "error")
        .then_some(answer.id)
        .flatten()
        .map(RequestId)
}
