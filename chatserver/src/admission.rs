//! Admission: whether a new connection comes in, and what a refused one is
//! told. The policy in one place: the connection limit, the cap per
//! client address, the share of connections not logged in, and the TLS
//! handshake budgets (a handshake costs the event loop CPU, so past its
//! budget a connection is closed without a word).
//!
//! A refusal's `bye` comes from the core ([`chatproto::Server::refusal`]),
//! which opens no session for it; over HTTP it is a 503.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use chatproto::rate_limit::TokenBucket;
use chatproto::{ByeReason, PeerKey, Rate, Timestamp};
use tracing::{debug, info};

use crate::http;
use crate::output_queue::{Head, OutputQueue, LINE_END};
use crate::reactor::Limits;

/// The flags of the per-address connection and login limits. Every client
/// of a test or a load generator on one machine comes from one loopback
/// address, so harnesses turn these off (`0`) unless a test is about one.
pub const ADDRESS_LIMIT_FLAGS: [&str; 5] = [
    "--max-connections-per-ip",
    "--max-unauthenticated-percent",
    "--max-pending-checks-per-ip",
    "--login-rate-per-ip",
    "--login-rate-per-name",
];

/// The flags of the TLS handshake budgets (per address, and overall).
pub const TLS_BUDGET_FLAGS: [&str; 2] = ["--tls-handshakes-per-ip", "--tls-handshakes"];

/// Client addresses whose handshake budget is tracked before the whole
/// ones are forgotten.
const TRACKED_HANDSHAKE_ADDRESSES: usize = 4096;

/// What a connection refused at admission is told, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    reason: ByeReason,
    bye: Bytes,
    http: bool,
}

impl Refusal {
    /// A refusal for `reason`: the core's `bye` frame for it (a payload,
    /// [`chatproto::Server::refusal`]), or over HTTP a 503 that names it.
    pub fn new(reason: ByeReason, bye: Bytes, http: bool) -> Refusal {
        Refusal { reason, bye, http }
    }

    /// Why it is refused.
    pub fn reason(&self) -> ByeReason {
        self.reason
    }

    /// Queues what the connection is told: the `bye` as a line, or the 503.
    pub fn queue(&self, output: &mut OutputQueue) {
        if self.http {
            output.push_raw(http::unavailable(
                self.reason.as_str(),
                std::time::SystemTime::now(),
            ));
        } else {
            output.push_frame(Head::EMPTY, self.bye.clone(), LINE_END);
        }
    }
}

/// What becomes of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It comes in.
    Accept,
    /// Over a limit: tell it why (`reason`) and close. On a TLS listener it
    /// is told after its handshake.
    Refuse(ByeReason),
    /// Close it at once without a word: the TLS handshake budget is spent,
    /// or no descriptor is left for a handshake that would only refuse.
    Close,
}

/// The admission policy and the counts it needs.
#[derive(Debug)]
pub struct Admission {
    max_connections: usize,
    limits: Limits,
    /// Sockets open: sessions, HTTP requests, refused TLS clients being
    /// told, closing ones.
    open: usize,
    /// Open sockets per client address (with `max_connections_per_ip`).
    per_address: HashMap<PeerKey, u32>,
    /// TLS handshake budgets: overall, and per client address.
    handshakes: Option<TokenBucket>,
    handshakes_per_address: HashMap<PeerKey, TokenBucket>,
}

impl Admission {
    /// The policy for at most `max_connections` sockets under `limits`.
    pub fn new(max_connections: usize, limits: Limits) -> Admission {
        Admission {
            max_connections,
            limits,
            open: 0,
            per_address: HashMap::new(),
            handshakes: None,
            handshakes_per_address: HashMap::new(),
        }
    }

