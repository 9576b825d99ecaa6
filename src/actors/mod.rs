//! Everything concurrent: the pool supervisor, the router, the model actors and their engine
//! threads. Messages carry no candle types; nobody awaits a generation inside a handler.

pub mod engine;
pub mod model_actor;
pub mod pool;
pub mod router;
pub mod supervisor;
