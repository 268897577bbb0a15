//! A value shared by every session and replaced now and then (the backends table on a reload), with a
//! generation number that says whether it was replaced.
//!
//! A transaction-pool session keeps what it resolved from the value between transactions and, at the start of
//! each, needs only to know whether the value is still the one it resolved against. Loading it through
//! `ArcSwap` for that (a thread-local debt slot taken and given back) cost a transaction about 110 instructions
//! (`benches/instructions.sh`); the generation is one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

pub struct Published<T> {
    value: ArcSwap<T>,
    /// Bumped after each store, so a reader that sees the old generation may only miss a store still under way
    /// (as if it had read just before it).
    generation: AtomicU64,
}

impl<T> Published<T> {
    pub fn new(value: T) -> Published<T> {
        Published {
            value: ArcSwap::from_pointee(value),
            generation: AtomicU64::new(0),
        }
    }

    pub fn load(&self) -> Guard<Arc<T>> {
        self.value.load()
    }

    pub fn load_full(&self) -> Arc<T> {
        self.value.load_full()
    }

    /// The current value and its generation. The generation is read first: if a store lands in between, the
    /// pair is the new value with the old number, which only makes the next [`Published::is_current`] false.
    pub fn load_with_generation(&self) -> (Arc<T>, u64) {
        let generation = self.generation.load(Ordering::Acquire);
        (self.value.load_full(), generation)
    }

    pub fn store(&self, value: Arc<T>) {
        self.value.store(value);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Whether nothing was stored since the value of `generation` was loaded.
    pub fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Ordering::Acquire) == generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_makes_an_earlier_generation_stale() {
        let p = Published::new(1);
        let (v, g) = p.load_with_generation();
        assert_eq!((*v, p.is_current(g)), (1, true));
        p.store(Arc::new(2));
        assert!(!p.is_current(g));
        let (v, g) = p.load_with_generation();
        assert_eq!((*v, *p.load_full(), **p.load()), (2, 2, 2));
        assert!(p.is_current(g));
    }
}
