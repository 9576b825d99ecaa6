//! `llorch bench` on the built-in demo model: it reports medians over the asked-for runs as
//! JSON, and refuses settings that measure nothing.

mod common;

use serde_json::Value;

fn bench(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_llorch"))
        .arg("bench")
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// Runs `llorch bench` and returns its JSON report, failing with its stderr if it failed.
fn report(args: &[&str]) -> Value {
    let output = bench(args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn bench_reports_prefill_and_decode_medians_as_json() {
    let report = report(&[
        "--source",
        "builtin:demo",
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "8",
        "--runs",
        "3",
    ]);
    assert_eq!(report["threads"], 1);
    let level = report["cpu_level"].as_str().unwrap();
    assert!(["avx512", "avx2", "scalar"].contains(&level), "{level}");
    assert_eq!(report["prompt_tokens"], 16);
    assert_eq!(report["dtype"], "f32");
    for runs in ["prefill_tok_s_runs", "decode_tok_s_runs"] {
        let values = report[runs].as_array().unwrap();
        assert_eq!(values.len(), 3, "{runs}");
        assert!(values.iter().all(|v| v.as_f64().unwrap() > 0.0), "{runs}");
    }
    let decode: Vec<f64> = report["decode_tok_s_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let median = report["decode_tok_s"].as_f64().unwrap();
    assert!(decode.iter().filter(|&&v| v <= median).count() >= 2);
    assert!(decode.iter().filter(|&&v| v >= median).count() >= 2);
    assert!(report["load_s"].as_f64().unwrap() > 0.0);
    assert!(report["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
}

#[test]
fn bench_refuses_a_run_that_measures_nothing() {
    let output = bench(&["--source", "builtin:demo", "--decode-tokens", "1"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--decode-tokens at least 2"));
}

#[test]
fn bench_over_http_reports_the_daemon_the_streams_and_the_bandwidth_bound() {
    let Some(fixtures) = common::fixtures() else {
        return;
    };
    let gguf = fixtures.join("gguf/stories260k-q8_0.gguf");
    let report = report(&[
        "--source",
        gguf.to_str().unwrap(),
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "8",
        "--runs",
        "2",
        "--http",
        "--concurrency",
        "1,3",
    ]);
    let positive = |v: &Value| v.as_f64().is_some_and(|x| x > 0.0);
    for key in [
        "weight_bytes_per_token",
        "read_bandwidth_gb_s",
        "decode_bound_tok_s",
    ] {
        assert!(positive(&report[key]), "{key}: {}", report[key]);
    }
    let http = &report["http"];
    for key in [
        "prefill_tok_s",
        "decode_tok_s",
        "ttft_ms",
        "daemon_peak_rss_bytes",
    ] {
        assert!(positive(&http[key]), "http.{key}: {http}");
    }
    // The daemon's cost over the (bare, HTTP) pairs: either sign, but a number.
    for key in ["added_ttft_ms", "decode_loss"] {
        assert!(
            http[key].as_f64().is_some_and(f64::is_finite),
            "http.{key}: {http}"
        );
    }
    assert_eq!(http["ttft_ms_runs"].as_array().map(Vec::len), Some(2));
    let streams: Vec<u64> = http["concurrent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(positive(&c["tokens_per_s"]), "{c}");
            c["streams"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(streams, [1, 3]);
}
