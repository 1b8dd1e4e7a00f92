//! A WebSocket session after the upgrade (RFC 6455), sans-IO like the rest:
//! bytes read from the socket go in, protocol frames and the bytes to send
//! back come out.
//!
//! tungstenite's `WebSocketContext` does the reading: unmasking,
//! fragments, control frames (a ping is answered, a close echoed), UTF-8
//! and size checks. Each text message is one protocol frame for the core.
//! Each outgoing frame is one text message: [`text_header`] makes its
//! header, which the connection's output queue writes before the frame's
//! payload, so a frame the core encoded once for many recipients is never
//! copied per WebSocket (and a failed commit or a slow consumer drops whole
//! messages, never half of one).

use std::io::{self, Read, Write};

use bytes::Bytes;
use tungstenite::error::CapacityError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Message, Role, WebSocketConfig, WebSocketContext};

use crate::output_queue::Head;

/// A message up to this many times the core's frame limit is handed to the
/// core, which answers `frame_too_large` as it would for a long line; a
/// longer one ends the session (status 1009), so a session never holds
/// more than this.
pub const MESSAGE_LIMIT_FACTOR: usize = 4;

/// One WebSocket session's state.
pub struct WebSocket {
    context: WebSocketContext,
    /// A close frame went out (ours, or the echo of the peer's).
    close_sent: bool,
}

/// What one step of reading made.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A text message's payload: one protocol frame.
    Message(Bytes),
    /// A pong to send back, a whole frame (the answer to a ping).
    Reply(Bytes),
    /// The session is over, and why; with the close frame that ends it
    /// (the echo of the peer's, or ours refusing bad input), to go out
    /// after the answers to the messages before it.
    Ended {
        /// Why, for the log.
        why: String,
        /// The close frame to send, unless one went out already.
        close: Option<Bytes>,
    },
    /// The bytes so far hold nothing more (tungstenite keeps a partial
    /// frame itself).
    NeedMore,
}

impl std::fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("close_sent", &self.close_sent)
            .finish()
    }
}

impl WebSocket {
    /// A server session for a core frame limit of `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> WebSocket {
        let limit = max_frame_bytes.saturating_mul(MESSAGE_LIMIT_FACTOR);
        let config = WebSocketConfig::default()
            // Reads arrive in the reactor's buffer; this is only the chunk
            // tungstenite grows its own by.
            .read_buffer_size(4 * 1024)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        WebSocket {
            context: WebSocketContext::new(Role::Server, Some(config)),
            close_sent: false,
        }
    }

    /// Reads from the front of `input` (bytes received, advanced past what
    /// tungstenite took) until one thing happens: a message, a pong to
    /// send, the end, or the bytes run out. One at a time, so each
    /// message's answer is queued before whatever follows it.
    pub fn read_one(&mut self, input: &mut &[u8]) -> Received {
        let mut out = Vec::new();
        loop {
            let mut io = Pipe {
                input: &mut *input,
                output: &mut out,
            };
            match self.context.read(&mut io) {
                Ok(Message::Text(text)) => return Received::Message(Bytes::from(text)),
                Ok(Message::Binary(_)) => {
                    self.close(&mut out, CloseCode::Unsupported, "send text messages");
                    return ended("WebSocket: a binary message".to_owned(), out);
                }
                Ok(Message::Ping(_)) => {
                    // tungstenite queued the pong: out with it now, so every
                    // ping gets its answer in order.
                    let _ = self.context.flush(&mut io);
                    if !out.is_empty() {
                        return Received::Reply(Bytes::from(out));
                    }
                }
                Ok(Message::Close(frame)) => {
                    // tungstenite queued the echo (in place of any pong).
                    let _ = self.context.flush(&mut io);
                    self.close_sent = true;
                    let why = frame.map_or_else(String::new, |f| format!(" ({})", f.code));
                    return ended(format!("the peer closed the WebSocket{why}"), out);
                }
                Ok(_) => {} // a pong, or a raw frame tungstenite never yields here
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Received::NeedMore;
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return ended("the WebSocket is closed".to_owned(), out);
                }
                Err(e) => {
                    let code = match e {
                        tungstenite::Error::Capacity(CapacityError::MessageTooLong {
                            size,
                            ..
                        }) if reserved_length(size) => CloseCode::Protocol,
                        tungstenite::Error::Capacity(_) => CloseCode::Size,
                        tungstenite::Error::Utf8(_) => CloseCode::Invalid,
                        _ => CloseCode::Protocol,
                    };
                    self.close(&mut out, code, "");
                    return ended(format!("WebSocket: {e}"), out);
                }
            }
        }
    }

    /// The close frame that ends the session from our side, unless one
    /// went out already.
    pub fn close_frame(&mut self, code: CloseCode, reason: &str) -> Option<Bytes> {
        let mut out = Vec::new();
        self.close(&mut out, code, reason);
        (!out.is_empty()).then(|| Bytes::from(out))
    }

    /// Refuses a message the core would not take (a line break before its end).
    pub fn refuse_invalid(&mut self, reason: &str) -> Option<Bytes> {
        self.close_frame(CloseCode::Invalid, reason)
    }

    fn close(&mut self, out: &mut Vec<u8>, code: CloseCode, reason: &str) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        let frame = tungstenite::protocol::frame::Frame::close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        // Writing into a Vec cannot fail.
        let _ = frame.format(out);
    }
}

