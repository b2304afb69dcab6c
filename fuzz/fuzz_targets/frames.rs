//! Everything a client's frame goes through before anything is stored:
//! the v1 (JSON object) and v2 (JSON array) decoders, the v2 binary
//! decoder, and a join's payload. The first byte picks the decoder.
//!
//! Beyond "never panics", it checks what the gateway promises about
//! hostile input: an error says what is wrong in bounded text (it is
//! logged and echoed), and a decoded frame encodes back to one that
//! decodes to the same fields.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use walcast::bus::room;
use walcast::gateway::auth::Verifier;
use walcast::gateway::broadcast::{self, binary, event};
use walcast::gateway::channel::Channel;
use walcast::gateway::frame::{self, Outbound, Vsn};
use walcast::gateway::limits::Limits;

/// The longest error text any refusal may carry, whatever the input.
const MAX_REASON: usize = 512;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => text(Vsn::V1, input),
        1 => text(Vsn::V2, input),
        _ => binary(input),
    }
});

fn text(vsn: Vsn, input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let inbound = match frame::decode(vsn, text) {
        Ok(inbound) => inbound,
        Err(malformed) => {
            assert!(
                malformed.reason.len() <= MAX_REASON,
                "a {}-byte reason",
                malformed.reason.len()
            );
            return;
        }
    };
    // Encoded as the server would (a v1 frame has no join_ref) and read
    // back, the frame is the same.
    let encoded = frame::encode(
        vsn,
        Outbound {
            join_ref: &inbound.join_ref,
            reference: &inbound.reference,
            topic: &inbound.topic,
            event: &inbound.event,
            payload: inbound.payload.get(),
        },
    );
    let again = frame::decode(vsn, &encoded).expect("an encoded frame decodes");
    assert_eq!(again.topic, inbound.topic);
    assert_eq!(again.event, inbound.event);
    assert_eq!(again.reference, inbound.reference);
    assert_eq!(again.payload.get(), inbound.payload.get());
    if vsn == Vsn::V2 {
        assert_eq!(again.join_ref, inbound.join_ref);
    }
    if inbound.event == "phx_join" {
        join(&inbound.topic, &inbound.payload);
    }
}

/// An HS256 anon token signed with `fuzz`, expiring in 2096: the socket's
/// token, so that a join without a token of its own reaches its bindings.
const SOCKET_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoiYW5vbiIsImV4cCI6NDAwMDAwMDAwMCwic3ViIjoiZnV6eiJ9.yA0UmLOolXQtqYyk7qlivATbhU5f8nqbccTlJ42Cfp0";

fn join(topic: &str, payload: &serde_json::value::RawValue) {
    let verifier = Verifier::new(b"fuzz");
    let limits = Limits::default();
    match Channel::join(topic, Value::Null, payload, SOCKET_TOKEN, &verifier, "f", &limits) {
        Ok((channel, reply)) => {
            assert!(channel.bindings.len() <= limits.max_bindings_per_channel);
            // The reply echoes the payload's bindings: it is JSON.
            serde_json::from_str::<Value>(&reply).expect("the join reply is JSON");
        }
        Err(e) => {
            let reason = e.reason();
            assert!(reason.len() <= MAX_REASON, "a {}-byte reason", reason.len());
        }
    }
}

/// A binary frame: decoded without panic, its parts within the input,
/// and (as the gateway would send it on) a bus message and the kind 4
/// frames each socket gets, every one readable again.
fn binary(input: &[u8]) {
    let push = match binary::decode(input) {
        Ok(push) => push,
        Err(malformed) => {
            assert!(malformed.to_string().len() <= MAX_REASON);
            return;
        }
    };
    assert!(
        push.join_ref.len()
            + push.reference.len()
            + push.topic.len()
            + push.event.len()
            + push.metadata.len()
            + push.payload.len()
            + 7
            == input.len()
    );
    let Ok(message) = broadcast::from_push(&push, Some("gw 1:1".to_owned()), usize::MAX) else {
        return;
    };
    let (header, body) = room::read(&message).expect("a bus message reads back");
    assert_eq!(body, push.payload);
    assert!(matches!(header, room::Header::Broadcast(_)));
    let user = event::User {
        event: push.event.to_owned(),
        encoding: push.encoding,
        meta: Vec::new(),
    };
    let topic = std::sync::Arc::from(push.topic);
    let rendered = event::Broadcast::new(topic, None, Some(user), body.to_vec());
    for vsn in [Vsn::V1, Vsn::V2] {
        match rendered.frame(vsn) {
            Some(axum::extract::ws::Message::Text(text)) => {
                // JSON by its grammar: `4e424244` is a JSON number a
                // client reads (as Infinity) though serde's f64 cannot.
                serde_json::from_str::<Box<serde_json::value::RawValue>>(text.as_str())
                    .expect("a JSON frame");
            }
            Some(axum::extract::ws::Message::Binary(bytes)) => assert_eq!(bytes[0], 4),
            Some(other) => panic!("{other:?}"),
            None => assert!(vsn == Vsn::V1 && push.encoding == room::Encoding::Binary),
        }
    }
}
