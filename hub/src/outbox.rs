//! The status outbox both hub transports share: the latest item per key, in arrival order, each
//! key queued at most once.
//!
//! Only a work's newest status is worth sending: an older one would be overwritten on the hub
//! by the next write anyway. Keeping one entry per work bounds the outbox by the number of works,
//! however long the hub is unreachable, and keeping each work's place in the queue means a work
//! whose status changes often cannot starve the others.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

/// Items waiting to be sent, one per key, oldest key first.
///
/// Invariant: a key is in `order` exactly once while it has an item in `pending`, and not at all
/// otherwise.
#[derive(Debug)]
pub struct Outbox<T> {
    order: VecDeque<String>,
    pending: HashMap<String, T>,
}

// Not derived: deriving would require `T: Default`, which an empty outbox does not need.
impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Outbox {
            order: VecDeque::new(),
            pending: HashMap::new(),
        }
    }
}

impl<T> Outbox<T> {
    /// Queues `item` for `key`. An item already queued for the key is replaced in its place: the
    /// newer status supersedes the older, and the work keeps its turn instead of going to the back.
    pub fn push(&mut self, key: String, item: T) {
        self.push_with(key, item, |queued, item| *queued = item);
    }

    /// Queues `item` for `key`, or, when the key is already queued, lets `merge` fold `item` into
    /// the queued one (in its place). For items that are more than "the latest value", such as
    /// the kind of event to send, where a weaker request must not replace a stronger one.
    pub fn push_with(&mut self, key: String, item: T, merge: impl FnOnce(&mut T, T)) {
        match self.pending.entry(key) {
            Entry::Occupied(mut queued) => merge(queued.get_mut(), item),
            Entry::Vacant(slot) => {
                self.order.push_back(slot.key().clone());
                slot.insert(item);
            }
        }
    }

    /// Takes the oldest queued key and its item.
    pub fn pop(&mut self) -> Option<(String, T)> {
        while let Some(key) = self.order.pop_front() {
            if let Some(item) = self.pending.remove(&key) {
                return Some((key, item));
            }
        }
        None
    }

    /// Puts back, first in line, an item whose send failed because the connection went away, so
    /// it is the first thing sent once the connection is back. Does nothing when a newer item for
    /// the key was queued meanwhile: that one is what the hub must get.
    pub fn retry_front(&mut self, key: String, item: T) {
        if let Entry::Vacant(slot) = self.pending.entry(key) {
            self.order.push_front(slot.key().clone());
            slot.insert(item);
        }
    }

    /// Puts back, last in line, an item whose send failed and is retried after a pause, so one
    /// key the receiver keeps refusing does not hold up the others. Does nothing when a newer item
    /// for the key was queued meanwhile: that one is what the hub must get.
    pub fn retry_back(&mut self, key: String, item: T) {
        if let Entry::Vacant(slot) = self.pending.entry(key) {
            self.order.push_back(slot.key().clone());
            slot.insert(item);
        }
    }

    /// Whether an item for `key` is waiting (one sent now is then already outdated).
    pub fn contains(&self, key: &str) -> bool {
        self.pending.contains_key(key)
    }

    /// How many keys wait; each counts once, so this is at most the number of works.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(outbox: &mut Outbox<u32>) -> Vec<(String, u32)> {
        std::iter::from_fn(|| outbox.pop()).collect()
    }

    #[test]
    fn the_latest_item_wins_and_keeps_the_first_place() {
        let mut o = Outbox::default();
        o.push("a".into(), 1);
        o.push("b".into(), 1);
        o.push("a".into(), 2);
        assert_eq!(o.len(), 2);
        assert_eq!(drain(&mut o), [("a".into(), 2), ("b".into(), 1)]);
        assert!(o.is_empty());
    }

    #[test]
    fn push_with_merges_into_the_queued_item() {
        let mut o = Outbox::default();
        o.push_with("a".into(), 5, |q, n| *q = (*q).max(n));
        o.push("b".into(), 1);
        o.push_with("a".into(), 3, |q, n| *q = (*q).max(n));
        assert_eq!(drain(&mut o), [("a".into(), 5), ("b".into(), 1)]);
    }

    #[test]
    fn a_retry_does_not_override_a_newer_item() {
        let mut o = Outbox::default();
        o.push("a".into(), 1);
        let (key, old) = o.pop().unwrap();
        o.push("a".into(), 2);
        assert!(o.contains("a"));
        o.retry_front(key.clone(), old);
        o.retry_back(key, old);
        assert_eq!(drain(&mut o), [("a".into(), 2)]);
    }

    #[test]
    fn retries_go_to_the_front_or_the_back() {
        let mut o = Outbox::default();
        for key in ["a", "b", "c"] {
            o.push(key.into(), 1);
        }
        let (a, one) = o.pop().unwrap();
        let (b, _) = o.pop().unwrap();
        o.retry_front(a, one);
        o.retry_back(b, 2);
        let order: Vec<String> = drain(&mut o).into_iter().map(|(k, _)| k).collect();
        assert_eq!(order, ["a", "c", "b"]);
    }
}
