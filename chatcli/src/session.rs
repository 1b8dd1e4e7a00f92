//! The connection: the `chatproto` client state machine shared between the
//! thread that sends what the user types and the thread that receives.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::transport::Transport;
use chatproto::{
    ByeReason, Client, ClientEvent, ClientState, Command, ErrorFrame, FrameDecoder, Reply,
    RequestId, SendError, Timestamp, DEFAULT_CLIENT_MAX_FRAME_BYTES,
};

use crate::display::{self, Style};

/// What the receiving thread does with what it receives.
pub trait Sink: Send {
    /// One line for the user.
    fn line(&mut self, line: String);
}

/// What the receiving thread does when the session ends: it gets the sink,
/// the line that says why, and the exit status.
pub type OnEnd = Box<dyn FnOnce(Box<dyn Sink>, String, u8) + Send>;

/// How the receiving thread reports events.
#[derive(Debug, Clone, Copy)]
pub enum Format {
    /// Readable lines.
    Text(Style),
    /// Readable lines, except the answers to `login` and `logout`, which
    /// the prompt reports itself.
    Interactive(Style),
    /// The server's frames as they came.
    Json,
}

/// The session's state, behind one lock.
pub struct State {
    pub client: Client,
    /// User names seen (presence, listings, messages), for completion.
    pub names: BTreeSet<String>,
    login_answers: HashMap<RequestId, Result<(), ErrorFrame>>,
    /// `Some` once the session ended: the `bye` reason, or `None` if the
    /// connection was lost.
    ended: Option<Option<ByeReason>>,
}

pub struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The sending side.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
    /// Writes are whole frames, one sender at a time.
    writer: Arc<Mutex<Transport>>,
}

/// Why waiting for an answer stopped.
#[derive(Debug)]
pub enum WaitError {
    Ended,
    TimedOut,
}

impl Session {
    pub fn new(transport: &Transport) -> Session {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                client: Client::new(),
                names: BTreeSet::new(),
                login_answers: HashMap::new(),
                ended: None,
            }),
            changed: Condvar::new(),
        });
        Session {
            shared,
            writer: Arc::new(Mutex::new(transport.clone())),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        // A panic in the other thread while holding the lock leaves the
        // state usable for reading; keep going with it.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the receiving thread. `on_end` runs on it when the session
    /// ends, with the sink, the line that says why, and the exit status.
    pub fn start_receiving(
        &self,
        stream: Transport,
        format: Format,
        mut sink: Box<dyn Sink>,
        on_end: OnEnd,
    ) {
        let session = self.clone();
        std::thread::spawn(move || {
            let reason = session.receive(stream, format, sink.as_mut());
            let (line, code) = display::closed(reason);
            on_end(sink, line, code);
        });
    }

    /// Sends a command; returns its request id.
    pub fn send(&self, command: Command) -> Result<RequestId, SendError> {
        let (id, frames) = {
            let mut state = self.state();
            let id = state.client.send(command)?;
            let frames: Vec<_> = std::iter::from_fn(|| state.client.poll_transmit()).collect();
            (id, frames)
        };
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        for frame in frames {
            // A failed write means the connection is gone; the receiving
            // thread sees that too and ends the session.
            if writer.write_all(&frame).is_err() {
                break;
            }
        }
        Ok(id)
    }

    /// Waits for the answer to a `login` sent as `id`.
    pub fn wait_login(
        &self,
        id: RequestId,
        timeout: Duration,
    ) -> Result<Result<(), ErrorFrame>, WaitError> {
        self.wait_for(timeout, |state| state.login_answers.remove(&id))
    }

    /// Waits for the server's `hello`.
    pub fn wait_connected(&self, timeout: Duration) -> Result<(), WaitError> {
        self.wait_for(timeout, |state| state.client.state().session.map(|_| ()))
    }

    /// Waits until every request sent has its answer.
    pub fn wait_answered(&self, timeout: Duration) -> Result<(), WaitError> {
        self.wait_for(timeout, |state| (!state.client.has_pending()).then_some(()))
    }

    /// Waits until the session ends (after a logout, say), or the timeout;
    /// says whether it ended.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |state| state.ended.map(|_| ()))
            .is_ok()
    }

    /// Waits until `ready` returns something, the session ends, or the
    /// timeout passes; `ready` is asked first, so an answer that arrived
    /// just before the end still counts.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&mut State) -> Option<T>,
    ) -> Result<T, WaitError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        loop {
            if let Some(value) = ready(&mut state) {
                return Ok(value);
            }
            if state.ended.is_some() {
                return Err(WaitError::Ended);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WaitError::TimedOut);
            }
            state = match self.shared.changed.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Reads until the server closes; returns the `bye` reason.
    fn receive(&self, stream: Transport, format: Format, sink: &mut dyn Sink) -> Option<ByeReason> {
        let mut buf = vec![0; 64 * 1024];
        let mut raw_lines = FrameDecoder::new(DEFAULT_CLIENT_MAX_FRAME_BYTES);
        let mut reason = None;
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut lines = Vec::new();
            let mut state = self.state();
            if let Format::Json = format {
                // Each frame is split once: printed raw, then handed on.
                let mut input = &buf[..n];
                while let Some(frame) = raw_lines.decode(&mut input) {
                    if let Ok(frame) = frame {
                        sink.line(String::from_utf8_lossy(frame).into_owned());
                    }
                    state.client.handle_frame(frame);
                }
            } else {
                state.client.handle_input(&buf[..n]);
            }
            while let Some(event) = state.client.poll_event() {
                state.note(&event);
                if let ClientEvent::Closed { reason: r } = event {
                    reason = Some(r);
                }
                let style = match format {
                    Format::Text(style) => Some(style),
                    Format::Interactive(_) if is_login_answer(&event) => None,
                    Format::Interactive(style) => Some(style),
                    Format::Json => None,
                };
                lines.extend(style.and_then(|style| display::event_line(&event, style, now())));
            }
            if let Format::Interactive(_) = format {
                // The line editor takes printed lines one at a time, only
                // while it reads a line: printing can block until the main
                // thread is back in the editor, so never under the lock
                // the main thread needs.
                drop(state);
                self.shared.changed.notify_all();
                for line in lines {
                    sink.line(line);
                }
            } else {
                // Standard output never waits for the main thread: print
                // before anyone waiting on an answer sees it, so output
                // keeps the order of input.
                for line in lines {
                    sink.line(line);
                }
                drop(state);
                self.shared.changed.notify_all();
            }
            if reason.is_some() {
                break;
            }
        }
        self.state().ended = Some(reason);
        self.shared.changed.notify_all();
        reason
    }
}

