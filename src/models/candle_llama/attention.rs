//! Paged attention with candle's tensor ops. Keys and values of each layer live in one tensor
//! per kind, `[kv heads, slots, head dim]`; a step scatters its new rows into their slots and
//! gathers each sequence's slots back through its block table.
//!
//! A step's sequences are attended in groups: every sequence that adds one token (decodes) in
//! one padded batch, each longer chunk (a prompt being read) on its own, so that a long
//! prompt never pads the decodes to its length. Within a group the queries of a sequence are
//! padded to the group's longest chunk and its keys to the group's longest context, and a mask
//! hides the padding, the future and what lies outside a sliding window.

use candle_core::{DType, Device, Tensor};

use super::ops::Ops;
use crate::models::batch::{KvLayout, SeqChunk};

/// The keys and values of every layer: the layout's blocks and one scratch block after them,
/// which no sequence holds (a captured step's padding rows write there).
pub struct KvPool {
    layout: KvLayout,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// Distinct for every pool made: what a captured step was recorded against.
    #[cfg(feature = "cuda")]
    id: u64,
}

/// The ids of pools.
#[cfg(feature = "cuda")]
static POOLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl KvPool {
    /// A zeroed pool of `layout` (and its scratch block) for `layers` layers.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        layout: KvLayout,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<KvPool> {
        let shape = (kv_heads, layout.tokens() + layout.block_size, head_dim);
        let zeros = || Tensor::zeros(shape, dtype, device);
        Ok(KvPool {
            layout,
            keys: (0..layers).map(|_| zeros()).collect::<Result<_, _>>()?,
            values: (0..layers).map(|_| zeros()).collect::<Result<_, _>>()?,
            #[cfg(feature = "cuda")]
            id: POOLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// This pool's id, distinct from every other pool's.
    #[cfg(feature = "cuda")]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The block after the layout's, which no sequence holds.
    #[cfg(feature = "cuda")]
    pub fn scratch_block(&self) -> u32 {
        self.layout.blocks as u32
    }

    /// The pool's geometry.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Copies a smaller pool's slots (its scratch block too) into the first slots of this one.
    pub fn copy_from(&mut self, old: &KvPool) -> candle_core::Result<()> {
        for (new, old) in self
            .keys
            .iter()
            .zip(&old.keys)
            .chain(self.values.iter().zip(&old.values))
        {
            new.slice_set(old, 1, 0)?;
        }
        Ok(())
    }

    /// Layer `layer`'s key and value caches, `[kv heads, slots, head dim]` each.
    pub fn caches(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }
}

/// One group of sequences attended together.
struct Group {
    /// Their rows of the step's tokens, padded: `sequences × queries` indices (`None`: the
    /// step's rows in order).
    rows: Option<Tensor>,
    /// Where their keys are found.
    keys_at: Keys,
    sequences: usize,
    queries: usize,
    keys: usize,
}

/// A group's offsets into the step's upload.
struct Plan {
    rows_at: Option<usize>,
    keys_at: PlannedKeys,
    sequences: usize,
    queries: usize,
    keys: usize,
}

/// Where a group's key indices lie in the upload (and its mask in the masks').
enum PlannedKeys {
    Gathered {
        gather_at: usize,
        mask_at: usize,
    },
    Paged {
        tables_at: usize,
        width: usize,
        lens_at: usize,
    },
}

/// How a group finds its keys and values.
enum Keys {
    /// Gathered into a padded batch (candle's ops).
    Gathered {
        /// Their slots, padded: `sequences × keys` indices.
        gather: Tensor,
        /// 0 where a query sees a key, -inf elsewhere: `[1, sequences, 1, queries, keys]`.
        mask: Tensor,
    },
    /// Read in place by the paged kernel (decodes on CUDA).
    Paged {
        /// Each sequence's block table, padded: `[sequences, blocks]`.
        tables: Tensor,
        /// Each sequence's positions once the step has run.
        lens: Tensor,
        /// Token slots per block.
        block_size: usize,
        /// The sliding window, if any.
        window: Option<usize>,
    },
}

/// Everything a step's layers index with, uploaded once per step.
pub struct StepIndex {
    /// Token ids, one per row.
    pub ids: Tensor,
    /// Absolute positions, one per row.
    pub positions: Tensor,
    /// The slot each row's keys and values go to.
    pub slots: Tensor,
    groups: Vec<Group>,
    /// Where each row's output lies in the groups' outputs, concatenated (`None`: in order).
    order: Option<Tensor>,
    /// The rows whose logits come back (`None`: none).
    pub logit_rows: Option<Tensor>,
}

impl StepIndex {
    /// The step's indices for `seqs` in a pool of `layout`, with an optional sliding window,
    /// with masks of `dtype`; `paged`: the
    /// decodes' keys are read through their block tables by the paged kernel. Every index
    /// goes up in one copy (and the masks in another).
    pub fn new(
        seqs: &[SeqChunk<'_>],
        layout: KvLayout,
        window: Option<usize>,
        dtype: DType,
        paged: bool,
        device: &Device,
    ) -> candle_core::Result<StepIndex> {
        let size = layout.block_size;
        let slot = |seq: &SeqChunk<'_>, p: usize| {
            seq.block_table[p / size] * size as u32 + (p % size) as u32
        };
        let mut first_row = Vec::with_capacity(seqs.len());
        let mut tokens = 0;
        for seq in seqs {
            first_row.push(tokens);
            tokens += seq.tokens.len();
        }
        // One buffer of every index, cut into views after the upload.
        let mut all: Vec<u32> = Vec::with_capacity(4 * tokens);
        all.extend(seqs.iter().flat_map(|seq| seq.tokens.iter().copied()));
        all.extend(
            seqs.iter()
                .flat_map(|s| (s.context_len..s.end()).map(|p| p as u32)),
        );
        all.extend(
            seqs.iter()
                .flat_map(|s| (s.context_len..s.end()).map(|p| slot(s, p))),
        );
        let logit_rows: Vec<u32> = seqs
            .iter()
            .zip(&first_row)
            .flat_map(|(s, first)| {
                let end = first + s.tokens.len();
                (end - s.logit_rows()..end).map(|row| row as u32)
            })
            .collect();
        all.extend(&logit_rows);
        let decoding: Vec<usize> = (0..seqs.len())
            .filter(|&s| seqs[s].tokens.len() == 1)
            .collect();
        let mut members: Vec<Vec<usize>> = Vec::new();
        if !decoding.is_empty() {
            members.push(decoding);
        }
        members.extend(
            (0..seqs.len())
                .filter(|&s| seqs[s].tokens.len() > 1)
                .map(|s| vec![s]),
        );
        let mut plans = Vec::with_capacity(members.len());
        let mut masks: Vec<f32> = Vec::new();
        let mut placed = Vec::with_capacity(tokens);
        for (g, group) in members.iter().enumerate() {
            let queries = group
                .iter()
                .map(|&s| seqs[s].tokens.len())
                .max()
                .unwrap_or(1);
            let keys = group.iter().map(|&s| seqs[s].end()).max().unwrap_or(1);
            let in_kernel = paged && queries == 1;
            let rows_at = all.len();
            let mask_at = masks.len();
            if !in_kernel {
                masks.resize(mask_at + group.len() * queries * keys, f32::NEG_INFINITY);
            }
            for (b, &s) in group.iter().enumerate() {
                let seq = &seqs[s];
                for t in 0..queries {
                    // A padded query repeats the sequence's first row; its output is dropped.
                    let real = t < seq.tokens.len();
                    all.push((first_row[s] + if real { t } else { 0 }) as u32);
                    if real {
                        placed.push((first_row[s] + t, (g, b * queries + t)));
                    }
                    if !in_kernel {
                        let position = seq.context_len + if real { t } else { 0 };
                        let from = window.map_or(0, |w| (position + 1).saturating_sub(w));
                        let row = &mut masks[mask_at + (b * queries + t) * keys..][..keys];
                        row[from..=position].fill(0.0);
                    }
                }
            }
            let rows: Vec<u32> = all[rows_at..].to_vec();
            let identity =
                rows.iter().enumerate().all(|(i, &r)| r as usize == i) && rows.len() == tokens;
            if identity {
                all.truncate(rows_at);
            }
            let keys_at = match in_kernel {
                true => {
                    let width = keys.div_ceil(size);
                    let tables_at = all.len();
                    for &s in group {
                        let table = &seqs[s].block_table[..seqs[s].end().div_ceil(size)];
                        all.extend(table);
                        all.extend(std::iter::repeat_n(0, width - table.len()));
                    }
                    let lens_at = all.len();
                    all.extend(group.iter().map(|&s| seqs[s].end() as u32));
                    PlannedKeys::Paged {
                        tables_at,
                        width,
                        lens_at,
                    }
                }
                false => {
                    let gather_at = all.len();
                    for &s in group {
                        let seq = &seqs[s];
                        all.extend((0..keys).map(|p| if p < seq.end() { slot(seq, p) } else { 0 }));
                    }
                    PlannedKeys::Gathered { gather_at, mask_at }
                }
            };
            plans.push(Plan {
                rows_at: (!identity).then_some(rows_at),
                keys_at,
                sequences: group.len(),
                queries,
                keys,
            });
        }
        let mut offsets = Vec::with_capacity(plans.len());
        let mut total = 0;
        for plan in &plans {
            offsets.push(total);
            total += plan.sequences * plan.queries;
        }
        placed.sort_by_key(|(row, _)| *row);
        let order: Vec<u32> = placed
            .iter()
            .map(|(_, (g, at))| (offsets[*g] + at) as u32)
            .collect();
        let in_order = total == tokens && order.iter().enumerate().all(|(i, &o)| o as usize == i);
        let order_at = all.len();
        if !in_order {
            all.extend(&order);
        }
        let count = all.len();
        let uploaded = Tensor::from_vec(all, count, device)?;
        let view = |at: usize, len: usize| uploaded.narrow(0, at, len);
        let masks = match masks.len() {
            0 => None,
            count => Some(Tensor::from_vec(masks, count, device)?.to_dtype(dtype)?),
        };
        let groups = plans
            .iter()
            .map(|plan| {
                let (b, tq, l) = (plan.sequences, plan.queries, plan.keys);
                let keys_at = match plan.keys_at {
                    PlannedKeys::Paged {
                        tables_at,
                        width,
                        lens_at,
                    } => Keys::Paged {
                        tables: view(tables_at, b * width)?.reshape((b, width))?,
                        lens: view(lens_at, b)?,
                        block_size: size,
                        window,
                    },
                    PlannedKeys::Gathered { gather_at, mask_at } => Keys::Gathered {
                        gather: view(gather_at, b * l)?,
                        mask: masks
                            .as_ref()
                            .expect("a gathered group has a mask")
                            .narrow(0, mask_at, b * tq * l)?
                            .reshape((1, b, 1, tq, l))?,
                    },
                };
                Ok(Group {
                    rows: plan.rows_at.map(|at| view(at, b * tq)).transpose()?,
                    keys_at,
                    sequences: b,
                    queries: tq,
                    keys: l,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let logit_count = logit_rows.len();
        Ok(StepIndex {
            ids: view(0, tokens)?,
            positions: view(tokens, tokens)?,
            slots: view(2 * tokens, tokens)?,
            groups,
            order: match in_order {
                true => None,
                false => Some(view(order_at, tokens)?),
            },
            logit_rows: match logit_count {
                0 => None,
                count => Some(view(3 * tokens, count)?),
            },
        })
    }
}

#[cfg(feature = "cuda")]
impl StepIndex {
    /// The indices of a step of `batch` decodes laid out in `inputs` as a captured step reads
    /// them ([`decode_inputs`]): ids, positions, slots, logit rows (`0..batch`), block tables
    /// of `width` blocks each, lengths.
    pub fn decode(
        inputs: &Tensor,
        batch: usize,
        width: usize,
        block_size: usize,
        window: Option<usize>,
    ) -> candle_core::Result<StepIndex> {
        let view = |at: usize, len: usize| inputs.narrow(0, at * batch, len * batch);
        Ok(StepIndex {
            ids: view(0, 1)?,
            positions: view(1, 1)?,
            slots: view(2, 1)?,
            logit_rows: Some(view(3, 1)?),
            groups: vec![Group {
                rows: None,
                keys_at: Keys::Paged {
                    tables: view(4, width)?.reshape((batch, width))?,
                    lens: view(4 + width, 1)?,
                    block_size,
                    window,
                },
                sequences: batch,
                queries: 1,
                keys: width * block_size,
            }],
            order: None,
        })
    }
}

/// The host side of [`StepIndex::decode`] for `seqs` (one new token each, at most `batch`
/// of them, tables of at most `width` blocks) padded to `batch` rows: a padding row reads
/// and writes position 0 of the `scratch` block.
#[cfg(feature = "cuda")]
pub fn decode_inputs(
    seqs: &[SeqChunk<'_>],
    batch: usize,
    width: usize,
    block_size: usize,
    scratch: u32,
) -> Vec<u32> {
    let padding = batch - seqs.len();
    let size = block_size as u32;
    let mut all = Vec::with_capacity(batch * (5 + width));
    let column = |all: &mut Vec<u32>, real: &dyn Fn(&SeqChunk<'_>) -> u32, pad: u32| {
        all.extend(seqs.iter().map(real));
        all.extend(std::iter::repeat_n(pad, padding));
    };
    column(&mut all, &|s| s.tokens[0], 0);
    column(&mut all, &|s| s.context_len as u32, 0);
    column(
        &mut all,
        &|s| s.block_table[s.context_len / block_size] * size + (s.context_len % block_size) as u32,
        scratch * size,
    );
    all.extend(0..batch as u32);
    for seq in seqs {
        let table = &seq.block_table[..seq.end().div_ceil(block_size)];
        all.extend(table);
        all.extend(std::iter::repeat_n(scratch, width - table.len()));
    }
    for _ in 0..padding {
        all.extend(std::iter::repeat_n(scratch, width));
    }
    column(&mut all, &|s| s.end() as u32, 1);
    all
}

/// Attention of the step's queries (`flat`: `[tokens, heads × head dim]`, rotated) over layer
/// `layer`'s cache; returns `[tokens, heads × head dim]`.
pub fn attend(
    pool: &KvPool,
    layer: usize,
    index: &StepIndex,
    flat: &Tensor,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    scale: f64,
    ops: &Ops,
) -> candle_core::Result<Tensor> {
    let (keys, values) = (&pool.keys[layer], &pool.values[layer]);
    let group_size = heads / kv_heads;
    let mut outputs = Vec::with_capacity(index.groups.len());
    for g in &index.groups {
        let (b, tq, l) = (g.sequences, g.queries, g.keys);
        let (gather, mask) = match &g.keys_at {
            Keys::Paged {
                tables,
                lens,
                block_size,
                window,
            } => {
                outputs.push(ops.paged_attention(
                    flat,
                    g.rows.as_ref(),
                    (heads, kv_heads, head_dim),
                    (keys, values),
                    (tables, lens),
                    *block_size,
                    *window,
                    scale as f32,
                )?);
                continue;
            }
            Keys::Gathered { gather, mask } => (gather, mask),
        };
        // Queries: [kv heads, b, group × tq, head dim].
        let rows = match &g.rows {
            Some(rows) => flat.index_select(rows, 0)?,
            None => flat.clone(),
        };
        let q = rows
            .reshape((b, tq, kv_heads, group_size, head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .reshape((kv_heads * b, group_size * tq, head_dim))?
            .contiguous()?;
        // Keys and values: [kv heads × b, l, head dim].
        let gather = |cache: &Tensor| -> candle_core::Result<Tensor> {
            cache
                .index_select(gather, 1)?
                .reshape((kv_heads * b, l, head_dim))
        };
        let (k, v) = (gather(keys)?, gather(values)?);
        // Scores in the mask's dtype: the model's, but f32 for f16 (whose range the scores
        // may exceed); the softmax accumulates in f32 either way.
        let scores = (q.matmul(&k.t()?)? * scale)?
            .to_dtype(mask.dtype())?
            .reshape((kv_heads, b, group_size, tq, l))?
            .broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?
            .to_dtype(v.dtype())?
            .reshape((kv_heads * b, group_size * tq, l))?;
        let out = probs
            .matmul(&v)?
            .reshape((kv_heads, b, group_size, tq, head_dim))?
            .permute((1, 3, 0, 2, 4))?
            .reshape((b * tq, heads * head_dim))?;
        outputs.push(out);
    }
    let all = match outputs.len() {
        1 => outputs.remove(0),
        _ => Tensor::cat(&outputs, 0)?,
    };
    match &index.order {
        Some(order) => all.index_select(order, 0),
        None => all.contiguous(),
    }
}
