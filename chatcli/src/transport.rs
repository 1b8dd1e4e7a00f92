//! The connection to the server: plain TCP, or TLS over it (`--tls`).
//!
//! The receiving thread reads while the main thread writes. A TLS session
//! is one state machine for both directions, so it sits behind a lock;
//! the reader waits for the socket *outside* the lock (a blocking read of
//! raw TLS bytes), then takes the lock only to hand them to rustls and
//! take the plaintext out. An idle session therefore sleeps in the kernel
//! until the server sends something, and a write never waits for a read.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

/// How long the TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one write may wait for the server to take it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection both threads share.
#[derive(Clone)]
pub enum Transport {
    Plain(Arc<TcpStream>),
    Tls(Arc<TlsStream>),
}

/// A TLS session over its socket.
pub struct TlsStream {
    socket: TcpStream,
    state: Mutex<TlsState>,
}

/// What the lock guards: the session, and what the socket gave that the
/// session has not taken yet.
struct TlsState {
    conn: ClientConnection,
    received: Vec<u8>,
    /// The server closed the socket.
    eof: bool,
}

/// Which certificates to trust with `--tls`.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The system's roots.
    System,
    /// Only the CA certificates in this PEM file.
    Ca(std::path::PathBuf),
    /// Anything (`--insecure`).
    Anything,
}

impl Transport {
    pub fn plain(stream: TcpStream) -> Transport {
        Transport::Plain(Arc::new(stream))
    }

    /// TLS to `host` (the name the certificate must carry) over `stream`.
    pub fn tls(mut stream: TcpStream, host: &str, trust: &Trust) -> Result<Transport, String> {
        let config = client_config(trust)?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
        let mut conn = ClientConnection::new(Arc::new(config), name)
            .map_err(|e| format!("cannot start TLS: {e}"))?;
        // Handshake now, so a certificate problem is an error here and not
        // a silent end of the session later.
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            match conn.complete_io(&mut stream) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {
                    return Err(format!(
                        "no TLS handshake within {} s: does this port serve TLS? (without --tls for a plain one)",
                        HANDSHAKE_TIMEOUT.as_secs()
                    ))
                }
                Err(e) => return Err(format!("TLS handshake failed: {e}")),
            }
        }
        stream.set_read_timeout(None).map_err(|e| e.to_string())?;
        // A write holds the session's lock: one the server never takes
        // must not hold it (and the reader's `bye`) for ever.
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        Ok(Transport::Tls(Arc::new(TlsStream {
            socket: stream,
            state: Mutex::new(TlsState {
                conn,
                received: Vec::new(),
                eof: false,
            }),
        })))
    }

    /// Reads some bytes; blocks until there are some or the connection
    /// ends.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => (&**s).read(buf),
            Transport::Tls(tls) => tls.read(buf),
        }
    }

    /// Writes all of `buf`.
    pub fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => (&**s).write_all(buf),
            Transport::Tls(tls) => tls.write_all(buf),
        }
    }
}

impl TlsStream {
    fn lock(&self) -> MutexGuard<'_, TlsState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut raw = [0; 16 * 1024];
        loop {
            {
                let mut state = self.lock();
                match state.conn.reader().read(buf) {
                    // Ok(0) is the server's close_notify.
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // A peer that closes without close_notify ends the
                    // session too.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if !state.received.is_empty() {
                    // Taken a record or so at a time, the plaintext read
                    // out in between, so rustls's buffer never overflows.
                    let TlsState { conn, received, .. } = &mut *state;
                    let taken = conn.read_tls(&mut &received[..])?;
                    received.drain(..taken);
                    conn.process_new_packets().map_err(io::Error::other)?;
                    // What processing made (an alert, a key update) goes
                    // out at once.
                    while conn.wants_write() {
                        conn.write_tls(&mut &self.socket)?;
                    }
                    continue;
                }
                if state.eof {
                    return Ok(0);
                }
            }
            // Nothing to give: wait for the server, without the lock.
            let n = (&self.socket).read(&mut raw)?;
            let mut state = self.lock();
            if n == 0 {
                state.eof = true;
            } else {
                state.received.extend_from_slice(&raw[..n]);
            }
        }
    }

    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        state.conn.writer().write_all(buf)?;
        while state.conn.wants_write() {
            state.conn.write_tls(&mut &self.socket)?;
        }
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn client_config(trust: &Trust) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match trust {
        Trust::Anything => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
            .with_no_client_auth(),
        Trust::System => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "no trusted root certificates found on this system: use --ca FILE".to_owned(),
                );
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Ca(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(config)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// `--insecure`: any certificate passes. Signatures are still checked, so
/// the session is encrypted, but to whoever answered.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
