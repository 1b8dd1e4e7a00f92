//! One connection's outgoing bytes, written with vectored writes.
//!
//! The queue holds atomic units: a core frame with its transport's framing
//! around it (`head`, the shared payload, `tail`), or bytes of the
//! transport's own (an HTTP response, a WebSocket control frame). The core
//! emits each frame as a payload without a terminator, encoded once and
//! shared (`Bytes`) by every recipient; the framing is added here without
//! copying it: for lines the tail is a static `\n`, for WebSocket the head
//! is a header of a few bytes kept inline. Units are written many per
//! syscall: parts under [`COPY_BELOW`] gathered into one buffer, longer
//! payloads as slices of their own, uncopied. A partial write leaves the
//! rest of its unit at the front, so units are never interleaved or cut.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

/// Slices per `write_vectored` call: a framed frame takes two or three, so
/// this batches a burst of about 64 frames, and the slice array still fits
/// on the stack.
const MAX_SLICES: usize = 128;

/// Parts shorter than this are copied into one gathered buffer rather
/// than given a slice of their own (see [`OutputQueue::write_to`]).
pub const COPY_BELOW: usize = 1024;

/// The most bytes gathered for one write call.
const GATHER_MAX: usize = 64 * 1024;

thread_local! {
    /// The gathering buffer, shared by every queue a thread writes (a
    /// reactor writes one socket at a time), so an idle connection keeps
    /// none.
    static GATHER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Where one slice of a write comes from.
#[derive(Clone, Copy)]
enum Piece<'a> {
    /// `gathered[start..end]`.
    Gathered(usize, usize),
    /// A part as it is.
    Direct(&'a [u8]),
}

/// Queue slots an empty queue keeps (about 64 bytes each): enough for
/// the usual few frames per write, so a busy connection does not free and
/// allocate its queue on every message, while an idle one keeps a few
/// hundred bytes at most.
const KEEP_SLOTS: usize = 4;

/// The end of a frame on line transports (TCP and TLS).
pub const LINE_END: &[u8] = b"\n";

/// Bytes a transport puts before a frame's payload, kept inline so a
/// header built per recipient costs no allocation.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Head {
    bytes: [u8; Head::MAX],
    len: u8,
}

impl Head {
    /// The longest head: a WebSocket header of a server frame (2 bytes,
    /// then a 64-bit length; no mask).
    pub const MAX: usize = 10;
    /// No head (line transports).
    pub const EMPTY: Head = Head {
        bytes: [0; Head::MAX],
        len: 0,
    };

    /// A head of `bytes`, or `None` if they are longer than [`Head::MAX`].
    pub fn new(bytes: &[u8]) -> Option<Head> {
        let mut head = Head::EMPTY;
        head.bytes.get_mut(..bytes.len())?.copy_from_slice(bytes);
        // At most Head::MAX (10), so it fits.
        head.len = bytes.len() as u8;
        Some(head)
    }

    /// The head's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Head({:02x?})", self.as_slice())
    }
}

/// One atomic unit of output.
#[derive(Debug)]
struct Unit {
    head: Head,
    payload: Bytes,
    tail: &'static [u8],
    /// A core frame: counted in [`OutputQueue::frames`].
    core: bool,
}

impl Unit {
    fn len(&self) -> usize {
        self.head.as_slice().len() + self.payload.len() + self.tail.len()
    }

    /// Its parts, in order, after the first `skip` bytes.
    fn parts(&self, mut skip: usize) -> impl Iterator<Item = &[u8]> {
        [self.head.as_slice(), &self.payload[..], self.tail]
            .into_iter()
            .filter_map(move |part| {
                let rest = part.get(skip.min(part.len())..).unwrap_or_default();
                skip = skip.saturating_sub(part.len());
                (!rest.is_empty()).then_some(rest)
            })
    }
}

