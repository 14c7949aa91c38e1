//! Drift detection: one label-selected watch per applied kind feeding a cache of our live objects,
//! and a notification to the engine for every outside change (the timing of the correction is
//! `schedule`'s).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::claims::Claims;
use super::object::{MANAGED_LABEL, ObjKey, meta_str};
use spokelet_base::lock::lock;

/// What the cache knows about an object.
#[derive(Debug, Clone)]
pub enum Live {
    /// The kind is not watched yet, or its first list has not finished: ask the server.
    Unknown,
    /// The kind's watch is synced and has no such object (with our label).
    Absent,
    /// The object as last seen (managedFields stripped).
    Present(Arc<Value>),
}

/// A watched kind as (group, version, plural).
type KindKey = (String, String, String);

/// One cached object. The object is kept as compact JSON text, not as a parsed tree: a
/// `serde_json::Value` costs four to six times the bytes of its text, and with thousands of
/// applied objects the parsed cache was most of the agent's memory. Lookups parse on demand,
/// which costs microseconds per object and happens only when a work is reconciled.
#[derive(Debug)]
struct Cached {
    /// `metadata.uid`: a different uid is a re-created object, never a stale version.
    uid: Box<str>,
    /// `metadata.resourceVersion`, to drop stale or repeated updates without parsing `json`.
    resource_version: Box<str>,
    /// The object with `managedFields` stripped, as compact JSON.
    json: Box<str>,
}

impl Cached {
    /// Parses the cached text back into an object.
    fn value(&self) -> Option<Arc<Value>> {
        serde_json::from_str(&self.json).ok().map(Arc::new)
    }
}

struct Inner {
    /// Shared client (one HTTP connection pool for everything).
    client: Client,
    /// Kinds with a running watch, and whether its initial list is done.
    kinds: Mutex<HashMap<KindKey, bool>>,
    /// Our live objects, keyed version-independently.
    objects: Mutex<HashMap<ObjKey, Cached>>,
    /// Where change notifications go (the engine). Bounded ([`NOTIFY_BUFFER`]): when the
    /// engine falls behind, watch tasks wait here and the API server holds the events, instead
    /// of this process queueing without limit.
    tx: mpsc::Sender<ObjKey>,
    /// The engine's claims: only objects a work claims are cached and reported. The label
    /// selector also matches objects of other agents (other hubs on this spoke); holding those
    /// would make the cache grow with the cluster, not with our works. Locked on its own, never
    /// while `objects` is held.
    claims: Arc<Mutex<Claims>>,
    /// Stops every watch task.
    cancel: CancellationToken,
}

/// Change notifications the engine may have queued before watch tasks wait: enough for a burst
/// of edits to many works, small enough to cost nothing (a key is a few short strings).
pub(crate) const NOTIFY_BUFFER: usize = 1024;

/// Watches everything the agent applied (objects carrying [`MANAGED_LABEL`]) and reports changes.
#[derive(Clone)]
pub struct DriftWatcher {
    /// Shared state; cloned into each watch task.
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DriftWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriftWatcher").finish_non_exhaustive()
    }
}

impl DriftWatcher {
    /// A watcher sending the key of every externally changed or deleted object to `tx`.
    pub fn new(
        client: Client,
        tx: mpsc::Sender<ObjKey>,
        cancel: CancellationToken,
        claims: Arc<Mutex<Claims>>,
    ) -> Self {
        DriftWatcher {
            inner: Arc::new(Inner {
                client,
                kinds: Mutex::new(HashMap::new()),
                objects: Mutex::new(HashMap::new()),
                tx,
                claims,
                cancel,
            }),
        }
    }

