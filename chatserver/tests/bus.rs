//! The cluster bus against a real nats-server: messages arrive in order,
//! the connection comes back by itself after NATS restarts or was never
//! up, and a long outage makes publishes refuse instead of piling up.

#[path = "common/nats.rs"]
mod test_nats;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatserver::bus::{Bus, BusEvent, PublishError, MAX_UNSENT_PUBLISHES};
use polling::{Events, Poller};
use test_nats::{shared_url, unique_prefix, PrivateNats};

/// A bus and the poller it wakes.
struct Node {
    bus: Bus,
    poller: Arc<Poller>,
}

impl Node {
    fn start(url: &str, subjects: &[String]) -> Node {
        let poller = Arc::new(Poller::new().unwrap());
        let url = url.parse().unwrap();
        let bus = Bus::start(&url, "bus-test", subjects.to_vec(), poller.clone()).unwrap();
        Node { bus, poller }
    }

    /// Events until `done` says so, waiting on the poller (as the reactor
    /// does) for at most `within`; panics past it.
    fn wait_until(&mut self, within: Duration, mut done: impl FnMut(&BusEvent) -> bool) {
        let deadline = Instant::now() + within;
        let mut events = Events::new();
        loop {
            while let Some(event) = self.bus.next_event() {
                if done(&event) {
                    return;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no such bus event within {within:?}");
            events.clear();
            self.poller
                .wait(&mut events, Some(left.min(Duration::from_millis(100))))
                .unwrap();
        }
    }

    fn wait_connected(&mut self) {
        self.wait_until(Duration::from_secs(10), |e| *e == BusEvent::Connected);
    }

    /// Every message on `subject` among the events of the next `within`.
    fn messages_for(&mut self, subject: &str, within: Duration) -> Vec<Bytes> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        let mut events = Events::new();
        while Instant::now() < deadline {
            while let Some(event) = self.bus.next_event() {
                if let BusEvent::Message {
                    subject: s,
                    payload,
                } = event
                {
                    if s == subject {
                        got.push(payload);
                    }
                }
            }
            events.clear();
            let left = deadline.saturating_duration_since(Instant::now());
            self.poller
                .wait(&mut events, Some(left.min(Duration::from_millis(50))))
                .unwrap();
        }
        got
    }
}

/// Publishes probes from `from` on `subject` until `to` gets one: its
/// subscription is then in place at the server (a publish that comes
/// before it is lost, as core NATS promises no more).
fn until_subscribed(from: &mut Node, to: &mut Node, subject: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        from.bus
            .publish(subject.to_owned(), Bytes::from_static(b"probe"))
            .unwrap();
        from.bus.flush();
        if !to
            .messages_for(subject, Duration::from_millis(100))
            .is_empty()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{subject}: no probe arrived in 10 s"
        );
    }
}

#[test]
fn messages_arrive_in_the_order_published_on_the_subscribed_subject_only() {
    let prefix = unique_prefix();
    let (to_a, to_b) = (format!("{prefix}.a"), format!("{prefix}.b"));
    let mut a = Node::start(&shared_url(), std::slice::from_ref(&to_a));
    let mut b = Node::start(&shared_url(), std::slice::from_ref(&to_b));
    a.wait_connected();
    b.wait_connected();
    assert!(a.bus.is_connected() && b.bus.is_connected());
    until_subscribed(&mut b, &mut a, &to_a);
    // Probes may still be on their way: the sequence is told apart by its
    // payloads.
    for i in 0..1000 {
        b.bus
            .publish(to_a.clone(), Bytes::from(format!("m{i}")))
            .unwrap();
        if i % 100 == 99 {
            // Handed over in batches, as the reactor does each wake-up.
            b.bus.flush();
        }
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 1000 && Instant::now() < deadline {
        let more = a.messages_for(&to_a, Duration::from_millis(100));
        got.extend(more.into_iter().filter(|p| p.as_ref() != b"probe"));
    }
    let want: Vec<Bytes> = (0..1000).map(|i| Bytes::from(format!("m{i}"))).collect();
    assert_eq!(got, want);
    assert!(b.messages_for(&to_b, Duration::from_millis(200)).is_empty());
}

#[test]
fn the_connection_comes_back_after_nats_restarts() {
    let mut nats = PrivateNats::start();
    let prefix = unique_prefix();
    let to_a = format!("{prefix}.a");
    let mut a = Node::start(&nats.url(), std::slice::from_ref(&to_a));
    let mut b = Node::start(&nats.url(), &[]);
    a.wait_connected();
    b.wait_connected();
    until_subscribed(&mut b, &mut a, &to_a);

    nats.kill();
    a.wait_until(Duration::from_secs(10), |e| *e == BusEvent::Disconnected);
    b.wait_until(Duration::from_secs(10), |e| *e == BusEvent::Disconnected);
    assert!(!a.bus.is_connected());

    nats.restart();
    a.wait_connected();
    b.wait_connected();
    // The subscription was made again by the client.
    until_subscribed(&mut b, &mut a, &to_a);
}

#[test]
fn a_server_that_is_not_up_yet_is_waited_for() {
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut a = Node::start(&url, &[]);
    let early = a.messages_for("nothing", Duration::from_millis(300));
    assert!(early.is_empty());
    assert!(!a.bus.is_connected());
    let _nats = PrivateNats::start_on(port);
    a.wait_connected();
    assert!(a.bus.is_connected());
}

#[test]
fn a_long_outage_makes_publishes_refuse_instead_of_piling_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut a = Node::start(&format!("nats://127.0.0.1:{port}"), &[]);
    let mut refused = None;
    for i in 0..MAX_UNSENT_PUBLISHES * 2 {
        if let Err(e) = a.bus.publish("x".to_owned(), Bytes::from_static(b"m")) {
            refused = Some((i, e));
            break;
        }
        if i % 64 == 63 {
            a.bus.flush();
        }
    }
    let (at, error) = refused.expect("publishes were never refused");
    assert_eq!(error, PublishError::Backlog);
    assert!(at >= MAX_UNSENT_PUBLISHES, "refused after {at}");
    assert!(a.bus.unsent() <= MAX_UNSENT_PUBLISHES);
}
