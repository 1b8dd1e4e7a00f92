//! Peers: the client addresses connections come from, and the limits kept
//! per address (login attempts, pending password checks), so that one
//! address cannot take what everyone shares.
//!
//! The core never sees an address, only an opaque [`PeerKey`] the driver
//! makes from one: the IPv4 address, or the /64 network of an IPv6 one
//! (what one host usually holds).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use crate::rate_limit::{Rate, TokenBucket};
use crate::time::Timestamp;

/// Where a connection comes from, as far as per-address limits go.
///
/// ```
/// use chatproto::PeerKey;
/// use std::net::IpAddr;
///
/// let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
/// let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
/// // One /64: one peer.
/// assert_eq!(PeerKey::from_ip(a), PeerKey::from_ip(b));
/// let v4: IpAddr = "192.0.2.7".parse().unwrap();
/// let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
/// assert_eq!(PeerKey::from_ip(v4), PeerKey::from_ip(mapped));
/// assert_eq!(PeerKey::from_ip(v4).to_string(), "192.0.2.7");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey([u8; 16]);

impl PeerKey {
    /// A key for a driver whose clients have no address (a test, a pipe):
    /// they all count as one peer.
    pub const UNSPECIFIED: PeerKey = PeerKey([0; 16]);

    /// The key of `ip`: the address itself for IPv4 (also when mapped into
    /// IPv6), its /64 network for IPv6.
    pub fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => PeerKey(v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => PeerKey(v4.to_ipv6_mapped().octets()),
                None => {
                    let mut bytes = v6.octets();
                    bytes[8..].fill(0);
                    PeerKey(bytes)
                }
            },
        }
    }

    /// A key from bytes the driver chose (any stable identity of a client).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        PeerKey(bytes)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl From<IpAddr> for PeerKey {
    fn from(ip: IpAddr) -> Self {
        PeerKey::from_ip(ip)
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v6 = std::net::Ipv6Addr::from(self.0);
        match v6.to_ipv4_mapped() {
            Some(v4) => write!(f, "{v4}"),
            None => write!(f, "{v6}/64"),
        }
    }
}

/// What is kept per peer.
#[derive(Debug)]
pub(crate) struct Peers {
    table: HashMap<PeerKey, Peer>,
    /// Peers with no connection and no pending check, by when their login
    /// bucket is full again: then nothing in them matters.
    idle: BTreeSet<(Timestamp, PeerKey)>,
}

#[derive(Debug, Default)]
struct Peer {
    connections: u32,
    pending_checks: u32,
    logins: Option<TokenBucket>,
    /// Its place in `idle`, if it is there.
    idle_since: Option<Timestamp>,
}

impl Peers {
    pub(crate) fn new() -> Self {
        Peers {
            table: HashMap::new(),
            idle: BTreeSet::new(),
        }
    }

    /// A connection from `peer` opened. Forgets idle peers whose time is up.
    pub(crate) fn connected(&mut self, peer: PeerKey, now: Timestamp) {
        self.forget_idle(now);
        let p = self.table.entry(peer).or_default();
        p.connections += 1;
        if let Some(at) = p.idle_since.take() {
            self.idle.remove(&(at, peer));
        }
    }

    /// A connection from `peer` closed.
    pub(crate) fn disconnected(&mut self, peer: PeerKey, rate: Option<Rate>) {
        if let Some(p) = self.table.get_mut(&peer) {
            p.connections = p.connections.saturating_sub(1);
        }
        self.idle_if_unused(peer, rate);
    }

    /// Takes a login attempt from `peer`'s bucket: whether it may go on.
    pub(crate) fn take_login(&mut self, peer: PeerKey, rate: Rate, now: Timestamp) -> bool {
        self.table
            .entry(peer)
            .or_default()
            .logins
            .get_or_insert_with(|| TokenBucket::full(rate.burst, now))
            .take(rate.burst, rate.per_second, now)
    }

    /// Password checks pending for `peer`.
    pub(crate) fn pending_checks(&self, peer: PeerKey) -> u32 {
        self.table.get(&peer).map_or(0, |p| p.pending_checks)
    }

    /// A check for `peer` was asked for.
    pub(crate) fn check_started(&mut self, peer: PeerKey) {
        self.table.entry(peer).or_default().pending_checks += 1;
    }

    /// A check for `peer` was answered.
    pub(crate) fn check_ended(&mut self, peer: PeerKey, rate: Option<Rate>) {
        if let Some(p) = self.table.get_mut(&peer) {
            p.pending_checks = p.pending_checks.saturating_sub(1);
        }
        self.idle_if_unused(peer, rate);
    }

    /// Peers tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    fn idle_if_unused(&mut self, peer: PeerKey, rate: Option<Rate>) {
        let Some(p) = self.table.get_mut(&peer) else {
            return;
        };
        if p.connections > 0 || p.pending_checks > 0 || p.idle_since.is_some() {
            return;
        }
        let at = match (&p.logins, rate) {
            (Some(bucket), Some(rate)) => bucket.full_at(rate.burst, rate.per_second),
            // Nothing kept: forgotten at the next look.
            _ => Timestamp::ZERO,
        };
        p.idle_since = Some(at);
        self.idle.insert((at, peer));
    }

    fn forget_idle(&mut self, now: Timestamp) {
        while let Some(&(at, peer)) = self.idle.first() {
            if at > now {
                break;
            }
            self.idle.pop_first();
            self.table.remove(&peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    #[test]
    fn a_peer_is_forgotten_only_once_its_login_bucket_is_full() {
        let rate = Rate {
            burst: 2,
            per_second: 1,
        };
        let a = PeerKey::from_bytes([1; 16]);
        let mut peers = Peers::new();
        peers.connected(a, at(0));
        assert!(peers.take_login(a, rate, at(0)));
        assert!(peers.take_login(a, rate, at(0)));
        assert!(!peers.take_login(a, rate, at(0)));
        peers.disconnected(a, Some(rate));
        // Reconnecting does not refill the bucket.
        peers.connected(a, at(1000));
        assert!(peers.take_login(a, rate, at(1000)));
        assert!(!peers.take_login(a, rate, at(1000)));
        peers.disconnected(a, Some(rate));
        assert_eq!(peers.len(), 1);
        peers.connected(PeerKey::from_bytes([2; 16]), at(3000));
        assert_eq!(peers.len(), 1, "the first peer is forgotten");
    }

    #[test]
    fn pending_checks_are_counted_per_peer() {
        let a = PeerKey::from_bytes([1; 16]);
        let mut peers = Peers::new();
        peers.check_started(a);
        peers.check_started(a);
        assert_eq!(peers.pending_checks(a), 2);
        peers.check_ended(a, None);
        assert_eq!(peers.pending_checks(a), 1);
        assert_eq!(peers.pending_checks(PeerKey::from_bytes([2; 16])), 0);
    }
}
