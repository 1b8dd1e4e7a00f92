//! Abuse resistance end to end, over real loopback sockets against the
//! real binary: password checks and logins limited per address and per
//! name, connection limits per address and for connections not logged in,
//! TLS handshake budgets, slow consumers judged over time, dead peers found
//! by TCP keepalive, WebSocket close codes, and the open-file limit.
//!
//! Clients from a second address bind 127.0.0.2 (all of 127/8 is
//! loopback on Linux). The dead-peer test makes a network namespace and a
//! veth pair of its own, and skips if it may not.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{binary, Client, TestServer, CREDENTIALS, TIMEOUT};
use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// The second client address.
const OTHER_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A TCP connection to `addr` from `from` (any port).
fn connect_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
    socket.connect_timeout(&addr.into(), TIMEOUT).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// Reads everything until the server closes.
fn read_to_close(mut stream: TcpStream) -> String {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).unwrap();
    got
}

const TOO_MANY_CONNECTIONS: &str = "{\"type\":\"bye\",\"reason\":\"too_many_connections\"}\n";
const SERVER_FULL: &str = "{\"type\":\"bye\",\"reason\":\"server_full\"}\n";

/// A JSON login with an id.
fn login_frame(user: &str, password: &str, id: u64) -> String {
    json!({"cmd": "login", "user": user, "password": password, "id": id}).to_string()
}

/// The answers to `frames`, sent in one write, as (id, code or "ok").
fn ask_batch(c: &mut Client, frames: &[String]) -> Vec<(u64, String)> {
    let batch: String = frames.iter().map(|f| format!("{f}\n")).collect();
    c.send_bytes(batch.as_bytes());
    frames
        .iter()
        .map(|_| {
            let a = c.recv_answer();
            let code = match a["type"].as_str() {
                Some("ok") => "ok".to_owned(),
                _ => a["code"].as_str().unwrap().to_owned(),
            };
            (a["id"].as_u64().unwrap(), code)
        })
        .collect()
}

/// `chatserver hash-password` for `password`.
fn hash_password(password: &str) -> String {
    let mut cmd = binary();
    cmd.arg("hash-password");
    let (code, hash, err) = common::run_with_input(cmd, &format!("{password}\n"));
    assert_eq!(code, 0, "{err}");
    hash.trim().to_owned()
}

// 1. Password checks per address.

#[test]
fn pending_password_checks_are_capped_per_address_and_served_in_turn() {
    let credentials = format!("alice {}\nbob pw-bob\n", hash_password("pw-alice"));
    let server = TestServer::start_with(
        &credentials,
        &["--listen", "127.0.0.1:0", "--no-db"],
        &["--max-pending-checks-per-ip", "8", "--verify-threads", "1"],
    );
    // 64 connections from one address, each with one wrong login for a
    // name of its own (so no lock gets in the way), sent without waiting.
    let mut flood: Vec<Client> = (0..64)
        .map(|_| Client::from_stream(connect_from(OTHER_ADDRESS, server.addr)))
        .collect();
    for (i, c) in flood.iter_mut().enumerate() {
        c.send(&login_frame(&format!("ghost{i}"), "wrong", i as u64));
    }
    let (tx, answers) = mpsc::channel();
    for mut c in flood {
        let tx = tx.clone();
        std::thread::spawn(move || {
            // The checks of this address may take a while on a busy
            // machine; the server's exit ends the wait in any case.
            if let Some(a) = c.recv_within(Duration::from_secs(60)) {
                let _ = tx.send(a["code"].as_str().unwrap_or("ok").to_owned());
            }
        });
    }
    drop(tx);
    // At most 8 of them wait for a check; the rest are refused at once.
    let mut codes = Vec::new();
    let start = Instant::now();
    while codes.len() < 56 {
        let left = (TIMEOUT * 2).saturating_sub(start.elapsed());
        match answers.recv_timeout(left) {
            Ok(code) => codes.push(code),
            Err(_) => panic!("only {} of 64 logins answered: {codes:?}", codes.len()),
        }
    }
    let unavailable = codes.iter().filter(|c| *c == "unavailable").count();
    assert!(unavailable > 0, "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| c == "unavailable" || c == "invalid_credentials"),
        "{codes:?}"
    );
    // A user from another address gets a check of their own, between
    // the flood's: the right password works on the first attempt.
    let mut alice = server.connect();
    let asked = Instant::now();
    alice.send(&login_frame("alice", "pw-alice", 1));
    let ok = alice
        .recv_within(Duration::from_secs(30))
        .expect("the login from another address was never answered");
    let took = asked.elapsed();
    assert_eq!(
        (ok["type"].as_str(), ok["id"].as_u64(), ok["user"].as_str()),
        (Some("ok"), Some(1), Some("alice")),
        "{ok}"
    );
    eprintln!("alice's login took {took:?} behind the flood's checks");
    // Served in turn: the flood's checks were not all run before hers.
    // (Each takes an Argon2id check and a rest; the answers from the
    // threads come within this pause.)
    std::thread::sleep(Duration::from_millis(100));
    codes.extend(answers.try_iter());
    assert!(
        codes.len() < 64,
        "every check of the flooding address ran before the other address's"
    );
}

