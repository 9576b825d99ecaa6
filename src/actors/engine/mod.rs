//! The engine thread: one OS thread per model replica that loads the model, owns it (weights,
//! KV cache, tokenizer) and runs generation jobs from a channel.
//!
//! Forward passes are long CPU/GPU work, so they never run on a tokio worker. The loop
//! (`serve`) lets a scheduler (`scheduler`, over the KV blocks of `blocks` and the prefix cache
//! of `prefix`) choose the sequences of each step, and runs them as one batch when the model
//! has a batched forward pass. Each job sends its events on its own bounded channel; a job
//! stops as soon as that channel is closed (the client went away) or its cancel flag is set. A
//! job whose channel is full (its client does not read) is paused, and ended with
//! `slow_reader` once paused for its `slow_reader_timeout`. A panic inside a step is caught and
//! ends the thread with an error its owner can see.

mod blocks;
mod prefix;
mod scheduler;
mod serve;
mod stats;
mod wire;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use crate::models::{
    self, FinishReason, GenerationError, GenerationParams, LoadError, LoadProgress, LoadSpec,
    LoadedModel, ModelInfo, Prompt,
};

pub use crate::metrics::StepMetrics;
use crate::models::batch::KvDtype;
use crate::models::{EchoedToken, Logprobs, ToolFormat};
pub use stats::{EngineStats, Occupancy};

/// Events a job's channel holds before the job is paused. A token event becomes one SSE frame
/// of under 512 bytes, so a client that stops reading makes the server hold at most 64 KiB
/// for it (plus hyper's write queue); one slot is kept for the terminal event.
pub const EVENT_BUFFER: usize = 128;

/// How long a paused job's replica waits before looking at it again.
const PAUSE_POLL: Duration = Duration::from_millis(5);

/// A generation request as the engine receives it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenerationRequest {
    /// What to generate from.
    pub prompt: Prompt,
    /// How to generate.
    pub params: GenerationParams,
    /// Whose prefix-cache entries the prompt may reuse: requests with different salts never
    /// share cached blocks (0 for every caller of a pool without keys).
    pub cache_salt: u64,
}

/// One event of a job's stream. A stream is `Started`, any number of `Token`s, then exactly one
/// of `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum TokenEvent {
    /// The prompt was tokenized and accepted.
    Started {
        /// The prompt's token ids.
        prompt_ids: Vec<u32>,
        /// How the model writes tool calls, when the request offered tools.
        tool_format: Option<ToolFormat>,
    },
    /// The prompt's tokens, for a request that asked for an echo; before any `Token`.
    Prompt {
        /// The tokens with their texts and, when asked, log probabilities.
        tokens: Vec<EchoedToken>,
    },
    /// One generated token and the text it made final (possibly empty).
    Token {
        /// The token id.
        id: u32,
        /// Text that became final with this token.
        text: String,
        /// Its log probability and the most likely alternatives, when the request asked.
        logprobs: Option<Box<Logprobs>>,
    },
    /// The generation ended normally.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
    },
    /// The generation failed; nothing follows.
    Failed(#[serde(with = "wire")] EngineError),
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request was invalid for this model (bad prompt, parameters, context overflow).
    #[error("{message}")]
    Invalid {
        /// A stable machine-readable code (`context_length_exceeded`, `invalid_parameter`, ...).
        code: &'static str,
        /// The parameter at fault, when known.
        param: Option<&'static str>,
        /// The message a user sees.
        message: String,
    },
    /// The forward pass or tokenizer failed while generating.
    #[error("generation failed: {0}")]
    Generation(String),
    /// The engine panicked while running this job.
    #[error("the model crashed: {0}")]
    Crashed(String),
    /// No replica of the model can serve (the message says why).
    #[error("{0}")]
    Unavailable(String),
    /// The model was evicted while the job ran or waited.
    #[error("{0}")]
    Evicted(String),
    /// The engine made no progress within the stall timeout.
    #[error("{0}")]
    Stalled(String),
    /// The device ran out of memory for this job; the replica keeps serving others.
    #[error("{0}")]
    OutOfMemory(String),
    /// The client read nothing for the slow-reader timeout while the job was paused.
    #[error("{0}")]
    SlowReader(String),
}

