//! Launches of the fused decoder kernels (`kernels.cu`, compiled to PTX by build.rs) on candle
//! CUDA tensors. Each function checks its tensors' dtypes, shapes and contiguity, takes their
//! device pointers and enqueues one kernel on the device's stream, as candle's own ops do.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};
use std::sync::Arc;

use crate::models::batch::Choice;
use crate::models::{Adjustment, MAX_DEVICE_TOP_K};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/llorch_kernels.ptx"));

/// The widest head the kernels take (eight values per lane of a warp).
pub const MAX_HEAD_DIM: usize = 256;

/// The most input rows [`Kernels::gemv`] takes (`gemv1` and `gemv2` in gemv.cu).
pub const GEMV_ROWS: usize = 2;

/// Output columns and threads of a `gemv` block (`GEMV_COLUMNS`, `GEMV_THREADS` in gemv.cu).
const GEMV_BLOCK: (usize, u32) = (4, 128);

/// The environment variable that turns the matrix-vector kernels off (`off`), so that decode
/// steps project with cuBLAS, for comparison.
pub const GEMV_VAR: &str = "LLORCH_CUDA_GEMV";

/// Values of a row each thread of `add_rms_norm` holds (`NORM_PER_THREAD` in kernels.cu).
const NORM_PER_THREAD: usize = 16;

/// Warps of a `paged_attention` block (`WARPS` in kernels.cu), each over every sixteenth
/// position.
const ATTENTION_WARPS: u32 = 16;

/// The kernels of one storage dtype, loaded once per model.
pub struct Kernels {
    dtype: DType,
    device: Device,
    stream: Arc<CudaStream>,
    add_rms_norm: CudaFunction,
    rope_kv_write: CudaFunction,
    paged_attention: CudaFunction,
    silu_mul: CudaFunction,
    /// `gemv1` and `gemv2` (for one and two rows), unless `LLORCH_CUDA_GEMV=off`.
    gemv: Option<[CudaFunction; GEMV_ROWS]>,
    sample: CudaFunction,
}

