//! The cluster bus against a real nats-server: messages arrive in order,
//! the connection comes back by itself after NATS restarts or was never
//! up, and a long outage makes publishes refuse instead of piling up.

#[path = "common/nats.rs"]
mod test_nats;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatproto::{BusMessage, NodeId};
use chatserver::bus::{Bus, BusEvent, PublishError, MAX_PAYLOAD_BYTES, MAX_UNSENT_PUBLISHES};
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

/// The `i`th message of a test sequence.
fn numbered(i: u32) -> BusMessage {
    BusMessage::Heartbeat {
        node: NodeId::from_u128(7),
        online: i,
        accounts: String::new(),
    }
}

/// What `until_subscribed` publishes.
fn probe() -> BusMessage {
    BusMessage::RosterWanted {
        node: NodeId::from_u128(9),
    }
}

/// The messages packed in `payloads`, in order, probes left out.
fn unpack(payloads: &[Bytes]) -> Vec<BusMessage> {
    payloads
        .iter()
        .flat_map(|payload| BusMessage::decode_all(payload))
        .map(|message| message.expect("what the bus packs decodes"))
        .filter(|message| *message != probe())
        .collect()
}

/// Publishes probes from `from` on `subject` until `to` gets one: its
/// subscription is then in place at the server (a publish that comes
/// before it is lost, as core NATS promises no more).
fn until_subscribed(from: &mut Node, to: &mut Node, subject: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        from.bus.publish(subject, &probe()).unwrap();
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
        b.bus.publish(&to_a, &numbered(i)).unwrap();
        if i % 100 == 99 {
            // Handed over in batches, as the reactor does each wake-up.
            b.bus.flush();
        }
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 1000 && Instant::now() < deadline {
        got.extend(unpack(&a.messages_for(&to_a, Duration::from_millis(100))));
    }
    let want: Vec<BusMessage> = (0..1000).map(numbered).collect();
    assert_eq!(got, want);
    assert!(b.messages_for(&to_b, Duration::from_millis(200)).is_empty());
}

#[test]
fn a_wake_ups_publishes_go_out_packed_per_subject_in_order_and_bounded() {
    let prefix = unique_prefix();
    let (to_a, to_b) = (format!("{prefix}.a"), format!("{prefix}.b"));
    let mut a = Node::start(&shared_url(), std::slice::from_ref(&to_a));
    let mut b = Node::start(&shared_url(), std::slice::from_ref(&to_b));
    let mut c = Node::start(&shared_url(), &[]);
    a.wait_connected();
    b.wait_connected();
    c.wait_connected();
    until_subscribed(&mut c, &mut a, &to_a);
    until_subscribed(&mut c, &mut b, &to_b);
    // One wake-up's worth for two subjects, interleaved, some of them
    // long enough that they cannot all share one payload.
    let long = |i: u32| BusMessage::Heartbeat {
        node: NodeId::from_u128(7),
        online: i,
        accounts: "x".repeat(10_000),
    };
    let (mut want_a, mut want_b) = (Vec::new(), Vec::new());
    for i in 0..100 {
        let message = if i % 10 == 0 { long(i) } else { numbered(i) };
        c.bus.publish(&to_a, &message).unwrap();
        want_a.push(message);
        c.bus.publish(&to_b, &numbered(1000 + i)).unwrap();
        want_b.push(numbered(1000 + i));
    }
    assert_eq!(c.bus.unsent(), 200);
    c.bus.flush();
    let (mut payloads_a, mut payloads_b) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while (unpack(&payloads_a).len() < 100 || unpack(&payloads_b).len() < 100)
        && Instant::now() < deadline
    {
        payloads_a.extend(a.messages_for(&to_a, Duration::from_millis(50)));
        payloads_b.extend(b.messages_for(&to_b, Duration::from_millis(50)));
    }
    assert_eq!(unpack(&payloads_a), want_a);
    assert_eq!(unpack(&payloads_b), want_b);
    // 100 kB for a: two payloads at least, each within the bound; b's
    // 100 short messages fit in one.
    assert!(payloads_a.len() >= 2, "{}", payloads_a.len());
    assert!(payloads_a.len() <= 4, "{}", payloads_a.len());
    assert!(payloads_a.iter().all(|p| p.len() <= MAX_PAYLOAD_BYTES));
    assert_eq!(payloads_b.len(), 1);
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
        if let Err(e) = a.bus.publish("x", &numbered(0)) {
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
