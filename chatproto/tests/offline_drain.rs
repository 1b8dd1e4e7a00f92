//! Offline queues are handed over a page at a time, paced by the reader,
//! and leave the queue only once written (PROTOCOL.md rules 5 and 15).
//!
//! These tests drive the core as a socket driver would, but decide
//! themselves what has been written, so they can stop a reader anywhere.

mod common;

use std::collections::VecDeque;

use chatproto::{
    Accounts, Change, ConnId, ErrorCode, OfflineMessage, OfflineTexts, Output, PeerKey, Persisted,
    QueueSize, QueuedMessage, Server, ServerConfig, ServerFrame, Snapshot, Timestamp, Username,
};
use common::{accounts, config, T0};

const TEXT_1K: usize = 1000;

fn user(name: &str) -> Username {
    name.parse().unwrap()
}

/// A driver whose sockets write only what the test lets them.
struct Driver {
    server: Server,
    /// What storage holds (every batch is committed as it comes).
    store: Snapshot,
    /// Every change committed, in order.
    journal: Vec<Change>,
    now: Timestamp,
    /// Frames queued per connection, not yet written.
    unsent: std::collections::HashMap<ConnId, VecDeque<ServerFrame>>,
    /// Frames written (what the client read), per connection.
    read: std::collections::HashMap<ConnId, Vec<ServerFrame>>,
    /// Storage for texts (with `OfflineTexts::External`): user -> queue.
    storage: std::collections::BTreeMap<Username, Vec<QueuedMessage>>,
    loads: Vec<(ConnId, Username, u64, usize)>,
    closed: Vec<ConnId>,
}

impl Driver {
    fn new(server: Server) -> Self {
        Driver {
            server,
            store: Snapshot::default(),
            journal: Vec::new(),
            now: Timestamp::from_unix_millis(T0),
            unsent: Default::default(),
            read: Default::default(),
            storage: Default::default(),
            loads: Vec::new(),
            closed: Vec::new(),
        }
    }

    fn pump(&mut self) {
        while let Some(output) = self.server.poll_output() {
            match output {
                Output::Persist { batch, changes } => {
                    for change in &changes {
                        self.store.apply(change);
                    }
                    self.journal.extend(changes);
                    self.server
                        .handle_persisted(batch, Persisted::Committed, self.now);
                }
                Output::Transmit { conn, frame } => {
                    let frame = ServerFrame::decode(&frame).unwrap();
                    self.unsent.entry(conn).or_default().push_back(frame);
                }
                Output::Close { conn, .. } => self.closed.push(conn),
                Output::LoadOffline {
                    conn,
                    user,
                    after_seq,
                    max_bytes,
                } => self.loads.push((conn, user, after_seq, max_bytes)),
                _ => {}
            }
        }
    }

    /// Answers the storage reads asked for, as a database would.
    fn serve_loads(&mut self) {
        for (conn, user, after, max) in std::mem::take(&mut self.loads) {
            let mut page = Vec::new();
            let mut bytes = 0;
            for m in self.storage.get(&user).into_iter().flatten() {
                if m.seq <= after {
                    continue;
                }
                if !page.is_empty() && bytes + m.message.size() > max {
                    break;
                }
                bytes += m.message.size();
                page.push(m.clone());
            }
            self.server
                .handle_offline_page(conn, page, self.now)
                .unwrap();
            self.pump();
        }
    }

    /// Writes up to `n` frames of `conn`, then reports its backlog.
    fn write(&mut self, conn: ConnId, n: usize) {
        let left = self.write_unreported(conn, n);
        let _ = self.server.handle_drained(conn, left, self.now);
        self.pump();
        self.serve_loads();
    }

    /// Writes up to `n` frames of `conn` without telling the core; returns
    /// how many are left.
    fn write_unreported(&mut self, conn: ConnId, n: usize) -> usize {
        let queue = self.unsent.entry(conn).or_default();
        let n = n.min(queue.len());
        let written: Vec<_> = queue.drain(..n).collect();
        self.read.entry(conn).or_default().extend(written);
        queue.len()
    }

    /// Writes exactly `n` frames of `conn`, reporting as it goes, as the
    /// core hands more over.
    fn read_frames(&mut self, conn: ConnId, mut n: usize) {
        while n > 0 {
            let ready = self.unsent_len(conn).min(n);
            assert!(ready > 0, "nothing more to read");
            self.write(conn, ready);
            n -= ready;
        }
    }

