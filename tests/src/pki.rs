//! A fresh PKI per cluster, made with rcgen: a serving CA and the API server's serving
//! certificate, a separate client CA (what `--client-ca-file` trusts) that signs every user
//! certificate, and the service-account signing key pair.
//!
//! Keys are ECDSA P-256 (rcgen's default with `ring`); Kubernetes accepts them for serving,
//! client authentication and service-account tokens (ES256) alike.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

use crate::HarnessError;

/// How far back certificates start being valid, so that a clock a little behind (another
/// process, a VM) does not see them as not-yet-valid.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
/// Leaf certificates outlive any test run by far.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Host names and addresses the API server's certificate is valid for: loopback, where the
/// tests reach it, and the in-cluster names, for anything that dials the `kubernetes` service.
const SERVING_SANS: &[&str] = &[
    "127.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "10.0.0.1",
];

/// A PEM certificate with its PEM (PKCS#8) private key.
#[derive(Clone)]
pub struct CertAndKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for CertAndKey {
    // The key stays out of logs and panic messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAndKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate authority that can sign leaf certificates.
#[derive(Debug)]
pub struct CertificateAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    cert_pem: String,
}

impl CertificateAuthority {
    /// A new self-signed CA with the given common name.
    pub fn new(common_name: &str) -> Result<Self, HarnessError> {
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, &[])?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = to_time(now - BACKDATE);
        params.not_after = to_time(now + CA_VALIDITY);
        let key = KeyPair::generate().map_err(|e| HarnessError::pki(common_name, e))?;
        let issuer =
            CertifiedIssuer::self_signed(params, key).map_err(|e| HarnessError::pki(common_name, e))?;
        let cert_pem = issuer.pem();
        Ok(CertificateAuthority { issuer, cert_pem })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM (for a signer that issues on its behalf).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A server certificate for `sans` (IP addresses or DNS names).
    pub fn issue_server(&self, common_name: &str, sans: &[&str]) -> Result<CertAndKey, HarnessError> {
        let now = SystemTime::now();
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_string()).collect();
        let mut params = CertificateParams::new(sans).map_err(|e| HarnessError::pki(common_name, e))?;
        params.distinguished_name = name(common_name, &[])?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = to_time(now - BACKDATE);
        params.not_after = to_time(now + LEAF_VALIDITY);
        self.sign(common_name, params)
    }

    /// A client certificate: Kubernetes reads the user name from the common name and the
    /// groups from the organisations.
    pub fn issue_client(
        &self,
        common_name: &str,
        groups: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertAndKey, HarnessError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, groups)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = to_time(not_before);
        params.not_after = to_time(not_after);
        self.sign(common_name, params)
    }

    /// A client certificate valid from a little before now for a year.
    pub fn issue_client_now(&self, common_name: &str, groups: &[&str]) -> Result<CertAndKey, HarnessError> {
        let now = SystemTime::now();
        self.issue_client(common_name, groups, now - BACKDATE, now + LEAF_VALIDITY)
    }

    fn sign(&self, what: &str, params: CertificateParams) -> Result<CertAndKey, HarnessError> {
        let key = KeyPair::generate().map_err(|e| HarnessError::pki(what, e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| HarnessError::pki(what, e))?;
        Ok(CertAndKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Everything one cluster's servers need.
#[derive(Debug)]
pub struct ClusterPki {
    /// Signs the API server's serving certificate; clients trust it (`ca_pem`).
    pub serving_ca: CertificateAuthority,
    /// Signs client certificates; the API server's `--client-ca-file`.
    pub client_ca: CertificateAuthority,
    /// The API server's serving certificate.
    pub serving: CertAndKey,
    /// Service-account token signing key (PKCS#8 PEM), for the API server and the
    /// controller-manager.
    pub service_account_key_pem: String,
    /// Its public half (SPKI PEM), for `--service-account-key-file`.
    pub service_account_pub_pem: String,
}

impl ClusterPki {
    /// Generates a complete, fresh PKI for the cluster called `cluster`.
    pub fn generate(cluster: &str) -> Result<Self, HarnessError> {
        let serving_ca = CertificateAuthority::new(&format!("spokelet-e2e {cluster} serving CA"))?;
        let client_ca = CertificateAuthority::new(&format!("spokelet-e2e {cluster} client CA"))?;
        let serving = serving_ca.issue_server("kube-apiserver", SERVING_SANS)?;
        let sa_key = KeyPair::generate().map_err(|e| HarnessError::pki("service-account key", e))?;
        Ok(ClusterPki {
            serving_ca,
            client_ca,
            serving,
            service_account_key_pem: sa_key.serialize_pem(),
            service_account_pub_pem: sa_key.public_key_pem(),
        })
    }
}

/// X.520 organizationName, which Kubernetes reads as a group.
const ORGANIZATION_NAME_OID: &[u64] = &[2, 5, 4, 10];

/// The most groups a user certificate can carry, see [`name`].
pub const MAX_GROUPS: usize = 2;

/// A subject with `common_name` as CN and each of `organizations` as an O attribute.
///
/// rcgen keeps one value per attribute type, so a second O is written under the same OID
/// spelt as a custom type (`2.5.4.10`), which rcgen keys separately; the DER is the same
/// as for any certificate with two O attributes. More than two are refused rather than
/// silently dropped.
fn name(common_name: &str, organizations: &[&str]) -> Result<DistinguishedName, HarnessError> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    match organizations {
        [] => {}
        [first] => dn.push(DnType::OrganizationName, *first),
        [first, second] => {
            dn.push(DnType::OrganizationName, *first);
            dn.push(DnType::CustomDnType(ORGANIZATION_NAME_OID.to_vec()), *second);
        }
        _ => {
            return Err(HarnessError::TooManyGroups {
                user: common_name.to_string(),
                groups: organizations.len(),
            });
        }
    }
    Ok(dn)
}

fn to_time(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_complete_pki() {
        let pki = ClusterPki::generate("unit").unwrap();
        assert!(pki.serving.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(pki.serving.key_pem.contains("PRIVATE KEY"));
        assert!(pki.service_account_pub_pem.contains("PUBLIC KEY"));
        assert_ne!(pki.serving_ca.cert_pem(), pki.client_ca.cert_pem());
        let user = pki
            .client_ca
            .issue_client_now("alice", &["team-a", "team-b"])
            .unwrap();
        assert!(user.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{user:?}").contains("PRIVATE"));
        assert!(matches!(
            pki.client_ca.issue_client_now("bob", &["a", "b", "c"]),
            Err(HarnessError::TooManyGroups { groups: 3, .. })
        ));
    }
}
