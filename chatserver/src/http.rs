//! The HTTP side of `--http`: requests answered with the embedded chat
//! page, a health check, or upgraded to a WebSocket, and nothing else.
//! A connection serves several requests in turn (HTTP/1.1 keep-alive, so
//! the page's files share one) until the client says `Connection: close`,
//! an error is answered, or the link's limits end it.
//!
//! Requests are parsed with `httparse` from a bounded buffer: at most
//! [`MAX_REQUEST_BYTES`] and [`MAX_HEADERS`] headers, or the answer is a
//! 431. Only `GET` (and `HEAD`) of the page's files, of `/healthz` and
//! `/readyz` ([`crate::health`]) and of `/ws` are served; anything else
//! gets the matching 4xx. The `--metrics` listener, kept apart so that it
//! is never exposed with the page, serves `/metrics` ([`crate::metrics`]),
//! `/healthz` and `/readyz` only. A WebSocket upgrade from a browser
//! must come from an origin the [`Origins`] rule allows: the page's own, as
//! configured (not as the request's `Host` says), or one allowed with
//! `--allow-origin`.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::health::{Health, Readiness};
use crate::metrics::{Metrics, CONTENT_TYPE as METRICS_CONTENT_TYPE, METRICS_PATH};
use crate::origin::Origins;

/// The largest request head accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// The most header lines a request may have.
pub const MAX_HEADERS: usize = 32;
/// Where the WebSocket is served.
pub const WEBSOCKET_PATH: &str = "/ws";
/// The liveness check: 200 while the process answers.
pub const HEALTHZ_PATH: &str = "/healthz";
/// The readiness check: 200 while the server can serve clients, else 503.
pub const READYZ_PATH: &str = "/readyz";

/// What the HTTP listener needs to know.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Whose pages may open a WebSocket.
    pub origins: Origins,
    /// What `/readyz` reports.
    pub health: Health,
    /// Whether the listener speaks TLS: responses then carry
    /// `Strict-Transport-Security`, so browsers keep to HTTPS.
    pub tls: bool,
    /// `Some` on the `--metrics` listener, which serves `/metrics`,
    /// `/healthz` and `/readyz` only (no page, no WebSocket).
    pub metrics: Option<Arc<Metrics>>,
}

/// How long browsers keep to HTTPS once told (`max-age`, a year).
const HSTS_MAX_AGE_SECS: u32 = 31_536_000;

/// What to do with the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    /// The request head is not complete yet.
    Partial,
    /// Send this response; then, if `keep_alive`, read the next request
    /// from byte `consumed` on, else close.
    Respond {
        /// The response.
        response: Bytes,
        /// Whether the connection serves another request.
        keep_alive: bool,
        /// The request's length.
        consumed: usize,
    },
    /// Send this `101` response and speak WebSocket from here; the request
    /// took the first `consumed` bytes (a client may send frames at once).
    Upgrade {
        /// The `101 Switching Protocols`.
        response: Bytes,
        /// The request's length.
        consumed: usize,
    },
}

/// Routes the request at the start of `buf`, answered at `now` (its
/// `Date`); the connection is kept for another request only if
/// `may_keep` (the link's own limit) and the request lets it.
pub fn route(buf: &[u8], config: &HttpConfig, now: SystemTime, may_keep: bool) -> Routed {
    let common = Common::new(config, now);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let consumed = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_BYTES => return Routed::Partial,
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return common.close(error(431, "request head too large", false));
        }
        Err(e) => return common.close(error(400, &format!("malformed request: {e}"), false)),
    };
    if consumed > MAX_REQUEST_BYTES {
        return common.close(error(431, "request head too large", false));
    }
    let answered = route_request(&request, config);
    // HTTP/1.1 keeps the connection unless the client says otherwise;
    // HTTP/1.0 closes it. An error closes it too, so that a client that
    // framed the request otherwise than we did cannot go on.
    let keep_alive = may_keep
        && request.version == Some(1)
        && !values(request.headers, "connection")
            .flat_map(|v| v.split(|&b| b == b','))
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
    match answered {
        Answer::Upgrade(response) => Routed::Upgrade {
            response: common.finish(response, None),
            consumed,
        },
        Answer::Done(response) => Routed::Respond {
            response: common.finish(response, Some(keep_alive)),
            keep_alive,
            consumed,
        },
        Answer::Refused(response) => common.close(response),
    }
}

