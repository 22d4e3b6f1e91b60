//! The gateway's one pooled HTTP client to upstreams (API §6 step 8): HTTP/1.1 over plain TCP
//! or TLS with Mozilla's roots, no redirects followed, no proxy taken from the environment (an
//! upstream's address comes only from configuration).

use axum::body::Body;

/// The client to upstreams. Request and response bodies are handed to hyper as they are, with
/// their sizes and without stream adapters in between: a bodiless request is sent without a
/// body, a length stays a length, and chunks stay chunks.
pub type UpstreamClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Body,
>;

/// Builds the [`UpstreamClient`], with `TCP_NODELAY` so that a small request is not held back
/// waiting for an acknowledgement.
pub fn build() -> UpstreamClient {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}