// 2. Connections per address, and connections not logged in.

#[test]
fn the_connection_past_256_from_one_address_gets_too_many_connections() {
    let server = TestServer::start(&["--max-connections-per-ip", "256", "--no-db"]);
    let _open: Vec<Client> = (0..256).map(|_| server.connect()).collect();
    let refused = TcpStream::connect(server.addr).unwrap();
    assert_eq!(read_to_close(refused), TOO_MANY_CONNECTIONS);
    // Another address is not held to the first one's count.
    let mut other = Client::from_stream(connect_from(OTHER_ADDRESS, server.addr));
    other.login("alice");
}

#[test]
fn connections_not_logged_in_are_capped_at_a_share_of_max_connections() {
    let server = TestServer::start(&[
        "--max-connections",
        "10",
        "--max-unauthenticated-percent",
        "50",
        "--no-db",
    ]);
    let mut waiting: Vec<Client> = (0..5).map(|_| server.connect()).collect();
    let refused = TcpStream::connect(server.addr).unwrap();
    assert_eq!(read_to_close(refused), SERVER_FULL);
    // A login frees the slot it held among those not logged in.
    waiting[0].login("alice");
    let _sixth = server.connect();
    let refused = TcpStream::connect(server.addr).unwrap();
    assert_eq!(read_to_close(refused), SERVER_FULL);
    server.wait_for_log("server full of connections not logged in");
}

// 3. Login rates.

#[test]
fn the_fifth_login_in_a_second_from_one_address_is_rate_limited() {
    let server = TestServer::start(&["--login-rate-per-ip", "2", "--no-db"]);
    let mut c = server.connect();
    // One write: the server reads the five at the same moment.
    let frames: Vec<String> = (1..=5)
        .map(|i| login_frame(&format!("ghost{i}"), "nope", i))
        .collect();
    let answers = ask_batch(&mut c, &frames);
    let expected: Vec<(u64, String)> = (1..=4)
        .map(|i| (i, "invalid_credentials".to_owned()))
        .chain([(5, "rate_limited".to_owned())])
        .collect();
    assert_eq!(answers, expected);
    // A new connection from the same address gets no new budget (the
    // bucket refills at 2 a second: of three at once, one is refused
    // unless a second and a half went by).
    let mut again = server.connect();
    let frames: Vec<String> = (6..=8)
        .map(|i| login_frame(&format!("ghost{i}"), "nope", i))
        .collect();
    let answers = ask_batch(&mut again, &frames);
    assert_eq!(answers[2], (8, "rate_limited".to_owned()), "{answers:?}");
    // Another address has a budget of its own.
    let mut other = Client::from_stream(connect_from(OTHER_ADDRESS, server.addr));
    let ok = other.ask(&login_frame("alice", "pw-alice", 9));
    assert_eq!(
        (ok["type"].as_str(), ok["id"].as_u64()),
        (Some("ok"), Some(9))
    );
}

