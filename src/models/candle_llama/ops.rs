//! The decoder's fused steps: on a CUDA device each is one kernel of `kernels.cu` (unless
//! `LLORCH_CUDA_KERNELS=candle`), elsewhere the run of candle tensor ops it replaces. Both
//! give the same values up to rounding (the kernels round once per stored value, candle's ops
//! after each op); the CUDA build's tests compare them on the device.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Linear;

use crate::models::batch::Choice;

/// The environment variable that turns the fused CUDA kernels off (`candle`) for comparison.
pub const KERNELS_VAR: &str = "LLORCH_CUDA_KERNELS";

/// How a model runs its fused steps.
pub enum Ops {
    /// Candle's tensor ops, on any device.
    Candle,
    /// The fused kernels on a CUDA device.
    #[cfg(feature = "cuda")]
    Cuda(Box<super::cuda::Kernels>),
}

impl Ops {
    /// The fused kernels for a CUDA `device` (tensors of `dtype`, heads of `head_dim` values)
    /// unless `LLORCH_CUDA_KERNELS=candle`, the dtype is another or the heads are too wide;
    /// candle's ops elsewhere.
    pub fn for_device(device: &Device, dtype: DType, head_dim: usize) -> Result<Ops> {
        let wanted = std::env::var(KERNELS_VAR).map_or(true, |v| v != "candle")
            && matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) if wanted && head_dim <= super::cuda::MAX_HEAD_DIM => {
                Ok(Ops::Cuda(Box::new(super::cuda::Kernels::new(cuda, dtype)?)))
            }
            _ => {
                let _ = (wanted, dtype, head_dim);
                Ok(Ops::Candle)
            }
        }
    }

    /// Whether decodes attend through the paged kernel (their block tables uploaded) rather
    /// than through gathered keys and a mask.
    pub fn paged(&self) -> bool {
        !matches!(self, Ops::Candle)
    }

    /// `x + delta × multiplier` (or `x` without `delta`) and its RMSNorm times `weight`. The
    /// kernel updates `x` in place, so `x` must be a tensor no one else holds.
    pub fn add_rms_norm(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        weight: &Tensor,
        eps: f32,
        multiplier: f64,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Ops::Candle => {
                let x = match delta {
                    Some(delta) => (x + scaled(delta.clone(), multiplier)?)?,
                    None => x.clone(),
                };
                let normed = candle_nn::ops::rms_norm(&x, weight, eps)?;
                Ok((x, normed))
            }
            #[cfg(feature = "cuda")]
            Ops::Cuda(kernels) => {
                let normed = kernels.add_rms_norm(x, delta, weight, eps, multiplier as f32)?;
                Ok((x.clone(), normed))
            }
        }
    }

    /// Splits `qkv` (`[tokens, (heads + 2 kv heads) × dim]`) into heads, applies the
    /// optional q/k norms and the rotary embedding, stores keys and values in the caches
    /// (`[kv heads, slots, dim]`) at `slots`, and returns the queries, `[tokens, heads × dim]`.
    /// `cos` and `sin` are the whole rotary tables (`[positions, dim / 2]`), read at `positions`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_write(
        &self,
        qkv: &Tensor,
        (heads, kv_heads, dim): (usize, usize, usize),
        (positions, slots): (&Tensor, &Tensor),
        (cos, sin): (&Tensor, &Tensor),
        (q_norm, k_norm): (Option<&Tensor>, Option<&Tensor>),
        (k_cache, v_cache): (&Tensor, &Tensor),
        eps: f32,
    ) -> Result<Tensor> {
        match self {
            Ops::Candle => {
                let n = qkv.dim(0)?;
                let (cos, sin) = (
                    cos.index_select(positions, 0)?,
                    sin.index_select(positions, 0)?,
                );
                let rope = |t: Tensor, count: usize, norm: Option<&Tensor>| {
                    let t = t.reshape((1, n, count, dim))?;
                    let t = match norm {
                        Some(weight) => candle_nn::ops::rms_norm(&t, weight, eps)?,
                        None => t,
                    };
                    candle_nn::rotary_emb::rope_thd(&t.contiguous()?, &cos, &sin)
                };
                let q = rope(qkv.narrow(1, 0, heads * dim)?, heads, q_norm)?;
                let k = rope(
                    qkv.narrow(1, heads * dim, kv_heads * dim)?,
                    kv_heads,
                    k_norm,
                )?;
                let v = qkv.narrow(1, (heads + kv_heads) * dim, kv_heads * dim)?;
                let by_head =
                    |t: &Tensor| t.reshape((n, kv_heads, dim))?.transpose(0, 1)?.contiguous();
                let index = slots
                    .reshape((1, n, 1))?
                    .broadcast_as((kv_heads, n, dim))?
                    .contiguous()?;
                k_cache.scatter_set(&index, &by_head(&k)?, 1)?;
                v_cache.scatter_set(&index, &by_head(&v)?, 1)?;
                q.reshape((n, heads * dim))
            }
            #[cfg(feature = "cuda")]
            Ops::Cuda(kernels) => kernels.rope_kv_write(
                qkv,
                (heads, kv_heads, dim),
                (positions, slots),
                (cos, sin),
                (q_norm, k_norm),
                (k_cache, v_cache),
                eps,
            ),
        }
    }

    /// Attention of one query per sequence (row `rows[s]` of `q`, `[rows, heads × dim]`; row
    /// `s` without `rows`) over its `lens[s]` positions in the caches, found through its row of
    /// `tables` (block ids of `block_size` slots), within `window` positions when given.
    /// Only the fused kernels read the cache in place; candle's ops gather it (`attention`).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        q: &Tensor,
        rows: Option<&Tensor>,
        (heads, kv_heads, dim): (usize, usize, usize),
        caches: (&Tensor, &Tensor),
        tables: (&Tensor, &Tensor),
        block_size: usize,
        window: Option<usize>,
        scale: f32,
    ) -> Result<Tensor> {
        match self {
            Ops::Candle => {
                let _ = (
                    q, rows, heads, kv_heads, dim, caches, tables, block_size, window, scale,
                );
                candle_core::bail!("paged attention runs only in the fused CUDA kernels")
            }
            #[cfg(feature = "cuda")]
            Ops::Cuda(kernels) => kernels.paged_attention(
                q,
                rows,
                (heads, kv_heads, dim),
                caches,
                tables,
                block_size,
                window,
                scale,
            ),
        }
    }

    /// `silu(gate) × up` of `gate_up` (`[rows, 2 × ffn]`, gate first).
    pub fn silu_mul(&self, gate_up: &Tensor, ffn: usize) -> Result<Tensor> {
        match self {
            Ops::Candle => {
                let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, ffn)?)?;
                gate * gate_up.narrow(1, ffn, ffn)?
            }
            #[cfg(feature = "cuda")]
            Ops::Cuda(kernels) => kernels.silu_mul(gate_up, ffn),
        }
    }
}

