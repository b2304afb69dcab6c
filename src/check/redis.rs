//! Redis: reachable, and answering, exactly as the daemon connects to it.

use super::{Finding, id};
use crate::publish::Publisher;

/// Appends whether Redis at `url` answers `PING`.
pub(super) async fn check(url: &str, out: &mut Vec<Finding>) {
    let shown = redact(url);
    out.push(match Publisher::connect(url).await {
        Ok(_) => Finding::ok(id::REDIS_PING, format!("redis at {shown} answers PING")),
        Err(e) => Finding::error(id::REDIS_PING, format!("redis at {shown} is unreachable: {e}"))
            .fix("start Redis, or point redis_url (WALCAST_REDIS_URL) at it; while Redis is away walcast streams nothing"),
    });
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
