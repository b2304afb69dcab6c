//! Is the bus's Redis what `redis_cluster` says, and is the cluster whole?
//!
//! A cluster node refuses keys of slots it does not own, so a gateway set
//! up for one Redis fails against a cluster; a cluster with unassigned
//! slots or failing nodes loses the tenants of those slots. The nodes the
//! cluster lists are the ones whose eviction policy and password matter.

use std::time::Duration;

use super::{Finding, id};

/// How long one node may take to answer.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// One node as `CLUSTER NODES` lists it.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    addr: String,
    master: bool,
    failing: bool,
}

/// Appends what the bus's Redis is, against `cluster`; returns the urls of
/// the nodes to check further (the seeds' credentials, each node's address).
pub(super) async fn check(url: &str, cluster: bool, out: &mut Vec<Finding>) -> Vec<String> {
    let seeds: Vec<String> = url.split(',').map(|u| u.trim().to_owned()).collect();
    let Some(seed) = seeds.first() else {
        return seeds;
    };
    let info = tokio::time::timeout(NODE_TIMEOUT, query(seed, &["INFO", "cluster"])).await;
    let enabled = match info {
        Ok(Ok(text)) => text.lines().any(|l| l.trim() == "cluster_enabled:1"),
        // Unreadable: the PING finding said why, or INFO is refused.
        _ => return seeds,
    };
    match (cluster, enabled) {
        (false, false) => seeds,
        (false, true) => {
            out.push(
                Finding::error(id::REDIS_CLUSTER, "the bus's Redis is a cluster node, but redis_cluster is false: commands for keys of other nodes' slots fail")
                    .fix("set redis_cluster = true and list the cluster's nodes in redis_url"),
            );
            seeds
        }
        (true, false) => {
            out.push(
                Finding::error(id::REDIS_CLUSTER, "redis_cluster is true, but the bus's Redis is not a cluster node (cluster_enabled:0)")
                    .fix("set redis_cluster = false for one Redis, or point redis_url at the cluster's nodes"),
            );
            seeds
        }
        (true, true) => whole(seed, out).await.unwrap_or(seeds),
    }
}

/// The cluster's state and nodes, from `seed`; the nodes' urls.
async fn whole(seed: &str, out: &mut Vec<Finding>) -> Option<Vec<String>> {
    let read = async {
        let info = query(seed, &["CLUSTER", "INFO"]).await?;
        let nodes = query(seed, &["CLUSTER", "NODES"]).await?;
        Ok::<_, redis::RedisError>((info, nodes))
    };
    let (info, nodes) = match tokio::time::timeout(NODE_TIMEOUT, read).await {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => {
            out.push(Finding::error(
                id::REDIS_CLUSTER,
                format!("could not read the cluster's state: {e}"),
            ));
            return None;
        }
        Err(_) => {
            out.push(Finding::error(
                id::REDIS_CLUSTER,
                "the cluster did not answer CLUSTER INFO in time",
            ));
            return None;
        }
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or("?")
            .to_owned()
    };
    let (state, assigned) = (field("cluster_state"), field("cluster_slots_assigned"));
    let nodes = parse_nodes(&nodes);
    let masters = nodes.iter().filter(|n| n.master).count();
    let failing: Vec<&str> = nodes
        .iter()
        .filter(|n| n.failing)
        .map(|n| n.addr.as_str())
        .collect();
    out.push(if state != "ok" || assigned != "16384" {
        Finding::error(
            id::REDIS_CLUSTER,
            format!("the cluster is not whole: cluster_state:{state}, {assigned} of 16384 slots assigned"),
        )
        .fix("assign every slot (redis-cli --cluster fix) and bring its failing nodes back")
    } else if !failing.is_empty() {
        Finding::warning(
            id::REDIS_CLUSTER,
            format!("the cluster is ok, but nodes are failing or unreachable: {}", failing.join(", ")),
        )
        .fix("bring them back or forget them (CLUSTER FORGET), and check that each master has a replica")
    } else {
        Finding::ok(
            id::REDIS_CLUSTER,
            format!(
                "the cluster is ok: {masters} masters, {} replicas, all 16384 slots assigned",
                nodes.len() - masters
            ),
        )
    });
    Some(nodes.iter().map(|n| with_address(seed, &n.addr)).collect())
}

/// `CLUSTER NODES` lines: `<id> <ip:port@cport[,host]> <flags> …`.
fn parse_nodes(text: &str) -> Vec<Node> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, addr, flags) = (fields.next()?, fields.next()?, fields.next()?);
            let link = fields.nth(4)?;
            let addr = addr.split(['@', ',']).next()?.to_owned();
            let flags: Vec<&str> = flags.split(',').collect();
            Some(Node {
                addr,
                master: flags.contains(&"master"),
                failing: flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "fail?" | "noaddr"))
                    || link != "connected",
            })
        })
        .collect()
}

/// `seed` with its host and port replaced by `addr` (scheme and
/// credentials kept).
fn with_address(seed: &str, addr: &str) -> String {
    let Some((scheme, rest)) = seed.split_once("://") else {
        return seed.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let credentials = authority.rfind('@').map_or("", |at| &authority[..=at]);
    format!("{scheme}://{credentials}{addr}{path}")
}

async fn query(url: &str, args: &[&str]) -> Result<String, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(&mut conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_give_addresses_roles_and_health() {
        let text = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002,h2 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003 myself,master - 0 0 3 connected 10923-16383
6ec2 127.0.0.1:30005@40005 master,fail - 1426238316232 1426238315231 5 disconnected
";
        assert_eq!(
            parse_nodes(text),
            [
                Node {
                    addr: "127.0.0.1:30004".into(),
                    master: false,
                    failing: false
                },
                Node {
                    addr: "127.0.0.1:30002".into(),
                    master: true,
                    failing: false
                },
                Node {
                    addr: "127.0.0.1:30003".into(),
                    master: true,
                    failing: false
                },
                Node {
                    addr: "127.0.0.1:30005".into(),
                    master: true,
                    failing: true
                },
            ]
        );
    }

    #[test]
    fn node_urls_keep_the_seeds_scheme_and_credentials() {
        assert_eq!(
            with_address("rediss://u:p@seed:7000/0", "10.0.0.2:7001"),
            "rediss://u:p@10.0.0.2:7001/0"
        );
        assert_eq!(
            with_address("redis://seed:7000", "10.0.0.2:7001"),
            "redis://10.0.0.2:7001"
        );
    }
}