impl Ops {
    /// `x · wᵀ (+ bias)` of a projection: on CUDA a step of one or two rows runs the fused
    /// kernels' matrix-vector product, which reads the weights once at full width; otherwise
    /// candle's matmul (cuBLAS).
    pub fn linear(&self, x: &Tensor, linear: &Linear) -> Result<Tensor> {
        match self {
            Ops::Candle => linear.forward(x),
            #[cfg(feature = "cuda")]
            Ops::Cuda(kernels) => match kernels.gemv(x, linear.weight(), linear.bias())? {
                Some(out) => Ok(out),
                None => linear.forward(x),
            },
        }
    }

    /// `x · wᵀ` (the output head), as [`Ops::linear`] without a bias.
    pub fn project(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        match self {
            Ops::Candle => x.matmul(&w.t()?),
            #[cfg(feature = "cuda")]
            Ops::Cuda(kernels) => match kernels.gemv(x, w, None)? {
                Some(out) => Ok(out),
                None => x.matmul(&w.t()?),
            },
        }
    }

    /// Whether [`Ops::choose`] chooses on the device for a vocabulary of `vocab` tokens.
    pub fn draws(&self, vocab: usize) -> bool {
        match self {
            Ops::Candle => {
                let _ = vocab;
                false
            }
            #[cfg(feature = "cuda")]
            Ops::Cuda(_) => vocab <= super::cuda::MAX_DRAW_VOCAB,
        }
    }

    /// Each row's token of `logits` (`[rows, vocab]`, f32) as `choices` ask, chosen on the
    /// device by the fused kernels (the argmax as [`crate::models::argmax`] takes it, a draw
    /// as the host's sampler makes it), with whether a draw used its fraction; `None` with
    /// candle's ops: the host chooses.
    pub fn choose(&self, logits: &Tensor, choices: &[&Choice]) -> Result<Option<Vec<(u32, bool)>>> {
        match self {
            Ops::Candle => {
                let _ = (logits, choices);
                Ok(None)
            }
            #[cfg(feature = "cuda")]
            Ops::Cuda(kernels) => kernels.choose(logits, choices).map(Some),
        }
    }
}

/// `t × multiplier`, skipping the product when it is 1.
pub fn scaled(t: Tensor, multiplier: f64) -> Result<Tensor> {
    match multiplier == 1.0 {
        true => Ok(t),
        false => t * multiplier,
    }
}
