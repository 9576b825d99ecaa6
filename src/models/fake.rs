//! `builtin:fake?ms=N[&load_ms=M]`: a test backend for the reliability suites (compiled only
//! with the `fault-injection` feature). It has the demo tokenizer, a 64K-token context, and a
//! forward pass that sleeps `N` ms (on average) and returns logits that put all probability on
//! the next letter of the alphabet (whatever the sampling settings), never an end token; its
//! load sleeps `M` ms: streams run to `max_tokens` at a known rate, using almost no CPU, so a
//! 2-core machine can hold many concurrent streams (RELIABILITY.md §13).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::error::GenerationError;

/// The fake model's context length.
pub const FAKE_CONTEXT: usize = 65_536;
/// The fake's default time per forward pass.
pub const DEFAULT_MS_PER_TOKEN: u64 = 5;

/// Ids of the demo vocabulary's bytes `a`..`z` (byte tokens follow the 7 special tokens).
const FIRST_LETTER: u32 = 7 + b'a' as u32;

/// Forward passes run by every fake model of this process.
static FORWARDS: AtomicU64 = AtomicU64::new(0);

/// How many forward passes fake models have run in this process (tests compare it before and
/// after a client leaves, to count the steps generated for nobody).
pub fn fake_forwards() -> u64 {
    FORWARDS.load(Ordering::SeqCst)
}

/// The fake model's state.
#[derive(Debug, Clone)]
pub struct FakeModel {
    per_token: Duration,
    vocab: usize,
    /// How much longer than asked the earlier sleeps took, still to be made up.
    overshoot: Duration,
}

impl FakeModel {
    /// A fake whose forward passes take `per_token` each and return `vocab` logits.
    pub fn new(per_token: Duration, vocab: usize) -> Self {
        Self {
            per_token,
            vocab,
            overshoot: Duration::ZERO,
        }
    }

    /// Sleeps one step, then returns logits whose argmax is a letter chosen by `position`.
    ///
    /// A thread sleep ends late (by 0.1–0.2 ms per 5 ms sleep on the VMs that run CI), which
    /// would make the fake slower than its stated rate; each sleep is shortened by what the
    /// earlier ones overran, so forward passes average `per_token`. Time spent outside the
    /// forward pass (the daemon's own work) is not made up.
    pub fn forward(&mut self, position: usize) -> Result<Vec<f32>, GenerationError> {
        let started = Instant::now();
        std::thread::sleep(self.per_token.saturating_sub(self.overshoot));
        let late = (self.overshoot + started.elapsed()).saturating_sub(self.per_token);
        self.overshoot = late.min(self.per_token);
        FORWARDS.fetch_add(1, Ordering::SeqCst);
        let mut logits = vec![0.0f32; self.vocab];
        let letter = FIRST_LETTER as usize + position % 26;
        if let Some(logit) = logits.get_mut(letter) {
            *logit = 100.0;
        }
        Ok(logits)
    }
}

/// Parses the query of `builtin:fake[?ms=N][&load_ms=M]` (either key may be left out) into
/// milliseconds per token and milliseconds per load.
pub fn parse_query(query: Option<&str>) -> Result<(u64, u64), String> {
    let (mut ms, mut load_ms) = (DEFAULT_MS_PER_TOKEN, 0);
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        let number = |value: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("expected builtin:fake?ms=N&load_ms=M, got {pair:?}"))
        };
        match pair.split_once('=') {
            Some(("ms", value)) => ms = number(value)?,
            Some(("load_ms", value)) => load_ms = number(value)?,
            _ => {
                return Err(format!(
                    "expected builtin:fake?ms=N&load_ms=M, got {pair:?}"
                ))
            }
        }
    }
    Ok((ms, load_ms))
}
