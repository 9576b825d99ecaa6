//! The prefix cache: full KV blocks keyed by everything that decided their contents, so that a
//! prompt starting with the same tokens (a shared system prompt, the next turn of a chat)
//! reuses them instead of computing them again.
//!
//! A block's key is a 128-bit hash of its parent block's key, its own tokens and a salt (the
//! caller's identity unless the pool shares one cache among all callers), from two SipHash
//! states keyed at random when the process starts. A hash alone could collide, so each entry
//! also keeps its parent's key and its tokens, and a lookup compares both: a hit is only ever
//! a block computed from exactly the same tokens in exactly the same position.
//!
//! Entries are metadata only. A cached block stays in the allocator's free list when no
//! sequence holds it; when it is handed out again its entry is dropped ([`PrefixCache::forget`]).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};

/// A block's key: the chained hash of every token up to and including the block's.
pub type BlockKey = u128;

/// The parent key of a sequence's first block.
pub const ROOT: BlockKey = 0;

/// What a cached block was computed from.
#[derive(Debug, Clone)]
struct Entry {
    key: BlockKey,
    parent: BlockKey,
    tokens: Vec<u32>,
}

/// The cached blocks of one pool.
#[derive(Debug)]
pub struct PrefixCache {
    hashers: (RandomState, RandomState),
    by_key: HashMap<BlockKey, u32>,
    entries: Vec<Option<Entry>>,
}

impl PrefixCache {
    /// An empty cache for a pool of `blocks` blocks.
    pub fn new(blocks: usize) -> PrefixCache {
        PrefixCache {
            hashers: (RandomState::new(), RandomState::new()),
            by_key: HashMap::new(),
            entries: vec![None; blocks],
        }
    }

    /// The key of a block of `tokens` after the block keyed `parent`, for callers `salt`.
    pub fn key(&self, parent: BlockKey, tokens: &[u32], salt: u64) -> BlockKey {
        let half = |state: &RandomState| {
            let mut hasher = state.build_hasher();
            (parent, salt).hash(&mut hasher);
            tokens.hash(&mut hasher);
            hasher.finish()
        };
        let key = u128::from(half(&self.hashers.0)) << 64 | u128::from(half(&self.hashers.1));
        key.max(1)
    }

    /// The cached block keyed `key`, if it was computed from `tokens` after `parent`.
    pub fn lookup(&self, parent: BlockKey, key: BlockKey, tokens: &[u32]) -> Option<u32> {
        let block = *self.by_key.get(&key)?;
        let entry = self.entries.get(block as usize)?.as_ref()?;
        (entry.parent == parent && entry.tokens == tokens).then_some(block)
    }

    /// Records that `block` holds `tokens` after `parent`, under `key`. A key already cached
    /// in another block keeps that block; this one stays out of the cache.
    pub fn insert(&mut self, block: u32, parent: BlockKey, key: BlockKey, tokens: &[u32]) {
        let Some(slot) = self.entries.get_mut(block as usize) else {
            return;
        };
        if slot.is_some() || self.by_key.contains_key(&key) {
            return;
        }
        self.by_key.insert(key, block);
        *slot = Some(Entry {
            key,
            parent,
            tokens: tokens.to_vec(),
        });
    }

    /// Drops `block`'s entry (it is being handed out for new contents); returns whether it had
    /// one (an eviction).
    pub fn forget(&mut self, block: u32) -> bool {
        match self.entries.get_mut(block as usize).and_then(Option::take) {
            Some(entry) => {
                self.by_key.remove(&entry.key);
                true
            }
            None => false,
        }
    }

    /// Blocks with an entry.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_depends_on_the_parent_the_tokens_and_the_salt() {
        let cache = PrefixCache::new(4);
        let a = cache.key(ROOT, &[1, 2, 3, 4], 0);
        assert_eq!(a, cache.key(ROOT, &[1, 2, 3, 4], 0));
        assert_ne!(a, cache.key(ROOT, &[1, 2, 3, 5], 0));
        assert_ne!(a, cache.key(ROOT, &[1, 2, 3, 4], 1));
        assert_ne!(cache.key(a, &[1, 2, 3, 4], 0), a);
        assert_ne!(a, ROOT);
    }

    #[test]
    fn a_hit_needs_the_same_parent_and_tokens_under_the_key() {
        let mut cache = PrefixCache::new(4);
        let key = cache.key(ROOT, &[1, 2], 0);
        cache.insert(3, ROOT, key, &[1, 2]);
        assert_eq!(cache.lookup(ROOT, key, &[1, 2]), Some(3));
        // A colliding key with other tokens or another parent is a miss, not a wrong block.
        assert_eq!(cache.lookup(ROOT, key, &[1, 9]), None);
        assert_eq!(cache.lookup(7, key, &[1, 2]), None);
        assert!(cache.forget(3));
        assert!(!cache.forget(3));
        assert_eq!(cache.lookup(ROOT, key, &[1, 2]), None);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_duplicate_key_keeps_the_first_block() {
        let mut cache = PrefixCache::new(4);
        let key = cache.key(ROOT, &[5], 0);
        cache.insert(0, ROOT, key, &[5]);
        cache.insert(1, ROOT, key, &[5]);
        assert_eq!(cache.lookup(ROOT, key, &[5]), Some(0));
        assert!(!cache.forget(1));
        assert_eq!(cache.len(), 1);
    }
}
