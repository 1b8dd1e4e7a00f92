//! Criterion benchmarks of the sans-IO core: framing, parsing, and the
//! server state machine on its hot paths.
//!
//! Run with `cargo bench -p chatproto-benches`; add `-- direct` (or any
//! benchmark name) to run one.

use std::hint::black_box;
use std::time::Duration;

use chatproto::{
    Accounts, Command, FrameDecoder, Output, PeerKey, Request, Server, ServerConfig, Timestamp,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const T0: u64 = 1_700_000_000_000;

fn accounts(n: usize) -> Accounts {
    let mut accounts = Accounts::new();
    for i in 0..n {
        accounts
            .insert(
                format!("u{i}").parse().unwrap(),
                format!("p{i}").parse().unwrap(),
            )
            .unwrap();
    }
    accounts
}

/// The default configuration without rate limits: the clock stands still
/// in these benchmarks, so a limit would never refill and, once its burst
/// was spent, they would time refusals (see [`check`]). All connections
/// come from one address, so its login limit goes too.
fn config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.rate_limit = None;
    config.byte_rate = None;
    config.login_rate_per_peer = None;
    config
}

/// A server with users u0..u(n-1) logged in on connections 0..n-1.
fn server_with_sessions(n: usize) -> (Server, Vec<chatproto::ConnId>) {
    let now = Timestamp::from_unix_millis(T0);
    let mut server = Server::new(config(), accounts(n), now).unwrap();
    let conns: Vec<_> = (0..n)
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

/// Serves `input` on `conn` once and checks that it makes `frames` frames
/// (answers included), none of them an error. Run before and after each
/// benchmark, so that one which ends up timing refusals (a limit spent, a
/// session gone) fails instead of reporting a flattering figure.
fn check(server: &mut Server, conn: chatproto::ConnId, input: &[u8], frames: usize) {
    let now = Timestamp::from_unix_millis(T0);
    server.handle_input(conn, input, now).unwrap();
    let mut made = 0;
    while let Some(output) = server.poll_output() {
        if let Output::Transmit { frame, .. } = output {
            assert!(
                !frame.starts_with(br#"{"type":"error""#),
                "{} was answered {}",
                String::from_utf8_lossy(input).trim_end(),
                String::from_utf8_lossy(&frame)
            );
            made += 1;
        }
    }
    assert_eq!(
        made,
        frames,
        "frames made by {}",
        String::from_utf8_lossy(input).trim_end()
    );
}

/// Drains the outputs; returns how many frames were transmitted.
fn drain(server: &mut Server) -> usize {
    let mut frames = 0;
    while let Some(output) = server.poll_output() {
        if let Output::Transmit { frame, .. } = output {
            black_box(frame);
            frames += 1;
        }
    }
    frames
}

fn framing(c: &mut Criterion) {
    // 1 MiB of typical frames, fed in chunks of varying size as reads deliver them.
    let line =
        br#"{"cmd":"message","to":"bob","text":"hello there, how are you today?","id":12345}"#;
    let mut stream = Vec::new();
    while stream.len() < 1 << 20 {
        stream.extend_from_slice(line);
        stream.extend_from_slice(b"\r\n");
    }
    let chunk_sizes = [4096usize, 1500, 65536, 333, 16384, 7];
    let mut group = c.benchmark_group("framing");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("decode_1MiB_chunked", |b| {
        b.iter(|| {
            let mut decoder = FrameDecoder::new(16 * 1024);
            let (mut at, mut i, mut frames) = (0, 0, 0usize);
            while at < stream.len() {
                let end = (at + chunk_sizes[i % chunk_sizes.len()]).min(stream.len());
                let mut input = &stream[at..end];
                while let Some(frame) = decoder.decode(&mut input) {
                    frames += black_box(frame.unwrap()).len();
                }
                at = end;
                i += 1;
            }
            frames
        })
    });
    group.finish();
}

fn parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(1));
    group.bench_function("inline_message", |b| {
        b.iter(|| Command::parse(black_box("message bob hello there, how are you today?")).unwrap())
    });
    group.bench_function("inline_whoelse", |b| {
        b.iter(|| Command::parse(black_box("whoelse")).unwrap())
    });
    let json =
        br#"{"cmd":"message","to":"bob","text":"hello there, how are you today?","id":12345}"#;
    group.bench_function("json_message", |b| {
        b.iter(|| Request::parse_frame(black_box(json)).unwrap())
    });
    group.finish();
}