/// A request's answer, before the headers every response carries.
enum Answer {
    /// Served: the connection may serve another request.
    Done(Response),
    /// Refused: the connection closes after it.
    Refused(Response),
    /// Upgraded to a WebSocket.
    Upgrade(Response),
}

/// A response in the making: its status line and headers, the headers of
/// the connection (`Date`, HSTS, `Connection`) still to come, then its
/// body.
struct Response {
    head: String,
    body: String,
}

/// The headers every response of one listener carries, at one time.
struct Common {
    headers: String,
}

impl Common {
    fn new(config: &HttpConfig, now: SystemTime) -> Common {
        let mut headers = format!("Date: {}\r\n", http_date(now));
        if config.tls {
            headers.push_str(&format!(
                "Strict-Transport-Security: max-age={HSTS_MAX_AGE_SECS}\r\n"
            ));
        }
        Common { headers }
    }

    /// `response` with the common headers, and `Connection: close` unless
    /// the connection is kept (`Some(true)`) or upgraded (`None`).
    fn finish(&self, response: Response, keep_alive: Option<bool>) -> Bytes {
        let connection = match keep_alive {
            Some(false) => "Connection: close\r\n",
            _ => "",
        };
        Bytes::from(format!(
            "{}{}{connection}\r\n{}",
            response.head, self.headers, response.body
        ))
    }

    /// `response`, then the close.
    fn close(&self, response: Response) -> Routed {
        Routed::Respond {
            response: self.finish(response, Some(false)),
            keep_alive: false,
            consumed: 0,
        }
    }
}

/// What `request` is answered.
fn route_request(request: &httparse::Request<'_, '_>, config: &HttpConfig) -> Answer {
    let method = request.method.unwrap_or_default();
    let path = request.path.unwrap_or_default();
    // The query string does not choose what is served.
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Answer::Refused(not_allowed()),
    };
    let headers = &*request.headers;
    // Copies that disagree mean that something on the way (a proxy) may
    // have framed the request otherwise than we do: refused, whatever the
    // values.
    let mut lengths = values(headers, "content-length").map(<[u8]>::trim_ascii);
    if let Some(first) = lengths.next() {
        if lengths.any(|length| length != first) {
            return Answer::Refused(error(400, "conflicting Content-Length headers", head));
        }
        if first != b"0" {
            return Answer::Refused(error(400, "a GET request has no body", head));
        }
    }
    if values(headers, "transfer-encoding").next().is_some() {
        return Answer::Refused(error(400, "a GET request has no body", head));
    }
    if let Some(metrics) = config.metrics.as_ref().filter(|_| path == METRICS_PATH) {
        let text = metrics.render();
        return Answer::Done(Response {
            head: format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {METRICS_CONTENT_TYPE}\r\n\
                 Content-Length: {}\r\nCache-Control: no-store\r\n",
                text.len()
            ),
            body: if head {
                String::new()
            } else {
                text.to_string()
            },
        });
    }
    let is_health = path == HEALTHZ_PATH || path == READYZ_PATH;
    if config.metrics.is_some() && !is_health {
        return Answer::Done(error(
            404,
            "the metrics listener serves /metrics, /healthz and /readyz",
            head,
        ));
    }
    if path == WEBSOCKET_PATH {
        return upgrade(headers, config, head);
    }
    if path == HEALTHZ_PATH {
        return Answer::Done(healthy("ok", head));
    }
    if path == READYZ_PATH {
        return Answer::Done(match config.health.readiness() {
            Readiness::Ready => healthy("ready", head),
            Readiness::NotReady(why) => respond(
                503,
                "Cache-Control: no-store\r\n",
                &format!("not ready: {why}"),
                head,
            ),
        });
    }
    match asset(path) {
        Some((content_type, body)) => Answer::Done(page(content_type, body, head)),
        None => Answer::Done(error(404, "not found", head)),
    }
}

