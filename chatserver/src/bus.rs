//! The cluster bus: a connection to NATS, on a thread of its own, bridged
//! to the reactor by channels.
//!
//! The NATS client is async-nats (the NATS project's own), which needs
//! tokio. Rather than let tokio into the reactor, one thread runs a tokio
//! current-thread runtime with the client in it, as tokio's "bridging with
//! sync code" describes. The reactor hands it publishes over a channel and
//! never waits for them; the thread hands back what arrives on the
//! subscriptions and the connection's ups and downs, and wakes the poller
//! each time, so the reactor picks them up on its next turn.
//!
//! The client reconnects by itself, for ever, and restores the
//! subscriptions when it does; [`BusEvent::Connected`] and
//! [`BusEvent::Disconnected`] say when. Core NATS delivers at most once:
//! what is published while the connection is down may be lost, so
//! whatever must arrive is answered, and retried or stored by whoever
//! waits for the answer, never by the bus.
//!
//! What the reactor publishes during one wake-up goes out as one NATS
//! message per subject ([`BusMessage::encode_into`] packs them, up to
//! [`MAX_PAYLOAD_BYTES`] each): under load that is one message per node
//! per wake-up rather than one per direct message, which is most of the
//! bus's cost (NATS, both clients, and the wake-ups).
//!
//! [`BusMessage::encode_into`]: chatproto::BusMessage::encode_into
//!
//! Bounds: at most [`MAX_UNSENT_PUBLISHES`] messages wait for the client
//! at once (a longer outage makes [`Bus::publish`] refuse, instead of
//! holding memory for ever), and the client holds at most
//! [`CLIENT_CAPACITY`] payloads more. At most [`EVENT_CAPACITY`] payloads
//! wait for the reactor, and [`SUBSCRIPTION_CAPACITY`] more in the client
//! for each subscription, past which the client drops them and reports a
//! slow consumer. A payload is at most [`MAX_PAYLOAD_BYTES`] unless it is
//! one long message (a roster of many users), which goes alone.
//!
//! Order: the messages published to one subject arrive in the order
//! published. Across subjects no order holds (each subscription is read
//! by a task of its own), so the core never relies on one.

#[cfg(feature = "nats")]
pub use with_nats::*;

/// Publishes waiting for the client at most; see [`Bus::publish`].
pub const MAX_UNSENT_PUBLISHES: usize = 65_536;

/// The most bytes packed into one NATS message (NATS takes 1 MiB by
/// default); a single bus message longer than this goes alone.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// Events waiting for the reactor at most.
pub const EVENT_CAPACITY: usize = 1_024;

/// Payloads the client holds for each subscription at most, beside those
/// waiting for the reactor.
pub const SUBSCRIPTION_CAPACITY: usize = 1_024;

/// Payloads handed to the client and not yet written to NATS at most.
pub const CLIENT_CAPACITY: usize = 128;

/// The address of the NATS servers, as `--nats` takes it: one URL or
/// several separated by commas (`nats://`, `tls://`, `ws://`, `wss://`, or a
/// bare `host:port`), possibly with credentials (`nats://user:password@host`
/// or `nats://token@host`).
///
/// Shown (`Display`, `Debug`) without the password or token, so it can be
/// logged.
///
/// ```
/// use chatserver::bus::BusUrl;
/// let url: BusUrl = "nats://chat:s3cret@nats.example:4222".parse().unwrap();
/// assert_eq!(url.to_string(), "nats://chat:***@nats.example:4222");
/// assert!("nats://".parse::<BusUrl>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct BusUrl {
    servers: Vec<String>,
}

/// Why a `--nats` value is not a NATS address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BusUrlError {
    /// Nothing was given.
    #[error("the NATS address is empty")]
    Empty,
    /// One of the comma-separated addresses does not parse.
    #[error("'{shown}' is not a NATS server address ({reason})")]
    Invalid {
        /// The address, without its password.
        shown: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl BusUrl {
    /// The servers, credentials included, for the client.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }
}

impl std::str::FromStr for BusUrl {
    type Err = BusUrlError;

    fn from_str(s: &str) -> Result<BusUrl, BusUrlError> {
        let servers: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|server| !server.is_empty())
            .map(str::to_owned)
            .collect();
        if servers.is_empty() {
            return Err(BusUrlError::Empty);
        }
        for server in &servers {
            check_server(server).map_err(|reason| BusUrlError::Invalid {
                shown: redact(server),
                reason,
            })?;
        }
        Ok(BusUrl { servers })
    }
}

