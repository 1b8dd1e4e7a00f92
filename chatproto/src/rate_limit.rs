//! Rate limiting: token buckets, so that one client cannot make the server
//! do unbounded work.
//!
//! Each connection has a bucket for its frames ([`RateLimit`]); logins
//! have buckets of their own, per client address and per user name
//! ([`Rate`]). Every frame or login costs one token; tokens refill
//! continuously up to the burst. A frame that finds the bucket empty is
//! refused with `rate_limited`, not dropped, so the client knows to slow
//! down.

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

/// A token-bucket rate: how much may come at once after a quiet spell, and
/// how much a second, sustained. It bounds logins per client address and
/// per user name, and each connection's bytes.
///
/// ```
/// use chatproto::Rate;
///
/// let per_name = Rate { burst: 5, per_second: 1 };
/// assert_eq!(per_name, Rate::LOGINS_PER_NAME);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// What may come at once.
    pub burst: u32,
    /// What may come a second, sustained.
    pub per_second: u32,
}

impl Rate {
    /// The default for logins per client address: 20 at once, 10 a second.
    pub const LOGINS_PER_PEER: Rate = Rate {
        burst: 20,
        per_second: 10,
    };
    /// The default for logins per user name: 5 at once, 1 a second. This
    /// is what bounds the presence frames one account can cause by logging
    /// in and out: at most 2 a second per online user, sustained.
    pub const LOGINS_PER_NAME: Rate = Rate {
        burst: 5,
        per_second: 1,
    };
    /// The default for the bytes of frames one connection sends: 256 KiB
    /// at once, 64 KiB a second. One sender at this rate makes about 72 KB
    /// a second for each reader of its broadcasts (frames add about 70
    /// bytes each), which a 200 KB/s link keeps up with.
    pub const BYTES_PER_CONNECTION: Rate = Rate {
        burst: 256 * 1024,
        per_second: 64 * 1024,
    };
}

/// One token bucket, for a driver's own limits too (a TLS handshake
/// budget, say). Tokens are counted in thousandths, so that a refill over a
/// few milliseconds is not lost to rounding.
///
/// ```
/// use chatproto::rate_limit::TokenBucket;
/// use chatproto::Timestamp;
///
/// let t = Timestamp::from_unix_millis(0);
/// let mut bucket = TokenBucket::full(2, t);
/// assert!(bucket.take(2, 1, t) && bucket.take(2, 1, t));
/// assert!(!bucket.take(2, 1, t));
/// ```
#[derive(Clone, Debug)]
pub struct TokenBucket {
    millitokens: u64,
    updated: Timestamp,
}

const MILLI: u64 = 1000;

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: u32, now: Timestamp) -> Self {
        TokenBucket {
            millitokens: u64::from(burst) * MILLI,
            updated: now,
        }
    }

    /// Takes a token; false when there is none.
    pub fn take(&mut self, burst: u32, per_second: u32, now: Timestamp) -> bool {
        self.take_n(1, burst, per_second, now)
    }

    /// Takes `n` tokens at once; false (taking none) when there are fewer.
    pub fn take_n(&mut self, n: u32, burst: u32, per_second: u32, now: Timestamp) -> bool {
        let elapsed = now.saturating_since(self.updated);
        self.updated = self.updated.max(now);
        let refill = millis(elapsed).saturating_mul(u64::from(per_second));
        self.millitokens = self
            .millitokens
            .saturating_add(refill)
            .min(u64::from(burst) * MILLI);
        let cost = u64::from(n) * MILLI;
        if self.millitokens < cost {
            return false;
        }
        self.millitokens -= cost;
        true
    }

    /// When the bucket is full again, if nothing more is taken.
    pub fn full_at(&self, burst: u32, per_second: u32) -> Timestamp {
        let missing = (u64::from(burst) * MILLI).saturating_sub(self.millitokens);
        // Millitokens refill at `per_second` per millisecond.
        let ms = missing.div_ceil(u64::from(per_second.max(1)));
        self.updated + Duration::from_millis(ms)
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
        let take = |b: &mut TokenBucket, t| b.take(limit.burst, limit.per_second, t);
        let mut b = TokenBucket::full(limit.burst, t0);
        assert!((0..3).all(|_| take(&mut b, t0)));
        assert!(!take(&mut b, t0));
        assert_eq!(b.full_at(3, 2), t0 + Duration::from_millis(1500));
        // Half a second buys one frame.
        assert!(!take(&mut b, t0 + Duration::from_millis(499)));
        assert!(take(&mut b, t0 + Duration::from_millis(500)));
        assert!(!take(&mut b, t0 + Duration::from_millis(500)));
        // A long quiet spell refills to the burst, no further.
        let later = t0 + Duration::from_secs(3600);
        assert!((0..3).all(|_| take(&mut b, later)));
        assert!(!take(&mut b, later));
    }
}
