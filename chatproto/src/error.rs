//! The protocol's error codes, and the typed error behind each one.
//!
//! [`ErrorCode`] is what goes on the wire; [`RequestError`] is the error the
//! core (and the parser) produce, one variant per code, carrying the details
//! that make its human-readable text specific.

use serde::{Deserialize, Serialize};

use crate::username::Username;

/// The `code` of an `error` frame.
///
/// ```
/// use chatproto::ErrorCode;
///
/// assert_eq!(ErrorCode::MailboxFull.as_str(), "mailbox_full");
/// assert_eq!("account_locked".parse::<ErrorCode>(), Ok(ErrorCode::AccountLocked));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not UTF-8, or a `{` frame that is not a valid request object.
    BadFrame,
    /// A line longer than the frame limit.
    FrameTooLarge,
    /// The command word is not one the server knows.
    UnknownCommand,
    /// The command's arguments are missing or invalid.
    BadArguments,
    /// The command needs a logged-in session.
    NotLoggedIn,
    /// `login` on a connection that is already logged in.
    AlreadyLoggedIn,
    /// The user is logged in on another connection.
    SessionElsewhere,
    /// Wrong user name or password.
    InvalidCredentials,
    /// Too many failed logins: the name is locked for a while.
    AccountLocked,
    /// No such user.
    UnknownUser,
    /// A command aimed at oneself where that makes no sense.
    SelfTarget,
    /// The recipient has blocked the sender.
    Blocked,
    /// `unblock` of a user who is not blocked.
    NotBlocked,
    /// The command is for administrators.
    Forbidden,
    /// Too many requests in too short a time.
    RateLimited,
    /// The recipient's offline queue is full.
    MailboxFull,
    /// The server cannot do this now (its storage failed, or too many
    /// logins are waiting for a password check), so it did not happen; try
    /// again later.
    Unavailable,
    /// A code this version does not know (sent by a newer server). Never
    /// sent by this crate.
    #[serde(other)]
    Unrecognized,
}

impl ErrorCode {
    /// Every code this version sends.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnknownCommand,
        ErrorCode::BadArguments,
        ErrorCode::NotLoggedIn,
        ErrorCode::AlreadyLoggedIn,
        ErrorCode::SessionElsewhere,
        ErrorCode::InvalidCredentials,
        ErrorCode::AccountLocked,
        ErrorCode::UnknownUser,
        ErrorCode::SelfTarget,
        ErrorCode::Blocked,
        ErrorCode::NotBlocked,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::MailboxFull,
        ErrorCode::Unavailable,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::BadArguments => "bad_arguments",
            ErrorCode::NotLoggedIn => "not_logged_in",
            ErrorCode::AlreadyLoggedIn => "already_logged_in",
            ErrorCode::SessionElsewhere => "session_elsewhere",
            ErrorCode::InvalidCredentials => "invalid_credentials",
            ErrorCode::AccountLocked => "account_locked",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::SelfTarget => "self_target",
            ErrorCode::Blocked => "blocked",
            ErrorCode::NotBlocked => "not_blocked",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::MailboxFull => "mailbox_full",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unrecognized => "unrecognized",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = ();

    /// Parses a code this version sends; anything else is `Err(())`.
    fn from_str(s: &str) -> Result<Self, ()> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or(())
    }
}

