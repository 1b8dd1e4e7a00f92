//! A non-blocking socket's pending output: bytes queued by a load client
//! and written as the socket takes them, many frames per syscall, with
//! writable interest asked of the poller only while output is backed up.

use std::io::{self, Write};
use std::net::TcpStream;

use polling::{Event, PollMode, Poller};

#[derive(Debug, Default)]
pub struct Outbox {
    /// Bytes waiting to be written: lines, turned into WebSocket messages
    /// at the flush for a client that speaks WebSocket.
    pub out: Vec<u8>,
    written: usize,
    /// A WebSocket client's mask; `None` for lines over TCP.
    websocket: Option<[u8; 4]>,
    /// How much of `out` is already framed as WebSocket messages.
    framed: usize,
    /// Reused for framing.
    scratch: Vec<u8>,
    /// Whether the poller watches the socket for writability, so a flush
    /// re-registers only when that changes.
    wants_write: bool,
}

impl Outbox {
    /// An outbox holding `out`.
    pub fn new(out: Vec<u8>) -> Self {
        Outbox {
            out,
            ..Outbox::default()
        }
    }

    /// An outbox that sends its lines as WebSocket messages, masked with
    /// `mask`, starting with `out` (lines).
    pub fn websocket(out: Vec<u8>, mask: [u8; 4]) -> Self {
        Outbox {
            out,
            websocket: Some(mask),
            ..Outbox::default()
        }
    }

    /// Writes what is queued, as far as `stream` takes it, and watches for
    /// writability (under `key`) only while output is backed up.
    pub fn flush(&mut self, stream: &TcpStream, poller: &Poller, key: usize) -> io::Result<()> {
        if let Some(mask) = self.websocket {
            if self.framed < self.out.len() {
                self.scratch.clear();
                let taken =
                    crate::ws::frame_lines(&self.out[self.framed..], mask, &mut self.scratch);
                let rest = self.out.split_off(self.framed + taken);
                self.out.truncate(self.framed);
                self.out.extend_from_slice(&self.scratch);
                self.framed = self.out.len();
                self.out.extend_from_slice(&rest);
            }
        }
        let ready = match self.websocket {
            Some(_) => self.framed,
            None => self.out.len(),
        };
        while self.written < ready {
            match (&*stream).write(&self.out[self.written..ready]) {
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
            self.framed = 0;
        }
        let wants_write = !self.out.is_empty();
        if wants_write == self.wants_write {
            return Ok(());
        }
        self.wants_write = wants_write;
        let interest = if wants_write {
            Event::all(key)
        } else {
            Event::readable(key)
        };
        poller.modify_with_mode(stream, interest, PollMode::Level)
    }
}
