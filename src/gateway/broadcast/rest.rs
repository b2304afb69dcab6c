//! `POST /api/broadcast` (also under `/realtime/v1`, as clients reach it
//! through Supabase's API gateway): a batch of broadcasts from a server or
//! from realtime-js's `send()` when its channel is not joined.
//!
//! ```text
//! POST /api/broadcast  Authorization: Bearer <jwt> | apikey: <jwt>
//! {"messages":[{"topic":"room:42","event":"cursor","payload":{"x":1},"private":false,"id":"<uuid>"}]}
//! ```
//!
//! `POST /api/broadcast/<topic>/events/<event>` (realtime-js's and
//! realtime-py's `httpSend`) sends one message whose body is the payload:
//! JSON (`application/json` or no content type) or bytes
//! (`application/octet-stream`), delivered as a user broadcast.
//!
//! Answers as Supabase does: 202 and no body when every message went out;
//! 401 `{"message":"Unauthorized"}` for a missing or refused token; 422
//! with an error object per message (`{}` for a good one) when any is
//! invalid, and then none is sent; 429 when the events rate is spent or
//! the batch would spend it. `topic` is the sub-topic (no `realtime:`).
//! `private: true` is sent only where the token may write the topic
//! (the daemon's write check on `realtime.messages`; a batch skips the
//! others silently, a single request is answered 403).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tracing::debug;

use super::flexible_bool;
use crate::bus;
use crate::bus::room::{self, BroadcastHeader, Encoding};
use crate::gateway::Context;
use crate::gateway::auth::Verified;
use crate::gateway::private;

/// Bytes of a request body at most (Supabase's parser's default).
pub const MAX_BODY_BYTES: usize = 8_000_000;

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(default, borrow)]
    messages: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default)]
    topic: Option<Value>,
    #[serde(default)]
    event: Option<Value>,
    #[serde(default, borrow)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    private: Option<Value>,
    #[serde(default)]
    id: Option<Value>,
}

/// A message ready to go: its room and bus message.
struct Ready {
    room: String,
    message: Vec<u8>,
    /// A private message's topic: written only where the token may.
    private_topic: Option<String>,
}

/// `POST /api/broadcast`.
pub async fn post(State(ctx): State<Arc<Context>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(verified) = authorized(&ctx, &headers) else {
        return unauthorized();
    };
    let batch: Batch<'_> = match serde_json::from_slice(&body) {
        Ok(batch) => batch,
        Err(e) => {
            let message = format!(
                "The body must be JSON: {{\"messages\":[{{\"topic\",\"event\",\"payload\"}}]}} ({})",
                crate::gateway::quiet::clip(&e.to_string())
            );
            return answer(StatusCode::BAD_REQUEST, json!({ "message": message }));
        }
    };
    let Some(messages) = batch.messages else {
        return answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"errors": {"messages": ["can't be blank"]}}),
        );
    };
    // The rate before anything per message: a batch larger than the rate
    // allows is refused before it costs a validation (or an error object)
    // per message.
    let now = Instant::now();
    if let Some(refused) = rate_exceeded(&ctx, now) {
        return refused;
    }
    if messages.len() as u64 + ctx.events.average(now) > ctx.events.limit() {
        ctx.metrics.broadcast("rate_limited");
        return answer(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"message": "Too many messages to broadcast, please reduce the batch size"}),
        );
    }
    let mut ready = Vec::with_capacity(messages.len());
    let mut errors = Vec::with_capacity(messages.len());
    let mut failed = false;
    for raw in &messages {
        match check(&ctx, raw) {
            Ok(r) => {
                ready.push(r);
                errors.push(json!({}));
            }
            Err(e) => {
                failed = true;
                errors.push(e);
            }
        }
    }
    if failed {
        return answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"errors": {"messages": errors}}),
        );
    }
    // Private messages: one write check per topic, all asked at once; the
    // messages of a topic that may not be written are skipped, silently.
    let mut topics: Vec<String> = ready
        .iter()
        .filter_map(|r| r.private_topic.clone())
        .collect();
    topics.sort_unstable();
    topics.dedup();
    let answers = futures_util::future::join_all(
        topics
            .iter()
            .map(|topic| private::may_write(&ctx, &verified, topic, "broadcast")),
    )
    .await;
    let writable: Vec<&str> = topics
        .iter()
        .zip(answers)
        .filter_map(|(topic, answer)| match answer {
            Ok(true) => Some(topic.as_str()),
            Ok(false) => None,
            Err(reason) => {
                debug!(topic = %crate::gateway::quiet::clip(topic), %reason, "a REST broadcast's write check was not decided; skipped");
                None
            }
        })
        .collect();
    for r in ready {
        if let Some(topic) = &r.private_topic
            && !writable.contains(&topic.as_str())
        {
            ctx.metrics.broadcast("unauthorized");
            continue;
        }
        if let Err(refused) = send(&ctx, &r.room, r.message) {
            return refused;
        }
    }
    accepted()
}

