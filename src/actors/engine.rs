//! The engine thread: one OS thread per model replica that loads the model, owns it (weights,
//! KV cache, tokenizer) and runs generation jobs from a channel.
//!
//! Forward passes are long CPU/GPU work, so they never run on a tokio worker. Each job sends
//! its events on its own bounded channel; a job stops as soon as that channel is closed (the
//! client went away) or its cancel flag is set. A job whose channel is full (its client does
//! not read) is paused, and ended with `slow_reader` once paused for its `slow_reader_timeout`.
//! The KV cache is cleared after every job and after every error, and a panic inside a job is
//! caught, reported to that job and ends the thread with an error its owner can see.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use crate::models::{
    self, tokenize_prompt, FinishReason, GenerationError, GenerationParams, LoadError, LoadSpec,
    LoadedModel, ModelInfo, Prompt, Sequence,
};

/// How many sequences the loop steps at once. One today; continuous batching raises it.
const MAX_ACTIVE_SEQUENCES: usize = 1;

/// Events a job's channel holds before the job is paused. A token event becomes one SSE frame
/// of under 512 bytes, so a client that stops reading makes the server hold at most 64 KiB
/// for it (plus hyper's write queue); one slot is kept for the terminal event.
pub const EVENT_BUFFER: usize = 128;

/// How long a paused job's replica waits before looking at it again.
const PAUSE_POLL: Duration = Duration::from_millis(5);

/// How long a job may stay paused by a client that does not read, unless its model says.
pub const DEFAULT_SLOW_READER_TIMEOUT: Duration = Duration::from_secs(30);

/// A generation request as the engine receives it.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// What to generate from.
    pub prompt: Prompt,
    /// How to generate.
    pub params: GenerationParams,
}

/// One event of a job's stream. A stream is `Started`, any number of `Token`s, then exactly one
/// of `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// The prompt was tokenized and accepted.
    Started {
        /// The prompt's token ids.
        prompt_ids: Vec<u32>,
    },
    /// One generated token and the text it made final (possibly empty).
    Token {
        /// The token id.
        id: u32,
        /// Text that became final with this token.
        text: String,
    },
    /// The generation ended normally.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The generation failed; nothing follows.
    Failed(EngineError),
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
            GenerationError::Tokenizer(_) | GenerationError::Forward(_) => {
                EngineError::Generation(message)
            }
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
            slow_reader_timeout: DEFAULT_SLOW_READER_TIMEOUT,
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
        /// Jobs that were generating: they get one `Crashed` error from the owner.
        crashed: Vec<Job>,
        /// Jobs waiting in the channel that never started: they may run elsewhere.
        unstarted: Vec<Job>,
    },
}

/// The engine thread's heartbeat: when the step in progress, if any, began. The model actor
/// reads it to detect a stalled generation.
#[derive(Debug)]
pub struct Heartbeat {
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
    pub fn step_running_for(&self) -> Option<Duration> {
        match self.step_began.load(Ordering::Relaxed) {
            0 => None,
            began => {
                let now = self.base.elapsed().as_millis() as u64 + 1;
                Some(Duration::from_millis(now.saturating_sub(began)))
            }
        }
    }
}

/// The owner's side of an engine thread.
#[derive(Debug)]
pub struct EngineHandle {
    jobs: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    heartbeat: Arc<Heartbeat>,
}

/// The result of a load, as the engine thread reports it.
pub type LoadResult = Result<ModelInfo, LoadError>;

/// Starts an engine thread named `name` that loads `spec`. The receiver yields the model's
/// facts once it is loaded, or the load error; `on_exit` runs on the thread when it ends.
pub fn spawn_engine(
    name: &str,
    spec: LoadSpec,
    on_exit: impl FnOnce(EngineExit) + Send + 'static,
) -> std::io::Result<(EngineHandle, oneshot::Receiver<LoadResult>)> {
    let (jobs_tx, jobs_rx) = mpsc::channel::<Command>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let replica = name.to_string();
    let heartbeat = Arc::new(Heartbeat::new());
    let beat = heartbeat.clone();
    let thread = std::thread::Builder::new()
        .name(format!("engine-{name}"))
        .spawn(move || on_exit(run_engine(&replica, spec, jobs_rx, ready_tx, &beat)))?;
    Ok((
        EngineHandle {
            jobs: Some(jobs_tx),
            thread: Some(thread),
            heartbeat,
        },
        ready_rx,
    ))
}

