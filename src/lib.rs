//! llorch serves many large language models on many devices from one process.
//!
//! # Layout
//!
//! - [`config`]: `pool.toml` wire types and validation into a [`config::PoolConfig`].
//! - [`models`]: synchronous model code: sources, architectures, tokenizers, generation.
//! - [`actors`]: everything concurrent: supervisor, router, model actors, engine threads.
//! - [`api`]: the HTTP API (OpenAI-compatible routes, `/execute`, health).
//!
//! ```text
//! client ─► api ─► Router ─cast─► ModelActor ─job─► engine thread (owns the model)
//!    ▲                                                   │
//!    └──────── SSE / JSON ◄── per-request TokenEvent channel
//!                 PoolSupervisor spawns and watches the Router and every ModelActor
//! ```

#![deny(unsafe_code)]
#![warn(missing_docs)]

#[deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
pub mod actors;
#[deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
pub mod api;
#[deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
pub mod config;
pub mod metrics;
pub mod models;
