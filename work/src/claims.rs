//! Which work claims which spoke object. Two works may share an object only when they want the
//! same content; otherwise the first claimer keeps it and the other gets a clear per-manifest
//! error (two owners with different content would undo each other's apply forever).

use std::collections::{HashMap, HashSet};

use super::object::ObjKey;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Claim {
    work: String,
    /// Manifest ordinal in that work.
    ordinal: usize,
    /// Hash of the desired content; None for claims loaded from the spoke record before the
    /// owning work was seen again (they win ties until then).
    content: Option<String>,
}

/// A claim refused because another work holds the object with different content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} is already applied by work {holder:?} with different content; this work leaves it alone")]
pub struct ClaimConflict {
    pub key: ObjKey,
    /// The work that keeps it.
    pub holder: String,
}

#[derive(Debug, Default)]
pub struct Claims {
    /// Object -> its claims, first claimer first.
    by_key: HashMap<ObjKey, Vec<Claim>>,
    /// Work -> the objects it claims: the inverse of `by_key`, so dropping one work's claims
    /// touches only its own objects. Scanning every claim instead made each reconcile linear in
    /// all the works' objects (quadratic over thousands of works) and held the lock the drift
    /// watcher needs for that long.
    by_work: HashMap<String, HashSet<ObjKey>>,
}

impl Claims {
    /// Claims `key` for `work`, unless another work holds it with different content.
    pub fn claim(
        &mut self,
        key: &ObjKey,
        work: &str,
        ordinal: usize,
        content: &str,
    ) -> Result<(), ClaimConflict> {
        let list = self.by_key.entry(key.clone()).or_default();
        if let Some(other) = list
            .iter()
            .find(|c| c.work != work && c.content.as_deref() != Some(content))
        {
            return Err(ClaimConflict {
                key: key.clone(),
                holder: other.work.clone(),
            });
        }
        list.retain(|c| c.work != work);
        list.push(Claim {
            work: work.to_string(),
            ordinal,
            content: Some(content.to_string()),
        });
        self.by_work
            .entry(work.to_string())
            .or_default()
            .insert(key.clone());
        Ok(())
    }

    /// Records a claim read from an AppliedManifestWork at start-up (content unknown yet).
    pub fn preload(&mut self, key: &ObjKey, work: &str) {
        let list = self.by_key.entry(key.clone()).or_default();
        if !list.iter().any(|c| c.work == work) {
            list.push(Claim {
                work: work.to_string(),
                ordinal: usize::MAX,
                content: None,
            });
        }
        self.by_work
            .entry(work.to_string())
            .or_default()
            .insert(key.clone());
    }

    /// Drops the claims of `work` except on `keep`. Costs the number of objects `work` claims.
    pub fn retain_work(&mut self, work: &str, keep: &HashSet<ObjKey>) {
        let Some(mine) = self.by_work.get_mut(work) else {
            return;
        };
        let dropped: Vec<ObjKey> = mine.iter().filter(|k| !keep.contains(*k)).cloned().collect();
        for k in &dropped {
            mine.remove(k);
        }
        if mine.is_empty() {
            self.by_work.remove(work);
        }
        for k in dropped {
            if let Some(list) = self.by_key.get_mut(&k) {
                list.retain(|c| c.work != work);
                if list.is_empty() {
                    self.by_key.remove(&k);
                }
            }
        }
    }

    /// Whether any work claims `key`.
    pub fn is_claimed(&self, key: &ObjKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// Whether a work other than `work` claims `key`.
    pub fn claimed_elsewhere(&self, key: &ObjKey, work: &str) -> bool {
        self.by_key
            .get(key)
            .is_some_and(|l| l.iter().any(|c| c.work != work))
    }

    /// The (work, ordinal) pairs claiming `key`.
    pub fn owners(&self, key: &ObjKey) -> Vec<(String, usize)> {
        self.by_key
            .get(key)
            .map(|l| l.iter().map(|c| (c.work.clone(), c.ordinal)).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: &str) -> ObjKey {
        ObjKey {
            group: String::new(),
            resource: "configmaps".into(),
            namespace: "ns".into(),
            name: n.into(),
        }
    }

    #[test]
    fn same_content_shares_different_conflicts() {
        let mut c = Claims::default();
        assert!(c.claim(&k("a"), "w1", 0, "h1").is_ok());
        assert!(c.claim(&k("a"), "w2", 3, "h1").is_ok());
        assert!(c.claimed_elsewhere(&k("a"), "w1"));
        assert_eq!(
            c.claim(&k("a"), "w3", 0, "h2").map_err(|e| e.holder),
            Err("w1".to_string())
        );
        // Re-claiming by the same work with new content is fine only when alone.
        c.retain_work("w2", &HashSet::new());
        assert!(c.claim(&k("a"), "w1", 0, "h9").is_ok());
        assert!(!c.claimed_elsewhere(&k("a"), "w1"));
        assert_eq!(c.owners(&k("a")), vec![("w1".to_string(), 0)]);
    }

    #[test]
    fn dropping_a_works_claims_leaves_the_others_and_forgets_unclaimed_objects() {
        let mut c = Claims::default();
        c.claim(&k("a"), "w1", 0, "h").unwrap();
        c.claim(&k("b"), "w1", 1, "h").unwrap();
        c.claim(&k("b"), "w2", 0, "h").unwrap();
        c.preload(&k("c"), "w2");
        c.retain_work("w1", &HashSet::from([k("a")]));
        assert!(c.is_claimed(&k("a")));
        assert_eq!(c.owners(&k("b")), vec![("w2".to_string(), 0)]);
        c.retain_work("w2", &HashSet::new());
        assert!(!c.is_claimed(&k("b")) && !c.is_claimed(&k("c")));
        c.retain_work("w1", &HashSet::new());
        assert!(!c.is_claimed(&k("a")));
        assert!(c.by_key.is_empty() && c.by_work.is_empty(), "{c:?}");
        // A work never seen is a no-op.
        c.retain_work("w9", &HashSet::new());
    }

    #[test]
    fn preloaded_claims_win_until_owner_returns() {
        let mut c = Claims::default();
        c.preload(&k("a"), "w1");
        assert_eq!(
            c.claim(&k("a"), "w2", 0, "h").map_err(|e| e.holder),
            Err("w1".to_string())
        );
        assert!(c.claim(&k("a"), "w1", 0, "h").is_ok());
        assert!(c.claim(&k("a"), "w2", 0, "h").is_ok());
    }
}
