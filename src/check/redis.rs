//! Redis: reachable, and answering, exactly as the daemon connects to it;
//! keeping the bus's keys; and closed to clients without a password.

use std::collections::HashMap;
use std::time::Duration;

use super::{Finding, id};
use crate::bus::server::Server;
use crate::publish::Publisher;

/// How long connecting for `CONFIG GET` and its answer may take.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(5);

/// Appends whether Redis at `url` answers `PING` and, when it does, whether
/// it is what `cluster` says, and whether it may evict the bus's keys and
/// answers without a password (on a cluster, every node it lists).
pub(super) async fn check(url: &str, cluster: bool, out: &mut Vec<Finding>) {
    let shown = redact(url);
    let server = match Server::open(url, cluster) {
        Ok(server) => server,
        Err(e) => {
            out.push(Finding::error(
                id::REDIS_PING,
                format!("redis url {shown} is not usable: {e}"),
            ));
            return;
        }
    };
    // First: a bus of the other kind fails PING in ways that do not say so.
    let nodes = super::cluster::check(url, cluster, out).await;
    match Publisher::connect(&server).await {
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
    // Each node of a cluster keeps its own keys and its own password.
    let named = |finding: Finding, node: &str| {
        if nodes.len() > 1 {
            finding.subject(redact(node))
        } else {
            finding
        }
    };
    for node in &nodes {
        out.push(named(eviction(node).await, node));
        out.push(named(authentication(node).await, node));
    }
}

/// Whether Redis at `url` answers someone who has no password: whoever
/// can write to the bus is trusted (docs/bus.md), so that must not be
/// anyone who can reach the port.
async fn authentication(url: &str) -> Finding {
    let Some(anonymous) = without_credentials(url) else {
        return Finding::ok(
            id::REDIS_AUTH,
            "redis is reached through a unix socket: its file permissions decide who may write to the bus",
        );
    };
    let shown = redact(url);
    let ping = async {
        let client = redis::Client::open(anonymous.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(CONFIG_TIMEOUT, ping).await {
        Ok(Ok(_)) => Finding::warning(
            id::REDIS_AUTH,
            format!("redis at {shown} accepts commands without a password: anyone who can reach it can subscribe as any user and read every change (docs/bus.md)"),
        )
        .fix("give Redis a password or ACL users (requirepass, or ACL SETUSER walcast on >PASSWORD ~walcast:* &walcast:* +@all) and put them in redis_url (redis://walcast:PASSWORD@host:6379); keep it off public networks"),
        Ok(Err(e)) if e.code() == Some("NOAUTH") || e.kind() == redis::ErrorKind::AuthenticationFailed => {
            Finding::ok(id::REDIS_AUTH, format!("redis at {shown} refuses commands without a password"))
        }
        Ok(Err(e)) => Finding::info(
            id::REDIS_AUTH,
            format!("could not tell whether redis at {shown} requires a password ({e}); make sure it does"),
        ),
        Err(_) => Finding::info(
            id::REDIS_AUTH,
            format!("could not tell within {}s whether redis at {shown} requires a password; make sure it does", CONFIG_TIMEOUT.as_secs()),
        ),
    }
}

/// `url` without user and password (a TCP url), for trying Redis as an
/// anonymous client; `None` for a unix socket.
fn without_credentials(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme, "redis" | "rediss" | "valkey" | "valkeys") {
        return None;
    }
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let host_start = rest[..authority_end].rfind('@').map_or(0, |at| at + 1);
    Some(format!("{scheme}://{}", &rest[host_start..]))
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
    fn credentials_are_left_out_to_try_redis_anonymously() {
        assert_eq!(
            without_credentials("rediss://app:s3cr@t@cache:6380/0").as_deref(),
            Some("rediss://cache:6380/0")
        );
        assert_eq!(
            without_credentials("redis://127.0.0.1:6379").as_deref(),
            Some("redis://127.0.0.1:6379")
        );
        assert_eq!(without_credentials("redis+unix:///run/redis.sock"), None);
        assert_eq!(without_credentials("unix:///run/redis.sock"), None);
    }

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
