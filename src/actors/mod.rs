//! Everything concurrent. Today: the engine thread that owns a model and runs its generations.

pub mod engine;
