//! Which web pages may open a WebSocket: origins, the hosts the chat page
//! is reached at, and the rule that matches one against the other.
//!
//! A browser names the page that opens a WebSocket in its `Origin` header;
//! a page on another site must not get a session with a visitor's
//! browser. The page's own origin is not taken from the request's `Host`
//! header: a page on a name its author controls, pointed at this server
//! (DNS rebinding), sends its own name in both, and would pass. It comes
//! from the configuration instead: an `Origin` of the listener's scheme
//! (`https` with TLS, `http` without) is the page's own when its host and
//! port are
//!
//! - the `--http` address, unless that is a wildcard (`0.0.0.0`, `::`),
//!   which says nothing of how browsers reach it;
//! - `localhost`, when that address is a loopback one;
//! - a `--public-host HOST[:PORT]` (the `--http` port unless given).
//!
//! An origin given with `--allow-origin` passes too, with its own scheme.
//! Hosts compare without regard to ASCII case, addresses as addresses,
//! and an origin without a port has its scheme's default (80, 443).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A host as an origin or `--public-host` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An IP address (an IPv4-mapped IPv6 one as IPv4).
    Ip(IpAddr),
    /// A DNS name, in lower case.
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// A `--public-host` value: a host browsers reach the chat page at, and
/// the port, when it is not the `--http` one (behind a port forward).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicHost {
    /// The host name or address.
    pub host: Host,
    /// The port, if not the listener's.
    pub port: Option<u16>,
}

/// An origin: scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `https`, rather than `http`.
    pub secure: bool,
    /// The host name or address.
    pub host: Host,
    /// As written, or the scheme's default.
    pub port: u16,
}

impl Origin {
    /// Reads `scheme://host[:port]`, as browsers send it: `http` or
    /// `https`, no path, no user, not `null`.
    pub fn parse(value: &str) -> Option<Origin> {
        let (scheme, rest) = value.split_once("://")?;
        let secure = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            false
        } else {
            return None;
        };
        let (host, port) = host_and_port(rest)?;
        Some(Origin {
            secure,
            host,
            port: port.unwrap_or(if secure { 443 } else { 80 }),
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, default) = if self.secure {
            ("https", 443)
        } else {
            ("http", 80)
        };
        write!(f, "{scheme}://{}", self.host)?;
        if self.port != default {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// An `--allow-origin` value that is not an origin.
#[derive(Debug, thiserror::Error)]
#[error("--allow-origin {0:?}: expected an origin such as https://chat.example.com or http://localhost:8080 (scheme, host, optional port; no path)")]
pub struct BadOrigin(String);

/// Checks an `--allow-origin` value.
pub fn parse_origin(value: &str) -> Result<Origin, BadOrigin> {
    Origin::parse(value).ok_or_else(|| BadOrigin(value.to_owned()))
}

/// A `--public-host` value that is not a host with an optional port.
#[derive(Debug, thiserror::Error)]
#[error("--public-host {0:?}: expected the host name or IP address browsers reach the chat page at, with an optional port, such as chat.example.com, chat.example.com:8443, 192.0.2.7 or [2001:db8::7]:8080 (no scheme, no path)")]
pub struct BadPublicHost(String);

/// Checks a `--public-host` value.
pub fn parse_public_host(value: &str) -> Result<PublicHost, BadPublicHost> {
    host_and_port(value)
        .map(|(host, port)| PublicHost { host, port })
        .ok_or_else(|| BadPublicHost(value.to_owned()))
}

/// `host[:port]`, with an IPv6 address in brackets.
fn host_and_port(value: &str) -> Option<(Host, Option<u16>)> {
    let (host, port) = match value.strip_prefix('[') {
        Some(rest) => {
            let (ip, after) = rest.split_once(']')?;
            let ip: Ipv6Addr = ip.parse().ok()?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':')?),
            };
            (Host::Ip(IpAddr::V6(ip).to_canonical()), port)
        }
        // A second `:` (an IPv6 address without brackets) fails as a port.
        None => match value.split_once(':') {
            Some((host, port)) => (name_or_ipv4(host)?, Some(port)),
            None => (name_or_ipv4(value)?, None),
        },
    };
    let port = match port {
        Some(port) => Some(port_number(port)?),
        None => None,
    };
    Some((host, port))
}

