//! Drift detection: one label-selected watch per applied kind feeding a cache of our live objects,
//! plus the pure timing logic (debounce, flap back-off) the engine uses to correct drift without
//! ever fighting another controller in a hot loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::object::{MANAGED_LABEL, ObjKey, meta_str};

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

/// Identity of a watched kind.
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

/// Shared state of the watcher.
struct Inner {
    /// Shared client (one HTTP connection pool for everything).
    client: Client,
    /// Kinds with a running watch, and whether its initial list is done.
    kinds: Mutex<HashMap<KindKey, bool>>,
    /// Our live objects, keyed version-independently.
    objects: Mutex<HashMap<ObjKey, Cached>>,
    /// Where change notifications go (the engine).
    tx: mpsc::UnboundedSender<ObjKey>,
    /// Stops every watch task.
    cancel: CancellationToken,
}

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
    pub fn new(client: Client, tx: mpsc::UnboundedSender<ObjKey>, cancel: CancellationToken) -> Self {
        DriftWatcher {
            inner: Arc::new(Inner {
                client,
                kinds: Mutex::new(HashMap::new()),
                objects: Mutex::new(HashMap::new()),
                tx,
                cancel,
            }),
        }
    }

    /// Starts watching a kind if not already watched.
    pub fn ensure_watch(&self, ar: &ApiResource) {
        let key = (ar.group.clone(), ar.version.clone(), ar.plural.clone());
        {
            let Ok(mut kinds) = self.inner.kinds.lock() else {
                return;
            };
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

    /// What the cache knows about an object.
    pub fn lookup(&self, key: &ObjKey) -> Live {
        let synced = self
            .inner
            .kinds
            .lock()
            .map(|k| {
                k.iter()
                    .any(|((g, _, p), s)| *s && g == &key.group && p == &key.resource)
            })
            .unwrap_or(false);
        if !synced {
            return Live::Unknown;
        }
        let Ok(objects) = self.inner.objects.lock() else {
            return Live::Unknown;
        };
        match objects.get(key) {
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
        if let Ok(mut o) = self.inner.objects.lock() {
            match entry {
                Some(c) => {
                    store(&mut o, key.clone(), c);
                }
                None => {
                    o.remove(key);
                }
            }
        }
    }

    /// Records that the agent deleted an object.
    pub fn record_delete(&self, key: &ObjKey) {
        if let Ok(mut o) = self.inner.objects.lock() {
            o.remove(key);
        }
    }

    /// Number of cached objects (for tests and metrics).
    pub fn cached_len(&self) -> usize {
        self.inner.objects.lock().map(|o| o.len()).unwrap_or(0)
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
                let Some(entry) = cached_from_object(o) else {
                    continue;
                };
                let changed = inner
                    .objects
                    .lock()
                    .map(|mut m| store(&mut m, key.clone(), entry))
                    .unwrap_or(false);
                if changed {
                    let _ = inner.tx.send(key);
                }
            }
            Ok(Event::Delete(o)) => {
                let key = key_of(&ar, &o);
                let had = inner
                    .objects
                    .lock()
                    .map(|mut m| m.remove(&key).is_some())
                    .unwrap_or(false);
                // Even if we did not hold it, a deleted object of ours is worth a look.
                let _ = had;
                let _ = inner.tx.send(key);
            }
            Ok(Event::InitDone) => {
                if let Some(seen) = relist.take() {
                    let gone: Vec<ObjKey> = inner
                        .objects
                        .lock()
                        .map(|mut m| {
                            let gone: Vec<ObjKey> = m
                                .keys()
                                .filter(|k| {
                                    k.group == ar.group && k.resource == ar.plural && !seen.contains(*k)
                                })
                                .cloned()
                                .collect();
                            for k in &gone {
                                m.remove(k);
                            }
                            gone
                        })
                        .unwrap_or_default();
                    for k in gone {
                        let _ = inner.tx.send(k);
                    }
                }
                if let Ok(mut kinds) = inner.kinds.lock() {
                    kinds.insert(kind.clone(), true);
                }
            }
            Err(e) => {
                tracing::warn!(kind = %ar.plural, error = %e, "drift watch error; retrying with back-off");
            }
        }
    }
}

/// Trailing-edge debounce: a key fires `quiet` after its last touch, but never later than
/// `max_wait` after its first, so a constantly changing object is still looked at.
#[derive(Debug)]
pub struct Debouncer<K> {
    /// Quiet period after the last change.
    quiet: Duration,
    /// Upper bound from the first change.
    max_wait: Duration,
    /// Pending keys: (first touch, deadline).
    pending: HashMap<K, (Instant, Instant)>,
}

impl<K: Hash + Eq + Clone> Debouncer<K> {
    /// A debouncer with the given windows.
    pub fn new(quiet: Duration, max_wait: Duration) -> Self {
        Debouncer {
            quiet,
            max_wait,
            pending: HashMap::new(),
        }
    }

    /// Records a change of `key` at `now`.
    pub fn touch(&mut self, key: K, now: Instant) {
        let (quiet, max_wait) = (self.quiet, self.max_wait);
        let e = self.pending.entry(key).or_insert((now, now + quiet));
        e.1 = (now + quiet).min(e.0 + max_wait);
    }