    /// Starts watching a kind if not already watched.
    pub fn ensure_watch(&self, ar: &ApiResource) {
        let key = (ar.group.clone(), ar.version.clone(), ar.plural.clone());
        {
            let mut kinds = lock(&self.inner.kinds);
            // One watch per group/plural whatever the version: objects are the same.
            if kinds.keys().any(|(g, _, p)| g == &key.0 && p == &key.2) {
                return;
            }
            kinds.insert(key.clone(), false);
        }
        let inner = self.inner.clone();
        let ar = ar.clone();
        tokio::spawn(async move { watch_kind(inner, ar, key).await });
    }

    /// The cache's answer alone, never the server's: on [`Live::Unknown`] the caller asks.
    pub fn lookup(&self, key: &ObjKey) -> Live {
        let synced = lock(&self.inner.kinds)
            .iter()
            .any(|((g, _, p), s)| *s && g == &key.group && p == &key.resource);
        // An object no work claimed may have gone uncached: only the server knows it.
        if !synced || !lock(&self.inner.claims).is_claimed(key) {
            return Live::Unknown;
        }
        match lock(&self.inner.objects).get(key) {
            // Text that does not parse cannot happen (we wrote it); asking the server is safe.
            Some(c) => c.value().map_or(Live::Unknown, Live::Present),
            None => Live::Absent,
        }
    }

    /// Records an object the agent itself just wrote, so its own watch event is not taken for drift.
    /// `obj` should come without `managedFields` (they are skipped here if present).
    pub fn record_write(&self, key: &ObjKey, obj: &Value) {
        let labelled = obj
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(|l| l.get(MANAGED_LABEL))
            .is_some();
        let entry = labelled.then(|| cached_from_value(obj)).flatten();
        let mut objects = lock(&self.inner.objects);
        match entry {
            Some(c) => {
                store(&mut objects, key.clone(), c);
            }
            None => {
                objects.remove(key);
            }
        }
    }

    /// Records that the agent deleted an object.
    pub fn record_delete(&self, key: &ObjKey) {
        lock(&self.inner.objects).remove(key);
    }

    /// Number of cached objects (for tests and metrics).
    pub fn cached_len(&self) -> usize {
        lock(&self.inner.objects).len()
    }
}

/// Stores `new` unless the cache already holds the same or a newer version. Returns whether it changed.
fn store(map: &mut HashMap<ObjKey, Cached>, key: ObjKey, new: Cached) -> bool {
    if let Some(old) = map.get(&key)
        && old.uid == new.uid
    {
        if old.resource_version == new.resource_version {
            return false;
        }
        // resourceVersions are opaque, but etcd-backed servers use increasing numbers; only
        // then is "older" decidable, and an older update is dropped.
        if let (Ok(a), Ok(b)) = (
            old.resource_version.parse::<u64>(),
            new.resource_version.parse::<u64>(),
        ) && b < a
        {
            return false;
        }
    }
    map.insert(key, new);
    true
}

/// A cache entry for an object given as a JSON value (managedFields, if any, are left out).
fn cached_from_value(obj: &Value) -> Option<Cached> {
    let has_managed_fields = obj.get("metadata").and_then(|m| m.get("managedFields")).is_some();
    let json = if has_managed_fields {
        let mut slim = obj.clone();
        if let Some(m) = slim.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
        }
        serde_json::to_string(&slim).ok()?
    } else {
        serde_json::to_string(obj).ok()?
    };
    Some(Cached {
        uid: meta_str(obj, "uid").unwrap_or_default().into(),
        resource_version: meta_str(obj, "resourceVersion").unwrap_or_default().into(),
        json: json.into_boxed_str(),
    })
}

/// A cache entry for a watched object, serialized straight from the typed object (no tree).
fn cached_from_object(mut obj: DynamicObject) -> Option<Cached> {
    obj.metadata.managed_fields = None;
    let json = serde_json::to_string(&obj).ok()?.into_boxed_str();
    Some(Cached {
        uid: obj.metadata.uid.unwrap_or_default().into(),
        resource_version: obj.metadata.resource_version.unwrap_or_default().into(),
        json,
    })
}

