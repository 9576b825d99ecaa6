//! The engine thread: jobs in, token events out, cancellation, and a clean cache between jobs.

use std::sync::atomic::Ordering;

use candle_core::Device;
use llorch::actors::engine::{
    spawn_engine, EngineConfig, EngineError, EngineHandle, GenerationRequest, Job, TokenEvent,
    EVENT_BUFFER,
};
use llorch::models::{
    DTypeChoice, FinishReason, GenerationParams, LoadSpec, ModelSource, Prompt, SamplingParams,
};
use tokio::sync::mpsc::Receiver;

fn engine() -> EngineHandle {
    let spec = LoadSpec {
        source: ModelSource::BuiltinDemo,
        device: Device::Cpu,
        dtype: DTypeChoice::Auto,
        max_seq_len: None,
    };
    let (handle, ready) = spawn_engine("test", spec, EngineConfig::default(), |_| {}).unwrap();
    let info = ready.blocking_recv().unwrap().unwrap();
    assert_eq!(info.architecture, "llama");
    handle
}

fn request(text: &str, max_tokens: usize, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest {
        prompt: Prompt::Text {
            text: text.to_string(),
            add_special_tokens: true,
        },
        params: GenerationParams {
            sampling,
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..GenerationParams::default()
        },
        cache_salt: 0,
    }
}

fn drain(mut events: Receiver<TokenEvent>) -> Vec<TokenEvent> {
    let mut all = Vec::new();
    while let Some(event) = events.blocking_recv() {
        all.push(event);
    }
    all
}

fn token_ids(events: &[TokenEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            TokenEvent::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn text_of(events: &[TokenEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            TokenEvent::Token { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_job_streams_started_tokens_then_finished() {
    let engine = engine();
    let (job, events, _) = Job::new(request("Hi", 5, SamplingParams::greedy()));
    engine.submit(job).unwrap();
    let events = drain(events);
    assert_eq!(
        events.first(),
        Some(&TokenEvent::Started {
            prompt_ids: vec![1, 79, 112],
            tool_format: None,
        })
    );
    assert_eq!(token_ids(&events).len(), 5);
    assert_eq!(
        events.last(),
        Some(&TokenEvent::Finished {
            reason: FinishReason::MaxTokens,
            prompt_tokens: 3,
            completion_tokens: 5,
            cached_tokens: 0,
        })
    );
}

#[test]
fn the_cancel_flag_stops_a_job_without_a_finished_event() {
    let engine = engine();
    let (job, mut events, cancel) = Job::new(request("Hi", 1_000, SamplingParams::greedy()));
    engine.submit(job).unwrap();
    let mut before = 0;
    while before < 3 {
        if let Some(TokenEvent::Token { .. }) = events.blocking_recv() {
            before += 1;
        }
    }
    cancel.store(true, Ordering::Relaxed);
    let after = drain(events);
    // Tokens sent before the flag was seen may still be in the channel (the engine runs up to
    // its buffer ahead of a reader that a loaded machine deschedules), none after: far fewer
    // than the 1 000 asked for.
    assert!(
        token_ids(&after).len() <= EVENT_BUFFER + 1,
        "{} tokens after cancel",
        after.len()
    );
    assert!(!after
        .iter()
        .any(|e| matches!(e, TokenEvent::Finished { .. })));
}

#[test]
fn a_dropped_receiver_abandons_the_job_and_the_next_job_sees_a_clean_cache() {
    let engine = engine();
    let (reference, events, _) = Job::new(request("Hello", 8, SamplingParams::greedy()));
    engine.submit(reference).unwrap();
    let expected = token_ids(&drain(events));

    let (long, mut events, _) =
        Job::new(request("Something else", 100_000, SamplingParams::greedy()));
    engine.submit(long).unwrap();
    while !matches!(events.blocking_recv(), Some(TokenEvent::Token { .. })) {}
    drop(events);
    let (next, events, _) = Job::new(request("Hello", 8, SamplingParams::greedy()));
    engine.submit(next).unwrap();
    assert_eq!(token_ids(&drain(events)), expected);
}

#[test]
fn invalid_requests_fail_with_a_typed_error_and_the_engine_keeps_serving() {
    let engine = engine();
    let bad = SamplingParams {
        top_p: 0.0,
        ..SamplingParams::default()
    };
    let (job, events, _) = Job::new(request("Hi", 5, bad));
    engine.submit(job).unwrap();
    match drain(events).as_slice() {
        [TokenEvent::Failed(EngineError::Invalid { code, param, .. })] => {
            assert_eq!(*code, "invalid_parameter");
            assert_eq!(*param, Some("top_p"));
        }
        other => panic!("unexpected events {other:?}"),
    }
    let long_prompt = "x".repeat(4_000);
    let (job, events, _) = Job::new(request(&long_prompt, 5, SamplingParams::greedy()));
    engine.submit(job).unwrap();
    match drain(events).as_slice() {
        [TokenEvent::Failed(EngineError::Invalid { code, message, .. })] => {
            assert_eq!(*code, "context_length_exceeded");
            assert_eq!(
                message,
                "the prompt has 4001 tokens but the model's context is 2048 tokens"
            );
        }
        other => panic!("unexpected events {other:?}"),
    }
    let (job, events, _) = Job::new(request("Hi", 2, SamplingParams::greedy()));
    engine.submit(job).unwrap();
    assert_eq!(token_ids(&drain(events)).len(), 2);
}

#[test]
fn a_stop_string_ends_a_job_and_is_not_emitted() {
    let engine = engine();
    let (job, events, _) = Job::new(request("Hi", 40, SamplingParams::greedy()));
    engine.submit(job).unwrap();
    let events = drain(events);
    let text = text_of(&events);
    let stop: String = text.chars().skip(3).take(2).collect();
    let expected: String = text.split(stop.as_str()).next().unwrap().to_string();
    let mut with_stop = request("Hi", 40, SamplingParams::greedy());
    with_stop.params.stop = vec![stop.clone()];
    let (job, events, _) = Job::new(with_stop);
    engine.submit(job).unwrap();
    let events = drain(events);
    let streamed = text_of(&events);
    assert_eq!(streamed, expected, "stop {stop:?}");
    assert!(matches!(
        events.last(),
        Some(TokenEvent::Finished {
            reason: FinishReason::StopString,
            ..
        })
    ));
}

#[test]
fn shutdown_joins_the_thread_and_reports_a_clean_stop() {
    let spec = LoadSpec {
        source: ModelSource::BuiltinDemo,
        device: Device::Cpu,
        dtype: DTypeChoice::Auto,
        max_seq_len: None,
    };
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    let (engine, ready) = spawn_engine("test", spec, EngineConfig::default(), move |exit| {
        exit_tx.send(exit).unwrap()
    })
    .unwrap();
    ready.blocking_recv().unwrap().unwrap();
    engine.shutdown();
    assert!(matches!(
        exit_rx.recv().unwrap(),
        llorch::actors::engine::EngineExit::Stopped
    ));
}
