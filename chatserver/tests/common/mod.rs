//! End-to-end harness: the real `chatserver` binary on a loopback port, and
//! line-based clients with short timeouts.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatserver::admission::{ADDRESS_LIMIT_FLAGS, TLS_BUDGET_FLAGS};
use serde_json::Value;

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const CREDENTIALS: &str = "\
# test accounts
alice pw-alice
bob pw-bob
carol pw-carol
dave pw-dave
root pw-root
";

pub struct TestServer {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _owned_dir: Option<tempfile::TempDir>,
}

/// The per-address limits and TLS handshake budgets (the server library's
/// own lists of their flags), each turned off unless `args` sets it: every
/// test client comes from 127.0.0.1, and only the tests about a limit want
/// it.
pub fn address_limits_off(args: &[&str]) -> Vec<String> {
    ADDRESS_LIMIT_FLAGS
        .iter()
        .chain(&TLS_BUDGET_FLAGS)
        .filter(|flag| !args.contains(flag))
        .flat_map(|flag| [flag.to_string(), "0".to_owned()])
        .collect()
}

/// The `chatserver` binary. Other packages' tests (the CLI's) include this
/// harness too; for them it sits beside their own binaries, and is built
/// first if a narrower `cargo test -p` did not build it.
pub fn binary() -> Command {
    if let Some(path) = option_env!("CARGO_BIN_EXE_chatserver") {
        return Command::new(path);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = dir.join(format!("chatserver{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "-p", "chatserver"])
            .status()
            .unwrap();
        assert!(status.success(), "cannot build chatserver");
    }
    Command::new(path)
}

impl TestServer {
    /// Starts the server on a free port with `CREDENTIALS` and `args`.
    pub fn start(args: &[&str]) -> TestServer {
        TestServer::start_with(CREDENTIALS, &["--listen", "127.0.0.1:0"], args)
    }

    /// Starts the server in a fresh temporary directory.
    pub fn start_with(credentials: &str, listen: &[&str], args: &[&str]) -> TestServer {
        TestServer::start_with_env(credentials, listen, args, &[])
    }

    /// As [`TestServer::start_with`], with environment variables set for
    /// the server on top of the harness's own (`RUST_LOG=info`), which
    /// they override.
    pub fn start_with_env(
        credentials: &str,
        listen: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut server = TestServer::start_in_with_env(dir.path(), credentials, listen, args, env);
        server._owned_dir = Some(dir);
        server
    }

    /// Starts the server with `dir` as its working directory (and so its
    /// default database `dir/chatserver.db`): a restart in the same
    /// directory carries on from what the last run committed.
    pub fn start_in(
        dir: &std::path::Path,
        credentials: &str,
        listen: &[&str],
        args: &[&str],
    ) -> TestServer {
        TestServer::start_in_with_env(dir, credentials, listen, args, &[])
    }

    /// As [`TestServer::start_in`], with environment variables that
    /// override the harness's own (see [`TestServer::start_with_env`]).
    pub fn start_in_with_env(
        dir: &std::path::Path,
        credentials: &str,
        listen: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> TestServer {
        let path = dir.join("credentials.txt");
        std::fs::write(&path, credentials).unwrap();
        let mut child = binary()
            .current_dir(dir)
            .args(listen)
            .arg("--credentials")
            .arg(&path)
            .args(args)
            .args(address_limits_off(args))
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(at) = line.find("listening on ") {
                        let addr = line[at + 13..]
                            .split_whitespace()
                            .next()
                            .unwrap()
                            .to_owned();
                        let _ = tx.send(addr);
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(TIMEOUT) {
            Ok(addr) => addr.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start: {:?}", log.lock().unwrap());
            }
        };
        TestServer {
            child,
            addr,
            log,
            _owned_dir: None,
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Connects, checks the hello, logs in.
    pub fn login(&self, user: &str) -> Client {
        let mut c = self.connect();
        c.login(user);
        c
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            if self.log().iter().any(|l| l.contains(needle)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no log line with {needle:?}: {:#?}", self.log());
    }

    /// The `--http` listener's address, from the log.
    pub fn http_addr(&self) -> SocketAddr {
        let marker = "serving the chat page on ";
        self.wait_for_log(marker);
        let log = self.log();
        let line = log.iter().find(|l| l.contains(marker)).unwrap();
        let url = &line[line.find(marker).unwrap() + marker.len()..];
        let rest = url.split_once("://").unwrap().1;
        rest.split('/').next().unwrap().parse().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal with the system's `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not exit");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The demo-free credentials for `n` users `u0..`, password `p<i>`.
pub fn many_users(n: usize) -> String {
    (0..n).map(|i| format!("u{i} p{i}\n")).collect()
}

/// A client that sends and receives protocol frames, whatever carries
/// them (lines over TCP or TLS, WebSocket messages).
pub trait Frames {
    fn send(&mut self, frame: &str);

    /// The next frame.
    fn recv(&mut self) -> Value;

    /// The first `ok` or `error`, skipping presence and messages.
    fn recv_answer(&mut self) -> Value {
        loop {
            let v = self.recv();
            if v["type"] == "ok" || v["type"] == "error" {
                return v;
            }
        }
    }

    /// Sends a frame and returns the first `ok` or `error` after it.
    fn ask(&mut self, frame: &str) -> Value {
        self.send(frame);
        self.recv_answer()
    }

    /// The next frame of `kind`, skipping others.
    fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv();
            if v["type"] == kind {
                return v;
            }
        }
    }
}

impl Frames for Client {
    fn send(&mut self, frame: &str) {
        Client::send(self, frame);
    }

    fn recv(&mut self) -> Value {
        Client::recv(self)
    }
}

/// A rustls client configuration that trusts only `root`.
pub fn tls_client_config(
    root: &rustls::pki_types::CertificateDer<'static>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pub session: String,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        Client::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        let mut c = Client::from_stream_raw(stream);
        let hello = c.recv();
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(hello["version"], 1);
        c.session = hello["session"].as_str().unwrap().to_owned();
        c
    }

    /// A client on `stream` that has read nothing yet (not even `hello`).
    pub fn from_stream_raw(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let writer = stream.try_clone().unwrap();
        Client {
            reader: BufReader::new(stream),
            writer,
            session: String::new(),
        }
    }

    pub fn login(&mut self, user: &str) {
        let password = format!("pw-{user}");
        let ok = self.ask(&format!("login {user} {password}"));
        assert_eq!(
            (ok["type"].as_str(), ok["cmd"].as_str()),
            (Some("ok"), Some("login")),
            "{ok}"
        );
    }

    pub fn send(&mut self, line: &str) {
        self.try_send(line).unwrap();
    }

    /// Sends a line; an error once the server is gone.
    pub fn try_send(&mut self, line: &str) -> std::io::Result<()> {
        self.writer.write_all(format!("{line}\n").as_bytes())
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// The next frame.
    pub fn recv(&mut self) -> Value {
        self.try_recv()
            .expect("connection closed while a frame was expected")
    }

    /// The next frame, or `None` at end of stream.
    pub fn try_recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(line.trim_end()).unwrap_or_else(|e| panic!("{line:?}: {e}")),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// See [`Frames::ask`].
    pub fn ask(&mut self, line: &str) -> Value {
        Frames::ask(self, line)
    }

    /// See [`Frames::recv_answer`].
    pub fn recv_answer(&mut self) -> Value {
        Frames::recv_answer(self)
    }

    /// See [`Frames::recv_type`].
    pub fn recv_type(&mut self, kind: &str) -> Value {
        Frames::recv_type(self, kind)
    }

    /// Reads until the server closes; returns every frame.
    pub fn recv_to_end(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.try_recv()).collect()
    }

    /// Broadcasts `text` (waiting for each `ok`) until `user` is reported
    /// offline, at most `max` times: how many went out, and whether `user`
    /// went offline.
    pub fn broadcast_until_offline(&mut self, text: &str, user: &str, max: usize) -> (usize, bool) {
        for sent in 1..=max {
            self.send(&format!("broadcast {text}"));
            let mut offline = false;
            loop {
                let v = self.recv();
                if v["type"] == "presence" && v["user"] == user && v["online"] == false {
                    offline = true;
                }
                if v["type"] == "ok" {
                    break;
                }
            }
            if offline {
                return (sent, true);
            }
        }
        (max, false)
    }

    /// The raw socket, for reading past the frame layer.
    pub fn into_stream(self) -> TcpStream {
        self.reader.into_inner()
    }

    pub fn shutdown(&self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
    }

    /// Closes the sending half only: the client still reads.
    pub fn shutdown_write(&self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Write);
    }
}

/// Sends one HTTP request to `addr` and reads the whole response (the
/// server closes after it).
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    read_http_response(&mut stream, request.starts_with(b"HEAD "))
}

/// One HTTP response from `stream`: its head, then as many bytes of body
/// as its `Content-Length` says (none for a HEAD request's), or to the end
/// of the stream without one. The connection may stay open (keep-alive).
pub fn read_http_response(stream: &mut impl Read, head_request: bool) -> String {
    let mut response = Vec::new();
    let mut byte = [0];
    while !response.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).unwrap() {
            0 => return String::from_utf8_lossy(&response).into_owned(),
            _ => response.push(byte[0]),
        }
    }
    let head = String::from_utf8_lossy(&response).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|n| n.trim().parse::<usize>().unwrap());
    match length {
        _ if head_request || head.starts_with("http/1.1 101 ") => {}
        Some(length) => {
            let mut body = vec![0; length];
            stream.read_exact(&mut body).unwrap();
            response.extend_from_slice(&body);
        }
        None => {
            stream.read_to_end(&mut response).unwrap();
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn temp_file(contents: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credentials.txt");
    std::fs::write(&path, contents).unwrap();
    (dir, path)
}

/// Runs the server binary with `args` to completion; returns (exit code,
/// stderr).
pub fn run(args: &[&str]) -> (i32, String) {
    let out = binary().args(args).stdin(Stdio::null()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd` with `input` on standard input; returns (exit code, stdout,
/// stderr).
pub fn run_with_input(mut cmd: Command, input: &str) -> (i32, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A throwaway self-signed certificate for `name` (a host name or an IP
/// address), written as `cert.pem` and `key.pem` in `dir`; returns their
/// paths and the certificate, to trust.
pub fn certificate(
    dir: &std::path::Path,
    name: &str,
) -> (String, String, rustls::pki_types::CertificateDer<'static>) {
    let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    (
        cert_path.to_str().unwrap().to_owned(),
        key_path.to_str().unwrap().to_owned(),
        cert.cert.der().clone(),
    )
}

impl Client {
    /// The next frame if one starts arriving within `timeout`; `None` if
    /// none does, or at end of stream. Nothing is lost on a timeout: only
    /// a frame that has begun to arrive is read (with the usual timeout).
    pub fn recv_within(&mut self, timeout: Duration) -> Option<Value> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .unwrap();
        let waited = self.reader.fill_buf().map(|buf| buf.is_empty());
        self.reader
            .get_ref()
            .set_read_timeout(Some(TIMEOUT))
            .unwrap();
        match waited {
            Ok(true) => None,
            Ok(false) => self.try_recv(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// The local address of the connection (its port tells the server's
    /// socket for it apart).
    pub fn local_addr(&self) -> SocketAddr {
        self.writer.local_addr().unwrap()
    }
}

/// Each frame's kind: its type, an error's code, or `bye <reason>`.
pub fn frame_kinds(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| match f["type"].as_str().unwrap_or("?") {
            "error" => f["code"].as_str().unwrap_or("?").to_owned(),
            "bye" => format!("bye {}", f["reason"].as_str().unwrap_or("?")),
            other => other.to_owned(),
        })
        .collect()
}