/// Whether a frame's payload length, as tungstenite reports it, has the
/// top bit of the 64-bit length set. RFC 6455 (5.2) requires that bit to
/// be 0, so such a header is malformed (1002), not merely too long
/// (1009); tungstenite refuses it as too long, since no limit reaches it.
/// The length comes as a `usize`, cast from the header's `u64`: exact on
/// the 64-bit targets the server is built for.
fn reserved_length(size: usize) -> bool {
    (size as u64) >> 63 != 0
}

/// The end of a session, with the close frame in `out`, if any.
fn ended(why: String, out: Vec<u8>) -> Received {
    Received::Ended {
        why,
        close: (!out.is_empty()).then(|| Bytes::from(out)),
    }
}

/// The header of a text message of `payload_len` bytes from the server
/// (RFC 6455 5.2: final, unmasked, opcode 1, the shortest length form),
/// built per recipient in a few bytes so the payload can stay shared.
pub fn text_header(payload_len: usize) -> Head {
    /// FIN set, opcode 1 (text).
    const FINAL_TEXT: u8 = 0x81;
    let len = payload_len as u64;
    let head = match len {
        0..=125 => Head::new(&[FINAL_TEXT, len as u8]),
        126..=0xffff => {
            let [a, b] = (len as u16).to_be_bytes();
            Head::new(&[FINAL_TEXT, 126, a, b])
        }
        _ => {
            let mut bytes = [FINAL_TEXT, 127, 0, 0, 0, 0, 0, 0, 0, 0];
            bytes[2..].copy_from_slice(&len.to_be_bytes());
            Head::new(&bytes)
        }
    };
    // Every form above is at most 10 bytes, which a head holds.
    head.unwrap_or_default()
}

/// tungstenite's view of the socket: what has been read, and where its
/// replies go. Reading past the end would block, as a socket would.
struct Pipe<'a, 'b> {
    input: &'a mut &'b [u8],
    output: &'a mut Vec<u8>,
}

impl Read for Pipe<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.input.read(buf)
    }
}