fn name_or_ipv4(host: &str) -> Option<Host> {
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Some(Host::Ip(IpAddr::V4(ip)));
    }
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    // A name ending in a number is no name to a browser, which reads it as
    // an IPv4 address (`1.2.3`), or refuses it.
    let numeric = |l: &str| l.bytes().all(|b| b.is_ascii_digit());
    let valid = host.len() <= 253
        && host.split('.').all(label)
        && !host.rsplit('.').next().is_some_and(numeric);
    valid.then(|| Host::Name(host.to_ascii_lowercase()))
}

fn port_number(port: &str) -> Option<u16> {
    // Digits only: `u16::from_str` would take a `+`.
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok().filter(|&p| p != 0)
}

/// The origins whose pages may open a WebSocket on one `--http` listener.
#[derive(Debug, Clone)]
pub struct Origins {
    /// The listener's scheme is `https`.
    secure: bool,
    /// Where browsers load the page from: an origin of the listener's
    /// scheme with one of these hosts and ports is the page's own.
    page: Vec<(Host, u16)>,
    /// Origins allowed besides (`--allow-origin`), of either scheme.
    allowed: Vec<Origin>,
}

impl Origins {
    /// The rule for a listener bound to `listen` (its real port, when
    /// `--http` asked for port 0).
    pub fn new(
        secure: bool,
        listen: SocketAddr,
        public_hosts: &[PublicHost],
        allowed: Vec<Origin>,
    ) -> Origins {
        let port = listen.port();
        let ip = listen.ip().to_canonical();
        let mut page = Vec::new();
        if !ip.is_unspecified() {
            page.push((Host::Ip(ip), port));
            if ip.is_loopback() {
                page.push((Host::Name("localhost".to_owned()), port));
            }
        }
        page.extend(
            public_hosts
                .iter()
                .map(|p| (p.host.clone(), p.port.unwrap_or(port))),
        );
        Origins {
            secure,
            page,
            allowed,
        }
    }

    /// Whether a page whose `Origin` header says `origin` may open a
    /// WebSocket. Anything that is not an origin (`null`, a path) may not.
    pub fn allow(&self, origin: &str) -> bool {
        let Some(origin) = Origin::parse(origin) else {
            return false;
        };
        let own = origin.secure == self.secure
            && self
                .page
                .iter()
                .any(|(host, port)| *host == origin.host && *port == origin.port);
        own || self.allowed.contains(&origin)
    }

