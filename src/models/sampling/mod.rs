//! Token sampling: logit bias, repetition, presence and frequency penalties, temperature,
//! top-k, top-p, min-p, seeded RNG.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cpu::exp::max_value;
use super::error::GenerationError;
use candidates::Candidates;

mod candidates;
mod device;

pub use device::{Adjustment, DeviceDraw, MAX_DEVICE_TOP_K};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this (1 = off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f32,
    /// HuggingFace-style penalty on every token already in the sequence (1 = off).
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted once from the logit of every token generated so far (0 = off).
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated (0 = off).
    pub frequency_penalty: f32,
    /// RNG seed; the same seed gives the same tokens. `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Added to the logits of these token ids before anything else (ids past the vocabulary
    /// are ignored).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), GenerationError> {
        let invalid = |param: &'static str, reason: &str| {
            Err(GenerationError::InvalidParameter {
                param,
                reason: reason.to_string(),
            })
        };
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return invalid("temperature", "must be in [0, 2]");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("top_p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid("min_p", "must be in [0, 1]");
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return invalid("repetition_penalty", "must be a finite number > 0");
        }
        if !(-MAX_PENALTY..=MAX_PENALTY).contains(&self.presence_penalty) {
            return invalid("presence_penalty", "must be in [-2, 2]");
        }
        if !(-MAX_PENALTY..=MAX_PENALTY).contains(&self.frequency_penalty) {
            return invalid("frequency_penalty", "must be in [-2, 2]");
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return invalid("logit_bias", "at most 300 token biases are allowed");
        }
        if self
            .logit_bias
            .iter()
            .any(|(_, bias)| !(-100.0..=100.0).contains(bias))
        {
            return invalid("logit_bias", "each bias must be in [-100, 100]");
        }
        Ok(())
    }
}

/// Highest accepted temperature.
pub const MAX_TEMPERATURE: f32 = 2.0;
/// Most `logit_bias` entries.
pub const MAX_LOGIT_BIAS: usize = 300;
/// Largest presence or frequency penalty, either sign (OpenAI's range).
pub const MAX_PENALTY: f32 = 2.0;

/// What limits the tokens a sampler may choose: a grammar's matcher.
pub trait Constrain {
    /// Why the constraint failed.
    type Error;
    /// Whether `token` may come next.
    fn allows(&mut self, token: u32) -> Result<bool, Self::Error>;
    /// Sets every logit of a token that may not come next to −∞.
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), Self::Error>;
}

/// Chooses tokens from logits, with its own seeded RNG.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    candidates: Candidates,
    /// How often each token was drawn, for the presence and frequency penalties (kept only
    /// when one of them is set).
    drawn: HashMap<u32, u32>,
}

impl Sampler {
    /// Creates a sampler; the RNG is seeded from `params.seed` or from the OS.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            candidates: Candidates::default(),
            drawn: HashMap::new(),
        }
    }

    /// Picks the next token. `previous` is every token of the sequence so far (prompt and
    /// generated), for the repetition penalty; the presence and frequency penalties count
    /// only the tokens this sampler drew (the generated ones, as OpenAI and vLLM define
    /// them). A NaN logit is never drawn; logits with no finite maximum are decided greedily.
    pub fn sample(&mut self, logits: &mut [f32], previous: &[u32]) -> u32 {
        self.adjust(logits, previous);
        let token = self.choose(logits);
        self.record(token);
        token
    }

    /// Picks the next token under a constraint (a grammar). With no truncation (top-k, top-p
    /// and min-p off), a token is first drawn from all the logits and kept when the
    /// constraint allows it: such a draw is distributed as a draw from the masked
    /// logits (and the greedy choice is the same), so the mask is computed only when the
    /// first draw is refused, as llama.cpp's sampler does. Otherwise the mask comes first.
    pub fn sample_constrained<C: Constrain>(
        &mut self,
        logits: &mut [f32],
        previous: &[u32],
        constraint: &mut C,
    ) -> Result<u32, C::Error> {
        self.adjust(logits, previous);
        let p = &self.params;
        let whole = p.top_k == 0 && p.top_p >= 1.0 && p.min_p == 0.0;
        let token = match whole {
            true => {
                let first = self.choose(logits);
                match constraint.allows(first)? {
                    true => first,
                    false => {
                        constraint.mask(logits)?;
                        self.choose(logits)
                    }
                }
            }
            false => {
                constraint.mask(logits)?;
                self.choose(logits)
            }
        };
        self.record(token);
        Ok(token)
    }

    /// Applies the logit biases and the penalties.
    fn adjust(&self, logits: &mut [f32], previous: &[u32]) {
        for (id, bias) in &self.params.logit_bias {
            if let Some(logit) = logits.get_mut(*id as usize) {
                *logit += bias;
            }
        }
        if self.params.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, previous, self.params.repetition_penalty);
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        for (&id, &count) in &self.drawn {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit -= presence + frequency * count as f32;
            }
        }
    }

    /// Counts a chosen token for the presence and frequency penalties.
    fn record(&mut self, token: u32) {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            *self.drawn.entry(token).or_default() += 1;
        }
    }

    fn choose(&mut self, logits: &mut [f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let max = max_value(logits);
        if !max.is_finite() {
            return argmax(logits);
        }
        let fraction = self.rng.random::<f64>();
        self.candidates
            .keep(logits, max, &self.params)
            .draw(fraction)
    }
}

