//! The core's hot paths a fixed number of times, for an instruction count
//! (`valgrind --tool=cachegrind`): on a shared machine, where wall-clock
//! benchmarks move by a fifth between runs, the count of instructions is
//! the figure that two builds can be compared on. Used by
//! `benches/scripts/instructions-ab.sh`.
//!
//! `cargo run --release -p chatproto-benches --example core_counts -- WORKLOAD ITERATIONS`,
//! WORKLOAD one of `setup`, `inline`, `json`, `batch64`, `broadcast1000`.

use chatproto::{Accounts, Output, PeerKey, Server, ServerConfig, Timestamp};

const T0: u64 = 1_700_000_000_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (workload, iterations) = match args.as_slice() {
        [_, workload, n] => match n.parse::<u64>() {
            Ok(n) => (workload.as_str(), n),
            Err(_) => usage(&format!("ITERATIONS must be a whole number, not '{n}'")),
        },
        _ => usage("give WORKLOAD and ITERATIONS"),
    };
    let (input, users, frames): (Vec<u8>, usize, usize) = match workload {
        "setup" => (Vec::new(), 1000, 0),
        "inline" => (b"message u1 hello there, how are you today?\n".to_vec(), 2, 2),
        "json" => (
            b"{\"cmd\":\"message\",\"to\":\"u1\",\"text\":\"hello there, how are you today?\",\"id\":7}\n"
                .to_vec(),
            2,
            2,
        ),
        "batch64" => (
            b"message u1 hello there, how are you today?\n".repeat(64),
            2,
            128,
        ),
        "broadcast1000" => (b"broadcast hello everyone\n".to_vec(), 1000, 1000),
        other => usage(&format!("unknown workload '{other}'")),
    };
    let now = Timestamp::from_unix_millis(T0);
    let (mut server, conns) = server_with_sessions(users, now);
    if input.is_empty() {
        return; // `setup`: what every other workload spends before its loop
    }
    for _ in 0..iterations {
        server.handle_input(conns[0], &input, now).unwrap();
        let mut made = 0;
        while let Some(output) = server.poll_output() {
            if let Output::Transmit { frame, .. } = output {
                // (A refused frame would be measured instead of a delivery.)
                assert!(!frame.starts_with(br#"{"type":"error""#));
                made += 1;
            }
        }
        assert_eq!(made, frames, "{workload}: frames made per iteration");
    }
}

fn usage(error: &str) -> ! {
    eprintln!("core_counts: {error}\nusage: core_counts setup|inline|json|batch64|broadcast1000 ITERATIONS");
    std::process::exit(2);
}

/// Users u0..u(n-1) logged in on connections 0..n-1, without the limits
/// that a clock standing still would never refill.
fn server_with_sessions(n: usize, now: Timestamp) -> (Server, Vec<chatproto::ConnId>) {
    let mut config = ServerConfig::default();
    config.rate_limit = None;
    config.byte_rate = None;
    config.login_rate_per_peer = None;
    let mut accounts = Accounts::new();
    for i in 0..n {
        accounts
            .insert(
                format!("u{i}").parse().unwrap(),
                format!("p{i}").parse().unwrap(),
            )
            .unwrap();
    }
    let mut server = Server::new(config, accounts, now).unwrap();
    let conns = (0..n)
        .map(|i| {
            let c = server.accept(PeerKey::UNSPECIFIED, [i as u8; 16], now);
            server
                .handle_input(c, format!("login u{i} p{i}\n").as_bytes(), now)
                .unwrap();
            while server.poll_output().is_some() {}
            assert!(server.user(c).is_some(), "u{i} could not log in");
            c
        })
        .collect();
    (server, conns)
}
