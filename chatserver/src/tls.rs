//! TLS: the server's certificate chain and key, read from PEM files into a
//! rustls configuration (ring as the crypto provider), and [`TlsSession`],
//! one connection's TLS as the link uses it (sans-IO, like rustls itself).
//!
//! Without the `tls` feature the types are still here, uninhabited: a
//! build without rustls (the fuzz crate's) has no TLS listener, so no link
//! ever holds a session, and the link's code needs no feature gates.

#[cfg(feature = "tls")]
pub use with_rustls::*;
#[cfg(not(feature = "tls"))]
pub use without_rustls::*;

#[cfg(feature = "tls")]
mod with_rustls {
    use std::io::{self, Read, Write};
    use std::path::Path;
    use std::sync::Arc;

    use bytes::Bytes;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use crate::output_queue::{Flushed, OutputQueue};

    /// The configuration a TLS listener's connections share.
    pub type TlsConfig = Arc<rustls::ServerConfig>;

    /// Why the TLS configuration cannot be made.
    #[derive(Debug, thiserror::Error)]
    pub enum TlsError {
        /// The certificate file cannot be read or is not PEM.
        #[error("cannot read the TLS certificate {path}: {source}")]
        Cert {
            /// The file.
            path: String,
            /// What went wrong.
            source: rustls::pki_types::pem::Error,
        },
        /// The certificate file holds no certificate.
        #[error("{path}: no certificate in it (expected PEM 'BEGIN CERTIFICATE' blocks)")]
        NoCert {
            /// The file.
            path: String,
        },
        /// The key file cannot be read or is not PEM.
        #[error("cannot read the TLS key {path}: {source}")]
        Key {
            /// The file.
            path: String,
            /// What went wrong.
            source: rustls::pki_types::pem::Error,
        },
        /// rustls refuses the certificate and key.
        #[error("the TLS certificate and key do not go together, or are unusable: {0}")]
        Config(rustls::Error),
    }

    /// A server configuration for the chain in `cert` and the key in `key`.
    pub fn server_config(cert: &Path, key: &Path) -> Result<TlsConfig, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect())
            .map_err(|source| TlsError::Cert {
                path: cert.display().to_string(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCert {
                path: cert.display().to_string(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
            path: key.display().to_string(),
            source,
        })?;
        config_for(chain, key)
    }

    /// A server configuration for a chain and key already in memory.
    pub fn config_for(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<TlsConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
        Ok(Arc::new(config))
    }

    /// One connection's TLS session.
    #[derive(Debug)]
    pub struct TlsSession(rustls::ServerConnection);

    /// What [`TlsSession::decrypt`] found.
    #[derive(Debug)]
    pub enum Decrypted {
        /// Plaintext (possibly none yet: the handshake goes on).
        Plain(Bytes),
        /// The peer ended the session with `close_notify`.
        Closed,
    }

    impl TlsSession {
        /// A new server session.
        pub fn new(config: &TlsConfig) -> Result<TlsSession, rustls::Error> {
            rustls::ServerConnection::new(config.clone()).map(TlsSession)
        }

        /// Whether the handshake is still under way.
        pub fn is_handshaking(&self) -> bool {
            self.0.is_handshaking()
        }

        /// Whether it has records to send.
        pub fn wants_write(&self) -> bool {
            self.0.wants_write()
        }

        /// Takes records from the front of `data` (as many as its buffer
        /// holds); how many bytes it took.
        pub fn read_tls(&mut self, data: &mut &[u8]) -> io::Result<usize> {
            self.0.read_tls(data)
        }

        /// Processes the records taken, and returns the plaintext they
        /// held; an error is the broken session's reason (its alert is
        /// queued to go out).
        pub fn decrypt(&mut self) -> Result<Decrypted, rustls::Error> {
            let state = self.0.process_new_packets()?;
            let waiting = state.plaintext_bytes_to_read();
            if waiting == 0 {
                return Ok(if state.peer_has_closed() {
                    Decrypted::Closed
                } else {
                    Decrypted::Plain(Bytes::new())
                });
            }
            let mut plain = vec![0; waiting];
            // rustls said this much is buffered, so the read is whole.
            let read = self.0.reader().read(&mut plain).unwrap_or(0);
            plain.truncate(read);
            Ok(Decrypted::Plain(Bytes::from(plain)))
        }

        /// Moves what `output` holds into the session, as much as its
        /// plaintext buffer takes (copied once, into records).
        pub fn write_plaintext(&mut self, output: &mut OutputQueue) -> io::Result<Flushed> {
            output.write_to(&mut Plaintext(&mut self.0))
        }

        /// Queues `close_notify`.
        pub fn send_close_notify(&mut self) {
            self.0.send_close_notify();
        }

        /// Writes queued records to `socket`.
        pub fn write_tls(&mut self, socket: &mut dyn Write) -> io::Result<usize> {
            self.0.write_tls(socket)
        }
    }

    /// rustls' plaintext buffer as a writer that says "would block" when
    /// full, so `OutputQueue` keeps what does not fit.
    struct Plaintext<'a>(&'a mut rustls::ServerConnection);

    impl Write for Plaintext<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self.0.writer().write(buf)? {
                0 if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            }
        }

        fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            match self.0.writer().write_vectored(bufs)? {
                0 if total > 0 => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(not(feature = "tls"))]
mod without_rustls {
    use std::io::{self, Write};

    use bytes::Bytes;

    use crate::output_queue::{Flushed, OutputQueue};

    /// No TLS in this build: no value of this type exists, so no listener
    /// serves TLS.
    #[derive(Debug, Clone)]
    pub enum TlsConfig {}

    /// No TLS in this build: no link holds a session.
    #[derive(Debug)]
    pub enum TlsSession {}

    /// What a session decrypted (never made in this build).
    #[derive(Debug)]
    pub enum Decrypted {
        /// Plaintext.
        Plain(Bytes),
        /// The peer ended the session.
        Closed,
    }

    /// Why a session failed (never made in this build).
    #[derive(Debug, thiserror::Error)]
    #[error("no TLS in this build")]
    pub struct NoTls;

    // Each method matches on the uninhabited session: none is ever called.
    #[allow(missing_docs)]
    impl TlsSession {
        pub fn new(config: &TlsConfig) -> Result<TlsSession, NoTls> {
            match *config {}
        }
        pub fn is_handshaking(&self) -> bool {
            match *self {}
        }
        pub fn wants_write(&self) -> bool {
            match *self {}
        }
        pub fn read_tls(&mut self, _: &mut &[u8]) -> io::Result<usize> {
            match *self {}
        }
        pub fn decrypt(&mut self) -> Result<Decrypted, NoTls> {
            match *self {}
        }
        pub fn write_plaintext(&mut self, _: &mut OutputQueue) -> io::Result<Flushed> {
            match *self {}
        }
        pub fn send_close_notify(&mut self) {
            match *self {}
        }
        pub fn write_tls(&mut self, _: &mut dyn Write) -> io::Result<usize> {
            match *self {}
        }
    }
}