impl Kernels {
    /// Loads the kernels for tensors of `dtype` (f32, f16 or bf16) on `device`.
    pub fn new(device: &CudaDevice, dtype: DType) -> Result<Kernels> {
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => bail!("no fused CUDA kernels for {other:?}"),
        };
        let load = |name: &str| -> Result<CudaFunction> {
            Ok(device
                .get_or_load_custom_func(&format!("{name}_{suffix}"), "llorch_kernels", PTX)?
                .into_cuda_function())
        };
        Ok(Kernels {
            dtype,
            device: Device::Cuda(device.clone()),
            stream: device.cuda_stream(),
            add_rms_norm: load("add_rms_norm")?,
            rope_kv_write: load("rope_kv_write")?,
            paged_attention: load("paged_attention")?,
            silu_mul: load("silu_mul")?,
            gemv: match std::env::var(GEMV_VAR).is_ok_and(|v| v == "off") {
                true => None,
                false => Some([load("gemv1")?, load("gemv2")?]),
            },
            sample: device
                .get_or_load_custom_func("sample_f32", "llorch_kernels", PTX)?
                .into_cuda_function(),
        })
    }

    /// An uninitialised tensor of the kernels' dtype, for a kernel to fill.
    #[allow(unsafe_code)]
    fn output(&self, shape: impl Into<candle_core::Shape>) -> Result<Tensor> {
        // SAFETY: every caller launches a kernel that writes every element before it is read.
        unsafe { Tensor::empty(shape, self.dtype, &self.device) }
    }

    /// An uninitialised u32 vector of `len` indices, for a kernel to fill.
    #[allow(unsafe_code)]
    fn indices(&self, len: usize) -> Result<Tensor> {
        // SAFETY: every caller launches a kernel that writes every element before it is read.
        unsafe { Tensor::empty(len, DType::U32, &self.device) }
    }

    /// The device address of a contiguous tensor's first element (`dtype`: what the kernel
    /// reads, checked).
    fn ptr(&self, t: &Tensor, dtype: DType) -> Result<u64> {
        if t.dtype() != dtype {
            bail!("fused kernel: expected {dtype:?}, got {:?}", t.dtype())
        }
        let (storage, layout) = t.storage_and_layout();
        if !layout.is_contiguous() {
            bail!(
                "fused kernel: a tensor of shape {:?} is not contiguous",
                t.shape()
            )
        }
        let Storage::Cuda(cuda) = &*storage else {
            bail!("fused kernel: a tensor is not on a CUDA device")
        };
        let base = base_ptr(cuda, dtype, &self.stream)?;
        Ok(base + (layout.start_offset() * dtype.size_in_bytes()) as u64)
    }

    fn data(&self, t: &Tensor) -> Result<u64> {
        self.ptr(t, self.dtype)
    }

    fn index(&self, t: &Tensor) -> Result<u64> {
        self.ptr(t, DType::U32)
    }

    /// Enqueues `kernel` with arguments `pointers`, then `ints`, then `last` when given, in that
    /// order.
    fn launch(
        &self,
        kernel: &CudaFunction,
        config: LaunchConfig,
        pointers: &[u64],
        ints: &[i32],
        last: Option<f32>,
    ) -> Result<()> {
        let mut launch = self.stream.launch_builder(kernel);
        for pointer in pointers {
            launch.arg(pointer);
        }
        for int in ints {
            launch.arg(int);
        }
        if let Some(last) = &last {
            launch.arg(last);
        }
        enqueue(launch, config)
    }

    /// `x += delta × multiplier` in place (when `delta` is given) and returns
    /// `rmsnorm(x) × weight`; `x` and `delta` are `[rows, hidden]`.
    pub fn add_rms_norm(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        weight: &Tensor,
        eps: f32,
        multiplier: f32,
    ) -> Result<Tensor> {
        let (rows, hidden) = x.dims2()?;
        if let Some(delta) = delta {
            if delta.dims2()? != (rows, hidden) {
                bail!(
                    "add_rms_norm: delta {:?} for x {:?}",
                    delta.shape(),
                    x.shape()
                )
            }
        }
        if hidden > NORM_PER_THREAD * 1024 {
            bail!("add_rms_norm: rows of {hidden} values are over the kernel's 16 384")
        }
        let out = self.output((rows, hidden))?;
        let (x_ptr, weight_ptr, out_ptr) = (self.data(x)?, self.data(weight)?, self.data(&out)?);
        let delta_ptr = delta.map(|d| self.data(d)).transpose()?.unwrap_or(0);
        // About eight values a thread, whole warps, at most 1024 threads.
        let threads = hidden.div_ceil(8).next_multiple_of(32).clamp(32, 1024) as u32;
        let hidden = hidden as i32;
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.add_rms_norm);
        launch
            .arg(&x_ptr)
            .arg(&delta_ptr)
            .arg(&weight_ptr)
            .arg(&out_ptr)
            .arg(&hidden)
            .arg(&eps)
            .arg(&multiplier);
        enqueue(launch, config)?;
        Ok(out)
    }

    /// Splits the fused projection `qkv` (`[tokens, (heads + 2 kv heads) × dim]`) into heads,
    /// applies the optional q/k RMSNorm and the rotary embedding at `positions` (rows of the
    /// `cos`/`sin` tables), writes k and v into the caches (`[kv heads, slots, dim]`) at
    /// `slots`, and returns the rotated queries, `[tokens, heads × dim]`.
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
        let (tokens, width) = qkv.dims2()?;
        let (cache_heads, total_slots, cache_dim) = k_cache.dims3()?;
        if width != (heads + 2 * kv_heads) * dim
            || (cache_heads, cache_dim) != (kv_heads, dim)
            || v_cache.dims3()? != (kv_heads, total_slots, dim)
            || positions.dims1()? != tokens
            || slots.dims1()? != tokens
            || cos.dim(1)? * 2 != dim
            || dim % 2 != 0
            || dim > MAX_HEAD_DIM
        {
            bail!("rope_kv_write: inconsistent shapes")
        }
        let q = self.output((tokens, heads * dim))?;
        let norm = |t: Option<&Tensor>| t.map(|t| self.data(t)).transpose().map(|p| p.unwrap_or(0));
        let ptrs = [
            self.data(qkv)?,
            self.index(positions)?,
            self.index(slots)?,
            self.data(cos)?,
            self.data(sin)?,
            norm(q_norm)?,
            norm(k_norm)?,
            self.data(&q)?,
            self.data(k_cache)?,
            self.data(v_cache)?,
        ];
        let ints = [heads, kv_heads, dim, total_slots].map(|v| v as i32);
        let config = LaunchConfig {
            grid_dim: (tokens as u32, (heads + kv_heads) as u32, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(&self.rope_kv_write, config, &ptrs, &ints, Some(eps))?;
        Ok(q)
    }

    /// Attention of one query per sequence (row `rows[s]` of `q`, `[rows, heads × dim]`; row
    /// `s` without `rows`) over that sequence's `lens[s]` cached positions, found through its
    /// row of `tables` (`[sequences, width]` block ids of `block_size` slots), within `window`
    /// positions when given. Returns `[sequences, heads × dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        q: &Tensor,
        rows: Option<&Tensor>,
        (heads, kv_heads, dim): (usize, usize, usize),
        (k_cache, v_cache): (&Tensor, &Tensor),
        (tables, lens): (&Tensor, &Tensor),
        block_size: usize,
        window: Option<usize>,
        scale: f32,
    ) -> Result<Tensor> {
        let (sequences, table_width) = tables.dims2()?;
        let (_, total_slots, _) = k_cache.dims3()?;
        if q.dim(1)? != heads * dim
            || k_cache.dims3()? != (kv_heads, total_slots, dim)
            || v_cache.dims3()? != (kv_heads, total_slots, dim)
            || lens.dims1()? != sequences
            || rows.map_or(Ok(sequences), |r| r.dims1())? != sequences
            || heads % kv_heads != 0
            || dim > MAX_HEAD_DIM
        {
            bail!("paged_attention: inconsistent shapes")
        }
        let out = self.output((sequences, heads * dim))?;
        let ptrs = [
            self.data(q)?,
            rows.map(|r| self.index(r)).transpose()?.unwrap_or(0),
            self.data(k_cache)?,
            self.data(v_cache)?,
            self.index(tables)?,
            self.index(lens)?,
            self.data(&out)?,
        ];
        let ints = [
            heads,
            kv_heads,
            dim,
            total_slots,
            block_size,
            table_width,
            window.unwrap_or(0),
        ]
        .map(|v| v as i32);
        let config = LaunchConfig {
            grid_dim: (sequences as u32, heads as u32, 1),
            block_dim: (32 * ATTENTION_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(&self.paged_attention, config, &ptrs, &ints, Some(scale))?;
        Ok(out)
    }

    /// `silu(gate) × up` of `gate_up` (`[rows, 2 × ffn]`, gate first): `[rows, ffn]`.
    pub fn silu_mul(&self, gate_up: &Tensor, ffn: usize) -> Result<Tensor> {
        let (rows, width) = gate_up.dims2()?;
        if width != 2 * ffn {
            bail!("silu_mul: {width} columns for ffn {ffn}")
        }
        let out = self.output((rows, ffn))?;
        let (input, output) = (self.data(gate_up)?, self.data(&out)?);
        let (rows_arg, ffn_arg) = (rows as i32, ffn as i32);
        let blocks = (rows * ffn).div_ceil(256).clamp(1, 1 << 16) as u32;
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.silu_mul);
        launch.arg(&input).arg(&output).arg(&rows_arg).arg(&ffn_arg);
        enqueue(launch, config)?;
        Ok(out)
    }

    /// `x · wᵀ (+ bias)` for `x` of one or two rows (`[rows, k]`, `w`: `[n, k]`, `bias`:
    /// `[n]`, all of the kernels' dtype and contiguous), reading `w` once at full width;
    /// `None` where the rows, shapes, dtypes or alignment do not suit or the kernels are off
    /// (`LLORCH_CUDA_GEMV=off`): the caller's matmul then runs.
    pub fn gemv(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
        let ((rows, k), (n, k_w)) = (x.dims2()?, w.dims2()?);
        let Some(function) = self
            .gemv
            .as_ref()
            .and_then(|gemv| gemv.get(rows.checked_sub(1)?))
        else {
            return Ok(None);
        };
        let element = self.dtype.size_in_bytes();
        let suits = |t: &Tensor| t.dtype() == self.dtype && t.is_contiguous();
        if k != k_w
            || !(k * element).is_multiple_of(16)
            || !suits(x)
            || !suits(w)
            || !bias.is_none_or(|b| suits(b) && b.dims1().is_ok_and(|len| len == n))
        {
            return Ok(None);
        }
        let (x_ptr, w_ptr) = (self.data(x)?, self.data(w)?);
        if !x_ptr.is_multiple_of(16) || !w_ptr.is_multiple_of(16) {
            return Ok(None);
        }
        let out = self.output((rows, n))?;
        let ptrs = [
            x_ptr,
            w_ptr,
            bias.map(|b| self.data(b)).transpose()?.unwrap_or(0),
            self.data(&out)?,
        ];
        let ints = [rows, k, n].map(|v| v as i32);
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(GEMV_BLOCK.0) as u32, 1, 1),
            block_dim: (GEMV_BLOCK.1, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(function, config, &ptrs, &ints, None)?;
        Ok(Some(out))
    }

    /// Each row's token of `logits` (`[rows, vocab]`, f32; the rows drawn from are adjusted
    /// in place) as `choices` ask, with whether the draw used its fraction: the argmax of the
    /// raw logits for [`Choice::Greedy`], the host sampler's choice for [`Choice::Draw`]
    /// (`sample.cu` follows its arithmetic), nothing for [`Choice::Logits`] (`(0, false)`).
    pub fn choose(&self, logits: &Tensor, choices: &[&Choice]) -> Result<Vec<(u32, bool)>> {
        let (rows, vocab) = logits.dims2()?;
        if choices.len() != rows || vocab > MAX_DRAW_VOCAB {
            bail!(
                "choose: {} choices for {rows} rows of {vocab} logits",
                choices.len()
            )
        }
        // The kernel keeps a top-k in fixed shared arrays (a greedy draw ignores its top-k).
        for choice in choices {
            if let Choice::Draw(d) = choice {
                if !d.greedy && d.top_k as usize > MAX_DEVICE_TOP_K {
                    bail!("choose: a top-k of {} is over {MAX_DEVICE_TOP_K}", d.top_k)
                }
            }
        }
        let (spec, fractions) = draw_spec(choices);
        let count = spec.len();
        let spec = Tensor::from_vec(spec, count, &self.device)?;
        let fractions = Tensor::from_vec(fractions, rows, &self.device)?;
        // Scratch weights for the rows that draw (a step of greedy rows reads none).
        let draws = choices
            .iter()
            .any(|c| matches!(c, Choice::Draw(draw) if !draw.greedy));
        let scratch = if draws { rows * vocab } else { 1 };
        // SAFETY: the kernel writes every weight of a row it draws from before reading it.
        #[allow(unsafe_code)]
        let weights = unsafe { Tensor::empty(scratch, DType::F32, &self.device) }?;
        let out = self.indices(2 * rows)?;
        let ptrs = [
            self.ptr(logits, DType::F32)?,
            self.ptr(&weights, DType::F32)?,
            self.index(&spec)?,
            self.ptr(&fractions, DType::F64)?,
            self.index(&out)?,
        ];
        let vocab = vocab as i32;
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.sample);
        for ptr in &ptrs {
            launch.arg(ptr);
        }
        launch.arg(&vocab);
        enqueue(launch, config)?;
        let out = out.to_vec1::<u32>()?;
        Ok(out.chunks(2).map(|pair| (pair[0], pair[1] != 0)).collect())
    }
}