impl From<GenerationError> for EngineError {
    fn from(err: GenerationError) -> Self {
        let message = err.to_string();
        match err {
            GenerationError::EmptyPrompt => invalid("empty_prompt", Some("prompt"), message),
            GenerationError::ContextLengthExceeded { .. } => {
                invalid("context_length_exceeded", Some("prompt"), message)
            }
            GenerationError::MaxTokensExceedContext { .. } => {
                invalid("context_length_exceeded", Some("max_tokens"), message)
            }
            GenerationError::TokenOutOfVocabulary { .. } => {
                invalid("token_out_of_vocabulary", Some("prompt"), message)
            }
            GenerationError::InvalidParameter { param, .. } => {
                invalid("invalid_parameter", Some(param), message)
            }
            GenerationError::NoChatTemplate | GenerationError::ChatTemplate(_) => {
                invalid("chat_template_error", Some("messages"), message)
            }
            GenerationError::InvalidConstraint { param, .. } => {
                invalid("invalid_grammar", Some(param), message)
            }
            GenerationError::Tokenizer(_)
            | GenerationError::Forward(_)
            | GenerationError::Grammar(_) => EngineError::Generation(message),
            GenerationError::OutOfMemory(_) => EngineError::OutOfMemory(message),
        }
    }
}

fn invalid(code: &'static str, param: Option<&'static str>, message: String) -> EngineError {
    EngineError::Invalid {
        code,
        param,
        message,
    }
}

/// A callback run once when a job is dropped, wherever that happens (finished, failed,
/// abandoned, or lost with a dead engine): the router uses it to free the job's slot.
pub struct CompletionNotice(Option<Box<dyn FnOnce() + Send>>);

impl CompletionNotice {
    /// Wraps the callback.
    pub fn new(callback: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(callback)))
    }
}

impl Drop for CompletionNotice {
    fn drop(&mut self) {
        if let Some(callback) = self.0.take() {
            callback();
        }
    }
}

impl std::fmt::Debug for CompletionNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompletionNotice")
    }
}

/// A job: a request, where its events go, and a flag that cancels it.
#[derive(Debug)]
pub struct Job {
    /// The request.
    pub request: GenerationRequest,
    /// The job's event channel; closing its receiver cancels the job.
    pub events: tokio_mpsc::Sender<TokenEvent>,
    /// Set to cancel the job.
    pub cancel: Arc<AtomicBool>,
    /// Runs when the job is dropped.
    pub notice: Option<CompletionNotice>,
    /// How long the job may stay paused because its channel is full.
    pub slow_reader_timeout: Duration,
}

impl Job {
    /// Creates a job and returns it with its event receiver and cancel flag.
    pub fn new(
        request: GenerationRequest,
    ) -> (Self, tokio_mpsc::Receiver<TokenEvent>, Arc<AtomicBool>) {
        let (events, receiver) = tokio_mpsc::channel(EVENT_BUFFER);
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Self {
            request,
            events,
            cancel: cancel.clone(),
            notice: None,
            slow_reader_timeout: crate::config::DEFAULT_SLOW_READER_TIMEOUT,
        };
        (job, receiver, cancel)
    }

    /// Whether the client has gone (receiver closed) or the job was cancelled.
    pub fn abandoned(&self) -> bool {
        self.events.is_closed() || self.cancel.load(Ordering::Relaxed)
    }

    /// Sends an event; a closed receiver is ignored (the job is dropped at the next check).
    /// A token is only generated while two slots are free, so the terminal event that may
    /// follow it always fits.
    pub fn send(&self, event: TokenEvent) {
        if let Err(tokio_mpsc::error::TrySendError::Full(_)) = self.events.try_send(event) {
            tracing::warn!("a job's event channel was full; an event was dropped");
        }
    }

    /// Whether the channel has room for a token and the terminal event after it.
    fn has_room(&self) -> bool {
        self.events.capacity() >= 2
    }
}

