//! The agent's key pair and certificate signing request, with OCM's subject, and what an issued
//! certificate says (its subject and lifetime).

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
#[cfg(test)]
use x509_parser::prelude::FromDer;

/// Why a key, a request or a certificate cannot be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("making the key pair or request: {0}")]
    Make(#[from] rcgen::Error),
    #[error("the certificate is not PEM: {0}")]
    NotPem(String),
    #[error("the certificate cannot be read: {0}")]
    Certificate(String),
}

/// OCM's group of every registered agent.
pub(crate) const MANAGED_CLUSTERS_GROUP: &str = "system:open-cluster-management:managed-clusters";

/// The user OCM's hub knows an agent by: `system:open-cluster-management:<cluster>:<agent>`.
pub(crate) fn agent_user(cluster: &str, agent: &str) -> String {
    format!("system:open-cluster-management:{cluster}:{agent}")
}

/// The cluster's own group: `system:open-cluster-management:<cluster>`.
pub(crate) fn cluster_group(cluster: &str) -> String {
    format!("system:open-cluster-management:{cluster}")
}

/// A fresh key pair and a request for a client certificate naming the agent as OCM's
/// registration agent does: CN the agent user, O the cluster group and the managed-clusters
/// group. ECDSA P-256, as OCM's agents use.
pub(crate) struct Request {
    /// The private key, PKCS#8 PEM; it never leaves the spoke.
    pub key_pem: String,
    /// The PKCS#10 request, PEM.
    pub csr_pem: String,
}

impl std::fmt::Debug for Request {
    // The key is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").finish_non_exhaustive()
    }
}

/// Makes [`Request`] for `agent` of `cluster`.
pub(crate) fn request(cluster: &str, agent: &str) -> Result<Request, CsrError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, agent_user(cluster, agent));
    name.push(DnType::OrganizationName, cluster_group(cluster));
    // rcgen keeps one value per attribute type; the second organization goes in under O's
    // object identifier (2.5.4.10) spelled as a custom type, which encodes the same.
    name.push(DnType::CustomDnType(vec![2, 5, 4, 10]), MANAGED_CLUSTERS_GROUP);
    params.distinguished_name = name;
    let csr = params.serialize_request(&key)?;
    Ok(Request {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem()?,
    })
}

/// 200 to 249, from the hash of `pem` (see [`Issued::renew_permille`]).
fn renew_permille(pem: &[u8]) -> u32 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(pem);
    200 + u32::from(u16::from_be_bytes([digest[0], digest[1]])) % 50
}

/// What an issued certificate says, as far as joining cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issued {
    /// The subject's common name.
    pub common_name: String,
    /// The subject's organizations (groups).
    pub organizations: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The share of its life left, in thousandths, at which it is renewed: 200 to 249, as OCM's
    /// agent draws it (a fifth of the life plus up to a quarter of that). Drawn from the
    /// certificate's bytes rather than at random, so it stays put for one certificate while
    /// certificates signed together for a fleet still renew spread out.
    pub renew_permille: u32,
}

impl Issued {
    /// Reads the first certificate of a PEM bundle.
    pub(crate) fn from_pem(pem: &[u8]) -> Result<Issued, CsrError> {
        let (_, block) =
            x509_parser::pem::parse_x509_pem(pem).map_err(|e| CsrError::NotPem(e.to_string()))?;
        let cert = block
            .parse_x509()
            .map_err(|e| CsrError::Certificate(e.to_string()))?;
        let text = |attr: &x509_parser::x509::AttributeTypeAndValue<'_>| {
            attr.as_str().unwrap_or_default().to_string()
        };
        let subject = cert.subject();
        let time = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        Ok(Issued {
            common_name: subject.iter_common_name().next().map(text).unwrap_or_default(),
            organizations: subject.iter_organization().map(text).collect(),
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
            renew_permille: renew_permille(pem),
        })
    }

    /// When it is to be renewed: with 20 % to 25 % of its lifetime left (see
    /// [`Issued::renew_permille`]), as OCM's agents renew.
    pub(crate) fn renew_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_after - life * self.renew_permille / 1000
    }

    /// Whether it names `agent` of `cluster`: a certificate for another cluster (or agent) is
    /// never run from.
    pub(crate) fn names(&self, cluster: &str, agent: &str) -> bool {
        self.common_name == agent_user(cluster, agent)
            && self.organizations.iter().any(|o| *o == cluster_group(cluster))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_ocms_subject() {
        let req = request("pool-a", "agent-1").unwrap();
        let (_, block) = x509_parser::pem::parse_x509_pem(req.csr_pem.as_bytes()).unwrap();
        assert_eq!(block.label, "CERTIFICATE REQUEST");
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents).unwrap();
        let subject = &csr.certification_request_info.subject;
        let cn: Vec<&str> = subject.iter_common_name().map(|a| a.as_str().unwrap()).collect();
        let orgs: Vec<&str> = subject.iter_organization().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(cn, ["system:open-cluster-management:pool-a:agent-1"]);
        assert_eq!(
            orgs,
            ["system:open-cluster-management:pool-a", MANAGED_CLUSTERS_GROUP]
        );
        assert!(req.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn an_issued_certificate_is_read_back_and_renewed_with_a_fifth_to_a_quarter_of_its_life_left() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, agent_user("pool-a", "agent-1"));
        name.push(DnType::OrganizationName, cluster_group("pool-a"));
        params.distinguished_name = name;
        params.not_before = rcgen::date_time_ymd(2027, 1, 1);
        params.not_after = rcgen::date_time_ymd(2027, 4, 11);
        let cert = params.self_signed(&key).unwrap();
        let issued = Issued::from_pem(cert.pem().as_bytes()).unwrap();
        assert!(issued.names("pool-a", "agent-1"));
        assert!(!issued.names("pool-b", "agent-1"));
        assert!(!issued.names("pool-a", "agent-2"));
        let at = |y, m, d| {
            let t = rcgen::date_time_ymd(y, m, d).unix_timestamp();
            SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64)
        };
        // 100 days of life: renewed 75 to 80 days in, the same day for the same certificate.
        assert_eq!(issued.not_after, at(2027, 4, 11));
        let renew = issued.renew_at();
        assert!(renew > at(2027, 3, 17) && renew <= at(2027, 3, 22), "{renew:?}");
        assert_eq!(Issued::from_pem(cert.pem().as_bytes()).unwrap().renew_at(), renew);
        let spread: std::collections::HashSet<u32> = (0..64)
            .map(|i| renew_permille(format!("certificate {i}").as_bytes()))
            .collect();
        assert!(spread.iter().all(|p| (200..250).contains(p)));
        assert!(
            spread.len() > 20,
            "a fleet's certificates renew spread out: {spread:?}"
        );
        assert!(Issued::from_pem(b"not a certificate").is_err());
    }
}
