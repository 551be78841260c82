//! Closed-vocabulary word tokenizer for ShapeWorld prompts.
//!
//! The vocabulary is exactly the set of words the prompt templates can
//! produce, plus `<pad>` (id 0). There is no `<unk>`: a word outside the
//! vocabulary is an error naming the word. Prompts are split on whitespace,
//! lower-cased (ASCII) and padded with `<pad>` to [`MAX_TOKENS`]. The empty
//! prompt tokenizes to all `<pad>`, which can serve as the null condition for
//! classifier-free guidance.

/// Fixed length of every token sequence.
pub const MAX_TOKENS: usize = 16;
/// Id of the padding token `<pad>`.
pub const PAD_ID: u32 = 0;

/// The vocabulary; a word's id is its index.
const VOCAB: [&str; 29] = [
    "<pad>",
    "a",
    "an",
    "and",
    "two",
    "three",
    "to",
    "the",
    "left",
    "right",
    "of",
    "above",
    "below",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "circle",
    "square",
    "triangle",
    "diamond",
    "cross",
    "circles",
    "squares",
    "triangles",
    "diamonds",
    "crosses",
];

/// The vocabulary, indexed by token id.
pub fn vocab() -> &'static [&'static str] {
    &VOCAB
}

/// Number of token ids (including `<pad>`).
pub fn vocab_size() -> usize {
    VOCAB.len()
}

/// Tokenizes `prompt` into exactly [`MAX_TOKENS`] ids (padded with [`PAD_ID`]).
///
/// Errors on a word outside the vocabulary (naming it) or a prompt longer than
/// [`MAX_TOKENS`] words.
pub fn tokenize(prompt: &str) -> Result<Vec<u32>, String> {
    let mut ids = Vec::with_capacity(MAX_TOKENS);
    for word in prompt.split_whitespace() {
        let lower = word.to_ascii_lowercase();
        let id = VOCAB[1..]
            .iter()
            .position(|w| *w == lower && !w.starts_with('<'))
            .ok_or_else(|| format!("unknown word `{word}` in prompt `{prompt}`"))?;
        if ids.len() == MAX_TOKENS {
            return Err(format!(
                "prompt `{prompt}` has more than {MAX_TOKENS} words"
            ));
        }
        ids.push(id as u32 + 1);
    }
    ids.resize(MAX_TOKENS, PAD_ID);
    Ok(ids)
}

/// Turns ids back into the prompt text (padding is dropped).
pub fn detokenize(ids: &[u32]) -> Result<String, String> {
    let mut words = Vec::with_capacity(ids.len());
    for &id in ids {
        let word = VOCAB
            .get(id as usize)
            .ok_or_else(|| format!("token id {id} out of range (vocab size {})", VOCAB.len()))?;
        if id != PAD_ID {
            words.push(*word);
        }
    }
    Ok(words.join(" "))
}

/// Every word the prompt templates can produce (used by tests).
#[cfg(test)]
fn template_words() -> Vec<&'static str> {
    use super::target::{Color, Shape};
    let mut w = vec![
        "a", "an", "and", "two", "three", "to", "the", "left", "right", "of", "above", "below",
    ];
    w.extend(Color::ALL.map(Color::name));
    w.extend(Shape::ALL.map(Shape::name));
    w.extend(Shape::ALL.map(Shape::plural));
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_round_trip_prompts() {
        let p = "an orange triangle to the right of a purple diamond";
        let ids = tokenize(p).unwrap();
        assert_eq!(ids.len(), MAX_TOKENS);
        assert_eq!(ids[10..], [PAD_ID; 6]);
        assert_eq!(detokenize(&ids).unwrap(), p);
        assert_eq!(
            tokenize("Three  RED crosses").unwrap(),
            tokenize("three red crosses").unwrap()
        );
        assert_eq!(tokenize("").unwrap(), vec![PAD_ID; MAX_TOKENS]);
    }

    #[test]
    fn should_cover_template_words_with_unique_ids() {
        for w in template_words() {
            let ids = tokenize(w).unwrap();
            assert_ne!(ids[0], PAD_ID);
            assert_eq!(vocab()[ids[0] as usize], w);
        }
        let mut sorted = VOCAB.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), vocab_size());
    }

    #[test]
    fn should_reject_unknown_words_and_long_prompts() {
        let err = tokenize("a red hexagon").unwrap_err();
        assert!(err.contains("hexagon"), "{err}");
        assert!(tokenize("<pad>").unwrap_err().contains("<pad>"));
        assert!(tokenize(&["a"; MAX_TOKENS + 1].join(" ")).is_err());
        assert!(tokenize(&["a"; MAX_TOKENS].join(" ")).is_ok());
        assert!(detokenize(&[vocab_size() as u32]).is_err());
    }
}
