//! The web console: its page and assets with their security headers, and the page itself in a
//! real headless Chromium (`tests/console_browser.py`, selenium with Debian's chromium and
//! chromium-driver; required with `LLORCH_REQUIRE_BROWSER=1`, set by `.ci/run`).

mod common;

use common::daemon::Daemon;
use llorch::api::{InferenceKey, Keys};

const HOSTILE: &str = "<img src=x onerror=alert(1)>";

fn browser_available() -> bool {
    common::tool_available(
        std::process::Command::new("python3").args([
            "-c",
            "import selenium, shutil, sys; sys.exit(0 if shutil.which('chromedriver') and shutil.which('chromium') else 1)",
        ]),
        "LLORCH_REQUIRE_BROWSER",
        "no selenium, chromium and chromedriver (apt-get install chromium chromium-driver; pip install selenium)",
    )
}

async fn run_browser(daemon: &Daemon, args: &[&str]) {
    common::run_script("console_browser.py", &daemon.url, args).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_carry_a_strict_content_security_policy() {
    let daemon = Daemon::start("version = 1\n").await;
    let client = reqwest::Client::new();
    let page = client.get(daemon.at("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    // No inline script or style, no event-handler attribute: all of it would be refused.
    assert!(
        !html.contains("<script>") && !html.contains("<style"),
        "{html}"
    );
    assert!(
        !html.contains(" onclick") && !html.contains(" style="),
        "{html}"
    );
    // Every asset the page names is served with the same policy.
    let mut names: Vec<&str> = html
        .split("/console/")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    let app = client
        .get(daemon.at("/console/app.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let imports: Vec<&str> = app
        .split("from \"./")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    names.extend(imports);
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        let asset = client
            .get(daemon.at(&format!("/console/{name}")))
            .send()
            .await
            .unwrap();
        assert_eq!(asset.status(), 200, "{name}");
        assert_eq!(asset.headers()["content-security-policy"], csp, "{name}");
        let kind = asset.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        let body = asset.text().await.unwrap();
        assert!(!body.contains("innerHTML"), "{name} writes HTML");
        if name.ends_with(".js") {
            assert!(kind.starts_with("text/javascript"), "{name}: {kind}");
        }
    }
    let missing = client
        .get(daemon.at("/console/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "route_not_found");
}

/// A daemon without keys (loopback may administer): the page lists the replicas, renders a
/// hostile name as text, streams from the playground and stops a slow answer, evicts, reloads
/// and loads, shows a broken pool file's diagnostics, and draws its charts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_and_drives_the_pool_in_a_real_browser() {
    if !browser_available() {
        return;
    }
    let pool = format!(
        "version = 1\n\
         [[models]]\nname = \"first\"\nsource = \"builtin:demo\"\n\
         [[models]]\nname = \"second\"\nsource = \"builtin:demo\"\n\
         [[models]]\nname = \"slow\"\nsource = \"builtin:fake?ms=40\"\n\
         [[models]]\nname = {HOSTILE:?}\nsource = \"builtin:demo\"\n"
    );
    let daemon = Daemon::start(&pool).await;
    let pool_path = daemon.pool_path();
    run_browser(&daemon, &["open", pool_path.to_str().unwrap(), HOSTILE]).await;
}

/// With keys configured the page shows only a key prompt, refuses an inference key, opens
/// with the admin key, and an action sent with a key that is not the admin key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_the_console_asks_for_the_admin_key_and_refuses_other_keys() {
    if !browser_available() {
        return;
    }
    let keys = Keys {
        admin: Some("console-admin-key".to_string()),
        inference: vec![InferenceKey {
            key: "console-inference-key".to_string(),
            models: None,
        }],
    };
    let daemon = Daemon::start_with_keys(
        "version = 1\n[[models]]\nname = \"first\"\nsource = \"builtin:demo\"\n",
        keys,
    )
    .await;
    daemon
        .wait_model_with_key("first", "console-admin-key")
        .await;
    run_browser(
        &daemon,
        &["keyed", "console-admin-key", "console-inference-key"],
    )
    .await;
}
