//! What a driver tells a connection it refuses before any session starts
//! (a connection limit reached): the core's `bye`, made without opening a
//! session, so the refused connection costs the core nothing.

use bytes::Bytes;

use crate::server::Server;
use crate::server_frame::{ByeReason, ServerFrame};

impl Server {
    /// The frame that tells a connection refused at admission why, as one
    /// frame's payload like every [`crate::Output::Transmit`] (a line
    /// transport writes it, then `\n`; a WebSocket sends it as a text
    /// message). No session is opened: no `hello`, no connection slot, no
    /// output queued, nothing counted.
    ///
    /// ```
    /// use chatproto::{Accounts, ByeReason, Server, ServerConfig, Timestamp};
    ///
    /// let now = Timestamp::from_unix_millis(1_700_000_000_000);
    /// let mut server = Server::new(ServerConfig::default(), Accounts::new(), now)?;
    /// let bye = server.refusal(ByeReason::ServerFull);
    /// assert_eq!(&bye[..], br#"{"type":"bye","reason":"server_full"}"#);
    /// assert!(server.poll_output().is_none(), "nothing else happened");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn refusal(&self, reason: ByeReason) -> Bytes {
        ServerFrame::Bye { reason }.encode()
    }
}