/// The most tokens a vocabulary may have for draws on the device (the sampling kernel keeps
/// every block's sums in shared memory).
pub const MAX_DRAW_VOCAB: usize = 262_144;

/// Words of a row's head in the sampling kernel's spec (`SPEC_HEAD` in sample.cu).
const SPEC_HEAD: usize = 7;

/// The sampling kernel's inputs for `choices`: seven words per row (mode: 0 argmax, 1 draw
/// over the whole vocabulary, 2 none, 3 draw from the top k; where its adjustments start; how
/// many; 1/temperature and min-p as f32 bits; top-k; top-p as f32 bits), then the
/// adjustments, three words each (kind, token, value bits); and each row's fraction.
fn draw_spec(choices: &[&Choice]) -> (Vec<u32>, Vec<f64>) {
    let rows = choices.len();
    let mut heads = Vec::with_capacity(SPEC_HEAD * rows);
    let mut adjustments = Vec::new();
    let mut fractions = vec![0f64; rows];
    for (row, choice) in choices.iter().enumerate() {
        let start = (SPEC_HEAD * rows + adjustments.len()) as u32;
        let (mode, draw) = match choice {
            Choice::Logits => (2, None),
            Choice::Greedy => (0, None),
            Choice::Draw(draw) if draw.greedy => (0, Some(draw)),
            Choice::Draw(draw) if draw.top_k > 0 => (3, Some(draw)),
            Choice::Draw(draw) => (1, Some(draw)),
        };
        let mut count = 0;
        if let Some(draw) = draw {
            fractions[row] = draw.fraction;
            for adjustment in &draw.adjustments {
                let (kind, token, value) = match *adjustment {
                    Adjustment::Add(token, value) => (0, token, value),
                    Adjustment::Repeat(token, value) => (1, token, value),
                    Adjustment::Subtract(token, value) => (2, token, value),
                };
                adjustments.extend([kind, token, value.to_bits()]);
                count += 1;
            }
        }
        heads.extend([
            mode,
            start,
            count,
            draw.map_or(0, |d| d.inverse_temperature.to_bits()),
            draw.map_or(0, |d| d.min_p.to_bits()),
            draw.map_or(0, |d| d.top_k),
            draw.map_or(0, |d| d.top_p.to_bits()),
        ]);
    }
    heads.extend(adjustments);
    (heads, fractions)
}

