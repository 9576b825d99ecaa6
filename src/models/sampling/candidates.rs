//! Which tokens a sampler may draw, and with what weight: the temperature-scaled softmax cut by
//! top-k, top-p and min-p, as `transformers` defines them (top-k, then top-p over the
//! renormalized top-k, then min-p against the most likely token), computed without sorting
//! the vocabulary: top-k selects its k tokens in linear time, top-p finds where the kept mass
//! is reached by a weighted quickselect (then settles its floor on sums in a fixed order),
//! min-p and plain temperature need no order at all.
//! Sorting all 151 936 tokens of a Qwen vocabulary took 9–16 ms per token (`cargo bench
//! --bench sampling`).

use crate::models::cpu::exp::{exp_nonpositive, exp_shifted, sum_at_least, SUM_BLOCK};

use super::SamplingParams;

/// A token id and its weight, `e^((logit - max) / temperature)` (the most likely token has 1).
pub(super) type Weighted = (u32, f32);

/// The tokens left to draw from.
#[derive(Debug)]
pub(super) enum Kept<'a> {
    /// Every token whose weight is at least `floor` (by id), and their total weight.
    All {
        /// One weight per token id.
        weights: &'a [f32],
        /// Tokens below this weight are out.
        floor: f32,
        /// The sum of the kept weights.
        total: f64,
    },
    /// These tokens, most likely first, and their total weight.
    List {
        /// The kept tokens.
        tokens: &'a [Weighted],
        /// The sum of their weights.
        total: f64,
    },
}

impl Kept<'_> {
    /// The token at `fraction` (in `[0, 1)`) of the kept weight, walking the kept tokens in
    /// their order.
    pub(super) fn draw(&self, fraction: f64) -> u32 {
        match self {
            Kept::All {
                weights,
                floor,
                total,
            } => {
                let mut left = fraction * total;
                let kept = |w: f32| w >= *floor && w > 0.0;
                for (block, chunk) in weights.chunks(SUM_BLOCK).enumerate() {
                    let mass = f64::from(sum_at_least(chunk, *floor));
                    if left >= mass {
                        left -= mass;
                        continue;
                    }
                    for (offset, &w) in chunk.iter().enumerate() {
                        if kept(w) {
                            left -= f64::from(w);
                            if left < 0.0 {
                                return (block * SUM_BLOCK + offset) as u32;
                            }
                        }
                    }
                }
                // Rounding left a sliver past the last block: the last kept token.
                weights.iter().rposition(|w| kept(*w)).unwrap_or(0) as u32
            }
            Kept::List { tokens, total } => {
                let mut left = fraction * total;
                for &(id, w) in tokens.iter() {
                    left -= f64::from(w);
                    if left < 0.0 {
                        return id;
                    }
                }
                tokens.last().map_or(0, |(id, _)| *id)
            }
        }
    }
}

/// Buffers reused from token to token.
#[derive(Debug, Default)]
pub(super) struct Candidates {
    weights: Vec<f32>,
    list: Vec<Weighted>,
}

/// Most likely first; among equals the lower id first.
fn by_weight(a: &Weighted, b: &Weighted) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

