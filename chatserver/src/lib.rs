//! `chatserver`: serves the chatproto protocol over TCP, TLS and
//! WebSocket, as a library with a thin binary (`main.rs`) on top.
//!
//! The library owns what the sans-IO core (`chatproto`) leaves out:
//! sockets, time, storage, password checks, configuration and logs.
//!
//! | module | owns |
//! |---|---|
//! | [`reactor`] | the event loop: poll, accept, read, write, the commit hand-off, deadlines |
//! | [`link`] | one socket's transport, sans-IO: lines, HTTP, WebSocket, TLS, output, closing, its deadlines |
//! | [`admission`] | who comes in: connection limits, per-address caps, TLS handshake budgets, refusals |
//! | [`output_queue`] | a socket's output: framed core frames and transport bytes, written vectored |
//! | [`http`], [`websocket`], [`origin`] | the `--http` listener: requests, WebSocket messages, allowed origins |
//! | [`health`] | what `/healthz` and `/readyz` answer |
//! | [`tls`] | certificates and keys, and the TLS session a link holds |
//! | [`storage`], [`database`] | where the core's lasting state goes: a storage thread, and SQLite or PostgreSQL behind it; or nowhere |
//! | [`bus`] | the cluster bus: NATS on a thread of its own, bridged to the reactor |
//! | [`clock`] | the core's time from a monotonic clock |
//! | `verifier`, `cpu` | password checks on worker threads, kept off the reactor's CPU |
//! | `cli`, `serve`, [`logging`], [`hash_password`] | the binary: flags, start-up, logs, `hash-password` |
//!
//! Features: `sqlite` and `postgres` (the databases), `nats` (the cluster
//! bus), `tls` (rustls) and `cli` (the
//! binary's needs, and [`serve`]) are on by default. Without them the
//! library still has the reactor, the links and the HTTP and WebSocket
//! code, which is what the fuzz crate builds.

#![warn(missing_docs)]

pub mod admission;
pub mod bus;
#[cfg(feature = "cli")]
pub mod cli;
pub mod clock;
#[cfg(feature = "cli")]
pub mod config_file;
mod cpu;
#[cfg(feature = "cli")]
mod credentials;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod database;
#[cfg(feature = "cli")]
pub mod hash_password;
pub mod health;
pub mod http;
pub mod link;
#[cfg(feature = "cli")]
pub mod logging;
pub mod metrics;
pub mod node;
pub mod origin;
pub mod output_queue;
pub mod reactor;
mod registration;
#[cfg(feature = "cli")]
mod serve;
pub mod service;
pub mod storage;
pub mod tls;
#[cfg(feature = "cli")]
pub mod user_command;
mod verifier;
pub mod websocket;

pub use reactor::{AccountsHandle, Limits, Listener, Reactor, ReactorConfig, StopHandle, Turn};
#[cfg(feature = "cli")]
pub use serve::{serve, ServeError};
