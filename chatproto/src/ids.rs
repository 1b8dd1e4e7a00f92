//! The names the core gives things a driver hands back: connections
//! ([`ConnId`]), password checks ([`VerifyTicket`]), batches of changes
//! ([`BatchId`]) and, in cluster mode, session claims ([`ClaimId`]). Plain values at the bottom of the module graph: every
//! other module may use them, and they use none.

/// A connection, as named by the server core.
///
/// Drivers may use [`ConnId::index`] to key their own per-socket table:
/// at most one connection has a given index at a time, counting a closed
/// one until its [`Output::Close`](crate::Output::Close) has been polled
/// (it may wait behind a batch), and one the driver ended itself
/// ([`Server::handle_disconnect`](crate::Server::handle_disconnect)) until
/// that call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    index: u32,
    generation: u32,
}

impl ConnId {
    /// The id of slot `index` in its `generation`th use.
    pub(crate) fn new(index: u32, generation: u32) -> Self {
        ConnId { index, generation }
    }

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

/// Names one [`Output::VerifyPassword`](crate::Output::VerifyPassword) request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerifyTicket(pub(crate) u64);

impl VerifyTicket {
    /// The ticket as a number, for a driver that sends it elsewhere.
    pub fn into_raw(self) -> u64 {
        self.0
    }

    /// A ticket back from [`VerifyTicket::into_raw`]. A number the core
    /// never issued is simply ignored by [`Server::handle_verification`](crate::Server::handle_verification).
    pub fn from_raw(raw: u64) -> Self {
        VerifyTicket(raw)
    }
}

impl std::fmt::Display for VerifyTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verify#{}", self.0)
    }
}

/// Names one [`Output::Persist`](crate::Output::Persist) batch; hand it
/// back with [`Server::handle_persisted`](crate::Server::handle_persisted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub(crate) u64);

impl BatchId {
    /// The batch as a number, for a driver that sends it elsewhere.
    pub fn into_raw(self) -> u64 {
        self.0
    }

    /// A batch back from [`BatchId::into_raw`]. A number the core never
    /// issued, or a batch already answered, is ignored.
    pub fn from_raw(raw: u64) -> Self {
        BatchId(raw)
    }
}

impl std::fmt::Display for BatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "batch#{}", self.0)
    }
}

/// Names one [`Output::ClaimSession`](crate::Output::ClaimSession) (cluster
/// mode): hand it back with [`Server::handle_claim`](crate::Server::handle_claim).
/// The session it makes carries it too, so that releasing it
/// ([`Output::ReleaseSession`](crate::Output::ReleaseSession)) never
/// removes a later claim of the same user on the same node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClaimId(pub(crate) u64);

impl ClaimId {
    /// The claim as a number, for a driver that stores it.
    pub fn into_raw(self) -> u64 {
        self.0
    }

    /// A claim back from [`ClaimId::into_raw`]. A number the core never
    /// issued, or a claim already answered, is ignored.
    pub fn from_raw(raw: u64) -> Self {
        ClaimId(raw)
    }
}

impl std::fmt::Display for ClaimId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "claim#{}", self.0)
    }
}
