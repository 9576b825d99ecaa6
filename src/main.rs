//! The `llorch` command line.

mod bench;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};

use llorch::actors::admin::AdminCommand;
use llorch::actors::engine::{spawn_engine, EngineConfig, GenerationRequest, Job, TokenEvent};
use llorch::actors::pool::Pool;
use llorch::actors::supervisor::SupervisorMsg;
use llorch::api::client::{AdminClient, ClientError};
use llorch::api::{AppState, Keys};
use llorch::models::{
    quantize_dir, ChatMessage, DTypeChoice, DeviceSpec, GenerationParams, LoadSpec, ModelSource,
    Prompt, QuantType, SamplingParams,
};

/// jemalloc instead of the system allocator. glibc malloc keeps one arena per thread that ever
/// allocated; with ~20 engine threads tokenizing large prompts and 2 MiB request bodies freed on
/// other threads, the daemon's RSS crept up by about 2 MiB/min in the 30-minute soak (L5).
/// jemalloc returns dirty pages to the OS after a delay.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// llorch: serve many LLMs on many devices from one process.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the models of a pool file over HTTP (the default command).
    Serve(ServeArgs),
    /// Runs one generation without a daemon and prints it.
    Generate(GenerateArgs),
    /// Measures prefill and decode speed on the bare engine and prints JSON.
    Bench(bench::BenchArgs),
    /// Converts a HuggingFace Llama directory to one GGUF file (f32, f16, q8_0, q4_0, q4_k_m).
    Quantize(QuantizeArgs),
    /// Lists a running daemon's replicas.
    Ps(UrlArgs),
    /// Loads the models of a TOML or JSON file into a running daemon.
    Load {
        /// `[[models]]` tables or one entry (TOML), or an object or array of objects (JSON).
        file: PathBuf,
        /// Return as soon as the daemon has started the operation, without waiting for it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        url: UrlArgs,
    },
    /// Reloads one model, or re-reads the pool file when no name is given.
    Reload {
        /// The model to reload.
        name: Option<String>,
        /// Return as soon as the daemon has started the operation, without waiting for it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        url: UrlArgs,
    },
    /// Evicts a model from a running daemon.
    Evict {
        /// The model.
        name: String,
        /// End in-flight requests at once instead of draining them.
        #[arg(long)]
        abort: bool,
        /// How long to drain, in milliseconds (default 30000).
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        url: UrlArgs,
    },
}

#[derive(Args)]
struct UrlArgs {
    /// The daemon's address (the admin key comes from LLORCH_ADMIN_KEY).
    #[arg(long, env = "LLORCH_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
}

#[derive(Args)]
struct ServeArgs {
    /// The pool file.
    #[arg(long, default_value = "config/pool.toml")]
    config: PathBuf,
    /// Listen address (overrides `[server] listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Listen on a non-loopback address without any API key (refused otherwise).
    #[arg(long)]
    insecure_no_auth: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// A HuggingFace model directory, a .gguf file, hf:org/repo[@revision] or builtin:demo.
    #[arg(long)]
    source: String,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Send the prompt as one user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// RNG seed: the same seed gives the same tokens.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// A stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Device: cpu, cuda:N or metal:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// dtype: auto, f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Print {"prompt_ids", "generated_ids", "text"} as JSON instead of streaming text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Generate(args)) => generate(args),
        Some(Command::Bench(args)) => bench::bench(args).map(|report| println!("{report}")),
        Some(Command::Quantize(args)) => quantize(args),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Ps(url)) => admin(&url, |client| Box::pin(async move { client.ps().await })),
        Some(Command::Load { file, no_wait, url }) => admin(&url, |client| {
            Box::pin(async move { client.load(&file, !no_wait).await })
        }),
        Some(Command::Reload { name, no_wait, url }) => admin(&url, |client| {
            Box::pin(async move { client.reload(name.as_deref(), !no_wait).await })
        }),
        Some(Command::Evict {
            name,
            abort,
            timeout_ms,
            url,
        }) => admin(&url, |client| {
            Box::pin(async move { client.evict(&name, abort, timeout_ms).await })
        }),
        None => serve(ServeArgs {
            config: PathBuf::from("config/pool.toml"),
            listen: None,
            insecure_no_auth: false,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = llorch::config::load(&args.config)?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    let keys = Keys::from_env();
    if !config.server.listen.ip().is_loopback() && !keys.any() && !args.insecure_no_auth {
        anyhow::bail!(
            "refusing to listen on {} without API keys: set LLORCH_API_KEYS (and \
             LLORCH_ADMIN_KEY), or pass --insecure-no-auth",
            config.server.listen
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.server.http_threads)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        let address = listener.local_addr()?;
        let models = config.models.len();
        let server = config.server.clone();
        let pool = Pool::start(config, Some(args.config.clone())).await?;
        eprintln!("llorch listening on http://{address}");
        let http_threads = tokio::runtime::Handle::current().metrics().num_workers();
        let cpu_kernels = llorch::models::cpu::level::level().name();
        tracing::info!(%address, models, http_threads, cpu_kernels, "llorch listening");
        let state = AppState::new(&pool, keys, server);
        reload_on_sighup(pool.supervisor());
        let mut signals = ShutdownSignals::new()?;
        let draining = state.clone();
        let stop = async move {
            signals.next().await;
            eprintln!("llorch: shutting down (a second signal aborts)");
            llorch::api::drain(&draining, signals.next()).await;
        };
        llorch::api::serve(listener, state, stop).await?;
        if tokio::time::timeout(POOL_STOP_GRACE, pool.stop())
            .await
            .is_err()
        {
            tracing::warn!("the pool did not stop in time (a load may still run); exiting anyway");
        }
        Ok::<(), anyhow::Error>(())
    })?;
    runtime.shutdown_timeout(POOL_STOP_GRACE);
    Ok(())
}