impl Write for Pipe<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::{Frame, FrameHeader};

    /// `frame` as a client sends it: masked, as RFC 6455 requires of
    /// clients.
    pub(crate) fn masked(mut frame: Frame) -> Vec<u8> {
        frame.header_mut().mask = Some([1, 2, 3, 4]);
        let mut out = Vec::new();
        frame.format(&mut out).unwrap();
        out
    }

    fn client_frame(opcode: OpCode, payload: &[u8], is_final: bool) -> Vec<u8> {
        masked(Frame::message(payload.to_vec(), opcode, is_final))
    }

    /// A client's text message.
    pub(crate) fn text(payload: &str) -> Vec<u8> {
        client_frame(OpCode::Data(Data::Text), payload.as_bytes(), true)
    }

    /// Everything one batch of bytes makes, read a step at a time.
    #[derive(Debug, Default)]
    struct Batch {
        frames: Vec<Bytes>,
        reply: Option<Bytes>,
        close: Option<Bytes>,
        ended: Option<String>,
    }

    impl WebSocket {
        fn receive(&mut self, mut data: &[u8]) -> Batch {
            let mut received = Batch::default();
            loop {
                match self.read_one(&mut data) {
                    super::Received::Message(frame) => received.frames.push(frame),
                    super::Received::Reply(pong) => {
                        let before = received.reply.take().unwrap_or_default();
                        received.reply = Some([&before[..], &pong[..]].concat().into());
                    }
                    super::Received::Ended { why, close } => {
                        received.ended = Some(why);
                        received.close = close;
                        return received;
                    }
                    super::Received::NeedMore => {
                        assert!(data.is_empty(), "tungstenite takes every byte");
                        return received;
                    }
                }
            }
        }
    }

    #[test]
    fn text_messages_become_frames_however_the_bytes_are_cut() {
        let mut ws = WebSocket::new(64);
        let bytes = [text("whoami"), text(r#"{"cmd":"help"}"#)].concat();
        let mut frames = Vec::new();
        for chunk in bytes.chunks(3) {
            let r = ws.receive(chunk);
            assert!(r.ended.is_none() && r.reply.is_none() && r.close.is_none());
            frames.extend(r.frames);
        }
        assert_eq!(frames, [&b"whoami"[..], br#"{"cmd":"help"}"#]);
    }

    #[test]
    fn fragments_are_joined_and_pings_answered() {
        let mut ws = WebSocket::new(64);
        let bytes = [
            client_frame(OpCode::Data(Data::Text), b"who", false),
            masked(Frame::ping(&b"p"[..])),
            client_frame(OpCode::Data(Data::Continue), b"ami", true),
        ]
        .concat();
        let r = ws.receive(&bytes);
        assert_eq!(r.frames, [&b"whoami"[..]]);
        assert_eq!(r.reply.as_deref(), Some(&[0x8a, 1, b'p'][..]), "a pong");
    }

    #[test]
    fn a_close_is_echoed_and_ends_the_session() {
        let mut ws = WebSocket::new(64);
        let bytes = masked(Frame::close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })));
        let r = ws.receive(&bytes);
        assert!(r.ended.unwrap().contains("closed"));
        assert!(r.reply.is_none());
        assert_eq!(r.close.unwrap()[0], 0x88, "a close frame");
        assert!(
            ws.close_frame(CloseCode::Normal, "").is_none(),
            "only one close"
        );
    }

    #[test]
    fn bad_input_ends_the_session_with_the_matching_status() {
        let status = |bytes: &[u8]| {
            let mut ws = WebSocket::new(16);
            let r = ws.receive(bytes);
            assert!(r.ended.is_some());
            let reply = r.close.unwrap();
            assert_eq!(reply[0], 0x88);
            u16::from_be_bytes([reply[2], reply[3]])
        };
        // Too long: 4 × 16 bytes is the most a message may hold.
        assert_eq!(status(&text(&"x".repeat(65))), 1009);
        assert_eq!(
            status(&client_frame(OpCode::Data(Data::Binary), b"x", true)),
            1003
        );
        assert_eq!(
            status(&client_frame(OpCode::Data(Data::Text), &[0xff, 0xfe], true)),
            1007
        );
        // Unmasked, as only a server may send.
        assert_eq!(status(&[0x81, 1, b'x']), 1002);
        // A 64-bit length with its top bit set, which RFC 6455 (5.2)
        // forbids: a malformed header, not merely a long message.
        let header =
            |length: u64| [&[0x81, 0xff][..], &length.to_be_bytes(), &[1, 2, 3, 4]].concat();
        assert_eq!(status(&header(1 << 63)), 1002);
        assert_eq!(status(&header(u64::MAX)), 1002);
        assert_eq!(status(&header((1 << 63) - 1)), 1009);
        // Within the limit, long messages reach the core, which refuses them.
        let mut ws = WebSocket::new(16);
        assert_eq!(ws.receive(&text(&"x".repeat(64))).frames.len(), 1);
    }

    #[test]
    fn text_headers_are_the_ones_tungstenite_writes() {
        let header = FrameHeader {
            opcode: OpCode::Data(Data::Text),
            ..FrameHeader::default()
        };
        for len in [0, 1, 7, 125, 126, 300, 0xffff, 0x1_0000, 16 << 20] {
            let mut expected = Vec::new();
            header.format(len as u64, &mut expected).unwrap();
            assert_eq!(text_header(len).as_slice(), expected, "{len}");
        }
        assert_eq!(text_header(7).as_slice(), b"\x81\x07");
        assert_eq!(
            text_header(300).as_slice(),
            [0x81, 126, 1, 44],
            "16-bit length"
        );
    }
}