#[test]
fn the_sixth_login_in_a_second_for_one_name_is_rate_limited() {
    let server = TestServer::start(&[
        "--login-rate-per-name",
        "1",
        // No lock before the sixth attempt: the rate is what refuses it.
        "--lockout-attempts",
        "10",
        "--no-db",
    ]);
    // A made-up name and a real account alike; for the account, the sixth
    // attempt has the right password and is refused all the same.
    for (name, right) in [("ghost", "nope"), ("alice", "pw-alice")] {
        let mut c = server.connect();
        let frames: Vec<String> = (1..=6)
            .map(|i| login_frame(name, if i == 6 { right } else { "nope" }, i))
            .collect();
        let answers = ask_batch(&mut c, &frames);
        let expected: Vec<(u64, String)> = (1..=5)
            .map(|i| (i, "invalid_credentials".to_owned()))
            .chain([(6, "rate_limited".to_owned())])
            .collect();
        assert_eq!(answers, expected, "{name}");
        // Per name, whatever the address: two more from another address,
        // of which at most one may come after a token refilled.
        let mut other = Client::from_stream(connect_from(OTHER_ADDRESS, server.addr));
        let frames: Vec<String> = (7..=8).map(|i| login_frame(name, "nope", i)).collect();
        let answers = ask_batch(&mut other, &frames);
        assert_eq!(answers[1], (8, "rate_limited".to_owned()), "{name}");
    }
    // Other names are not held up.
    let mut bob = server.connect();
    let ok = bob.ask(&login_frame("bob", "pw-bob", 1));
    assert_eq!(ok["type"], "ok", "{ok}");
}

// 4. TLS handshake budgets.

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Completes a TLS handshake on `tcp`, trusting only `root`.
fn tls_handshake(
    tcp: TcpStream,
    root: &rustls::pki_types::CertificateDer<'static>,
) -> std::io::Result<TlsStream> {
    let config = common::tls_client_config(root);
    let mut conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
    let mut tcp = tcp;
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// Lines over a TLS session.
struct TlsLines(BufReader<TlsStream>);

impl TlsLines {
    /// The next line; `None` once the server has closed.
    fn next_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.0.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line),
            // Closed without close_notify: the end all the same.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
            Err(e) => panic!("TLS read failed: {e}"),
        }
    }

    /// The next line as a frame.
    fn next_frame(&mut self) -> Value {
        let line = self.next_line().expect("the server closed the session");
        serde_json::from_str(line.trim_end()).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    /// Every line up to the server's close.
    fn read_to_end(&mut self) -> Vec<String> {
        (0..100).map_while(|_| self.next_line()).collect()
    }
}

fn tls_server(args: &[&str]) -> (TestServer, rustls::pki_types::CertificateDer<'static>) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, root) = common::certificate(dir.path(), "localhost");
    let mut all = vec!["--tls-cert", &cert, "--tls-key", &key, "--no-db"];
    all.extend_from_slice(args);
    let server = TestServer::start(&all);
    server.wait_for_log("with TLS");
    (server, root)
}

/// A TLS session on `tcp` that got its `hello`.
fn tls_session(tcp: TcpStream, root: &rustls::pki_types::CertificateDer<'static>) -> TlsLines {
    let tls = tls_handshake(tcp, root).expect("a handshake within the budget");
    let mut lines = TlsLines(BufReader::new(tls));
    assert_eq!(lines.next_frame()["type"], "hello");
    lines
}

#[test]
fn a_third_tls_connection_in_a_second_from_one_address_is_closed_without_a_handshake() {
    let (server, root) = tls_server(&["--tls-handshakes-per-ip", "1"]);
    // Three connections at once: the budget (a burst of 2) is taken as
    // the server accepts them, in order.
    let first = TcpStream::connect(server.addr).unwrap();
    let second = TcpStream::connect(server.addr).unwrap();
    let mut third = TcpStream::connect(server.addr).unwrap();
    // The third is closed at once, before it says anything: a server
    // that meant to shake hands would wait for the ClientHello.
    third.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut byte = [0u8; 1];
    match third.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the third connection was not closed: {other:?}"),
    }
    // So a handshake on it fails.
    assert!(tls_handshake(third, &root).is_err());
    let _sessions = [tls_session(first, &root), tls_session(second, &root)];
    // Another address has a budget of its own.
    let _other = tls_session(connect_from(OTHER_ADDRESS, server.addr), &root);
}

#[test]
fn a_tls_connection_over_a_limit_finishes_its_handshake_then_reads_why() {
    let (server, root) = tls_server(&["--max-connections-per-ip", "1"]);
    let _first = tls_session(TcpStream::connect(server.addr).unwrap(), &root);
    let second = tls_handshake(TcpStream::connect(server.addr).unwrap(), &root)
        .expect("the refusal comes after a whole handshake");
    let lines = TlsLines(BufReader::new(second)).read_to_end();
    assert_eq!(lines, [TOO_MANY_CONNECTIONS]);
    server.wait_for_log("too many connections from this address");
}

