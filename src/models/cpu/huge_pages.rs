//! Weight buffers on huge pages. Every token streams all the weights; on 4 KiB pages that is a
//! TLB miss every 4 KiB and a hardware prefetcher that stops at each page's end. Linux gives
//! anonymous memory 2 MiB pages only where asked (`madvise`, the default THP mode), so weight
//! buffers ask before their first write. Elsewhere, or where the kernel declines, the buffer is
//! an ordinary one.

/// A buffer of `len` default values (zeros) for weights, its pages asked to be huge pages
/// before they are first written.
pub fn weight_buffer<T: Copy + Default>(len: usize) -> Vec<T> {
    let mut buffer: Vec<T> = Vec::with_capacity(len);
    advise(buffer.as_ptr().cast(), len * std::mem::size_of::<T>());
    buffer.resize(len, T::default());
    buffer
}

/// Asks for huge pages over the whole 4 KiB pages of `len` bytes at `start`.
#[cfg(target_os = "linux")]
fn advise(start: *const u8, len: usize) {
    const PAGE: usize = 4096;
    let (from, to) = (
        (start as usize).next_multiple_of(PAGE),
        start as usize + len,
    );
    let to = to / PAGE * PAGE;
    if to > from {
        // SAFETY: `madvise` with MADV_HUGEPAGE only changes how the kernel backs these pages
        // (which lie within the buffer's allocation); it never changes their contents.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE)
        };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_start: *const u8, _len: usize) {}

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

    #[test]
    fn weight_buffers_are_zeroed_and_marked_for_huge_pages() {
        let buffer: Vec<u16> = weight_buffer(3 << 20);
        assert_eq!(buffer.len(), 3 << 20);
        assert!(buffer.iter().all(|&v| v == 0));
        let middle = buffer.as_ptr() as usize + buffer.len();
        let flags = flags_at(middle);
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "flags: {flags}"
        );
    }
}
