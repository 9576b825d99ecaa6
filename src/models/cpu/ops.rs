//! The element-wise parts of a Llama-family layer on the CPU: RMSNorm (of rows and of heads),
//! SiLU-gated products, scaled residual adds, biases and the rotary embedding. Each row is
//! computed alone by one thread, in an order that depends only on that row, so a token's
//! result does not depend on the other tokens of its batch.

use rayon::prelude::*;

use super::buffer::zeros;

/// `out = x / rms(x) * weight`, row by row (rows split over the pool's threads).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    match x.len() > n {
        true => x
            .par_chunks_exact(n)
            .zip(out.par_chunks_exact_mut(n))
            .for_each(|(row, o)| norm_row(row, weight, eps, o)),
        false => x
            .chunks_exact(n)
            .zip(out.chunks_exact_mut(n))
            .for_each(|(row, o)| norm_row(row, weight, eps, o)),
    }
}

fn norm_row(row: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = row.iter().map(|v| v * v).sum::<f32>() / weight.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(row).zip(weight) {
        *o = v * scale * w;
    }
}

/// RMSNorm of every head of every row in place (Qwen3's q/k norms): `x` is rows of heads of
/// `weight.len()` values.
pub fn rms_norm_heads(x: &mut [f32], weight: &[f32], eps: f32) {
    let mut row = zeros(weight.len());
    for head in x.chunks_exact_mut(weight.len()) {
        row.copy_from_slice(head);
        norm_row(&row, weight, eps, head);
    }
}

/// `gate = silu(gate) * up`, a row of `width` per token (rows split over the pool's threads).
pub fn silu_times(gate: &mut [f32], up: &[f32], width: usize) {
    let row = |(g, u): (&mut [f32], &[f32])| super::exp::silu_times(g, u);
    match gate.len() > width {
        true => gate
            .par_chunks_mut(width)
            .zip(up.par_chunks(width))
            .for_each(row),
        false => row((gate, up)),
    }
}

/// `x += y * scale` (a residual add; `scale` is 1 but for Granite's residual multiplier).
pub fn add_scaled(x: &mut [f32], y: &[f32], scale: f32) {
    if scale == 1.0 {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
    } else {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b * scale);
    }
}

/// Adds `bias` to every row of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    }
}

/// Which features the rotary embedding pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Features `2i` and `2i + 1` (GGUF Llamas, whose q/k rows llama.cpp's converter permutes).
    Interleaved,
    /// Features `i` and `i + d/2` (HuggingFace's `rotate_half`; GGUF Qwen2/Qwen3).
    Half,
}

/// Llama 3's RoPE scaling (`rope_type = "llama3"`): low frequencies divided by `factor`, high
/// ones kept, a smooth blend between.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// The divisor of the low frequencies.
    pub factor: f32,
    /// Wavelengths above `original / low_freq_factor` are scaled.
    pub low_freq_factor: f32,
    /// Wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f32,
    /// The context length the model was first trained for.
    pub original_max_position_embeddings: f32,
}

/// The rotary embedding of a model: its frequencies and pairing.
#[derive(Debug, Clone)]
pub struct Rope {
    /// One frequency per rotated pair.
    pub inverse_frequencies: Vec<f32>,
    /// The pairing.
    pub style: RopeStyle,
}

