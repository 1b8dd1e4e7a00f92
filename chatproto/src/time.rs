//! Time as a value: the core never reads a clock.
//!
//! Every `handle_*` call takes the current [`Timestamp`] from the caller, and
//! every deadline the core holds comes back out as a `Timestamp` through
//! `poll_timeout`. A test can therefore drive hours of protocol time in
//! microseconds, and replay any run exactly.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time: milliseconds since the Unix epoch.
///
/// The same unit goes on the wire (`sent_at`), so a timestamp can be shown
/// to people. Drivers should derive it from a monotonic clock anchored at the
/// wall-clock time they started, so that a wall-clock jump cannot fire or
/// postpone every idle timeout at once.
///
/// ```
/// use chatproto::Timestamp;
/// use std::time::Duration;
///
/// let t = Timestamp::from_unix_millis(1_000);
/// assert_eq!((t + Duration::from_secs(2)).as_unix_millis(), 3_000);
/// assert_eq!((t + Duration::from_secs(2)) - t, Duration::from_secs(2));
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch itself.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp `millis` milliseconds after the Unix epoch.
    pub const fn from_unix_millis(millis: u64) -> Self {
        Timestamp(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_unix_millis(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this is; zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// `self - d`, or the epoch when that would be before it.
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_millis(d)))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    /// Saturates at the far future rather than overflowing: a huge configured
    /// timeout means "never", not a panic.
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_millis(d)))
    }
}

impl Sub for Timestamp {
    type Output = Duration;

    /// Saturates at zero, like [`Timestamp::saturating_since`].
    fn sub(self, earlier: Timestamp) -> Duration {
        self.saturating_since(earlier)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Whole milliseconds in `d`, saturating.
fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whole seconds until `deadline`, rounded up and at least one, as told to
/// a client in `retry_after`: "retry in 0 s" would invite an attempt that
/// still fails.
pub(crate) fn seconds_until(deadline: Timestamp, now: Timestamp) -> u64 {
    let millis = deadline.0.saturating_sub(now.0);
    millis.div_ceil(1000).max(1)
}
