//! Connections: the server core's table of open connections, addressed by
//! [`ConnId`].
//!
//! Slots are reused, and each reuse bumps the slot's generation, so an id
//! kept after its connection closed is recognised as stale instead of
//! reaching whoever holds the slot now.

use uuid::Uuid;

use crate::accounts::UserId;
use crate::drain::Drain;
use crate::framing::FrameDecoder;
use crate::peer::PeerKey;
use crate::rate_limit::TokenBucket;
use crate::time::Timestamp;

/// A connection, as named by the server core.
///
/// Drivers may use [`ConnId::index`] to key their own per-socket table:
/// at most one open connection has a given index at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    index: u32,
    generation: u32,
}

impl ConnId {
    /// The slot number, small and dense: fit for indexing a `Vec`.
    pub fn index(self) -> usize {
        self.index as usize
    }

    /// How many times the slot had been used before.
    pub fn generation(self) -> u32 {
        self.generation
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "conn#{}.{}", self.index, self.generation)
    }
}

/// What the core knows about one open connection.
#[derive(Debug)]
pub(crate) struct Connection {
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
    pub(crate) awaiting: Option<crate::server::VerifyTicket>,
    /// Input that arrived meanwhile, served after the verdict.
    pub(crate) held_input: Vec<u8>,
    /// Its user's offline queue being handed over.
    pub(crate) drain: Option<Drain>,
}

/// The open connections.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    slots: Vec<Slot>,
    free: Vec<u32>,
    len: usize,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    conn: Option<Connection>,
}

impl Connections {
    pub(crate) fn insert(&mut self, conn: Connection) -> ConnId {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.conn = Some(conn);
            return ConnId {
                index,
                generation: slot.generation,
            };
        }
        let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 connections");
        self.slots.push(Slot {
            generation: 0,
            conn: Some(conn),
        });
        ConnId {
            index,
            generation: 0,
        }
    }

    pub(crate) fn get(&self, id: ConnId) -> Option<&Connection> {
        let slot = self.slots.get(id.index())?;
        (slot.generation == id.generation).then_some(slot.conn.as_ref())?
    }

    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut Connection> {
        let slot = self.slots.get_mut(id.index())?;
        (slot.generation == id.generation).then_some(slot.conn.as_mut())?
    }

    pub(crate) fn remove(&mut self, id: ConnId) -> Option<Connection> {
        let slot = self.slots.get_mut(id.index())?;
        if slot.generation != id.generation {
            return None;
        }
        let conn = slot.conn.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        self.len -= 1;
        Some(conn)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            slot.conn.as_ref().map(|_| ConnId {
                index: index as u32,
                generation: slot.generation,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        Connection {
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
            held_input: Vec::new(),
            drain: None,
        }
    }

    #[test]
    fn a_stale_id_does_not_reach_the_slots_new_owner() {
        let mut c = Connections::default();
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