/// Counts and queues one message for `room`; Redis away: 503.
#[allow(clippy::result_large_err)] // the error is the response itself
fn send(ctx: &Context, room: &str, message: Vec<u8>) -> Result<(), Response> {
    ctx.events.add(1);
    if !ctx.bus.broadcast(room, message) {
        ctx.metrics.broadcast("refused");
        return Err(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"message": "The gateway lost its connection to Redis; try again"}),
        ));
    }
    ctx.metrics.broadcast("sent");
    Ok(())
}

/// Supabase's 429 while the events rate is spent.
fn rate_exceeded(ctx: &Context, now: Instant) -> Option<Response> {
    ctx.events.triggered(now).then(|| {
        ctx.metrics.broadcast("rate_limited");
        answer(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"message": "You have exceeded your rate limit"}),
        )
    })
}

/// 202, no body: every message went out.
fn accepted() -> Response {
    let mut response = StatusCode::ACCEPTED.into_response();
    cors(response.headers_mut());
    response
}

/// The request's token, if the gateway accepts it (a bearer, else
/// `apikey`).
fn authorized(ctx: &Context, headers: &HeaderMap) -> Option<Verified> {
    let token = bearer(headers).or_else(|| header_text(headers, "apikey"));
    match token.map(|t| ctx.verifier.verify(t)) {
        Some(Ok(verified)) => Some(verified),
        Some(Err(e)) => {
            debug!(error = %e, "REST broadcast refused");
            None
        }
        None => None,
    }
}

/// Supabase's answer to a request without an accepted token.
fn unauthorized() -> Response {
    answer(StatusCode::UNAUTHORIZED, json!({"message": "Unauthorized"}))
}

/// `POST /api/broadcast/<topic>/events/<event>[?private=true]`.
pub async fn post_single(
    State(ctx): State<Arc<Context>>,
    Path((topic, event)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(verified) = authorized(&ctx, &headers) else {
        return unauthorized();
    };
    let encoding = match header_text(&headers, "content-type")
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .as_deref()
    {
        None | Some("application/json") => Encoding::Json,
        Some("application/octet-stream") => Encoding::Binary,
        Some(_) => {
            return answer(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": "Unsupported Media Type. Use application/json or application/octet-stream"}),
            );
        }
    };
    let private = query
        .get("private")
        .is_some_and(|p| p.eq_ignore_ascii_case("true"));
    if topic.is_empty() || topic.len() + "realtime:".len() > ctx.limits.max_topic_bytes {
        return answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"errors": {"topic": [format!("must be 1 to {} bytes with realtime:", ctx.limits.max_topic_bytes)]}}),
        );
    }
    if body.len() + event.len() > ctx.limits.max_payload_bytes() {
        return answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"errors": {"payload": ["Payload size exceeds tenant limit"]}}),
        );
    }
    if encoding == Encoding::Json && !super::is_json(&body) {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"message": "The body must be JSON (or send application/octet-stream)"}),
        );
    }
    let now = Instant::now();
    if let Some(refused) = rate_exceeded(&ctx, now) {
        return refused;
    }
    if private {
        match private::may_write(&ctx, &verified, &topic, "broadcast").await {
            Ok(true) => {}
            Ok(false) => {
                ctx.metrics.broadcast("unauthorized");
                return answer(StatusCode::FORBIDDEN, json!({"message": "Unauthorized"}));
            }
            Err(reason) => {
                debug!(topic = %crate::gateway::quiet::clip(&topic), %reason, "a REST broadcast's write check was not decided");
                return answer(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"message": "Tenant database unavailable"}),
                );
            }
        }
    }
    let message = room::write_broadcast(&BroadcastHeader::user(None, event, encoding), &body);
    match send(&ctx, &bus::room_key(private, &topic), message) {
        Ok(()) => accepted(),
        Err(refused) => refused,
    }
}

