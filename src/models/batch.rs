//! What one step of a batched forward pass runs: for each sequence in the step, its new tokens,
//! how many of its tokens are already in the paged KV cache, and its block table. The model
//! writes the new tokens' keys and values into their slots, attends each token over its own
//! sequence only, and returns the logits of the sequences that ask for them.
//!
//! The model never allocates blocks, samples or sees a request: the engine's scheduler decides
//! who runs and owns the block tables; the model owns the cache's storage.

use super::error::GenerationError;
use super::sampling::DeviceDraw;

/// The geometry of a paged KV cache: `blocks` blocks of `block_size` token slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Token slots per block (a multiple of [`BLOCK_ALIGN`]).
    pub block_size: usize,
    /// Blocks in the pool.
    pub blocks: usize,
}

/// How a paged KV cache stores keys and values: `F32` as computed, or `F16`, which halves the
/// cache's memory and the bytes each decode step reads (llama.cpp's default), each value
/// rounded once when stored. `Auto` is f32 on the CPU and the model's compute dtype on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// The model's choice.
    #[default]
    Auto,
    /// 32-bit floats.
    F32,
    /// 16-bit IEEE halves.
    F16,
}

impl KvDtype {
    /// The name pool.toml uses.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::Auto => "auto",
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "auto" => Ok(KvDtype::Auto),
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            other => Err(format!(
                "expected \"auto\", \"f32\" or \"f16\", got {other:?}"
            )),
        }
    }
}

/// Block sizes are multiples of this, so that attention's four-position groups never straddle
/// a block boundary and a position's products do not depend on the block size.
pub const BLOCK_ALIGN: usize = 4;

impl KvLayout {
    /// Token slots in the whole pool.
    pub fn tokens(&self) -> usize {
        self.block_size * self.blocks
    }
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// The new tokens, at positions `context_len..context_len + tokens.len()`.
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the cache (the position of the first new token).
    pub context_len: usize,
    /// The sequence's blocks in position order; covers `context_len + tokens.len()` positions.
    pub block_table: &'a [u32],
    /// Whether the logits of the chunk's last token come back.
    pub logits: bool,
    /// Whether the logits of every token of the chunk come back (a prompt's log
    /// probabilities); implies the last token's.
    pub all_logits: bool,
}

impl SeqChunk<'_> {
    /// How many rows of logits the chunk gets back.
    pub fn logit_rows(&self) -> usize {
        match (self.all_logits, self.logits) {
            (true, _) => self.tokens.len(),
            (false, true) => 1,
            (false, false) => 0,
        }
    }

    /// Positions this sequence covers once the step has run.
    pub fn end(&self) -> usize {
        self.context_len + self.tokens.len()
    }
}

/// Checks a step against a cache layout: every chunk has tokens, tokens are in the
/// vocabulary, block tables are long enough and name blocks of the pool, and no block is
/// written by two sequences.
pub fn check_step(
    seqs: &[SeqChunk<'_>],
    layout: KvLayout,
    vocab: usize,
) -> Result<(), GenerationError> {
    let bad = |message: String| Err(GenerationError::Forward(message));
    let mut written = std::collections::HashSet::new();
    for (i, seq) in seqs.iter().enumerate() {
        if seq.tokens.is_empty() {
            return bad(format!("sequence {i} of the step has no tokens"));
        }
        if let Some(&id) = seq.tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerationError::TokenOutOfVocabulary {
                id,
                vocab_size: vocab,
            });
        }
        let needed = seq.end().div_ceil(layout.block_size);
        if seq.block_table.len() < needed {
            return bad(format!(
                "sequence {i} covers {} positions but holds {} blocks of {}",
                seq.end(),
                seq.block_table.len(),
                layout.block_size
            ));
        }
        if let Some(&block) = seq
            .block_table
            .iter()
            .find(|&&b| b as usize >= layout.blocks)
        {
            return bad(format!(
                "block {block} is outside the pool of {}",
                layout.blocks
            ));
        }
        let first = seq.context_len / layout.block_size;
        for &block in &seq.block_table[first..needed] {
            if !written.insert(block) {
                return bad(format!("block {block} is written by two sequences"));
            }
        }
    }
    Ok(())
}

