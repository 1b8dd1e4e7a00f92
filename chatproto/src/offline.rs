//! Offline queues: direct messages waiting for their recipient to log in.
//!
//! Each user has a first-in, first-out queue, capped in messages and in
//! bytes (and, optionally, all queues together in bytes), so that no sender
//! can grow the server without bound; a message past a cap is refused
//! (`mailbox_full`) rather than dropped.
//!
//! The core always knows how big each queue is. Where the texts live is the
//! driver's choice ([`OfflineTexts`]): in the core's memory, or in the
//! driver's storage, which hands them back one page at a time
//! ([`crate::Output::LoadOffline`], [`crate::Server::handle_offline_page`]).
//! Either way a queue is delivered a page at a time, paced by the reader
//! (see [`crate::Server::handle_drained`]).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::accounts::{Accounts, PerUser, UserId};
use crate::text::MessageText;
use crate::time::Timestamp;
use crate::username::Username;

/// The default cap on one user's offline queue, in messages.
pub const DEFAULT_OFFLINE_QUEUE_CAPACITY: usize = 1_000;
/// The default cap on one user's offline queue, in bytes of text.
pub const DEFAULT_OFFLINE_QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// The default size of one page of a queue handed to a connection, in
/// bytes of text (a page holds at least one message, however long).
pub const DEFAULT_OFFLINE_PAGE_BYTES: usize = 64 * 1024;

/// A direct message kept for a user who was offline when it was sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineMessage {
    /// The sender.
    pub from: Username,
    /// What they said.
    pub text: MessageText,
    /// When the server accepted it; delivered with it, unchanged.
    pub sent_at: Timestamp,
}

impl OfflineMessage {
    /// What it counts toward the byte caps: its text, in UTF-8 bytes.
    pub fn size(&self) -> usize {
        self.text.as_str().len()
    }
}

/// A queued message as storage hands it back in a page: with its place in
/// the queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessage {
    /// Its place in its queue: later messages have larger numbers. Storage
    /// chooses the numbers (a row id does); the core only compares them.
    pub seq: u64,
    /// The message.
    pub message: OfflineMessage,
}

/// How much one queue (or all of them) holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSize {
    /// Messages.
    pub messages: usize,
    /// Bytes of text ([`OfflineMessage::size`]).
    pub bytes: usize,
}

/// Where the texts of queued messages are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OfflineTexts {
    /// In the core's memory (bound them with
    /// [`ServerConfig::offline_total_bytes`](crate::ServerConfig::offline_total_bytes)).
    /// The store still hears of every change, so a restart can carry on.
    #[default]
    InMemory,
    /// In the driver's storage. The core keeps only each queue's size and
    /// asks for texts a page at a time with [`crate::Output::LoadOffline`].
    External,
}

/// Which cap a message to a full mailbox ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MailboxLimit {
    /// The recipient's queue holds this many messages already.
    Messages(usize),
    /// The message would take the recipient's queue past this many bytes.
    Bytes(usize),
    /// The message would take all queues together past this many bytes.
    ServerBytes(usize),
}

impl std::fmt::Display for MailboxLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MailboxLimit::Messages(n) => write!(f, "{n} messages"),
            MailboxLimit::Bytes(n) => write!(f, "{n} bytes"),
            MailboxLimit::ServerBytes(_) => f.write_str("the server's offline storage is full"),
        }
    }
}

/// The caps on offline queues.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueLimits {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
    pub(crate) total_bytes: Option<usize>,
}

/// Every user's offline queue.
#[derive(Debug)]
pub(crate) struct OfflineQueues {
    sizes: PerUser<QueueSize>,
    /// The texts, oldest first, when the core keeps them.
    texts: Option<PerUser<VecDeque<QueuedMessage>>>,
    total: QueueSize,
    limits: QueueLimits,
    /// The number the next message kept here gets.
    next_seq: u64,
}

impl OfflineQueues {
    pub(crate) fn new(accounts: &Accounts, limits: QueueLimits, texts: OfflineTexts) -> Self {
        OfflineQueues {
            sizes: PerUser::new(accounts),
            texts: (texts == OfflineTexts::InMemory).then(|| PerUser::new(accounts)),
            total: QueueSize::default(),
            limits,
            next_seq: 1,
        }
    }

    /// Whether the texts are in the driver's storage.
    pub(crate) fn external(&self) -> bool {
        self.texts.is_none()
    }

    /// Appends a message, unless a cap refuses it.
    pub(crate) fn push(&mut self, to: UserId, message: OfflineMessage) -> Result<(), MailboxLimit> {
        let size = self.sizes[to];
        let bytes = message.size();
        if size.messages >= self.limits.messages {
            return Err(MailboxLimit::Messages(self.limits.messages));
        }
        if size.bytes + bytes > self.limits.bytes {
            return Err(MailboxLimit::Bytes(self.limits.bytes));
        }
        if let Some(total) = self.limits.total_bytes {
            if self.total.bytes + bytes > total {
                return Err(MailboxLimit::ServerBytes(total));
            }
        }
        self.restore(to, message);
        Ok(())
    }

