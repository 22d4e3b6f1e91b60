//! The proxy CA (API §16): the certificate authority a browser agent trusts so that the proxy
//! can terminate its TLS, and the leaf certificates it signs per host.
//!
//! One CA per set of configured `hosts`, created by the first node to start with that set,
//! sealed under the master key and stored insert-if-absent (setting `proxy_ca:<digest>`), so
//! that every node of a cluster serves the same CA, and a master-key rotation re-seals it with
//! the rest. Its name constraints (RFC 5280 §4.2.1.10) permit exactly those DNS names and
//! exclude every IP address: even its own key cannot make a certificate a browser accepts for
//! any other site. Changing `hosts` makes a new CA, which browsers must be given again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use leash_core::b64;
use leash_store::Store;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, PKCS_ECDSA_P256_SHA256, SanType,
};
use serde::{Deserialize, Serialize};

/// The prefix of the settings that hold a CA, sealed (bound to the setting's name).
const SETTING_PREFIX: &str = "proxy_ca:";

/// How long the CA is valid; browsers put no limit on a CA the user installed.
const CA_DAYS: i64 = 3650;
/// How long a leaf is valid, and how long before its end a new one is made.
const LEAF_DAYS: i64 = 30;
const LEAF_RENEW_DAYS: i64 = 7;
const DAY: i64 = 86_400;

/// The CA as stored (sealed).
#[derive(Serialize, Deserialize)]
struct Stored {
    hosts: Vec<String>,
    /// The certificate, DER, base64url.
    cert: String,
    /// The private key, PKCS#8 DER, base64url.
    key: String,
}

/// A leaf certificate for one host, with the chain the proxy presents.
#[derive(Debug)]
pub struct Leaf {
    /// The leaf, then the CA.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER (the same key for every leaf of this node).
    pub key: Vec<u8>,
    /// Unix time after which a new leaf is made.
    renew_at: i64,
}

/// The proxy CA a node holds.
pub struct ProxyCa {
    hosts: Vec<String>,
    cert_der: Vec<u8>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// One key for every leaf: a leaf's key protects only the tunnel between the browser and
    /// this node, and a new key per host would cost a key generation per first visit.
    leaf_key: KeyPair,
    leaves: Mutex<HashMap<String, Arc<Leaf>>>,
}

impl std::fmt::Debug for ProxyCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyCa")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

fn setting_name(hosts: &[String]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(hosts.join("\n").as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{SETTING_PREFIX}{hex}")
}

fn time_of(unix: i64) -> anyhow::Result<time::OffsetDateTime> {
    Ok(time::OffsetDateTime::from_unix_timestamp(unix)?)
}

/// A new CA for `hosts` (sorted, each once), valid from `now`.
fn new_ca(hosts: &[String], now: i64) -> anyhow::Result<Stored> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Leash proxy CA");
    name.push(DnType::OrganizationName, "Leash");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = time_of(now - DAY)?;
    params.not_after = time_of(now + CA_DAYS * DAY)?;
    params.serial_number = Some(random_serial());
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: hosts
            .iter()
            .map(|h| GeneralSubtree::DnsName(h.clone()))
            .collect(),
        excluded_subtrees: excluded(hosts),
    });
    let cert = params.self_signed(&key)?;
    Ok(Stored {
        hosts: hosts.to_vec(),
        cert: b64::encode(cert.der()),
        key: b64::encode(key.serialize_der()),
    })
}

/// What the CA must not sign for, within what it permits: every address (without an
/// iPAddress subtree, addresses would be unconstrained, RFC 5280), and the subdomains of each
/// host (a DNS constraint permits every name under it too), written `.host` as OpenSSL, Go,
/// BoringSSL and webpki read it: subdomains only. A host with another configured host under it
/// keeps its subdomains (an exclusion would win over the other host's permission); the proxy
/// still makes leaves for configured hosts only.
fn excluded(hosts: &[String]) -> Vec<GeneralSubtree> {
    let mut out = vec![
        GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
        GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
    ];
    for host in hosts {
        let below = format!(".{host}");
        if !hosts.iter().any(|other| other.ends_with(&below)) {
            out.push(GeneralSubtree::DnsName(below));
        }
    }
    out
}

fn random_serial() -> rcgen::SerialNumber {
    let mut serial = crate::bootstrap::random_32()[..16].to_vec();
    // Positive, as DER integers are signed.
    serial[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&serial)
}

impl ProxyCa {
    /// The CA for the configured `hosts`: the stored one, or one made and stored now (nodes
    /// agree on one). `None` when no upstream has hosts.
    pub async fn load(
        store: &dyn Store,
        master: &leash_core::aead::MasterKey,
        hosts: &[String],
        now: i64,
    ) -> anyhow::Result<Option<Self>> {
        if hosts.is_empty() {
            return Ok(None);
        }
        let name = setting_name(hosts);
        let candidate = serde_json::to_vec(&new_ca(hosts, now)?)?;
        let sealed = master.seal(&candidate, name.as_bytes());
        let sealed = store.init_setting(&name, &sealed).await?;
        let plain = master.open(&sealed, name.as_bytes()).map_err(|_| {
            anyhow::anyhow!("the master key does not open this database's proxy CA")
        })?;
        let stored: Stored = serde_json::from_slice(&plain)?;
        if stored.hosts != hosts {
            anyhow::bail!("the stored proxy CA {name} is for other hosts");
        }
        Self::from_stored(stored).map(Some)
    }

