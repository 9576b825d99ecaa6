//! CUDA graphs of decode steps. A step in which every sequence adds one token runs as the
//! replay of a graph captured once per batch size (1, 2, 4, … 64, the step padded up to the
//! next): the host writes the step's indices into the graph's input buffer and launches one
//! graph instead of a few hundred kernels. Prefill, mixed steps and larger batches run
//! eagerly. A graph is recorded against one KV pool: when the pool changes (a new layout,
//! another model), every graph is dropped and recaptured on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaSlice, CudaStream, DevicePtr};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Result, Tensor};

use super::attention::{decode_inputs, KvPool, StepIndex};
use super::CandleLlama;
use crate::models::batch::SeqChunk;

/// The environment variable that turns the graphs off (`off`) for comparison.
pub const GRAPHS_VAR: &str = "LLORCH_CUDA_GRAPHS";

/// Bytes of the cuBLAS workspace each device's handle gets before its first capture.
const CUBLAS_WORKSPACE: usize = 32 << 20;

/// The workspaces given to cuBLAS handles, by handle: kept for the life of the process, since
/// the handle is shared by every model on its device.
static WORKSPACES: Mutex<Vec<(usize, CudaSlice<u8>)>> = Mutex::new(Vec::new());

/// The batch sizes that get a graph.
const BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// One captured decode step.
struct Captured {
    graph: CudaGraph,
    /// What the graph reads: the step's indices, `decode_inputs`' layout.
    inputs: Tensor,
    /// What the graph writes: f32 logits, one row per padded sequence.
    logits: Tensor,
}

/// The decode graphs of one model.
pub struct DecodeGraphs {
    device: CudaDevice,
    stream: Arc<CudaStream>,
    /// Block-table width of every graph: blocks of the longest context.
    width: usize,
    /// The pool the graphs were captured against.
    pool: Option<u64>,
    captured: HashMap<usize, Captured>,
    /// Steps run as replays so far.
    replays: usize,
    /// Whether capturing has failed (the reason was logged): every step then runs eagerly.
    failed: bool,
}

impl DecodeGraphs {
    /// Graphs for a model on `device` whose contexts reach `max_positions` positions, unless
    /// `LLORCH_CUDA_GRAPHS=off` or the device is not a CUDA device.
    pub fn for_device(device: &Device, max_positions: usize) -> Option<DecodeGraphs> {
        let wanted = std::env::var(GRAPHS_VAR).map_or(true, |v| v != "off");
        match device {
            Device::Cuda(cuda) if wanted => Some(DecodeGraphs {
                device: cuda.clone(),
                stream: cuda.cuda_stream(),
                width: max_positions,
                pool: None,
                captured: HashMap::new(),
                replays: 0,
                failed: false,
            }),
            _ => None,
        }
    }

    /// How many steps ran as replays of a graph.
    pub fn replays(&self) -> usize {
        self.replays
    }

