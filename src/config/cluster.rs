//! `[cluster]` checked: a node name, a loopback listener (links are not encrypted yet, so a
//! listener off loopback is refused), and peers as `host:port`.

use std::net::SocketAddr;

use super::schema::ClusterSection;
use super::ConfigError;

/// The cluster settings of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's name.
    pub node: String,
    /// Where the cluster listener binds.
    pub listen: SocketAddr,
    /// The peers' listeners, `host:port`.
    pub peers: Vec<String>,
}

/// Validates `[cluster]`; `fail` places an error on the section's field.
pub fn validate_cluster(
    section: &ClusterSection,
    fail: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ClusterConfig, ConfigError> {
    let node = section.node.trim();
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if node.is_empty() || node.len() > 64 || !node.chars().all(allowed) {
        return Err(fail(
            "node",
            format!("{node:?} is not a node name (1 to 64 letters, digits, '-', '_' or '.')"),
        ));
    }
    let listen: SocketAddr = section.listen.parse().map_err(|_| {
        fail(
            "listen",
            format!(
                "{:?} is not an address such as \"127.0.0.1:7410\"",
                section.listen
            ),
        )
    })?;
    if !listen.ip().is_loopback() {
        return Err(fail(
            "listen",
            format!(
                "{listen} is not a loopback address: cluster links are authenticated by the \
                 cookie but not encrypted, so the listener must stay on loopback"
            ),
        ));
    }
    let mut peers: Vec<String> = Vec::new();
    for peer in &section.peers {
        let port = peer.rsplit_once(':').and_then(|(host, port)| {
            (!host.is_empty())
                .then(|| port.parse::<u16>().ok())
                .flatten()
        });
        if port.is_none_or(|port| port == 0) {
            return Err(fail(
                "peers",
                format!("{peer:?} is not a host:port such as \"127.0.0.1:7411\""),
            ));
        }
        if peer.parse::<SocketAddr>().is_ok_and(|addr| addr == listen) {
            return Err(fail("peers", format!("{peer} is this node's own listener")));
        }
        if peers.contains(peer) {
            return Err(fail("peers", format!("{peer} is listed twice")));
        }
        peers.push(peer.clone());
    }
    Ok(ClusterConfig {
        node: node.to_string(),
        listen,
        peers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(node: &str, listen: &str, peers: &[&str]) -> Result<ClusterConfig, String> {
        let section = ClusterSection {
            node: node.to_string(),
            listen: listen.to_string(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
        };
        validate_cluster(&section, &|field, message| ConfigError {
            file: "pool.toml".into(),
            line: None,
            field: format!("cluster.{field}"),
            message,
        })
        .map_err(|err| err.to_string())
    }

    #[test]
    fn a_loopback_node_with_peers_is_taken() {
        let config = check("a", "127.0.0.1:7410", &["127.0.0.1:7411", "localhost:7412"]).unwrap();
        assert_eq!(config.node, "a");
        assert_eq!(config.listen.port(), 7410);
        assert_eq!(config.peers.len(), 2);
    }

    #[test]
    fn bad_names_addresses_and_peers_are_refused_with_their_field() {
        for (node, listen, peers, field, words) in [
            (
                "",
                "127.0.0.1:1",
                &[][..],
                "cluster.node",
                "not a node name",
            ),
            ("a b", "127.0.0.1:1", &[], "cluster.node", "not a node name"),
            ("a", "nowhere", &[], "cluster.listen", "not an address"),
            ("a", "0.0.0.0:7410", &[], "cluster.listen", "loopback"),
            (
                "a",
                "127.0.0.1:1",
                &["noport"],
                "cluster.peers",
                "host:port",
            ),
            ("a", "127.0.0.1:1", &["h:0"], "cluster.peers", "host:port"),
            (
                "a",
                "127.0.0.1:1",
                &["127.0.0.1:1"],
                "cluster.peers",
                "own listener",
            ),
            (
                "a",
                "127.0.0.1:1",
                &["h:2", "h:2"],
                "cluster.peers",
                "twice",
            ),
        ] {
            let err = check(node, listen, peers).unwrap_err();
            assert!(err.contains(field) && err.contains(words), "{err}");
        }
    }
}