impl std::fmt::Display for BusUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self.servers.iter().map(|s| redact(s)).collect();
        f.write_str(&shown.join(","))
    }
}

impl std::fmt::Debug for BusUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BusUrl({self})")
    }
}

/// The NATS subjects of one cluster: `NAME.all` for what every node
/// hears, `NAME.node.ID` for what one node does.
///
/// ```
/// use chatproto::{BusTarget, NodeId};
/// use chatserver::bus::Subjects;
/// let me = NodeId::from_u128(1);
/// let subjects = Subjects::new("chat", me);
/// assert_eq!(subjects.of(BusTarget::All), "chat.all");
/// assert_eq!(
///     subjects.subscriptions(),
///     ["chat.all", "chat.node.00000000-0000-0000-0000-000000000001"]
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    node: chatproto::NodeId,
}

impl Subjects {
    /// The subjects of cluster `name` (a single subject token, as
    /// `--cluster-name` checks), for node `node`.
    pub fn new(name: &str, node: chatproto::NodeId) -> Subjects {
        Subjects {
            prefix: name.to_owned(),
            node,
        }
    }

    /// Where a message for `target` is published.
    pub fn of(&self, target: chatproto::BusTarget) -> String {
        match target {
            chatproto::BusTarget::Node(node) => {
                format!("{}.node.{}", self.prefix, node.as_uuid())
            }
            _ => format!("{}.all", self.prefix),
        }
    }

    /// What this node subscribes to: everyone's subject and its own.
    pub fn subscriptions(&self) -> Vec<String> {
        vec![
            self.of(chatproto::BusTarget::All),
            self.of(chatproto::BusTarget::Node(self.node)),
        ]
    }
}

/// What came from the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusEvent {
    /// The connection is up: the first time, or again after a loss (the
    /// subscriptions are back too).
    Connected,
    /// The connection was lost; the client is reconnecting. What was
    /// published meanwhile may be lost.
    Disconnected,
    /// A message on one of the subscriptions.
    Message {
        /// The subject it was published to.
        subject: String,
        /// What it carries.
        payload: bytes::Bytes,
    },
    /// Something for the log: a server error, a slow consumer, a server
    /// going away (lame duck), a refused subscription.
    Warning(String),
}

/// Why the bus did not take a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// [`MAX_UNSENT_PUBLISHES`] are already waiting: the connection has
    /// been down for a while. Nothing was queued.
    #[error("the bus has {MAX_UNSENT_PUBLISHES} publishes waiting (is NATS reachable?)")]
    Backlog,
    /// The bus thread has stopped.
    #[error("the bus thread has stopped")]
    Stopped,
}

/// Checks one server address the way the client will read it.
fn check_server(server: &str) -> Result<(), String> {
    let with_scheme = if server.contains("://") {
        server.to_owned()
    } else {
        format!("nats://{server}")
    };
    let scheme = with_scheme.split("://").next().unwrap_or_default();
    if !["nats", "tls", "ws", "wss"].contains(&scheme.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "scheme '{scheme}': use nats://, tls://, ws:// or wss://"
        ));
    }
    let rest = &with_scheme[scheme.len() + 3..];
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err("no host".to_owned());
    }
    if let Some((_, port)) = host.rsplit_once(':').filter(|_| !host.ends_with(']')) {
        if port.parse::<u16>().is_err() {
            return Err(format!("port '{port}' is not a number from 0 to 65535"));
        }
    }
    Ok(())
}

/// `server` with the password (`user:password@`) or token (`token@`) of
/// its user information replaced by `***`.
fn redact(server: &str) -> String {
    let (scheme, rest) = match server.find("://") {
        Some(i) => server.split_at(i + 3),
        None => ("", server),
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            let shown = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_owned(),
            };
            format!("{scheme}{shown}{host}{tail}")
        }
        None => server.to_owned(),
    }
}

#[cfg(feature = "nats")]
mod with_nats {
    use std::pin::pin;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use polling::Poller;
    use tokio::sync::mpsc;
    use tracing::warn;

    use super::{
        BusEvent, BusUrl, PublishError, CLIENT_CAPACITY, EVENT_CAPACITY, MAX_PAYLOAD_BYTES,
        MAX_UNSENT_PUBLISHES, SUBSCRIPTION_CAPACITY,
    };

