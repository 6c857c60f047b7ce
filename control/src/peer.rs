//! Text a peer controls, made safe to show: [`PeerText`] is bounded and
//! escaped when it is made, so an error, a log line or an audit entry that
//! holds one cannot grow without limit, break a line, or reorder what a
//! terminal shows; and the names a peer may give ([`check_name`]: VM ids and
//! host names), restricted to a documented character set and length.

use std::fmt;

use thiserror::Error;

/// Longest peer text kept, in characters (after escaping); the rest is
/// replaced by a note of how many bytes were cut.
pub const PEER_TEXT_MAX_CHARS: usize = 160;

/// Longest VM id or host name accepted, in bytes.
pub const NAME_MAX_BYTES: usize = 128;

/// Peer-supplied text, bounded to [`PEER_TEXT_MAX_CHARS`] and with control,
/// format and bidirectional-override characters escaped as `\u{..}`.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerText(String);

/// Characters shown escaped: controls (newlines, escapes), and the
/// invisible or direction-changing ones a terminal would act on.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{061c}' | '\u{feff}')
}

impl PeerText {
    /// Bounds and escapes `s`.
    pub fn new(s: &str) -> PeerText {
        let mut out = String::with_capacity(s.len().min(PEER_TEXT_MAX_CHARS + 32));
        let mut chars = 0usize;
        for (at, c) in s.char_indices() {
            let piece = if needs_escape(c) {
                if c == '\\' {
                    "\\\\".to_string()
                } else {
                    format!("\\u{{{:x}}}", c as u32)
                }
            } else {
                c.to_string()
            };
            let n = piece.chars().count();
            if chars + n > PEER_TEXT_MAX_CHARS {
                out.push_str(&format!("...(+{} bytes)", s.len() - at));
                return PeerText(out);
            }
            chars += n;
            out.push_str(&piece);
        }
        PeerText(out)
    }

    /// The safe text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

impl From<&str> for PeerText {
    fn from(s: &str) -> PeerText {
        PeerText::new(s)
    }
}

impl From<String> for PeerText {
    fn from(s: String) -> PeerText {
        PeerText::new(&s)
    }
}

/// A name that is not a valid VM id or host name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// Empty.
    #[error("the {what} is empty")]
    Empty {
        /// "VM id" or "host name".
        what: &'static str,
    },
    /// Longer than [`NAME_MAX_BYTES`].
    #[error("the {what} is {len} bytes long; at most {NAME_MAX_BYTES} are accepted")]
    TooLong {
        /// "VM id" or "host name".
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A character outside the set.
    #[error(
        "the {what} {name:?} holds {bad:?}: only ASCII letters, digits, '.', '_' and '-' are accepted, \
         starting with a letter or digit, never \"..\""
    )]
    BadChar {
        /// "VM id" or "host name".
        what: &'static str,
        /// The name, shown safely.
        name: PeerText,
        /// The first character refused, shown safely.
        bad: PeerText,
    },
}

/// Checks a VM id or host name (`what` says which, for the message): 1 to
/// [`NAME_MAX_BYTES`] bytes of ASCII letters, digits, `.`, `_` and `-`,
/// starting with a letter or digit, never holding `..`. So a name can never be `..`, hold a
/// `/`, a newline, a glob character, or anything a terminal or a file
/// system would read differently.
pub fn check_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > NAME_MAX_BYTES {
        return Err(NameError::TooLong { what, len: name.len() });
    }
    if name.contains("..") {
        return Err(NameError::BadChar {
            what,
            name: PeerText::new(name),
            bad: PeerText::new(".."),
        });
    }
    let ok_first = |c: char| c.is_ascii_alphanumeric();
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    for (i, c) in name.chars().enumerate() {
        if !(if i == 0 { ok_first(c) } else { ok(c) }) {
            return Err(NameError::BadChar {
                what,
                name: PeerText::new(name),
                bad: PeerText::new(&c.to_string()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_and_says_how_much() {
        let t = PeerText::new(&"\"".repeat(30_000));
        assert!(t.as_str().chars().count() < PEER_TEXT_MAX_CHARS + 32, "{t}");
        assert!(t.as_str().ends_with("...(+29840 bytes)"), "{t}");
        assert_eq!(PeerText::new("web-1").as_str(), "web-1");
    }

    #[test]
    fn controls_and_direction_overrides_are_escaped() {
        let t = PeerText::new("a\nb\u{202e}c\\d\u{1b}[2J");
        assert_eq!(t.as_str(), "a\\u{a}b\\u{202e}c\\\\d\\u{1b}[2J");
        assert!(!t.as_str().contains('\n'));
        // Multi-byte characters are never split.
        let t = PeerText::new(&"é".repeat(1000));
        assert!(t.as_str().starts_with("éé"), "{t}");
    }

    #[test]
    fn names_are_restricted() {
        for good in ["web-1", "db.prod_2", "A", &"x".repeat(NAME_MAX_BYTES)] {
            assert_eq!(check_name("VM id", good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "..",
            "-x",
            ".hidden",
            "a/b",
            "a\nb",
            "web-*",
            "a b",
            "x\u{202e}",
            "é",
        ] {
            assert!(check_name("VM id", bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(NAME_MAX_BYTES + 1);
        assert!(matches!(
            check_name("VM id", &long),
            Err(NameError::TooLong { len: 129, .. })
        ));
        let e = check_name("host name", "a\nb").unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("host name"), "{e}");
    }
}
