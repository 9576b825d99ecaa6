//! Z2: any pool.toml text parses and validates without panicking.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/fuzz/pool.toml");
    if let Ok(file) = llorch::config::parse(path, text) {
        let _ = llorch::config::validate(path, text, &file);
    }
});