/// The embedded page's files: path, content type, contents. The icon is
/// also at `/favicon.ico`, where browsers and tools look for one unasked.
const ASSETS: [(&str, &str, &str); 5] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../web/index.html"),
    ),
    (
        "/chat.css",
        "text/css; charset=utf-8",
        include_str!("../web/chat.css"),
    ),
    (
        "/chat.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/chat.js"),
    ),
    (
        "/favicon.svg",
        "image/svg+xml",
        include_str!("../web/favicon.svg"),
    ),
    (
        "/favicon.ico",
        "image/svg+xml",
        include_str!("../web/favicon.svg"),
    ),
];

/// The page allows only its own scripts, styles and connections, so text
/// that slipped into the page as markup could still not run.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    let path = if path == "/index.html" { "/" } else { path };
    ASSETS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, content_type, body)| (*content_type, *body))
}

/// Every value of header `name`, as sent (text or not), in order.
fn values<'h, 'a>(
    headers: &'h [httparse::Header<'a>],
    name: &'h str,
) -> impl Iterator<Item = &'a [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The value of the first header `name`, if present and text.
fn header<'a>(headers: &[httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

fn upgrade(headers: &[httparse::Header<'_>], config: &HttpConfig, head: bool) -> Answer {
    let header = |name: &str| header(headers, name);
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if head
        || !has_token("upgrade", "websocket")
        || !has_token("connection", "upgrade")
        || header("sec-websocket-version") != Some("13")
    {
        return Answer::Refused(upgrade_required(head));
    }
    // RFC 6455 4.2.1: the key is 16 random bytes in base64 (24 characters).
    let Some(key) = header("sec-websocket-key").filter(|k| k.len() == 24 && k.ends_with("=="))
    else {
        return Answer::Refused(error(400, "Sec-WebSocket-Key missing or malformed", false));
    };
    let mut origins = values(headers, "origin");
    if let (Some(_), Some(_)) = (origins.next(), origins.next()) {
        // Which one a check would read is a guess; a browser sends one.
        return Answer::Refused(error(403, "more than one Origin header", false));
    }
    if let Some(origin) = values(headers, "origin").next() {
        // Browsers always send Origin; other clients (which a page on
        // another site cannot make) may leave it out. The Host header is
        // no guide to which origin is the page's own: see crate::origin.
        let origin = String::from_utf8_lossy(origin);
        let origin = origin.trim();
        if !config.origins.allow(origin) {
            return Answer::Refused(error(
                403,
                &format!("origin {origin} may not open a chat session here"),
                false,
            ));
        }
    }
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    Answer::Upgrade(Response {
        head: format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
        ),
        body: String::new(),
    })
}

fn page(content_type: &str, body: &str, head: bool) -> Response {
    Response {
        head: format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Cache-Control: no-cache\r\nContent-Security-Policy: {CONTENT_SECURITY_POLICY}\r\n\
             X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n",
            body.len()
        ),
        body: if head { String::new() } else { body.to_owned() },
    }
}

/// A health check passed: 200 and `text` as a plain-text line, never
/// cached (a load balancer must see the state of now).
fn healthy(text: &str, head: bool) -> Response {
    Response {
        head: format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nCache-Control: no-store\r\n",
            text.len() + 1
        ),
        body: if head {
            String::new()
        } else {
            format!("{text}\n")
        },
    }
}

/// A status line, and the reason as a plain-text body (headers only, for
/// a HEAD request).
fn error(status: u16, reason: &str, head: bool) -> Response {
    respond(status, "", reason, head)
}

fn not_allowed() -> Response {
    respond(
        405,
        "Allow: GET, HEAD\r\n",
        "only GET is served here",
        false,
    )
}

fn upgrade_required(head: bool) -> Response {
    respond(
        426,
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        "/ws speaks WebSocket (version 13) only",
        head,
    )
}

fn respond(status: u16, extra_headers: &str, reason: &str, head: bool) -> Response {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = format!("{status} {text}: {reason}\n");
    Response {
        head: format!(
            "HTTP/1.1 {status} {text}\r\n{extra_headers}Content-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\n",
            body.len()
        ),
        body: if head { String::new() } else { body },
    }
}

/// `now` as an IMF-fixdate, clamped to the years httpdate writes (a clock
/// set before 1970 must not stop the server).
fn http_date(now: SystemTime) -> String {
    // 9999-12-31T23:59:59Z, the last second httpdate formats.
    let last = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
    httpdate::fmt_http_date(now.clamp(SystemTime::UNIX_EPOCH, last))
}

