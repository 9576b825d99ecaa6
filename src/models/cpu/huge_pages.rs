//! Weight buffers on huge pages. Every token streams all the weights; on 4 KiB pages that is a
//! TLB miss every 4 KiB and a hardware prefetcher that stops at each page's end. Linux gives
//! anonymous memory 2 MiB pages only where asked when its THP mode is `madvise` (this
//! machine's, and a common default), and only for whole 2 MiB-aligned ranges, which most single
//! matrices of a small model are not. So a model's weight buffers are carved one after another
//! out of 2 MiB-aligned chunks, asked to be huge pages before anything is written (see
//! [`in_arena`]); a buffer made outside a load is an allocation of its own, on huge pages if it
//! is at least one. A chunk is freed when the last buffer carved from it is dropped.

use std::alloc::Layout;
use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::Arc;

use half::{bf16, f16};

/// A huge page.
const HUGE: usize = 2 << 20;
/// The size of a chunk that weight buffers share (a larger buffer gets a chunk of its own).
const CHUNK: usize = 64 << 20;

/// Types whose all-zero bytes are the value zero and which have no invalid bit patterns.
pub trait Plain: Copy + Send + Sync + 'static {}
impl Plain for u8 {}
impl Plain for f16 {}
impl Plain for bf16 {}
impl Plain for f32 {}

/// One allocation that weight buffers are carved from: 2 MiB-aligned and asked to be huge
/// pages when it is at least one huge page. Such chunks are mapped from the kernel directly
/// (on Linux) and unmapped when dropped, so that an evicted model's memory leaves the process
/// at once instead of waiting in the allocator's cache of freed pages.
struct Chunk {
    ptr: NonNull<u8>,
    layout: Layout,
    mapped: bool,
}

// SAFETY: a chunk is plain memory; its buffers own disjoint ranges of it.
#[allow(unsafe_code)]
unsafe impl Send for Chunk {}
#[allow(unsafe_code)]
unsafe impl Sync for Chunk {}

impl Chunk {
    fn new(size: usize) -> Arc<Chunk> {
        let huge = size >= HUGE;
        let layout = match huge {
            true => Layout::from_size_align(size.next_multiple_of(HUGE), HUGE),
            false => Layout::from_size_align(size.max(1), 64),
        }
        .expect("a chunk's size fits a layout");
        if huge {
            if let Some(ptr) = map_aligned(layout.size()) {
                advise(ptr.as_ptr(), layout.size());
                return Arc::new(Chunk {
                    ptr,
                    layout,
                    mapped: true,
                });
            }
        }
        // SAFETY: the layout's size is not zero.
        #[allow(unsafe_code)]
        let ptr = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        if huge {
            advise(ptr.as_ptr(), layout.size());
        }
        Arc::new(Chunk {
            ptr,
            layout,
            mapped: false,
        })
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if self.mapped {
            unmap(self.ptr.as_ptr(), self.layout.size());
            return;
        }
        // SAFETY: allocated in `Chunk::new` with this layout; no buffer refers to it any more.
        #[allow(unsafe_code)]
        unsafe {
            std::alloc::dealloc(self.ptr.as_ptr(), self.layout)
        };
    }
}

