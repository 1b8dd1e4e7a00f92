//! A few hundred clients at once: every message delivered exactly once, in
//! each sender's order.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};

use common::{many_users, Client, TestServer};

const CLIENTS: usize = 200;
const PEERS: usize = 3;
const PER_PEER: usize = 10;

#[test]
fn hundreds_of_clients_exchange_messages_exactly_once_in_order() {
    let server = TestServer::start_with(&many_users(CLIENTS), &["--listen", "127.0.0.1:0"], &[]);
    let addr = server.addr;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                assert_eq!(c.ask(&format!("login u{i} p{i}"))["cmd"], "login");
                barrier.wait();
                // Interleave the peers: u(i+1) #0, u(i+2) #0, ..., u(i+1) #1, ...
                for n in 0..PER_PEER {
                    for p in 1..=PEERS {
                        c.send(&format!("message u{} {i} {n}", (i + p) % CLIENTS));
                    }
                }
                let (mut oks, mut received) = (0, HashMap::<usize, Vec<usize>>::new());
                while oks < PEERS * PER_PEER
                    || received.values().map(Vec::len).sum::<usize>() < PEERS * PER_PEER
                {
                    let v = c.recv();
                    match v["type"].as_str().unwrap() {
                        "ok" => {
                            assert_eq!(v["stored"], false, "everyone is online");
                            oks += 1;
                        }
                        "message" => {
                            let text = v["text"].as_str().unwrap();
                            let (from, n) = text.split_once(' ').unwrap();
                            assert_eq!(v["from"], format!("u{from}"));
                            received
                                .entry(from.parse().unwrap())
                                .or_default()
                                .push(n.parse().unwrap());
                        }
                        "presence" => {}
                        other => panic!("u{i} got {other}: {v}"),
                    }
                }
                // Wait until everyone is done before anyone logs out, so no
                // presence or message arrives at a closed connection.
                barrier.wait();
                (i, received)
            })
        })
        .collect();
    for t in threads {
        let (i, received) = t.join().unwrap();
        assert_eq!(received.len(), PEERS, "u{i} heard from {PEERS} senders");
        for p in 1..=PEERS {
            let from = (i + CLIENTS - p) % CLIENTS;
            assert_eq!(
                received[&from],
                (0..PER_PEER).collect::<Vec<_>>(),
                "u{i} from u{from}: exactly once, in order"
            );
        }
    }
}