/// The answer to a connection over a limit, before any request is read,
/// at `now`; the connection closes after it.
pub fn unavailable(reason: &str, now: SystemTime) -> Bytes {
    let response = respond(503, "", reason, false);
    Bytes::from(format!(
        "{}Date: {}\r\nConnection: close\r\n\r\n{}",
        response.head,
        http_date(now),
        response.body
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed time, for the `Date` header.
    fn noon() -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
    }

    /// The request in `buf` routed at noon, on a connection that may be
    /// kept.
    fn at_noon(buf: &[u8], config: &HttpConfig) -> Routed {
        route(buf, config, noon(), true)
    }

    /// A listener on 127.0.0.1:8080, plaintext unless `secure`.
    fn config_with(secure: bool) -> HttpConfig {
        let allowed = vec![crate::origin::parse_origin("https://chat.example.com").unwrap()];
        HttpConfig {
            health: Health::default(),
            origins: Origins::new(secure, "127.0.0.1:8080".parse().unwrap(), &[], allowed),
            tls: secure,
            metrics: None,
        }
    }

    fn config() -> HttpConfig {
        config_with(false)
    }

    fn status(routed: &Routed) -> u16 {
        match routed {
            Routed::Respond { response: r, .. } => {
                std::str::from_utf8(&r[9..12]).unwrap().parse().unwrap()
            }
            Routed::Upgrade { .. } => 101,
            Routed::Partial => 0,
        }
    }

    fn ws_request(extra: &str) -> String {
        ws_request_to("127.0.0.1:8080", extra)
    }

    /// An upgrade request whose Host header says `host`.
    fn ws_request_to(host: &str, extra: &str) -> String {
        format!(
            "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    }

    #[test]
    fn health_checks_say_alive_and_ready_and_why_not() {
        let config = config();
        let get = |path: &str| {
            at_noon(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                &config,
            )
        };
        let text = |routed: &Routed| match routed {
            Routed::Respond { response: r, .. } => String::from_utf8(r.to_vec()).unwrap(),
            other => panic!("{other:?}"),
        };
        for path in ["/healthz", "/readyz", "/readyz?probe=lb"] {
            let answer = get(path);
            assert_eq!(status(&answer), 200, "{path}");
            assert!(text(&answer).contains("Cache-Control: no-store"), "{path}");
        }
        assert!(text(&get("/healthz")).ends_with("\r\n\r\nok\n"));
        assert!(text(&get("/readyz")).ends_with("\r\n\r\nready\n"));

        config.health.set_database_reachable(false);
        let answer = get("/readyz");
        assert_eq!(status(&answer), 503);
        assert!(text(&answer).contains("Cache-Control: no-store"));
        assert!(text(&answer).ends_with("not ready: the database cannot be reached\n"));
        // Alive all the same.
        assert_eq!(status(&get("/healthz")), 200);
        config.health.set_database_reachable(true);
        assert_eq!(status(&get("/readyz")), 200);

        config.health.set_stopping();
        assert!(text(&get("/readyz")).ends_with("not ready: the server is shutting down\n"));

        let head = at_noon(b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n", &config);
        assert_eq!(status(&head), 503);
        assert!(
            text(&head).ends_with("\r\n\r\n"),
            "a HEAD answer has no body"
        );
        let post = at_noon(
            b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            &config,
        );
        assert_eq!(status(&post), 405);
    }

    #[test]
    fn the_page_and_its_files_are_served_with_a_strict_policy() {
        for path in ["/", "/index.html", "/chat.css", "/chat.js", "/?x=1"] {
            let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
            let Routed::Respond { response: r, .. } = at_noon(request.as_bytes(), &config()) else {
                panic!("{path}");
            };
            let text = std::str::from_utf8(&r).unwrap();
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {text}");
            assert!(text.contains("Content-Security-Policy: default-src 'none'"));
            assert!(text.contains("X-Content-Type-Options: nosniff"));
        }
        let Routed::Respond { response: head, .. } =
            at_noon(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", &config())
        else {
            panic!()
        };
        assert!(head.ends_with(b"\r\n\r\n"), "HEAD has no body");
        for request in [
            &b"HEAD /nope HTTP/1.1\r\n\r\n"[..],
            b"HEAD /ws HTTP/1.1\r\n\r\n",
        ] {
            let Routed::Respond { response: r, .. } = at_noon(request, &config()) else {
                panic!()
            };
            assert!(
                r.ends_with(b"\r\n\r\n"),
                "an error to HEAD has no body either"
            );
        }
    }

    #[test]
    fn an_incomplete_request_waits_and_an_oversized_one_is_refused() {
        assert_eq!(
            at_noon(b"GET / HTTP/1.1\r\nHost:", &config()),
            Routed::Partial
        );
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(status(&at_noon(long.as_bytes(), &config())), 431);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let request = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(status(&at_noon(request.as_bytes(), &config())), 431);
    }

    #[test]
    fn everything_else_gets_a_clear_4xx() {
        let cases: [(&[u8], u16); 6] = [
            (b"POST / HTTP/1.1\r\nHost: a\r\n\r\n", 405),
            (b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n", 404),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                400,
            ),
            (b"\x00\x01garbage\r\n\r\n", 400),
            (b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n", 426),
            (b"HEAD /ws HTTP/1.1\r\nHost: a\r\n\r\n", 426),
        ];
        for (request, expected) in cases {
            assert_eq!(
                status(&at_noon(request, &config())),
                expected,
                "{}",
                String::from_utf8_lossy(request)
            );
        }
        // Copies of a header that frames the request must agree.
        for (lengths, expected) in [
            ("0", 200),
            ("0\r\nContent-Length: 0", 200),
            ("0\r\nContent-Length: 5", 400),
        ] {
            let request = format!("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: {lengths}\r\n\r\n");
            assert_eq!(
                status(&at_noon(request.as_bytes(), &config())),
                expected,
                "{request}"
            );
            let upgrade = ws_request(&format!("Content-Length: {lengths}\r\n"));
            let expected = if expected == 200 { 101 } else { expected };
            assert_eq!(
                status(&at_noon(upgrade.as_bytes(), &config())),
                expected,
                "{upgrade}"
            );
        }
        let conflicting = at_noon(
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
            &config(),
        );
        let Routed::Respond { response: r, .. } = conflicting else {
            panic!()
        };
        assert!(std::str::from_utf8(&r)
            .unwrap()
            .contains("conflicting Content-Length"));
        let not_text = at_noon(
            b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \xff\r\n\r\n",
            &config(),
        );
        assert_eq!(status(&not_text), 400);
        let no_key = ws_request("").replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
        assert_eq!(status(&at_noon(no_key.as_bytes(), &config())), 400);
        let old = ws_request("").replace("Version: 13", "Version: 8");
        assert_eq!(status(&at_noon(old.as_bytes(), &config())), 426);
    }

    #[test]
    fn an_upgrade_answers_with_the_rfc_6455_accept_key() {
        let request = ws_request("") + "first frame bytes";
        let Routed::Upgrade { response, consumed } = at_noon(request.as_bytes(), &config()) else {
            panic!()
        };
        // The example of RFC 6455, section 1.3.
        assert!(std::str::from_utf8(&response)
            .unwrap()
            .contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert_eq!(&request.as_bytes()[consumed..], b"first frame bytes");
    }

    #[test]
    fn only_the_pages_own_origin_and_allowed_ones_may_upgrade() {
        let upgrade = |origin: &str, config: &HttpConfig| {
            status(&at_noon(
                ws_request(&format!("Origin: {origin}\r\n")).as_bytes(),
                config,
            ))
        };
        assert_eq!(upgrade("http://127.0.0.1:8080", &config()), 101);
        assert_eq!(upgrade("HTTP://127.0.0.1:8080", &config()), 101);
        assert_eq!(upgrade("https://chat.example.com", &config()), 101);
        assert_eq!(upgrade("http://evil.example", &config()), 403);
        assert_eq!(upgrade("http://127.0.0.1:8081", &config()), 403);
        assert_eq!(upgrade("http://localhost:8080", &config()), 101);
        assert_eq!(upgrade("null", &config()), 403);
        let secure = config_with(true);
        assert_eq!(upgrade("http://127.0.0.1:8080", &secure), 403);
        assert_eq!(upgrade("https://127.0.0.1:8080", &secure), 101);
        // No Origin: not a browser, which is what the check guards.
        assert_eq!(status(&at_noon(ws_request("").as_bytes(), &config())), 101);
        // Two: which one a check reads is not for the client to choose,
        // even when one of them would pass.
        for second in ["http://evil.example", "http://127.0.0.1:8080"] {
            let request = ws_request(&format!(
                "Origin: http://127.0.0.1:8080\r\nOrigin: {second}\r\n"
            ));
            assert_eq!(
                status(&at_noon(request.as_bytes(), &config())),
                403,
                "{second}"
            );
        }
    }

    #[test]
    fn the_host_header_does_not_say_which_origin_is_the_pages_own() {
        let upgrade = |host: &str, origin: &str| {
            status(&at_noon(
                ws_request_to(host, &format!("Origin: {origin}\r\n")).as_bytes(),
                &config(),
            ))
        };
        // A page on a name its author controls, pointed at this server
        // (DNS rebinding): its origin and the Host header agree.
        assert_eq!(
            upgrade("rebound.example:8080", "http://rebound.example:8080"),
            403
        );
        // The page's own origin passes whatever the Host header says.
        assert_eq!(
            upgrade("rebound.example:8080", "http://127.0.0.1:8080"),
            101
        );
    }

    fn text(routed: Routed) -> String {
        match routed {
            Routed::Respond { response, .. } | Routed::Upgrade { response, .. } => {
                String::from_utf8(response.to_vec()).unwrap()
            }
            Routed::Partial => panic!("partial"),
        }
    }

    #[test]
    fn every_response_is_dated_and_over_tls_keeps_browsers_to_https() {
        let requests: [&[u8]; 4] = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
            b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /healthz HTTP/1.0\r\n\r\n",
        ];
        for request in requests {
            let plain = text(at_noon(request, &config_with(false)));
            // RFC 9110 6.6.1: IMF-fixdate, in GMT.
            assert!(
                plain.contains("\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n"),
                "{plain}"
            );
            assert!(!plain.contains("Strict-Transport-Security"), "{plain}");
            let secure = text(at_noon(request, &config_with(true)));
            assert!(
                secure.contains("\r\nStrict-Transport-Security: max-age=31536000\r\n"),
                "{secure}"
            );
        }
        let upgrade = text(at_noon(ws_request("").as_bytes(), &config()));
        assert!(upgrade.starts_with("HTTP/1.1 101 "), "{upgrade}");
        assert!(upgrade.contains("\r\nDate: "), "{upgrade}");
        assert!(upgrade.ends_with("\r\n\r\n"), "{upgrade}");
    }

    #[test]
    fn the_page_has_an_icon_where_browsers_look() {
        for path in ["/favicon.svg", "/favicon.ico"] {
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            let icon = text(at_noon(request.as_bytes(), &config()));
            assert!(icon.starts_with("HTTP/1.1 200 OK\r\n"), "{icon}");
            assert!(icon.contains("Content-Type: image/svg+xml\r\n"), "{icon}");
            assert!(icon.ends_with("</svg>\n"), "{icon}");
        }
        let page = text(at_noon(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &config()));
        assert!(page.contains(r#"<link rel="icon" href="favicon.svg""#));
    }

    #[test]
    fn the_connection_is_kept_unless_the_request_or_the_link_says_not() {
        let kept =
            |request: &[u8], may_keep: bool| match route(request, &config(), noon(), may_keep) {
                Routed::Respond { keep_alive, .. } => keep_alive,
                other => panic!("{other:?}"),
            };
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(kept(get, true));
        assert!(!kept(get, false), "the link's last request");
        assert!(!kept(
            b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n",
            true
        ));
        assert!(!kept(b"GET / HTTP/1.0\r\n\r\n", true));
        assert!(
            !kept(b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n", true),
            "an error"
        );
        // The length of what was read: the next request starts after it.
        let two = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /chat.js HTTP/1.1\r\n\r\n";
        match at_noon(two, &config()) {
            Routed::Respond { consumed, .. } => assert_eq!(consumed, 27),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_clock_out_of_range_still_gives_a_date() {
        let before = SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(5);
        assert_eq!(http_date(before), "Thu, 01 Jan 1970 00:00:00 GMT");
        let far = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(400_000_000_000);
        assert_eq!(http_date(far), "Fri, 31 Dec 9999 23:59:59 GMT");
    }
}
