//! vsn 2.0.0 binary frames: a client's broadcast push (kind 3) in, a user
//! broadcast (kind 4) out, as realtime-js ≥ 2.91 and Supabase's
//! `V2Serializer` write them. Every length is one byte; nothing here
//! panics on input.
//!
//! ```text
//! kind 3: 3 | len join_ref | len ref | len topic | len event | len meta | encoding | join_ref ref topic event meta payload
//! kind 4: 4 | len topic | len event | len meta | encoding | topic event meta payload
//! ```

use crate::bus::room::Encoding;

/// Kind byte of a client's broadcast push.
const KIND_PUSH: u8 = 3;
/// Kind byte of a user broadcast to a client.
const KIND_BROADCAST: u8 = 4;

/// A client's broadcast push, borrowed from its frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Push<'a> {
    /// Join ref.
    pub join_ref: &'a str,
    /// Ref (answered when the channel acks).
    pub reference: &'a str,
    /// Topic, `realtime:<room>`.
    pub topic: &'a str,
    /// The user event.
    pub event: &'a str,
    /// The client's metadata (JSON or empty); Supabase discards it.
    pub metadata: &'a [u8],
    /// How `payload` is encoded.
    pub encoding: Encoding,
    /// The user payload: the rest of the frame.
    pub payload: &'a [u8],
}

/// Why a binary frame was not read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Zero bytes.
    #[error("empty binary frame")]
    Empty,
    /// A kind the server does not accept.
    #[error("binary frame of kind {0}: only kind 3 (a broadcast push) is accepted")]
    Kind(u8),
    /// Fewer bytes than the fixed header.
    #[error("binary frame header is truncated")]
    Truncated,
    /// The lengths run past the end.
    #[error("binary frame is shorter than its header says")]
    Short,
    /// A name is not UTF-8.
    #[error("binary frame field {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// The encoding byte is neither 0 (binary) nor 1 (JSON).
    #[error("binary frame payload encoding {0}: expected 0 (binary) or 1 (JSON)")]
    Encoding(u8),
}

/// Reads a kind 3 frame.
pub fn decode(bytes: &[u8]) -> Result<Push<'_>, Malformed> {
    let Some((&kind, rest)) = bytes.split_first() else {
        return Err(Malformed::Empty);
    };
    if kind != KIND_PUSH {
        return Err(Malformed::Kind(kind));
    }
    let Some((header, mut rest)) = rest.split_at_checked(6) else {
        return Err(Malformed::Truncated);
    };
    let encoding = match header[5] {
        0 => Encoding::Binary,
        1 => Encoding::Json,
        other => return Err(Malformed::Encoding(other)),
    };
    let mut take = |len: u8| -> Result<&[u8], Malformed> {
        let (field, tail) = rest
            .split_at_checked(usize::from(len))
            .ok_or(Malformed::Short)?;
        rest = tail;
        Ok(field)
    };
    fn text<'b>(bytes: &'b [u8], name: &'static str) -> Result<&'b str, Malformed> {
        std::str::from_utf8(bytes).map_err(|_| Malformed::NotUtf8(name))
    }
    let join_ref = text(take(header[0])?, "join_ref")?;
    let reference = text(take(header[1])?, "ref")?;
    let topic = text(take(header[2])?, "topic")?;
    let event = text(take(header[3])?, "event")?;
    let metadata = take(header[4])?;
    Ok(Push {
        join_ref,
        reference,
        topic,
        event,
        metadata,
        encoding,
        payload: rest,
    })
}

/// Writes a kind 4 frame; `None` when the topic, event or metadata is over
/// 255 bytes (the format cannot say so; the caller sends JSON instead).
pub fn encode(
    topic: &str,
    event: &str,
    metadata: &[u8],
    encoding: Encoding,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let len = |bytes: &[u8]| u8::try_from(bytes.len()).ok();
    let header = [
        KIND_BROADCAST,
        len(topic.as_bytes())?,
        len(event.as_bytes())?,
        len(metadata)?,
        match encoding {
            Encoding::Binary => 0,
            Encoding::Json => 1,
        },
    ];
    let mut out = Vec::with_capacity(
        header.len() + topic.len() + event.len() + metadata.len() + payload.len(),
    );
    out.extend_from_slice(&header);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(metadata);
    out.extend_from_slice(payload);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// realtime-js's `send({type:'broadcast',event:'cursor',payload:{x:1}})`
    /// on join_ref "1", ref "2" (the reference's example).
    fn example() -> Vec<u8> {
        let mut frame = vec![3u8, 1, 1, 16, 6, 0, 1];
        frame.extend_from_slice(b"12realtime:room:42cursor{\"x\":1}");
        frame
    }

    #[test]
    fn a_push_decodes_to_its_fields() {
        let frame = example();
        assert_eq!(
            decode(&frame),
            Ok(Push {
                join_ref: "1",
                reference: "2",
                topic: "realtime:room:42",
                event: "cursor",
                metadata: b"",
                encoding: Encoding::Json,
                payload: br#"{"x":1}"#,
            })
        );
    }

    #[test]
    fn every_truncation_and_bad_byte_is_an_error() {
        let frame = example();
        // Cutting into the names is an error; cutting the payload is a
        // shorter payload.
        for end in 0..7 + 2 + 16 + 6 {
            assert!(decode(&frame[..end]).is_err(), "{end}");
        }
        assert_eq!(decode(&[]), Err(Malformed::Empty));
        assert_eq!(decode(&[4, 0, 0, 0, 1]), Err(Malformed::Kind(4)));
        let mut bad = frame.clone();
        bad[6] = 2;
        assert_eq!(decode(&bad), Err(Malformed::Encoding(2)));
        let mut bad = frame.clone();
        bad[3] = 255;
        assert_eq!(decode(&bad), Err(Malformed::Short));
        let mut bad = frame;
        bad[9] = 0xff;
        assert_eq!(decode(&bad), Err(Malformed::NotUtf8("topic")));
    }

    #[test]
    fn a_broadcast_encodes_as_the_reference_shows() {
        let frame = encode(
            "realtime:room:42",
            "INSERT",
            br#"{"id":"1"}"#,
            Encoding::Json,
            b"{}",
        )
        .unwrap();
        let mut expected = vec![4u8, 16, 6, 10, 1];
        expected.extend_from_slice(b"realtime:room:42INSERT{\"id\":\"1\"}{}");
        assert_eq!(frame, expected);
        assert_eq!(
            encode(&"t".repeat(256), "e", b"", Encoding::Binary, b""),
            None
        );
    }
}
