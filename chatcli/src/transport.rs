//! The connection to the server: plain TCP, or TLS over it (`--tls`).
//!
//! The receiving thread reads while the main thread writes. A TLS session
//! is one state machine for both directions, so it sits behind a lock; the
//! reader holds the lock only for one short socket read (the socket has a
//! read timeout), so a write waits at most that long.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};

/// How long the reader holds the TLS session per read.
const TLS_READ_SLICE: Duration = Duration::from_millis(20);

/// A connection both threads share.
#[derive(Clone)]
pub enum Transport {
    Plain(Arc<TcpStream>),
    Tls(Arc<Mutex<StreamOwned<ClientConnection, TcpStream>>>),
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
    pub fn tls(stream: TcpStream, host: &str, trust: &Trust) -> Result<Transport, String> {
        let config = client_config(trust)?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
        let conn = ClientConnection::new(Arc::new(config), name)
            .map_err(|e| format!("cannot start TLS: {e}"))?;
        stream
            .set_read_timeout(Some(TLS_READ_SLICE))
            .map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, stream);
        // Handshake now, so a certificate problem is an error here and not
        // a silent end of the session later.
        while tls.conn.is_handshaking() {
            match tls.conn.complete_io(&mut tls.sock) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(format!("TLS handshake failed: {e}")),
            }
        }
        Ok(Transport::Tls(Arc::new(Mutex::new(tls))))
    }

    /// Reads some bytes; blocks until there are some or the connection
    /// ends.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => (&**s).read(buf),
            Transport::Tls(tls) => loop {
                let mut tls = tls.lock().unwrap_or_else(|e| e.into_inner());
                match tls.read(buf) {
                    Err(e) if is_timeout(&e) => {
                        drop(tls);
                        std::thread::yield_now();
                    }
                    // A peer that closes without close_notify ends the
                    // session too.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    other => return other,
                }
            },
        }
    }

    /// Writes all of `buf`.
    pub fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => (&**s).write_all(buf),
            Transport::Tls(tls) => {
                let mut tls = tls.lock().unwrap_or_else(|e| e.into_inner());
                tls.write_all(buf)?;
                // Push the records out, riding out the read timeout.
                loop {
                    match tls.flush() {
                        Err(e) if is_timeout(&e) => {}
                        other => return other,
                    }
                }
            }
        }
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
