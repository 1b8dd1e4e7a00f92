//! Sessions: what the core keeps about each open connection (its frame
//! decoder, rate limits, login wait, held input, offline delivery,
//! timers), in a slot table addressed by [`ConnId`].
//!
//! Slots are reused, and each reuse bumps the slot's generation, so an id
//! kept after its connection closed is recognised as stale instead of
//! reaching whoever holds the slot now.

use std::collections::{HashSet, VecDeque};

use uuid::Uuid;

use crate::accounts::UserId;
use crate::drain::Drain;
use crate::framing::{FrameDecoder, FrameError};
use crate::ids::{ClaimId, ConnId, VerifyTicket};
use crate::peer::PeerKey;
use crate::rate_limit::TokenBucket;
use crate::routes::InFlight;
use crate::time::Timestamp;

/// What the core knows about one open connection.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) session: Uuid,
    /// Where it comes from.
    pub(crate) peer: PeerKey,
    pub(crate) decoder: FrameDecoder,
    pub(crate) user: Option<UserId>,
    /// When the connection opened.
    pub(crate) opened: Timestamp,
    /// When the last frame arrived (or the connection opened).
    pub(crate) last_frame: Timestamp,
    /// Where this connection sits in the timer queue (idle and login
    /// timeouts).
    pub(crate) idle_timer: Timestamp,
    /// Present when the server limits frame rates.
    pub(crate) bucket: Option<TokenBucket>,
    /// Present when the server limits the bytes of frames.
    pub(crate) byte_bucket: Option<TokenBucket>,
    /// Frames refused by the rate limit since the last one let through.
    pub(crate) refused_in_row: u32,
    /// Its login's password is being checked.
    pub(crate) awaiting: Option<VerifyTicket>,
    /// Cluster mode: the direct messages it sent to other nodes' users and
    /// not yet answered, in the order sent (answers keep request order).
    /// While there are any, only more such messages are served, up to
    /// [`MAX_IN_FLIGHT`](crate::routes::MAX_IN_FLIGHT); other input waits.
    pub(crate) routes: VecDeque<InFlight>,
    /// Cluster mode: its login waits for the cluster's database to make
    /// this node its user's one session.
    pub(crate) claiming: Option<ClaimId>,
    /// Cluster mode: the claim that made its user's session, given back
    /// when it ends.
    pub(crate) claim: Option<ClaimId>,
    /// Frames (or framing errors) that arrived while it waited for a
    /// password check or a first offline page, served in order after.
    pub(crate) held_frames: VecDeque<Result<Vec<u8>, FrameError>>,
    /// What `held_frames` holds, in bytes (an error counts a frame limit).
    pub(crate) held_bytes: usize,
    /// Its user's offline queue being handed over.
    pub(crate) drain: Option<Drain>,
}

/// The open connections.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Slots of connections closed with an `Output::Close` that has not
    /// left the core yet (it may wait behind a batch): not reused until it
    /// has, since the driver finds the socket by the slot until then.
    kept: HashSet<u32>,
    len: usize,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    conn: Option<Session>,
}

impl Sessions {
    pub(crate) fn insert(&mut self, conn: Session) -> ConnId {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.conn = Some(conn);
            return ConnId::new(index, slot.generation);
        }
        let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 sessions");
        self.slots.push(Slot {
            generation: 0,
            conn: Some(conn),
        });
        ConnId::new(index, 0)
    }

    pub(crate) fn get(&self, id: ConnId) -> Option<&Session> {
        let slot = self.slots.get(id.index())?;
        (slot.generation == id.generation()).then_some(slot.conn.as_ref())?
    }

    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut Session> {
        let slot = self.slots.get_mut(id.index())?;
        (slot.generation == id.generation()).then_some(slot.conn.as_mut())?
    }

    pub(crate) fn remove(&mut self, id: ConnId) -> Option<Session> {
        let slot = self.slots.get_mut(id.index())?;
        if slot.generation != id.generation() {
            return None;
        }
        let conn = slot.conn.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        if !self.kept.contains(&(id.index() as u32)) {
            self.free.push(id.index() as u32);
        }
        self.len -= 1;
        Some(conn)
    }

    /// Open `id` is being closed with an `Output::Close`: once removed,
    /// its slot is not reused until [`Sessions::release_slot`].
    pub(crate) fn keep_slot(&mut self, id: ConnId) {
        if self.get(id).is_some() {
            self.kept.insert(id.index() as u32);
        }
    }

    /// The `Output::Close` of `id` has left the core: its slot may be
    /// reused.
    pub(crate) fn release_slot(&mut self, id: ConnId) {
        let index = id.index() as u32;
        let closed = self
            .slots
            .get(id.index())
            .is_some_and(|slot| slot.conn.is_none());
        if closed && self.kept.remove(&index) {
            self.free.push(index);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            slot.conn
                .as_ref()
                .map(|_| ConnId::new(index as u32, slot.generation))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Session {
        Session {
            session: Uuid::nil(),
            peer: PeerKey::UNSPECIFIED,
            decoder: FrameDecoder::new(64),
            user: None,
            opened: Timestamp::ZERO,
            last_frame: Timestamp::ZERO,
            idle_timer: Timestamp::ZERO,
            bucket: None,
            byte_bucket: None,
            refused_in_row: 0,
            awaiting: None,
            routes: VecDeque::new(),
            claiming: None,
            claim: None,
            held_frames: VecDeque::new(),
            held_bytes: 0,
            drain: None,
        }
    }

    #[test]
    fn a_stale_id_does_not_reach_the_slots_new_owner() {
        let mut c = Sessions::default();
        let a = c.insert(conn());
        assert!(c.remove(a).is_some());
        let b = c.insert(conn());
        assert_eq!(a.index(), b.index());
        assert_ne!(a, b);
        assert!(c.get(a).is_none());
        assert!(c.remove(a).is_none());
        assert!(c.get(b).is_some());
        assert_eq!(c.len(), 1);
        assert_eq!(c.ids().collect::<Vec<_>>(), vec![b]);
    }
}