pub use serve::BLOCK_SIZE;

/// How the engine thread ended.
#[derive(Debug)]
pub enum EngineExit {
    /// Its job channel closed (the owner dropped its handle or asked it to stop).
    Stopped,
    /// It caught a panic while generating; the model may be corrupt and the thread must be
    /// restarted. The owner tells the router first, then ends the `crashed` jobs, so a client
    /// that retries never reaches the dead replica again.
    Panicked {
        /// The panic message.
        message: String,
        /// Jobs whose computation began: they get one `Crashed` error from the owner.
        crashed: Vec<Job>,
        /// Jobs that never began (queued in the engine or its channel): they may run elsewhere.
        unstarted: Vec<Job>,
    },
}

/// The engine thread's heartbeat: when the step in progress, if any, began. The model actor
/// reads it to detect a stalled generation.
#[derive(Debug)]
struct Heartbeat {
    base: Instant,
    /// Milliseconds after `base` plus one at which the current step began; 0 when idle.
    step_began: AtomicU64,
}

impl Heartbeat {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            step_began: AtomicU64::new(0),
        }
    }

    fn begin(&self) {
        let now = self.base.elapsed().as_millis() as u64 + 1;
        self.step_began.store(now, Ordering::Relaxed);
    }

    fn end(&self) {
        self.step_began.store(0, Ordering::Relaxed);
    }

    /// How long the step in progress has been running, or `None` when the engine is idle.
    fn step_running_for(&self) -> Option<Duration> {
        match self.step_began.load(Ordering::Relaxed) {
            0 => None,
            began => {
                let now = self.base.elapsed().as_millis() as u64 + 1;
                Some(Duration::from_millis(now.saturating_sub(began)))
            }
        }
    }
}

/// What the engine thread shares with its owner: its heartbeat, its occupancy and its load's
/// progress.
#[derive(Debug)]
pub struct Shared {
    heartbeat: Heartbeat,
    stats: EngineStats,
    progress: LoadProgress,
}

/// How a replica's engine batches. Every `None` takes a default chosen at load, once it is
/// known whether the model runs batched.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// Sequences running at once (default 16 on the CPU and 64 on a GPU for a batched model,
    /// 1 for the others).
    pub max_seqs: Option<usize>,
    /// Tokens per step, decodes and prompt chunks together (default 256 on the CPU, 2048 on
    /// a GPU).
    pub max_batch_tokens: Option<usize>,
    /// Bytes of the paged KV cache (default: room for every sequence at the full context, at
    /// most 1/4 of the device's free memory).
    pub kv_cache_bytes: Option<u64>,
    /// How the KV cache stores keys and values.
    pub kv_dtype: KvDtype,
    /// Whether full KV blocks are kept for later prompts that start the same way.
    pub prefix_caching: bool,
    /// Whether every request may reuse every cached block (else only requests of the same
    /// [`GenerationRequest::cache_salt`]).
    pub shared_prefix_cache: bool,
    /// Per-step figures recorded into the pool's metrics.
    pub metrics: Option<StepMetrics>,
}

/// The owner's side of an engine thread.
#[derive(Debug)]
pub struct EngineHandle {
    jobs: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// The result of a load, as the engine thread reports it.
pub type LoadResult = Result<ModelInfo, LoadError>;

/// Starts an engine thread named `name` that loads `spec` and batches as `config` says. The
/// receiver yields the model's facts once it is loaded, or the load error; `on_exit` runs on
/// the thread when it ends.
pub fn spawn_engine(
    name: &str,
    spec: LoadSpec,
    config: EngineConfig,
    on_exit: impl FnOnce(EngineExit) + Send + 'static,
) -> std::io::Result<(EngineHandle, oneshot::Receiver<LoadResult>)> {
    let (jobs_tx, jobs_rx) = mpsc::channel::<Command>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let replica = name.to_string();
    let shared = Arc::new(Shared {
        heartbeat: Heartbeat::new(),
        stats: EngineStats::default(),
        progress: LoadProgress::default(),
    });
    let on_thread = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("engine-{name}"))
        .spawn(move || {
            on_exit(run_engine(
                &replica, spec, config, jobs_rx, ready_tx, &on_thread,
            ))
        })?;
    Ok((
        EngineHandle {
            jobs: Some(jobs_tx),
            thread: Some(thread),
            shared,
        },
        ready_rx,
    ))
}

