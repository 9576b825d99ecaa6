//! `[cluster]` checked: a node name, a listener (on loopback unless links use TLS), peers as
//! `host:port`, and the TLS files (all three or none; relative paths from the pool file's
//! folder).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// The TLS files of mutual TLS on every link, when set.
    pub tls: Option<ClusterTls>,
}

/// The PEM files of a node's TLS links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTls {
    /// This node's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The cluster's certificate authority.
    pub ca: PathBuf,
}

/// Validates `[cluster]`; `fail` places an error on the section's field.
pub fn validate_cluster(
    section: &ClusterSection,
    base: &Path,
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
    let tls = validate_tls(section, base, fail)?;
    if !listen.ip().is_loopback() && tls.is_none() {
        return Err(fail(
            "listen",
            format!(
                "{listen} is not a loopback address: a listener off loopback needs TLS \
                 (tls_cert, tls_key and tls_ca)"
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
        tls,
    })
}

/// The TLS files: all three or none, each an existing file.
fn validate_tls(
    section: &ClusterSection,
    base: &Path,
    fail: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<ClusterTls>, ConfigError> {
    let fields = [
        ("tls_cert", &section.tls_cert),
        ("tls_key", &section.tls_key),
        ("tls_ca", &section.tls_ca),
    ];
    if fields.iter().all(|(_, value)| value.is_none()) {
        return Ok(None);
    }
    let mut paths = Vec::new();
    for (field, value) in fields {
        let Some(value) = value else {
            return Err(fail(
                field,
                "missing: TLS needs tls_cert, tls_key and tls_ca together".to_string(),
            ));
        };
        let path = base.join(value);
        if !path.is_file() {
            return Err(fail(field, format!("{} is not a file", path.display())));
        }
        paths.push(path);
    }
    let [cert, key, ca] = <[PathBuf; 3]>::try_from(paths).map_err(|_| {
        fail(
            "tls_cert",
            "TLS needs tls_cert, tls_key and tls_ca".to_string(),
        )
    })?;
    Ok(Some(ClusterTls { cert, key, ca }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(node: &str, listen: &str, peers: &[&str]) -> Result<ClusterConfig, String> {
        let section = ClusterSection {
            node: node.to_string(),
            listen: listen.to_string(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        };
        check_section(&section, Path::new("."))
    }

    fn check_section(section: &ClusterSection, base: &Path) -> Result<ClusterConfig, String> {
        validate_cluster(section, base, &|field, message| ConfigError {
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

    #[test]
    fn tls_takes_three_files_and_lets_the_listener_off_loopback() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["node.pem", "node.key", "ca.pem"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        let mut section = ClusterSection {
            node: "a".into(),
            listen: "0.0.0.0:7410".into(),
            peers: vec![],
            tls_cert: Some("node.pem".into()),
            tls_key: Some("node.key".into()),
            tls_ca: Some("ca.pem".into()),
        };
        let config = check_section(&section, dir.path()).unwrap();
        assert_eq!(config.tls.unwrap().ca, dir.path().join("ca.pem"));
        section.tls_ca = Some("missing.pem".into());
        let err = check_section(&section, dir.path()).unwrap_err();
        assert!(
            err.contains("cluster.tls_ca") && err.contains("not a file"),
            "{err}"
        );
        section.tls_ca = None;
        let err = check_section(&section, dir.path()).unwrap_err();
        assert!(
            err.contains("cluster.tls_ca") && err.contains("together"),
            "{err}"
        );
    }
}