/// `len` bytes (a multiple of [`HUGE`]) of fresh anonymous memory at a 2 MiB boundary: a
/// mapping one huge page longer, its unaligned head and tail given back.
#[cfg(target_os = "linux")]
fn map_aligned(len: usize) -> Option<NonNull<u8>> {
    // SAFETY: an anonymous private mapping of a fresh range; nothing else refers to it. The
    // parts outside the aligned range are unmapped before anything uses them.
    #[allow(unsafe_code)]
    unsafe {
        let whole = len + HUGE;
        let base = libc::mmap(
            std::ptr::null_mut(),
            whole,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = base.cast::<u8>();
        let head = (base as usize).next_multiple_of(HUGE) - base as usize;
        if head > 0 {
            libc::munmap(base.cast(), head);
        }
        let start = base.add(head);
        let tail = whole - head - len;
        if tail > 0 {
            libc::munmap(start.add(len).cast(), tail);
        }
        NonNull::new(start)
    }
}

#[cfg(not(target_os = "linux"))]
fn map_aligned(_len: usize) -> Option<NonNull<u8>> {
    None
}

/// Gives back a mapping of [`map_aligned`].
fn unmap(start: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: `start..start + len` is a mapping of `map_aligned` that no buffer refers to.
    #[allow(unsafe_code)]
    unsafe {
        libc::munmap(start.cast(), len);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, len);
}

/// The chunk a load is carving, and how far.
struct Cursor {
    chunk: Arc<Chunk>,
    used: usize,
}

thread_local! {
    /// `Some` while this thread runs [`in_arena`]; then the chunk being carved, if any.
    static ARENA: RefCell<Option<Option<Cursor>>> = const { RefCell::new(None) };
}

/// Runs `load` with the weight buffers it makes on this thread carved from shared chunks, so
/// that a model's many small matrices lie on huge pages too. The arena ends with `load`; the
/// chunks live as long as their buffers.
pub fn in_arena<R>(load: impl FnOnce() -> R) -> R {
    struct End;
    impl Drop for End {
        fn drop(&mut self) {
            ARENA.with(|arena| arena.borrow_mut().take());
        }
    }
    ARENA.with(|arena| *arena.borrow_mut() = Some(None));
    let _end = End;
    load()
}

/// A zeroed buffer of weights, on huge pages where the system gives them.
pub struct WeightBuffer<T: Plain> {
    /// The allocation this buffer lies in, kept alive by it.
    chunk: Arc<Chunk>,
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: a buffer owns its range of the chunk alone; `T` is plain data.
#[allow(unsafe_code)]
unsafe impl<T: Plain> Send for WeightBuffer<T> {}
#[allow(unsafe_code)]
unsafe impl<T: Plain> Sync for WeightBuffer<T> {}

/// A zeroed buffer of `len` values for weights: carved from the current load's chunk inside
/// [`in_arena`], an allocation of its own elsewhere.
pub fn weight_buffer<T: Plain>(len: usize) -> WeightBuffer<T> {
    let size = len * std::mem::size_of::<T>();
    let align = std::mem::align_of::<T>().max(64);
    let (chunk, offset) = ARENA.with(|arena| match arena.borrow_mut().as_mut() {
        Some(cursor) => {
            let fits = |c: &Cursor| c.used.next_multiple_of(align) + size <= c.chunk.layout.size();
            if !cursor.as_ref().is_some_and(fits) {
                *cursor = Some(Cursor {
                    chunk: Chunk::new(size.max(CHUNK)),
                    used: 0,
                });
            }
            let cursor = cursor.as_mut().expect("a chunk was just made");
            let offset = cursor.used.next_multiple_of(align);
            cursor.used = offset + size;
            (cursor.chunk.clone(), offset)
        }
        None => (Chunk::new(size), 0),
    });
    // SAFETY: `offset + size` lies within the chunk (checked above, or a chunk of its own of
    // at least `size`), `offset` is a multiple of `T`'s alignment (so is the chunk's start:
    // 64 or 2 MiB), and no other buffer is given these bytes; zero bytes are a valid `T`.
    #[allow(unsafe_code)]
    let ptr = unsafe {
        let start = chunk.ptr.as_ptr().add(offset);
        zero(start, size);
        NonNull::new_unchecked(start.cast::<T>())
    };
    WeightBuffer { chunk, ptr, len }
}

/// Writes zeros over `size` bytes at `start`, a huge page's worth at a time on every thread
/// of rayon's pool: the first write to a page of fresh memory has the kernel clear it, which
/// on one thread was most of a model's load.
///
/// # Safety
/// `start..start + size` must be memory this thread may write and that nothing else uses.
#[allow(unsafe_code)]
unsafe fn zero(start: *mut u8, size: usize) {
    use rayon::prelude::*;
    let address = start as usize;
    (0..size.div_ceil(HUGE)).into_par_iter().for_each(|piece| {
        let from = piece * HUGE;
        // SAFETY: the pieces are disjoint parts of the caller's range.
        unsafe { std::ptr::write_bytes((address + from) as *mut u8, 0, HUGE.min(size - from)) };
    });
}

impl<T: Plain> std::ops::Deref for WeightBuffer<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialized values at `ptr`, within the chunk this buffer keeps alive.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr(), self.len)
        }
    }
}

