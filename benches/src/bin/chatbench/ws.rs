//! `--ws`: load clients that speak the protocol over WebSocket (`GET /ws`
//! on a server's `--http` address) instead of lines over TCP. The
//! handshake is made blocking, before the client joins the reactor; after
//! it, each line a client queues goes out as one masked text message, and
//! each text message the server sends is one frame. The framing is
//! tungstenite's (`Frame`, `FrameHeader`); only the buffering is here.

use std::io::{Cursor, Read, Write};
use std::net::{SocketAddr, TcpStream};

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::{Frame, FrameHeader};

/// A fixed, well-formed `Sec-WebSocket-Key` (the server checks its form;
/// a load tool has no cache to defeat).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Upgrades `stream` (blocking) to a WebSocket at `addr`'s `/ws`. The
/// server's first frames may follow the `101` at once: they stay in the
/// socket, since the head is read a byte at a time.
pub fn handshake(stream: &mut TcpStream, addr: SocketAddr) -> Result<(), String> {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{addr}: {e}"))?;
    // A line-protocol port answers with lines that never end the head.
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8 * 1024 {
            return Err(format!("{addr}: the upgrade's answer never ends"));
        }
        match stream.read(&mut byte) {
            Ok(0) => return Err(format!("{addr}: closed during the WebSocket upgrade")),
            Ok(_) => head.push(byte[0]),
            Err(e) => {
                return Err(format!(
                    "{addr}: no WebSocket upgrade ({e}): is it the server's --http address?"
                ))
            }
        }
    }
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    if !head.starts_with(b"HTTP/1.1 101 ") {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        return Err(format!(
            "{addr} refused the WebSocket upgrade: {} (is it the server's --http address?)",
            String::from_utf8_lossy(line)
        ));
    }
    Ok(())
}

/// Turns every whole line of `lines` into a masked text message, appended
/// to `out`; returns how many bytes of `lines` it took.
pub fn frame_lines(lines: &[u8], mask: [u8; 4], out: &mut Vec<u8>) -> usize {
    let mut taken = 0;
    while let Some(end) = lines[taken..].iter().position(|&b| b == b'\n') {
        let line = &lines[taken..taken + end];
        let mut frame = Frame::message(line.to_vec(), OpCode::Data(Data::Text), true);
        frame.header_mut().mask = Some(mask);
        // Writing into a Vec cannot fail.
        let _ = frame.format(out);
        taken += end + 1;
    }
    taken
}

/// Takes the whole messages at the start of `input`, handing each text
/// message's payload to `frame`; returns how many bytes it took (the rest
/// is a message still arriving).
pub fn take_messages(
    input: &[u8],
    mut frame: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<usize, String> {
    let mut taken = 0;
    loop {
        let mut cursor = Cursor::new(&input[taken..]);
        let parsed = FrameHeader::parse(&mut cursor).map_err(|e| format!("WebSocket: {e}"))?;
        let Some((header, length)) = parsed else {
            return Ok(taken);
        };
        let start = taken + cursor.position() as usize;
        let Some(end) = usize::try_from(length)
            .ok()
            .and_then(|n| start.checked_add(n))
            .filter(|&end| end <= input.len())
        else {
            return Ok(taken);
        };
        match header.opcode {
            OpCode::Data(Data::Text) if header.is_final => frame(&input[start..end])?,
            OpCode::Control(Control::Close) => {
                return Err("the server closed the WebSocket".to_owned())
            }
            OpCode::Control(_) => {}
            other => return Err(format!("WebSocket: unexpected {other} frame")),
        }
        taken = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_masked_messages_and_messages_come_back_whole() {
        let mut wire = Vec::new();
        let taken = frame_lines(b"whoami\nhelp\npartial", [1, 2, 3, 4], &mut wire);
        assert_eq!(taken, 12);
        // FIN + text, masked length 6, the mask, the masked payload.
        assert_eq!(&wire[..6], &[0x81, 0x86, 1, 2, 3, 4]);
        let unmasked: Vec<u8> = wire[6..12]
            .iter()
            .zip([1, 2, 3, 4].iter().cycle())
            .map(|(b, m)| b ^ m)
            .collect();
        assert_eq!(unmasked, b"whoami");

        // From the server: unmasked; a message cut short waits.
        let mut from_server = vec![0x81, 2, b'o', b'k', 0x81, 3, b'a'];
        let mut got = Vec::new();
        let taken = take_messages(&from_server, |m| {
            got.push(m.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!((taken, &got[..]), (4, &[b"ok".to_vec()][..]));
        from_server.extend_from_slice(b"bc");
        let taken = take_messages(&from_server[4..], |m| {
            got.push(m.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(taken, 5);
        assert_eq!(got[1], b"abc");
        assert!(take_messages(&[0x88, 0], |_| Ok(())).is_err());
    }
}
