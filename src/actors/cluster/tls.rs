//! Mutual TLS on cluster links: every node presents a certificate signed by the cluster's
//! authority and accepts only peers that do (rustls with the `ring` provider). The listener
//! takes it through ractor_cluster's `IncomingEncryptionMode::Tls`, the dialler through
//! `client_connect_enc`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::ClusterTls;

/// A node's TLS: how it accepts links and how it dials them.
#[derive(Clone)]
pub struct Tls {
    /// For the listener.
    pub acceptor: TlsAcceptor,
    /// For dialling peers.
    pub connector: TlsConnector,
}

/// Reads the PEM files and builds both sides.
pub fn load(files: &ClusterTls) -> Result<Tls, String> {
    let read = |what: &str, path: &std::path::Path, err: &dyn std::fmt::Display| {
        format!("cluster {what} {}: {err}", path.display())
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .map_err(|err| read("certificate", &files.cert, &err))?;
    if certs.is_empty() {
        return Err(read("certificate", &files.cert, &"no certificate in it"));
    }
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|err| read("key", &files.key, &err))?;
    let mut roots = RootCertStore::empty();
    let authorities = CertificateDer::pem_file_iter(&files.ca)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| read("authority", &files.ca, &err))?;
    for authority in authorities {
        roots
            .add(authority)
            .map_err(|err| read("authority", &files.ca, &err))?;
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|err| read("authority", &files.ca, &err))?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|err| read("certificate", &files.cert, &err))?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|err| read("certificate", &files.cert, &err))?;
    Ok(Tls {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: TlsConnector::from(Arc::new(client)),
    })
}

/// The name a peer's certificate must carry: the host of its `host:port` (an IP address
/// or a DNS name).
pub fn server_name(peer: &str) -> Result<ServerName<'static>, String> {
    let host = peer.rsplit_once(':').map_or(peer, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|err| format!("{peer}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_name_their_host() {
        assert_eq!(
            server_name("127.0.0.1:7410").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            server_name("[::1]:7410").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert_eq!(
            server_name("node-b.example:7410").unwrap(),
            ServerName::try_from("node-b.example").unwrap()
        );
    }
}