/// The single-sequence path of a batched model (`Model::forward`): one sequence in blocks
/// `0..` of a pool of its own, grown to powers of two so that a long decode copies its cache a
/// few times only.
#[derive(Debug, Default)]
pub struct Solo {
    cached: usize,
    table: Vec<u32>,
}

impl Solo {
    /// Token slots per block of the single-sequence pool.
    pub const BLOCK: usize = 16;

    /// Forgets the sequence: the next forward starts at position 0.
    pub fn clear(&mut self) {
        self.cached = 0;
    }

    /// Checks that `position` continues the sequence and returns the layout the pool needs
    /// to hold `tokens` more.
    pub fn layout(&mut self, position: usize, tokens: usize) -> Result<KvLayout, GenerationError> {
        if position != self.cached {
            return Err(GenerationError::Forward(format!(
                "position {position} but {} positions cached",
                self.cached
            )));
        }
        let blocks = (position + tokens).div_ceil(Self::BLOCK);
        self.table = (0..blocks as u32).collect();
        Ok(KvLayout {
            block_size: Self::BLOCK,
            blocks: blocks.next_power_of_two(),
        })
    }

    /// The step of `ids` after [`Solo::layout`].
    pub fn chunk<'a>(&'a self, ids: &'a [u32]) -> SeqChunk<'a> {
        SeqChunk {
            tokens: ids,
            context_len: self.cached,
            block_table: &self.table,
            logits: true,
            all_logits: false,
        }
    }

    /// Records that `tokens` more are cached.
    pub fn advance(&mut self, tokens: usize) {
        self.cached += tokens;
    }
}

/// A model that runs many sequences in one forward pass over a paged KV cache it owns.
pub trait BatchedModel {
    /// Bytes of cache one token takes (keys and values of every layer) stored as `dtype`, or
    /// why this model cannot store `dtype`.
    fn kv_bytes_per_token(&self, dtype: KvDtype) -> Result<usize, String>;

    /// Replaces the cache with an empty pool of `layout`'s geometry storing `dtype` (one that
    /// [`BatchedModel::kv_bytes_per_token`] accepts).
    fn init_kv(&mut self, layout: KvLayout, dtype: KvDtype) -> Result<(), GenerationError>;

    /// The cache's geometry (`None` before [`BatchedModel::init_kv`]).
    fn kv_layout(&self) -> Option<KvLayout>;

    /// Runs one step and returns, in the order of `seqs`, the logits of each chunk's
    /// [`SeqChunk::logit_rows`]: every token's for a chunk with `all_logits`, the last
    /// token's for one with `logits`.
    fn forward_batch(&mut self, seqs: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, GenerationError>;

    /// Whether [`BatchedModel::forward_choosing`] honours [`Choice::Draw`]: the engine
    /// prepares draws only for such a model.
    fn draws(&self) -> bool {
        false
    }

    /// Runs one step as [`BatchedModel::forward_batch`] does, except that the row of a chunk
    /// whose choice in `choices` is not [`Choice::Logits`] (one that asks for its last
    /// token's logits only) may come back as the token chosen from them: a model whose logits
    /// lie on a GPU chooses there and copies back only the ids. This default returns every
    /// row's logits: on the host the sequences' samplers choose, side by side on rayon's pool.
    fn forward_choosing(
        &mut self,
        seqs: &[SeqChunk<'_>],
        choices: &[Choice],
    ) -> Result<Vec<Row>, GenerationError> {
        let _ = choices;
        Ok(self
            .forward_batch(seqs)?
            .into_iter()
            .map(Row::Logits)
            .collect())
    }
}

/// How a chunk's last row is wanted back from a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// Its logits: the host samples.
    Logits,
    /// The argmax of its raw logits.
    Greedy,
    /// The token this draw picks from its logits (the host sampler's choice, made where the
    /// logits lie).
    Draw(DeviceDraw),
}

/// The choice of a row that is not chosen: its logits come back.
pub static LOGITS: Choice = Choice::Logits;

/// One row of a step's output: a token's logits, or the token chosen from them.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// The logits.
    Logits(Vec<f32>),
    /// The index of the largest logit, as [`super::argmax`] gives it.
    Greedy(u32),
    /// The token a [`Choice::Draw`] picked, and whether the draw used its fraction.
    Drawn {
        /// The token.
        token: u32,
        /// Whether the sampler's RNG is to advance past the fraction.
        used_fraction: bool,
    },
}

