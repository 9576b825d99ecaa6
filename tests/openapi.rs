//! `GET /openapi.json`: a valid OpenAPI 3.1 document (checked by `openapi-spec-validator`)
//! that names exactly the routes the router serves, and whose response schemas the daemon's
//! real responses validate against (`tests/openapi_check.py`).

mod common;

use std::collections::BTreeSet;

use common::daemon::Daemon;

const POOL: &str = "version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n";

/// The routes of the document: `METHOD path`.
async fn documented(daemon: &Daemon) -> BTreeSet<String> {
    let doc = daemon.get_json("/openapi.json").await;
    assert_eq!(doc["openapi"], "3.1.0", "{doc}");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_names_every_route_the_router_serves_and_no_other() {
    let daemon = Daemon::start(POOL).await;
    let served: BTreeSet<String> = llorch::api::route_inventory()
        .iter()
        .flat_map(|route| {
            route
                .methods
                .iter()
                .map(move |method| format!("{method} {}", route.path))
        })
        .collect();
    let documented = documented(&daemon).await;
    assert_eq!(
        served.difference(&documented).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "served but not documented"
    );
    assert_eq!(
        documented.difference(&served).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "documented but not served"
    );
    // And the router really answers each documented route (not the 404 of an unknown path).
    let client = reqwest::Client::new();
    for route in &documented {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path.replace("{name}", "demo").replace("{file}", "app.js");
        let request = client.request(method.parse().unwrap(), daemon.at(&path));
        let request = if method == "POST" {
            request
                .header("content-type", "application/json")
                .body("{}")
        } else {
            request
        };
        let response = request.send().await.unwrap();
        let status = response.status();
        if path == "/admin/events" {
            // An endless stream: its status and type say it is served.
            assert_eq!(status, 200, "{route}");
            assert_eq!(response.headers()["content-type"], "text/event-stream");
            continue;
        }
        let body = response.text().await.unwrap_or_default();
        assert!(
            !body.contains("route_not_found") && status != 405,
            "{route}: {status} {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_valid_openapi_and_real_responses_match_its_schemas() {
    if !common::tool_available(
        std::process::Command::new("python3").args([
            "-c",
            "import openapi_spec_validator, openapi_schema_validator",
        ]),
        "LLORCH_REQUIRE_OPENAI",
        "python3 cannot import openapi_spec_validator (pip install openapi-spec-validator)",
    ) {
        return;
    }
    let daemon = Daemon::start(POOL).await;
    let stdout = common::run_script("openapi_check.py", &daemon.url, &["demo"]).await;
    assert!(stdout.contains("POST /v1/chat/completions"), "{stdout}");
}
