//! Scratch buffers for the forward pass, zeroed by the thread that asks for them.

/// `len` zeros in a fresh vector, written here rather than asked of the allocator as zeroed
/// memory. jemalloc zeroes a large recycled block by handing its pages back to the kernel
/// (`madvise(MADV_DONTNEED)`), so every buffer of every product was faulted in again page by
/// page: 7.6 thousand page faults per 128-token prefill and 64-token decode of the small Q4_0
/// model, single pages of the activations and of a kernel's output faulted up to 180 and 218
/// times in four runs (`perf record -e page-faults -d`). Writing the zeros reuses the block's
/// pages as they are.
pub fn zeros<T: Copy + Default>(len: usize) -> Vec<T> {
    let mut values = Vec::with_capacity(len);
    values.resize(len, T::default());
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_zeros_after_the_block_held_other_values() {
        for len in [0, 1, 5000, 1 << 20] {
            drop(vec![7u32; len]);
            let v: Vec<u32> = zeros(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0));
        }
    }
}
