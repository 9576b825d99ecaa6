//! The operator's client for a running daemon's admin API: `llorch ps`, `load`, `reload`,
//! `evict`. The admin key comes from `LLORCH_ADMIN_KEY`. While a load or reload runs, the
//! loading replicas' progress is shown on stderr: a bar on a terminal, plain lines otherwise.

use std::future::Future;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::config::ModelEntry;

/// A client for one daemon.
pub struct AdminClient {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

/// What went wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon could not be reached.
    #[error("cannot reach the daemon at {url}: {source}")]
    Unreachable {
        /// The URL.
        url: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The daemon answered with an error.
    #[error("{status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The error message from the envelope.
        message: String,
    },
    /// The file of a `load` could not be read or parsed.
    #[error("{0}")]
    BadInput(String),
}

impl AdminClient {
    /// Creates a client for the daemon at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            key: std::env::var("LLORCH_ADMIN_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
            http: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = response.status().as_u16();
        let body: Value = response
            .json()
            .await
            .map_err(|source| ClientError::Unreachable { url, source })?;
        if status >= 400 {
            let message = body
                .get("error")
                .and_then(|error| error.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_string();
            return Err(ClientError::Refused { status, message });
        }
        Ok(body)
    }

    /// `GET /admin/models` rendered as a table.
    pub async fn ps(&self) -> Result<String, ClientError> {
        let listing = self
            .send(reqwest::Method::GET, "/admin/models", None)
            .await?;
        Ok(render_table(&listing))
    }

    /// Loads every model entry of a TOML (`[[models]]` tables or one entry) or JSON file,
    /// showing progress until each is loaded; without `wait`, returns once each has started.
    pub async fn load(&self, file: &Path, wait: bool) -> Result<String, ClientError> {
        let mut lines = Vec::new();
        let path = if wait {
            "/admin/models"
        } else {
            "/admin/models?wait=false"
        };
        for entry in read_entries(file)? {
            let body =
                serde_json::to_value(&entry).map_err(|e| ClientError::BadInput(e.to_string()))?;
            let call = self.send(reqwest::Method::POST, path, Some(&body));
            let reply = if wait {
                self.showing_progress(Some(&entry.name), call).await?
            } else {
                call.await?
            };
            lines.push(outcomes(&reply));
        }
        Ok(lines.join("\n"))
    }

    /// Reloads one model, or re-reads the pool file when `name` is `None`, showing progress
    /// until done; without `wait`, returns once the reload has started.
    pub async fn reload(&self, name: Option<&str>, wait: bool) -> Result<String, ClientError> {
        let mut path = match name {
            Some(name) => format!("/admin/models/{name}/reload"),
            None => "/admin/reload".to_string(),
        };
        if !wait {
            path.push_str("?wait=false");
            return Ok(outcomes(
                &self.send(reqwest::Method::POST, &path, None).await?,
            ));
        }
        let call = self.send(reqwest::Method::POST, &path, None);
        let reply = self.showing_progress(name, call).await?;
        Ok(outcomes(&reply))
    }

    /// Waits for `call`, showing on stderr, every quarter second, the load progress of the
    /// replicas of `model` (of every model when `None`) that are loading.
    async fn showing_progress(
        &self,
        model: Option<&str>,
        call: impl Future<Output = Result<Value, ClientError>>,
    ) -> Result<Value, ClientError> {
        let mut call = std::pin::pin!(call);
        let mut shown = Progress::new(std::io::stderr().is_terminal());
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                reply = &mut call => {
                    shown.finish();
                    return reply;
                }
                _ = tick.tick() => {
                    if let Ok(listing) = self.send(reqwest::Method::GET, "/admin/models", None).await {
                        if let Some((label, phase, done, total)) = loading(&listing, model) {
                            shown.update(&label, phase, done, total);
                        }
                    }
                }
            }
        }
    }

    /// Evicts a model (draining, or aborting its requests).
    pub async fn evict(
        &self,
        name: &str,
        abort: bool,
        timeout_ms: Option<u64>,
    ) -> Result<String, ClientError> {
        let mut path = format!(
            "/admin/models/{name}/evict?mode={}",
            if abort { "abort" } else { "drain" }
        );
        if let Some(ms) = timeout_ms {
            path.push_str(&format!("&timeout_ms={ms}"));
        }
        let reply = self.send(reqwest::Method::POST, &path, None).await?;
        Ok(outcomes(&reply))
    }
}

