//! The official `openai` Python package against the running daemon: list models, chat
//! completion, streamed chat completion, completion, `NotFoundError` for an unknown model (an
//! error before the first byte), and `APIError` for a stream that fails after its first chunks;
//! and every request field of its chat and completions types against the README's table.

mod common;

use common::daemon::Daemon;

/// Whether `python3` can import `openai` (required with `LLORCH_REQUIRE_OPENAI=1`, set by
/// `.ci/run`, which installs it).
fn openai_available() -> bool {
    common::tool_available(
        std::process::Command::new("python3").args(["-c", "import openai, jsonschema"]),
        "LLORCH_REQUIRE_OPENAI",
        "python3 cannot import openai and jsonschema (pip install openai jsonschema)",
    )
}

/// The demo model's pool, plus `extra` models.
fn pool(extra: &str) -> String {
    format!("version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n{extra}")
}

/// Runs `tests/<script>` with the daemon's URL and `args`.
async fn run_script(daemon: &Daemon, script: &str, args: &[&str]) {
    common::run_script(script, &daemon.url, args).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_against_the_daemon() {
    if !openai_available() {
        return;
    }
    let slow = "[[models]]\nname = \"slow\"\nsource = \"builtin:fake?ms=50\"\nrequest_timeout = \"400ms\"\n";
    let daemon = Daemon::start(&pool(slow)).await;
    run_script(&daemon, "openai_client.py", &["demo", "slow"]).await;
}

/// `tests/openai_fields.py`: every field of the official client's chat and completions request
/// types is honoured, or ignored or refused as the README's table says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_of_the_openai_request_schemas_is_honoured_documented_or_refused() {
    if !openai_available() {
        return;
    }
    let daemon = Daemon::start(&pool("")).await;
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    run_script(&daemon, "openai_fields.py", &["demo", readme]).await;
}

/// `tests/openai_structured.py`: structured outputs (`json_schema`, `json_object`, `parse`
/// with a pydantic model, `guided_choice`, `guided_regex`) from the random-weight demo model
/// parse and validate (needs `jsonschema`, which `.ci/run` installs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_of_a_random_model_parse_and_validate() {
    if !openai_available() {
        return;
    }
    let daemon = Daemon::start(&pool("")).await;
    run_script(&daemon, "openai_structured.py", &["demo"]).await;
}

/// `tests/openai_tools.py`: `tool_choice="required"` calls validate against their functions'
/// schemas, streamed (reassembled by the client's stream helper) and not; `parse` with a
/// pydantic function tool; a round trip with `tool` messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_of_a_random_model_parse_and_validate() {
    if !openai_available() {
        return;
    }
    let daemon = Daemon::start(&pool("")).await;
    run_script(&daemon, "openai_tools.py", &["demo"]).await;
}