    /// Appends a message restored from storage, even past a cap: losing an
    /// acknowledged message because a cap was lowered would be worse.
    pub(crate) fn restore(&mut self, to: UserId, message: OfflineMessage) {
        self.grow(
            to,
            QueueSize {
                messages: 1,
                bytes: message.size(),
            },
        );
        if let Some(texts) = &mut self.texts {
            texts[to].push_back(QueuedMessage {
                seq: self.next_seq,
                message,
            });
            self.next_seq += 1;
        }
    }

    /// Counts a queue whose texts stay in storage (restored at start-up).
    pub(crate) fn restore_size(&mut self, to: UserId, size: QueueSize) {
        self.grow(to, size);
    }

    /// Counts `to`'s queue, whose texts stay in storage, as `size`: what
    /// the storage that other nodes share holds (cluster mode).
    pub(crate) fn set_size(&mut self, to: UserId, size: QueueSize) {
        let had = self.sizes[to];
        self.shrink(to, had);
        self.grow(to, size);
    }

    /// How much `to`'s queue holds.
    pub(crate) fn size(&self, to: UserId) -> QueueSize {
        self.sizes[to]
    }

    /// Up to `max_bytes` of the texts kept here for `to` that come after
    /// `after_seq`, oldest first; at least one message if any is left.
    /// `None` when the texts are in storage.
    pub(crate) fn page(
        &self,
        to: UserId,
        after_seq: u64,
        max_bytes: usize,
    ) -> Option<Vec<QueuedMessage>> {
        let queue = &self.texts.as_ref()?[to];
        let start = queue.partition_point(|m| m.seq <= after_seq);
        let mut bytes = 0;
        let mut page = Vec::new();
        for m in queue.range(start..) {
            if !page.is_empty() && bytes + m.message.size() > max_bytes {
                break;
            }
            bytes += m.message.size();
            page.push(m.clone());
        }
        Some(page)
    }

    /// Adds empty queues for the accounts added since.
    pub(crate) fn grow_accounts(&mut self, accounts: &Accounts) {
        self.sizes.grow(accounts);
        if let Some(texts) = &mut self.texts {
            texts.grow(accounts);
        }
    }

    /// Deletes `to`'s whole queue: their account was removed.
    pub(crate) fn clear(&mut self, to: UserId) {
        let size = self.sizes[to];
        self.shrink(to, size);
        if let Some(texts) = &mut self.texts {
            texts[to].clear();
        }
    }

    /// Forgets the oldest `removed` of `to`'s queue: they were delivered.
    pub(crate) fn remove_front(&mut self, to: UserId, removed: QueueSize) {
        let removed = self.shrink(to, removed);
        if let Some(texts) = &mut self.texts {
            let queue = &mut texts[to];
            queue.drain(..removed.messages.min(queue.len()));
        }
    }

    /// Storage holds nothing past what was handed over: `to`'s queue is
    /// only `kept` (the messages handed over but not yet delivered). Only
    /// for texts in storage, whose count the core may have got wrong.
    pub(crate) fn truncate(&mut self, to: UserId, kept: QueueSize) {
        let size = self.sizes[to];
        self.shrink(
            to,
            QueueSize {
                messages: size.messages.saturating_sub(kept.messages),
                bytes: size.bytes.saturating_sub(kept.bytes),
            },
        );
    }

    /// Takes back the newest message of `to`'s queue, of `bytes`: its
    /// batch failed.
    pub(crate) fn pop_back(&mut self, to: UserId, bytes: usize) {
        self.shrink(to, QueueSize { messages: 1, bytes });
        if let Some(texts) = &mut self.texts {
            texts[to].pop_back();
        }
    }

    /// What all queues hold together.
    pub(crate) fn total(&self) -> QueueSize {
        self.total
    }

    /// Takes `by` off `to`'s size, never below zero; returns what it took.
    fn shrink(&mut self, to: UserId, by: QueueSize) -> QueueSize {
        let size = &mut self.sizes[to];
        let by = QueueSize {
            messages: by.messages.min(size.messages),
            bytes: by.bytes.min(size.bytes),
        };
        size.messages -= by.messages;
        size.bytes -= by.bytes;
        self.total.messages -= by.messages;
        self.total.bytes -= by.bytes;
        by
    }

    fn grow(&mut self, to: UserId, by: QueueSize) {
        let size = &mut self.sizes[to];
        size.messages += by.messages;
        size.bytes += by.bytes;
        self.total.messages += by.messages;
        self.total.bytes += by.bytes;
    }
}
