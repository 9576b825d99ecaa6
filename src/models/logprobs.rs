//! Log probabilities of a step's tokens, from the model's raw logits: before `logit_bias`, the
//! penalties and temperature (vLLM's default, "raw" log probabilities), so a greedy token's
//! log probability is the model's own and does not depend on how the token was sampled.

use super::error::GenerationError;
use super::tokenizer::TextTokenizer;

/// One token with its log probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    /// The token id.
    pub id: u32,
    /// The token decoded alone (a byte-fallback piece of a longer character decodes as U+FFFD).
    pub text: String,
    /// Its natural-log probability under the raw logits.
    pub logprob: f32,
}

/// The log probabilities of one position: the chosen token and the most likely ones.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Logprobs {
    /// The token the sampler chose.
    pub chosen: TokenLogprob,
    /// The `top` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<TokenLogprob>,
}

/// The log-softmax normaliser of `logits` and its `top` largest entries: enough to give any
/// token's log probability once the sampler has chosen one. NaN logits count as impossible.
#[derive(Debug, Clone)]
pub struct Distribution {
    log_total: f64,
    top: Vec<(u32, f32)>,
}

impl Distribution {
    /// Reads `logits` once: their log-sum-exp (summed in f64) and the `top` largest.
    pub fn new(logits: &[f32], top: usize) -> Self {
        let max = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
        let mut sum = 0f64;
        for (id, &logit) in logits.iter().enumerate() {
            if logit.is_nan() {
                continue;
            }
            sum += f64::from(logit - max).exp();
            let beats_last = best.len() < top || best.last().is_some_and(|&(_, l)| logit > l);
            if top > 0 && beats_last {
                let at = best.partition_point(|&(_, l)| l >= logit);
                best.insert(at, (id as u32, logit));
                best.truncate(top);
            }
        }
        Self {
            log_total: f64::from(max) + sum.ln(),
            top: best,
        }
    }

    /// The log probability of a token whose raw logit is `logit`.
    pub fn logprob(&self, logit: f32) -> f32 {
        if logit.is_nan() {
            return f32::NEG_INFINITY;
        }
        (f64::from(logit) - self.log_total) as f32
    }

    /// The chosen token's and the top tokens' log probabilities, with their texts.
    pub fn resolve(
        &self,
        chosen: (u32, f32),
        tokenizer: &TextTokenizer,
    ) -> Result<Logprobs, GenerationError> {
        let entry = |(id, logit): (u32, f32)| -> Result<TokenLogprob, GenerationError> {
            Ok(TokenLogprob {
                id,
                text: tokenizer.decode(&[id])?,
                logprob: self.logprob(logit),
            })
        };
        Ok(Logprobs {
            chosen: entry(chosen)?,
            top: self
                .top
                .iter()
                .map(|&pair| entry(pair))
                .collect::<Result<_, _>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_are_the_log_softmax_and_the_top_come_first() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NAN];
        let d = Distribution::new(&logits, 3);
        let total: f64 = [1.0f64, 3.0, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        for &l in &logits[..4] {
            let expected = (f64::from(l) - total.ln()) as f32;
            assert!((d.logprob(l) - expected).abs() < 1e-6);
        }
        assert_eq!(d.logprob(f32::NAN), f32::NEG_INFINITY);
        let ids: Vec<u32> = d.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [1, 3, 2], "ties keep the lower id first");
        let probabilities: f64 = [1.0f32, 3.0, 2.0, 3.0]
            .iter()
            .map(|&l| f64::from(d.logprob(l)).exp())
            .sum();
        assert!((probabilities - 1.0).abs() < 1e-6);
    }

    #[test]
    fn no_top_tokens_when_none_are_asked_for() {
        assert!(Distribution::new(&[0.5, 0.25], 0).top.is_empty());
        assert_eq!(Distribution::new(&[0.5, 0.25], 5).top.len(), 2);
    }
}
