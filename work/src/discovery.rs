//! Maps a manifest's apiVersion/kind to an API resource via discovery, cached. A miss queries the
//! group-version afresh once (so a CRD applied a moment ago resolves), then fails clearly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::Client;
use kube::api::{ApiResource, GroupVersionKind};
use kube::discovery::{ApiCapabilities, Scope};

use spokelet_base::lock::lock;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The API server serves no such kind, even after a fresh look.
    #[error("kind {kind} is not served by the API server in {api_version} (checked discovery again)")]
    UnknownKind { api_version: String, kind: String },
    /// Discovery itself failed (network, auth).
    #[error("discovery of {api_version}: {}", super::object::api_message(source))]
    Request {
        api_version: String,
        #[source]
        source: kube::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Resolved {
    /// Group, version, kind and plural, for dynamic API calls.
    pub ar: ApiResource,
    /// Whether objects of this kind live in namespaces.
    pub namespaced: bool,
}

/// Cached discovery shared by every work.
#[derive(Clone)]
pub struct Resolver {
    client: Client,
    /// GVK -> resource. Only positive answers are cached: a missing kind may appear any moment (CRDs).
    cache: Arc<Mutex<HashMap<GroupVersionKind, Resolved>>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    pub fn new(client: Client) -> Self {
        Resolver {
            client,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Cached answer only.
    pub fn cached(&self, gvk: &GroupVersionKind) -> Option<Resolved> {
        lock(&self.cache).get(gvk).cloned()
    }

    /// Resolves a kind: the cache, else one fresh query of its group-version.
    pub async fn resolve(&self, group: &str, version: &str, kind: &str) -> Result<Resolved, DiscoveryError> {
        let gvk = GroupVersionKind::gvk(group, version, kind);
        if let Some(r) = self.cached(&gvk) {
            return Ok(r);
        }
        let api_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        match kube::discovery::pinned_kind(&self.client, &gvk).await {
            Ok((ar, caps)) => {
                let r = Resolved {
                    ar,
                    namespaced: is_namespaced(&caps),
                };
                lock(&self.cache).insert(gvk, r.clone());
                Ok(r)
            }
            // 404 for the group-version, or the kind missing from it: unknown kind.
            Err(kube::Error::Api(s)) if s.code == 404 => Err(DiscoveryError::UnknownKind {
                api_version,
                kind: kind.into(),
            }),
            Err(kube::Error::Discovery(_)) => Err(DiscoveryError::UnknownKind {
                api_version,
                kind: kind.into(),
            }),
            Err(source) => Err(DiscoveryError::Request { api_version, source }),
        }
    }

    /// The kind served as `plural` in a group-version: the cache, else one query of the
    /// group-version (whose kinds are then cached). None when it is not served.
    pub async fn kind_of(&self, group: &str, version: &str, plural: &str) -> Option<String> {
        let cached = lock(&self.cache)
            .iter()
            .find(|(gvk, r)| gvk.group == group && gvk.version == version && r.ar.plural == plural)
            .map(|(gvk, _)| gvk.kind.clone());
        if cached.is_some() {
            return cached;
        }
        let gv = kube::core::GroupVersion::gv(group, version);
        let api_group = kube::discovery::pinned_group(&self.client, &gv).await.ok()?;
        let mut found = None;
        let mut cache = lock(&self.cache);
        for (ar, caps) in api_group.versioned_resources(version) {
            if ar.plural == plural {
                found = Some(ar.kind.clone());
            }
            let gvk = GroupVersionKind::gvk(&ar.group, &ar.version, &ar.kind);
            let namespaced = is_namespaced(&caps);
            cache.entry(gvk).or_insert(Resolved { ar, namespaced });
        }
        found
    }

    /// Forgets a kind (after its CRD is deleted, say).
    pub fn forget(&self, gvk: &GroupVersionKind) {
        lock(&self.cache).remove(gvk);
    }
}

fn is_namespaced(caps: &ApiCapabilities) -> bool {
    matches!(caps.scope, Scope::Namespaced)
}

/// An ApiResource for calls addressed by group/version/plural only (pruning, deletion), where the
/// kind is not known and not needed for the URL.
pub(crate) fn api_resource_for(group: &str, version: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        },
        kind: String::new(),
        plural: plural.to_string(),
    }
}
