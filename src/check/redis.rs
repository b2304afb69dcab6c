//! Redis: reachable, and answering, exactly as the daemon connects to it;
//! and keeping the bus's keys.

use std::collections::HashMap;
use std::time::Duration;

use super::{Finding, id};
use crate::publish::Publisher;

/// How long connecting for `CONFIG GET` and its answer may take.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(5);

/// Appends whether Redis at `url` answers `PING` and, when it does, whether
/// it may evict the bus's keys.
pub(super) async fn check(url: &str, out: &mut Vec<Finding>) {
    let shown = redact(url);
    match Publisher::connect(url).await {
        Ok(_) => out.push(Finding::ok(
            id::REDIS_PING,
            format!("redis at {shown} answers PING"),
        )),
        Err(e) => {
            out.push(Finding::error(id::REDIS_PING, format!("redis at {shown} is unreachable: {e}"))
                .fix("start Redis, or point redis_url (WALCAST_REDIS_URL) at it (for rediss://, its certificate must chain to the system's roots or to the CA file SSL_CERT_FILE names); while Redis is away walcast streams nothing"));
            return;
        }
    }
    out.push(eviction(url).await);
}

/// Whether Redis may evict keys: the gateways' subscription registry and
/// leases live there (docs/bus.md), and an evicted entry or lease drops a
/// live subscription without a word to its client.
async fn eviction(url: &str) -> Finding {
    let settings = tokio::time::timeout(CONFIG_TIMEOUT, memory_settings(url)).await;
    match settings {
        Ok(Ok((0, policy))) => Finding::ok(
            id::REDIS_EVICTION,
            format!("redis has no memory limit (maxmemory 0, maxmemory-policy {policy}): it evicts nothing"),
        ),
        Ok(Ok((_, policy))) if policy == "noeviction" => Finding::ok(
            id::REDIS_EVICTION,
            "redis evicts nothing (maxmemory-policy noeviction)",
        ),
        Ok(Ok((limit, policy))) => Finding::warning(
            id::REDIS_EVICTION,
            format!("redis may evict keys when it reaches maxmemory {limit} (maxmemory-policy {policy}): an evicted subscription or gateway lease drops live subscriptions without telling their clients"),
        )
        .fix("CONFIG SET maxmemory-policy noeviction, and set it in redis.conf (or the provider's parameter group)"),
        Ok(Err(e)) => Finding::info(
            id::REDIS_EVICTION,
            format!("could not read redis's maxmemory settings ({e}); make sure its maxmemory-policy is noeviction"),
        ),
        Err(_) => Finding::info(
            id::REDIS_EVICTION,
            format!("could not connect to redis and read its maxmemory settings within {}s; make sure its maxmemory-policy is noeviction", CONFIG_TIMEOUT.as_secs()),
        ),
    }
}

/// `maxmemory` (bytes, 0 for none) and `maxmemory-policy`.
async fn memory_settings(url: &str) -> Result<(u64, String), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    // A map in RESP3, pairs in RESP2: both read as one.
    let mut settings: HashMap<String, String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory*")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let limit = settings
        .get("maxmemory")
        .and_then(|v| v.parse().ok())
        .ok_or("CONFIG GET returned no maxmemory")?;
    let policy = settings
        .remove("maxmemory-policy")
        .ok_or("CONFIG GET returned no maxmemory-policy")?;
    Ok((limit, policy))
}

/// `url` without its password.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            redact("rediss://app:s3cr@t@cache:6380/0"),
            "rediss://app:***@cache:6380/0"
        );
        assert_eq!(redact("redis://:pw@h/1"), "redis://:***@h/1");
    }
}
