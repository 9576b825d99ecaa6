//! `llorch bench --http`: the same runs through a daemon process (`llorch serve`, started by the
//! bench on a free port) over HTTP, streamed like a client streams them, each right after its
//! bare-engine twin so that both see the same machine (this VM's speed drifts by 20 % within
//! minutes); the daemon's cost is the median over those pairs. Then the aggregate decode speed
//! of several streams at once on one replica.
//!
//! `tokens_per_s` of a concurrent run counts every stream's tokens over the time from the
//! submissions to the last token, prefills included; `steady_decode_tok_s` is the decode rate
//! while every stream was decoding at once (`None` when the replica ran them one after another).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::bench::load::{steady_decode, Prompts};
use crate::bench::{median, peak_rss_of, Rates, Run};
use llorch::models::batch::KvDtype;

/// What the HTTP runs share with the bare-engine runs.
pub struct HttpBench<'a> {
    /// The model source.
    pub source: &'a str,
    /// The device.
    pub device: &'a str,
    /// The dtype choice.
    pub dtype: &'a str,
    /// The prompts.
    pub prompts: &'a Prompts,
    /// Tokens generated per run.
    pub decode_tokens: usize,
    /// Stream counts for the aggregate runs.
    pub concurrency: &'a [usize],
    /// Tokens per engine step (default: the engine's).
    pub max_batch_tokens: Option<usize>,
    /// How the KV cache stores keys and values.
    pub kv_cache_dtype: KvDtype,
}

/// A daemon process the bench started; killed when dropped.
struct Daemon {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A started daemon and the client that measures it.
pub struct HttpSession<'a> {
    bench: HttpBench<'a>,
    daemon: Daemon,
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl<'a> HttpBench<'a> {
    /// Starts the daemon and waits until it is ready.
    pub fn start(self) -> anyhow::Result<HttpSession<'a>> {
        let streams = self.concurrency.iter().copied().max().unwrap_or(1).max(1);
        let daemon = self.spawn(streams)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = reqwest::Client::new();
        runtime.block_on(wait_ready(&client, &daemon.url))?;
        Ok(HttpSession {
            bench: self,
            daemon,
            runtime,
            client,
        })
    }

    fn spawn(&self, streams: usize) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let pool = dir.path().join("pool.toml");
        let mut file = std::fs::File::create(&pool)?;
        write!(
            file,
            "version = 1\n[server]\nlisten = \"127.0.0.1:0\"\n[[models]]\nname = \"bench\"\n\
             source = {}\ndevices = [{}]\ndtype = {}\nmax_concurrent = {streams}\n\
             queue_timeout = \"1h\"\nrequest_timeout = \"1h\"\nstall_timeout = \"1h\"\n",
            toml::Value::from(self.source),
            toml::Value::from(self.device),
            toml::Value::from(self.dtype),
        )?;
        if let Some(tokens) = self.max_batch_tokens {
            writeln!(file, "max_batch_tokens = {tokens}")?;
        }
        writeln!(file, "kv_cache_dtype = \"{}\"", self.kv_cache_dtype.name())?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(&pool)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting llorch serve")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let url = loop {
            match lines.next() {
                Some(line) => {
                    if let Some(url) = line?.strip_prefix("llorch listening on ") {
                        break url.trim().to_string();
                    }
                }
                None => bail!("the daemon exited before it listened"),
            }
        };
        // Keep draining the daemon's log so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Daemon {
            child,
            url,
            _dir: dir,
        })
    }
}

async fn wait_ready(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !matches!(client.get(format!("{url}/ready")).send().await, Ok(r) if r.status() == 200) {
        if Instant::now() > deadline {
            bail!("the daemon did not become ready in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

impl HttpSession<'_> {
    /// One streamed completion of `max_tokens` tokens on the `k`-th prompt.
    pub fn run(&self, k: usize, max_tokens: usize) -> anyhow::Result<Run> {
        self.runtime
            .block_on(self.stream(&self.bench.prompts.ids(k), max_tokens))
    }

    /// The `http` part of the report: `runs` (this daemon's, each paired with the bare run at
    /// the same index in `bare`), the overhead over those pairs, the concurrent runs, and the
    /// daemon's peak RSS.
    pub fn report(self, runs: &[Run], bare: &[Run]) -> anyhow::Result<Value> {
        let prompt_tokens = self.bench.prompts.len;
        let Rates {
            prefill,
            decode,
            ttft,
        } = Rates::of(runs, prompt_tokens);
        let base = Rates::of(bare, prompt_tokens);
        let added_ttft: Vec<f64> = ttft.iter().zip(&base.ttft).map(|(h, b)| h - b).collect();
        let decode_loss: Vec<f64> = decode
            .iter()
            .zip(&base.decode)
            .map(|(h, b)| 1.0 - h / b)
            .collect();
        let concurrent = self.runtime.block_on(self.concurrent())?;
        Ok(json!({
            "prefill_tok_s": median(&prefill),
            "decode_tok_s": median(&decode),
            "ttft_ms": median(&ttft),
            "decode_tok_s_runs": decode,
            "ttft_ms_runs": ttft,
            "added_ttft_ms": median(&added_ttft),
            "decode_loss": median(&decode_loss),
            "concurrent": concurrent,
            "daemon_peak_rss_bytes": peak_rss_of(self.daemon.child.id()),
        }))
    }

    async fn concurrent(&self) -> anyhow::Result<Vec<Value>> {
        let mut aggregate = Vec::new();
        for (i, &streams) in self.bench.concurrency.iter().enumerate() {
            let prompts: Vec<Vec<u32>> = (0..streams)
                .map(|s| self.bench.prompts.ids(5_000 + 64 * i + s))
                .collect();
            let all = futures::future::try_join_all(
                prompts
                    .iter()
                    .map(|ids| self.stream(ids, self.bench.decode_tokens)),
            )
            .await?;
            let tokens: usize = all.iter().map(|r| r.times.len()).sum();
            let wall = all.iter().map(Run::last_token).max().unwrap_or_default();
            aggregate.push(json!({
                "streams": streams,
                "tokens_per_s": tokens as f64 / wall.as_secs_f64(),
                "steady_decode_tok_s": steady_decode(&all),
            }));
        }
        Ok(aggregate)
    }

    /// One streamed completion of `max_tokens` tokens; token times from the request's start.
    async fn stream(&self, ids: &[u32], max_tokens: usize) -> anyhow::Result<Run> {
        let (client, url) = (&self.client, &self.daemon.url);
        let body = json!({
            "model": "bench",
            "prompt": ids,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": true,
            "stream": true,
            "return_token_ids": true,
        });
        let start = Instant::now();
        let response = client
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("{}: {}", response.status(), response.text().await?);
        }
        let mut times = Vec::with_capacity(max_tokens);
        let mut pending = Vec::new();
        let mut bytes = response.bytes_stream();
        while let Some(chunk) = bytes.next().await {
            pending.extend_from_slice(&chunk?);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                let Some(data) = text.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let value: Value = serde_json::from_str(data)?;
                if let Some(error) = value.get("error") {
                    return Err(anyhow!("stream error: {error}"));
                }
                let ids = value["choices"][0]["token_ids"].as_array().map(Vec::len);
                times.extend(std::iter::repeat_n(start.elapsed(), ids.unwrap_or(0)));
            }
        }
        Run::from_times(&times)
    }
}