    /// Writes everything, page after page, until nothing is left.
    fn write_all(&mut self, conn: ConnId) {
        for _ in 0..100_000 {
            self.serve_loads();
            if self.unsent_len(conn) == 0 {
                return;
            }
            self.write(conn, usize::MAX);
        }
        panic!("the drain does not end");
    }

    /// A new connection, its `hello` read.
    fn connect(&mut self) -> ConnId {
        let conn = self.server.accept(PeerKey::UNSPECIFIED, [7; 16], self.now);
        self.pump();
        self.write(conn, usize::MAX);
        conn
    }

    fn send(&mut self, conn: ConnId, line: &str) {
        self.server
            .handle_input(conn, format!("{line}\n").as_bytes(), self.now)
            .unwrap();
        self.pump();
        self.serve_loads();
    }

    fn login(&mut self, name: &str) -> ConnId {
        let conn = self.connect();
        self.send(conn, &format!("login {name} pw-{name}"));
        conn
    }

    /// What `conn` has read, as (offline texts), in order.
    fn offline_read(&self, conn: ConnId) -> Vec<String> {
        self.read
            .get(&conn)
            .into_iter()
            .flatten()
            .filter_map(|f| match f {
                ServerFrame::Message(m) if m.offline => Some(m.text.to_string()),
                _ => None,
            })
            .collect()
    }

    /// What `conns` read of the queue, one after the other.
    fn offline_read_all(&self, conns: &[ConnId]) -> Vec<String> {
        conns.iter().flat_map(|&c| self.offline_read(c)).collect()
    }

    fn unsent_len(&self, conn: ConnId) -> usize {
        self.unsent.get(&conn).map_or(0, VecDeque::len)
    }

    fn unsent_bytes(&self, conn: ConnId) -> usize {
        self.unsent
            .get(&conn)
            .into_iter()
            .flatten()
            // As written on a line transport: each frame and its `\n`.
            .map(|f| f.encode().len() + 1)
            .sum()
    }
}

fn numbered(i: usize, len: usize) -> String {
    let head = format!("m{i:04} ");
    format!("{head}{}", "x".repeat(len - head.len()))
}

/// Alice queues `n` messages of `len` bytes for bob (who is offline).
fn queue_for_bob(d: &mut Driver, n: usize, len: usize) {
    let a = d.login("alice");
    for i in 0..n {
        d.send(a, &format!("message bob {}", numbered(i, len)));
    }
    d.write(a, usize::MAX);
    let stored = d.read[&a]
        .iter()
        .filter(|f| matches!(f, ServerFrame::Ok(ok) if matches!(ok.reply, chatproto::Reply::Message { stored: true, .. })))
        .count();
    assert_eq!(stored, n, "every message acknowledged stored");
}

fn in_memory() -> Driver {
    let mut config = config();
    config.rate_limit = None;
    Driver::new(Server::new(config, accounts(), Timestamp::from_unix_millis(T0)).unwrap())
}

#[test]
fn a_large_queue_comes_after_the_ok_a_page_at_a_time_and_all_of_it() {
    let mut d = in_memory();
    queue_for_bob(&mut d, 1000, TEXT_1K);
    let b = d.connect();
    d.send(b, "login bob pw-bob");
    // The ok first, then at most one page behind it (a page counts text;
    // a frame adds about 100 bytes to a message).
    let first = d.unsent[&b].front().unwrap().clone();
    assert!(matches!(first, ServerFrame::Ok(_)), "{first:?}");
    let page = d.server.config().offline_page_bytes;
    let page_frames = page + page / 10;
    assert!(d.unsent_bytes(b) < page_frames, "{}", d.unsent_bytes(b));
    // A reader that takes 10 frames at a time, reported after each: the
    // next page comes only once at most half a page is unwritten, so the
    // backlog never passes a page and a half.
    let mut max_backlog = 0;
    for _ in 0..10_000 {
        if d.unsent_len(b) == 0 {
            break;
        }
        d.write(b, 10);
        max_backlog = max_backlog.max(d.unsent_bytes(b));
    }
    assert!(max_backlog <= page_frames * 3 / 2, "backlog {max_backlog}");
    let got = d.offline_read(b);
    let want: Vec<String> = (0..1000).map(|i| numbered(i, TEXT_1K)).collect();
    assert_eq!(got, want, "all of it, in order, once");
    assert_eq!(d.server.debug_state(d.now).queued_offline_messages, 0);
    assert!(d.store.offline.is_empty());
}

