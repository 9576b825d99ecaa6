//! The `Model` enum: one variant per architecture, one `forward(ids, position)` and one
//! `clear_kv_cache()` for all of them.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{
    gemma, gemma2, llama, olmo, olmo2, phi3, quantized_gemma3, quantized_llama, quantized_phi3,
    quantized_qwen2, quantized_qwen3, qwen2, qwen3, stable_lm, starcoder2,
};

use super::batch::BatchedModel;
use super::decoder::Decoder;
use super::error::GenerationError;
use super::phi::Phi;

/// A loaded causal language model with its KV cache. It lives on one engine thread and is never
/// shared, so nothing guards it.
pub enum Model {
    /// candle's Llama, with its external cache.
    Llama {
        /// The weights.
        model: llama::Llama,
        /// The KV cache (rebuilt on clear).
        cache: llama::Cache,
        /// The config, kept to rebuild the cache.
        config: Box<llama::Config>,
        /// The cache dtype.
        dtype: DType,
        /// The device the cache lives on.
        device: Device,
    },
    /// llorch's own decoder (Mistral with an exact sliding window, Granite with multipliers).
    Decoder(Decoder),
    /// llorch's own Phi-1/1.5/2 (runs in every dtype).
    Phi(Phi),
    /// Phi-3.
    Phi3(phi3::Model),
    /// Qwen2.
    Qwen2(qwen2::ModelForCausalLM),
    /// Qwen3.
    Qwen3(qwen3::ModelForCausalLM),
    /// Gemma.
    Gemma(gemma::Model),
    /// Gemma 2.
    Gemma2(gemma2::Model),
    /// OLMo.
    Olmo(olmo::Model),
    /// OLMo 2.
    Olmo2(olmo2::Model),
    /// StableLM: candle keeps its cache private with no way to clear it, so the model is
    /// rebuilt from its already-loaded weights (shared, not copied) to clear it.
    StableLm {
        /// The weights and cache.
        model: Box<stable_lm::Model>,
        /// The config, kept to rebuild the model.
        config: Box<stable_lm::Config>,
        /// The loaded weights.
        weights: VarBuilder<'static>,
    },
    /// StarCoder2.
    Starcoder2(starcoder2::Model),
    /// A Llama-family model on the CPU, run by llorch's own batched forward pass.
    CpuLlama(Box<super::cpu::CpuLlama>),
    /// A Llama-family model on a GPU (or in bf16 on the CPU), batched with candle's tensor ops.
    CandleLlama(Box<super::candle_llama::CandleLlama>),
    /// A GGUF Llama/Mistral (other devices, or tensor types the CPU path does not multiply).
    QuantLlama(quantized_llama::ModelWeights),
    /// A GGUF Qwen2.
    QuantQwen2(quantized_qwen2::ModelWeights),
    /// A GGUF Qwen3.
    QuantQwen3(quantized_qwen3::ModelWeights),
    /// A GGUF Phi-3: candle has no cache-clearing call, so a fresh clone (weights shared) replaces it.
    QuantPhi3 {
        /// The model in use.
        model: quantized_phi3::ModelWeights,
        /// An unused copy with an empty cache.
        pristine: quantized_phi3::ModelWeights,
    },
    /// The test backend of `builtin:fake` (test builds only).
    #[cfg(feature = "fault-injection")]
    Fake(super::fake::FakeModel),
    /// A GGUF Gemma 3, reset like Phi-3.
    QuantGemma3 {
        /// The model in use.
        model: quantized_gemma3::ModelWeights,
        /// An unused copy with an empty cache.
        pristine: quantized_gemma3::ModelWeights,
    },
}

