//! Fault injection for tests: arm a fault on a replica (by its `model#index@device` name) and
//! the engine thread acts on it. Compiled only with the `fault-injection` feature, which the
//! test suite enables; release builds have no trace of it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// A fault a replica's engine will hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Panic when about to generate token `k` (0 = during prefill) of the next job.
    PanicAtToken(usize),
    /// Sleep this long when about to generate token `k` of the next job.
    HangAtToken(usize, Duration),
    /// Make the next load fail with this message.
    FailNextLoad(String),
    /// Make the next load panic.
    PanicNextLoad,
    /// Make the next load take this long before it goes on.
    SlowNextLoad(Duration),
    /// Panic in the HTTP handler of the next request for the model (arm it on `handler:<model>`).
    PanicInHandler,
}

fn registry() -> &'static Mutex<HashMap<String, Vec<Fault>>> {
    static FAULTS: OnceLock<Mutex<HashMap<String, Vec<Fault>>>> = OnceLock::new();
    FAULTS.get_or_init(Mutex::default)
}

/// Arms `fault` on the replica named `replica` (e.g. `victim#0@cpu`). Faults fire once, in
/// the order they were armed.
pub fn arm(replica: &str, fault: Fault) {
    let mut faults = registry().lock().unwrap_or_else(|e| e.into_inner());
    faults.entry(replica.to_string()).or_default().push(fault);
}

/// Faults that fired, by replica.
fn fired_registry() -> &'static Mutex<HashMap<String, Vec<Fault>>> {
    static FIRED: OnceLock<Mutex<HashMap<String, Vec<Fault>>>> = OnceLock::new();
    FIRED.get_or_init(Mutex::default)
}

/// Takes the first armed fault of `replica` that `matches`, if any, and records it as fired.
fn take(replica: &str, matches: impl Fn(&Fault) -> bool) -> Option<Fault> {
    let mut faults = registry().lock().unwrap_or_else(|e| e.into_inner());
    let list = faults.get_mut(replica)?;
    let index = list.iter().position(matches)?;
    let fault = list.remove(index);
    let mut fired = fired_registry().lock().unwrap_or_else(|e| e.into_inner());
    fired
        .entry(replica.to_string())
        .or_default()
        .push(fault.clone());
    Some(fault)
}

/// Disarms every fault of `replica` that has not fired.
pub fn clear(replica: &str) {
    let mut faults = registry().lock().unwrap_or_else(|e| e.into_inner());
    faults.remove(replica);
}

/// The faults of `replica` that fired, in order.
pub fn fired(replica: &str) -> Vec<Fault> {
    let fired = fired_registry().lock().unwrap_or_else(|e| e.into_inner());
    fired.get(replica).cloned().unwrap_or_default()
}

/// Acts on a token fault armed for `replica` at `token`: panics or sleeps.
#[allow(clippy::panic)]
pub(crate) fn on_step(replica: &str, token: usize) {
    let fault = take(
        replica,
        |fault| matches!(fault, Fault::PanicAtToken(k) | Fault::HangAtToken(k, _) if *k == token),
    );
    match fault {
        Some(Fault::PanicAtToken(_)) => panic!("injected panic at token {token}"),
        Some(Fault::HangAtToken(_, pause)) => std::thread::sleep(pause),
        _ => {}
    }
}

/// Acts on a handler fault armed for `model`: panics in the request's handler.
#[allow(clippy::panic)]
pub fn on_handler(model: &str) {
    if take(&format!("handler:{model}"), |f| *f == Fault::PanicInHandler).is_some() {
        panic!("injected panic in the handler");
    }
}

/// Acts on a load fault armed for `replica`: returns the error to report, or panics.
#[allow(clippy::panic)]
pub(crate) fn on_load(replica: &str) -> Option<String> {
    match take(replica, |f| {
        matches!(
            f,
            Fault::FailNextLoad(_) | Fault::PanicNextLoad | Fault::SlowNextLoad(_)
        )
    }) {
        Some(Fault::FailNextLoad(message)) => Some(message),
        Some(Fault::PanicNextLoad) => panic!("injected panic while loading"),
        Some(Fault::SlowNextLoad(pause)) => {
            std::thread::sleep(pause);
            None
        }
        _ => None,
    }
}

/// Whether restart backoff jitter is switched off (for exact timing tests).
static NO_JITTER: AtomicBool = AtomicBool::new(false);

/// Switches restart backoff jitter off (`true`) or on.
pub fn set_no_jitter(off: bool) {
    NO_JITTER.store(off, Ordering::Relaxed);
}

/// Scales a jitter sample: 0 when jitter is switched off.
pub(crate) fn jitter(sample: f64) -> f64 {
    if NO_JITTER.load(Ordering::Relaxed) {
        0.0
    } else {
        sample
    }
}

/// What the supervisor did to a replica, and when (tokio's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisionEvent {
    /// Its actor failed.
    Failed,
    /// It was started again after its backoff.
    Respawned,
    /// It was given up on (too many restarts).
    GaveUp,
}

fn journal() -> &'static Mutex<Vec<(String, SupervisionEvent, Instant)>> {
    static JOURNAL: OnceLock<Mutex<Vec<(String, SupervisionEvent, Instant)>>> = OnceLock::new();
    JOURNAL.get_or_init(Mutex::default)
}

/// Records a supervision event of `replica`.
pub(crate) fn record(replica: &str, event: SupervisionEvent) {
    let mut journal = journal().lock().unwrap_or_else(|e| e.into_inner());
    journal.push((replica.to_string(), event, Instant::now()));
}

/// Every recorded supervision event of `replica`, in order.
pub fn supervision_events(replica: &str) -> Vec<(SupervisionEvent, Instant)> {
    let journal = journal().lock().unwrap_or_else(|e| e.into_inner());
    journal
        .iter()
        .filter(|(name, _, _)| name == replica)
        .map(|(_, event, at)| (*event, *at))
        .collect()
}