    fn from_stored(stored: Stored) -> anyhow::Result<Self> {
        let cert_der = b64::decode(&stored.cert)?;
        let key_der = zeroize::Zeroizing::new(b64::decode(&stored.key)?);
        let key = KeyPair::try_from(key_der.as_slice())?;
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)?;
        let cert_pem = pem(&cert_der);
        Ok(Self {
            hosts: stored.hosts,
            cert_der,
            cert_pem,
            issuer,
            leaf_key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM, for the browser to trust (`leash proxy ca`).
    pub fn pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The hosts it may sign for.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// The leaf for `host`, made once and kept until a week before it ends; `None` for a host
    /// not configured (the CA could not sign for it anyway).
    pub fn leaf(&self, host: &str, now: i64) -> anyhow::Result<Option<Arc<Leaf>>> {
        if !self.hosts.iter().any(|h| h == host) {
            return Ok(None);
        }
        let mut leaves = self
            .leaves
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(leaf) = leaves.get(host).filter(|l| l.renew_at > now) {
            return Ok(Some(Arc::clone(leaf)));
        }
        let leaf = Arc::new(self.sign_leaf(host, now)?);
        leaves.insert(host.to_owned(), Arc::clone(&leaf));
        Ok(Some(leaf))
    }

    fn sign_leaf(&self, host: &str, now: i64) -> anyhow::Result<Leaf> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        params.subject_alt_names = vec![SanType::DnsName(host.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = time_of(now - DAY)?;
        params.not_after = time_of(now + LEAF_DAYS * DAY)?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&self.leaf_key, &self.issuer)?;
        Ok(Leaf {
            chain: vec![cert.der().to_vec(), self.cert_der.clone()],
            key: self.leaf_key.serialize_der(),
            renew_at: now + (LEAF_DAYS - LEAF_RENEW_DAYS) * DAY,
        })
    }

    /// Signs a leaf for any name, ignoring the configured hosts: what a stolen CA key could
    /// do, for tests that show browsers refuse it.
    #[cfg(test)]
    fn sign_any(&self, host: &str, now: i64) -> anyhow::Result<Leaf> {
        self.sign_leaf(host, now)
    }
}

fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    fn ca(hosts: &[&str], now: i64) -> ProxyCa {
        let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        ProxyCa::from_stored(new_ca(&hosts, now).unwrap()).unwrap()
    }

    /// Verifies `leaf` for `name` as a TLS client would (webpki, the CA as the only anchor).
    fn verify(ca: &ProxyCa, leaf: &Leaf, name: &str, now: i64) -> Result<(), webpki::Error> {
        let anchor_der = CertificateDer::from(ca.der().to_vec());
        let anchor = webpki::anchor_from_trusted_cert(&anchor_der)?;
        let leaf_der = CertificateDer::from(leaf.chain[0].clone());
        let cert = webpki::EndEntityCert::try_from(&leaf_der)?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.unsigned_abs())),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )?;
        cert.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
    }

    #[test]
    fn a_leaf_for_a_configured_host_verifies_and_is_kept() {
        let now = 1_800_000_000;
        let ca = ca(&["finance.example.com", "portal.example.org"], now);
        let leaf = ca.leaf("finance.example.com", now).unwrap().unwrap();
        verify(&ca, &leaf, "finance.example.com", now).unwrap();
        assert!(verify(&ca, &leaf, "portal.example.org", now).is_err());
        let again = ca.leaf("finance.example.com", now + DAY).unwrap().unwrap();
        assert!(Arc::ptr_eq(&leaf, &again), "a leaf is made once");
        let renewed = ca
            .leaf("finance.example.com", now + (LEAF_DAYS - 1) * DAY)
            .unwrap()
            .unwrap();
        assert!(
            !Arc::ptr_eq(&leaf, &renewed),
            "a leaf near its end is made again"
        );
        assert!(ca.pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
    }

    #[test]
    fn the_ca_makes_no_leaf_for_another_host_and_a_forged_one_is_refused_by_its_constraints() {
        let now = 1_800_000_000;
        let ca = ca(&["finance.example.com"], now);
        assert!(ca.leaf("bank.example.com", now).unwrap().is_none());
        // With the CA's own key: a browser still refuses it (name constraints).
        for name in [
            "bank.example.com",
            "example.com",
            "finance.example.com.evil.net",
            "evil.finance.example.com",
            "www.finance.example.com",
        ] {
            let forged = ca.sign_any(name, now).unwrap();
            assert!(
                verify(&ca, &forged, name, now).is_err(),
                "{name} was accepted"
            );
        }
        // A subdomain of a configured host is inside a DNS name constraint by RFC 5280; the
        // proxy never makes one (only exact hosts), and a forged one is what the CA could do.
        let forged_ip = {
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let cert = params.signed_by(&ca.leaf_key, &ca.issuer).unwrap();
            Leaf {
                chain: vec![cert.der().to_vec()],
                key: Vec::new(),
                renew_at: 0,
            }
        };
        assert!(verify(&ca, &forged_ip, "127.0.0.1", now).is_err());
    }

    #[test]
    fn a_host_under_another_configured_host_keeps_its_leaf() {
        let now = 1_800_000_000;
        let ca = ca(
            &[
                "app.finance.example.com",
                "finance.example.com",
                "other.example",
            ],
            now,
        );
        for host in [
            "app.finance.example.com",
            "finance.example.com",
            "other.example",
        ] {
            let leaf = ca.leaf(host, now).unwrap().unwrap();
            verify(&ca, &leaf, host, now).unwrap();
        }
        let forged = ca.sign_any("x.other.example", now).unwrap();
        assert!(verify(&ca, &forged, "x.other.example", now).is_err());
    }

    #[test]
    fn the_setting_names_the_host_set() {
        let a = setting_name(&["a.example".into(), "b.example".into()]);
        let b = setting_name(&["a.example".into()]);
        assert!(a.starts_with(SETTING_PREFIX));
        assert_ne!(a, b);
    }
}
