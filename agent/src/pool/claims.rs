//! The pool as OCM understands it: ClusterClaims and the ManagedCluster status (claims, capacity, allocatable).
//!
//! Claim names are OCM's where OCM has one (`kubeversion`, `platform` and `product` under
//! `open-cluster-management.io`) and ours under `spokelet.io` otherwise. They are few (at most
//! [`MAX_CLAIMS`]) because a stock registration agent copies at most 20 custom claims to the
//! hub, and placements select on them, so each must be worth a selector. Values stay within
//! the claim schema (1 to 1024 characters): a list that would not fit keeps its first items and
//! says how many it left out; a claim with nothing to say (no GPU products on a CPU pool) is
//! not made, since an empty value is invalid.

use std::collections::BTreeMap;

use serde::Serialize;

use super::aggregate::PoolInventory;

/// Longest claim value the ClusterClaim and ManagedCluster schemas accept.
pub const MAX_VALUE: usize = 1024;
/// Most claims spokelet makes (see the module docs).
pub const MAX_CLAIMS: usize = 16;

/// OCM's claim of the Kubernetes version (`v1.30.2`).
pub const KUBE_VERSION: &str = "kubeversion.open-cluster-management.io";
/// OCM's claim of the infrastructure (`AWS`, `GCP`, `Azure`, ..., `Other`).
pub const PLATFORM: &str = "platform.open-cluster-management.io";
/// OCM's claim of the Kubernetes distribution (`EKS`, `GKE`, `K3s`, ..., `Other`).
pub const PRODUCT: &str = "product.open-cluster-management.io";

/// The claim names OCM reserves (`ReservedClusterClaimNames` of its API): reported before, and
/// not counted among, the custom claims.
pub const RESERVED: [&str; 4] = ["id.k8s.io", KUBE_VERSION, PLATFORM, PRODUCT];

/// Custom claims a ManagedCluster's status carries at most: OCM's `--cluster-claims-max`
/// default, so a hub sees what a stock registration agent would show it.
pub const MAX_CUSTOM_CLAIMS: usize = 20;

/// A ClusterClaim with this label stays on the spoke (OCM's `spoke-only`).
pub const SPOKE_ONLY_LABEL: &str = "open-cluster-management.io/spoke-only";

/// The claims a ManagedCluster's status carries, as OCM's registration agent exposes them:
/// every ClusterClaim on the spoke (`on_spoke`, spokelet's own and anyone else's) and
/// spokelet's reserved claims where no object of that name exists; the reserved ones first,
/// then at most `max_custom` others, each part sorted by name.
pub fn exposed(ours: &[Claim], on_spoke: &[Claim], max_custom: usize) -> Vec<Claim> {
    let mut by_name: BTreeMap<&str, &Claim> = on_spoke.iter().map(|c| (c.name.as_str(), c)).collect();
    for c in ours {
        // An object on the spoke speaks for itself, as OCM reads it.
        by_name.entry(c.name.as_str()).or_insert(c);
    }
    let (reserved, custom): (Vec<&Claim>, Vec<&Claim>) = by_name
        .into_values()
        .partition(|c| RESERVED.contains(&c.name.as_str()));
    reserved
        .into_iter()
        .chain(custom.into_iter().take(max_custom))
        .cloned()
        .collect()
}

/// One claim.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Claim {
    /// A DNS subdomain (the ClusterClaim's name).
    pub name: String,
    /// 1 to [`MAX_VALUE`] characters.
    pub value: String,
}

/// What the spoke cluster says about itself, read once per report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterFacts {
    /// The API server's `gitVersion`.
    pub kube_version: String,
    /// OCM platform name.
    pub platform: String,
    /// OCM product name.
    pub product: String,
}

impl ClusterFacts {
    /// Facts from the API server's version and one node's `spec.providerID`.
    pub fn from_parts(git_version: &str, provider_id: Option<&str>) -> Self {
        ClusterFacts {
            kube_version: git_version.to_string(),
            platform: platform_of(provider_id).to_string(),
            product: product_of(git_version).to_string(),
        }
    }
}

/// OCM's platform name from a node's provider id (`aws:///us-east-1a/i-0abc`).
fn platform_of(provider_id: Option<&str>) -> &'static str {
    let scheme = provider_id.and_then(|p| p.split_once("://")).map(|(s, _)| s);
    match scheme {
        Some("aws") => "AWS",
        Some("gce") => "GCP",
        Some("azure") => "Azure",
        Some("ibm") => "IBM",
        Some("openstack") => "OpenStack",
        Some("vsphere") => "VSphere",
        _ => "Other",
    }
}

