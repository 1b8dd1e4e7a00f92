//! The log: one line per event on stderr, at the levels `RUST_LOG` asks
//! for (`info` by default), except that no dependency may log what clients
//! send.
//!
//! Libraries that use the `log` crate reach this log too: tracing-
//! subscriber's `tracing-log` bridge (a default feature) forwards their
//! records as events with the library's module path as target. tungstenite
//! is one: at `trace` it logs every WebSocket message and frame it reads,
//! verbatim and as a hex dump, so passwords and message texts would reach
//! the log. Its targets are switched off by a filter of their own, which
//! an event must pass as well as `RUST_LOG`'s, so no directive there
//! (`trace`, `tungstenite=trace`, `tungstenite::protocol=trace`) can turn
//! them back on. Nothing is lost
//! that the server needs: tungstenite's errors come back to us as values,
//! and the reactor logs those, without payloads.
//!
//! rustls (at `trace`: handshake messages, never application data) and
//! httparse (which does not log) need no such cap; our own code logs no
//! frame at any level.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Dependencies whose logs would hold what clients send, at some level.
const SILENCED: [&str; 1] = ["tungstenite"];

/// Installs the global subscriber, and the bridge from the `log` crate.
pub fn init() {
    subscriber(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))).init();
}

/// Lines on stderr for what `filter` lets through, less [`SILENCED`].
fn subscriber(filter: EnvFilter) -> impl Subscriber + Send + Sync + 'static {
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    // Both filters in one, so that the pair asks for no more than
    // `filter` does: the level that events and `log` records are checked
    // at stays RUST_LOG's (a second filter of its own would raise it to
    // the most the two allow, `trace`).
    tracing_subscriber::registry().with(stderr.with_filter(filter.and(silenced())))
}

/// Everything, except the [`SILENCED`] targets (and their modules).
fn silenced() -> Targets {
    SILENCED.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |targets, target| targets.with_target(*target, LevelFilter::OFF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn tungstenite_is_silent_at_every_level_and_the_rest_is_left_to_rust_log() {
        for directives in [
            "trace",
            "trace,tungstenite=trace,tungstenite::protocol=trace",
        ] {
            let subscriber = subscriber(EnvFilter::new(directives));
            assert_eq!(subscriber.max_level_hint(), Some(LevelFilter::TRACE));
            tracing::subscriber::with_default(subscriber, || {
                assert!(!tracing::enabled!(target: "tungstenite", Level::ERROR));
                assert!(!tracing::enabled!(target: "tungstenite::protocol::frame", Level::ERROR));
                assert!(!tracing::enabled!(target: "tungstenite::protocol", Level::TRACE));
                assert!(tracing::enabled!(target: "chatserver::reactor", Level::TRACE));
                assert!(tracing::enabled!(target: "rustls::server::hs", Level::TRACE));
            });
        }
        // The cap raises nothing: at the default level, debug is not
        // even looked at.
        let subscriber = subscriber(EnvFilter::new("info"));
        assert_eq!(subscriber.max_level_hint(), Some(LevelFilter::INFO));
        tracing::subscriber::with_default(subscriber, || {
            assert!(tracing::enabled!(target: "chatserver::reactor", Level::INFO));
            assert!(!tracing::enabled!(target: "chatserver::reactor", Level::DEBUG));
        });
    }
}