    /// Judges a connection from `peer` on a listener with TLS (`tls`) or
    /// without, with `users_online` users logged in, at `now`. A TLS
    /// connection takes a handshake from the budgets whatever the verdict.
    pub fn judge(
        &mut self,
        peer: SocketAddr,
        tls: bool,
        users_online: usize,
        now: Timestamp,
    ) -> Verdict {
        let key = PeerKey::from_ip(peer.ip());
        let refusal = self.limit_reached(key, users_online).map(|(reason, why)| {
            info!(%peer, open = self.open, "refused: {why}");
            reason
        });
        if tls && !self.handshake_budget(key, now) {
            // Handshakes cost the reactor CPU: past the budget, not even a
            // refusal is worth one.
            debug!(%peer, "TLS handshake budget spent: closing at once");
            return Verdict::Close;
        }
        match refusal {
            None => Verdict::Accept,
            // No descriptor to spare for a handshake that only refuses.
            Some(_) if tls && self.open >= self.max_connections => Verdict::Close,
            Some(reason) => Verdict::Refuse(reason),
        }
    }

    /// A socket from `peer` is open (accepted, or refused after a
    /// handshake): counted until [`Admission::closed`].
    pub fn opened(&mut self, peer: SocketAddr) {
        self.open += 1;
        if self.limits.max_connections_per_ip.is_some() {
            *self
                .per_address
                .entry(PeerKey::from_ip(peer.ip()))
                .or_default() += 1;
        }
    }