impl Model {
    /// Runs `input` (token ids, shape `(1, seq)`, on the model's device) at absolute position
    /// `position` (the number of tokens already in the KV cache) and returns the f32 logits of
    /// the last position.
    pub fn forward(
        &mut self,
        input: &Tensor,
        position: usize,
    ) -> Result<Vec<f32>, GenerationError> {
        let logits = match self {
            #[cfg(feature = "fault-injection")]
            Model::Fake(fake) => return fake.forward(position + input.dim(1)?),
            Model::Llama { model, cache, .. } => model.forward(input, position, cache)?,
            Model::Decoder(m) => m.forward(input, position)?,
            Model::Phi(m) => m.forward(input, position)?,
            Model::Phi3(m) => m.forward(input, position)?,
            Model::Qwen2(m) => m.forward(input, position)?,
            Model::Qwen3(m) => m.forward(input, position)?,
            Model::Gemma(m) => m.forward(input, position)?,
            Model::Gemma2(m) => m.forward(input, position)?,
            Model::Olmo(m) => m.forward(input, position)?,
            Model::Olmo2(m) => m.forward(input, position)?,
            Model::StableLm { model, .. } => model.forward(input, position)?,
            Model::Starcoder2(m) => m.forward(input, position)?,
            Model::CpuLlama(m) => {
                let ids = input.flatten_all()?.to_vec1::<u32>()?;
                return m.forward(&ids, position);
            }
            Model::CandleLlama(m) => {
                let ids = input.flatten_all()?.to_vec1::<u32>()?;
                return m.forward(&ids, position);
            }
            Model::QuantLlama(m) => m.forward(input, position)?,
            Model::QuantQwen2(m) => m.forward(input, position)?,
            Model::QuantQwen3(m) => m.forward(input, position)?,
            Model::QuantPhi3 { model, .. } => model.forward(input, position)?,
            Model::QuantGemma3 { model, .. } => model.forward(input, position)?,
        };
        last_row(&logits)
    }

    /// The batched forward pass of the variants that have one.
    pub fn batched(&mut self) -> Option<&mut dyn BatchedModel> {
        match self {
            Model::CpuLlama(m) => Some(m.as_mut()),
            Model::CandleLlama(m) => Some(m.as_mut()),
            _ => None,
        }
    }

    /// Empties the KV cache so the next forward starts at position 0.
    pub fn clear_kv_cache(&mut self) -> Result<(), GenerationError> {
        match self {
            Model::Llama {
                cache,
                config,
                dtype,
                device,
                ..
            } => *cache = llama::Cache::new(true, *dtype, config, device)?,
            Model::Decoder(m) => m.clear_kv_cache(),
            Model::Phi(m) => m.clear_kv_cache(),
            Model::Phi3(m) => m.clear_kv_cache(),
            Model::Qwen2(m) => m.clear_kv_cache(),
            Model::Qwen3(m) => m.clear_kv_cache(),
            Model::Gemma(m) => m.clear_kv_cache(),
            Model::Gemma2(m) => m.clear_kv_cache(),
            Model::Olmo(m) => m.clear_kv_cache(),
            Model::Olmo2(m) => m.clear_kv_cache(),
            Model::StableLm {
                model,
                config,
                weights,
            } => **model = stable_lm::Model::new(config, weights.clone())?,
            Model::Starcoder2(m) => m.clear_kv_cache(),
            Model::CpuLlama(m) => m.clear_kv_cache(),
            Model::CandleLlama(m) => m.clear_kv_cache(),
            Model::QuantLlama(m) => m.clear_kv_cache(),
            Model::QuantQwen2(m) => m.clear_kv_cache(),
            Model::QuantQwen3(m) => m.clear_kv_cache(),
            Model::QuantPhi3 { model, pristine } => *model = pristine.clone(),
            Model::QuantGemma3 { model, pristine } => *model = pristine.clone(),
            #[cfg(feature = "fault-injection")]
            Model::Fake(_) => {}
        }
        Ok(())
    }
}

/// Takes the logits of the last position whatever shape an architecture returns
/// (`(vocab)`, `(1, vocab)` or `(1, seq, vocab)`) and converts them to f32 on the host.
fn last_row(logits: &Tensor) -> Result<Vec<f32>, GenerationError> {
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let flat = logits.flatten_all()?;
    let rows = flat.dim(0)? / vocab;
    let last = flat.narrow(0, (rows - 1) * vocab, vocab)?;
    Ok(last.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}