/// A connection's queued output.
#[derive(Debug, Default)]
pub struct OutputQueue {
    units: VecDeque<Unit>,
    /// Bytes not yet written.
    bytes: usize,
    /// Core frames not yet wholly written.
    frames: usize,
    /// Bytes of the front unit already written.
    front_written: usize,
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
    /// Queues one core frame (a payload without terminator) with its
    /// transport's framing around it; counted in [`OutputQueue::frames`].
    pub fn push_frame(&mut self, head: Head, payload: Bytes, tail: &'static [u8]) {
        self.push(Unit {
            head,
            payload,
            tail,
            core: true,
        });
    }

    /// Queues bytes of the transport's own (an HTTP response, a WebSocket
    /// pong or close), which are no core frame.
    pub fn push_raw(&mut self, bytes: Bytes) {
        self.push(Unit {
            head: Head::EMPTY,
            payload: bytes,
            tail: b"",
            core: false,
        });
    }

    fn push(&mut self, unit: Unit) {
        self.bytes += unit.len();
        self.frames += usize::from(unit.core);
        self.units.push_back(unit);
    }

    /// Bytes queued and not yet written.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether nothing is left to write.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// Core frames queued (a partly written one included): what the core
    /// hears as a connection's unsent frames.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Drops every unit not yet started, keeping a partly written one so
    /// the peer never sees half a frame followed by another.
    pub fn drop_unstarted(&mut self) {
        self.drop_from(usize::from(self.front_written > 0));
    }

    fn drop_from(&mut self, keep: usize) {
        let keep = keep.min(self.units.len());
        for unit in self.units.drain(keep..) {
            self.bytes -= unit.len();
            self.frames -= usize::from(unit.core);
        }
        if self.units.is_empty() {
            self.front_written = 0;
        }
    }

    /// Writes until the queue is empty or the writer would block.
    ///
    /// Parts shorter than [`COPY_BELOW`] (framing, and typical chat frames)
    /// are gathered into one buffer, and longer payloads go as slices of
    /// their own, uncopied: each slice costs the kernel more than copying
    /// a short part does (measured in the README: about 5 % of a direct
    /// message's CPU when every frame and its `\n` were slices).
    pub fn write_to(&mut self, writer: &mut impl Write) -> io::Result<Flushed> {
        let mut gathered = GATHER.take();
        let result = self.write_gathering(writer, &mut gathered);
        gathered.clear();
        if gathered.capacity() > GATHER_MAX {
            gathered = Vec::new();
        }
        GATHER.set(gathered);
        result
    }

