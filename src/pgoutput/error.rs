//! Why a pgoutput message could not be decoded.

/// A malformed pgoutput message. Decoding stops; nothing is guessed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The message ended before a field it announces.
    #[error("pgoutput message truncated: needed {needed} more bytes for {field}")]
    Truncated {
        /// What was being read.
        field: &'static str,
        /// How many bytes were missing.
        needed: usize,
    },
    /// The first byte names no known message.
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    /// A field held a value the protocol does not allow.
    #[error("invalid pgoutput {field}: {detail}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// Bytes were left after a complete message.
    #[error("{0} trailing bytes after a complete pgoutput message")]
    Trailing(usize),
}
