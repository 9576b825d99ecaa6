//! What a model on a GPU needs to choose a sequence's next token where its logits lie, exactly
//! as [`Sampler::sample`] would choose it from the same logits: the sampler's adjustments of
//! the logits as a list, its temperature and min-p, and the fraction its RNG would draw next.
//! The RNG stays on the host: the fraction is read from a copy of it, and the sampler
//! advances its own only when the device reports that the draw used the fraction.

use std::collections::HashSet;

use rand::Rng;

use super::candidates::SORT_ALL;
use super::Sampler;

/// The largest top-k a device draws with (`MAX_TOP_K` in the CUDA sampler): a top-k that
/// keeps a vocabulary this short whole still sorts it on the host, as the device does.
pub const MAX_DEVICE_TOP_K: usize = SORT_ALL;

/// One change to one logit, in the order the sampler makes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Adjustment {
    /// Adds the value (a logit bias).
    Add(u32, f32),
    /// Divides a positive logit by the value and multiplies a negative one (the repetition
    /// penalty).
    Repeat(u32, f32),
    /// Subtracts the value (the presence and frequency penalties of a drawn token).
    Subtract(u32, f32),
}

/// A sequence's next draw, for a device that samples ([`crate::models::batch::Choice::Draw`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDraw {
    /// The argmax of the adjusted logits (temperature 0) instead of a draw.
    pub greedy: bool,
    /// `1 / temperature` (0 when greedy).
    pub inverse_temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all), at most [`MAX_DEVICE_TOP_K`].
    pub top_k: u32,
    /// Then only the most likely of them that reach this share of their weight (1: all).
    pub top_p: f32,
    /// Tokens less likely than this times the most likely one are out.
    pub min_p: f32,
    /// Where in `[0, 1)` of the kept weight the draw falls: the RNG's next `f64`.
    pub fraction: f64,
    /// The logit bias, then the repetition penalty, then the presence and frequency penalties.
    pub adjustments: Vec<Adjustment>,
}

impl Sampler {
    /// The next draw as a device makes it, when the device's sampler covers these settings:
    /// greedy; no top-k, with any top-p and min-p (the draw walks the weights of the tokens
    /// at or above one floor in id order; top-p's floor is found on sums in a fixed order,
    /// which the device bisects); or a top-k of at most [`MAX_DEVICE_TOP_K`] tokens, with any
    /// top-p and min-p (the draw walks the kept tokens most likely first, an order the device
    /// reproduces). `None` for a wider top-k. `previous` as in [`Sampler::sample`].
    pub fn device_draw(&self, previous: &[u32]) -> Option<DeviceDraw> {
        let p = &self.params;
        let greedy = p.temperature == 0.0;
        if !greedy && p.top_k > MAX_DEVICE_TOP_K {
            return None;
        }
        let mut adjustments: Vec<Adjustment> = p
            .logit_bias
            .iter()
            .map(|&(id, bias)| Adjustment::Add(id, bias))
            .collect();
        if p.repetition_penalty != 1.0 {
            let mut seen = HashSet::new();
            adjustments.extend(
                previous
                    .iter()
                    .filter(|id| seen.insert(**id))
                    .map(|&id| Adjustment::Repeat(id, p.repetition_penalty)),
            );
        }
        let (presence, frequency) = (p.presence_penalty, p.frequency_penalty);
        adjustments.extend(
            self.drawn
                .iter()
                .map(|(&id, &count)| Adjustment::Subtract(id, presence + frequency * count as f32)),
        );
        Some(DeviceDraw {
            greedy,
            inverse_temperature: if greedy { 0.0 } else { 1.0 / p.temperature },
            top_k: p.top_k as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            fraction: self.rng.clone().random::<f64>(),
            adjustments,
        })
    }

    /// Takes the token a device chose from this sampler's [`Sampler::device_draw`]:
    /// advances the RNG past the fraction when the draw used it (a greedy choice, or logits
    /// with no finite maximum, do not) and counts the token for the penalties.
    pub fn take_drawn(&mut self, token: u32, used_fraction: bool) {
        if used_fraction {
            let _: f64 = self.rng.random();
        }
        self.record(token);
    }
}

#[cfg(test)]
mod tests {
    use super::super::SamplingParams;
    use super::*;

    /// A sampler that hands its draws to a device and takes back the tokens stays in step with
    /// one that samples on the host: each draw's fraction is the one the host's RNG gives
    /// next (also after steps whose logits had no finite maximum, which draw nothing), the
    /// penalties count the same tokens, and the two then sample alike.
    #[test]
    fn device_draws_keep_the_sampler_in_step_with_the_host() {
        let params = SamplingParams {
            temperature: 0.8,
            min_p: 0.02,
            repetition_penalty: 1.3,
            presence_penalty: 0.4,
            frequency_penalty: 0.2,
            logit_bias: vec![(3, 1.5), (900, 2.0)],
            seed: Some(9),
            ..SamplingParams::default()
        };
        let mut host = Sampler::new(params.clone());
        let mut device = Sampler::new(params);
        let finite: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut previous = vec![4u32, 4, 7];
        for step in 0..40 {
            let draw = device
                .device_draw(&previous)
                .expect("top-k and top-p are off");
            assert_eq!(
                draw.fraction,
                host.rng.clone().random::<f64>(),
                "step {step}"
            );
            let distinct: HashSet<_> = previous.iter().collect();
            let repeats = draw
                .adjustments
                .iter()
                .filter(|a| matches!(a, Adjustment::Repeat(..)))
                .count();
            assert_eq!(repeats, distinct.len());
            assert_eq!(
                draw.adjustments[..2],
                [Adjustment::Add(3, 1.5), Adjustment::Add(900, 2.0)]
            );
            let drawable = step % 5 != 4;
            let mut logits = match drawable {
                true => finite.clone(),
                false => vec![f32::NEG_INFINITY; 50],
            };
            let token = host.sample(&mut logits, &previous);
            device.take_drawn(token, drawable);
            assert_eq!(device.drawn, host.drawn, "step {step}");
            previous.push(token);
        }
        assert_eq!(
            device.sample(&mut finite.clone(), &previous),
            host.sample(&mut finite.clone(), &previous),
        );
    }

    #[test]
    fn only_a_wide_top_k_stays_on_the_host() {
        let wide = SamplingParams {
            top_k: MAX_DEVICE_TOP_K + 1,
            ..SamplingParams::default()
        };
        assert_eq!(Sampler::new(wide).device_draw(&[]), None);
        for (top_k, top_p, min_p) in [(40, 0.9, 0.05), (0, 0.9, 0.0), (0, 0.5, 0.1)] {
            let draw = Sampler::new(SamplingParams {
                top_k,
                top_p,
                min_p,
                ..SamplingParams::default()
            })
            .device_draw(&[])
            .expect("drawn on the device");
            assert_eq!(
                (draw.top_k, draw.top_p, draw.min_p),
                (top_k as u32, top_p, min_p)
            );
        }
        let greedy = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..SamplingParams::greedy()
        })
        .device_draw(&[1])
        .unwrap();
        assert!(greedy.greedy);
        assert!(greedy.adjustments.is_empty());
    }
}
