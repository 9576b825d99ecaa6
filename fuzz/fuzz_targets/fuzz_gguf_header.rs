//! Z2: the GGUF header bounds check never panics, never allocates more than the input, and
//! accepts only headers whose tensors lie inside the input.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = llorch::models::check_gguf(Cursor::new(data), data.len() as u64);
});
