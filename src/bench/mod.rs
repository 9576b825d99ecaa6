//! `llorch bench`: prefill and decode speed of one model on the bare engine (its own thread,
//! no HTTP) and, with `--http`, through a daemon process over HTTP (each HTTP run right after
//! a bare one), as medians over several runs, with the load time, the peak RSS and the
//! memory-bandwidth bound of decode, as JSON.
//! The CPU thread count is candle's: `RAYON_NUM_THREADS`, else every core.

mod bandwidth;
mod http;
mod load;

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Args;
use serde_json::{json, Value};

use llorch::actors::engine::{spawn_engine, EngineConfig};
use llorch::models::batch::KvDtype;

/// What `llorch bench` measures.
#[derive(Args)]
pub struct BenchArgs {
    /// A HuggingFace model directory, a .gguf file, hf:org/repo[@revision] or builtin:demo.
    #[arg(long)]
    source: String,
    /// Device: cpu, cuda:N or metal:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// dtype: auto, f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Prompt length of each run (token ids chosen from the vocabulary).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated in each run.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Measured runs (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Also measure through a daemon process over HTTP.
    #[arg(long)]
    http: bool,
    /// Stream counts for the aggregate decode runs (bare engine, and over HTTP with --http).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    concurrency: Vec<usize>,
    /// Also measure the time to first token of requests arriving while this many streams
    /// decode, and of a prompt whose `--prefix-tokens` prefix is cached (0: skip both).
    #[arg(long, default_value_t = 0)]
    load_streams: usize,
    /// The shared prefix of the prefix-cache runs.
    #[arg(long, default_value_t = 1000)]
    prefix_tokens: usize,
    /// Tokens per engine step (default: the engine's).
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// How the KV cache stores keys and values: auto, f32 or f16 (as pool.toml's
    /// `kv_cache_dtype`).
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: KvDtype,
}

/// One run: the time of every token from the request's submission.
pub(crate) struct Run {
    times: Vec<Duration>,
    first_token: Duration,
}

impl Run {
    pub(crate) fn from_times(times: &[Duration]) -> anyhow::Result<Run> {
        let first_token = *times.first().ok_or_else(|| anyhow!("no token generated"))?;
        Ok(Run {
            times: times.to_vec(),
            first_token,
        })
    }

    pub(crate) fn last_token(&self) -> Duration {
        self.times.last().copied().unwrap_or(self.first_token)
    }

    /// Tokens per second after the first token; `None` for a single token.
    pub(crate) fn decode_rate(&self) -> Option<f64> {
        let span = self.last_token().checked_sub(self.first_token)?;
        (self.times.len() > 1).then(|| (self.times.len() - 1) as f64 / span.as_secs_f64())
    }
}

/// Each run's prefill tokens/s, decode tokens/s and time to first token (ms).
pub(crate) struct Rates {
    pub(crate) prefill: Vec<f64>,
    pub(crate) decode: Vec<f64>,
    pub(crate) ttft: Vec<f64>,
}

impl Rates {
    pub(crate) fn of(runs: &[Run], prompt_tokens: usize) -> Rates {
        Rates {
            prefill: runs
                .iter()
                .map(|r| prompt_tokens as f64 / r.first_token.as_secs_f64())
                .collect(),
            decode: runs.iter().filter_map(Run::decode_rate).collect(),
            ttft: runs
                .iter()
                .map(|r| r.first_token.as_secs_f64() * 1000.0)
                .collect(),
        }
    }
}

