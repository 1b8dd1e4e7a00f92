//! TLS end to end: a throwaway certificate made at test time, a full login
//! and message exchange over TLS (with a plaintext user on the side), and a
//! plaintext client on the TLS port cut off cleanly.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::{Frames, TestServer, CREDENTIALS, TIMEOUT};
use serde_json::Value;

/// A line-based client over TLS that trusts only `root`.
struct TlsClient {
    reader: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

impl TlsClient {
    fn connect(addr: SocketAddr, root: &rustls::pki_types::CertificateDer<'static>) -> TlsClient {
        let config = common::tls_client_config(root);
        let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut c = TlsClient {
            reader: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
        };
        assert_eq!(c.recv()["type"], "hello");
        c
    }
}

impl Frames for TlsClient {
    fn send(&mut self, line: &str) {
        let stream = self.reader.get_mut();
        stream.write_all(format!("{line}\n").as_bytes()).unwrap();
        stream.flush().unwrap();
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(line.trim_end()).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

#[test]
fn users_talk_over_tls_and_with_plaintext_users() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, root) = common::certificate(dir.path(), "localhost");
    let tls_port = common::free_port().to_string();
    let tls_addr = format!("127.0.0.1:{tls_port}");
    let server = TestServer::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-listen",
        &tls_addr,
    ]);
    server.wait_for_log("TLS on");
    let mut alice = TlsClient::connect(tls_addr.parse().unwrap(), &root);
    assert_eq!(alice.ask("login alice pw-alice")["cmd"], "login");
    let mut bob = server.login("bob");
    assert_eq!(alice.ask("message bob hello over tls")["stored"], false);
    assert_eq!(bob.recv_type("message")["text"], "hello over tls");
    bob.ask("message alice and back in plaintext");
    assert_eq!(alice.recv_type("message")["text"], "and back in plaintext");
    // A long burst goes through TLS records intact.
    let text = "z".repeat(10_000);
    for i in 0..20 {
        bob.send(&format!("message alice {i} {text}"));
    }
    for i in 0..20 {
        let m = alice.recv_type("message");
        assert_eq!(m["text"].as_str().unwrap(), format!("{i} {text}"));
    }
    let ok = alice.ask("logout");
    assert_eq!(ok["cmd"], "logout");
    assert_eq!(alice.recv()["type"], "bye");
}

#[test]
fn a_plaintext_client_on_the_tls_port_is_cut_off_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = common::certificate(dir.path(), "localhost");
    let server = TestServer::start(&["--tls-cert", &cert, "--tls-key", &key]);
    server.wait_for_log("with TLS");
    let mut plain = TcpStream::connect(server.addr).unwrap();
    plain.set_read_timeout(Some(TIMEOUT)).unwrap();
    plain.write_all(b"login alice pw-alice\n").unwrap();
    let mut got = Vec::new();
    // The server answers with a TLS alert (not a chat frame) and closes.
    plain.read_to_end(&mut got).unwrap();
    assert!(
        !got.starts_with(b"{"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    server.wait_for_log("TLS:");
}

#[test]
fn unreadable_certificates_are_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let (_creds_dir, creds) = common::temp_file(CREDENTIALS);
    let bad = bad.to_str().unwrap();
    let (code, err) = common::run(&[
        "--listen",
        "127.0.0.1:0",
        "--no-db",
        "--credentials",
        creds.to_str().unwrap(),
        "--tls-cert",
        bad,
        "--tls-key",
        bad,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no certificate"), "{err}");
}