#[test]
fn a_reader_that_stops_gets_the_unwritten_rest_at_its_next_login_and_nothing_twice() {
    let mut d = in_memory();
    queue_for_bob(&mut d, 300, TEXT_1K);
    let b = d.login("bob");
    // The client reads 1 + 100 frames (the ok and 100 messages), then the
    // connection drops with the rest unwritten.
    d.read_frames(b, 101);
    let left = d.unsent_len(b);
    d.server.handle_drained(b, left, d.now).unwrap();
    d.server.handle_disconnect(b, d.now).unwrap();
    d.pump();
    // The socket is gone with `left` frames unwritten: the last report.
    d.server.handle_drained(b, left, d.now).unwrap();
    d.unsent.remove(&b);
    let first = d.offline_read(b);
    assert_eq!(first.len(), 100);
    assert_eq!(d.server.debug_state(d.now).queued_offline_messages, 200);

    let b2 = d.login("bob");
    d.write_all(b2);
    let second = d.offline_read(b2);
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    let want: Vec<String> = (0..300).map(|i| numbered(i, TEXT_1K)).collect();
    assert_eq!(all, want, "the rest, in order, none twice");
}

#[test]
fn a_closed_connection_settles_its_drain_with_the_drivers_last_report() {
    let mut d = in_memory();
    queue_for_bob(&mut d, 100, TEXT_1K);
    let b = d.login("bob");
    // Logout mid-page: the core closes the connection, its last frames
    // are still being written.
    d.send(b, "logout");
    assert_eq!(d.closed, [b]);
    // The driver wrote all but the last 30 frames (of the page, the ok and
    // the bye), then the socket died.
    let left = 30;
    let total = d.unsent_len(b);
    assert_eq!(d.write_unreported(b, total - left), left);
    assert_eq!(d.server.handle_drained(b, left, d.now), Ok(()));
    // Reported once: later reports are for an unknown connection.
    assert!(d.server.handle_drained(b, 0, d.now).is_err());
    let first = d.offline_read(b);
    let b2 = d.login("bob");
    d.write_all(b2);
    let all: Vec<String> = first.iter().chain(&d.offline_read(b2)).cloned().collect();
    let want: Vec<String> = (0..100).map(|i| numbered(i, TEXT_1K)).collect();
    assert_eq!(all, want);
}

