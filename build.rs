//! With the `cuda` feature, compiles the fused decoder kernels
//! (`src/models/candle_llama/kernels.cu`) to PTX with `nvcc` (`$NVCC`, else `nvcc` on the
//! path) for compute capability `$CUDA_COMPUTE_CAP` (default 90), as candle's own kernels are
//! built. Without it, does nothing.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "src/models/candle_llama/kernels.cu";
/// The files `SOURCE` includes.
const INCLUDED: [&str; 2] = [
    "src/models/candle_llama/gemv.cu",
    "src/models/candle_llama/sample.cu",
];

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    for included in INCLUDED {
        println!("cargo:rerun-if-changed={included}");
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out.join("llorch_kernels.ptx");
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
            "-o",
        ])
        .arg(&ptx)
        .arg(SOURCE)
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} for {SOURCE}: {e}"));
    assert!(status.success(), "{nvcc} failed on {SOURCE}");
}