    /// A socket [`Admission::opened`] from `peer` is gone.
    pub fn closed(&mut self, peer: SocketAddr) {
        self.open = self.open.saturating_sub(1);
        let key = PeerKey::from_ip(peer.ip());
        if let Some(count) = self.per_address.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.per_address.remove(&key);
            }
        }
    }

    /// Sockets open.
    pub fn open(&self) -> usize {
        self.open
    }

    /// The most sockets open at once.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The limit a connection from `peer` would break, and why (for the
    /// log).
    fn limit_reached(
        &self,
        peer: PeerKey,
        users_online: usize,
    ) -> Option<(ByeReason, &'static str)> {
        if self.open >= self.max_connections {
            return Some((ByeReason::ServerFull, "server full"));
        }
        let from_peer = self.per_address.get(&peer).copied().unwrap_or(0);
        if self
            .limits
            .max_connections_per_ip
            .is_some_and(|limit| from_peer >= limit)
        {
            return Some((
                ByeReason::TooManyConnections,
                "too many connections from this address",
            ));
        }
        if let Some(percent) = self.limits.max_unauthenticated_percent {
            // Sockets without a logged-in user: new ones, HTTP requests,
            // closing ones. Logged-in users can always be let in again.
            let unauthenticated = self.open.saturating_sub(users_online);
            let cap = self.max_connections * usize::from(percent) / 100;
            if unauthenticated >= cap.max(1) {
                return Some((
                    ByeReason::ServerFull,
                    "server full of connections not logged in",
                ));
            }
        }
        None
    }

    /// Takes a TLS handshake from the budgets (overall and `peer`'s):
    /// whether one may start now.
    fn handshake_budget(&mut self, peer: PeerKey, now: Timestamp) -> bool {
        if let Some(rate) = self.limits.tls_handshakes_per_ip {
            if self.handshakes_per_address.len() > TRACKED_HANDSHAKE_ADDRESSES {
                // Forget addresses whose budget is whole again.
                self.handshakes_per_address
                    .retain(|_, bucket| bucket.full_at(rate.burst, rate.per_second) > now);
            }
            let bucket = self
                .handshakes_per_address
                .entry(peer)
                .or_insert_with(|| TokenBucket::full(rate.burst, now));
            if !bucket.take(rate.burst, rate.per_second, now) {
                return false;
            }
        }
        match self.limits.tls_handshakes {
            Some(Rate { burst, per_second }) => self
                .handshakes
                .get_or_insert_with(|| TokenBucket::full(burst, now))
                .take(burst, per_second, now),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 5000))
    }

    fn limits() -> Limits {
        Limits {
            max_connections_per_ip: None,
            max_unauthenticated_percent: None,
            tls_handshakes_per_ip: None,
            tls_handshakes: None,
            ..Limits::default()
        }
    }

    const T0: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);

    /// Admits a plaintext connection from each address, each accepted.
    fn admit_all(a: &mut Admission, from: impl IntoIterator<Item = SocketAddr>) {
        for peer in from {
            assert_eq!(a.judge(peer, false, 0, T0), Verdict::Accept);
            a.opened(peer);
        }
    }

    #[test]
    fn the_connection_limit_refuses_with_server_full() {
        let mut a = Admission::new(2, limits());
        admit_all(&mut a, (0..2).map(addr));
        assert_eq!(
            a.judge(addr(9), false, 2, T0),
            Verdict::Refuse(ByeReason::ServerFull)
        );
        // On TLS, no descriptor is spent on a handshake that only refuses.
        assert_eq!(a.judge(addr(9), true, 2, T0), Verdict::Close);
        a.closed(addr(0));
        assert_eq!(a.open(), 1);
        assert_eq!(a.judge(addr(9), false, 1, T0), Verdict::Accept);
    }

    #[test]
    fn each_address_has_its_cap() {
        let mut a = Admission::new(
            100,
            Limits {
                max_connections_per_ip: Some(2),
                ..limits()
            },
        );
        admit_all(&mut a, [addr(1), addr(1)]);
        assert_eq!(
            a.judge(addr(1), false, 0, T0),
            Verdict::Refuse(ByeReason::TooManyConnections)
        );
        // A refused TLS client is told after its handshake.
        assert_eq!(
            a.judge(addr(1), true, 0, T0),
            Verdict::Refuse(ByeReason::TooManyConnections)
        );
        assert_eq!(a.judge(addr(2), false, 0, T0), Verdict::Accept);
        a.closed(addr(1));
        assert_eq!(a.judge(addr(1), false, 0, T0), Verdict::Accept);
    }

    #[test]
    fn connections_not_logged_in_have_a_share() {
        let mut a = Admission::new(
            10,
            Limits {
                max_unauthenticated_percent: Some(50),
                ..limits()
            },
        );
        admit_all(&mut a, (0..5).map(addr));
        assert_eq!(
            a.judge(addr(7), false, 0, T0),
            Verdict::Refuse(ByeReason::ServerFull)
        );
        // Once some of them log in, others may come.
        assert_eq!(a.judge(addr(7), false, 1, T0), Verdict::Accept);
    }

    #[test]
    fn tls_handshakes_are_budgeted_per_address_and_overall() {
        let mut a = Admission::new(
            100,
            Limits {
                tls_handshakes_per_ip: Some(Rate {
                    burst: 2,
                    per_second: 1,
                }),
                tls_handshakes: Some(Rate {
                    burst: 3,
                    per_second: 1,
                }),
                ..limits()
            },
        );
        assert_eq!(a.judge(addr(1), true, 0, T0), Verdict::Accept);
        assert_eq!(a.judge(addr(1), true, 0, T0), Verdict::Accept);
        assert_eq!(
            a.judge(addr(1), true, 0, T0),
            Verdict::Close,
            "its own budget"
        );
        assert_eq!(a.judge(addr(2), true, 0, T0), Verdict::Accept);
        assert_eq!(
            a.judge(addr(3), true, 0, T0),
            Verdict::Close,
            "the overall one"
        );
        // Plaintext connections take no handshake.
        assert_eq!(a.judge(addr(1), false, 0, T0), Verdict::Accept);
        let later = T0 + Duration::from_secs(1);
        assert_eq!(a.judge(addr(1), true, 0, later), Verdict::Accept);
    }

    #[test]
    fn a_refusal_is_the_cores_bye_as_a_line_or_a_503() {
        let bye = Bytes::from_static(br#"{"type":"bye","reason":"server_full"}"#);
        let mut out = OutputQueue::default();
        Refusal::new(ByeReason::ServerFull, bye.clone(), false).queue(&mut out);
        let mut written = Vec::new();
        out.write_to(&mut written).unwrap();
        assert_eq!(written, [&bye[..], b"\n"].concat());
        let mut out = OutputQueue::default();
        Refusal::new(ByeReason::ServerFull, bye, true).queue(&mut out);
        let mut written = Vec::new();
        out.write_to(&mut written).unwrap();
        let written = String::from_utf8(written).unwrap();
        assert!(
            written.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{written}"
        );
        assert!(written.contains("\r\nDate: "), "{written}");
        assert!(written.contains("\r\nConnection: close\r\n"), "{written}");
        assert!(
            written.ends_with("503 Service Unavailable: server_full\n"),
            "{written}"
        );
    }
}