impl State {
    /// Learns names and login answers from an event.
    fn note(&mut self, event: &ClientEvent) {
        match event {
            ClientEvent::Presence(p) => {
                self.names.insert(p.user.to_string());
            }
            ClientEvent::Message(m) => {
                self.names.insert(m.from.to_string());
            }
            ClientEvent::Broadcast(b) => {
                self.names.insert(b.from.to_string());
            }
            ClientEvent::Ok { request, frame } => {
                if let Reply::Whoelse { users } | Reply::Whoelsesince { users } = &frame.reply {
                    self.names.extend(users.iter().map(|u| u.to_string()));
                }
                if let (Some(r), Reply::Login { .. }) = (request, &frame.reply) {
                    self.login_answers.insert(r.id, Ok(()));
                }
            }
            ClientEvent::Error {
                request: Some(r),
                frame,
            } => {
                if matches!(r.command, Command::Login { .. }) {
                    self.login_answers.insert(r.id, Err(frame.clone()));
                }
            }
            _ => {}
        }
    }

    /// `debug client`, in one line.
    pub fn debug_line(&self) -> String {
        let s: ClientState = self.client.state();
        let pending: Vec<String> = s
            .pending
            .iter()
            .map(|p| format!("{} {}", p.id, p.command))
            .collect();
        format!(
            "session {}, user {}, protocol v{}, {} frames sent, {} received, {} awaiting answers{}, {} bytes queued",
            s.session.map_or("-".to_owned(), |u| u.to_string()),
            s.user.as_ref().map_or("-", |u| u.as_str()),
            s.version.unwrap_or(0),
            s.frames_sent,
            s.frames_received,
            s.pending.len(),
            if pending.is_empty() { String::new() } else { format!(" ({})", pending.join("; ")) },
            s.queued_output_bytes,
        )
    }
}

fn is_login_answer(event: &ClientEvent) -> bool {
    match event {
        ClientEvent::Ok { request, .. } | ClientEvent::Error { request, .. } => request
            .as_ref()
            .is_some_and(|r| matches!(r.command, Command::Login { .. } | Command::Logout)),
        _ => false,
    }
}

/// The wall-clock time, for stamping presence notices.
fn now() -> Timestamp {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::from_unix_millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}
