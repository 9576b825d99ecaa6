//! Stop strings: text is held back while it could still be the start of a stop string, and a
//! stop string itself is never emitted, also when it straddles several tokens.

/// Filters generated text against a set of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What the matcher lets out for one piece of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that is safe to emit (may be empty while a possible match is held back).
    Continue(String),
    /// A stop string matched: emit this text (what preceded the match) and stop.
    Stopped(String),
}

impl StopMatcher {
    /// Creates a matcher; empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Feeds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return StopOutcome::Continue(std::mem::take(&mut self.pending));
        }
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()))
            .min();
        if let Some(at) = earliest {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(before);
        }
        let hold = self.held_suffix_len();
        let split = self.pending.len() - hold;
        let ready = self.pending[..split].to_string();
        self.pending.drain(..split);
        StopOutcome::Continue(ready)
    }

    /// Returns the text still held back (at the end of a generation that did not stop on a
    /// stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// The length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        self.pending
            .char_indices()
            .map(|(at, _)| &self.pending[at..])
            .find(|suffix| self.stops.iter().any(|stop| stop.starts_with(suffix)))
            .map_or(0, str::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            match matcher.push(piece) {
                StopOutcome::Continue(text) => out.push_str(&text),
                StopOutcome::Stopped(text) => {
                    out.push_str(&text);
                    return (out, true);
                }
            }
        }
        out.push_str(&matcher.flush());
        (out, false)
    }

    #[test]
    fn stop_inside_one_piece() {
        assert_eq!(run(&["END"], &["abc END xyz"]), ("abc ".to_string(), true));
    }

    #[test]
    fn stop_straddling_pieces_is_never_emitted() {
        assert_eq!(
            run(&["</s>"], &["hello <", "/", "s>", "more"]),
            ("hello ".to_string(), true)
        );
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(
            run(&["STOP"], &["ST", "ART", "!"]),
            ("START!".to_string(), false)
        );
    }

    #[test]
    fn held_text_is_flushed_at_the_end() {
        assert_eq!(
            run(&["\n\n"], &["line", "\n"]),
            ("line\n".to_string(), false)
        );
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        assert_eq!(run(&["é!", "b"], &["aé", "!b"]), ("a".to_string(), true));
        assert_eq!(run(&["ü"], &["naïve"]), ("naïve".to_string(), false));
    }
}