impl Candidates {
    /// Applies temperature, top-k, top-p and min-p to `logits`, whose largest value `max` must
    /// be finite (the temperature is above 0). NaN logits are left out.
    pub(super) fn keep(&mut self, logits: &[f32], max: f32, params: &SamplingParams) -> Kept<'_> {
        let inverse = 1.0 / params.temperature;
        // A top-k that keeps the whole vocabulary still sorts it when that is short (so the
        // draw's order does not depend on the vocabulary's size up to `SORT_ALL`, as a
        // device's top-k of at most that many tokens needs); a longer one goes unsorted.
        let sorted = params.top_k > 0 && (params.top_k < logits.len() || logits.len() <= SORT_ALL);
        if !sorted {
            return self.whole(logits, max, inverse, params);
        }
        let total = self.top_k(logits, params.top_k, max, inverse);
        if params.top_p < 1.0 {
            nucleus(&mut self.list, f64::from(params.top_p) * total, true);
        }
        if params.min_p > 0.0 {
            let most = self.list.iter().fold(0f32, |m, (_, w)| m.max(*w));
            let floor = most * params.min_p;
            self.list.retain(|(_, w)| *w >= floor);
        }
        Kept::List {
            tokens: &self.list,
            total: self.list.iter().map(|(_, w)| f64::from(*w)).sum(),
        }
    }

    /// Temperature, top-p and min-p over the whole vocabulary: every token at or above one
    /// floor (min-p's, or top-p's [`threshold`] when higher), walked by id.
    fn whole(
        &mut self,
        logits: &[f32],
        max: f32,
        inverse: f32,
        params: &SamplingParams,
    ) -> Kept<'_> {
        self.weights.resize(logits.len(), 0.0);
        let total = exp_shifted(logits, max, inverse, &mut self.weights);
        if params.top_p >= 1.0 {
            let floor = params.min_p;
            return Kept::All {
                weights: &self.weights,
                floor,
                total: if floor > 0.0 {
                    kept_sum(&self.weights, floor)
                } else {
                    total
                },
            };
        }
        let weighted = self.weights.iter().enumerate();
        self.list.clear();
        self.list.extend(
            weighted
                .filter(|(_, w)| !w.is_nan())
                .map(|(id, &w)| (id as u32, w)),
        );
        let goal = f64::from(params.top_p) * total;
        nucleus(&mut self.list, goal, false);
        let cut = self.list.iter().fold(f32::INFINITY, |m, (_, w)| m.min(*w));
        // The most likely token weighs 1, so min-p's floor is min-p itself.
        let floor = threshold(&self.weights, goal, cut).max(params.min_p);
        Kept::All {
            weights: &self.weights,
            floor,
            total: kept_sum(&self.weights, floor),
        }
    }

    /// Keeps the `k` highest logits (neither NaN nor `-inf`; ranked by `f32::total_cmp`, so
    /// `+0.0` above `-0.0`, then by id), most likely first, as weights (`exp_nonpositive`, the
    /// `exp` the weights of every other path and the CUDA sampler use); returns their sum, in
    /// that order. One pass collects the logits above a threshold, and each time `4k` are
    /// collected only the best `k` are kept and the threshold rises to the least of them: a
    /// later logit that does not beat it (an equal one has a higher id) cannot be in the top
    /// `k`, so most of the vocabulary costs one comparison.
    fn top_k(&mut self, logits: &[f32], k: usize, max: f32, inverse: f32) -> f64 {
        self.list.clear();
        let cap = (4 * k).max(256);
        let mut threshold = f32::NEG_INFINITY;
        for (id, &logit) in logits.iter().enumerate() {
            if !logit.is_nan() && logit.total_cmp(&threshold).is_gt() {
                self.list.push((id as u32, logit));
                if self.list.len() == cap {
                    self.list.select_nth_unstable_by(k - 1, by_weight);
                    self.list.truncate(k);
                    threshold = self.list[k - 1].1;
                }
            }
        }
        if self.list.len() > k {
            self.list.select_nth_unstable_by(k - 1, by_weight);
            self.list.truncate(k);
        }
        self.list.sort_unstable_by(by_weight);
        let mut total = 0f64;
        for (_, value) in &mut self.list {
            *value = exp_nonpositive((*value - max) * inverse);
            total += f64::from(*value);
        }
        total
    }
}

/// Top-p's floor over a whole vocabulary: the largest weight `t` whose kept mass
/// (`kept_sum(weights, t)`, the sum a draw walks) still reaches `goal`, found from `guess` (the
/// least weight a nucleus found by partial sorting kept) in a step or two up or down. So the
/// kept tokens are every token at least as likely as the last one needed, ties included, with
/// the mass summed in a fixed order: the floor does not depend on how the nucleus was found,
/// and a device finds the same one by bisecting the same sums.
fn threshold(weights: &[f32], goal: f64, guess: f32) -> f32 {
    let mut t = guess;
    loop {
        if kept_sum(weights, t) >= goal {
            let above = weights
                .iter()
                .filter(|w| **w > t)
                .fold(f32::INFINITY, |m, w| m.min(*w));
            if above.is_finite() && kept_sum(weights, above) >= goal {
                t = above;
                continue;
            }
            return t;
        }
        let below = weights
            .iter()
            .filter(|w| **w < t)
            .fold(f32::NEG_INFINITY, |m, w| m.max(*w));
        if below.is_infinite() {
            return t;
        }
        t = below;
    }
}