#[test]
fn a_message_sent_during_a_drain_joins_the_end_of_the_queue() {
    let mut d = in_memory();
    queue_for_bob(&mut d, 200, TEXT_1K);
    let a = d.server.accept(PeerKey::UNSPECIFIED, [9; 16], d.now);
    d.pump();
    d.send(a, "login carol pw-carol");
    let b = d.login("bob");
    d.write(b, 5);
    d.send(a, "message bob late");
    d.write(a, usize::MAX);
    let ok = d.read[&a]
        .iter()
        .rev()
        .find_map(|f| match f {
            ServerFrame::Ok(ok) => Some(ok.reply.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        ok,
        chatproto::Reply::Message {
            to: user("bob"),
            stored: true
        }
    );
    d.write_all(b);
    let got = d.offline_read(b);
    assert_eq!(got.len(), 201);
    assert_eq!(got.last().unwrap(), "late", "after every older message");
    // Once the queue is empty, messages go straight through again.
    d.send(a, "message bob now");
    d.write(a, usize::MAX);
    assert!(matches!(
        d.read[&a].last(),
        Some(ServerFrame::Ok(ok)) if matches!(ok.reply, chatproto::Reply::Message { stored: false, .. })
    ));
}

#[test]
fn a_slow_consumer_cut_off_mid_drain_keeps_what_it_did_not_write() {
    let mut d = in_memory();
    queue_for_bob(&mut d, 150, TEXT_1K);
    let b = d.login("bob");
    d.read_frames(b, 21); // the ok and 20 messages
                          // The driver reports, drops the rest, and cuts it off.
    let left = d.unsent_len(b);
    d.server.handle_drained(b, left, d.now).unwrap();
    d.unsent.remove(&b);
    d.server
        .close(b, chatproto::CloseReason::SlowConsumer, d.now)
        .unwrap();
    d.pump();
    // The bye is written; a final report cannot count dropped messages.
    assert!(d.server.handle_drained(b, 0, d.now).is_err());
    assert_eq!(d.server.debug_state(d.now).queued_offline_messages, 130);
    let b2 = d.login("bob");
    d.write_all(b2);
    let all = d.offline_read_all(&[b, b2]);
    let want: Vec<String> = (0..150).map(|i| numbered(i, TEXT_1K)).collect();
    assert_eq!(all, want);
}

#[test]
fn queued_messages_leave_the_store_once_written_not_before() {
    let mut d = in_memory();
    queue_for_bob(&mut d, 3, 10);
    let b = d.login("bob");
    assert_eq!(d.store.queued_messages(), 3);
    d.write(b, 2); // the ok and the first message
    assert_eq!(d.store.queued_messages(), 2);
    d.write(b, usize::MAX);
    assert_eq!(d.store.queued_messages(), 0);
}

#[test]
fn queues_are_capped_in_bytes_per_user_and_overall() {
    let mut config = config();
    config.rate_limit = None;
    config.offline_queue_bytes = 2500;
    config.offline_total_bytes = Some(3500);
    let mut d =
        Driver::new(Server::new(config, accounts(), Timestamp::from_unix_millis(T0)).unwrap());
    let a = d.login("alice");
    let text = "y".repeat(1000);
    for _ in 0..2 {
        d.send(a, &format!("message bob {text}"));
    }
    d.send(a, &format!("message bob {text}"));
    d.send(a, &format!("message carol {text}"));
    d.send(a, &format!("message dave {text}"));
    d.write(a, usize::MAX);
    let codes: Vec<_> = d.read[&a]
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Error(e) => Some((e.code, e.text.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(codes.len(), 2, "{codes:?}");
    assert_eq!(codes[0].0, ErrorCode::MailboxFull);
    assert!(codes[0].1.contains("2500 bytes"), "{}", codes[0].1);
    assert_eq!(codes[1].0, ErrorCode::MailboxFull);
    assert!(
        codes[1].1.contains("offline storage is full"),
        "{}",
        codes[1].1
    );
}

fn external() -> Driver {
    let mut config = config();
    config.rate_limit = None;
    config.offline_texts = OfflineTexts::External;
    config.offline_page_bytes = 10_000;
    let mut snapshot = Snapshot::default();
    snapshot.offline_sizes.insert(
        user("bob"),
        QueueSize {
            messages: 50,
            bytes: 50 * TEXT_1K,
        },
    );
    let (server, summary) = Server::with_snapshot(
        config,
        accounts(),
        &snapshot,
        Timestamp::from_unix_millis(T0),
    )
    .unwrap();
    assert_eq!(summary.offline_messages, 50);
    let mut d = Driver::new(server);
    let queue: Vec<QueuedMessage> = (0..50)
        .map(|i| QueuedMessage {
            seq: 1000 + 3 * i as u64,
            message: OfflineMessage {
                from: user("alice"),
                text: numbered(i, TEXT_1K).parse().unwrap(),
                sent_at: Timestamp::from_unix_millis(T0 - 1000),
            },
        })
        .collect();
    d.storage.insert(user("bob"), queue);
    d
}

#[test]
fn with_texts_in_storage_the_core_asks_for_pages_after_the_last_one() {
    let mut d = external();
    let b = d.connect();
    d.server
        .handle_input(b, b"login bob pw-bob\n", d.now)
        .unwrap();
    d.pump();
    assert_eq!(d.loads, [(b, user("bob"), 0, 10_000)]);
    d.serve_loads();
    assert_eq!(d.unsent_len(b), 1 + 10, "the ok, then a page of 10");
    d.write(b, usize::MAX);
    // The next page starts after the last seq handed over.
    assert_eq!(d.loads, []);
    assert_eq!(d.unsent_len(b), 10);
    d.write_all(b);
    let want: Vec<String> = (0..50).map(|i| numbered(i, TEXT_1K)).collect();
    assert_eq!(d.offline_read(b), want);
    let delivered: usize = d
        .journal
        .iter()
        .filter_map(|c| match c {
            Change::MessagesDelivered { count, .. } => Some(*count),
            _ => None,
        })
        .sum();
    assert_eq!(delivered, 50);
    assert_eq!(d.server.debug_state(d.now).queued_offline_messages, 0);
}

#[test]
fn an_empty_page_from_storage_ends_the_drain() {
    let mut d = external();
    d.storage.get_mut(&user("bob")).unwrap().truncate(5);
    let b = d.login("bob");
    d.write_all(b);
    assert_eq!(d.offline_read(b).len(), 5);
    assert_eq!(d.server.debug_state(d.now).queued_offline_messages, 0);
    // Messages go straight through again.
    let a = d.login("alice");
    d.send(a, "message bob hi");
    d.write(a, usize::MAX);
    assert!(matches!(
        d.read[&a].last(),
        Some(ServerFrame::Ok(ok)) if matches!(ok.reply, chatproto::Reply::Message { stored: false, .. })
    ));
}

#[test]
fn an_in_memory_snapshot_restores_queues_with_their_texts() {
    let mut snapshot = Snapshot::default();
    snapshot.offline.insert(
        user("bob"),
        vec![OfflineMessage {
            from: user("alice"),
            text: "kept".parse().unwrap(),
            sent_at: Timestamp::from_unix_millis(T0),
        }],
    );
    let (server, _) = Server::with_snapshot(
        ServerConfig::default(),
        Accounts::clone(&accounts()),
        &snapshot,
        Timestamp::from_unix_millis(T0),
    )
    .unwrap();
    let mut d = Driver::new(server);
    let b = d.login("bob");
    d.write_all(b);
    assert_eq!(d.offline_read(b), ["kept"]);
}

#[test]
fn a_new_login_waits_for_the_last_report_of_a_connection_still_writing_the_queue() {
    let mut d = in_memory();
    queue_for_bob(&mut d, 100, TEXT_1K);
    let b = d.login("bob");
    d.read_frames(b, 11); // the ok and 10 messages
                          // The peer hangs up; its socket goes on writing for a while.
    d.server.handle_disconnect(b, d.now).unwrap();
    d.pump();
    let b2 = d.login("bob");
    d.write_all(b2);
    assert!(d.offline_read(b2).is_empty(), "it waits");
    // Messages sent meanwhile queue behind the rest, not ahead of it.
    let c = d.login("carol");
    d.send(c, "message bob late");
    // The old socket wrote 20 more frames, then was gone.
    d.write_unreported(b, 20);
    let left = d.unsent_len(b);
    d.server.handle_drained(b, left, d.now).unwrap();
    d.unsent.remove(&b);
    d.pump();
    d.write_all(b2);
    let first = d.offline_read(b);
    let second = d.offline_read(b2);
    let index = |t: &String| t.get(1..5).and_then(|n| n.parse::<usize>().ok());
    let all: Vec<Option<usize>> = first.iter().chain(&second).map(index).collect();
    let mut want: Vec<Option<usize>> = (0..100).map(Some).collect();
    want.push(None);
    assert_eq!(all, want, "in order, none twice, the late one last");
    assert_eq!(second.last().map(String::as_str), Some("late"));
}

#[test]
fn a_closed_connection_that_never_reports_holds_the_queue_back_a_minute_at_most() {
    let mut d = in_memory();
    queue_for_bob(&mut d, 100, TEXT_1K);
    let b = d.login("bob");
    d.read_frames(b, 11);
    d.server.handle_disconnect(b, d.now).unwrap();
    d.pump();
    d.unsent.remove(&b); // the driver forgets it, and never reports
    let b2 = d.login("bob");
    d.write_all(b2);
    assert!(d.offline_read(b2).is_empty(), "it waits");
    let due = d.server.poll_timeout().unwrap();
    assert!(due <= d.now + std::time::Duration::from_secs(60));
    d.now = due;
    d.server.handle_timeout(d.now);
    d.pump();
    d.write_all(b2);
    // Given up: everything not known written comes, the unsettled page
    // included (so some of it may come twice), in order.
    let second: Vec<usize> = d
        .offline_read(b2)
        .iter()
        .map(|t| t[1..5].parse().unwrap())
        .collect();
    assert_eq!(second, (10..100).collect::<Vec<_>>());
}

#[test]
fn a_slow_consumer_cut_off_gets_no_more_of_its_queue_before_its_bye() {
    let mut d = in_memory();
    queue_for_bob(&mut d, 200, TEXT_1K);
    let b = d.login("bob");
    d.read_frames(b, 31); // the ok and 30 messages
    let left = d.unsent_len(b);
    d.unsent.remove(&b);
    d.server.cut_off_slow_consumer(b, left, d.now).unwrap();
    d.pump();
    // Only the bye follows.
    let after: Vec<_> = d
        .unsent
        .remove(&b)
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert!(
        matches!(
            after.as_slice(),
            [ServerFrame::Bye {
                reason: chatproto::ByeReason::SlowConsumer
            }]
        ),
        "{after:?}"
    );
    assert_eq!(d.server.debug_state(d.now).queued_offline_messages, 170);
    let b2 = d.login("bob");
    d.write_all(b2);
    let all = d.offline_read_all(&[b, b2]);
    let want: Vec<String> = (0..200).map(|i| numbered(i, TEXT_1K)).collect();
    assert_eq!(all, want);
}