impl EngineHandle {
    /// The engine's heartbeat.
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    /// Queues a job. Returns the job back if the engine thread has ended.
    pub fn submit(&self, job: Job) -> Result<(), Box<Job>> {
        let Some(jobs) = &self.jobs else {
            return Err(Box::new(job));
        };
        jobs.send(Command::Run(job)).map_err(|err| match err.0 {
            Command::Run(job) => Box::new(job),
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
    /// Run a job.
    Run(Job),
    /// End every running and waiting job with this error.
    Abort(EngineError),
}

fn run_engine(
    replica: &str,
    spec: LoadSpec,
    commands: mpsc::Receiver<Command>,
    ready: oneshot::Sender<LoadResult>,
    heartbeat: &Heartbeat,
) -> EngineExit {
    let mut model = match catch_unwind(AssertUnwindSafe(|| load(replica, &spec))) {
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
    if ready.send(Ok(model.info.clone())).is_err() {
        return EngineExit::Stopped;
    }
    let mut active: Vec<Active> = Vec::with_capacity(MAX_ACTIVE_SEQUENCES);
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        if active.is_empty() && waiting.is_empty() {
            match commands.recv() {
                Ok(command) => apply(command, &mut active, &mut waiting),
                Err(_) => return EngineExit::Stopped,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(command) => apply(command, &mut active, &mut waiting),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    // The owner is gone: nothing may outlive it without a terminal event.
                    let gone = EngineError::Unavailable("the replica stopped".to_string());
                    apply(Command::Abort(gone), &mut active, &mut waiting);
                    return EngineExit::Stopped;
                }
            }
        }
        while active.len() < MAX_ACTIVE_SEQUENCES {
            match waiting.pop_front() {
                Some(job) => admit(&mut model, job, &mut active),
                None => break,
            }
        }
        if active.is_empty() {
            reset_cache(&mut model);
            continue;
        }
        heartbeat.begin();
        let stepped = step_all(replica, &mut model, &mut active);
        heartbeat.end();
        match stepped {
            Stepped::Progressed => {}
            Stepped::Paused => std::thread::sleep(PAUSE_POLL),
            Stepped::Panicked(message) => {
                let mut unstarted: Vec<Job> = waiting.drain(..).collect();
                unstarted.extend(commands.try_iter().filter_map(|command| match command {
                    Command::Run(job) => Some(job),
                    Command::Abort(_) => None,
                }));
                return EngineExit::Panicked {
                    message,
                    crashed: active.drain(..).map(|entry| entry.job).collect(),
                    unstarted,
                };
            }
        }
    }
}

fn apply(command: Command, active: &mut Vec<Active>, waiting: &mut VecDeque<Job>) {
    match command {
        Command::Run(job) => waiting.push_back(job),
        Command::Abort(error) => {
            for entry in active.drain(..) {
                entry.job.send(TokenEvent::Failed(error.clone()));
            }
            for job in waiting.drain(..) {
                job.send(TokenEvent::Failed(error.clone()));
            }
        }
    }
}

/// A job whose sequence is generating.
struct Active {
    job: Job,
    sequence: Sequence,
    /// When its client stopped reading (its channel filled up), while it still has not.
    paused_since: Option<Instant>,
}

/// What one round over the active sequences did.
enum Stepped {
    /// At least one sequence stepped or ended.
    Progressed,
    /// Every sequence waits for its client to read.
    Paused,
    /// A step panicked (the message); the engine must exit.
    Panicked(String),
}

/// Tokenizes and validates a job; a valid one joins `active`, an invalid one gets its error.
fn admit(model: &mut LoadedModel, job: Job, active: &mut Vec<Active>) {
    if job.abandoned() {
        return;
    }
    let prepared = tokenize_prompt(&model.tokenizer, &job.request.prompt)
        .and_then(|ids| Sequence::new(model, ids, job.request.params.clone()));
    match prepared {
        Ok(sequence) => {
            job.send(TokenEvent::Started {
                prompt_ids: sequence.prompt_ids().to_vec(),
            });
            active.push(Active {
                job,
                sequence,
                paused_since: None,
            });
        }
        Err(err) => job.send(TokenEvent::Failed(err.into())),
    }
}

/// Steps every active sequence whose client keeps up once. After a panic the engine must exit;
/// the active jobs are left for its owner to fail.
fn step_all(replica: &str, model: &mut LoadedModel, active: &mut Vec<Active>) -> Stepped {
    let _ = replica; // read only by the fault hooks of test builds
    let mut progressed = false;
    let mut index = 0;
    while let Some(entry) = active.get_mut(index) {
        if entry.job.abandoned() {
            active.swap_remove(index);
            reset_cache(model);
            progressed = true;
            continue;
        }
        if !entry.job.has_room() {
            let since = *entry.paused_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= entry.job.slow_reader_timeout {
                entry
                    .job
                    .send(TokenEvent::Failed(EngineError::SlowReader(format!(
                        "the client read nothing for {:?} (slow_reader_timeout)",
                        entry.job.slow_reader_timeout
                    ))));
                active.swap_remove(index);
                reset_cache(model);
                progressed = true;
                continue;
            }
            index += 1;
            continue;
        }
        entry.paused_since = None;
        progressed = true;
        let stepped = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(feature = "fault-injection")]
            super::faults::on_step(replica, entry.sequence.generated_ids().len());
            entry.sequence.step(model)
        }));
        match stepped {
            Ok(Ok(output)) => {
                entry.job.send(TokenEvent::Token {
                    id: output.token,
                    text: output.text,
                });
                if let Some(reason) = output.finished {
                    entry.job.send(TokenEvent::Finished {
                        reason,
                        prompt_tokens: entry.sequence.prompt_ids().len(),
                        completion_tokens: entry.sequence.generated_ids().len(),
                    });
                    active.swap_remove(index);
                    reset_cache(model);
                    continue;
                }
                index += 1;
            }
            Ok(Err(err)) => {
                entry.job.send(TokenEvent::Failed(err.into()));
                active.swap_remove(index);
                reset_cache(model);
            }
            Err(panic) => return Stepped::Panicked(panic_message(panic.as_ref())),
        }
    }
    if progressed {
        Stepped::Progressed
    } else {
        Stepped::Paused
    }
}

/// Loads the model (acting on an injected load fault first, in test builds).
fn load(replica: &str, spec: &LoadSpec) -> Result<LoadedModel, LoadError> {
    #[cfg(feature = "fault-injection")]
    if let Some(message) = super::faults::on_load(replica) {
        return Err(LoadError::Injected(message));
    }
    let _ = replica; // read only by the fault hooks of test builds
    models::load(spec)
}

fn reset_cache(model: &mut LoadedModel) {
    if let Err(err) = model.clear_kv_cache() {
        tracing::error!(error = %err, "clearing the kv cache failed");
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    models::first_line(&text)
}