/// The sum of the weights at or above `floor`, block by block as the draw walks them.
fn kept_sum(weights: &[f32], floor: f32) -> f64 {
    weights
        .chunks(SUM_BLOCK)
        .map(|block| f64::from(sum_at_least(block, floor)))
        .sum()
}

/// Cuts `list` to its shortest most-likely-first prefix whose weight reaches `goal` (at least
/// one token), leaving the kept tokens in no particular order unless `sorted` (then it is a
/// walk). Otherwise a weighted quickselect: partition around a pivot (the 256th token first,
/// then the middle of what is left), keep the side where the goal is crossed, and sort only
/// once a few tokens are left: linear time however flat the distribution.
fn nucleus(list: &mut Vec<Weighted>, goal: f64, sorted: bool) {
    let (mut low, mut high, mut before) = (0, list.len(), 0f64);
    while !sorted && high - low > SORT_BELOW {
        let half = (high - low) / 2;
        let pivot = low
            + if low == 0 {
                half.min(FIRST_PIVOT)
            } else {
                half
            };
        list[low..high].select_nth_unstable_by(pivot - low, by_weight);
        let head: f64 = list[low..=pivot].iter().map(|(_, w)| f64::from(*w)).sum();
        if before + head >= goal {
            high = pivot + 1;
        } else {
            before += head;
            low = pivot + 1;
        }
    }
    if !sorted {
        list[low..high].sort_unstable_by(by_weight);
    }
    let mut cumulative = before;
    for index in low..high {
        cumulative += f64::from(list[index].1);
        if cumulative >= goal {
            list.truncate(index + 1);
            return;
        }
    }
    list.truncate(high.max(1));
}

