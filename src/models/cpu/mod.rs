//! llorch's own CPU forward pass for Llama-family models and the SIMD kernels under it. candle's
//! quantized Llama allocates a tensor per operation and runs every matrix product through its
//! generic path; this one keeps weights in their GGUF types, multiplies them with kernels
//! written for these block layouts, and reuses its buffers.

pub mod activations;
pub mod attention;
pub(crate) mod buffer;
pub(crate) mod exp;
pub mod f16_panels;
#[cfg(target_arch = "x86_64")]
mod half_avx512;
mod hot;
mod huge_pages;
pub mod interleaved;
pub mod interleaved_q4k;
pub mod interleaved_q6k;
#[cfg(target_arch = "x86_64")]
mod interleaved_vnni;
pub mod kernels;
pub mod kquants;
pub mod kv_pool;
pub mod level;
mod llama;
pub mod llama_gguf;
pub mod llama_hf;
pub mod ops;
mod token_major;
pub mod weight;

pub use huge_pages::Plain;
pub use llama::{CpuLlama, Hyper, Layer, Linear, Weights};
