//! Plain LRU, kept only as the baseline that S3-FIFO is measured against (tests and benches).

use super::slab::{List, Slab, NIL};
use std::collections::HashMap;
use std::hash::Hash;

/// Least-recently-used map of at most `capacity` entries; every hit moves the entry to the front.
pub struct Lru<K, V> {
    capacity: usize,
    index: HashMap<K, usize>,
    slab: Slab<(K, V)>,
    order: List,
    /// Entries dropped to make room.
    pub evictions: u64,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    /// An LRU of at most `capacity` entries; 0 stores nothing.
    pub fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            index: HashMap::new(),
            slab: Slab::default(),
            order: List::default(),
            evictions: 0,
        }
    }

    /// The value for `key`, made most recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        let slot = *self.index.get(key)?;
        self.slab.unlink(&mut self.order, slot);
        self.slab.push_front(&mut self.order, slot);
        Some(&self.slab.get(slot).1)
    }

    /// Stores `value`, evicting the least recently used entry when full.
    pub fn insert(&mut self, key: K, value: V) {
        if self.capacity == 0 {
            return;
        }
        if let Some(&slot) = self.index.get(&key) {
            self.slab.get_mut(slot).1 = value;
            return;
        }
        if self.index.len() >= self.capacity && self.order.tail != NIL {
            let tail = self.order.tail;
            self.slab.unlink(&mut self.order, tail);
            let (old, _) = self.slab.take(tail);
            self.index.remove(&old);
            self.evictions += 1;
        }
        let slot = self.slab.insert((key.clone(), value));
        self.slab.push_front(&mut self.order, slot);
        self.index.insert(key, slot);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}