/// The loading replicas of `model` (every model when `None`) in a `/admin/models` listing:
/// their names, what they are doing (`downloading` while an `hf:` source's files download,
/// then `loading`), and their bytes done and total summed.
fn loading(listing: &Value, model: Option<&str>) -> Option<(String, &'static str, u64, u64)> {
    let mut names = Vec::new();
    let (mut read, mut total, mut downloaded, mut download_total) = (0, 0, 0, 0);
    for entry in listing["models"].as_array()? {
        let name = entry["name"].as_str().unwrap_or("?");
        if model.is_some_and(|m| m != name) {
            continue;
        }
        for replica in entry["replicas"].as_array().into_iter().flatten() {
            let progress = &replica["load_progress"];
            let count = |field: &str| progress[field].as_u64().unwrap_or(0);
            if progress.is_object() {
                read += count("bytes_read");
                total += count("bytes_total");
                downloaded += count("bytes_downloaded");
                download_total += count("download_bytes_total");
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    let label = names.join(", ");
    if total == 0 && download_total > 0 {
        return Some((label, "downloading", downloaded, download_total));
    }
    (total > 0).then_some((label, "loading", read, total))
}

/// Load progress on stderr: a bar on a terminal, otherwise a line each tenth of the way.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
    tenths: u64,
    phase: &'static str,
}

impl Progress {
    fn new(terminal: bool) -> Self {
        Self {
            bar: None,
            terminal,
            tenths: 0,
            phase: "loading",
        }
    }

    fn update(&mut self, label: &str, phase: &'static str, read: u64, total: u64) {
        if phase != self.phase {
            self.phase = phase;
            self.tenths = 0;
        }
        if !self.terminal {
            let tenths = read * 10 / total;
            if tenths > self.tenths {
                self.tenths = tenths;
                eprintln!(
                    "{label}: {phase} {}% ({read} of {total} bytes)",
                    tenths * 10
                );
            }
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        bar.set_message(format!("{phase} {label}"));
        bar.set_length(total);
        bar.set_position(read);
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn read_entries(file: &Path) -> Result<Vec<ModelEntry>, ClientError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ClientError::BadInput(format!("cannot read {}: {e}", file.display())))?;
    let bad = |e: String| ClientError::BadInput(format!("{}: {e}", file.display()));
    let is_json = file.extension().is_some_and(|ext| ext == "json");
    if is_json {
        let value: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let list = match value {
            Value::Array(list) => list,
            other => vec![other],
        };
        return list
            .into_iter()
            .map(|v| serde_json::from_value(v).map_err(|e| bad(e.to_string())))
            .collect();
    }
    #[derive(serde::Deserialize)]
    struct Models {
        models: Vec<ModelEntry>,
    }
    match toml::from_str::<Models>(&text) {
        Ok(models) => Ok(models.models),
        Err(_) => toml::from_str::<ModelEntry>(&text)
            .map(|entry| vec![entry])
            .map_err(|e| bad(e.to_string())),
    }
}

fn outcomes(reply: &Value) -> String {
    reply["models"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|o| {
                    let error = o["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default();
                    format!(
                        "{} {}{error}",
                        o["name"].as_str().unwrap_or("?"),
                        o["action"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Running sequences of a replica over those it may run (`-` before it is ready).
fn running(batching: &Value) -> String {
    match (
        batching["running"].as_u64(),
        batching["max_sequences"].as_u64(),
    ) {
        (Some(running), Some(max)) => format!("{running}/{max}"),
        _ => "-".to_string(),
    }
}

/// The share of a batched replica's KV blocks held by sequences.
fn kv_used(batching: &Value) -> String {
    let used = batching["kv_blocks_used"].as_u64();
    match (
        used,
        batching["kv_blocks_total"].as_u64(),
        &batching["batched"],
    ) {
        (Some(used), Some(total), Value::Bool(true)) if total > 0 => {
            format!("{:.1}%", 100.0 * used as f64 / total as f64)
        }
        _ => "-".to_string(),
    }
}

/// Renders `/admin/models` as aligned columns.
pub fn render_table(listing: &Value) -> String {
    let mut rows = vec![[
        "MODEL",
        "REPLICA",
        "STATE",
        "IN FLIGHT",
        "QUEUED",
        "RUNNING",
        "KV USED",
        "RESTARTS",
        "LAST ERROR",
    ]
    .map(String::from)
    .to_vec()];
    let clustered = listing["nodes"].is_array();
    if let Some(header) = rows.first_mut().filter(|_| clustered) {
        header.insert(1, "NODE".to_string());
    }
    for model in listing["models"].as_array().into_iter().flatten() {
        for replica in model["replicas"].as_array().into_iter().flatten() {
            let mut row = vec![
                model["name"].as_str().unwrap_or("").to_string(),
                replica["replica"].as_str().unwrap_or("").to_string(),
                replica["state"].as_str().unwrap_or("").to_string(),
                replica["in_flight"].to_string(),
                model["queued"].to_string(),
                running(&replica["batching"]),
                kv_used(&replica["batching"]),
                replica["restarts"].to_string(),
                replica["last_error"].as_str().unwrap_or("-").to_string(),
            ];
            if clustered {
                row.insert(1, replica["node"].as_str().unwrap_or("-").to_string());
            }
            rows.push(row);
        }
    }
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|col| {
            rows.iter()
                .map(|row| row.get(col).map_or(0, |cell| cell.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_columns() {
        let listing = serde_json::json!({"models": [{"name": "demo", "queued": 0, "replicas": [
            {"replica": "demo#0@cpu", "state": "ready", "in_flight": 1, "restarts": 0, "last_error": null,
             "batching": {"batched": true, "running": 1, "max_sequences": 16, "kv_blocks_used": 3,
                          "kv_blocks_total": 64}}
        ]}]});
        let table = render_table(&listing);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "MODEL  REPLICA     STATE  IN FLIGHT  QUEUED  RUNNING  KV USED  RESTARTS  LAST ERROR"
        );
        assert_eq!(
            lines[1],
            "demo   demo#0@cpu  ready  1          0       1/16     4.7%     0         -"
        );
    }
}
