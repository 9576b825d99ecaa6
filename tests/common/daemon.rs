//! Starts the real daemon (config loading, actor pool, axum) on 127.0.0.1:0 in-process and
//! speaks HTTP to it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use llorch::actors::pool::Pool;
use llorch::api::{serve, AppState, Keys};
use serde_json::Value;
use tokio::sync::oneshot;

/// The device the daemon suites run on: `LLORCH_TEST_DEVICE` (e.g. `cuda:0`), else `cpu`.
pub fn test_device() -> String {
    std::env::var("LLORCH_TEST_DEVICE").unwrap_or_else(|_| "cpu".to_string())
}

/// Moves every model of a pool file to the device named by `LLORCH_TEST_DEVICE` (to run a
/// suite on a GPU), in the dtype `LLORCH_TEST_DTYPE` if set; unchanged when it is not set.
/// Tests that rewrite the pool file pass the new text through it too.
pub fn on_test_device(pool_toml: &str) -> String {
    let Ok(device) = std::env::var("LLORCH_TEST_DEVICE") else {
        return pool_toml.to_string();
    };
    let mut pool: toml::Table = pool_toml.parse().unwrap();
    if let Some(models) = pool.get_mut("models").and_then(|m| m.as_array_mut()) {
        for model in models.iter_mut().filter_map(|m| m.as_table_mut()) {
            let count = model
                .get("devices")
                .and_then(|d| d.as_array())
                .map_or(1, Vec::len);
            let devices = vec![toml::Value::from(device.as_str()); count];
            model.insert("devices".to_string(), toml::Value::from(devices));
            if let Ok(dtype) = std::env::var("LLORCH_TEST_DTYPE") {
                model.insert("dtype".to_string(), toml::Value::from(dtype));
            }
        }
    }
    toml::to_string(&pool).unwrap()
}

/// How long a test waits for its models to load.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running daemon; stopped when dropped.
pub struct Daemon {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// A client for it.
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Writes `pool_toml` to a temp dir, validates it, starts the pool and the server, and
    /// waits for `/ready`.
    pub async fn start(pool_toml: &str) -> Daemon {
        let daemon = Self::start_unready(pool_toml).await;
        daemon.wait_ready().await;
        daemon
    }

    /// Like [`Daemon::start`] but returns without waiting for the models to load.
    pub async fn start_unready(pool_toml: &str) -> Daemon {
        Self::start_with_keys(pool_toml, Keys::default()).await
    }

    /// Starts with the given keys, without waiting for the models to load.
    pub async fn start_with_keys(pool_toml: &str, keys: Keys) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.toml");
        std::fs::write(&path, on_test_device(pool_toml)).unwrap();
        let config = llorch::config::load(&path).unwrap();
        let config_server = config.server.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let pool = Pool::start(config, Some(path.clone())).await.unwrap();
        let state = AppState::new(&pool, keys, config_server);
        let (shutdown, stop) = oneshot::channel::<()>();
        tokio::spawn(async move {
            serve(listener, state, async {
                let _ = stop.await;
            })
            .await
            .unwrap();
            pool.stop().await;
        });
        Daemon {
            url,
            client: reqwest::Client::new(),
            shutdown: Some(shutdown),
            dir,
        }
    }

    /// Waits until `/v1/models` lists `model` (it has a ready replica).
    pub async fn wait_model(&self, model: &str) {
        self.wait_model_as(model, None).await
    }

    /// Like [`Daemon::wait_model`], asking with an inference key.
    pub async fn wait_model_with_key(&self, model: &str, key: &str) {
        self.wait_model_as(model, Some(key)).await
    }

    async fn wait_model_as(&self, model: &str, key: Option<&str>) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut request = self.client.get(self.at("/v1/models"));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let listed: Value = request.send().await.unwrap().json().await.unwrap();
            let ready = listed["data"]
                .as_array()
                .is_some_and(|models| models.iter().any(|m| m["id"] == model));
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "{model} never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/ready` is 200 and no replica is still loading.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = self
                .client
                .get(self.at("/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            let listing: Value = self
                .client
                .get(self.at("/admin/models"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let loading = listing["models"].as_array().is_some_and(|models| {
                models
                    .iter()
                    .flat_map(|m| m["replicas"].as_array().cloned().unwrap_or_default())
                    .any(|r| r["state"] == "loading")
            });
            if ready && !loading {
                return;
            }
            assert!(Instant::now() < deadline, "the daemon never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The pool file the daemon was started from.
    pub fn pool_path(&self) -> std::path::PathBuf {
        self.dir.path().join("pool.toml")
    }

    /// The URL of a path.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// GETs a path and returns its JSON body.
    pub async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(self.at(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The `/metrics` text (no key).
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.at("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// POSTs JSON and returns status and body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.at(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// POSTs a streaming request and returns every `data:` payload until the stream ends.
    pub async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = self
            .client
            .post(self.at(path))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut reader = SseReader::new(response);
        let mut all = Vec::new();
        while let Some(data) = reader.next().await {
            all.push(data);
        }
        all
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Reads `data:` payloads from an SSE response one at a time.
pub struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: Vec<u8>,
}

impl SseReader {
    /// Wraps a response.
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buffer: Vec::new(),
        }
    }

    /// The next `data:` payload, or `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let frame = String::from_utf8(raw).expect("SSE frames are UTF-8");
                let data: Vec<&str> = frame
                    .lines()
                    .filter_map(|line| {
                        line.strip_prefix("data: ")
                            .or_else(|| line.strip_prefix("data:"))
                    })
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Some(data.join("\n"));
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.buffer.extend_from_slice(&bytes),
                _ => return None,
            }
        }
    }
}

/// The sum of the samples of metric `name` whose labels contain every `k="v"` of `labels`
/// (0 when none match).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