// 5. Slow consumers, judged over time.

/// The bytes the kernel holds unacknowledged on the server's socket from
/// `server_port` to `client_port` (`tx_queue` in /proc/net/tcp): the part
/// of a backlog the server has handed to the kernel.
fn kernel_send_queue(server_port: u16, client_port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 4
            && port(fields[1]) == Some(server_port)
            && port(fields[2]) == Some(client_port)
        {
            let tx = fields[4].split(':').next().unwrap();
            return u64::from_str_radix(tx, 16).unwrap();
        }
    }
    panic!("no server socket for client port {client_port} in /proc/net/tcp");
}

/// A logged-in user whose socket has a tiny receive buffer, and who never
/// reads: everything the server sends it backs up.
fn stalled_reader(server: &TestServer, user: &str) -> Client {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .connect_timeout(&server.addr.into(), TIMEOUT)
        .unwrap();
    let mut c = Client::from_stream(socket.into());
    c.login(user);
    c
}

/// A broadcast from `sender`, and its `ok` (skipping presence and the
/// like).
fn broadcast(sender: &mut Client, text: &str) {
    let ok = sender.ask(&format!("broadcast {text}"));
    assert_eq!(ok["type"], "ok", "{ok}");
}

/// Broadcasts `text` until the kernel stops taking more for `reader`
/// (its send queue on the server's socket stops growing for 3 broadcasts
/// in a row): from then on, each broadcast stays whole in the server's own
/// output queue. Returns the broadcasts sent since it stopped growing.
fn broadcast_until_the_kernel_is_full(
    sender: &mut Client,
    text: &str,
    server: &TestServer,
    reader: &Client,
) -> usize {
    let reader_port = reader.local_addr().port();
    let mut last = 0;
    let mut flat = 0;
    for _ in 0..1000 {
        broadcast(sender, text);
        let queued = kernel_send_queue(server.addr.port(), reader_port);
        if queued > 0 && queued == last {
            flat += 1;
            if flat == 3 {
                return flat;
            }
        } else {
            flat = 0;
        }
        last = queued;
    }
    panic!("the kernel kept taking output for a reader that does not read");
}

/// The frames `reader` got, up to the server's close, which must be a `bye`
/// with `reason`.
fn assert_ends_with_bye(reader: &mut Client, reason: &str) {
    // The reader has a lot to read: give it a cap.
    let mut last = None;
    for _ in 0..10_000 {
        match reader.try_recv() {
            Some(v) => last = Some(v),
            None => break,
        }
    }
    assert_eq!(last, Some(json!({"type":"bye","reason":reason})));
}

/// The length of each broadcast's text in the slow-consumer tests: with the
/// JSON around it, a frame of about 8 KB for each reader.
const BROADCAST_TEXT: usize = 8000;

#[test]
fn a_backlog_over_max_output_bytes_is_cut_off_only_after_slow_consumer_secs() {
    let server = TestServer::start(&[
        "--max-output-bytes",
        "65536",
        "--slow-consumer-secs",
        "2",
        "--no-rate-limit",
        "--no-db",
    ]);
    let mut bob = stalled_reader(&server, "bob");
    let mut carol = server.login("carol");
    let mut alice = server.login("alice");
    let text = "x".repeat(BROADCAST_TEXT);
    let mut in_backlog = broadcast_until_the_kernel_is_full(&mut alice, &text, &server, &bob);
    // 11 broadcasts of 8 KB in bob's backlog: over 64 KiB, far under four
    // times that.
    while in_backlog < 11 {
        broadcast(&mut alice, &text);
        in_backlog += 1;
    }
    let over = Instant::now();
    // Over the limit, and still online.
    let who = carol.ask("whoelse");
    assert_eq!(who["users"], json!(["alice", "bob"]), "{who}");
    // Then nothing more happens on the server: its own deadline cuts bob
    // off.
    let mut cut = None;
    while over.elapsed() < Duration::from_secs(15) {
        match alice.recv_within(Duration::from_millis(200)) {
            Some(v) if v["type"] == "presence" && v["user"] == "bob" => {
                assert_eq!(v["online"], false, "{v}");
                cut = Some(over.elapsed());
                break;
            }
            Some(v) => panic!("unexpected {v}"),
            None => {}
        }
    }
    let cut = cut.expect("a backlog over the limit for 15 s was never cut off");
    eprintln!("cut off {cut:?} after the backlog went over the limit");
    assert_ends_with_bye(&mut bob, "slow_consumer");
    server.wait_for_log("slow consumer");
    let who = carol.ask("whoelse");
    assert_eq!(who["users"], json!(["alice"]), "{who}");
}