/// A request the server refuses, with the reason. Each variant is exactly
/// one [`ErrorCode`]; its `Display` is the `text` of the `error` frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// See [`ErrorCode::BadFrame`].
    #[error("bad frame: {reason}")]
    BadFrame {
        /// What is wrong with it.
        reason: String,
    },
    /// See [`ErrorCode::FrameTooLarge`].
    #[error("frame too large: a line may hold at most {limit} bytes")]
    FrameTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// See [`ErrorCode::UnknownCommand`].
    #[error("unknown command {command:?}: type 'help' for the list")]
    UnknownCommand {
        /// The command word received (shortened if long).
        command: String,
    },
    /// See [`ErrorCode::BadArguments`].
    #[error("{reason}")]
    BadArguments {
        /// What is wrong, with the usage where it helps.
        reason: String,
    },
    /// See [`ErrorCode::NotLoggedIn`].
    #[error("you must log in first: login <user> <password>")]
    NotLoggedIn,
    /// See [`ErrorCode::AlreadyLoggedIn`].
    #[error("already logged in as {user}")]
    AlreadyLoggedIn {
        /// Who this connection is logged in as.
        user: Username,
    },
    /// See [`ErrorCode::SessionElsewhere`].
    #[error("{user} is already logged in elsewhere")]
    SessionElsewhere {
        /// The user in question.
        user: Username,
    },
    /// See [`ErrorCode::InvalidCredentials`].
    #[error("invalid user name or password")]
    InvalidCredentials,
    /// See [`ErrorCode::AccountLocked`].
    #[error("{}account locked after too many failed logins: try again in {retry_after} s", if *.just_locked { "invalid user name or password; " } else { "" })]
    AccountLocked {
        /// Whole seconds until the lock ends.
        retry_after: u64,
        /// This very attempt failed and set the lock.
        just_locked: bool,
    },
    /// See [`ErrorCode::UnknownUser`].
    #[error("no such user: {user}")]
    UnknownUser {
        /// The name asked for.
        user: String,
    },
    /// See [`ErrorCode::SelfTarget`].
    #[error("you cannot {action} yourself")]
    SelfTarget {
        /// What was attempted ("message", "block", ...).
        action: &'static str,
    },
    /// See [`ErrorCode::Blocked`].
    #[error("{user} has blocked you: your message was not delivered")]
    Blocked {
        /// The recipient.
        user: Username,
    },
    /// See [`ErrorCode::NotBlocked`].
    #[error("{user} is not blocked")]
    NotBlocked {
        /// The user named.
        user: Username,
    },
    /// See [`ErrorCode::Forbidden`].
    #[error("only administrators may use {what}")]
    Forbidden {
        /// The command refused.
        what: &'static str,
    },
    /// See [`ErrorCode::RateLimited`].
    #[error("too many requests: slow down")]
    RateLimited,
    /// See [`ErrorCode::MailboxFull`].
    #[error("{user}'s offline mailbox is full ({limit}): try again later")]
    MailboxFull {
        /// The recipient.
        user: Username,
        /// The cap the message ran into.
        limit: crate::offline::MailboxLimit,
    },
    /// See [`ErrorCode::Unavailable`].
    #[error("the server cannot do this now, so it did not happen: try again later")]
    Unavailable,
}

impl RequestError {
    /// The wire code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::BadFrame { .. } => ErrorCode::BadFrame,
            RequestError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            RequestError::UnknownCommand { .. } => ErrorCode::UnknownCommand,
            RequestError::BadArguments { .. } => ErrorCode::BadArguments,
            RequestError::NotLoggedIn => ErrorCode::NotLoggedIn,
            RequestError::AlreadyLoggedIn { .. } => ErrorCode::AlreadyLoggedIn,
            RequestError::SessionElsewhere { .. } => ErrorCode::SessionElsewhere,
            RequestError::InvalidCredentials => ErrorCode::InvalidCredentials,
            RequestError::AccountLocked { .. } => ErrorCode::AccountLocked,
            RequestError::UnknownUser { .. } => ErrorCode::UnknownUser,
            RequestError::SelfTarget { .. } => ErrorCode::SelfTarget,
            RequestError::Blocked { .. } => ErrorCode::Blocked,
            RequestError::NotBlocked { .. } => ErrorCode::NotBlocked,
            RequestError::Forbidden { .. } => ErrorCode::Forbidden,
            RequestError::RateLimited => ErrorCode::RateLimited,
            RequestError::MailboxFull { .. } => ErrorCode::MailboxFull,
            RequestError::Unavailable => ErrorCode::Unavailable,
        }
    }

    /// `retry_after` for the error frame, where the code carries one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            RequestError::AccountLocked { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    pub(crate) fn bad_frame(reason: impl Into<String>) -> Self {
        RequestError::BadFrame {
            reason: reason.into(),
        }
    }

    pub(crate) fn bad_arguments(reason: impl Into<String>) -> Self {
        RequestError::BadArguments {
            reason: reason.into(),
        }
    }

    pub(crate) fn unknown_command(word: &str) -> Self {
        RequestError::UnknownCommand {
            command: shorten(word, 32),
        }
    }

    pub(crate) fn unknown_user(name: &str) -> Self {
        RequestError::UnknownUser {
            user: shorten(name, crate::username::MAX_USERNAME_LEN),
        }
    }
}

/// At most `max` characters of `s`, with an ellipsis when cut: input echoed
/// back in an error must not grow the answer to the size of the frame.
pub(crate) fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}
