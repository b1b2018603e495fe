//! `--join`: the seed addresses a node announces itself to.
//!
//! A seed list is `host:port[,host:port…]`. Each host is an IP literal or a DNS name;
//! a name may resolve to several addresses (a Kubernetes headless Service resolves to
//! every ready pod), and each of them is a seed. Resolution is repeated by the driver,
//! because the set of pods behind a name changes.

use std::net::SocketAddr;

use crate::ClusterError;

/// One `host:port` entry of a seed list, checked for shape but not resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSpec {
    /// The host: an IP literal (IPv6 in brackets) or a DNS name.
    pub host: String,
    /// The gossip port.
    pub port: u16,
}

impl std::fmt::Display for SeedSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Parses `--join`: comma-separated `host:port` entries; blanks are ignored.
pub fn parse_seeds(list: &str) -> Result<Vec<SeedSpec>, ClusterError> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let bad =
                |why: &str| ClusterError::InvalidConfig(format!("--join entry {entry:?}: {why}"));
            let (host, port) = entry
                .rsplit_once(':')
                .ok_or_else(|| bad("expected host:port"))?;
            let port: u16 = port
                .parse()
                .map_err(|_| bad("port is not a number 1-65535"))?;
            if port == 0 {
                return Err(bad("port 0"));
            }
            let bracketed = host.starts_with('[') && host.ends_with(']');
            if host.is_empty() || (host.contains(':') && !bracketed) {
                return Err(bad("IPv6 hosts go in brackets, e.g. [::1]:7000"));
            }
            Ok(SeedSpec {
                host: host.to_owned(),
                port,
            })
        })
        .collect()
}

/// Resolves every entry of `specs` (DNS names to all their addresses), sorted and
/// deduplicated. An entry that does not resolve (yet) is skipped with a warning: the
/// first pod of a headless Service has no peers to find.
pub async fn resolve_seeds(specs: &[SeedSpec]) -> Vec<SocketAddr> {
    resolve_seeds_reporting(specs).await.0
}

/// [`resolve_seeds`], and whether every entry resolved (a name that does not resolve
/// yet — a headless Service before its first endpoint is published — makes it false).
pub async fn resolve_seeds_reporting(specs: &[SeedSpec]) -> (Vec<SocketAddr>, bool) {
    let mut out = Vec::new();
    let mut all = true;
    for spec in specs {
        match resolve_one(spec).await {
            Ok(addrs) => out.extend(addrs),
            Err(e) => {
                all = false;
                tracing::warn!(seed = %spec, error = %e, "seed does not resolve");
            }
        }
    }
    out.sort();
    out.dedup();
    (out, all)
}

async fn resolve_one(spec: &SeedSpec) -> std::io::Result<Vec<SocketAddr>> {
    Ok(
        tokio::net::lookup_host((spec.host.trim_matches(['[', ']']), spec.port))
            .await?
            .collect(),
    )
}

/// Resolves one `host:port` (an IP literal or a DNS name) to its first address, for an
/// address a node advertises: a Kubernetes pod's own DNS name
/// (`<pod>.<headless service>.<namespace>.svc.<cluster domain>`) resolves to the pod's IP.
pub async fn resolve_advertise(spec: &SeedSpec) -> Result<SocketAddr, ClusterError> {
    let addrs = resolve_one(spec).await.map_err(|e| {
        ClusterError::InvalidConfig(format!("--grpc-advertise {spec} does not resolve: {e}"))
    })?;
    // Prefer IPv4 when a name has both, as Kubernetes' single-stack default does.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| {
            ClusterError::InvalidConfig(format!("--grpc-advertise {spec} resolves to nothing"))
        })
}

/// [`parse_seeds`] then [`resolve_seeds`]: `--join` to addresses.
pub async fn seeds_from_arg(list: &str) -> Result<Vec<SocketAddr>, ClusterError> {
    Ok(resolve_seeds(&parse_seeds(list)?).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comma_separated_host_port_entries() {
        let seeds = parse_seeds("10.0.0.1:7000, tether-headless.default.svc:7000,,[::1]:7001")
            .expect("valid");
        assert_eq!(
            seeds,
            vec![
                SeedSpec {
                    host: "10.0.0.1".into(),
                    port: 7000
                },
                SeedSpec {
                    host: "tether-headless.default.svc".into(),
                    port: 7000
                },
                SeedSpec {
                    host: "[::1]".into(),
                    port: 7001
                },
            ]
        );
        assert_eq!(parse_seeds("").expect("empty is no seeds"), vec![]);
    }

    #[test]
    fn rejects_malformed_entries() {
        for bad in ["host", "host:", "host:0", "host:70000", ":7000", "::1:7000"] {
            assert!(
                matches!(parse_seeds(bad), Err(ClusterError::InvalidConfig(_))),
                "{bad} should be refused"
            );
        }
    }

    #[tokio::test]
    async fn localhost_resolves_to_loopback_seeds() {
        let seeds = seeds_from_arg("localhost:7946,127.0.0.1:7947")
            .await
            .expect("valid");
        assert!(
            seeds.contains(&SocketAddr::from(([127, 0, 0, 1], 7946))),
            "{seeds:?}"
        );
        assert!(seeds.contains(&SocketAddr::from(([127, 0, 0, 1], 7947))));
        assert!(seeds.iter().all(|s| s.ip().is_loopback()), "{seeds:?}");
        // Sorted and deduplicated: a name listed twice gives its addresses once.
        let twice = seeds_from_arg("localhost:7946,localhost:7946")
            .await
            .expect("valid");
        let once = seeds_from_arg("localhost:7946").await.expect("valid");
        assert_eq!(twice, once);
    }
}