#[test]
fn a_backlog_past_four_times_max_output_bytes_is_cut_off_at_once() {
    // A grace time no test waits for: only the 4x rule can cut bob off.
    let server = TestServer::start(&[
        "--max-output-bytes",
        "65536",
        "--slow-consumer-secs",
        "600",
        "--no-rate-limit",
        "--no-db",
    ]);
    let mut bob = stalled_reader(&server, "bob");
    let mut alice = server.login("alice");
    let text = "x".repeat(BROADCAST_TEXT);
    let full = broadcast_until_the_kernel_is_full(&mut alice, &text, &server, &bob);
    let (more, cut) = alice.broadcast_until_offline(&text, "bob", 100);
    assert!(cut, "a backlog of 100 broadcasts of 8 KB was not cut off");
    // Not when it first went over 64 KiB (9 broadcasts), nor 3 times
    // that (25), but once past 256 KiB (33).
    let in_backlog = full + more;
    eprintln!("cut off with {in_backlog} broadcasts of 8 KB in its backlog");
    assert!(
        (28..=38).contains(&in_backlog),
        "cut off with {in_backlog} broadcasts of 8 KB in its backlog"
    );
    assert_ends_with_bye(&mut bob, "slow_consumer");
}

#[test]
fn readers_that_keep_up_slowly_are_not_cut_off_by_a_fast_broadcaster() {
    const READERS: usize = 40;
    let credentials = format!("{}alice pw-alice\n", common::many_users(READERS));
    let server = TestServer::start_with(
        &credentials,
        &["--listen", "127.0.0.1:0", "--no-db"],
        &["--slow-consumer-secs", "2"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for i in 0..READERS {
        let mut c = server.connect();
        let ok = c.ask(&format!("login u{i} p{i}"));
        assert_eq!(ok["type"], "ok", "{ok}");
        let mut stream = c.into_stream();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let stop = stop.clone();
        // About 200 KB a second: 20 KB, then a tenth of a second's rest.
        readers.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 20_000];
            let mut total = 0usize;
            let mut tail = Vec::new();
            let mut cut = false;
            while !stop.load(Ordering::Relaxed) {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        cut = true;
                        break;
                    }
                    Ok(n) => {
                        total += n;
                        tail.extend_from_slice(&buf[..n]);
                        let keep = tail.len().saturating_sub(64);
                        if tail.windows(5).any(|w| w == b"\"bye\"") {
                            cut = true;
                        }
                        tail.drain(..keep);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => {
                        cut = true;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (total, cut)
        }));
    }
    let mut alice = server.login("alice");
    // 16 KB texts as fast as the server lets them: on `rate_limited`, a
    // short pause (100 refusals in a row would be a flood).
    let text = "y".repeat(16_000);
    let (mut delivered, mut refused) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        alice.send(&format!("broadcast {text}"));
        // The answer comes next: a presence (someone cut off) or
        // anything else would be a failure.
        let answer = alice.recv();
        assert!(
            answer["type"] == "ok" || answer["type"] == "error",
            "{answer}"
        );
        if answer["type"] == "ok" {
            assert_eq!(answer["delivered"], READERS, "{answer}");
            delivered += 1;
        } else {
            assert_eq!(answer["code"], "rate_limited", "{answer}");
            refused += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(refused > 0, "never rate limited in {delivered} broadcasts");
    let who = alice.ask("whoelse");
    assert_eq!(
        who["users"].as_array().map(Vec::len),
        Some(READERS),
        "{who}"
    );
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let (read, cut) = reader.join().unwrap();
        assert!(!cut, "a reader was cut off after reading {read} bytes");
        assert!(read > 0);
    }
    eprintln!("{delivered} broadcasts of 16 KB to {READERS} readers, {refused} refused");
    assert!(!server.log().iter().any(|l| l.contains("slow consumer")));
}

// 6. Dead peers.