    /// Records a key that must fire no earlier than `at` (a back-off).
    pub fn schedule_at(&mut self, key: K, at: Instant) {
        let e = self.pending.entry(key).or_insert((at, at));
        e.1 = e.1.max(at);
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|(_, d)| *d).min()
    }

    /// Removes and returns the keys due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Vec<K> {
        let due: Vec<K> = self
            .pending
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &due {
            self.pending.remove(k);
        }
        due
    }

    /// Forgets a key.
    pub fn cancel(&mut self, key: &K) {
        self.pending.remove(key);
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Detects a field that keeps flipping (someone else keeps changing what we keep restoring) and
/// backs off exponentially instead of fighting.
#[derive(Debug, Clone)]
pub struct FlapGuard {
    /// Corrections counted within this window.
    window: Duration,
    /// This many corrections within `window` means flapping.
    threshold: usize,
    /// First back-off; doubles each consecutive time, up to `max_backoff`.
    base: Duration,
    /// Longest back-off.
    max_backoff: Duration,
    /// Times of recent corrections.
    history: VecDeque<Instant>,
    /// Consecutive back-offs so far (reset after a quiet window).
    strikes: u32,
    /// No corrections before this instant.
    blocked_until: Option<Instant>,
}

impl Default for FlapGuard {
    fn default() -> Self {
        FlapGuard::new(
            Duration::from_secs(60),
            5,
            Duration::from_secs(1),
            Duration::from_secs(300),
        )
    }
}

impl FlapGuard {
    /// A guard with explicit parameters.
    pub fn new(window: Duration, threshold: usize, base: Duration, max_backoff: Duration) -> Self {
        FlapGuard {
            window,
            threshold,
            base,
            max_backoff,
            history: VecDeque::new(),
            strikes: 0,
            blocked_until: None,
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .history
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.history.pop_front();
        }
        if self.history.is_empty() && self.blocked_until.is_none_or(|b| now >= b + self.window) {
            self.strikes = 0;
        }
    }

    /// Ok if a correction may happen now, else the instant it may.
    pub fn check(&mut self, now: Instant) -> Result<(), Instant> {
        self.expire(now);
        match self.blocked_until {
            Some(until) if now < until => Err(until),
            _ => Ok(()),
        }
    }

    /// Records a correction made at `now`; returns the back-off end if this made it flapping.
    pub fn record(&mut self, now: Instant) -> Option<Instant> {
        self.expire(now);
        self.history.push_back(now);
        if self.history.len() >= self.threshold {
            self.strikes += 1;
            let factor = 2u32.saturating_pow(self.strikes.saturating_sub(1).min(20));
            let backoff = self.base.saturating_mul(factor).min(self.max_backoff);
            let until = now + backoff;
            self.blocked_until = Some(until);
            self.history.clear();
            return Some(until);
        }
        None
    }

    /// Whether the guard is (or recently was) backing off: reported as Degraded.
    pub fn is_flapping(&self, now: Instant) -> bool {
        self.strikes > 0 && self.blocked_until.is_some_and(|b| now < b + self.window)
    }

    /// Consecutive back-offs.
    pub fn strikes(&self) -> u32 {
        self.strikes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn debounce_trailing_with_cap() {
        let mut d = Debouncer::new(Duration::from_millis(50), Duration::from_millis(200));
        let t0 = Instant::now();
        d.touch("a", t0);
        assert_eq!(d.next_deadline(), Some(t0 + Duration::from_millis(50)));
        tokio::time::advance(Duration::from_millis(40)).await;
        d.touch("a", Instant::now());
        assert!(d.take_due(Instant::now()).is_empty());
        assert_eq!(d.next_deadline(), Some(t0 + Duration::from_millis(90)));
        // Keep touching: the cap fires it 200 ms after the first touch.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(30)).await;
            d.touch("a", Instant::now());
            if Instant::now() >= t0 + Duration::from_millis(200) {
                break;
            }
        }
        assert_eq!(d.next_deadline(), Some(t0 + Duration::from_millis(200)));
        tokio::time::sleep_until(t0 + Duration::from_millis(200)).await;
        assert_eq!(d.take_due(Instant::now()), vec!["a"]);
        assert!(d.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_until_deadline_fires_once() {
        let mut d = Debouncer::new(Duration::from_millis(30), Duration::from_millis(100));
        d.touch(1, Instant::now());
        d.touch(2, Instant::now() + Duration::from_millis(10));
        let first = d.next_deadline().unwrap();
        tokio::time::sleep_until(first).await;
        assert_eq!(d.take_due(Instant::now()), vec![1]);
        tokio::time::sleep_until(d.next_deadline().unwrap()).await;
        assert_eq!(d.take_due(Instant::now()), vec![2]);
    }

    #[tokio::test(start_paused = true)]
    async fn flap_guard_backs_off_exponentially_and_recovers() {
        let mut g = FlapGuard::new(
            Duration::from_secs(10),
            3,
            Duration::from_secs(1),
            Duration::from_secs(8),
        );
        let t0 = Instant::now();
        assert!(g.check(t0).is_ok());
        assert!(g.record(t0).is_none());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(g.record(Instant::now()).is_none());
        tokio::time::advance(Duration::from_millis(100)).await;
        let until = g
            .record(Instant::now())
            .expect("third correction in window flaps");
        assert_eq!(until, Instant::now() + Duration::from_secs(1));
        assert!(g.is_flapping(Instant::now()));
        assert_eq!(g.check(Instant::now()), Err(until));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(g.check(Instant::now()).is_ok());
        // Flapping again right away doubles the back-off.
        for _ in 0..2 {
            assert!(g.record(Instant::now()).is_none());
        }
        let until2 = g.record(Instant::now()).unwrap();
        assert_eq!(until2, Instant::now() + Duration::from_secs(2));
        // Capped.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(9)).await;
            let _ = g.check(Instant::now());
            for _ in 0..2 {
                g.record(Instant::now());
            }
            if let Some(u) = g.record(Instant::now()) {
                assert!(u <= Instant::now() + Duration::from_secs(8));
            }
        }
        // A quiet period resets everything.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(g.check(Instant::now()).is_ok());
        assert!(!g.is_flapping(Instant::now()));
        assert_eq!(g.strikes(), 0);
    }

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