impl Row {
    /// The logits, unless a token was chosen from them.
    pub fn into_logits(self) -> Option<Vec<f32>> {
        match self {
            Row::Logits(logits) => Some(logits),
            Row::Greedy(_) | Row::Drawn { .. } => None,
        }
    }
}

/// For each row a step returns (each chunk's [`SeqChunk::logit_rows`], in order), how it comes
/// back: the choice of a chunk that asks for its last token's logits only, [`LOGITS`] for
/// every row of a chunk that asks for all of its rows.
pub fn chosen_rows<'a>(seqs: &[SeqChunk<'_>], choices: &'a [Choice]) -> Vec<&'a Choice> {
    seqs.iter()
        .zip(choices)
        .flat_map(|(seq, choice)| {
            let choice = match seq.all_logits {
                true => &LOGITS,
                false => choice,
            };
            std::iter::repeat_n(choice, seq.logit_rows())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a chunk that asks for its last row alone gets that row chosen.
    #[test]
    fn chosen_rows_follow_each_chunks_rows() {
        let table = [0u32, 1];
        let mut echo = chunk(&[1, 2, 3], 0, &table);
        echo.all_logits = true;
        let mut silent = chunk(&[4, 5], 0, &table);
        silent.logits = false;
        let chunks = [chunk(&[6], 3, &table), echo, silent, chunk(&[7], 2, &table)];
        let choices = [
            Choice::Greedy,
            Choice::Greedy,
            Choice::Greedy,
            Choice::Logits,
        ];
        let rows: Vec<bool> = chosen_rows(&chunks, &choices)
            .iter()
            .map(|c| **c == Choice::Greedy)
            .collect();
        assert_eq!(rows, [true, false, false, false, false]);
    }

    fn chunk<'a>(tokens: &'a [u32], context_len: usize, table: &'a [u32]) -> SeqChunk<'a> {
        SeqChunk {
            tokens,
            context_len,
            block_table: table,
            logits: true,
            all_logits: false,
        }
    }

    #[test]
    fn a_step_is_checked_against_the_pool() {
        let layout = KvLayout {
            block_size: 4,
            blocks: 8,
        };
        let ok = [chunk(&[1, 2, 3], 2, &[0, 1]), chunk(&[5], 0, &[2])];
        assert!(check_step(&ok, layout, 10).is_ok());
        let short = [chunk(&[1, 2, 3], 2, &[0])];
        assert!(check_step(&short, layout, 10).is_err());
        let shared = [chunk(&[1], 0, &[3]), chunk(&[2], 0, &[3])];
        assert!(check_step(&shared, layout, 10).is_err());
        let outside = [chunk(&[1], 0, &[8])];
        assert!(check_step(&outside, layout, 10).is_err());
        let vocab = [chunk(&[10], 0, &[1])];
        assert!(matches!(
            check_step(&vocab, layout, 10),
            Err(GenerationError::TokenOutOfVocabulary { id: 10, .. })
        ));
        // A block read by one sequence and written by another is fine (a shared prefix).
        let prefix = [chunk(&[7], 4, &[0, 1]), chunk(&[8], 4, &[0, 2])];
        assert!(check_step(&prefix, layout, 10).is_ok());
    }
}
