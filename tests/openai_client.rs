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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_against_the_daemon() {
    if !openai_available() {
        return;
    }
    let daemon = Daemon::start(
        "version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n\
         [[models]]\nname = \"slow\"\nsource = \"builtin:fake?ms=50\"\nrequest_timeout = \"400ms\"\n",
    )
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let output = tokio::process::Command::new("python3")
        .args([script, &daemon.url, "demo", "slow"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

/// `tests/openai_fields.py`: every field of the official client's chat and completions request
/// types is honoured, or ignored or refused as the README's table says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_of_the_openai_request_schemas_is_honoured_documented_or_refused() {
    if !openai_available() {
        return;
    }
    let daemon =
        Daemon::start("version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n")
            .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_fields.py");
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let output = tokio::process::Command::new("python3")
        .args([script, &daemon.url, "demo", readme])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

/// `tests/openai_structured.py`: structured outputs (`json_schema`, `json_object`, `parse`
/// with a pydantic model, `guided_choice`, `guided_regex`) from the random-weight demo model
/// parse and validate (needs `jsonschema`, which `.ci/run` installs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_of_a_random_model_parse_and_validate() {
    if !openai_available() {
        return;
    }
    let daemon =
        Daemon::start("version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n")
            .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_structured.py");
    let output = tokio::process::Command::new("python3")
        .args([script, &daemon.url, "demo"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