    /// Messages packed at most before [`Bus::publish`] hands them to the
    /// thread without waiting for [`Bus::flush`].
    const FLUSH_EVERY: usize = 1024;

    /// How long [`Bus::stop`] gives the client to hand NATS what it holds.
    const STOP_FLUSH: Duration = Duration::from_secs(2);

    /// A connection to NATS, run by a thread of its own.
    ///
    /// Dropping it stops the thread, as [`Bus::stop`] does.
    #[derive(Debug)]
    pub struct Bus {
        commands: mpsc::UnboundedSender<Command>,
        events: mpsc::Receiver<BusEvent>,
        /// Published since the last [`Bus::flush`], packed per subject:
        /// handed to the thread together, so a wake-up's publishes wake
        /// it once.
        batch: Vec<Payload>,
        /// The message being packed.
        scratch: Vec<u8>,
        /// Messages in `batch`.
        batched: usize,
        unsent: Arc<AtomicUsize>,
        connected: Arc<AtomicBool>,
        /// Set by the thread when it wakes the reactor, cleared by the
        /// reactor before it takes events: one wake-up for all the events
        /// that come while it is busy.
        woken: Arc<AtomicBool>,
        /// Stops the thread even while a publish waits for a connection
        /// that does not come.
        stop: Arc<tokio::sync::Notify>,
        thread: Option<thread::JoinHandle<()>>,
    }

    /// Work for the bus thread.
    #[derive(Debug)]
    enum Command {
        /// Payloads to publish, each on its subject, in order.
        Publish(Vec<Payload>),
    }

    /// Bus messages packed for one subject.
    #[derive(Debug)]
    struct Payload {
        subject: String,
        bytes: Vec<u8>,
        /// How many messages it holds (each counted in `unsent`).
        messages: usize,
    }

    /// Everything the bus thread's tasks share.
    #[derive(Clone)]
    struct Shared {
        events: mpsc::Sender<BusEvent>,
        poller: Arc<Poller>,
        connected: Arc<AtomicBool>,
        woken: Arc<AtomicBool>,
    }

    impl Shared {
        /// Hands `event` to the reactor, waiting while it is
        /// [`EVENT_CAPACITY`] behind, and wakes it. False once the
        /// reactor's side is gone.
        async fn send(&self, event: BusEvent) -> bool {
            let sent = self.events.send(event).await.is_ok();
            // Not woken yet since the reactor last looked: wake it. (A
            // failed wake-up leaves the event for the next turn.)
            if sent && !self.woken.swap(true, Ordering::AcqRel) {
                let _ = self.poller.notify();
            }
            sent
        }
    }

