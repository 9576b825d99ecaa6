//! Z2: bytes → JSON → chat and completion validation never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llorch::api::{ChatRequest, CompletionRequest};
use llorch::config::RequestLimits;

fuzz_target!(|data: &[u8]| {
    let limits = RequestLimits::default();
    if let Ok(request) = serde_json::from_slice::<ChatRequest>(data) {
        let _ = request.to_generation(&limits);
    }
    if let Ok(request) = serde_json::from_slice::<CompletionRequest>(data) {
        let _ = request.to_generation(&limits);
    }
});
