//! Message texts: what a valid one is (rule 13 of the protocol).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The text of a message or broadcast: any Unicode except control
/// characters other than tab, with at least one visible character.
///
/// The frame size limit bounds its length. Cloning is cheap (the text is
/// shared between the offline queue, the store and the encoded frames).
///
/// ```
/// use chatproto::MessageText;
///
/// assert!(MessageText::new("héllo\tthere 👋").is_ok());
/// assert!(MessageText::new("line\nbreak").is_err());
/// assert!(MessageText::new("   ").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageText(Arc<str>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_scan_finds_exactly_the_control_characters() {
        for c in (0..0x3000u32).filter_map(char::from_u32) {
            let text = format!("a{c}b");
            let expected = (c.is_control() && c != '\t').then_some(c);
            assert_eq!(find_control(&text), expected, "U+{:04X}", c as u32);
        }
    }
}

/// Why a string is not a [`MessageText`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidText {
    /// Nothing but white space (or nothing at all).
    #[error("a message cannot be empty")]
    Empty,
    /// A control character other than tab.
    #[error("a message cannot hold control characters (found U+{:04X})", *.0 as u32)]
    ControlCharacter(char),
}

impl MessageText {
    /// Checks `text` against the rules and wraps it.
    pub fn new(text: &str) -> Result<Self, InvalidText> {
        if let Some(c) = find_control(text) {
            return Err(InvalidText::ControlCharacter(c));
        }
        if text.trim().is_empty() {
            return Err(InvalidText::Empty);
        }
        Ok(MessageText(Arc::from(text)))
    }

    /// The text as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The first control character other than tab. Control characters are
/// C0 (U+0000..U+001F), DEL and C1 (U+0080..U+009F, two bytes in UTF-8
/// starting 0xC2): a byte scan finds them without decoding every char.
fn find_control(text: &str) -> Option<char> {
    let bytes = text.as_bytes();
    let at = bytes.iter().enumerate().position(|(i, &b)| {
        (b < 0x20 && b != b'\t')
            || b == 0x7f
            || (b == 0xc2 && bytes.get(i + 1).is_some_and(|n| (0x80..0xa0).contains(n)))
    })?;
    text[at..].chars().next()
}

impl std::str::FromStr for MessageText {
    type Err = InvalidText;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MessageText::new(s)
    }
}

impl AsRef<str> for MessageText {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MessageText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for MessageText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        MessageText::new(&s).map_err(serde::de::Error::custom)
    }
}
