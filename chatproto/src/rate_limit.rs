//! Rate limiting: a token bucket per connection, so that one client cannot
//! make the server do unbounded work.
//!
//! Every frame costs one token; tokens refill continuously up to the burst.
//! A frame that finds the bucket empty is refused with `rate_limited`, not
//! dropped, so the client knows to slow down.

use std::time::Duration;

use crate::time::Timestamp;

/// How many frames a connection may send.
///
/// ```
/// use chatproto::RateLimit;
///
/// let limit = RateLimit { burst: 10, per_second: 5, flood_after: 50 };
/// assert_eq!(limit.burst, 10);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Frames that may arrive at once after a quiet spell.
    pub burst: u32,
    /// Frames per second sustained.
    pub per_second: u32,
    /// Frames refused in a row after which the connection is closed with
    /// `bye` reason `flood`; 0: never.
    pub flood_after: u32,
}

impl Default for RateLimit {
    /// 200 frames at once, 100 a second: far beyond any typist, and beyond
    /// any reasonable script. A client that ignores 100 refusals in a row is
    /// not going to slow down: it is cut off.
    fn default() -> Self {
        RateLimit {
            burst: 200,
            per_second: 100,
            flood_after: 100,
        }
    }
}

/// One connection's bucket. Tokens are counted in thousandths, so that a
/// refill over a few milliseconds is not lost to rounding.
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    millitokens: u64,
    updated: Timestamp,
}

const MILLI: u64 = 1000;

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(limit: RateLimit, now: Timestamp) -> Self {
        TokenBucket {
            millitokens: u64::from(limit.burst) * MILLI,
            updated: now,
        }
    }

    /// Takes a token for one frame; false when there is none.
    pub(crate) fn take(&mut self, limit: RateLimit, now: Timestamp) -> bool {
        let elapsed = now.saturating_since(self.updated);
        self.updated = self.updated.max(now);
        let refill = millis(elapsed).saturating_mul(u64::from(limit.per_second));
        self.millitokens = self
            .millitokens
            .saturating_add(refill)
            .min(u64::from(limit.burst) * MILLI);
        if self.millitokens < MILLI {
            return false;
        }
        self.millitokens -= MILLI;
        true
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_refills_at_the_rate() {
        let limit = RateLimit {
            burst: 3,
            per_second: 2,
            flood_after: 0,
        };
        let t0 = Timestamp::from_unix_millis(10_000);
        let mut b = TokenBucket::new(limit, t0);
        assert!((0..3).all(|_| b.take(limit, t0)));
        assert!(!b.take(limit, t0));
        // Half a second buys one frame.
        assert!(!b.take(limit, t0 + Duration::from_millis(499)));
        assert!(b.take(limit, t0 + Duration::from_millis(500)));
        assert!(!b.take(limit, t0 + Duration::from_millis(500)));
        // A long quiet spell refills to the burst, no further.
        let later = t0 + Duration::from_secs(3600);
        assert!((0..3).all(|_| b.take(limit, later)));
        assert!(!b.take(limit, later));
    }
}
