//! Draining an offline queue into a connection: a page at a time, paced by
//! the reader, and deleted only once written.
//!
//! Handing a whole queue over at login would put megabytes behind a
//! connection before the client has read a byte, and the driver would cut
//! it off as a slow consumer with the queue already deleted. Instead the
//! core hands over one page, waits until the driver says the backlog is
//! low again ([`crate::Server::handle_drained`]), then hands over the next.
//!
//! The driver reports how many frames it still has unwritten; unwritten
//! frames are always the newest. So a [`Drain`] numbers every frame it
//! sees go to its connection, remembers which numbers carried queued
//! messages, and counts a message delivered once its frame number is below
//! the number of frames written. Only delivered messages leave the queue,
//! so a connection that drops mid-drain gets the rest, and nothing twice,
//! at its next login.

use std::collections::VecDeque;

use crate::offline::QueueSize;

/// One connection's offline delivery in progress.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    /// The last message handed over; the next page starts after it.
    after_seq: u64,
    /// A page was asked of storage and has not come back.
    pub(crate) loading: bool,
    /// The next page is wanted, and waits to be handed over.
    pub(crate) page_due: bool,
    /// A page has been handed over: the connection's later input, held
    /// until then, is served.
    pub(crate) started: bool,
    /// Frames handed to the driver for this connection since the drain
    /// began.
    frames: u64,
    /// Messages handed over and not yet known written, oldest first.
    in_flight: VecDeque<InFlight>,
    in_flight_size: QueueSize,
}

/// The frame number of a message handed over but not yet out.
const UNNUMBERED: u64 = u64::MAX;

#[derive(Debug)]
struct InFlight {
    /// The frame number it went out as.
    frame: u64,
    /// Its number in storage.
    seq: u64,
    bytes: usize,
}

/// Queued messages now known written ([`Drain::written`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Written {
    pub(crate) size: QueueSize,
    /// Their numbers in storage, oldest first.
    pub(crate) seqs: Vec<u64>,
}

impl Drain {
    /// Where the next page starts.
    pub(crate) fn after_seq(&self) -> u64 {
        self.after_seq
    }

    /// Another frame went to the connection.
    pub(crate) fn count_frame(&mut self) {
        self.frames += 1;
    }

    /// The queued message `seq` of `bytes` went to the connection as the
    /// next frame.
    pub(crate) fn hand_over(&mut self, seq: u64, bytes: usize) {
        self.hand_over_held(seq, bytes);
        self.number_held_frame();
    }

    /// The queued message `seq` of `bytes` was handed over, but waits
    /// behind held output: it gets its frame number when it goes out
    /// ([`Drain::number_held_frame`]).
    pub(crate) fn hand_over_held(&mut self, seq: u64, bytes: usize) {
        self.in_flight.push_back(InFlight {
            frame: UNNUMBERED,
            seq,
            bytes,
        });
        self.started = true;
        self.after_seq = seq;
        self.in_flight_size.messages += 1;
        self.in_flight_size.bytes += bytes;
    }

    /// The oldest message handed over without a number went out as the
    /// next frame.
    pub(crate) fn number_held_frame(&mut self) {
        if let Some(m) = self.in_flight.iter_mut().find(|m| m.frame == UNNUMBERED) {
            m.frame = self.frames;
        }
        self.frames += 1;
    }

    /// The driver has `unsent` of the connection's frames left to write:
    /// the messages now known written, which leave the in-flight list.
    pub(crate) fn written(&mut self, unsent: usize) -> Written {
        let written = self
            .frames
            .saturating_sub(u64::try_from(unsent).unwrap_or(u64::MAX));
        let mut done = Written::default();
        while let Some(m) = self.in_flight.front().filter(|m| m.frame < written) {
            done.size.messages += 1;
            done.size.bytes += m.bytes;
            done.seqs.push(m.seq);
            self.in_flight.pop_front();
        }
        self.in_flight_size.messages -= done.size.messages;
        self.in_flight_size.bytes -= done.size.bytes;
        done
    }

    /// What was handed over and is not yet known written.
    pub(crate) fn in_flight(&self) -> QueueSize {
        self.in_flight_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_counts_as_written_once_every_frame_up_to_it_is() {
        let mut d = Drain::default();
        d.count_frame(); // frame 0: something else
        d.hand_over(10, 5); // frame 1
        d.hand_over(11, 7); // frame 2
        d.count_frame(); // frame 3
        d.hand_over(12, 1); // frame 4
        assert_eq!(d.after_seq(), 12);
        // 5 frames handed over, 3 unwritten: frames 0 and 1 are out.
        assert_eq!(
            d.written(3),
            Written {
                size: QueueSize {
                    messages: 1,
                    bytes: 5
                },
                seqs: vec![10],
            }
        );
        // More unwritten than ever handed over: nothing more.
        assert_eq!(d.written(100), Written::default());
        assert_eq!(
            d.in_flight(),
            QueueSize {
                messages: 2,
                bytes: 8
            }
        );
        assert_eq!(
            d.written(0),
            Written {
                size: QueueSize {
                    messages: 2,
                    bytes: 8
                },
                seqs: vec![11, 12],
            }
        );
        assert_eq!(d.in_flight(), QueueSize::default());
    }
}
