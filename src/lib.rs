//! llorch serves many large language models on many devices from one process.
//!
//! # Layout
//!
//! - [`models`]: synchronous model code: sources, architectures, tokenizers, generation.
//! - [`actors`]: everything concurrent; today the engine thread that owns a model.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod actors;
pub mod models;
