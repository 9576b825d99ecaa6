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
    /// Their rows of the step's tokens, padded: `sequences × queries` indices (`None`: the
    /// step's rows in order).
    rows: Option<Tensor>,
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
    /// The step's indices for `seqs` in a pool of `layout`, with an optional sliding window,
    /// for caches of `kv heads × head dim` values per slot and masks of `dtype`. Every index
    /// goes up in one copy (and the masks in another).
    pub fn new(
        seqs: &[SeqChunk<'_>],
        layout: KvLayout,
        window: Option<usize>,
        (kv_heads, head_dim): (usize, usize),
        dtype: DType,
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
        // Per group: (rows offset or None, gather offset, mask offset, b, tq, l).
        let mut shapes = Vec::with_capacity(members.len());
        let mut masks: Vec<f32> = Vec::new();
        let mut placed = Vec::with_capacity(tokens);
        for (g, group) in members.iter().enumerate() {
            let queries = group
                .iter()
                .map(|&s| seqs[s].tokens.len())
                .max()
                .unwrap_or(1);
            let keys = group.iter().map(|&s| seqs[s].end()).max().unwrap_or(1);
            let rows_at = all.len();
            let mask_at = masks.len();
            masks.resize(mask_at + group.len() * queries * keys, f32::NEG_INFINITY);
            for (b, &s) in group.iter().enumerate() {
                let seq = &seqs[s];
                for t in 0..queries {
                    // A padded query repeats the sequence's first row; its output is dropped.
                    let real = t < seq.tokens.len();
                    all.push((first_row[s] + if real { t } else { 0 }) as u32);
                    if real {
                        placed.push((first_row[s] + t, (g, b * queries + t)));
                    }
                    let position = seq.context_len + if real { t } else { 0 };
                    let from = window.map_or(0, |w| (position + 1).saturating_sub(w));
                    let row = &mut masks[mask_at + (b * queries + t) * keys..][..keys];
                    row[from..=position].fill(0.0);
                }
            }
            let rows: Vec<u32> = all[rows_at..].to_vec();
            let identity =
                rows.iter().enumerate().all(|(i, &r)| r as usize == i) && rows.len() == tokens;
            if identity {
                all.truncate(rows_at);
            }
            let gather_at = all.len();
            for &s in group {
                let seq = &seqs[s];
                all.extend((0..keys).map(|p| if p < seq.end() { slot(seq, p) } else { 0 }));
            }
            let rows_at = (!identity).then_some(rows_at);
            shapes.push((rows_at, gather_at, mask_at, group.len(), queries, keys));
        }
        let mut offsets = Vec::with_capacity(shapes.len());
        let mut total = 0;
        for &(_, _, _, b, tq, _) in &shapes {
            offsets.push(total);
            total += b * tq;
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
        let mask_count = masks.len();
        let masks = Tensor::from_vec(masks, mask_count, device)?.to_dtype(dtype)?;
        let groups = shapes
            .iter()
            .map(|&(rows_at, gather_at, mask_at, b, tq, l)| {
                Ok(Group {
                    rows: rows_at.map(|at| view(at, b * tq)).transpose()?,
                    gather: view(gather_at, b * l)?,
                    mask: masks
                        .narrow(0, mask_at, b * tq * l)?
                        .reshape((1, b, 1, tq, l))?,
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
            slots: view(2 * tokens, tokens)?
                .reshape((1, tokens, 1))?
                .broadcast_as((kv_heads, tokens, head_dim))?
                .contiguous()?,
            groups,
            order: match in_order {
                true => None,
                false => Some(view(order_at, tokens)?),
            },
            logit_rows: match logit_count {
                0 => None,
                count => Some(view(3 * tokens, count)?),
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
                .index_select(&g.gather, 1)?
                .reshape((kv_heads * b, l, head_dim))
        };
        let (k, v) = (gather(keys)?, gather(values)?);
        // Scores in the mask's dtype: the model's, but f32 for f16 (whose range the scores
        // may exceed); the softmax accumulates in f32 either way.
        let scores = (q.matmul(&k.t()?)? * scale)?
            .to_dtype(g.mask.dtype())?
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