    /// Whether any origin is known as the page's own: not so on a wildcard
    /// address without `--public-host`, where a browser that loaded the
    /// page from this server is refused its WebSocket.
    pub fn knows_the_pages_own(&self) -> bool {
        !self.page.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(secure: bool, listen: &str, public: &[&str], allowed: &[&str]) -> Origins {
        Origins::new(
            secure,
            listen.parse().unwrap(),
            &public
                .iter()
                .map(|p| parse_public_host(p).unwrap())
                .collect::<Vec<_>>(),
            allowed.iter().map(|o| parse_origin(o).unwrap()).collect(),
        )
    }

    /// The origins of `candidates` that `rule` lets through.
    fn passing<'a>(rule: &Origins, candidates: &[&'a str]) -> Vec<&'a str> {
        candidates
            .iter()
            .copied()
            .filter(|o| rule.allow(o))
            .collect()
    }

    const CANDIDATES: [&str; 12] = [
        "http://127.0.0.1:8080",
        "http://localhost:8080",
        "http://192.0.2.7:8080",
        "http://[::1]:8080",
        "http://chat.example.com",
        "https://chat.example.com",
        "http://chat.lan:8080",
        "https://chat.lan:8080",
        "http://127.0.0.1:8081",
        "http://127.0.0.1",
        "http://evil.example:8080",
        "https://127.0.0.1:8080",
    ];

    #[test]
    fn a_loopback_listener_is_its_address_and_localhost() {
        let rule = origins(false, "127.0.0.1:8080", &[], &[]);
        assert!(rule.knows_the_pages_own());
        assert_eq!(
            passing(&rule, &CANDIDATES),
            ["http://127.0.0.1:8080", "http://localhost:8080"]
        );
        // Case, and an address however it is written, do not matter.
        for same in [
            "HTTP://LocalHost:8080",
            "http://127.0.0.1:08080",
            "http://[::ffff:127.0.0.1]:8080",
        ] {
            assert!(rule.allow(same), "{same}");
        }
        let v6 = origins(false, "[::1]:8080", &[], &[]);
        assert_eq!(
            passing(&v6, &CANDIDATES),
            ["http://localhost:8080", "http://[::1]:8080"]
        );
        assert!(v6.allow("http://[0:0:0:0:0:0:0:1]:8080"));
    }

    #[test]
    fn another_address_is_itself_only() {
        let rule = origins(false, "192.0.2.7:8080", &[], &[]);
        assert_eq!(passing(&rule, &CANDIDATES), ["http://192.0.2.7:8080"]);
    }

    #[test]
    fn a_wildcard_knows_only_its_public_hosts() {
        for wildcard in ["0.0.0.0:8080", "[::]:8080"] {
            let rule = origins(false, wildcard, &[], &[]);
            assert!(!rule.knows_the_pages_own());
            assert!(passing(&rule, &CANDIDATES).is_empty(), "{wildcard}");
            // The port is the listener's unless given: 80 behind a forward.
            let rule = origins(false, wildcard, &["Chat.LAN", "chat.example.com:80"], &[]);
            assert!(rule.knows_the_pages_own());
            assert_eq!(
                passing(&rule, &CANDIDATES),
                ["http://chat.example.com", "http://chat.lan:8080"]
            );
        }
    }

    #[test]
    fn the_scheme_is_the_listeners_and_allowed_origins_keep_their_own() {
        let rule = origins(
            true,
            "127.0.0.1:8080",
            &["chat.lan"],
            &["https://chat.example.com:443", "http://evil.example:8080"],
        );
        assert_eq!(
            passing(&rule, &CANDIDATES),
            [
                "https://chat.example.com",
                "https://chat.lan:8080",
                "http://evil.example:8080",
                "https://127.0.0.1:8080",
            ]
        );
    }

    #[test]
    fn what_is_not_an_origin_passes_nothing() {
        let rule = origins(false, "127.0.0.1:8080", &[], &[]);
        for bad in [
            "null",
            "",
            "127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://127.0.0.1:8080/chat",
            "ws://127.0.0.1:8080",
            "http://user@127.0.0.1:8080",
            "http://127.0.0.1:+8080",
            "http://127.0.0.1:8080:1",
        ] {
            assert!(!rule.allow(bad), "{bad:?}");
        }
    }

    #[test]
    fn flags_are_checked_at_start_up() {
        assert_eq!(
            parse_origin("https://Chat.Example.com")
                .unwrap()
                .to_string(),
            "https://chat.example.com"
        );
        assert_eq!(
            parse_origin("http://[::1]:8080").unwrap().to_string(),
            "http://[::1]:8080"
        );
        for bad in [
            "chat.example.com",
            "ftp://x",
            "https://",
            "https://x/path",
            "*",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_public_host("Chat.Example.COM:8443").unwrap(),
            PublicHost {
                host: Host::Name("chat.example.com".to_owned()),
                port: Some(8443)
            }
        );
        for good in ["localhost", "192.0.2.7", "[2001:db8::7]:8080", "my_box.lan"] {
            assert!(parse_public_host(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "http://chat.example.com",
            "chat.example.com/",
            "2001:db8::7",
            "[2001:db8::7",
            "[2001:db8::7]8080",
            "chat.example.com:",
            "chat.example.com:0",
            "chat.example.com:65536",
            "*",
            "a..b",
            "-a.example",
            "chat.example.com.",
            "1.2.3",
            "a b",
        ] {
            let e = parse_public_host(bad).unwrap_err().to_string();
            assert!(e.starts_with("--public-host "), "{bad:?}: {e}");
        }
    }
}
