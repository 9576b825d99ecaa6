//! An `hf:` source downloaded from a hub at `HF_ENDPOINT` (here a local server that answers
//! as the Hugging Face hub does: a `Range: bytes=0-0` probe with the commit, etag and size,
//! then the ranged download, sent slowly): the loading replica reports the bytes downloaded
//! in `/admin/models`, `llorch load` prints them, the files land in the cache as hf-hub lays
//! them out, and the model then serves. This binary holds one test: it sets `HF_ENDPOINT`
//! and `HF_HUB_CACHE` for the whole process.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::daemon::Daemon;

const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";
/// Bytes sent per tick of the slow download.
const SLICE: usize = 32 * 1024;

/// A hub serving the files of one directory for every repository and revision.
async fn serve_file(
    State(dir): State<PathBuf>,
    UrlPath((_org, _name, _revision, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Ok(bytes) = std::fs::read(dir.join(&file)) else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let size = bytes.len();
    let etag = format!("\"{}-{size}\"", file.replace('.', "-"));
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("bytes=0-");
    let (start, end) = match range.trim_start_matches("bytes=").split_once('-') {
        Some((a, b)) => (
            a.parse::<usize>().unwrap_or(0),
            b.parse::<usize>().map(|b| b + 1).unwrap_or(size),
        ),
        None => (0, size),
    };
    let part = bytes[start.min(size)..end.min(size)].to_vec();
    let stream = futures::stream::unfold((part, 0usize), |(part, at)| async move {
        if at >= part.len() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let next = (at + SLICE).min(part.len());
        let chunk = bytes::Bytes::copy_from_slice(&part[at..next]);
        Some((Ok::<_, std::io::Error>(chunk), (part, next)))
    });
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header("x-repo-commit", COMMIT)
        .header("etag", etag)
        .header(
            "content-range",
            format!("bytes {start}-{}/{size}", end.min(size).saturating_sub(1)),
        )
        .body(Body::from_stream(stream))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hf_source_downloads_with_its_progress_shown_then_serves() {
    let Some(fixtures) = common::fixtures() else {
        return;
    };
    let model_dir = fixtures.join("models/stories260k");
    let hub = axum::Router::new()
        .route(
            "/{org}/{name}/resolve/{revision}/{file}",
            axum::routing::get(serve_file),
        )
        .with_state(model_dir.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hub).await.unwrap() });
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::remove_var("HF_HUB_OFFLINE");

    let daemon = Daemon::start("version = 1\n").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.toml");
    std::fs::write(
        &file,
        "name = \"hub\"\nsource = \"hf:llorch-test/stories@main\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap().to_string();
    let url = daemon.url.clone();
    let cli = tokio::spawn(async move { common::llorch_cli(&["load", &path], &url).await });
    let weights = std::fs::metadata(model_dir.join("model.safetensors"))
        .unwrap()
        .len();
    let mut seen = Vec::new();
    while !cli.is_finished() {
        let listing = daemon.get_json("/admin/models").await;
        let progress = listing["models"][0]["replicas"][0]["load_progress"].clone();
        if let Some(done) = progress["bytes_downloaded"].as_u64() {
            let total = progress["download_bytes_total"].as_u64().unwrap();
            assert!(done <= total, "{progress}");
            seen.push((done, total));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, out, stderr) = cli.await.unwrap();
    assert!(ok, "{stderr}");
    assert_eq!(out.trim(), "hub loaded");
    // The weights (about a megabyte, sent in 32 KiB slices every 20 ms) were seen arriving.
    let during: Vec<_> = seen
        .iter()
        .filter(|(done, total)| *total > weights && done < total)
        .collect();
    assert!(during.len() >= 3, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    assert!(
        stderr.lines().any(|l| l.starts_with("hub: downloading ")),
        "{stderr}"
    );

    // hf-hub's layout: blobs, a snapshot of the commit, and refs/main naming it.
    let repo = cache.path().join("models--llorch-test--stories");
    let refs = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    assert_eq!(refs.trim(), COMMIT);
    let snapshot = repo.join("snapshots").join(COMMIT);
    assert_eq!(
        std::fs::read(snapshot.join("model.safetensors")).unwrap(),
        std::fs::read(model_dir.join("model.safetensors")).unwrap()
    );
    assert!(snapshot.join("tokenizer.json").exists());

    let (status, body) = daemon
        .post(
            "/v1/completions",
            &serde_json::json!({"model": "hub", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !body["choices"][0]["text"].as_str().unwrap().is_empty(),
        "{body}"
    );
}
