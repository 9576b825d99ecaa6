//! Inference keys, model limits, request ids, the default loopback bind (S1), and the refusal
//! to listen on a non-loopback address without keys.

mod common;

use common::daemon::Daemon;
use llorch::api::Keys;
use serde_json::{json, Value};

const POOL: &str = "version = 1\n[[models]]\nname = \"alpha\"\nsource = \"builtin:demo\"\n[[models]]\nname = \"beta\"\nsource = \"builtin:demo\"\n";

async fn complete(
    daemon: &Daemon,
    token: Option<&str>,
    model: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&json!({"model": model, "prompt": "Hi", "max_tokens": 1}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, response.json().await.unwrap(), headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_routes_need_a_key_once_keys_are_configured() {
    let keys = Keys::parse(Some("admin-secret"), "open-key,alpha-key:alpha");
    let daemon = Daemon::start_with_keys(POOL, keys).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while daemon
        .client
        .get(daemon.at("/ready"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let (status, body, headers) = complete(&daemon, None, "alpha").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, _, _) = complete(&daemon, Some("wrong"), "alpha").await;
    assert_eq!(status, 401);
    for token in ["open-key", "alpha-key", "admin-secret"] {
        let (status, body, _) = complete(&daemon, Some(token), "alpha").await;
        assert_eq!(status, 200, "{token}: {body}");
    }
    let (status, body, _) = complete(&daemon, Some("alpha-key"), "beta").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    assert_eq!(body["error"]["type"], "permission_error");

    let models: Value = daemon
        .client
        .get(daemon.at("/v1/models"))
        .bearer_auth("alpha-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha"]);
    for public in ["/health", "/ready"] {
        assert_eq!(
            daemon
                .client
                .get(daemon.at(public))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{public}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_generated_on_every_response() {
    let daemon = Daemon::start(POOL).await;
    let response = daemon
        .client
        .get(daemon.at("/health"))
        .header("x-request-id", "client-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-42");
    let response = daemon
        .client
        .get(daemon.at("/no/such/route"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(generated.len(), 32);
    assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
    let too_long = "x".repeat(200);
    let response = daemon
        .client
        .get(daemon.at("/health"))
        .header("x-request-id", &too_long)
        .send()
        .await
        .unwrap();
    assert_ne!(response.headers()["x-request-id"], too_long.as_str());
}

#[test]
fn s1_the_default_config_listens_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pool.toml");
    // No `listen` in the file and none on the command line: the built-in default applies.
    std::fs::write(&config, POOL).unwrap();
    let (mut child, url, _) = common::process::start_with_args(&config, &[], &[]);
    let sockets = common::process::listening_addresses(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(url, "http://127.0.0.1:8080");
    // 127.0.0.1:8080 as /proc/net/tcp writes it; nothing on IPv6 or another address.
    assert_eq!(
        sockets,
        vec![("tcp".to_string(), "0100007F:1F90".to_string())]
    );
}

#[test]
fn a_non_loopback_address_without_keys_is_refused_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pool.toml");
    std::fs::write(&config, POOL).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_llorch"))
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
        ])
        .env_remove("LLORCH_API_KEYS")
        .env_remove("LLORCH_ADMIN_KEY")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without API keys"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
}