fn direct(c: &mut Criterion) {
    let (mut server, conns) = server_with_sessions(2);
    let now = Timestamp::from_unix_millis(T0);
    let mut group = c.benchmark_group("core");
    group.throughput(Throughput::Elements(1));
    let inline = b"message u1 hello there, how are you today?\n";
    check(&mut server, conns[0], inline, 2);
    group.bench_function("direct_message_inline", |b| {
        b.iter(|| {
            server.handle_input(conns[0], inline, now).unwrap();
            drain(&mut server)
        })
    });
    check(&mut server, conns[0], inline, 2);
    let json = b"{\"cmd\":\"message\",\"to\":\"u1\",\"text\":\"hello there, how are you today?\",\"id\":7}\n";
    check(&mut server, conns[0], json, 2);
    group.bench_function("direct_message_json", |b| {
        b.iter(|| {
            server.handle_input(conns[0], json, now).unwrap();
            drain(&mut server)
        })
    });
    check(&mut server, conns[0], json, 2);
    // Many messages per read, as a busy socket delivers them.
    let batch = inline.repeat(64);
    group.throughput(Throughput::Elements(64));
    check(&mut server, conns[0], &batch, 128);
    group.bench_function("direct_message_batch64", |b| {
        b.iter(|| {
            server.handle_input(conns[0], &batch, now).unwrap();
            drain(&mut server)
        })
    });
    check(&mut server, conns[0], &batch, 128);
    group.finish();
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    group.sample_size(20);
    for n in [1_000usize, 10_000] {
        let now = Timestamp::from_unix_millis(T0);
        // Built on first use, so that running another benchmark alone
        // does not pay for 10,000 logins.
        let mut setup = None;
        group.throughput(Throughput::Elements(n as u64 - 1));
        let broadcast = b"broadcast hello everyone\n";
        group.bench_function(format!("broadcast_to_{n}"), |b| {
            let (server, conns) = setup.get_or_insert_with(|| server_with_sessions(n));
            check(server, conns[0], broadcast, n);
            b.iter(|| {
                server.handle_input(conns[0], broadcast, now).unwrap();
                drain(server)
            })
        });
        if let Some((server, conns)) = &mut setup {
            check(server, conns[0], broadcast, n);
        }
    }
    group.finish();
}

fn login_storm(c: &mut Criterion) {
    let mut group = c.benchmark_group("login_storm");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("1000_attempts_with_lockouts", |b| {
        b.iter_batched(
            || {
                let now = Timestamp::from_unix_millis(T0);
                let server = Server::new(config(), accounts(100), now).unwrap();
                (server, now)
            },
            |(mut server, now)| {
                let mut conn = server.accept(PeerKey::UNSPECIFIED, [0; 16], now);
                // Wrong passwords over 100 known and 100 unknown names: most
                // names lock; one in ten attempts is right.
                for i in 0..1000usize {
                    let line = match i % 10 {
                        0 => format!("login u{} p{}\n", i % 100, i % 100),
                        1..=4 => format!("login u{} wrong\n", i % 100),
                        _ => format!("login ghost{} wrong\n", i % 100),
                    };
                    server.handle_input(conn, line.as_bytes(), now).unwrap();
                    if server.user(conn).is_some() {
                        // Logged in: log out, and go on from a new connection.
                        server.handle_input(conn, b"logout\n", now).unwrap();
                        conn = server.accept(PeerKey::UNSPECIFIED, [0; 16], now);
                    }
                    drain(&mut server);
                }
                server
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = framing, parsing, direct, fanout, login_storm
}
criterion_main!(benches);