/// A network namespace and a veth pair into it, made for one test and
/// deleted with it.
struct Netns {
    name: String,
    host_dev: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    ns_dev: String,
    made_ns: bool,
    made_link: bool,
    /// A blackhole for the pair's /30, behind its own route: should that
    /// route go away, nothing for the namespace's address leaves by the
    /// default route.
    blackhole: Option<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Makes the namespace and the pair, addressed as a /30 of 10.231/16
    /// picked from the process id; `Err` if this sandbox does not allow it.
    fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        let n = pid % 16_384;
        let third = u8::try_from(n / 64).unwrap();
        let fourth = u8::try_from(n % 64 * 4).unwrap();
        let mut netns = Netns {
            name: format!("chatabuse{pid}"),
            host_dev: format!("cab{pid}h"),
            ns_dev: format!("cab{pid}n"),
            host_ip: Ipv4Addr::new(10, 231, third, fourth + 1),
            ns_ip: Ipv4Addr::new(10, 231, third, fourth + 2),
            made_ns: false,
            made_link: false,
            blackhole: None,
        };
        // Drop deletes what was made, and only that.
        ip(&["netns", "add", &netns.name])?;
        netns.made_ns = true;
        let subnet = format!("10.231.{third}.{fourth}/30");
        ip(&["route", "add", "blackhole", &subnet, "metric", "4000"])?;
        netns.blackhole = Some(subnet);
        let (ns, host, inner) = (&netns.name, &netns.host_dev, &netns.ns_dev);
        ip(&[
            "link", "add", host, "type", "veth", "peer", "name", inner, "netns", ns,
        ])?;
        netns.made_link = true;
        let host = &netns.host_dev;
        ip(&["addr", "add", &format!("{}/30", netns.host_ip), "dev", host])?;
        ip(&["link", "set", host, "up"])?;
        let inner = &netns.ns_dev;
        netns.exec_ip(&["addr", "add", &format!("{}/30", netns.ns_ip), "dev", inner])?;
        netns.exec_ip(&["link", "set", inner, "up"])?;
        netns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// `ip ARGS` inside the namespace.
    fn exec_ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The namespace's end of the pair goes with the namespace, and
        // takes its peer along; deleting the host's end is for the case
        // it did not.
        if self.made_ns {
            let _ = ip(&["netns", "del", &self.name]);
        }
        if self.made_link {
            let _ = ip(&["link", "del", &self.host_dev]);
        }
        if let Some(subnet) = &self.blackhole {
            let _ = ip(&["route", "del", "blackhole", subnet, "metric", "4000"]);
        }
    }
}

/// A child process killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The environment variable that makes [`netns_client_helper`] a client.
const NETNS_CLIENT: &str = "CHATPROTO_ABUSE_NETNS_CLIENT";