/// OCM's product name from the version string's vendor suffix (`v1.29.3-eks-adc7111`).
fn product_of(git_version: &str) -> &'static str {
    if git_version.contains("-eks-") {
        "EKS"
    } else if git_version.contains("-gke.") {
        "GKE"
    } else if git_version.contains("+k3s") {
        "K3s"
    } else if git_version.contains("+rke2") {
        "RKE2"
    } else {
        "Other"
    }
}

/// `name=count` items joined by `;` (`NVIDIA H100 80GB HBM3=16;NVIDIA A100-SXM4-40GB=8`).
fn counted(map: &BTreeMap<String, u64>) -> Vec<String> {
    map.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Joins `items` with `;` within [`MAX_VALUE`]: when they do not all fit, as many as fit
/// followed by `;+N more`. None when there are no items (a claim value may not be empty).
pub fn fit(items: &[String]) -> Option<String> {
    if items.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        let sep = if out.is_empty() { "" } else { ";" };
        let left = items.len() - i - 1;
        // Room for this item and, if more follow, the longest possible "more" note.
        let note = if left > 0 {
            format!(";+{} more", items.len()).len()
        } else {
            0
        };
        if out.len() + sep.len() + item.len() + note <= MAX_VALUE {
            out.push_str(sep);
            out.push_str(item);
            continue;
        }
        if out.is_empty() {
            // The first item alone is too long: cut it, leaving room for the note.
            out.push_str(cut(item, MAX_VALUE - note));
            if left > 0 {
                out.push_str(&format!(";+{left} more"));
            }
        } else {
            out.push_str(&format!("{sep}+{} more", items.len() - i));
        }
        break;
    }
    Some(out)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A byte count as a Kubernetes quantity in whole GiB when exact, else in bytes.
fn bytes_quantity(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes > 0 && bytes.is_multiple_of(GIB) {
        format!("{}Gi", bytes / GIB)
    } else {
        bytes.to_string()
    }
}

/// The pool's claims, sorted by name.
pub fn claims(pool: &PoolInventory, facts: &ClusterFacts) -> Vec<Claim> {
    let t = &pool.totals;
    let unhealthy: Vec<String> = pool
        .unhealthy()
        .map(|n| format!("{}:{}", n.name, n.reasons.join(",")))
        .collect();
    let candidates: Vec<(&str, Option<String>)> = vec![
        (KUBE_VERSION, Some(facts.kube_version.clone())),
        (PLATFORM, Some(facts.platform.clone())),
        (PRODUCT, Some(facts.product.clone())),
        ("node.count.spokelet.io", Some(t.nodes.to_string())),
        (
            "node.healthy.count.spokelet.io",
            Some(t.healthy_nodes.to_string()),
        ),
        ("node.rdma.count.spokelet.io", Some(t.rdma_nodes.to_string())),
        ("node.unhealthy.spokelet.io", fit(&unhealthy)),
        ("gpu.count.spokelet.io", Some(t.gpus.to_string())),
        ("gpu.healthy.count.spokelet.io", Some(t.healthy_gpus.to_string())),
        ("gpu.product.spokelet.io", fit(&counted(&t.gpus_by_model))),
        (
            "gpu.memory.spokelet.io",
            (t.gpu_memory_bytes > 0).then(|| bytes_quantity(t.gpu_memory_bytes)),
        ),
        ("gpu.mig.spokelet.io", fit(&counted(&t.mig_by_profile))),
        ("cpu.count.spokelet.io", Some(t.cpus.to_string())),
        ("memory.spokelet.io", Some(bytes_quantity(t.memory_bytes))),
    ];
    let mut out: Vec<Claim> = candidates
        .into_iter()
        .filter_map(|(name, value)| {
            let value = fit(&[value?.chars().filter(|c| !c.is_control()).collect()])?;
            Some(Claim {
                name: name.to_string(),
                value,
            })
        })
        .filter(|c| !c.value.is_empty())
        .collect();
    out.sort();
    out.truncate(MAX_CLAIMS);
    out
}

/// The ManagedCluster `status` fields spokelet owns: `clusterClaims`, `capacity` and
/// `allocatable` (`cpu`, `memory`, `nvidia.com/gpu`: all nodes, and healthy nodes only, since
/// an unhealthy node takes no new work) and `version.kubernetes`.
pub fn managed_cluster_status(
    pool: &PoolInventory,
    facts: &ClusterFacts,
    claims: &[Claim],
) -> serde_json::Value {
    let t = &pool.totals;
    serde_json::json!({
        "clusterClaims": claims,
        "capacity": {
            "cpu": t.cpus.to_string(),
            "memory": bytes_quantity(t.memory_bytes),
            "nvidia.com/gpu": t.gpus.to_string(),
        },
        "allocatable": {
            "cpu": t.healthy_cpus.to_string(),
            "memory": bytes_quantity(t.healthy_memory_bytes),
            "nvidia.com/gpu": t.healthy_gpus.to_string(),
        },
        "version": {"kubernetes": facts.kube_version},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fit_the_schema() {
        assert_eq!(fit(&[]), None);
        assert_eq!(fit(&["a".into(), "b".into()]).as_deref(), Some("a;b"));
        let many: Vec<String> = (0..500)
            .map(|i| format!("node-{i:04}:GpuEccUncorrectable"))
            .collect();
        let v = fit(&many).unwrap();
        assert!(v.len() <= MAX_VALUE, "{}", v.len());
        assert!(v.ends_with(" more"), "{v}");
        let kept = v.split(';').filter(|s| s.starts_with("node-")).count();
        assert!(v.contains(&format!("+{} more", 500 - kept)), "{v}");
        let one = fit(&["x".repeat(5000)]).unwrap();
        assert_eq!(one.len(), MAX_VALUE);
        let two = fit(&["é".repeat(3000), "b".into()]).unwrap();
        assert!(two.len() <= MAX_VALUE && two.ends_with(";+1 more"), "{two}");
    }

    #[test]
    fn facts_name_platform_and_product() {
        let f = ClusterFacts::from_parts("v1.29.3-eks-adc7111", Some("aws:///us-east-1a/i-0abc"));
        assert_eq!((f.platform.as_str(), f.product.as_str()), ("AWS", "EKS"));
        let f = ClusterFacts::from_parts("v1.20.2", None);
        assert_eq!((f.platform.as_str(), f.product.as_str()), ("Other", "Other"));
        assert_eq!(
            ClusterFacts::from_parts("v1.30.1+k3s1", Some("k3s://n1")).product,
            "K3s"
        );
    }

    #[test]
    fn cpu_pool_has_no_empty_claims() {
        let pool = PoolInventory::default();
        let c = claims(&pool, &ClusterFacts::from_parts("v1.20.2", None));
        assert!(
            c.iter()
                .all(|c| !c.value.is_empty() && c.value.len() <= MAX_VALUE)
        );
        assert!(
            c.iter()
                .any(|c| c.name == "gpu.count.spokelet.io" && c.value == "0")
        );
        assert!(!c.iter().any(|c| c.name == "gpu.product.spokelet.io"));
        assert!(c.len() <= MAX_CLAIMS);
        assert_eq!(bytes_quantity(80 << 30), "80Gi");
        assert_eq!(bytes_quantity(1000), "1000");
    }

    #[test]
    fn claims_on_the_spoke_are_exposed_beside_spokelets_reserved_first_and_custom_capped() {
        let c = |name: &str, value: &str| Claim {
            name: name.into(),
            value: value.into(),
        };
        let ours = vec![
            c(KUBE_VERSION, "v1.37.2"),
            c(PLATFORM, "Other"),
            c("gpu.count.spokelet.io", "8"),
        ];
        let mut on_spoke = vec![
            c("gpu.count.spokelet.io", "8"),
            c("id.k8s.io", "4f1c"),
            // Someone else's reserved claim object wins over spokelet's computed value.
            c(PLATFORM, "Equinix"),
        ];
        on_spoke.extend((0..25).map(|i| c(&format!("team{i:02}.example.com"), "x")));
        let exposed = exposed(&ours, &on_spoke, MAX_CUSTOM_CLAIMS);
        let names: Vec<&str> = exposed.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(&names[..3], ["id.k8s.io", KUBE_VERSION, PLATFORM]);
        assert_eq!(exposed[2].value, "Equinix");
        assert_eq!(names.len(), 3 + MAX_CUSTOM_CLAIMS);
        assert_eq!(names[3], "gpu.count.spokelet.io");
        assert_eq!(names[4], "team00.example.com");
        assert!(
            !names.contains(&"team24.example.com"),
            "custom claims past the cap by name are left out"
        );
    }
}
