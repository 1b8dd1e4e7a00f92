//! Offline queues: direct messages waiting for their recipient to log in.
//!
//! Each user has a first-in, first-out queue with a cap, so that no sender
//! can grow the server's memory without bound; a message to a full queue is
//! refused (`mailbox_full`) rather than dropped.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::accounts::{Accounts, PerUser, UserId};
use crate::text::MessageText;
use crate::time::Timestamp;
use crate::username::Username;

/// The default cap on one user's offline queue.
pub const DEFAULT_OFFLINE_QUEUE_CAPACITY: usize = 1_000;

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

/// Every user's offline queue.
#[derive(Debug)]
pub(crate) struct OfflineQueues {
    queues: PerUser<VecDeque<OfflineMessage>>,
    capacity: usize,
    total: usize,
}

/// The recipient's queue is at its cap.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct QueueFull;

impl OfflineQueues {
    pub(crate) fn new(accounts: &Accounts, capacity: usize) -> Self {
        OfflineQueues {
            queues: PerUser::new(accounts),
            capacity,
            total: 0,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends a message, unless the queue is full.
    pub(crate) fn push(&mut self, to: UserId, message: OfflineMessage) -> Result<(), QueueFull> {
        if self.queues[to].len() >= self.capacity {
            return Err(QueueFull);
        }
        self.push_unchecked(to, message);
        Ok(())
    }

    /// Appends a message restored from storage, even past the cap: losing an
    /// acknowledged message because the cap was lowered would be worse.
    pub(crate) fn restore(&mut self, to: UserId, message: OfflineMessage) {
        self.push_unchecked(to, message);
    }

    /// Removes and returns everything queued for `to`, oldest first.
    pub(crate) fn take(&mut self, to: UserId) -> VecDeque<OfflineMessage> {
        let queue = std::mem::take(&mut self.queues[to]);
        self.total -= queue.len();
        queue
    }

    /// Messages waiting, all users together.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    fn push_unchecked(&mut self, to: UserId, message: OfflineMessage) {
        self.queues[to].push_back(message);
        self.total += 1;
    }
}