    fn write_gathering(
        &mut self,
        writer: &mut impl Write,
        gathered: &mut Vec<u8>,
    ) -> io::Result<Flushed> {
        while !self.units.is_empty() {
            gathered.clear();
            // Where each slice's bytes are: a range of `gathered`, or a
            // part as it is. Ranges are made slices once `gathered` is
            // complete (it may move while it grows).
            let mut plan = [Piece::Gathered(0, 0); MAX_SLICES];
            let mut count = 0;
            let mut skip = self.front_written;
            'fill: for unit in &self.units {
                for part in unit.parts(skip) {
                    if part.len() < COPY_BELOW && gathered.len() + part.len() <= GATHER_MAX {
                        let start = gathered.len();
                        gathered.extend_from_slice(part);
                        match plan[..count].last_mut() {
                            Some(Piece::Gathered(_, end)) if *end == start => *end += part.len(),
                            _ if count == MAX_SLICES => {
                                gathered.truncate(start);
                                break 'fill;
                            }
                            _ => {
                                plan[count] = Piece::Gathered(start, start + part.len());
                                count += 1;
                            }
                        }
                    } else if count == MAX_SLICES
                        || (part.len() < COPY_BELOW && !gathered.is_empty())
                    {
                        // Out of slices, or of room to gather: the rest
                        // goes in the next call.
                        break 'fill;
                    } else {
                        plan[count] = Piece::Direct(part);
                        count += 1;
                    }
                }
                skip = 0;
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            for (slice, piece) in slices.iter_mut().zip(&plan[..count]) {
                *slice = IoSlice::new(match *piece {
                    Piece::Gathered(start, end) => &gathered[start..end],
                    Piece::Direct(part) => part,
                });
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
        if self.units.capacity() > KEEP_SLOTS {
            self.units = VecDeque::with_capacity(KEEP_SLOTS);
        }
        Ok(Flushed::All)
    }

    /// Takes `written` bytes off the front.
    fn consume(&mut self, written: usize) {
        // A writer never reports more than it was given; if one did, the
        // queue is merely emptied.
        let mut written = written.min(self.bytes);
        self.bytes -= written;
        while written > 0 {
            let Some(front) = self.units.front() else {
                break;
            };
            let left = front.len() - self.front_written;
            if written < left {
                self.front_written += written;
                return;
            }
            written -= left;
            self.frames -= usize::from(front.core);
            self.units.pop_front();
            self.front_written = 0;
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
        /// The most slices one call was given.
        widest: usize,
        /// Where each slice given pointed.
        pointers: Vec<*const u8>,
    }

    impl Trickle {
        fn new(limit: usize, budget: usize) -> Trickle {
            Trickle {
                taken: vec![],
                limit,
                budget,
                calls: 0,
                widest: 0,
                pointers: vec![],
            }
        }
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            self.widest = self.widest.max(bufs.len());
            self.pointers.extend(bufs.iter().map(|b| b.as_ptr()));
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

    /// Frames as lines: each payload, then the static newline.
    fn lines(frames: &[&str]) -> OutputQueue {
        let mut q = OutputQueue::default();
        for f in frames {
            q.push_frame(Head::EMPTY, Bytes::copy_from_slice(f.as_bytes()), LINE_END);
        }
        q
    }

    #[test]
    fn many_frames_go_in_one_call_short_parts_gathered_long_ones_uncopied() {
        let long = Bytes::from(vec![b'L'; COPY_BELOW]);
        let mut q = lines(&["a", "bb"]);
        q.push_frame(Head::EMPTY, long.clone(), LINE_END);
        q.push_frame(
            Head::new(&[0x81, 3]).unwrap(),
            Bytes::from_static(b"ccc"),
            b"",
        );
        q.push_raw(Bytes::from_static(b"raw"));
        assert_eq!((q.frames(), q.len()), (4, 2 + 3 + COPY_BELOW + 1 + 5 + 3));
        let mut w = Trickle::new(usize::MAX, usize::MAX);
        assert_eq!(q.write_to(&mut w).unwrap(), Flushed::All);
        let mut expected = b"a\nbb\n".to_vec();
        expected.extend_from_slice(&long);
        expected.extend_from_slice(b"\n\x81\x03cccraw");
        assert_eq!(w.taken, expected);
        // "a\nbb\n" gathered, the long payload as it is, then the rest
        // gathered: three slices in one call.
        assert_eq!((w.calls, w.widest), (1, 3));
        assert_eq!((q.len(), q.frames()), (0, 0));
        // The long payload went to the writer from where it is shared, not
        // from a copy.
        assert!(w.pointers.contains(&long.as_ptr()));
    }

    #[test]
    fn partial_writes_resume_where_they_stopped_even_inside_the_framing() {
        let mut q = lines(&["hello", "world"]);
        let mut w = Trickle::new(4, 11);
        assert_eq!(q.write_to(&mut w).unwrap(), Flushed::Blocked);
        // "hello\n" and "world" are out; the newline of "world" is not.
        assert_eq!((q.len(), q.frames()), (1, 1));
        // Unstarted units may be dropped; the started one stays whole.
        q.push_frame(Head::EMPTY, Bytes::from_static(b"later"), LINE_END);
        q.drop_unstarted();
        assert_eq!(q.frames(), 1);
        w.budget = 100;
        assert_eq!(q.write_to(&mut w).unwrap(), Flushed::All);
        assert_eq!(w.taken, b"hello\nworld\n");
        // A head written in pieces.
        let mut q = OutputQueue::default();
        q.push_frame(
            Head::new(&[1, 2, 3]).unwrap(),
            Bytes::from_static(b"xy"),
            b"!",
        );
        let mut w = Trickle::new(1, 100);
        assert_eq!(q.write_to(&mut w).unwrap(), Flushed::All);
        assert_eq!(
            (w.taken.as_slice(), w.calls),
            (&[1, 2, 3, b'x', b'y', b'!'][..], 6)
        );
    }

    #[test]
    fn a_burst_wider_than_one_call_goes_out_whole_and_in_order() {
        // Long frames: a slice each, and one for each gathered newline.
        let frames: Vec<String> = (0..300)
            .map(|i| format!("f{i:04}{}", "x".repeat(COPY_BELOW)))
            .collect();
        let mut q = lines(&frames.iter().map(String::as_str).collect::<Vec<_>>());
        let mut w = Trickle::new(usize::MAX, usize::MAX);
        assert_eq!(q.write_to(&mut w).unwrap(), Flushed::All);
        assert_eq!(w.widest, MAX_SLICES);
        let expected: String = frames.iter().map(|f| format!("{f}\n")).collect();
        assert_eq!(w.taken, expected.as_bytes());
        // Short ones are gathered, up to GATHER_MAX bytes a call.
        let frames: Vec<String> = (0..30_000).map(|i| format!("f{i}")).collect();
        let mut q = lines(&frames.iter().map(String::as_str).collect::<Vec<_>>());
        let mut w = Trickle::new(usize::MAX, usize::MAX);
        assert_eq!(q.write_to(&mut w).unwrap(), Flushed::All);
        assert_eq!(w.widest, 1);
        assert!(w.calls > 1);
        let expected: String = frames.iter().map(|f| format!("{f}\n")).collect();
        assert_eq!(w.taken, expected.as_bytes());
    }

    #[test]
    fn only_core_frames_count_as_frames() {
        let mut q = OutputQueue::default();
        q.push_raw(Bytes::from_static(
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ));
        q.push_frame(
            Head::new(&[0x81, 2]).unwrap(),
            Bytes::from_static(b"{}"),
            b"",
        );
        q.push_raw(Bytes::from_static(&[0x8a, 0])); // a pong
        assert_eq!(q.frames(), 1);
        let mut w = Trickle::new(usize::MAX, 38);
        assert_eq!(q.write_to(&mut w).unwrap(), Flushed::Blocked);
        assert_eq!(q.frames(), 1, "the frame is started, not written");
    }

    #[test]
    fn drop_unstarted_empties_a_queue_with_nothing_in_flight() {
        let mut q = lines(&["a", "b"]);
        q.drop_unstarted();
        assert!(q.is_empty());
        assert_eq!((q.len(), q.frames()), (0, 0));
    }

    #[test]
    fn a_drained_queue_keeps_only_a_few_slots() {
        let mut q = lines(&["a"; 100]);
        q.write_to(&mut Trickle::new(usize::MAX, usize::MAX))
            .unwrap();
        assert!(q.units.capacity() <= KEEP_SLOTS);
        // A queue that never grew past them keeps its slots: the next
        // frames need no allocation.
        let mut q = lines(&["a", "b"]);
        let slots = q.units.capacity();
        q.write_to(&mut Trickle::new(usize::MAX, usize::MAX))
            .unwrap();
        assert!(q.is_empty());
        assert_eq!(q.units.capacity(), slots);
        assert!(slots > 0);
    }

    #[test]
    fn heads_hold_at_most_ten_bytes() {
        assert_eq!(Head::new(&[7; 10]).unwrap().as_slice(), &[7; 10]);
        assert!(Head::new(&[7; 11]).is_none());
        assert_eq!(Head::EMPTY.as_slice(), b"");
    }
}