    impl Bus {
        /// Starts the bus thread, which connects to `url` (in the
        /// background, retrying until it can: the caller learns of it by
        /// [`BusEvent::Connected`]) as client `name`, and subscribes to
        /// `subjects`. Each event wakes `poller`.
        ///
        /// Fails only if the thread or its runtime cannot be made.
        pub fn start(
            url: &BusUrl,
            name: &str,
            subjects: Vec<String>,
            poller: Arc<Poller>,
        ) -> std::io::Result<Bus> {
            let (command_tx, command_rx) = mpsc::unbounded_channel();
            let (event_tx, event_rx) = mpsc::channel(EVENT_CAPACITY);
            let unsent = Arc::new(AtomicUsize::new(0));
            let connected = Arc::new(AtomicBool::new(false));
            let woken = Arc::new(AtomicBool::new(false));
            let shared = Shared {
                events: event_tx,
                poller,
                connected: connected.clone(),
                woken: woken.clone(),
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let servers = url.servers().to_vec();
            let name = name.to_owned();
            let stop = Arc::new(tokio::sync::Notify::new());
            let (thread_unsent, thread_stop) = (unsent.clone(), stop.clone());
            let thread = thread::Builder::new().name("bus".into()).spawn(move || {
                let work = run(
                    servers,
                    name,
                    subjects,
                    shared,
                    command_rx,
                    thread_unsent,
                    thread_stop,
                );
                runtime.block_on(work);
            })?;
            Ok(Bus {
                commands: command_tx,
                events: event_rx,
                batch: Vec::new(),
                scratch: Vec::new(),
                batched: 0,
                unsent,
                connected,
                woken,
                stop,
                thread: Some(thread),
            })
        }

        /// Publishes `message` on `subject`, without waiting: the bus
        /// thread hands it to NATS once [`Bus::flush`] hands it over (the
        /// reactor does at the end of each wake-up), packed with the
        /// others for `subject`, in the order published. Core NATS
        /// delivers at most once, so whoever needs it to arrive must wait
        /// for an answer.
        pub fn publish(
            &mut self,
            subject: &str,
            message: &chatproto::BusMessage,
        ) -> Result<(), PublishError> {
            if self.commands.is_closed() {
                return Err(PublishError::Stopped);
            }
            if self.unsent.load(Ordering::Relaxed) >= MAX_UNSENT_PUBLISHES {
                return Err(PublishError::Backlog);
            }
            self.unsent.fetch_add(1, Ordering::Relaxed);
            self.scratch.clear();
            message.encode_into(&mut self.scratch);
            // The newest payload for the subject takes it if it fits; the
            // payloads of one subject stay in the order made.
            let open = self
                .batch
                .iter_mut()
                .rev()
                .find(|payload| payload.subject == subject)
                .filter(|payload| {
                    payload.bytes.len() + 1 + self.scratch.len() <= MAX_PAYLOAD_BYTES
                });
            match open {
                Some(payload) => {
                    payload.bytes.push(b'\n');
                    payload.bytes.extend_from_slice(&self.scratch);
                    payload.messages += 1;
                }
                None => self.batch.push(Payload {
                    subject: subject.to_owned(),
                    bytes: self.scratch.clone(),
                    messages: 1,
                }),
            }
            self.batched += 1;
            if self.batched >= FLUSH_EVERY {
                // A wake-up that publishes this much hands it over as it
                // goes, so the thread sends while the reactor works.
                self.flush();
            }
            Ok(())
        }

        /// Hands the thread what was published since the last flush, in
        /// one go.
        pub fn flush(&mut self) {
            if self.batch.is_empty() {
                return;
            }
            let batch = std::mem::take(&mut self.batch);
            let count = std::mem::take(&mut self.batched);
            if self.commands.send(Command::Publish(batch)).is_err() {
                self.unsent.fetch_sub(count, Ordering::Relaxed);
            }
        }

        /// The next event, if one has come; never waits. The first call of
        /// a wake-up lets the thread wake the reactor again for what comes
        /// after.
        pub fn next_event(&mut self) -> Option<BusEvent> {
            self.woken.store(false, Ordering::Release);
            self.events.try_recv().ok()
        }

        /// Whether the connection to NATS is up now.
        pub fn is_connected(&self) -> bool {
            self.connected.load(Ordering::Relaxed)
        }

        /// Publishes not yet handed to NATS.
        pub fn unsent(&self) -> usize {
            self.unsent.load(Ordering::Relaxed)
        }

        /// Hands NATS what is published (waiting up to 2 s for it, if
        /// the connection is up), closes the connection and ends the
        /// thread.
        pub fn stop(mut self) {
            self.shut_down();
        }

        fn shut_down(&mut self) {
            self.flush();
            if let Some(thread) = self.thread.take() {
                // A permit: the thread sees it even if it is not waiting
                // yet. It then ends within twice STOP_FLUSH.
                self.stop.notify_one();
                let _ = thread.join();
            }
        }
    }

    impl Drop for Bus {
        fn drop(&mut self) {
            self.shut_down();
        }
    }

