//! A server that embeds the core and adds a rule of its own, without a
//! callback into the core: messages and broadcasts holding a banned word
//! are refused (`forbidden`) before the core sees them.
//!
//! ```sh
//! cargo run -p chatproto --example custom_rule -- 127.0.0.1:4200
//! nc 127.0.0.1 4200      # login alice wonderland, then: broadcast spam!
//! ```
//!
//! The driver splits each connection's input into frames itself and
//! judges each one. A frame it answers must not overtake an answer the
//! core still owes the same connection (a password check in progress, a
//! batch), so it answers only while `Server::is_caught_up`; until then the
//! frames wait here, in order, and go on once the core has answered.
//! The rest of the driver is `tokio_server.rs`'s, shortened (offline
//! messages are handed over one page at a time there, paced by
//! `handle_drained`; here only the first page is).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chatproto::{
    Accounts, Command, ConnId, ErrorCode, ErrorFrame, FrameDecoder, Output, PeerKey, Request,
    Server, ServerConfig, ServerFrame, Timestamp, DEFAULT_MAX_FRAME_BYTES,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The rule.
const BANNED: [&str; 2] = ["spam", "scam"];

enum Input {
    Accepted(TcpStream, std::net::SocketAddr),
    Read(ConnId, Vec<u8>),
    Gone(ConnId),
}

/// One connection, as the driver sees it.
struct Connection {
    writer: mpsc::UnboundedSender<Option<Bytes>>,
    /// Splits the input into frames (four frame limits long at most: the
    /// core judges the length of each).
    decoder: FrameDecoder,
    /// Frames not yet judged, oldest first.
    waiting: VecDeque<Vec<u8>>,
}

fn now() -> Timestamp {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::from_unix_millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// Whether the rule refuses `frame`.
fn banned(frame: &[u8]) -> bool {
    let text = match Request::parse_frame(frame) {
        Ok(Request {
            command: Command::Message { text, .. } | Command::Broadcast { text },
            ..
        }) => text,
        _ => return false,
    };
    let text = text.as_str().to_lowercase();
    BANNED.iter().any(|word| text.contains(word))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4200".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let mut accounts = Accounts::new();
    for (name, password) in [("alice", "wonderland"), ("bob", "builder")] {
        accounts.insert(name.parse()?, password.parse()?)?;
    }
    let mut server = Server::new(ServerConfig::default(), accounts, now())?;
    let (inputs, mut inbox) = mpsc::unbounded_channel();
    let accepting = inputs.clone();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            if accepting.send(Input::Accepted(stream, peer)).is_err() {
                break;
            }
        }
    });
    let mut connections: HashMap<ConnId, Connection> = HashMap::new();
    loop {
        let wake = server.poll_timeout().map(|at| {
            let wait = at.as_unix_millis().saturating_sub(now().as_unix_millis());
            tokio::time::Instant::now() + Duration::from_millis(wait)
        });
        tokio::select! {
            input = inbox.recv() => match input {
                Some(Input::Accepted(stream, peer)) => {
                    let random = *uuid::Uuid::new_v4().as_bytes();
                    let conn = server.accept(PeerKey::from_ip(peer.ip()), random, now());
                    connections.insert(conn, Connection {
                        writer: spawn_connection(conn, stream, inputs.clone()),
                        decoder: FrameDecoder::new(4 * DEFAULT_MAX_FRAME_BYTES),
                        waiting: VecDeque::new(),
                    });
                }
                Some(Input::Read(conn, bytes)) => {
                    if let Some(c) = connections.get_mut(&conn) {
                        let mut input = &bytes[..];
                        while let Some(frame) = c.decoder.decode(&mut input) {
                            // Past four limits: dropped here (the core would
                            // refuse it as too large anyway).
                            if let Ok(frame) = frame {
                                c.waiting.push_back(frame.to_vec());
                            }
                        }
                    }
                }
                Some(Input::Gone(conn)) => {
                    connections.remove(&conn);
                    let _ = server.handle_disconnect(conn, now());
                }
                None => return Ok(()),
            },
            _ = sleep_until(wake) => server.handle_timeout(now()),
        }
        // Judge what waits, while the core owes those connections nothing;
        // drain the core after every input, as it asks.
        loop {
            drain(&mut server, &mut connections);
            let Some((&conn, c)) = connections
                .iter_mut()
                .find(|(conn, c)| !c.waiting.is_empty() && server.is_caught_up(**conn))
            else {
                break;
            };
            let frame = c.waiting.pop_front().expect("not empty");
            if banned(&frame) {
                let refusal = ServerFrame::Error(ErrorFrame {
                    id: Request::parse_frame(&frame).ok().and_then(|r| r.id),
                    code: ErrorCode::Forbidden,
                    text: "that word is not allowed here".to_owned(),
                    retry_after: None,
                });
                let _ = c.writer.send(Some(refusal.encode()));
            } else {
                let _ = server.handle_message(conn, &frame, now());
            }
        }
    }
}

/// Does what the core asks.
fn drain(server: &mut Server, connections: &mut HashMap<ConnId, Connection>) {
    while let Some(output) = server.poll_output() {
        match output {
            Output::Transmit { conn, frame } => {
                if let Some(c) = connections.get(&conn) {
                    let _ = c.writer.send(Some(frame));
                }
            }
            Output::Close { conn, .. } => {
                if let Some(c) = connections.remove(&conn) {
                    let _ = c.writer.send(None);
                }
            }
            Output::VerifyPassword { ticket, .. } => {
                server.handle_verification(ticket, false, now());
            }
            _ => {}
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts `conn`'s reader and writer tasks; `None` on the writer's channel
/// hangs up.
fn spawn_connection(
    conn: ConnId,
    stream: TcpStream,
    inputs: mpsc::UnboundedSender<Input>,
) -> mpsc::UnboundedSender<Option<Bytes>> {
    let (mut reader, mut writer) = stream.into_split();
    tokio::spawn(async move {
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = reader.read(&mut buf).await {
            if inputs.send(Input::Read(conn, buf[..n].to_vec())).is_err() {
                return;
            }
        }
        let _ = inputs.send(Input::Gone(conn));
    });
    let (frames, mut outbox) = mpsc::unbounded_channel::<Option<Bytes>>();
    tokio::spawn(async move {
        while let Some(Some(frame)) = outbox.recv().await {
            if writer
                .write_all(&[&frame[..], b"\n"].concat())
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    frames
}