impl<T: Plain> std::ops::DerefMut for WeightBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`; this buffer is the only one with these bytes.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len)
        }
    }
}

impl<T: Plain> std::fmt::Debug for WeightBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let chunk = self.chunk.layout.size();
        write!(
            f,
            "WeightBuffer({} values in a chunk of {chunk} bytes)",
            self.len
        )
    }
}

/// Asks for huge pages over `len` bytes at `start` (2 MiB aligned).
#[cfg(target_os = "linux")]
fn advise(start: *mut u8, len: usize) {
    // SAFETY: `madvise` with MADV_HUGEPAGE only changes how the kernel backs these pages
    // (a whole allocation of this module's); it never changes their contents.
    #[allow(unsafe_code)]
    unsafe {
        libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE)
    };
}

#[cfg(not(target_os = "linux"))]
fn advise(_start: *mut u8, _len: usize) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The `VmFlags` of the mapping in `/proc/self/smaps` that holds `address`.
    fn flags_at(address: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((from, to)) = range.split_once('-') {
                if let (Ok(from), Ok(to)) = (
                    usize::from_str_radix(from, 16),
                    usize::from_str_radix(to, 16),
                ) {
                    inside = (from..to).contains(&address);
                    continue;
                }
            }
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                if inside {
                    return flags.to_string();
                }
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    fn huge(address: usize) -> bool {
        flags_at(address).split_whitespace().any(|f| f == "hg")
    }

    #[test]
    fn buffers_of_a_load_share_huge_page_chunks_and_own_their_values() {
        let (mut small, mut other, large) = in_arena(|| {
            (
                weight_buffer::<u8>(1000),
                weight_buffer::<f32>(300),
                weight_buffer::<f16>(CHUNK),
            )
        });
        // Zeroed, of their lengths, aligned, and writable without touching each other.
        assert!(small.iter().all(|&v| v == 0) && small.len() == 1000);
        assert!(other.iter().all(|&v| v == 0.0) && other.len() == 300);
        assert!(large.iter().all(|&v| v == f16::ZERO) && large.len() == CHUNK);
        small.fill(7);
        other.fill(1.5);
        assert!(small.iter().all(|&v| v == 7) && other.iter().all(|&v| v == 1.5));
        // The two small ones share one chunk, one after the other; the large one has its own.
        let (a, b) = (small.as_ptr() as usize, other.as_ptr() as usize);
        assert_eq!(b, (a + 1000).next_multiple_of(64));
        assert!(Arc::ptr_eq(&small.chunk, &other.chunk));
        assert!(!Arc::ptr_eq(&small.chunk, &large.chunk));
        assert_eq!(small.chunk.ptr.as_ptr() as usize % HUGE, 0);
        assert!(huge(a) && huge(b) && huge(large.as_ptr() as usize + CHUNK));
        // Outside a load, each buffer is an allocation of its own, on huge pages when large.
        let (x, y) = (weight_buffer::<u8>(10), weight_buffer::<u8>(HUGE));
        assert!(!Arc::ptr_eq(&x.chunk, &y.chunk) && x.chunk.layout.size() == 10);
        assert!(huge(y.as_ptr() as usize + HUGE / 2) && y.iter().all(|&v| v == 0));
    }
}
