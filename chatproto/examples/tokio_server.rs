//! The chatproto server core driven by tokio instead of chatserver's
//! polling reactor: the core is runtime-agnostic, and a driver is a loop
//! that feeds it what happened, with the time, then does what it says.
//!
//! ```sh
//! cargo run -p chatproto --example tokio_server -- 127.0.0.1:4100
//! nc 127.0.0.1 4100      # then: login alice wonderland
//! ```
//!
//! One task owns the core. Each connection has a reader task (bytes in)
//! and a writer task (frames out); they talk to the core task over
//! channels. Accounts are the demo's, in memory; nothing is stored, so
//! offline messages last until the process ends.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chatproto::{Accounts, ConnId, Output, PeerKey, Server, ServerConfig, Timestamp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What reaches the core task.
enum Input {
    Accepted(TcpStream, std::net::SocketAddr),
    Read(ConnId, Vec<u8>),
    /// Everything handed to the writer is written.
    Drained(ConnId),
    Gone(ConnId),
}

/// What a connection's writer task is told.
enum Write {
    Frame(Bytes),
    /// Flush and hang up.
    Close,
}

fn now() -> Timestamp {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::from_unix_millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4100".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);

    let mut accounts = Accounts::new();
    for (name, password) in [
        ("alice", "wonderland"),
        ("bob", "builder"),
        ("carol", "singer"),
    ] {
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

    let mut writers: HashMap<ConnId, mpsc::UnboundedSender<Write>> = HashMap::new();
    loop {
        // Every deadline the core holds is in poll_timeout.
        let wake = server.poll_timeout().map(|at| {
            let wait = at.as_unix_millis().saturating_sub(now().as_unix_millis());
            tokio::time::Instant::now() + Duration::from_millis(wait)
        });
        tokio::select! {
            input = inbox.recv() => match input {
                Some(Input::Accepted(stream, peer)) => {
                    let random = *uuid::Uuid::new_v4().as_bytes();
                    let conn = server.accept(PeerKey::from_ip(peer.ip()), random, now());
                    writers.insert(conn, spawn_connection(conn, stream, inputs.clone()));
                }
                Some(Input::Read(conn, bytes)) => {
                    let _ = server.handle_input(conn, &bytes, now());
                }
                // Offline messages are handed over a page at a time, paced
                // by these reports, and count as delivered once written.
                Some(Input::Drained(conn)) => {
                    let _ = server.handle_drained(conn, 0, now());
                }
                Some(Input::Gone(conn)) => {
                    writers.remove(&conn);
                    let _ = server.handle_disconnect(conn, now());
                }
                None => return Ok(()),
            },
            _ = sleep_until(wake) => server.handle_timeout(now()),
        }
        // Drain after every input, as the core asks.
        while let Some(output) = server.poll_output() {
            match output {
                Output::Transmit { conn, frame } => {
                    if let Some(writer) = writers.get(&conn) {
                        let _ = writer.send(Write::Frame(frame));
                    }
                }
                Output::Close { conn, .. } => {
                    if let Some(writer) = writers.remove(&conn) {
                        let _ = writer.send(Write::Close);
                    }
                }
                Output::Event(event) => println!("{event:?}"),
                // Only plaintext accounts here, which the core checks
                // itself; a hashed one would be checked off this task.
                Output::VerifyPassword { ticket, .. } => {
                    server.handle_verification(ticket, false, now());
                }
                // No storage, no cluster: nothing else is asked for.
                _ => {}
            }
        }
    }
}

/// Sleeps until `at`, or for ever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts `conn`'s reader and writer tasks; returns the writer's channel.
fn spawn_connection(
    conn: ConnId,
    stream: TcpStream,
    inputs: mpsc::UnboundedSender<Input>,
) -> mpsc::UnboundedSender<Write> {
    let (mut reader, mut writer) = stream.into_split();
    let inputs_done = inputs.clone();
    tokio::spawn(async move {
        let mut buf = vec![0; 16 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if inputs.send(Input::Read(conn, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = inputs.send(Input::Gone(conn));
    });
    let (frames, mut outbox) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(write) = outbox.recv().await {
            let written = match write {
                // A frame is a line on TCP.
                Write::Frame(frame) => writer.write_all(&[&frame[..], b"\n"].concat()).await,
                Write::Close => break,
            };
            if written.is_err() {
                break;
            }
            if outbox.is_empty() && inputs_done.send(Input::Drained(conn)).is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    frames
}