/// Enqueues the kernel whose arguments `launch` holds.
#[allow(unsafe_code)]
fn enqueue(mut launch: LaunchArgs<'_>, config: LaunchConfig) -> Result<()> {
    // SAFETY: every caller pushes exactly the arguments of its kernel's signature, in order;
    // the pointers address tensors of the shapes it checked (indices within them: the step's
    // check), and those tensors outlive the kernel on the stream (frees are stream-ordered).
    unsafe { launch.launch(config) }
        .map(|_| ())
        .map_err(candle_core::Error::wrap)
}

/// The device address of a storage's first element.
fn base_ptr(storage: &CudaStorage, dtype: DType, stream: &CudaStream) -> Result<u64> {
    Ok(match dtype {
        DType::F32 => storage.as_cuda_slice::<f32>()?.device_ptr(stream).0,
        DType::F16 => storage.as_cuda_slice::<f16>()?.device_ptr(stream).0,
        DType::BF16 => storage.as_cuda_slice::<bf16>()?.device_ptr(stream).0,
        DType::U32 => storage.as_cuda_slice::<u32>()?.device_ptr(stream).0,
        DType::F64 => storage.as_cuda_slice::<f64>()?.device_ptr(stream).0,
        other => bail!("fused kernel: no pointer for {other:?}"),
    })
}
