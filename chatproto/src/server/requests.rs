//! Serving one request for one session: the rules of every command,
//! against the [`Hub`](super::hub::Hub)'s state.

use std::time::Duration;

use crate::accounts::{Credential, UserId};
use crate::cluster::BusMessage;
use crate::command::{Command, CommandName, DebugTarget};
use crate::durability::{Key, Undo};
use crate::error::RequestError;
use crate::ids::{ClaimId, ConnId, VerifyTicket};
use crate::offline::OfflineMessage;
use crate::password::Password;
use crate::peer::PeerKey;
use crate::request::{Request, RequestId};
use crate::routes::Route;
use crate::server_frame::{
    BroadcastFrame, ByeReason, CommandUsage, MessageFrame, PresenceFrame, Reply, ServerFrame,
};
use crate::stats::Tally;
use crate::store::Change;
use crate::text::MessageText;
use crate::time::{seconds_until, Timestamp};
use crate::username::Username;

use super::hub::{PendingLogin, DECOY_PASSWORD};
use super::outbox::{queue_frame, Drains};
use super::state::Server;
use crate::output::{Event, Output};

impl Server {
    pub(super) fn handle_frame(&mut self, conn: ConnId, frame: &[u8], now: Timestamp) {
        match Request::parse_frame(frame) {
            Ok(Request { id, command }) => {
                if let Err(error) = self.handle_command(conn, id, command, now) {
                    self.send_error(conn, id, &error);
                }
            }
            Err(rejected) => self.send_error(conn, rejected.id, &rejected.error),
        }
    }

    pub(super) fn handle_command(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        command: Command,
        now: Timestamp,
    ) -> Result<(), RequestError> {
        let me = self.sessions.get(conn).and_then(|c| c.user);
        if let Some(me) = me {
            // Their session, queue and blocks: every answer reads them.
            self.ledger.read(Key::User(me));
        }
        match (command, me) {
            (Command::Help, _) => {
                self.help(conn, id);
                Ok(())
            }
            (Command::Login { user, password }, _) => self.login(conn, id, user, password, now),
            (Command::Logout, _) => {
                self.reply(conn, id, Reply::Logout, "goodbye".to_owned());
                self.say_bye(conn, ByeReason::Logout, now);
                Ok(())
            }
            (_, None) => Err(RequestError::NotLoggedIn),
            (Command::Message { to, text }, Some(me)) => self.message(conn, id, me, to, text, now),
            (Command::Broadcast { text }, Some(me)) => {
                self.broadcast(conn, id, me, text, now);
                Ok(())
            }
            (Command::Whoami, Some(me)) => {
                let user = self.hub.accounts.name(me).clone();
                let session = self
                    .sessions
                    .get(conn)
                    .map(|c| c.session)
                    .unwrap_or_default();
                let text = format!("you are {user} (session {session})");
                self.reply(conn, id, Reply::Whoami { user, session }, text);
                Ok(())
            }
            (Command::Whoelse, Some(me)) => {
                self.ledger.read(Key::Online);
                let online = self.hub.presence.online().iter().copied();
                let users = self.visible_users(me, online.chain(self.hub.directory.users()));
                let text = list_text("online now", &users);
                self.reply(conn, id, Reply::Whoelse { users }, text);
                Ok(())
            }
            (Command::Whoelsesince { seconds }, Some(me)) => {
                self.ledger.read(Key::Online);
                let since = now.saturating_sub(Duration::from_secs(seconds));
                let candidates = self.hub.accounts.ids().filter(|&u| {
                    self.hub.presence.seen_since(u, since)
                        || self.hub.directory.node_of(u).is_some()
                });
                let users = self.visible_users(me, candidates);
                let text = list_text(&format!("online in the last {seconds} s"), &users);
                self.reply(conn, id, Reply::Whoelsesince { users }, text);
                Ok(())
            }
            (Command::Block { user }, Some(me)) => self.block(conn, id, me, user),
            (Command::Unblock { user }, Some(me)) => self.unblock(conn, id, me, user),
            (
                Command::Debug {
                    target: DebugTarget::Server,
                },
                Some(me),
            ) => {
                if !self.config.admins.contains(self.hub.accounts.name(me)) {
                    return Err(RequestError::Forbidden {
                        what: "debug server",
                    });
                }
                self.ledger.read_all();
                let state = self.debug_state(now);
                let text = format!(
                    "{}, {} online, {} queued, {} locked, up {} s",
                    count(state.connections, "connection"),
                    count(state.users_online, "user"),
                    count(state.queued_offline_messages, "offline message"),
                    count(state.locked_accounts, "account"),
                    state.uptime_secs
                );
                self.reply(conn, id, Reply::Debug { state }, text);
                Ok(())
            }
            (
                Command::Debug {
                    target: DebugTarget::Client,
                },
                Some(_),
            ) => Err(RequestError::bad_arguments(
                "the server answers 'debug server'; 'debug client' is answered by your client",
            )),
        }
    }

