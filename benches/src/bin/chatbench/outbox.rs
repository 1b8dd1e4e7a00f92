//! A non-blocking socket's pending output: bytes queued by a load client
//! and written as the socket takes them, many frames per syscall, with
//! writable interest asked of the poller only while output is backed up.

use std::io::{self, Write};
use std::net::TcpStream;

use polling::{Event, PollMode, Poller};

#[derive(Debug, Default)]
pub struct Outbox {
    /// Bytes waiting to be written.
    pub out: Vec<u8>,
    written: usize,
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

    /// Writes what is queued, as far as `stream` takes it, and watches for
    /// writability (under `key`) only while output is backed up.
    pub fn flush(&mut self, stream: &TcpStream, poller: &Poller, key: usize) -> io::Result<()> {
        while self.written < self.out.len() {
            match (&*stream).write(&self.out[self.written..]) {
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
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
