//! Cluster links over mutual TLS: two daemons with certificates of one test authority join
//! and serve each other's models; a node whose certificate another authority signed (same
//! cookie) is refused by the handshake and never listed, as is a node without TLS.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{free_port, model_nodes, node, pool, post, COOKIE};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use serde_json::json;

/// A certificate authority.
fn authority(name: &str) -> (Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// Writes `<node>.pem` and `<node>.key`, signed by `ca`, for 127.0.0.1, and `ca.pem`'s
/// name `<trust>`; returns the `[cluster]` lines naming them.
fn tls_files(dir: &Path, node: &str, ca: &(Certificate, KeyPair), trust: &str) -> String {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, node);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    std::fs::write(dir.join(format!("{node}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{node}.key")), key.serialize_pem()).unwrap();
    format!("tls_cert = \"{node}.pem\"\ntls_key = \"{node}.key\"\ntls_ca = \"{trust}\"\n")
}

/// `/v1/models` of a node that sees only `node`'s demo.
fn served(node: &str) -> Vec<(String, Vec<String>)> {
    vec![("demo".to_string(), vec![node.to_string()])]
}

/// `pool(...)` with TLS lines in its `[cluster]` table.
fn tls_pool(
    dir: &Path,
    node: &str,
    port: u16,
    peers: &[u16],
    models: &[(&str, &str)],
    tls: &str,
) -> std::path::PathBuf {
    let path = pool(dir, node, port, peers, models);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("[cluster]\n", &format!("[cluster]\n{tls}")),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_certificates_of_the_cluster_authority_join_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = authority("llorch test cluster");
    std::fs::write(dir.path().join("ca.pem"), ca.0.pem()).unwrap();
    let rogue = authority("another authority");
    let [pa, pb, pd, pe] = [free_port(), free_port(), free_port(), free_port()];
    let demo = [("demo", "builtin:demo")];
    let tls_a = tls_files(dir.path(), "a", &ca, "ca.pem");
    let tls_b = tls_files(dir.path(), "b", &ca, "ca.pem");
    let tls_d = tls_files(dir.path(), "d", &rogue, "ca.pem");
    let a = node(&tls_pool(dir.path(), "a", pa, &[pb], &[], &tls_a), COOKIE).await;
    let b = node(&tls_pool(dir.path(), "b", pb, &[pa], &demo, &tls_b), COOKIE).await;
    let started = Instant::now();
    while model_nodes(&a.url).await != served("b") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a never listed b's demo over TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ask = json!({"model": "demo", "prompt": "Hello", "max_tokens": 12, "temperature": 0});
    let mut answers = Vec::new();
    for url in [&b.url, &a.url] {
        let (_, answer) = post(url, "/v1/completions", &ask).await;
        answers.push(answer["choices"][0]["text"].clone());
    }
    assert!(answers[0].is_string());
    assert_eq!(answers[0], answers[1]);

    // Same cookie, certificate of another authority: the handshake refuses it; a node
    // without TLS cannot talk to a TLS listener either.
    let d = node(&tls_pool(dir.path(), "d", pd, &[pa], &demo, &tls_d), COOKIE).await;
    let e = node(&pool(dir.path(), "e", pe, &[pa], &demo), COOKIE).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(model_nodes(&a.url).await, served("b"));
    assert_eq!(model_nodes(&d.url).await, served("d"));
    assert_eq!(model_nodes(&e.url).await, served("e"));
}