fn key_of(ar: &ApiResource, obj: &DynamicObject) -> ObjKey {
    ObjKey {
        group: ar.group.clone(),
        resource: ar.plural.clone(),
        namespace: obj.metadata.namespace.clone().unwrap_or_default(),
        name: obj.metadata.name.clone().unwrap_or_default(),
    }
}

async fn watch_kind(inner: Arc<Inner>, ar: ApiResource, kind: KindKey) {
    let api: Api<DynamicObject> = Api::all_with(inner.client.clone(), &ar);
    let cfg = watcher::Config::default().labels(MANAGED_LABEL);
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut relist: Option<HashSet<ObjKey>> = None;
    loop {
        let ev = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            ev = stream.next() => ev,
        };
        let Some(ev) = ev else { return };
        match ev {
            Ok(Event::Init) => relist = Some(HashSet::new()),
            Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) => {
                let key = key_of(&ar, &o);
                if let Some(seen) = relist.as_mut() {
                    seen.insert(key.clone());
                }
                if !lock(&inner.claims).is_claimed(&key) {
                    continue;
                }
                let Some(entry) = cached_from_object(o) else {
                    continue;
                };
                let changed = store(&mut lock(&inner.objects), key.clone(), entry);
                if changed && !notify(&inner, key).await {
                    return;
                }
            }
            Ok(Event::Delete(o)) => {
                let key = key_of(&ar, &o);
                lock(&inner.objects).remove(&key);
                // Sent even when the cache did not hold it: a deleted object of ours is always
                // worth a look.
                let claimed = lock(&inner.claims).is_claimed(&key);
                if claimed && !notify(&inner, key).await {
                    return;
                }
            }
            Ok(Event::InitDone) => {
                if let Some(seen) = relist.take() {
                    let gone: Vec<ObjKey> = {
                        let mut m = lock(&inner.objects);
                        let gone: Vec<ObjKey> = m
                            .keys()
                            .filter(|k| k.group == ar.group && k.resource == ar.plural && !seen.contains(*k))
                            .cloned()
                            .collect();
                        for k in &gone {
                            m.remove(k);
                        }
                        gone
                    };
                    for k in gone {
                        if !notify(&inner, k).await {
                            return;
                        }
                    }
                }
                lock(&inner.kinds).insert(kind.clone(), true);
            }
            Err(e) => {
                tracing::warn!(kind = %ar.plural, error = %e, "drift watch error; retrying with back-off");
            }
        }
    }
}

/// Tells the engine `key` changed, waiting while its queue is full. False when the watch should
/// end: the agent is shutting down, or the engine is gone.
async fn notify(inner: &Inner, key: ObjKey) -> bool {
    tokio::select! {
        _ = inner.cancel.cancelled() => false,
        sent = inner.tx.send(key) => sent.is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_drops_stale_versions() {
        let mut m = HashMap::new();
        let k = ObjKey {
            group: String::new(),
            resource: "configmaps".into(),
            namespace: "n".into(),
            name: "a".into(),
        };
        let mk = |uid: &str, rv: &str| {
            cached_from_value(
                &serde_json::json!({"metadata": {"uid": uid, "resourceVersion": rv, "managedFields": [1]}}),
            )
            .unwrap()
        };
        assert!(store(&mut m, k.clone(), mk("u", "5")));
        let v = m[&k].value().unwrap();
        assert!(v["metadata"].get("managedFields").is_none());
        assert_eq!(v["metadata"]["resourceVersion"], "5");
        assert!(!store(&mut m, k.clone(), mk("u", "5")));
        assert!(!store(&mut m, k.clone(), mk("u", "4")));
        assert!(store(&mut m, k.clone(), mk("u", "6")));
        // A re-created object (new uid) replaces the entry whatever its version.
        assert!(store(&mut m, k.clone(), mk("u2", "3")));
        assert_eq!(m[&k].value().unwrap()["metadata"]["uid"], "u2");
    }
}