    /// The bus thread: connect, subscribe and publish until stopped (even
    /// in the middle of a publish that waits for a connection), then hand
    /// NATS what the client holds if it can within [`STOP_FLUSH`], and
    /// close.
    async fn run(
        servers: Vec<String>,
        name: String,
        subjects: Vec<String>,
        shared: Shared,
        commands: mpsc::UnboundedReceiver<Command>,
        unsent: Arc<AtomicUsize>,
        stop: Arc<tokio::sync::Notify>,
    ) {
        let Some(client) = connect(servers, name, &shared).await else {
            return;
        };
        let mut commands = commands;
        let work = serve(client.clone(), subjects, shared, &mut commands, unsent);
        futures_util::future::select(pin!(work), pin!(stop.notified())).await;
        // What the reactor published last (a shutdown's goodbyes) may still
        // be in the channel: hand it to the client, if the connection lets
        // it within the flush time.
        let last = async {
            while let Ok(Command::Publish(batch)) = commands.try_recv() {
                for Payload { subject, bytes, .. } in batch {
                    if client.publish(subject, Bytes::from(bytes)).await.is_err() {
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(STOP_FLUSH, last).await.is_err() {
            warn!("NATS did not take the last publishes within {STOP_FLUSH:?}");
        }
        if tokio::time::timeout(STOP_FLUSH, client.flush())
            .await
            .is_err()
        {
            warn!("NATS did not take the last publishes within {STOP_FLUSH:?}");
        }
        let _ = tokio::time::timeout(STOP_FLUSH, client.drain()).await;
    }

    /// The client, connecting in the background, its events forwarded.
    async fn connect(
        servers: Vec<String>,
        name: String,
        shared: &Shared,
    ) -> Option<async_nats::Client> {
        let on_event = shared.clone();
        let options = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .client_capacity(CLIENT_CAPACITY)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .event_callback(move |event| {
                let shared = on_event.clone();
                async move {
                    let event = match event {
                        async_nats::Event::Connected => {
                            shared.connected.store(true, Ordering::Relaxed);
                            BusEvent::Connected
                        }
                        async_nats::Event::Disconnected => {
                            shared.connected.store(false, Ordering::Relaxed);
                            BusEvent::Disconnected
                        }
                        async_nats::Event::Closed => {
                            shared.connected.store(false, Ordering::Relaxed);
                            return;
                        }
                        other => BusEvent::Warning(other.to_string()),
                    };
                    shared.send(event).await;
                }
            });
        let addresses: Vec<async_nats::ServerAddr> =
            servers.iter().filter_map(|s| s.parse().ok()).collect();
        match options.connect(addresses).await {
            Ok(client) => Some(client),
            Err(e) => {
                // With retry_on_initial_connect this is a bad option, not
                // an unreachable server; the addresses were checked before.
                let warning = format!("cannot start the NATS client: {e}");
                shared.send(BusEvent::Warning(warning)).await;
                None
            }
        }
    }

    /// Subscribes, then publishes what comes until the reactor's side is
    /// gone.
    async fn serve(
        client: async_nats::Client,
        subjects: Vec<String>,
        shared: Shared,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        unsent: Arc<AtomicUsize>,
    ) {
        for subject in subjects {
            match client.subscribe(subject.clone()).await {
                Ok(mut subscription) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        while let Some(message) = subscription.next().await {
                            let event = BusEvent::Message {
                                subject: message.subject.to_string(),
                                payload: message.payload,
                            };
                            if !shared.send(event).await {
                                break;
                            }
                        }
                    });
                }
                Err(e) => {
                    let warning = format!("cannot subscribe to {subject}: {e}");
                    shared.send(BusEvent::Warning(warning)).await;
                }
            }
        }
        while let Some(Command::Publish(batch)) = commands.recv().await {
            for Payload {
                subject,
                bytes,
                messages,
            } in batch
            {
                // Waits while the client's own buffer is full (the
                // connection is down): publishes queue behind, up to
                // MAX_UNSENT_PUBLISHES.
                if let Err(e) = client.publish(subject, Bytes::from(bytes)).await {
                    warn!("NATS publish failed: {e}");
                }
                unsent.fetch_sub(messages, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_show_without_secrets() {
        let url: BusUrl = "nats://a:4222, tls://user:pw@b:4223,c".parse().unwrap();
        assert_eq!(
            url.servers(),
            ["nats://a:4222", "tls://user:pw@b:4223", "c"]
        );
        assert_eq!(url.to_string(), "nats://a:4222,tls://user:***@b:4223,c");
        assert_eq!(
            format!("{url:?}"),
            "BusUrl(nats://a:4222,tls://user:***@b:4223,c)"
        );
        let token: BusUrl = "nats://s3cr3t@host".parse().unwrap();
        assert_eq!(token.to_string(), "nats://***@host");
        assert!(!format!("{token:?}").contains("s3cr3t"));
    }

    #[test]
    fn bad_addresses_are_named_without_secrets() {
        assert_eq!("".parse::<BusUrl>(), Err(BusUrlError::Empty));
        assert_eq!(" , ".parse::<BusUrl>(), Err(BusUrlError::Empty));
        let err = "http://u:secret@host".parse::<BusUrl>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "'http://u:***@host' is not a NATS server address \
             (scheme 'http': use nats://, tls://, ws:// or wss://)"
        );
        let err = "nats://u:secret@host:99999".parse::<BusUrl>().unwrap_err();
        assert!(err.to_string().contains("port '99999'"), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!("nats://".parse::<BusUrl>().is_err());
        assert!("nats://:4222".parse::<BusUrl>().is_err());
        assert!("nats://[::1]:4222".parse::<BusUrl>().is_ok());
    }
}