    pub(super) fn help(&mut self, conn: ConnId, id: Option<RequestId>) {
        let commands = CommandName::ALL
            .into_iter()
            .map(|cmd| CommandUsage {
                cmd,
                usage: cmd.usage().to_owned(),
            })
            .collect::<Vec<_>>();
        let text = format!(
            "commands: {}",
            commands
                .iter()
                .map(|c| c.usage.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.reply(conn, id, Reply::Help { commands }, text);
    }

    pub(super) fn login(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        name: Username,
        password: Password,
        now: Timestamp,
    ) -> Result<(), RequestError> {
        if let Some(me) = self.sessions.get(conn).and_then(|c| c.user) {
            return Err(RequestError::AlreadyLoggedIn {
                user: self.hub.accounts.name(me).clone(),
            });
        }
        let peer = self
            .sessions
            .get(conn)
            .map_or(PeerKey::UNSPECIFIED, |c| c.peer);
        if let Some(rate) = self.config.login_rate_per_peer {
            if !self.hub.peers.take_login(peer, rate, now) {
                return self.refuse_login(conn, &name, RequestError::RateLimited);
            }
        }
        let account = self.hub.accounts.id(name.as_str());
        self.ledger.read(Key::Name(&name));
        if let Some(account) = account {
            self.ledger.read(Key::User(account));
        }
        let rate = self.config.login_rate_per_name;
        match self
            .hub
            .lockout
            .take_attempt(&name, account.is_some(), rate, now)
        {
            Ok(true) => {}
            Ok(false) => return self.refuse_login(conn, &name, RequestError::RateLimited),
            // Every name tried is tracked; with no room for one more, a new
            // name waits, account or not.
            Err(_) => return self.refuse_login(conn, &name, RequestError::Unavailable),
        }
        if let Some(until) = self.hub.lockout.locked_until(name.as_str(), now) {
            return self.refuse_locked(conn, &name, until, false, now);
        }
        let mut plain_verdict = None;
        let hash = match account.map(|a| self.hub.accounts.get(a).credential()) {
            Some(Credential::Plain(stored)) => {
                let ok = stored.matches(&password);
                match self.hub.accounts.decoy() {
                    // Hashed accounts beside it: an unknown name costs an
                    // Argon2id check, so must a wrong password here, or
                    // timing tells the two apart. The decoy check only
                    // takes the time; the verdict is known.
                    Some(decoy) if !ok => {
                        plain_verdict = Some(false);
                        decoy.clone()
                    }
                    _ => return self.finish_login(conn, id, name, account, ok, now),
                }
            }
            Some(Credential::Hashed(hash)) => hash.clone(),
            // No such account: as costly as a wrong password, so timing
            // does not tell names apart.
            None => match self.hub.accounts.decoy() {
                Some(decoy) => decoy.clone(),
                None => {
                    let _ = DECOY_PASSWORD.matches(&password);
                    return self.finish_login(conn, id, name, None, false, now);
                }
            },
        };
        let peer_full = self
            .config
            .max_pending_checks_per_peer
            .is_some_and(|max| self.hub.peers.pending_checks(peer) as usize >= max);
        if self.hub.verifications.len() >= self.config.max_pending_checks || peer_full {
            // Checks are queued faster than the driver runs them: refuse
            // rather than let the queue (and every login's wait) grow.
            return self.refuse_login(conn, &name, RequestError::Unavailable);
        }
        self.hub.peers.check_started(peer);
        let ticket = VerifyTicket(self.hub.next_ticket);
        self.hub.next_ticket += 1;
        if let Some(c) = self.sessions.get_mut(conn) {
            c.awaiting = Some(ticket);
        }
        self.hub.verifications.insert(
            ticket,
            PendingLogin {
                conn,
                peer,
                id,
                name,
                account,
                plain_verdict,
                stale: false,
            },
        );
        self.outputs.push_back(Output::VerifyPassword {
            ticket,
            peer,
            hash,
            password,
        });
        Ok(())
    }

    /// Counts a failed login for `name` (`known`: an account has it) and
    /// records the change; returns when the lock ends if this failure set
    /// one.
    pub(super) fn count_failure(
        &mut self,
        name: &Username,
        known: bool,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let rate = self.config.login_rate_per_name;
        let before = self.hub.lockout.state(name.as_str());
        let state = self.hub.lockout.record_failure(name, known, rate, now);
        let failed = name.clone();
        self.publish(|node| BusMessage::LoginFailed {
            node,
            user: failed,
            at: now,
        });
        // Stored for every name, so a restart does not tell them apart.
        self.ledger.record(
            Change::LockoutChanged {
                user: name.clone(),
                state,
            },
            Undo::Lockout {
                name: name.clone(),
                before,
            },
            &[Key::Name(name)],
        );
        let until = state.locked_until?;
        self.event(Event::Locked {
            user: name.clone(),
            until,
        });
        Some(until)
    }

    /// Refuses a login for `name`, locked until `until` (`just_locked`: by
    /// this very attempt).
    pub(super) fn refuse_locked(
        &mut self,
        conn: ConnId,
        name: &Username,
        until: Timestamp,
        just_locked: bool,
        now: Timestamp,
    ) -> Result<(), RequestError> {
        let error = RequestError::AccountLocked {
            retry_after: seconds_until(until, now),
            just_locked,
        };
        self.refuse_login(conn, name, error)
    }

    /// The rest of a login, once the password is checked.
    pub(super) fn finish_login(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        name: Username,
        account: Option<UserId>,
        password_ok: bool,
        now: Timestamp,
    ) -> Result<(), RequestError> {
        let Some(user) = account.filter(|_| password_ok) else {
            return match self.count_failure(&name, account.is_some(), now) {
                Some(until) => self.refuse_locked(conn, &name, until, true, now),
                None => self.refuse_login(conn, &name, RequestError::InvalidCredentials),
            };
        };
        let rate = self.config.login_rate_per_name;
        let before = self.hub.lockout.state(name.as_str());
        if self.hub.lockout.record_success(&name, rate, now) {
            self.ledger.record(
                Change::LockoutCleared { user: name.clone() },
                Undo::Lockout {
                    name: name.clone(),
                    before,
                },
                &[Key::Name(&name)],
            );
        }
        if self.hub.presence.session(user).is_some() || self.hub.claiming.contains_key(&user) {
            let error = RequestError::SessionElsewhere { user: name.clone() };
            return self.refuse_login(conn, &name, error);
        }
        if self.node().is_some() {
            // One session per user in the whole cluster: the cluster's
            // database decides.
            self.start_claim(conn, id, name, user);
            return Ok(());
        }
        self.log_in(conn, id, name, user, None, now);
        Ok(())
    }

    /// Makes `user` (`name`) online on `conn`, whose session `claim`
    /// made in cluster mode, and answers the login.
    pub(super) fn log_in(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        name: Username,
        user: UserId,
        claim: Option<ClaimId>,
        now: Timestamp,
    ) {
        if let Some(c) = self.sessions.get_mut(conn) {
            c.user = Some(user);
            c.claim = claim;
        }
        let last_seen = self.hub.presence.last_seen(user);
        self.hub.presence.log_in(user, conn);
        self.hub.directory.forget(user);
        self.ledger.record(
            Change::LoggedIn {
                user: name.clone(),
                at: now,
            },
            Undo::LoggedIn {
                user,
                conn,
                last_seen,
            },
            &[Key::User(user), Key::Online],
        );
        self.tally(Tally::LoginOk);
        self.reply(
            conn,
            id,
            Reply::Login { user: name.clone() },
            format!("welcome, {name}"),
        );
        self.start_drain(conn, user);
        if self.ledger.enabled() && self.is_draining(conn) {
            // The answer goes out with the first page, as one write.
            self.first_page_for = Some(conn);
        }
        self.announce(user, true);
        let user_name = name.clone();
        self.publish(|node| BusMessage::Online {
            node,
            user: user_name,
        });
        self.event(Event::LoggedIn { conn, user: name });
    }

    /// Logs a refused login and returns its error, to be answered.
    pub(super) fn refuse_login(
        &mut self,
        conn: ConnId,
        name: &Username,
        error: RequestError,
    ) -> Result<(), RequestError> {
        self.login_refusal = Some(error.code());
        self.event(Event::LoginRefused {
            conn,
            user: name.clone(),
            code: error.code(),
        });
        Err(error)
    }

    pub(super) fn message(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        me: UserId,
        to: Username,
        text: MessageText,
        now: Timestamp,
    ) -> Result<(), RequestError> {
        let recipient = self
            .hub
            .accounts
            .id(to.as_str())
            .ok_or_else(|| RequestError::unknown_user(to.as_str()))?;
        if recipient == me {
            return Err(RequestError::SelfTarget { action: "message" });
        }
        self.ledger.read(Key::User(recipient));
        if self.hub.blocks.has_blocked(recipient, me) {
            return Err(RequestError::Blocked { user: to });
        }
        let from = self.hub.accounts.name(me).clone();
        // While their queue is not empty (being handed over, or waiting to
        // be), a message joins its end, so it never overtakes older ones.
        let online = self.hub.presence.session(recipient).filter(|&their_conn| {
            self.hub.offline.size(recipient).messages == 0 && !self.is_draining(their_conn)
        });
        let stored = match online {
            Some(their_conn) => {
                let frame = ServerFrame::Message(MessageFrame {
                    from,
                    text,
                    sent_at: now,
                    offline: false,
                });
                self.send(their_conn, &frame);
                false
            }
            None => {
                if let Some(node) = self.route_for(recipient) {
                    // Online on another node: sent there, and answered
                    // when that node says what became of it.
                    let route = Route::new(conn, id, me, recipient, to, text, now, node);
                    self.start_route(route, now);
                    return Ok(());
                }
                let message = OfflineMessage {
                    from,
                    text,
                    sent_at: now,
                };
                self.queue_offline(recipient, &to, message)?;
                true
            }
        };
        self.answer_message(conn, id, to, stored);
        Ok(())
    }

    /// Queues `message` for `recipient` (named `to`), durably.
    pub(super) fn queue_offline(
        &mut self,
        recipient: UserId,
        to: &Username,
        message: OfflineMessage,
    ) -> Result<(), RequestError> {
        if !self.hub.accounts.is_held(recipient) {
            // Removed while the message was on its way (to another node,
            // which did not take it): nobody to keep it for.
            return Err(RequestError::unknown_user(to.as_str()));
        }
        let bytes = message.size();
        self.hub
            .offline
            .push(recipient, message.clone())
            .map_err(|limit| RequestError::MailboxFull {
                user: to.clone(),
                limit,
            })?;
        if let Some(meanwhile) = self.hub.claiming.get_mut(&recipient) {
            // Its login's claim may not count it: the login adds it.
            meanwhile.messages += 1;
            meanwhile.bytes += bytes;
        }
        self.note_stored(recipient);
        self.ledger.record(
            Change::MessageQueued {
                to: to.clone(),
                message,
            },
            Undo::Queued {
                to: recipient,
                bytes,
            },
            &[Key::User(recipient)],
        );
        Ok(())
    }

    /// The `ok` for a direct message to `to`: delivered, or `stored`.
    pub(super) fn answer_message(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        to: Username,
        stored: bool,
    ) {
        self.tally(if stored {
            Tally::MessageStored
        } else {
            Tally::MessageDelivered
        });
        let text = if stored {
            format!("{to} is offline: the message will be delivered when they log in")
        } else {
            let mut text = String::with_capacity(21 + to.as_str().len());
            text.push_str("message delivered to ");
            text.push_str(to.as_str());
            text
        };
        self.reply(conn, id, Reply::Message { to, stored }, text);
    }

    pub(super) fn broadcast(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        me: UserId,
        text: MessageText,
        now: Timestamp,
    ) {
        self.ledger.read(Key::Online);
        let from = self.hub.accounts.name(me).clone();
        let frame = ServerFrame::Broadcast(BroadcastFrame {
            from: from.clone(),
            text: text.clone(),
            sent_at: now,
        });
        let (mut delivered, mut skipped) = self.deliver_broadcast(me, &frame);
        if self.node().is_some() {
            // The other nodes' users: counted here from the directory, as
            // their nodes will deliver (the same block rule, the same
            // blocks: every node knows every block).
            let blockers = self.hub.blocks.blockers_of(me);
            for user in self.hub.directory.users() {
                if blockers.contains(&user) {
                    skipped += 1;
                } else {
                    delivered += 1;
                }
            }
            self.publish(|node| BusMessage::Broadcast {
                node,
                from,
                text,
                sent_at: now,
            });
        }
        let mut text = format!("broadcast delivered to {}", count(delivered, "user"));
        if skipped > 0 {
            text += &format!(
                "; it could not be delivered to {} who blocked you",
                count(skipped, "recipient")
            );
        }
        self.tally(Tally::Broadcast);
        self.reply(conn, id, Reply::Broadcast { delivered, skipped }, text);
    }

    pub(super) fn block(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        me: UserId,
        user: Username,
    ) -> Result<(), RequestError> {
        let target = self.target(me, &user, "block")?;
        if self.hub.blocks.block(me, target) {
            self.ledger.record(
                Change::Blocked {
                    blocker: self.hub.accounts.name(me).clone(),
                    target: user.clone(),
                },
                Undo::Blocked {
                    blocker: me,
                    target,
                },
                &[Key::User(me), Key::User(target)],
            );
            let (blocker, target) = (self.hub.accounts.name(me).clone(), user.clone());
            self.publish(|node| BusMessage::Blocked {
                node,
                blocker,
                target,
            });
        }
        let text = format!("{user} is blocked");
        self.reply(conn, id, Reply::Block { user }, text);
        Ok(())
    }

    pub(super) fn unblock(
        &mut self,
        conn: ConnId,
        id: Option<RequestId>,
        me: UserId,
        user: Username,
    ) -> Result<(), RequestError> {
        let target = self.target(me, &user, "unblock")?;
        if !self.hub.blocks.unblock(me, target) {
            return Err(RequestError::NotBlocked { user });
        }
        self.ledger.record(
            Change::Unblocked {
                blocker: self.hub.accounts.name(me).clone(),
                target: user.clone(),
            },
            Undo::Unblocked {
                blocker: me,
                target,
            },
            &[Key::User(me), Key::User(target)],
        );
        let (blocker, target) = (self.hub.accounts.name(me).clone(), user.clone());
        self.publish(|node| BusMessage::Unblocked {
            node,
            blocker,
            target,
        });
        let text = format!("{user} is unblocked");
        self.reply(conn, id, Reply::Unblock { user }, text);
        Ok(())
    }

    /// The account `user` names, refusing unknown names and oneself.
    pub(super) fn target(
        &mut self,
        me: UserId,
        user: &Username,
        action: &'static str,
    ) -> Result<UserId, RequestError> {
        let target = self
            .hub
            .accounts
            .id(user.as_str())
            .ok_or_else(|| RequestError::unknown_user(user.as_str()))?;
        if target == me {
            return Err(RequestError::SelfTarget { action });
        }
        self.ledger.read(Key::User(target));
        Ok(target)
    }

    /// The names among `candidates` that `me` may see: not `me`, and not
    /// anyone who has blocked `me`. Sorted.
    pub(super) fn visible_users(
        &self,
        me: UserId,
        candidates: impl Iterator<Item = UserId>,
    ) -> Vec<Username> {
        let blockers = self.hub.blocks.blockers_of(me);
        let mut users: Vec<Username> = candidates
            .filter(|u| *u != me && !blockers.contains(u))
            .map(|u| self.hub.accounts.name(u).clone())
            .collect();
        users.sort_unstable();
        users
    }

    /// Tells everyone online, except whom `user` has blocked, that `user`
    /// came or went.
    pub(super) fn announce(&mut self, user: UserId, online: bool) {
        self.ledger.read(Key::User(user));
        self.ledger.read(Key::Online);
        let frame = ServerFrame::Presence(PresenceFrame {
            user: self.hub.accounts.name(user).clone(),
            online,
        })
        .encode();
        let in_unit = self.tallies_wait();
        let mut sent = 0;
        let blocked = self.hub.blocks.targets_of(user);
        for &other in self.hub.presence.online() {
            if other == user || blocked.contains(&other) {
                continue;
            }
            if let Some(conn) = self.hub.presence.session(other) {
                // (`tally`, with the fields apart from `blocked`; outside
                // a durable unit, counted once below.)
                if in_unit {
                    self.unit_tallies
                        .push((self.outputs.len(), Tally::Presence));
                } else {
                    sent += 1;
                }
                let drains = Drains {
                    sessions: &mut self.sessions,
                    closing: &mut self.closing_drains,
                    draining: self.draining,
                };
                let frame = frame.clone();
                queue_frame(&mut self.outputs, drains, &self.ledger, true, conn, frame);
            }
        }
        self.stats.presence_frames += sent;
    }
}

/// "1 user", "2 users".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// "online now: alice, bob" or "online now: nobody else".
fn list_text(what: &str, users: &[Username]) -> String {
    if users.is_empty() {
        return format!("{what}: nobody else");
    }
    let names: Vec<&str> = users.iter().map(Username::as_str).collect();
    format!("{what}: {}", names.join(", "))
}
