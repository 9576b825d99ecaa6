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

use crate::models::batch::{KvLayout, SeqChunk};

/// The keys and values of every layer.
pub struct KvPool {
    layout: KvLayout,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl KvPool {
    /// A zeroed pool of `layout` for `layers` layers.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        layout: KvLayout,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<KvPool> {
        let shape = (kv_heads, layout.tokens(), head_dim);
        let zeros = || Tensor::zeros(shape, dtype, device);
        Ok(KvPool {
            layout,
            keys: (0..layers).map(|_| zeros()).collect::<Result<_, _>>()?,
            values: (0..layers).map(|_| zeros()).collect::<Result<_, _>>()?,
        })
    }

    /// The pool's geometry.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Copies a smaller pool's slots into the first slots of this one.
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

    /// Stores layer `layer`'s new keys (`[1, tokens, kv heads, head dim]`, rotated) and values
    /// (`[tokens, kv heads × head dim]`) in the step's slots.
    pub fn write(
        &mut self,
        layer: usize,
        index: &StepIndex,
        keys: &Tensor,
        values: &Tensor,
    ) -> candle_core::Result<()> {
        let (kv_heads, _, head_dim) = self.keys[layer].dims3()?;
        let n = index.tokens();
        let by_head = |t: &Tensor| {
            t.reshape((n, kv_heads, head_dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        self.keys[layer].scatter_set(&index.slots, &by_head(keys)?, 1)?;
        self.values[layer].scatter_set(&index.slots, &by_head(values)?, 1)?;
        Ok(())
    }
}

/// One group of sequences attended together.
struct Group {
    /// Their rows of the step's tokens, padded: `sequences × queries` indices.
    rows: Tensor,
    /// Their slots, padded: `sequences × keys` indices.
    gather: Tensor,
    /// 0 where a query sees a key, -inf elsewhere: `[1, sequences, 1, queries, keys]`.
    mask: Tensor,
    sequences: usize,
    queries: usize,
    keys: usize,
}

/// Everything a step's layers index with, uploaded once per step.
pub struct StepIndex {
    /// Token ids, one per row.
    pub ids: Tensor,
    /// Absolute positions, one per row.
    pub positions: Tensor,
    /// The slot each row's keys and values go to, for every value of a cache row:
    /// `[kv heads, tokens, head dim]`.
    slots: Tensor,
    groups: Vec<Group>,
    /// Where each row's output lies in the groups' outputs, concatenated (`None`: in order).
    order: Option<Tensor>,
    /// The rows whose logits come back (`None`: none).
    pub logit_rows: Option<Tensor>,
    tokens: usize,
}

impl StepIndex {
    /// The step's indices for `seqs` in a pool of `layout`, with an optional sliding window.
    pub fn new(
        seqs: &[SeqChunk<'_>],
        layout: KvLayout,
        window: Option<usize>,
        (kv_heads, head_dim): (usize, usize),
        device: &Device,
    ) -> candle_core::Result<StepIndex> {
        let size = layout.block_size;
        let slot = |seq: &SeqChunk<'_>, p: usize| {
            seq.block_table[p / size] * size as u32 + (p % size) as u32
        };
        let (mut ids, mut positions, mut slots, mut logit_rows) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut first_row = Vec::with_capacity(seqs.len());
        for seq in seqs {
            first_row.push(ids.len());
            ids.extend_from_slice(seq.tokens);
            positions.extend((seq.context_len..seq.end()).map(|p| p as u32));
            slots.extend((seq.context_len..seq.end()).map(|p| slot(seq, p)));
            if seq.logits {
                logit_rows.push((ids.len() - 1) as u32);
            }
        }
        let tokens = ids.len();
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
        let mut groups = Vec::with_capacity(members.len());
        let mut placed = Vec::with_capacity(tokens);
        for group in &members {
            let queries = group
                .iter()
                .map(|&s| seqs[s].tokens.len())
                .max()
                .unwrap_or(1);
            let keys = group.iter().map(|&s| seqs[s].end()).max().unwrap_or(1);
            let (mut rows, mut gather) = (Vec::new(), Vec::new());
            let mut mask = vec![f32::NEG_INFINITY; group.len() * queries * keys];
            for (b, &s) in group.iter().enumerate() {
                let seq = &seqs[s];
                for t in 0..queries {
                    // A padded query repeats the sequence's first row; its output is dropped.
                    let real = t < seq.tokens.len();
                    rows.push((first_row[s] + if real { t } else { 0 }) as u32);
                    if real {
                        placed.push((first_row[s] + t, (groups.len(), b * queries + t)));
                    }
                    let position = seq.context_len + if real { t } else { 0 };
                    let from = window.map_or(0, |w| (position + 1).saturating_sub(w));
                    let row = &mut mask[(b * queries + t) * keys..][..keys];
                    row[from..=position].fill(0.0);
                }
                gather.extend((0..keys).map(|p| if p < seq.end() { slot(seq, p) } else { 0 }));
            }
            let n = group.len();
            groups.push(Group {
                rows: Tensor::from_vec(rows, n * queries, device)?,
                gather: Tensor::from_vec(gather, n * keys, device)?,
                mask: Tensor::from_vec(mask, (1, n, 1, queries, keys), device)?,
                sequences: n,
                queries,
                keys,
            });
        }
        // The groups' outputs are concatenated in group order; `order` maps rows back.
        let mut offsets = Vec::with_capacity(groups.len());
        let mut total = 0;
        for g in &groups {
            offsets.push(total);
            total += g.sequences * g.queries;
        }
        placed.sort_by_key(|(row, _)| *row);
        let order: Vec<u32> = placed
            .iter()
            .map(|(_, (g, at))| (offsets[*g] + at) as u32)
            .collect();
        let in_order = total == tokens && order.iter().enumerate().all(|(i, &o)| o as usize == i);
        Ok(StepIndex {
            ids: Tensor::from_vec(ids, tokens, device)?,
            positions: Tensor::from_vec(positions, tokens, device)?,
            slots: Tensor::from_vec(slots, (1, tokens, 1), device)?
                .broadcast_as((kv_heads, tokens, head_dim))?
                .contiguous()?,
            groups,
            order: match in_order {
                true => None,
                false => Some(Tensor::from_vec(order, tokens, device)?),
            },
            logit_rows: match logit_rows.is_empty() {
                true => None,
                false => {
                    let count = logit_rows.len();
                    Some(Tensor::from_vec(logit_rows, count, device)?)
                }
            },
            tokens,
        })
    }

    /// Rows (tokens) in the step.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// Attention of the step's queries (`[1, tokens, heads, head dim]`, rotated) over layer
/// `layer`'s cache; returns `[tokens, heads × head dim]`.
pub fn attend(
    pool: &KvPool,
    layer: usize,
    index: &StepIndex,
    queries: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (_, n, heads, head_dim) = queries.dims4()?;
    let (keys, values) = (&pool.keys[layer], &pool.values[layer]);
    let kv_heads = keys.dim(0)?;
    let group_size = heads / kv_heads;
    let flat = queries.reshape((n, heads * head_dim))?;
    let mut outputs = Vec::with_capacity(index.groups.len());
    for g in &index.groups {
        let (b, tq, l) = (g.sequences, g.queries, g.keys);
        // Queries: [kv heads, b, group × tq, head dim].
        let q = flat
            .index_select(&g.rows, 0)?
            .reshape((b, tq, kv_heads, group_size, head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .reshape((kv_heads * b, group_size * tq, head_dim))?
            .contiguous()?;
        // Keys and values: [kv heads × b, l, head dim].
        let gather = |cache: &Tensor| -> candle_core::Result<Tensor> {
            cache
                .index_select(&g.gather, 1)?
                .reshape((kv_heads * b, l, head_dim))
        };
        let (k, v) = (gather(keys)?, gather(values)?);
        let scores = (q.matmul(&k.t()?)? * scale)?
            .to_dtype(DType::F32)?
            .reshape((kv_heads, b, group_size, tq, l))?
            .broadcast_add(&g.mask)?;
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
