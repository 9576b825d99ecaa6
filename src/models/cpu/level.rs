//! Which instruction set the CPU kernels use: detected once, or forced with `LLORCH_CPU_LEVEL`
//! (`avx512`, `avx2` or `scalar`) so every path can be measured and tested on one machine.
//!
//! `avx2` means AVX2, FMA and F16C; `avx512` adds AVX-512 F, BW, VL and VNNI (Intel since Ice
//! Lake, AMD since Zen 4), whose `vpdpbusd` sums four byte products into each 32-bit lane in
//! one instruction. A forced level above what the CPU has falls back to the best it has.

use std::sync::OnceLock;

/// The environment variable that forces a level.
pub const LEVEL_VAR: &str = "LLORCH_CPU_LEVEL";

/// An instruction-set level of the CPU kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust, the reference.
    Scalar,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX2 plus AVX-512 F/BW/VL and VNNI.
    Avx512,
}

impl Level {
    /// The level's name, as `LLORCH_CPU_LEVEL` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    fn parse(name: &str) -> Option<Level> {
        [Level::Scalar, Level::Avx2, Level::Avx512]
            .into_iter()
            .find(|level| level.name() == name.trim().to_ascii_lowercase())
    }
}

/// The best level this CPU runs.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        match (avx2, avx512) {
            (true, true) => Level::Avx512,
            (true, false) => Level::Avx2,
            _ => Level::Scalar,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Level::Scalar
    }
}

/// The level the kernels use: `LLORCH_CPU_LEVEL` if set (at most [`detected`]), else the
/// detected one. Read once per process.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detected();
        let Ok(wanted) = std::env::var(LEVEL_VAR) else {
            return best;
        };
        match Level::parse(&wanted) {
            Some(level) if level <= best => level,
            Some(level) => {
                tracing::warn!(
                    wanted = level.name(),
                    using = best.name(),
                    "{LEVEL_VAR} asks for more than this CPU has"
                );
                best
            }
            None => {
                tracing::warn!(
                    value = wanted,
                    using = best.name(),
                    "{LEVEL_VAR} is not avx512, avx2 or scalar"
                );
                best
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_by_name_and_order_lowest_first() {
        assert_eq!(Level::parse(" AVX512 "), Some(Level::Avx512));
        assert_eq!(Level::parse("avx2"), Some(Level::Avx2));
        assert_eq!(Level::parse("scalar"), Some(Level::Scalar));
        assert_eq!(Level::parse("sse4"), None);
        assert!(Level::Scalar < Level::Avx2 && Level::Avx2 < Level::Avx512);
        assert!(level() <= detected());
    }
}