/// Not a test: the client side of
/// [`a_peer_that_vanishes_is_logged_out_by_keepalive`], run by it in its
/// network namespace as `ip netns exec NS <this test binary>
/// netns_client_helper --exact --ignored`. Logs bob in at the address in
/// `CHATPROTO_ABUSE_NETNS_CLIENT`, says so, then waits (bounded) to be
/// killed.
#[test]
#[ignore = "a helper process for a_peer_that_vanishes_is_logged_out_by_keepalive"]
fn netns_client_helper() {
    let Ok(addr) = std::env::var(NETNS_CLIENT) else {
        return;
    };
    let mut bob = Client::connect(addr.parse().unwrap());
    bob.login("bob");
    println!("LOGGED-IN {}", bob.local_addr());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_peer_that_vanishes_is_logged_out_by_keepalive() {
    let netns = match Netns::create() {
        Ok(netns) => netns,
        Err(e) => {
            eprintln!(
                "SKIPPED a_peer_that_vanishes_is_logged_out_by_keepalive: cannot make a network namespace here ({e})"
            );
            return;
        }
    };
    let listen = format!("{}:0", netns.host_ip);
    let server = TestServer::start_with(
        CREDENTIALS,
        &["--listen", &listen, "--no-db"],
        &["--tcp-keepalive-secs", "2", "--tcp-user-timeout-secs", "3"],
    );
    let mut alice = server.login("alice");
    // Bob, from inside the namespace.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .arg(std::env::current_exe().unwrap())
        .args(["netns_client_helper", "--exact", "--ignored", "--nocapture"])
        .env(NETNS_CLIENT, server.addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _bob = Reaped(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("LOGGED-IN") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(TIMEOUT)
        .expect("bob did not log in from the namespace");
    assert!(line.contains(&netns.ns_ip.to_string()), "{line}");
    let online = alice.recv_type("presence");
    assert_eq!(
        (online["user"].as_str(), online["online"].as_bool()),
        (Some("bob"), Some(true))
    );
    // Bob's network goes away: no FIN, no RST, nothing.
    netns
        .exec_ip(&["link", "set", &netns.ns_dev, "down"])
        .unwrap();
    let gone = Instant::now();
    let mut offline = None;
    while gone.elapsed() < Duration::from_secs(20) {
        if let Some(v) = alice.recv_within(Duration::from_millis(200)) {
            assert_eq!(v["type"], "presence", "{v}");
            assert_eq!(
                (v["user"].as_str(), v["online"].as_bool()),
                (Some("bob"), Some(false))
            );
            offline = Some(gone.elapsed());
            break;
        }
    }
    let offline = offline.expect("bob's vanished connection was never closed");
    eprintln!("bob was logged out {offline:?} after his link went down");
    assert!(
        offline < Duration::from_secs(12),
        "keepalive took {offline:?}"
    );
    server.wait_for_log("disconnected");
}

// 7. WebSocket close codes.

fn ws_connect(http: SocketAddr) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(http).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{http}/ws").as_str(), stream).unwrap();
    ws
}

/// The frames the server sends until its close frame, and that frame's
/// status.
fn ws_frames_to_close(ws: &mut WebSocket<TcpStream>) -> (Vec<Value>, CloseCode) {
    let mut frames = Vec::new();
    for _ in 0..1000 {
        match ws.read() {
            Ok(Message::Text(text)) => frames.push(serde_json::from_str(&text).unwrap()),
            Ok(Message::Close(Some(close))) => return (frames, close.code),
            Ok(Message::Close(None)) => panic!("a close without a status after {frames:?}"),
            Ok(_) => {}
            Err(e) => panic!("no close frame after {frames:?}: {e}"),
        }
    }
    panic!("no close frame after {frames:?}");
}

fn http_server(args: &[&str]) -> (TestServer, SocketAddr) {
    let mut all = vec!["--http", "127.0.0.1:0", "--no-db"];
    all.extend_from_slice(args);
    let server = TestServer::start(&all);
    let http = server.http_addr();
    (server, http)
}

#[test]
fn a_websocket_gets_close_status_1001_at_server_shutdown() {
    let (mut server, http) = http_server(&[]);
    let mut ws = ws_connect(http);
    ws.send(Message::text("login alice pw-alice")).unwrap();
    server.signal("TERM");
    let (frames, code) = ws_frames_to_close(&mut ws);
    assert_eq!(
        frames.last(),
        Some(&json!({"type":"bye","reason":"server_shutdown"}))
    );
    assert_eq!(code, CloseCode::Away);
    assert_eq!(u16::from(code), 1001);
    assert!(server.wait_exit().success());
}

#[test]
fn a_websocket_gets_close_status_1008_after_bye_flood() {
    let (_server, http) = http_server(&[
        "--rate-limit-burst",
        "2",
        "--rate-limit-per-sec",
        "1",
        "--flood-after",
        "3",
    ]);
    let mut ws = ws_connect(http);
    assert_eq!(
        ws_read_frame(&mut ws)["type"],
        "hello",
        "the first frame is the hello"
    );
    for _ in 0..20 {
        // The server stops reading once it has said bye.
        if ws.send(Message::text("help")).is_err() {
            break;
        }
    }
    let (frames, code) = ws_frames_to_close(&mut ws);
    let kinds = common::frame_kinds(&frames);
    assert_eq!(
        kinds,
        [
            "ok",
            "ok",
            "rate_limited",
            "rate_limited",
            "rate_limited",
            "bye flood"
        ]
    );
    assert_eq!(code, CloseCode::Policy);
    assert_eq!(u16::from(code), 1008);
}

fn ws_read_frame(ws: &mut WebSocket<TcpStream>) -> Value {
    loop {
        match ws.read().unwrap() {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

// 8. The open-file limit.

#[test]
fn max_connections_past_the_open_file_limit_is_a_startup_error() {
    let (_dir, credentials) = common::temp_file(CREDENTIALS);
    let (code, err) = common::run(&[
        "--listen",
        "127.0.0.1:0",
        "--no-db",
        "--credentials",
        credentials.to_str().unwrap(),
        "--max-connections",
        "100000000",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--max-connections 100000000"), "{err}");
    assert!(err.contains("open-file limit"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
