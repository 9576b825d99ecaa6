//! Incremental detokenization: turns a growing list of token ids into text deltas that never
//! end inside a multi-byte character and that concatenate to exactly `decode(all ids)`.
//!
//! The rule is TGI's `decode_token`: decode a short window of recent ids with and without the
//! newest ones, emit the difference, and hold everything back while the window's text ends in
//! U+FFFD (an incomplete UTF-8 sequence that a later token may complete).

use super::error::GenerationError;
use super::tokenizer::TextTokenizer;

/// The Unicode replacement character, produced by lossy decoding of incomplete bytes.
const REPLACEMENT: char = '\u{FFFD}';

/// Incremental detokenizer state for one sequence.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    emitted: String,
}

impl Detokenizer {
    /// Creates an empty detokenizer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text that became final (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String, GenerationError> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if text.len() <= prefix.len() || text.ends_with(REPLACEMENT) || !text.starts_with(&prefix) {
            return Ok(String::new());
        }
        let delta = text[prefix.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.emitted.push_str(&delta);
        Ok(delta)
    }

    /// Returns whatever is still held back, so that everything emitted equals
    /// `decode(all ids)`. Called once, at the end of a sequence.
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String, GenerationError> {
        let full = tokenizer.decode(&self.ids)?;
        let rest = match full.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                return Err(GenerationError::Tokenizer(
                    "incremental detokenization diverged from the full decode".to_string(),
                ))
            }
        };
        self.emitted.push_str(&rest);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::models::demo::demo_tokenizer;

    fn stream(tokenizer: &TextTokenizer, ids: &[u32]) -> Vec<String> {
        let mut detok = Detokenizer::new();
        let mut pieces: Vec<String> = ids
            .iter()
            .map(|&id| detok.push(tokenizer, id).unwrap())
            .collect();
        pieces.push(detok.finish(tokenizer).unwrap());
        pieces
    }

    #[test]
    fn multibyte_characters_split_over_tokens_are_held_back_whole() {
        let tokenizer = demo_tokenizer().unwrap();
        let text = "naïve café — ü 🦀!";
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(
            ids.len(),
            text.len(),
            "the demo tokenizer has one token per byte"
        );
        let pieces = stream(&tokenizer, &ids);
        assert!(
            pieces.iter().all(|piece| !piece.contains(REPLACEMENT)),
            "{pieces:?}"
        );
        assert_eq!(pieces.concat(), text);
        let crab_start = text.find('🦀').unwrap();
        assert_eq!(pieces[crab_start..crab_start + 3], ["", "", ""]);
        assert_eq!(pieces[crab_start + 3], "🦀");
    }

    #[test]
    fn random_byte_tokens_concatenate_to_the_full_decode() {
        let tokenizer = demo_tokenizer().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..300 {
            let len = rng.random_range(1..40);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..263)).collect();
            let pieces = stream(&tokenizer, &ids);
            assert_eq!(pieces.concat(), tokenizer.decode(&ids).unwrap(), "{ids:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]

        /// RELIABILITY.md C5: for text with multi-byte characters split over byte tokens, and
        /// for arbitrary byte tokens, the streamed deltas concatenate to the one-shot decode,
        /// and no delta carries a replacement character the full text does not have.
        #[test]
        fn streamed_deltas_equal_the_one_shot_decode(
            text in "\\PC{0,24}",
            noise in proptest::collection::vec(0u32..263, 0..6),
        ) {
            let tokenizer = demo_tokenizer().unwrap();
            let mut ids = tokenizer.encode(&text, false).unwrap();
            ids.extend(noise);
            let pieces = stream(&tokenizer, &ids);
            let full = tokenizer.decode(&ids).unwrap();
            proptest::prop_assert_eq!(pieces.concat(), full.clone());
            if !full.contains(REPLACEMENT) {
                proptest::prop_assert!(pieces.iter().all(|p| !p.contains(REPLACEMENT)));
            }
        }
    }
}