/// How long stopping the actors may take at exit (engines finish their current step).
const POOL_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A future returned by an admin client call.
type ClientCall<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, ClientError>> + 'a>>;

/// Runs one admin client call and prints its answer.
fn admin(
    url: &UrlArgs,
    call: impl for<'a> FnOnce(&'a AdminClient) -> ClientCall<'a>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let client = AdminClient::new(&url.url);
    let output = runtime.block_on(call(&client))?;
    println!("{output}");
    Ok(())
}

/// Re-reads the pool file on every SIGHUP (as `POST /admin/reload` does) and logs the outcome.
fn reload_on_sighup(supervisor: ractor::ActorRef<SupervisorMsg>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP");
        return;
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let reply = supervisor
                .call(
                    |reply| SupervisorMsg::Admin {
                        command: AdminCommand::ReloadPool,
                        wait: true,
                        reply,
                    },
                    None,
                )
                .await;
            match reply {
                Ok(ractor::rpc::CallResult::Success(Ok(outcomes))) => {
                    for outcome in outcomes {
                        tracing::info!(model = %outcome.name, action = outcome.action, error = ?outcome.error, "pool reload");
                    }
                }
                Ok(ractor::rpc::CallResult::Success(Err(err))) => {
                    tracing::error!(error = %err, "pool reload refused; nothing changed")
                }
                _ => tracing::error!("pool reload: the supervisor did not answer"),
            }
        }
    });
}

/// SIGTERM and SIGINT, in arrival order.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// The load spec named by `--source`, `--device` and `--dtype` (the device is opened here).
fn load_spec(source: &str, device: &str, dtype: &str) -> anyhow::Result<LoadSpec> {
    Ok(LoadSpec {
        source: source.parse::<ModelSource>()?,
        device: device
            .parse::<DeviceSpec>()
            .map_err(|err| anyhow!(err))?
            .open()?,
        dtype: dtype.parse::<DTypeChoice>().map_err(|err| anyhow!(err))?,
        max_seq_len: None,
    })
}

#[derive(Args)]
struct QuantizeArgs {
    /// The HuggingFace model directory (config.json, tokenizer.json, safetensors).
    dir: PathBuf,
    /// The format: f32, f16, q8_0, q4_0 or q4_k_m.
    #[arg(long = "type", default_value = "q4_k_m")]
    format: String,
    /// The GGUF file to write (default: `model-<type>.gguf` in the model directory, beside its
    /// tokenizer.json, which llorch then uses).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn quantize(args: QuantizeArgs) -> anyhow::Result<()> {
    let format: QuantType = args.format.parse().map_err(|err: String| anyhow!(err))?;
    let out = args
        .out
        .unwrap_or_else(|| args.dir.join(format!("model-{format}.gguf")));
    let report = quantize_dir(&args.dir, &out, format)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let spec = load_spec(&args.source, &args.device, &args.dtype)?;
    let (engine, ready) = spawn_engine("cli", spec, EngineConfig::default(), |_| {})
        .context("starting the engine thread")?;
    ready
        .blocking_recv()
        .context("the engine thread ended while loading")??;
    let prompt = if args.chat {
        Prompt::Chat {
            messages: vec![ChatMessage::new("user", args.prompt)],
            tools: None,
        }
    } else {
        Prompt::Text {
            text: args.prompt,
            add_special_tokens: true,
        }
    };
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..SamplingParams::default()
        },
        max_tokens: Some(args.max_tokens),
        stop: args.stop,
        ignore_eos: args.ignore_eos,
        ..GenerationParams::default()
    };
    let (job, mut events, _cancel) = Job::new(GenerationRequest {
        prompt,
        params,
        cache_salt: 0,
    });
    engine
        .submit(job)
        .map_err(|_| anyhow!("the engine thread has stopped"))?;
    let mut prompt_ids = Vec::new();
    let mut generated_ids = Vec::new();
    let mut text = String::new();
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = events.blocking_recv() {
        match event {
            TokenEvent::Started {
                prompt_ids: ids, ..
            } => prompt_ids = ids,
            TokenEvent::Prompt { .. } => {}
            TokenEvent::Token {
                id, text: piece, ..
            } => {
                generated_ids.push(id);
                if !args.json {
                    stdout.write_all(piece.as_bytes())?;
                    stdout.flush()?;
                }
                text.push_str(&piece);
            }
            TokenEvent::Finished { .. } => break,
            TokenEvent::Failed(err) => return Err(anyhow!(err)),
        }
    }
    if args.json {
        let output = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": generated_ids,
            "text": text,
        });
        writeln!(stdout, "{output}")?;
    } else {
        writeln!(stdout)?;
    }
    drop(engine);
    Ok(())
}
