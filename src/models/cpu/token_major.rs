//! A token-major product output shared by the threads of one matrix product, each writing its
//! own rows: each unit's products come token-major for its own rows, and copying each token's
//! piece into its place saves a full-size buffer and a second pass over it.

/// A `tokens × rows` output that the units of one product fill from several threads, each its
/// own range of rows.
#[derive(Clone)]
pub struct TokenMajor<'a> {
    out: *mut f32,
    rows: usize,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a `TokenMajor` is a mutable borrow of its output split among threads; `write` is
// unsafe and its callers guarantee that no two threads write the same values.
#[allow(unsafe_code)]
unsafe impl Send for TokenMajor<'_> {}
#[allow(unsafe_code)]
unsafe impl Sync for TokenMajor<'_> {}

impl<'a> TokenMajor<'a> {
    /// Borrows `out`, `rows` values per token.
    pub fn new(out: &'a mut [f32], rows: usize) -> TokenMajor<'a> {
        TokenMajor {
            out: out.as_mut_ptr(),
            rows,
            len: out.len(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Writes `part` (the products of rows `first..` with `tokens` tokens, token-major) into
    /// their places.
    ///
    /// # Safety
    /// No other thread may write any of these rows' places while this runs.
    #[allow(unsafe_code)]
    pub unsafe fn write(&self, first: usize, part: &[f32], tokens: usize) {
        let count = part.len() / tokens;
        assert!(first + count <= self.rows && tokens * self.rows == self.len);
        for (t, values) in part.chunks_exact(count).enumerate() {
            // SAFETY: `t * rows + first + count <= tokens * rows = len` (asserted above); the
            // caller guarantees that no other thread touches these places, and `part` is not
            // the output.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    values.as_ptr(),
                    self.out.add(t * self.rows + first),
                    count,
                )
            };
        }
    }
}
