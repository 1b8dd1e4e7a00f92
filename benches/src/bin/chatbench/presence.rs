//! `chatbench presence`: how long a login on one node takes to reach a
//! user on another as a presence notice (issue 15: the bound PROTOCOL.md's
//! "Clusters" section states).
//!
//! An observer stays logged in on the second address; a prober logs in on
//! the first, again and again, each time on a new connection. Each sample
//! is the time from the prober reading its login's `ok` to the observer
//! reading the `presence` frame that says the prober came online (both
//! read by this process, on one clock). Run it beside a load to measure it
//! under load.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long one answer or notice may take.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// Where the prober logs in.
    pub login_addr: SocketAddr,
    /// Where the observer is.
    pub observer_addr: SocketAddr,
    /// The prober's and the observer's accounts (`u<i>`, password `p<i>`).
    pub prober: usize,
    pub observer: usize,
    /// Samples measured.
    pub count: usize,
    /// Pause between a logout and the next login.
    pub pause: Duration,
}

/// Measures `config.count` logins; returns each delay, in order.
pub fn run(config: &PresenceConfig) -> Result<Vec<Duration>, String> {
    let prober = format!("u{}", config.prober);
    let mut observer = connect(config.observer_addr)?;
    login(&mut observer, config.observer)?;
    // The observer's reader runs on its own thread, stamping every
    // presence notice about the prober the moment it is read.
    let (arrivals, stamped) = mpsc::channel();
    let mut reader = BufReader::new(observer.try_clone().map_err(|e| e.to_string())?);
    let online = format!("\"user\":\"{prober}\"");
    std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.contains("\"type\":\"presence\"")
                && line.contains(&online)
                && line.contains("\"online\":true")
                && arrivals.send(Instant::now()).is_err()
            {
                return;
            }
        }
    });
    let mut delays = Vec::with_capacity(config.count);
    for i in 0..config.count {
        let mut conn = connect(config.login_addr)?;
        let ok_at = login(&mut conn, config.prober)?;
        let arrived = stamped
            .recv_timeout(TIMEOUT)
            .map_err(|_| format!("login {i}: no presence notice within {TIMEOUT:?}"))?;
        delays.push(arrived.saturating_duration_since(ok_at));
        conn.write_all(b"logout\n").map_err(|e| e.to_string())?;
        // Read to the end: the logout is done once the server closes.
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut conn, &mut rest);
        std::thread::sleep(config.pause);
    }
    let _ = observer.write_all(b"logout\n");
    Ok(delays)
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Logs `u<i>` in on `stream`; returns when its `ok` was read.
fn login(stream: &mut TcpStream, i: usize) -> Result<Instant, String> {
    stream
        .write_all(format!("login u{i} p{i}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader.read_line(&mut line).map_err(|e| e.to_string())?;
        if read == 0 {
            return Err(format!("u{i}: the server closed the connection"));
        }
        if line.contains("\"type\":\"ok\"") && line.contains("\"cmd\":\"login\"") {
            // (Nothing the server sends after the ok is waited for here:
            // the observer's notices come after the prober's login.)
            return Ok(Instant::now());
        }
        if line.contains("\"type\":\"error\"") {
            return Err(format!("u{i}: login refused: {}", line.trim_end()));
        }
    }
}
