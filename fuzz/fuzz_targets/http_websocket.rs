#![no_main]
//! The `--http` listener's parsers and link, on untrusted bytes, through
//! the server library: see `fuzz/src/http_websocket.rs`.

use libfuzzer_sys::fuzz_target;

#[path = "../src/http_websocket.rs"]
mod check;

fuzz_target!(|data: &[u8]| check::check_http_websocket(data));
