//! The block allocator of a replica's paged KV cache: reference counts, and the free blocks in
//! least-recently-freed order. A freed block keeps its contents (and its place in the prefix
//! cache) until it is handed out again, so the blocks freed longest ago are reused first.
//!
//! Metadata only: the keys and values live in the model's pool.

/// Marks the end of the free list.
const NONE: u32 = u32::MAX;

/// One block's reference count and its links in the free list.
#[derive(Debug, Clone, Copy)]
struct Node {
    refs: u32,
    prev: u32,
    next: u32,
}

/// Reference counts and the free list of a pool's blocks.
#[derive(Debug)]
pub struct BlockAllocator {
    /// Per block; the free list is linked through them, so a block leaves it in O(1) when a
    /// prefix hit takes it back.
    nodes: Vec<Node>,
    head: u32,
    tail: u32,
    free: usize,
}

impl BlockAllocator {
    /// `blocks` free blocks, handed out in id order at first.
    pub fn new(blocks: usize) -> BlockAllocator {
        assert!(blocks < NONE as usize, "block ids are u32");
        let node = Node {
            refs: 0,
            prev: NONE,
            next: NONE,
        };
        let mut allocator = BlockAllocator {
            nodes: vec![node; blocks],
            head: NONE,
            tail: NONE,
            free: 0,
        };
        for block in 0..blocks as u32 {
            allocator.push_free(block);
        }
        allocator
    }

    fn node(&mut self, block: u32) -> &mut Node {
        let count = self.nodes.len();
        match self.nodes.get_mut(block as usize) {
            Some(node) => node,
            None => unreachable!("block {block} of a pool of {count}"),
        }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.nodes.len()
    }

    /// Blocks no sequence holds (some may still hold cached prefixes).
    pub fn free(&self) -> usize {
        self.free
    }

    /// Blocks some sequence holds.
    pub fn used(&self) -> usize {
        self.total() - self.free
    }

    /// How many sequences hold `block` (tests).
    #[cfg(test)]
    pub fn refs(&self, block: u32) -> u32 {
        self.nodes[block as usize].refs
    }

    /// Takes the block freed longest ago, held once; `None` when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = self.head;
        if block == NONE {
            return None;
        }
        self.unlink(block);
        self.node(block).refs = 1;
        Some(block)
    }

    /// Holds `block` once more (a prefix hit); a free block leaves the free list.
    pub fn share(&mut self, block: u32) {
        if self.node(block).refs == 0 {
            self.unlink(block);
        }
        self.node(block).refs += 1;
    }

    /// Lets go of `block` once; at zero it joins the end of the free list.
    pub fn release(&mut self, block: u32) {
        let node = self.node(block);
        assert!(node.refs > 0, "block {block} released more often than held");
        node.refs -= 1;
        if node.refs == 0 {
            self.push_free(block);
        }
    }

    fn push_free(&mut self, block: u32) {
        let tail = self.tail;
        *self.node(block) = Node {
            refs: 0,
            prev: tail,
            next: NONE,
        };
        match tail {
            NONE => self.head = block,
            tail => self.node(tail).next = block,
        }
        self.tail = block;
        self.free += 1;
    }

    fn unlink(&mut self, block: u32) {
        let Node { prev, next, .. } = *self.node(block);
        match prev {
            NONE => self.head = next,
            prev => self.node(prev).next = next,
        }
        match next {
            NONE => self.tail = prev,
            next => self.node(next).prev = prev,
        }
        let node = self.node(block);
        (node.prev, node.next) = (NONE, NONE);
        self.free -= 1;
    }

    /// The free list from its head (tests).
    #[cfg(test)]
    pub fn free_list(&self) -> Vec<u32> {
        let mut list = Vec::new();
        let mut at = self.head;
        while at != NONE {
            list.push(at);
            at = self.nodes[at as usize].next;
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_handed_out_in_order_then_least_recently_freed_first() {
        let mut a = BlockAllocator::new(4);
        let taken: Vec<u32> = (0..4).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(taken, [0, 1, 2, 3]);
        assert_eq!(a.allocate(), None);
        a.release(2);
        a.release(0);
        assert_eq!(a.free_list(), [2, 0]);
        assert_eq!(a.allocate(), Some(2));
        assert_eq!((a.free(), a.used()), (1, 3));
    }

    #[test]
    fn sharing_takes_a_free_block_off_the_list_and_counts_references() {
        let mut a = BlockAllocator::new(3);
        let b = a.allocate().unwrap();
        a.share(b);
        a.release(b);
        assert_eq!(a.refs(b), 1);
        assert_eq!(a.free_list(), [1, 2]);
        a.release(b);
        assert_eq!(a.free_list(), [1, 2, 0]);
        a.share(2);
        assert_eq!(a.free_list(), [1, 0]);
        assert_eq!(a.refs(2), 1);
        assert_eq!(a.free(), 2);
    }

    #[test]
    #[should_panic(expected = "released more often than held")]
    fn releasing_a_free_block_is_a_bug() {
        let mut a = BlockAllocator::new(1);
        a.release(0);
    }
}