impl Shared {
    /// What the engine holds now.
    pub fn occupancy(&self) -> Occupancy {
        self.stats.snapshot()
    }

    /// Bytes of weights its load has read (and downloaded) and their totals.
    pub fn load_progress(&self) -> crate::models::Progress {
        self.progress.progress()
    }
}

impl EngineHandle {
    /// How long the step in progress has been running, or `None` when the engine is idle.
    pub fn step_running_for(&self) -> Option<std::time::Duration> {
        self.shared.heartbeat.step_running_for()
    }

    /// What the engine holds now: sequences running and waiting, KV blocks in use.
    pub fn occupancy(&self) -> Occupancy {
        self.shared.stats.snapshot()
    }

    /// The engine's shared state, to read its occupancy after the handle is gone.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Queues a job. Returns the job back if the engine thread has ended.
    pub fn submit(&self, job: Job) -> Result<(), Box<Job>> {
        let Some(jobs) = &self.jobs else {
            return Err(Box::new(job));
        };
        jobs.send(Command::Run(Box::new(job)))
            .map_err(|err| match err.0 {
                Command::Run(job) => job,
                Command::Abort(_) => unreachable!("a Run command was sent"),
            })
    }

    /// Ends every job of this engine, running or waiting, with `error` (at the next step).
    pub fn abort_all(&self, error: EngineError) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Command::Abort(error));
        }
    }

    /// Closes the job channel and lets the thread go without joining it (it may be stuck in a
    /// load that ran past its deadline); it ends on its own once it finds the channel closed.
    pub fn detach(mut self) -> Self {
        self.jobs = None;
        self.thread = None;
        self
    }

    /// Closes the job channel and waits for the thread to end (after its current job).
    pub fn shutdown(mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        // Closing the channel ends the loop; the thread finishes its current step on its own.
        self.jobs = None;
    }
}

/// What the engine thread receives.
#[derive(Debug)]
enum Command {
    /// Run a job (boxed: a job is large beside an error).
    Run(Box<Job>),
    /// End every running and waiting job with this error.
    Abort(EngineError),
}

fn run_engine(
    replica: &str,
    spec: LoadSpec,
    config: EngineConfig,
    commands: mpsc::Receiver<Command>,
    ready: oneshot::Sender<LoadResult>,
    shared: &Shared,
) -> EngineExit {
    let model = match catch_unwind(AssertUnwindSafe(|| load(replica, &spec, &shared.progress))) {
        Ok(Ok(model)) => model,
        Ok(Err(err)) => {
            let _ = ready.send(Err(err));
            return EngineExit::Stopped;
        }
        Err(panic) => {
            // A failed load is reported, not restarted: the replica is failed until reloaded.
            let message = panic_message(panic.as_ref());
            let _ = ready.send(Err(LoadError::Panicked(message)));
            return EngineExit::Stopped;
        }
    };
    let mut engine = match serve::Engine::new(replica, model, &config, shared) {
        Ok(engine) => engine,
        Err(err) => {
            let _ = ready.send(Err(err));
            return EngineExit::Stopped;
        }
    };
    if ready.send(Ok(engine.info().clone())).is_err() {
        return EngineExit::Stopped;
    }
    engine.serve(&commands)
}

/// Loads the model (acting on an injected load fault first, in test builds).
fn load(replica: &str, spec: &LoadSpec, progress: &LoadProgress) -> Result<LoadedModel, LoadError> {
    #[cfg(feature = "fault-injection")]
    if let Some(message) = super::faults::on_load(replica) {
        return Err(LoadError::Injected(message));
    }
    let _ = replica; // read only by the fault hooks of test builds
    models::load_with_progress(spec, progress)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    models::first_line(&text)
}
