//! The gateway's pooled HTTP clients to upstreams (API §6 step 8): HTTP/1.1 over plain TCP or
//! TLS, no redirects followed, no proxy taken from the environment (an upstream's address comes
//! only from configuration). TLS is verified with Mozilla's roots, or with an upstream's own CA
//! where its `ca_file` names one.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::config::{Config, Upstream};

/// A client to upstreams. Request and response bodies are handed to hyper as they are, with
/// their sizes and without stream adapters in between: a bodiless request is sent without a
/// body, a length stays a length, and chunks stay chunks.
pub type UpstreamClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Body,
>;

/// The client for Mozilla's roots, and one per upstream that has a CA of its own.
#[derive(Debug)]
pub struct UpstreamClients {
    default: UpstreamClient,
    own_ca: HashMap<String, UpstreamClient>,
}

impl UpstreamClients {
    /// The clients `config`'s upstreams need; an unreadable `ca_file` is an error naming it.
    pub fn build(config: &Config) -> anyhow::Result<Self> {
        let mut own_ca = HashMap::new();
        for upstream in config.upstreams.values() {
            if let Some(path) = &upstream.ca_file {
                let roots = roots_from(path).map_err(|e| {
                    anyhow::anyhow!(
                        "upstream {}: ca_file {}: {e}",
                        upstream.name,
                        path.display()
                    )
                })?;
                own_ca.insert(upstream.name.clone(), build_trusting(roots)?);
            }
        }
        Ok(Self {
            default: build(),
            own_ca,
        })
    }

    /// The client for `upstream`.
    pub fn of(&self, upstream: &Upstream) -> &UpstreamClient {
        self.own_ca.get(&upstream.name).unwrap_or(&self.default)
    }
}

/// The CA certificates of a PEM file: at least one, each a trust anchor webpki accepts.
fn roots_from(path: &std::path::Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)? {
        roots.add(cert?)?;
    }
    if roots.is_empty() {
        anyhow::bail!("no certificate in it");
    }
    Ok(roots)
}

/// The client for Mozilla's roots.
pub fn build() -> UpstreamClient {
    client(hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots())
}

/// A client trusting only `roots`.
fn build_trusting(roots: rustls::RootCertStore) -> anyhow::Result<UpstreamClient> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(client(
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls),
    ))
}

/// A client with `TCP_NODELAY`, so that a small request is not held back waiting for an
/// acknowledgement.
fn client(
    tls: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
) -> UpstreamClient {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    let connector = tls.https_or_http().enable_http1().wrap_connector(tcp);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstreams_ca_file_must_hold_a_usable_certificate() {
        let dir = tempfile::tempdir().unwrap();
        assert!(roots_from(&dir.path().join("missing.pem")).is_err());
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let error = roots_from(&empty).unwrap_err().to_string();
        assert!(error.contains("no certificate"), "{error}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(roots_from(&garbage).is_err());
        let ca = rcgen::generate_simple_self_signed(vec!["upstream.test".to_owned()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert_eq!(roots_from(&good).unwrap().len(), 1);
        assert!(build_trusting(roots_from(&good).unwrap()).is_ok());
    }
}