/// Loads the model, runs the warm-up and the measured runs, and returns the report.
pub fn bench(args: BenchArgs) -> anyhow::Result<Value> {
    if args.prompt_tokens == 0 || args.decode_tokens < 2 || args.runs == 0 {
        return Err(anyhow!(
            "--prompt-tokens must be at least 1, --decode-tokens at least 2, --runs at least 1"
        ));
    }
    let spec = crate::load_spec(&args.source, &args.device, &args.dtype)?;
    let streams = args
        .concurrency
        .iter()
        .copied()
        .chain([args.load_streams + 1]);
    let config = EngineConfig {
        max_seqs: Some(streams.max().unwrap_or(1).max(1)),
        max_batch_tokens: args.max_batch_tokens,
        kv_dtype: args.kv_cache_dtype,
        prefix_caching: true,
        ..EngineConfig::default()
    };
    let loading = Instant::now();
    let (engine, ready) =
        spawn_engine("bench", spec, config, |_| {}).context("starting the engine thread")?;
    let info = ready
        .blocking_recv()
        .context("the engine thread ended while loading")??;
    let load = loading.elapsed();
    let prompts = load::Prompts {
        vocab: info.vocab_size.max(8) as u32,
        len: args.prompt_tokens,
    };
    // Every run has a prompt of its own, so that none finds another's in the prefix cache.
    let once = |k: usize, decode_tokens: usize| load::once(&engine, prompts.ids(k), decode_tokens);
    let http = match args.http {
        true => Some(
            http::HttpBench {
                source: &args.source,
                device: &args.device,
                dtype: &args.dtype,
                prompts: &prompts,
                decode_tokens: args.decode_tokens,
                concurrency: &args.concurrency,
                max_batch_tokens: args.max_batch_tokens,
                kv_cache_dtype: args.kv_cache_dtype,
            }
            .start()?,
        ),
        false => None,
    };
    let warm_up = args.decode_tokens.min(4);
    once(0, warm_up)?;
    if let Some(session) = &http {
        session.run(0, warm_up)?;
    }
    let (mut runs, mut http_runs) = (Vec::new(), Vec::new());
    for run in 1..=args.runs {
        runs.push(once(run, args.decode_tokens)?);
        if let Some(session) = &http {
            http_runs.push(session.run(run, args.decode_tokens)?);
        }
    }
    let bench = load::LoadBench {
        engine: &engine,
        prompts: &prompts,
        decode_tokens: args.decode_tokens,
        runs: args.runs,
    };
    let first = 1_000;
    let concurrent = bench.concurrent(&args.concurrency, first)?;
    let under_load = match args.load_streams {
        0 => None,
        streams => Some(bench.ttft_under_load(streams, 2 * first)?),
    };
    let prefix = match args.load_streams {
        0 => None,
        _ => Some(bench.prefix(args.prefix_tokens, 3 * first)?),
    };
    let Rates {
        prefill,
        decode,
        ttft,
    } = Rates::of(&runs, args.prompt_tokens);
    drop(engine);
    // Before the bandwidth probe, whose buffer would count otherwise.
    let peak_rss = peak_rss_of(std::process::id());
    let http = http
        .map(|session| session.report(&http_runs, &runs))
        .transpose()?;
    let threads = candle_core::utils::get_num_threads();
    let decode_tok_s = median(&decode);
    let bytes_per_token = bandwidth::weight_bytes_per_token(&args.source, info.dtype)?;
    let bandwidth = bandwidth::read_bandwidth(threads);
    let bound = bytes_per_token.map(|bytes| bandwidth / bytes as f64);
    let mut report = json!({
        "source": args.source,
        "device": args.device,
        "dtype": format!("{:?}", info.dtype).to_lowercase(),
        "threads": threads,
        "cpu_level": llorch::models::cpu::level::level().name(),
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "runs": args.runs,
        "load_s": load.as_secs_f64(),
        "prefill_tok_s": median(&prefill),
        "decode_tok_s": decode_tok_s,
        "ttft_ms": median(&ttft),
        "prefill_tok_s_runs": prefill,
        "decode_tok_s_runs": decode,
        "peak_rss_bytes": peak_rss,
        "weight_bytes_per_token": bytes_per_token,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "decode_bound_tok_s": bound,
        "decode_fraction_of_bound": decode_tok_s.zip(bound).map(|(d, b)| d / b),
        "max_sequences": info.max_seqs,
        "kv_cache_bytes": info.kv_cache_bytes,
        "kv_cache_dtype": args.kv_cache_dtype.name(),
        "concurrent": concurrent,
        "ttft_under_load": under_load,
        "prefix_cache": prefix,
    });
    if let Some(http) = http {
        report["http"] = http;
    }
    Ok(report)
}

/// The median of `values` (the mean of the middle two for an even count).
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => sorted.get(n / 2).copied(),
        _ => Some((sorted.get(n / 2 - 1)? + sorted.get(n / 2)?) / 2.0),
    }
}

/// A process's peak resident set size (`VmHWM`), where `/proc` has it.
pub(crate) fn peak_rss_of(pid: u32) -> Option<u64> {
    llorch::models::proc_bytes(&format!("/proc/{pid}/status"), "VmHWM:")
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians_of_odd_even_and_empty_lists() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
