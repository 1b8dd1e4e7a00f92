//! Passwords: a secret that cannot reach a log by accident, and the
//! stored hash of one.

use std::fmt;
use std::sync::Arc;

use subtle::ConstantTimeEq;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A password as typed by a user or read from a credentials file.
///
/// `Debug` and `Display` print `***`, so a password inside a `Command`, a
/// config or an error can be logged without leaking. It is one word: no
/// white space, no control characters, not empty (the inline form
/// `login <user> <password>` could not carry anything else).
///
/// ```
/// use chatproto::Password;
///
/// let p = Password::new("hunter2").unwrap();
/// assert_eq!(format!("{p:?}"), "***");
/// assert_eq!(p.expose(), "hunter2");
/// assert!(Password::new("two words").is_err());
/// ```
#[derive(Clone)]
pub struct Password(Box<str>);

/// Why a string is not a [`Password`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidPassword {
    /// The password is empty.
    #[error("a password cannot be empty")]
    Empty,
    /// The password holds white space or a control character.
    #[error("a password cannot hold white space or control characters")]
    BadCharacter,
}

impl Password {
    /// Checks `password` against the rules and wraps it.
    pub fn new(password: &str) -> Result<Self, InvalidPassword> {
        if password.is_empty() {
            return Err(InvalidPassword::Empty);
        }
        if password
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(InvalidPassword::BadCharacter);
        }
        Ok(Password(password.into()))
    }

    /// The secret itself. Call this only to check or transmit it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with `other` in time that depends only on the lengths, so
    /// that response timing does not reveal how much of a guess was right.
    pub fn matches(&self, other: &Password) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

/// A password hash in PHC string form, such as Argon2id's
/// `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`.
///
/// The core never computes or checks a hash itself: that costs
/// milliseconds of CPU, which a driver runs off its event loop. When a
/// login needs one checked, the core asks with
/// [`Output::VerifyPassword`](crate::Output::VerifyPassword) and takes the
/// verdict back with [`Server::handle_verification`](crate::Server::handle_verification).
/// Cloning is cheap.
///
/// ```
/// use chatproto::HashedPassword;
///
/// assert!(HashedPassword::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo").is_ok());
/// assert!(HashedPassword::new("plaintext").is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct HashedPassword(Arc<str>);

/// Why a string is not a [`HashedPassword`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a password hash in PHC string form ($<algorithm>$...)")]
pub struct InvalidHash;

impl HashedPassword {
    /// Wraps a PHC string. Only its shape is checked (`$` then an
    /// algorithm name, no white space): the driver that verifies it knows
    /// the algorithms it supports.
    pub fn new(phc: &str) -> Result<Self, InvalidHash> {
        let algorithm = phc
            .strip_prefix('$')
            .and_then(|rest| rest.split('$').next())
            .unwrap_or("");
        let shaped = !algorithm.is_empty()
            && algorithm
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && phc.len() <= 1024
            && !phc.chars().any(|c| c.is_whitespace() || c.is_control());
        if !shaped {
            return Err(InvalidHash);
        }
        Ok(HashedPassword(phc.into()))
    }

    /// The PHC string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for HashedPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The algorithm and parameters are not secret; the hash is not
        // needed in logs.
        let head: Vec<&str> = self.0.split('$').take(4).collect();
        write!(f, "HashedPassword({}$…)", head.join("$"))
    }
}

/// Equality is [`Password::matches`]: it takes the same time wherever the
/// first difference is.
impl PartialEq for Password {
    fn eq(&self, other: &Password) -> bool {
        self.matches(other)
    }
}

impl Eq for Password {}

impl std::str::FromStr for Password {
    type Err = InvalidPassword;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Password::new(s)
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Password {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Password {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Password::new(&s).map_err(serde::de::Error::custom)
    }
}
