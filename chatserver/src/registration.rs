//! Sockets registered with the poller, deregistered when dropped.
//!
//! `polling` requires a source to be deleted from the poller before it is
//! closed (hence its `unsafe fn add`). Owning the socket together with its
//! registration makes that impossible to forget: this is the one place the
//! server uses `unsafe`.

use std::io;
use std::sync::Arc;

use polling::{AsRawSource, AsSource, Event, PollMode, Poller};

#[derive(Debug)]
pub struct Registered<T: AsSource> {
    poller: Arc<Poller>,
    source: T,
    mode: PollMode,
}

impl<T: AsSource> Registered<T>
where
    for<'a> &'a T: AsRawSource,
{
    /// Registers `source` under the key in `interest`. In
    /// `PollMode::Oneshot` every event disarms it until [`Registered::rearm`];
    /// in `PollMode::Level` it stays armed.
    pub fn new(
        poller: Arc<Poller>,
        source: T,
        interest: Event,
        mode: PollMode,
    ) -> io::Result<Self> {
        // SAFETY: `source` moves into the returned value, whose `Drop`
        // deletes it from the poller before the source itself is dropped
        // (fields drop after `drop` runs), so the poller never holds a
        // closed descriptor.
        #[allow(unsafe_code)]
        unsafe {
            poller.add_with_mode(&source, interest, mode)?;
        }
        Ok(Registered {
            poller,
            source,
            mode,
        })
    }
}

impl<T: AsSource> Registered<T> {
    /// Sets the interest (and, in oneshot mode, re-arms).
    pub fn rearm(&self, interest: Event) -> io::Result<()> {
        self.poller
            .modify_with_mode(&self.source, interest, self.mode)
    }

    pub fn get(&self) -> &T {
        &self.source
    }
}

impl<T: AsSource> Drop for Registered<T> {
    fn drop(&mut self) {
        // Nothing to do about a failure here: the descriptor closes next,
        // which removes it from the kernel's interest list anyway.
        let _ = self.poller.delete(&self.source);
    }
}