impl Rope {
    /// `base^(-2i/head_dim)` for each pair, adjusted by Llama 3 scaling or divided by per-pair
    /// factors (GGUF's `rope_freqs`) when given.
    pub fn new(
        base: f32,
        head_dim: usize,
        style: RopeStyle,
        scaling: Option<Llama3Scaling>,
        divisors: Option<&[f32]>,
    ) -> Rope {
        let mut inverse_frequencies: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
            .collect();
        if let Some(s) = scaling {
            let low = s.original_max_position_embeddings / s.low_freq_factor;
            let high = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inverse_frequencies.iter_mut() {
                let wavelength = 2.0 * std::f32::consts::PI / *f;
                if wavelength > low {
                    *f /= s.factor;
                } else if wavelength >= high {
                    let smooth = (s.original_max_position_embeddings / wavelength
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        if let Some(divisors) = divisors {
            for (f, d) in inverse_frequencies.iter_mut().zip(divisors) {
                *f /= d;
            }
        }
        Rope {
            inverse_frequencies,
            style,
        }
    }

    /// The sines and cosines of every row's position (`positions[t]`), each pair once.
    pub fn angles(&self, positions: &[usize]) -> Angles {
        let pairs = self.inverse_frequencies.len();
        let (mut sin, mut cos) = (
            zeros(positions.len() * pairs),
            zeros(positions.len() * pairs),
        );
        for (t, &position) in positions.iter().enumerate() {
            let pos = position as f32;
            for (i, frequency) in self.inverse_frequencies.iter().enumerate() {
                (sin[t * pairs + i], cos[t * pairs + i]) = (pos * frequency).sin_cos();
            }
        }
        Angles {
            sin,
            cos,
            pairs,
            style: self.style,
        }
    }
}

/// Per-row rotary sines and cosines, shared by every layer and head of a forward pass.
pub struct Angles {
    sin: Vec<f32>,
    cos: Vec<f32>,
    pairs: usize,
    style: RopeStyle,
}

impl Angles {
    /// Rotates every head (of `head_dim` values) of every row of `x` by its row's angles.
    pub fn rotate(&self, x: &mut [f32], heads: usize, head_dim: usize) {
        let p = self.pairs;
        for (t, token) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let (sin, cos) = (&self.sin[t * p..(t + 1) * p], &self.cos[t * p..(t + 1) * p]);
            for head in token.chunks_exact_mut(head_dim) {
                match self.style {
                    RopeStyle::Interleaved => {
                        for ((pair, sin), cos) in head.chunks_exact_mut(2).zip(sin).zip(cos) {
                            let (a, b) = (pair[0], pair[1]);
                            pair[0] = a * cos - b * sin;
                            pair[1] = a * sin + b * cos;
                        }
                    }
                    RopeStyle::Half => {
                        let (first, second) = head.split_at_mut(head_dim / 2);
                        for (((a, b), sin), cos) in first.iter_mut().zip(second).zip(sin).zip(cos) {
                            let (x, y) = (*a, *b);
                            *a = x * cos - y * sin;
                            *b = y * cos + x * sin;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_pairings_rotate_the_same_pairs_by_the_same_angles() {
        let rope = |style| Rope::new(10_000.0, 8, style, None, None);
        let angles = rope(RopeStyle::Interleaved).angles(&[3]);
        let half_angles = rope(RopeStyle::Half).angles(&[3]);
        // Interleaved pairs (0,1),(2,3).. hold what the half layout holds at (0,4),(1,5)..
        let values = [0.1f32, -0.4, 0.7, 0.2, -0.3, 0.5, 0.9, -0.8];
        let mut interleaved = values;
        angles.rotate(&mut interleaved, 1, 8);
        let mut half: Vec<f32> = (0..4)
            .map(|i| values[2 * i])
            .chain((0..4).map(|i| values[2 * i + 1]))
            .collect();
        half_angles.rotate(&mut half, 1, 8);
        for i in 0..4 {
            assert_eq!(interleaved[2 * i], half[i]);
            assert_eq!(interleaved[2 * i + 1], half[i + 4]);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let scaling = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = Rope::new(500_000.0, 128, RopeStyle::Half, None, None);
        let scaled = Rope::new(500_000.0, 128, RopeStyle::Half, Some(scaling), None);
        let (first, last) = (0, plain.inverse_frequencies.len() - 1);
        assert_eq!(
            scaled.inverse_frequencies[first],
            plain.inverse_frequencies[first]
        );
        let ratio = plain.inverse_frequencies[last] / scaled.inverse_frequencies[last];
        assert!((ratio - 8.0).abs() < 1e-4, "{ratio}");
    }
}
