//! User names: what a valid one is (rule 13 of the protocol).

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest user name, in characters.
pub const MAX_USERNAME_LEN: usize = 32;

/// A valid user name: 1 to 32 ASCII letters, digits, `_`, `.` or `-`.
///
/// Names are case-sensitive. Cloning is cheap (the text is shared), so the
/// core hands names around freely.
///
/// ```
/// use chatproto::Username;
///
/// let bob: Username = "bob.smith-2".parse().unwrap();
/// assert_eq!(bob.as_str(), "bob.smith-2");
/// assert!("bob smith".parse::<Username>().is_err());
/// assert!("".parse::<Username>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Username(Arc<str>);

/// Why a string is not a [`Username`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidUsername {
    /// The string is empty.
    #[error("a user name cannot be empty")]
    Empty,
    /// The string is longer than [`MAX_USERNAME_LEN`].
    #[error("a user name has at most {MAX_USERNAME_LEN} characters")]
    TooLong,
    /// The string holds a character outside the allowed set.
    #[error("a user name may only hold letters, digits, '_', '.' and '-' (found {0:?})")]
    BadCharacter(char),
}

impl Username {
    /// Checks `name` against the rules and wraps it.
    pub fn new(name: &str) -> Result<Self, InvalidUsername> {
        validate(name)?;
        Ok(Username(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a candidate name without allocating.
pub(crate) fn validate(name: &str) -> Result<(), InvalidUsername> {
    if name.is_empty() {
        return Err(InvalidUsername::Empty);
    }
    if let Some(c) = name.chars().find(|&c| !is_name_char(c)) {
        return Err(InvalidUsername::BadCharacter(c));
    }
    // Every allowed character is one byte, so bytes count characters here.
    if name.len() > MAX_USERNAME_LEN {
        return Err(InvalidUsername::TooLong);
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

impl std::str::FromStr for Username {
    type Err = InvalidUsername;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Username::new(s)
    }
}

impl TryFrom<&str> for Username {
    type Error = InvalidUsername;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Username::new(s)
    }
}

impl AsRef<str> for Username {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Username {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for Username {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Username {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Username::new(&s).map_err(serde::de::Error::custom)
    }
}