    /// The smallest bucket that holds `seqs` when the step is a decode step a graph can run.
    fn bucket(&self, seqs: &[SeqChunk<'_>], block_size: usize) -> Option<usize> {
        let decodes = seqs
            .iter()
            .all(|s| s.tokens.len() == 1 && s.logit_rows() == 1);
        let fits = seqs
            .iter()
            .all(|s| s.end().div_ceil(block_size) <= self.width.div_ceil(block_size));
        match decodes && fits {
            true => BUCKETS.into_iter().find(|&b| b >= seqs.len()),
            false => None,
        }
    }

    /// Runs `seqs` through a graph of `model` when the step is one a graph can run (capturing
    /// it first if need be) and returns their logits, `[sequences, vocab]` in f32 on the device
    /// (valid until the next replay); `None`: run it eagerly.
    pub fn run(
        &mut self,
        model: &CandleLlama,
        seqs: &[SeqChunk<'_>],
        pool: &KvPool,
    ) -> Result<Option<Tensor>> {
        let size = pool.layout().block_size;
        let Some(batch) = self.bucket(seqs, size).filter(|_| !self.failed) else {
            return Ok(None);
        };
        if self.pool != Some(pool.id()) {
            self.captured.clear();
            self.pool = Some(pool.id());
        }
        let width = self.width.div_ceil(size);
        if !self.captured.contains_key(&batch) {
            match self.capture(model, pool, batch, width) {
                Ok(captured) => {
                    self.captured.insert(batch, captured);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "capturing a decode step failed; decode steps run eagerly");
                    self.failed = true;
                    return Ok(None);
                }
            }
        }
        let step = &self.captured[&batch];
        let host = decode_inputs(seqs, batch, width, size, pool.scratch_block());
        let count = host.len();
        step.inputs
            .slice_set(&Tensor::from_vec(host, count, &model.device)?, 0, 0)?;
        step.graph.launch().map_err(candle_core::Error::wrap)?;
        self.replays += 1;
        step.logits.narrow(0, 0, seqs.len()).map(Some)
    }

    /// Captures the decode step of `batch` sequences: one eager run of padding rows first
    /// (it loads the kernels and uploads candle's kernel parameters outside the capture), then
    /// the recorded run, whose intermediate tensors are all freed inside the graph.
    fn capture(
        &self,
        model: &CandleLlama,
        pool: &KvPool,
        batch: usize,
        width: usize,
    ) -> Result<Captured> {
        cublas_workspace(&self.device, &self.stream)?;
        let size = pool.layout().block_size;
        let host = decode_inputs(&[], batch, width, size, pool.scratch_block());
        let count = host.len();
        let inputs = Tensor::from_vec(host, count, &model.device)?;
        let index = StepIndex::decode(&inputs, batch, width, size, model.hyper.window)?;
        // From here candle keeps the small host buffers its kernels upload (shapes and
        // strides) on the device, keyed by content: the eager run fills that cache and the
        // recorded run reads it, so that no host-to-device copy is recorded (one from pageable
        // memory cannot be captured). The inputs above were uploaded before, uncached.
        let _cached_uploads = self.device.enable_cuda_graph_htod_cache();
        let logits = all_logits(model, &index, pool)?;
        self.stream
            .synchronize()
            .map_err(candle_core::Error::wrap)?;
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(candle_core::Error::wrap)?;
        let recorded = all_logits(model, &index, pool).and_then(|out| logits.slice_set(&out, 0, 0));
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(candle_core::Error::wrap);
        recorded?;
        self.stream
            .context()
            .check_err()
            .map_err(candle_core::Error::wrap)?;
        let graph = graph?.ok_or_else(|| candle_core::Error::Msg("empty capture".into()))?;
        graph.upload().map_err(candle_core::Error::wrap)?;
        Ok(Captured {
            graph,
            inputs,
            logits,
        })
    }
}

/// The step's logits, every row's, in f32.
fn all_logits(model: &CandleLlama, index: &StepIndex, pool: &KvPool) -> Result<Tensor> {
    match model.logits(index, pool)? {
        Some(logits) => logits.to_dtype(DType::F32),
        None => candle_core::bail!("a decode step without logit rows"),
    }
}

/// Gives the cuBLAS handle of `device` a workspace of its own (once per handle): without one,
/// cuBLAS may allocate its workspace while a step is being recorded, which a capture cannot
/// hold (PyTorch sets one for its graphs for the same reason).
#[allow(unsafe_code)]
fn cublas_workspace(device: &CudaDevice, stream: &Arc<CudaStream>) -> Result<()> {
    let blas = device.cublas_handle();
    let handle = *blas.handle();
    let mut given = WORKSPACES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if given.iter().any(|(h, _)| *h == handle as usize) {
        return Ok(());
    }
    let workspace = stream
        .alloc_zeros::<u8>(CUBLAS_WORKSPACE)
        .map_err(candle_core::Error::wrap)?;
    let (ptr, guard) = workspace.device_ptr(stream);
    // SAFETY: the handle is candle's live cuBLAS handle; the workspace stays allocated for the
    // life of the process (kept in WORKSPACES), as long as the handle may use it.
    let status = unsafe { cublas::cublasSetWorkspace_v2(handle, ptr as *mut _, CUBLAS_WORKSPACE) };
    drop(guard);
    if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        candle_core::bail!("cublasSetWorkspace failed: {status:?}")
    }
    given.push((handle as usize, workspace));
    Ok(())
}
