//! Apply order: what other objects depend on goes first, admission webhooks last (a webhook applied
//! early could reject the very objects it is shipped with).

/// Apply tiers, applied one after another; manifests inside a tier go concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Tier {
    /// Namespaces and CRDs (CRDs are then waited on until Established).
    Foundation = 0,
    /// RBAC, service accounts, config, storage, policies.
    Config = 1,
    /// Everything else: workloads, services, custom resources.
    Workload = 2,
    /// Admission webhooks and API services.
    Admission = 3,
}

/// All tiers in apply order.
pub(crate) const TIERS: [Tier; 4] = [Tier::Foundation, Tier::Config, Tier::Workload, Tier::Admission];

/// The tier of a manifest, from its API group and kind only (no discovery needed, so a CR can be
/// placed before its CRD is known).
pub(crate) fn tier(group: &str, kind: &str) -> Tier {
    match (group, kind) {
        ("", "Namespace") | ("apiextensions.k8s.io", "CustomResourceDefinition") => Tier::Foundation,
        (
            "",
            "ServiceAccount"
            | "ConfigMap"
            | "Secret"
            | "ResourceQuota"
            | "LimitRange"
            | "PersistentVolume"
            | "PersistentVolumeClaim",
        )
        | ("rbac.authorization.k8s.io", _)
        | ("scheduling.k8s.io", "PriorityClass")
        | ("storage.k8s.io", _)
        | ("networking.k8s.io", "NetworkPolicy" | "IngressClass")
        | ("policy", _)
        | ("node.k8s.io", "RuntimeClass") => Tier::Config,
        ("admissionregistration.k8s.io", _) | ("apiregistration.k8s.io", "APIService") => Tier::Admission,
        _ => Tier::Workload,
    }
}

/// Splits `apiVersion` into (group, version); core is "".
pub(crate) fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// Orders manifest indices by tier, keeping the work's order inside a tier.
pub(crate) fn plan<'a>(
    items: impl IntoIterator<Item = (usize, &'a str, &'a str)>,
) -> Vec<(Tier, Vec<usize>)> {
    let mut out: Vec<(Tier, Vec<usize>)> = TIERS.iter().map(|t| (*t, Vec::new())).collect();
    for (i, group, kind) in items {
        let t = tier(group, kind);
        if let Some(slot) = out.iter_mut().find(|(tt, _)| *tt == t) {
            slot.1.push(i);
        }
    }
    out.retain(|(_, v)| !v.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers() {
        assert_eq!(tier("", "Namespace"), Tier::Foundation);
        assert_eq!(
            tier("apiextensions.k8s.io", "CustomResourceDefinition"),
            Tier::Foundation
        );
        assert_eq!(tier("rbac.authorization.k8s.io", "ClusterRole"), Tier::Config);
        assert_eq!(tier("", "ConfigMap"), Tier::Config);
        assert_eq!(tier("apps", "Deployment"), Tier::Workload);
        assert_eq!(tier("example.com", "Widget"), Tier::Workload);
        assert_eq!(
            tier("admissionregistration.k8s.io", "ValidatingWebhookConfiguration"),
            Tier::Admission
        );
    }

    #[test]
    fn plan_orders_and_is_stable() {
        let items = vec![
            (0, "admissionregistration.k8s.io", "MutatingWebhookConfiguration"),
            (1, "apps", "Deployment"),
            (2, "example.com", "Widget"),
            (3, "apiextensions.k8s.io", "CustomResourceDefinition"),
            (4, "", "ConfigMap"),
            (5, "", "Namespace"),
        ];
        let p = plan(items);
        let flat: Vec<usize> = p.iter().flat_map(|(_, v)| v.clone()).collect();
        assert_eq!(flat, [3, 5, 4, 1, 2, 0]);
    }

    #[test]
    fn api_version_split() {
        assert_eq!(split_api_version("v1"), ("", "v1"));
        assert_eq!(split_api_version("apps/v1"), ("apps", "v1"));
    }
}
