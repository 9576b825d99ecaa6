//! Everything concurrent: the pool supervisor, the router, the model actors and their engine
//! threads. Messages carry no candle types; nobody awaits a generation inside a handler.

pub mod admin;
pub mod cluster;
pub mod engine;
pub mod exposition;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod lifecycle;
pub mod listing;
pub mod model_actor;
pub mod pool;
pub mod restart;
pub mod router;
pub mod supervisor;
