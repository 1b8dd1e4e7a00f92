//! `chatbench login-timing`: how long a failed login takes, for a wrong
//! password of a plaintext account and for a name without an account.
//!
//! If the two take measurably different times, anyone may tell which names
//! have accounts by timing their logins. Each attempt is on a fresh
//! connection, one at a time (so no attempt waits behind another), with a
//! name never tried before (so no lock or per-name rate has a say); the
//! two kinds take turns, the first of each pair alternating, so that drift
//! on a noisy machine falls on both alike.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::contains;

/// How long one login may take to be answered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct TimingConfig {
    pub addr: SocketAddr,
    /// Attempts of each kind measured.
    pub count: usize,
    /// Attempts of each kind made first and not measured.
    pub warmup: usize,
    /// Plaintext accounts `u<i>` (password `p<i>`) exist for i below this.
    pub accounts: usize,
}

/// The measured times, in the order taken.
#[derive(Debug)]
pub struct Timings {
    pub wrong_password: Vec<Duration>,
    pub unknown_name: Vec<Duration>,
}

/// Which failed login.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `u<i>` with a wrong password.
    WrongPassword,
    /// `nobody<i>`: no such account.
    UnknownName,
}

pub fn run(config: &TimingConfig) -> Result<Timings, String> {
    let pairs = config.warmup + config.count;
    if config.accounts < pairs {
        return Err(format!(
            "{pairs} plaintext accounts are needed (u0..u{}), the server has {}",
            pairs.saturating_sub(1),
            config.accounts
        ));
    }
    let mut timings = Timings {
        wrong_password: Vec::with_capacity(config.count),
        unknown_name: Vec::with_capacity(config.count),
    };
    for i in 0..pairs {
        let order = if i % 2 == 0 {
            [Kind::WrongPassword, Kind::UnknownName]
        } else {
            [Kind::UnknownName, Kind::WrongPassword]
        };
        for kind in order {
            let took = attempt(config.addr, kind, i)?;
            if i >= config.warmup {
                match kind {
                    Kind::WrongPassword => timings.wrong_password.push(took),
                    Kind::UnknownName => timings.unknown_name.push(took),
                }
            }
        }
    }
    Ok(timings)
}

/// One failed login on a new connection: the time from writing `login`
/// to reading its error.
fn attempt(addr: SocketAddr, kind: Kind, i: usize) -> Result<Duration, String> {
    let login = match kind {
        Kind::WrongPassword => format!("login u{i} wrong-{i}\n"),
        Kind::UnknownName => format!("login nobody{i} wrong-{i}\n"),
    };
    let what = || format!("{kind:?} attempt {i}");
    let stream = TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT)
        .map_err(|e| format!("{}: cannot connect to {addr}: {e}", what()))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    // The hello comes first; the clock starts after it.
    reader
        .read_line(&mut line)
        .map_err(|e| format!("{}: no hello: {e}", what()))?;
    if !line.starts_with("{\"type\":\"hello\"") {
        return Err(format!("{}: expected a hello, got {line:?}", what()));
    }
    let sent = Instant::now();
    (&stream)
        .write_all(login.as_bytes())
        .map_err(|e| format!("{}: {e}", what()))?;
    line.clear();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("{}: no answer: {e}", what()))?;
    let took = sent.elapsed();
    if !contains(line.as_bytes(), b"\"code\":\"invalid_credentials\"") {
        let hint = if contains(line.as_bytes(), b"\"code\":\"rate_limited\"")
            || contains(line.as_bytes(), b"\"code\":\"unavailable\"")
        {
            " (turn the server's per-address and per-name login limits off: --login-rate-per-ip 0 --login-rate-per-name 0 --max-pending-checks-per-ip 0)"
        } else {
            ""
        };
        return Err(format!(
            "{}: expected invalid_credentials, got {}{hint}",
            what(),
            line.trim_end()
        ));
    }
    Ok(took)
}

/// The value at quantile `q` (nearest rank) of `times`, which must not be
/// empty.
pub fn quantile(times: &[Duration], q: f64) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
