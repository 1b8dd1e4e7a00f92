//! The server's clock: monotonic time, expressed as the core's
//! [`Timestamp`].
//!
//! It reads the wall clock once, at start, and counts from there with
//! `Instant`, so a wall-clock jump (NTP step, manual change) cannot fire or
//! postpone every idle timeout at once. `sent_at` values stay close to wall
//! time for any realistic uptime.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chatproto::Timestamp;

/// Monotonic time as the core's timestamps.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    started: Instant,
    started_unix_ms: u64,
}

impl Clock {
    /// A clock that starts now, at the wall-clock time.
    pub fn start() -> Clock {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Clock {
            started: Instant::now(),
            started_unix_ms: u64::try_from(unix.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The time now.
    pub fn now(&self) -> Timestamp {
        self.at(Instant::now())
    }

    /// The time at `instant`.
    pub fn at(&self, instant: Instant) -> Timestamp {
        let since = instant.saturating_duration_since(self.started);
        Timestamp::from_unix_millis(self.started_unix_ms) + since
    }

    /// The instant a core deadline falls on.
    pub fn instant(&self, t: Timestamp) -> Instant {
        let offset = t.saturating_since(Timestamp::from_unix_millis(self.started_unix_ms));
        self.started
            .checked_add(offset)
            .unwrap_or(self.started + Duration::from_secs(86_400 * 365))
    }
}
