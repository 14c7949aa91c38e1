//! The crate's one lock policy: every `std::sync::Mutex` is taken through [`lock`].
//!
//! Policy, for all of the agent's locks:
//! - Locks are `std::sync::Mutex`, held for a few statements and never across an `.await`; state
//!   that has to live across awaits belongs to one task and travels by message instead.
//! - A poisoned lock is taken as it is. Every critical section leaves its data consistent after
//!   each statement, and a release build aborts on panic (`panic = "abort"`), so a poisoned
//!   guard can only be seen in tests. Skipping the work instead (`if let Ok(..)`) would turn one
//!   bug into silent wrong answers, such as every object looking claimed by another work.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the guard even if a panic poisoned it (see the module policy).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_still_taken() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = lock(&m2);
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