/// Divides positive logits and multiplies negative ones by `penalty` for every distinct token
/// in `previous` (transformers' `RepetitionPenaltyLogitsProcessor`).
fn apply_repetition_penalty(logits: &mut [f32], previous: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &id in previous {
        let Some(slot) = seen.get_mut(id as usize) else {
            continue;
        };
        if std::mem::replace(slot, true) {
            continue;
        }
        let logit = &mut logits[id as usize];
        *logit = if *logit < 0.0 {
            *logit * penalty
        } else {
            *logit / penalty
        };
    }
}

/// Index of the largest logit; the first one wins ties, as `torch.argmax` does (NaN is never
/// the largest; 0 when every logit is NaN).
pub fn argmax(logits: &[f32]) -> u32 {
    let max = max_value(logits);
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::candidates::Kept;
    use super::*;

    /// Allows the even token ids and counts its masks.
    struct Evens {
        masks: usize,
    }

    impl Constrain for Evens {
        type Error = ();

        fn allows(&mut self, token: u32) -> Result<bool, ()> {
            Ok(token.is_multiple_of(2))
        }

        fn mask(&mut self, logits: &mut [f32]) -> Result<(), ()> {
            self.masks += 1;
            logits
                .iter_mut()
                .skip(1)
                .step_by(2)
                .for_each(|l| *l = f32::NEG_INFINITY);
            Ok(())
        }
    }

    /// Drawing from all the logits first and masking only on a refusal gives the masked
    /// distribution: over 40 000 seeded draws each allowed token's frequency is its masked
    /// probability, no refused token comes out, and most draws need no mask.
    #[test]
    fn a_refused_first_draw_falls_back_to_the_masked_distribution() {
        let logits = [1.0f32, 2.0, 0.5, 1.5, 0.0, 2.5];
        let allowed = [0usize, 2, 4];
        let total: f64 = allowed.iter().map(|&i| f64::from(logits[i]).exp()).sum();
        let mut sampler = Sampler::new(SamplingParams {
            seed: Some(3),
            ..SamplingParams::default()
        });
        let mut constraint = Evens { masks: 0 };
        let mut counts = [0usize; 6];
        let draws = 40_000;
        for _ in 0..draws {
            let mut row = logits.to_vec();
            let token = sampler
                .sample_constrained(&mut row, &[], &mut constraint)
                .unwrap();
            counts[token as usize] += 1;
        }
        for (i, &count) in counts.iter().enumerate() {
            let expected = match allowed.contains(&i) {
                true => f64::from(logits[i]).exp() / total,
                false => 0.0,
            };
            let got = count as f64 / draws as f64;
            assert!(
                (got - expected).abs() < 0.01,
                "token {i}: {got} against {expected}"
            );
        }
        assert!(constraint.masks < draws, "{} masks", constraint.masks);
        assert!(constraint.masks > 0);
    }

    #[test]
    fn greedy_and_truncated_sampling_under_a_constraint() {
        let logits = [1.0f32, 2.0, 0.5, 1.5, 0.0, 2.5];
        let mut greedy = Sampler::new(SamplingParams::greedy());
        let mut constraint = Evens { masks: 0 };
        let token = greedy
            .sample_constrained(&mut logits.to_vec(), &[], &mut constraint)
            .unwrap();
        assert_eq!(
            (token, constraint.masks),
            (0, 1),
            "the best allowed, after a refusal"
        );
        let mut top_p = Sampler::new(SamplingParams {
            top_p: 0.9,
            seed: Some(1),
            ..SamplingParams::default()
        });
        let mut constraint = Evens { masks: 0 };
        for _ in 0..50 {
            let token = top_p
                .sample_constrained(&mut logits.to_vec(), &[], &mut constraint)
                .unwrap();
            assert!(token.is_multiple_of(2));
        }
        assert_eq!(constraint.masks, 50, "truncation masks first");
    }

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut sampler = Sampler::new(SamplingParams::greedy());
        assert_eq!(sampler.sample(&mut logits(), &[]), 1);
        assert_eq!(argmax(&[2.0, 5.0, 5.0]), 1);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut values = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut values, &[0, 1, 0], 2.0);
        assert_eq!(values, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn penalty_changes_the_greedy_choice() {
        let params = SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::greedy()
        };
        let mut sampler = Sampler::new(params);
        assert_eq!(sampler.sample(&mut logits(), &[1]), 4);
    }

    #[test]
    fn presence_and_frequency_penalties_count_only_drawn_tokens() {
        // Logits 1, 3, 2, 0.5, 2.9: greedy takes 1; the prompt's tokens are not penalised.
        let params = SamplingParams {
            presence_penalty: 0.05,
            frequency_penalty: 0.1,
            ..SamplingParams::greedy()
        };
        let mut sampler = Sampler::new(params);
        assert_eq!(sampler.sample(&mut logits(), &[1, 1, 1, 4]), 1);
        // Token 1 drawn once: 3 - 0.05 - 0.1 = 2.85 < 2.9.
        assert_eq!(sampler.sample(&mut logits(), &[1, 1, 1, 4, 1]), 4);
        // 1 at 2.85, 4 at 2.9 - 0.15 = 2.75: 1 again.
        assert_eq!(sampler.sample(&mut logits(), &[]), 1);
        // 1 drawn twice, 4 once: each loses the presence penalty once and the frequency
        // penalty per draw.
        let mut values = logits();
        sampler.sample(&mut values, &[]);
        assert_eq!(values[1], 3.0 - (0.05 + 0.1 * 2.0));
        assert_eq!(values[4], 2.9 - (0.05 + 0.1));
        assert_eq!(values[2], 2.0);
    }

    #[test]
    fn a_negative_presence_penalty_favours_drawn_tokens() {
        let params = SamplingParams {
            presence_penalty: -2.0,
            ..SamplingParams::greedy()
        };
        let mut sampler = Sampler::new(params);
        let mut first = [1.0, 3.0, 2.0];
        assert_eq!(sampler.sample(&mut first, &[]), 1);
        assert_eq!(sampler.sample(&mut [1.0, 0.5, 2.0], &[]), 1);
    }

    #[test]
    fn logit_bias_moves_the_greedy_choice() {
        let params = SamplingParams {
            logit_bias: vec![(2, 100.0), (99, 5.0)],
            ..SamplingParams::greedy()
        };
        assert_eq!(Sampler::new(params).sample(&mut logits(), &[]), 2);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let params = SamplingParams {
            top_k: 1,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params);
        for _ in 0..20 {
            assert_eq!(sampler.sample(&mut logits(), &[]), 1);
        }
    }

    /// The ids `params` keeps of `logits`, in the order they are drawn from.
    fn kept_ids(params: SamplingParams, logits: &[f32]) -> Vec<u32> {
        let mut candidates = Candidates::default();
        match candidates.keep(logits, max_value(logits), &params) {
            Kept::All { weights, floor, .. } => (0..weights.len() as u32)
                .filter(|&id| weights[id as usize] >= floor)
                .collect(),
            Kept::List { tokens, .. } => tokens.iter().map(|(id, _)| *id).collect(),
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let top_p = SamplingParams {
            top_p: 0.5,
            ..SamplingParams::default()
        };
        assert_eq!(kept_ids(top_p, &logits()), vec![1, 4]);
        let min_p = SamplingParams {
            min_p: 0.3,
            ..SamplingParams::default()
        };
        assert_eq!(kept_ids(min_p, &logits()), vec![1, 2, 4]);
        let top_k = SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        };
        assert_eq!(kept_ids(top_k, &logits()), vec![1, 4]);
    }

    #[test]
    fn nan_logits_are_never_drawn() {
        for params in [
            SamplingParams::default(),
            SamplingParams {
                top_k: 2,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.9,
                ..SamplingParams::default()
            },
        ] {
            let mut sampler = Sampler::new(params);
            for _ in 0..200 {
                assert_ne!(sampler.sample(&mut [0.5, f32::NAN, 2.0], &[]), 1);
            }
            assert_eq!(sampler.sample(&mut [f32::NAN, f32::NAN], &[]), 0);
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 1.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let draw = |seed| {
            let mut sampler = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..SamplingParams::default()
            });
            let flat = vec![0.0f32; 64];
            (0..32)
                .map(|_| sampler.sample(&mut flat.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                min_p: 2.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 2.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                logit_bias: vec![(1, 101.0)],
                ..SamplingParams::default()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                frequency_penalty: f32::NAN,
                ..SamplingParams::default()
            },
        ];
        let names: Vec<String> = bad
            .iter()
            .map(|p| p.validate().unwrap_err().to_string())
            .collect();
        for (message, name) in names.iter().zip([
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "temperature",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
        ]) {
            assert!(message.contains(name), "{message}");
        }
    }
}