/// Vocabularies this short are sorted by a top-k that keeps them whole.
pub(crate) const SORT_ALL: usize = 256;
/// Ranges this short are sorted rather than partitioned.
const SORT_BELOW: usize = 64;
/// Where the first partition splits: most of a trained model's mass is in its first tokens.
const FIRST_PIVOT: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The definition, by sorting everything: softmax at the temperature, top-k, renormalize,
    /// top-p, min-p against the first; normalized probabilities by id.
    fn reference(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(id, &l)| {
                (
                    id as u32,
                    (f64::from(l - max) / f64::from(params.temperature)).exp(),
                )
            })
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if params.top_k > 0 {
            probs.truncate(params.top_k);
        }
        let sum: f64 = probs.iter().map(|(_, p)| p).sum();
        probs.iter_mut().for_each(|(_, p)| *p /= sum);
        let mut cumulative = 0.0;
        if let Some(cut) = probs.iter().position(|(_, p)| {
            cumulative += p;
            cumulative >= f64::from(params.top_p)
        }) {
            probs.truncate(cut + 1);
        }
        let floor = probs[0].1 * f64::from(params.min_p);
        probs.retain(|(_, p)| *p >= floor);
        normalized(probs)
    }

    fn normalized(mut probs: Vec<(u32, f64)>) -> Vec<(u32, f64)> {
        let sum: f64 = probs.iter().map(|(_, p)| p).sum();
        probs.iter_mut().for_each(|(_, p)| *p /= sum);
        probs.sort_by_key(|(id, _)| *id);
        probs
    }

    fn distribution(kept: Kept<'_>) -> Vec<(u32, f64)> {
        let probs = match kept {
            Kept::All { weights, floor, .. } => weights
                .iter()
                .enumerate()
                .filter(|(_, w)| **w >= floor)
                .map(|(id, w)| (id as u32, f64::from(*w)))
                .collect(),
            Kept::List { tokens, .. } => {
                tokens.iter().map(|(id, w)| (*id, f64::from(*w))).collect()
            }
        };
        normalized(probs)
    }

    /// Top-p's floor is the largest weight whose kept mass reaches the goal, whichever weight
    /// the search starts from.
    #[test]
    fn top_p_floor_does_not_depend_on_the_guess() {
        let mut rng = StdRng::seed_from_u64(5);
        for vocab in [1, 9, 3000] {
            let mut weights: Vec<f32> = (0..vocab)
                .map(|_| (rng.random::<f32>() * 4.0).round() / 4.0)
                .collect();
            weights[0] = 1.0;
            let total = kept_sum(&weights, 0.0);
            for top_p in [0.1f32, 0.5, 0.9, 0.999] {
                let goal = f64::from(top_p) * total;
                let best = weights
                    .iter()
                    .copied()
                    .filter(|&t| kept_sum(&weights, t) >= goal)
                    .fold(0f32, f32::max);
                for guess in [0.0, 0.25, 0.5, 1.0] {
                    assert_eq!(
                        threshold(&weights, goal, guess),
                        best,
                        "{vocab} {top_p} {guess}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_setting_keeps_the_tokens_and_probabilities_of_the_full_sort() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut candidates = Candidates::default();
        let mut cases = 0;
        for vocab in [1, 2, 7, 100, 3000, 40_000] {
            for spread in [0.5f32, 4.0, 20.0] {
                let logits: Vec<f32> = (0..vocab)
                    .map(|_| (rng.random::<f32>() - 0.5) * spread)
                    .collect();
                for (temperature, top_k, top_p, min_p) in [
                    (1.0, 0, 1.0, 0.0),
                    (0.7, 0, 0.9, 0.0),
                    (1.3, 0, 0.5, 0.05),
                    (1.0, 0, 1.0, 0.1),
                    (1.0, 1, 1.0, 0.0),
                    (0.8, 40, 1.0, 0.0),
                    (1.0, 40, 0.8, 0.02),
                    (2.0, 5000, 0.95, 0.0),
                ] {
                    let params = SamplingParams {
                        temperature,
                        top_k,
                        top_p,
                        min_p,
                        ..SamplingParams::default()
                    };
                    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let ours = distribution(candidates.keep(&logits, max, &params));
                    let expected = reference(&logits, &params);
                    let ids = |d: &[(u32, f64)]| d.iter().map(|(id, _)| *id).collect::<Vec<_>>();
                    assert_eq!(ids(&ours), ids(&expected), "{vocab} tokens, {params:?}");
                    for ((_, p), (_, q)) in ours.iter().zip(&expected) {
                        assert!((p - q).abs() <= 1e-6 + 1e-5 * q, "{p} vs {q}, {params:?}");
                    }
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 144);
    }

    #[test]
    fn draws_follow_the_kept_probabilities() {
        let logits = [1.0f32, 3.0, 2.0, 0.5, 2.9, -1.0];
        for params in [
            SamplingParams::default(),
            SamplingParams {
                top_p: 0.8,
                ..SamplingParams::default()
            },
            SamplingParams {
                min_p: 0.2,
                ..SamplingParams::default()
            },
        ] {
            let expected = reference(&logits, &params);
            let mut sampler = super::super::Sampler::new(SamplingParams {
                seed: Some(5),
                ..params
            });
            let draws = 40_000;
            let mut counts = [0usize; 6];
            for _ in 0..draws {
                counts[sampler.sample(&mut logits.clone(), &[]) as usize] += 1;
            }
            for (id, count) in counts.iter().enumerate() {
                let p = expected
                    .iter()
                    .find(|(kept, _)| *kept as usize == id)
                    .map_or(0.0, |(_, p)| *p);
                let seen = *count as f64 / draws as f64;
                assert!((seen - p).abs() < 0.01, "token {id}: {seen} drawn, p = {p}");
            }
        }
    }
}
