//! One connection's outgoing frames, written with vectored writes.
//!
//! Frames are queued as the core produced them (shared `Bytes`, never
//! copied) and written many per syscall. A partial write leaves the rest of
//! its frame at the front, so frames are never interleaved or cut.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::{Buf, Bytes};

/// Frames per `write_vectored` call: enough to batch a burst, small enough
/// to build the slice array on the stack.
const MAX_SLICES: usize = 64;

/// Queue slots an empty queue may keep (an idle connection keeps none).
const SHRINK_ABOVE: usize = 0;

#[derive(Debug, Default)]
pub struct OutputQueue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// The front frame is partly written.
    front_started: bool,
}

/// How far a write got.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything was written.
    All,
    /// The socket would block; the rest waits for writability.
    Blocked,
}

impl OutputQueue {
    pub fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Bytes queued and not yet written.
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames queued (a partly written one included).
    pub fn frames(&self) -> usize {
        self.frames.len()
    }

    /// Drops every frame not yet started, keeping a partly written one so
    /// the peer never sees half a line followed by another frame.
    pub fn drop_unstarted(&mut self) {
        let keep = usize::from(self.front_started);
        for frame in self.frames.drain(keep..) {
            self.bytes -= frame.len();
        }
    }

    /// Writes until the queue is empty or the writer would block.
    pub fn write_to(&mut self, writer: &mut impl Write) -> io::Result<Flushed> {
        while !self.frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = self.frames.len().min(MAX_SLICES);
            for (slice, frame) in slices.iter_mut().zip(self.frames.iter()) {
                *slice = IoSlice::new(frame);
            }
            match writer.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.consume(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // A burst (a presence storm, a long whoelse) can grow the queue;
        // an idle connection should not keep that memory.
        if self.frames.capacity() > SHRINK_ABOVE {
            self.frames = VecDeque::new();
        }
        Ok(Flushed::All)
    }

    fn consume(&mut self, mut written: usize) {
        self.bytes -= written;
        while written > 0 {
            let front = self
                .frames
                .front_mut()
                .expect("wrote no more than was queued");
            if written < front.len() {
                front.advance(written);
                self.front_started = true;
                return;
            }
            written -= front.len();
            self.frames.pop_front();
            self.front_started = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `limit` bytes per call, then blocks once out of budget.
    struct Trickle {
        taken: Vec<u8>,
        limit: usize,
        budget: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.limit - n).min(self.budget - n);
                self.taken.extend_from_slice(&b[..take]);
                n += take;
                if take < b.len() {
                    break;
                }
            }
            self.budget -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn queue(frames: &[&str]) -> OutputQueue {
        let mut q = OutputQueue::default();
        for f in frames {
            q.push(Bytes::copy_from_slice(f.as_bytes()));
        }
        q
    }

    #[test]
    fn many_frames_go_in_one_call() {
        let mut q = queue(&["a\n", "bb\n", "ccc\n"]);
        let mut w = Trickle {
            taken: vec![],
            limit: 100,
            budget: 100,
            calls: 0,
        };
        assert_eq!(q.write_to(&mut w).unwrap(), Flushed::All);
        assert_eq!(w.taken, b"a\nbb\nccc\n");
        assert_eq!(w.calls, 1);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let mut q = queue(&["hello\n", "world\n"]);
        let mut w = Trickle {
            taken: vec![],
            limit: 4,
            budget: 7,
            calls: 0,
        };
        assert_eq!(q.write_to(&mut w).unwrap(), Flushed::Blocked);
        assert_eq!(q.len(), 5);
        // Unstarted frames may be dropped; the started one stays whole.
        q.push(Bytes::from_static(b"later\n"));
        q.drop_unstarted();
        w.budget = 100;
        assert_eq!(q.write_to(&mut w).unwrap(), Flushed::All);
        assert_eq!(w.taken, b"hello\nworld\n");
    }

    #[test]
    fn drop_unstarted_empties_a_queue_with_nothing_in_flight() {
        let mut q = queue(&["a\n", "b\n"]);
        q.drop_unstarted();
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
    }
}
