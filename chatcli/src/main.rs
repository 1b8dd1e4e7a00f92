//! `chatcli`: the reference command-line client for chatproto.
//!
//! On a terminal it prompts for a login, then offers a line editor with
//! history and completion, printing incoming messages above the line being
//! typed. With standard input from a file or pipe it runs commands line by
//! line and prints one line per answer or event (`--json`: the raw frames).

mod display;
mod interactive;
mod script;
mod session;
mod terminal;
mod transport;

use std::io::IsTerminal;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chatproto::{Password, Username};
use clap::Parser;

use crate::session::Session;
use crate::transport::{Transport, Trust};

/// The chatproto command-line client.
///
/// Exit status: 0 after a logout (or, scripted, once every answer arrived),
/// 1 on an error (such as an unreachable server), 2 on a bad command line,
/// 3 after an idle timeout, 4 when the server shuts down, 5 when the
/// connection is lost, 6 when the server ends the session for another
/// reason.
#[derive(Debug, Parser)]
#[command(name = "chatcli", version)]
struct Args {
    /// The server's address.
    #[arg(default_value = "127.0.0.1:4000")]
    addr: String,

    /// Log in as this user first (with --password-file).
    #[arg(long, value_name = "USER", requires = "password_file")]
    user: Option<Username>,

    /// Read the password for --user from the first line of this file.
    #[arg(long, value_name = "FILE", requires = "user")]
    password_file: Option<PathBuf>,

    /// Print the server's frames as they come, one JSON object a line
    /// (scripted use).
    #[arg(long)]
    json: bool,

    /// Connect with TLS, checking the server's certificate against the
    /// system's trusted roots (or --ca).
    #[arg(long)]
    tls: bool,

    /// With --tls: trust only the CA certificates in this PEM file.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls",
        conflicts_with = "insecure"
    )]
    ca: Option<PathBuf>,

    /// With --tls: accept ANY certificate. The connection is encrypted but
    /// not authenticated: anyone in the path can read and change it.
    #[arg(long, requires = "tls")]
    insecure: bool,
}

/// A user name and password given on the command line.
#[derive(Debug)]
pub struct Credentials {
    pub user: Username,
    pub password: Password,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a plain connection may stay silent before chatcli suggests
/// `--tls` (a chatserver greets at once; a TLS port never speaks first).
const GREETING_HINT_AFTER: Duration = Duration::from_secs(2);

/// Whether the server sends something (or hangs up) within `wait`; reads
/// nothing.
fn greets_within(stream: &TcpStream, wait: Duration) -> bool {
    if stream.set_read_timeout(Some(wait)).is_err() {
        return true;
    }
    let silent = matches!(
        stream.peek(&mut [0]),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    );
    let _ = stream.set_read_timeout(None);
    !silent
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // clap's whole message: what is wrong (every missing argument
            // named), the usage, and where help is; help and version go to
            // stdout with status 0, errors to stderr with status 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    ExitCode::from(run(args))
}

fn run(args: Args) -> u8 {
    let credentials = match (&args.user, &args.password_file) {
        (Some(user), Some(path)) => match read_password(path) {
            Ok(password) => Some(Credentials {
                user: user.clone(),
                password,
            }),
            Err(e) => {
                eprintln!("chatcli: {e}");
                return 2;
            }
        },
        _ => None,
    };
    let stream = match connect(&args.addr) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("chatcli: cannot connect to {}: {e}", args.addr);
            return 1;
        }
    };
    let _ = stream.set_nodelay(true);
    let stream = if args.tls {
        let trust = match (&args.ca, args.insecure) {
            (Some(ca), _) => Trust::Ca(ca.clone()),
            (None, true) => {
                eprintln!(
                    "chatcli: WARNING: --insecure: the server's certificate is NOT checked; anyone between you and the server can read and change this session"
                );
                Trust::Anything
            }
            (None, false) => Trust::System,
        };
        match Transport::tls(stream, host_of(&args.addr), &trust) {
            Ok(tls) => tls,
            Err(e) => {
                eprintln!("chatcli: {}: {e}", args.addr);
                return 1;
            }
        }
    } else {
        if !greets_within(&stream, GREETING_HINT_AFTER) {
            // A TLS port waits for our ClientHello and says nothing.
            eprintln!(
                "chatcli: {} has said nothing in {} s: if it serves TLS, add --tls (or is it not a chat port?)",
                args.addr,
                GREETING_HINT_AFTER.as_secs()
            );
        }
        Transport::plain(stream)
    };
    let session = Session::new(&stream);
    if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() && !args.json {
        interactive::run(session, stream, credentials)
    } else {
        script::run(session, stream, credentials, args.json)
    }
}

/// The host part of `host:port` or `[v6]:port`: the name the server's
/// certificate must carry.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for candidate in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&candidate, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address found")))
}

fn read_password(path: &PathBuf) -> Result<Password, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?;
    let first = text.lines().next().unwrap_or("").trim();
    Password::new(first).map_err(|e| format!("{}: {e}", path.display()))
}