/// The CORS preflight of browsers calling `POST /api/broadcast`.
pub async fn preflight() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    cors(headers);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, apikey, content-type, x-client-info"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}

/// One message's errors as Supabase's changeset shows them, or the
/// message ready to go.
fn check(ctx: &Context, raw: &RawValue) -> Result<Ready, Value> {
    let Ok(message) = serde_json::from_str::<Message<'_>>(raw.get()) else {
        return Err(json!({"message": ["is invalid"]}));
    };
    let mut errors = serde_json::Map::new();
    let blank = || json!(["can't be blank"]);
    let topic = required_text(&message.topic, "topic", &mut errors);
    if let Some(topic) = topic
        && topic.len() + "realtime:".len() > ctx.limits.max_topic_bytes
    {
        errors.insert(
            "topic".into(),
            json!([format!(
                "is too long: topics are limited to {} bytes with realtime:",
                ctx.limits.max_topic_bytes
            )]),
        );
    }
    let event = required_text(&message.event, "event", &mut errors);
    let payload = match message.payload {
        Some(p) if p.get().starts_with('{') => Some(p.get()),
        None => {
            errors.insert("payload".into(), blank());
            None
        }
        Some(p) if p.get() == "null" => {
            errors.insert("payload".into(), blank());
            None
        }
        Some(_) => {
            errors.insert("payload".into(), json!(["is invalid"]));
            None
        }
    };
    if payload.is_some_and(|p| p.len() > ctx.limits.max_payload_bytes()) {
        errors.insert(
            "payload".into(),
            json!(["Payload size exceeds tenant limit"]),
        );
    }
    let private = match message.private.as_ref().map(flexible_bool) {
        None | Some(Some(false)) => false,
        Some(Some(true)) => true,
        Some(None) if message.private == Some(Value::Null) => false,
        Some(None) => {
            errors.insert("private".into(), json!(["is invalid"]));
            false
        }
    };
    let id = match &message.id {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if is_uuid(id) => Some(id.as_str()),
        Some(_) => {
            errors.insert("id".into(), json!(["is invalid"]));
            None
        }
    };
    let (Some(topic), Some(event), Some(payload), true) =
        (topic, event, payload, errors.is_empty())
    else {
        return Err(Value::Object(errors));
    };
    // Supabase's batch message, keys in its order (sorted).
    let event = Value::from(event).to_string();
    let meta = id.map_or_else(String::new, |id| format!(r#","meta":{{"id":"{id}"}}"#));
    let body = format!(r#"{{"event":{event}{meta},"payload":{payload},"type":"broadcast"}}"#);
    Ok(Ready {
        room: bus::room_key(private, topic),
        message: room::write_broadcast(&BroadcastHeader::phoenix(None), body.as_bytes()),
        private_topic: private.then(|| topic.to_owned()),
    })
}

/// A field that must be a non-empty string; its error (Ecto's words) in
/// `errors` otherwise.
fn required_text<'v>(
    value: &'v Option<Value>,
    name: &str,
    errors: &mut serde_json::Map<String, Value>,
) -> Option<&'v str> {
    match value {
        Some(Value::String(text)) if !text.is_empty() => Some(text),
        None | Some(Value::Null) | Some(Value::String(_)) => {
            errors.insert(name.into(), json!(["can't be blank"]));
            None
        }
        Some(_) => {
            errors.insert(name.into(), json!(["is invalid"]));
            None
        }
    }
}

/// Whether `id` is a UUID in its text form.
fn is_uuid(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The token of `Authorization: Bearer <token>` (any case of "bearer").
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = header_text(headers, "authorization")?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn cors(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
}

fn answer(status: StatusCode, body: Value) -> Response {
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    cors(response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_and_bearer_tokens_are_read_strictly() {
        assert!(is_uuid("006554ce-4a7b-4c4a-9a6e-0123456789ab"));
        assert!(!is_uuid("006554ce4a7b-4c4a-9a6e-0123456789abc"));
        assert!(!is_uuid("x"));
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("BEARER abc"));
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
    }
}
