//! ClusterClaims on the spoke: one object per spokelet claim, server-side applied; ours removed when no longer claimed.
//!
//! Only claims under `spokelet.io` become ClusterClaim objects. The OCM-named ones
//! (`kubeversion`, `platform`, `product`) are reserved: a stock registration agent reports them
//! itself, and an object of that name would compete with it. Every object spokelet creates
//! carries the label `app.kubernetes.io/managed-by: spokelet`, and an object is deleted only
//! when it has the label, a `.spokelet.io` name and spokelet's field manager among its
//! managedFields (a label anyone can set is not proof enough), with a uid and resourceVersion
//! precondition, so a claim someone else recreated or changed meanwhile stays.

use std::collections::BTreeMap;

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
};

use super::claims::Claim;

/// Field manager of the claim writes.
pub const FIELD_MANAGER: &str = "spokelet-pool";
/// Label that marks a ClusterClaim as spokelet's (and so deletable by it).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "spokelet");
/// Suffix of the claims that become objects.
pub const OWN_SUFFIX: &str = ".spokelet.io";

/// The ClusterClaim kind (cluster-scoped, `cluster.open-cluster-management.io/v1alpha1`).
pub fn cluster_claim_resource() -> ApiResource {
    ApiResource {
        group: "cluster.open-cluster-management.io".into(),
        version: "v1alpha1".into(),
        api_version: "cluster.open-cluster-management.io/v1alpha1".into(),
        kind: "ClusterClaim".into(),
        plural: "clusterclaims".into(),
    }
}

/// Why the claims could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ClaimsError {
    /// The spoke has no ClusterClaim CRD (no OCM registration agent installed it).
    #[error(
        "the spoke has no ClusterClaim API (clusterclaims.cluster.open-cluster-management.io); claims are reported to the hub only"
    )]
    NoApi,
    /// A request failed.
    #[error("ClusterClaims: {0}")]
    Api(#[from] kube::Error),
}

/// Whether spokelet wrote this claim: its name is one of spokelet's and spokelet's field manager
/// holds fields of it (the label is only how they are listed).
fn written_by_us(claim: &DynamicObject) -> bool {
    let named = claim
        .metadata
        .name
        .as_deref()
        .is_some_and(|n| n.ends_with(OWN_SUFFIX));
    let managed = claim
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|f| f.manager.as_deref() == Some(FIELD_MANAGER));
    named && managed
}

/// Keeps the spoke's ClusterClaims equal to the pool's spokelet claims.
#[derive(Debug, Clone)]
pub struct ClaimWriter {
    /// ClusterClaims on the spoke (cluster-scoped).
    api: Api<DynamicObject>,
    /// name → value last applied, so an unchanged claim costs no request.
    written: BTreeMap<String, String>,
}

impl ClaimWriter {
    /// A writer that has applied nothing yet (its first sync applies every claim).
    pub fn new(client: kube::Client) -> Self {
        ClaimWriter {
            api: Api::all_with(client, &cluster_claim_resource()),
            written: BTreeMap::new(),
        }
    }

    /// Applies the claims that changed (all of them with `all`, which repairs hand edits) and
    /// deletes spokelet's claims that are no longer made. Returns the requests it made.
    pub async fn sync(&mut self, claims: &[Claim], all: bool) -> Result<usize, ClaimsError> {
        let wanted: BTreeMap<&str, &str> = claims
            .iter()
            .filter(|c| c.name.ends_with(OWN_SUFFIX))
            .map(|c| (c.name.as_str(), c.value.as_str()))
            .collect();
        let mut requests = 0;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for (name, value) in &wanted {
            if !all && self.written.get(*name).map(String::as_str) == Some(*value) {
                continue;
            }
            let doc = serde_json::json!({
                "apiVersion": "cluster.open-cluster-management.io/v1alpha1",
                "kind": "ClusterClaim",
                "metadata": {"name": name, "labels": {MANAGED_BY.0: MANAGED_BY.1}},
                "spec": {"value": value},
            });
            requests += 1;
            self.api
                .patch(name, &params, &Patch::Apply(&doc))
                .await
                .map_err(no_api)?;
            self.written.insert((*name).to_string(), (*value).to_string());
        }
        let names_changed = self.written.keys().any(|k| !wanted.contains_key(k.as_str()));
        if all || names_changed {
            requests += self.remove_others(&wanted).await?;
        }
        self.written.retain(|k, _| wanted.contains_key(k.as_str()));
        Ok(requests)
    }

    /// Every ClusterClaim on the spoke but those marked spoke-only, as claims (one list).
    pub async fn on_spoke(&self) -> Result<Vec<Claim>, ClaimsError> {
        let selector = format!("!{}", super::claims::SPOKE_ONLY_LABEL);
        let all = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(no_api)?;
        Ok(all
            .into_iter()
            .filter_map(|o| {
                let value = o.data.pointer("/spec/value")?.as_str()?.to_string();
                Some(Claim {
                    name: o.metadata.name?,
                    value,
                })
            })
            .collect())
    }

    /// Deletes spokelet's claims not in `wanted`; returns the requests made.
    async fn remove_others(&self, wanted: &BTreeMap<&str, &str>) -> Result<usize, ClaimsError> {
        let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
        let ours = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(no_api)?;
        let mut requests = 1;
        for claim in ours {
            let Some(name) = claim.metadata.name.as_deref() else {
                continue;
            };
            if wanted.contains_key(name) || !written_by_us(&claim) {
                continue;
            }
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: claim.metadata.uid.clone(),
                    resource_version: claim.metadata.resource_version.clone(),
                }),
                ..DeleteParams::default()
            };
            requests += 1;
            match self.api.delete(name, &params).await {
                Ok(_) => tracing::info!(claim = %name, "ClusterClaim no longer made; deleted"),
                // Gone already, or replaced by someone else's (the uid precondition failed).
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(requests)
    }
}

/// A 404 on the collection means the kind is not served.
fn no_api(e: kube::Error) -> ClaimsError {
    match &e {
        kube::Error::Api(s) if s.code == 404 => ClaimsError::NoApi,
        _ => ClaimsError::Api(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str, manager: &str) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cluster.open-cluster-management.io/v1alpha1", "kind": "ClusterClaim",
            "metadata": {"name": name, "labels": {MANAGED_BY.0: MANAGED_BY.1},
                         "managedFields": [{"manager": manager, "operation": "Apply"}]},
            "spec": {"value": "x"},
        }))
        .unwrap()
    }

    #[test]
    fn only_claims_spokelet_wrote_are_its_to_delete() {
        assert!(written_by_us(&claim("gpu.count.spokelet.io", FIELD_MANAGER)));
        // Labelled by someone else, or named outside spokelet's claims: left alone.
        assert!(!written_by_us(&claim("gpu.count.spokelet.io", "kubectl")));
        assert!(!written_by_us(&claim("region.example.com", FIELD_MANAGER)));
    }
}
