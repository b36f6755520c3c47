//! ROUGE-L F-measure as the Python package `rouge` 1.0.1 computes
//! `get_scores(hyp, ref)[0]["rouge-l"]["f"]` (the implementation the Elastic
//! Cache paper used), quirks included, so our numbers compare with theirs:
//!
//! - sentences are the pieces of the text split on `.`, empty pieces
//!   dropped, each piece's whitespace runs collapsed to single spaces (a
//!   piece of only spaces stays, as one empty word);
//! - words are case-sensitive and counted once each (`m`, `n` are the
//!   numbers of *distinct* words of the reference and the hypothesis);
//! - the overlap is the number of distinct words in the union of the
//!   longest common subsequences of every reference sentence with every
//!   hypothesis sentence (ties in the LCS walk resolved as the package does);
//! - `f = 2 p r / (p + r + 1e-8)`.

use std::collections::HashSet;

/// ROUGE-L F of `hypothesis` against `reference`; `None` where the package
/// raises (a text with no sentence, e.g. empty or only dots).
pub fn rouge_l_f(hypothesis: &str, reference: &str) -> Option<f64> {
    let hypothesis = sentences(hypothesis);
    let reference = sentences(reference);
    if hypothesis.is_empty() || reference.is_empty() {
        return None;
    }
    let distinct = |sentences: &[Vec<&str>]| sentences.iter().flatten().collect::<HashSet<_>>().len();
    let (m, n) = (distinct(&reference), distinct(&hypothesis));
    let mut union: HashSet<&str> = HashSet::new();
    let mut table = Vec::new();
    for reference_sentence in &reference {
        for hypothesis_sentence in &hypothesis {
            lcs_words(reference_sentence, hypothesis_sentence, &mut table, &mut union);
        }
    }
    let overlap = union.len() as f64;
    let recall = overlap / m as f64;
    let precision = overlap / n as f64;
    Some(2.0 * ((precision * recall) / (precision + recall + 1e-8)))
}

/// The text's sentences as word lists (see the module documentation).
fn sentences(text: &str) -> Vec<Vec<&str>> {
    text.split('.')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let words: Vec<&str> = piece.split_whitespace().collect();
            if words.is_empty() {
                vec![""]
            } else {
                words
            }
        })
        .collect()
}

/// Adds the words of one longest common subsequence of `x` and `y` to
/// `union`, walking back the DP table the way the package does: a match
/// goes diagonally, else up when the cell above is strictly larger, else
/// left.
fn lcs_words<'a>(x: &[&'a str], y: &[&str], table: &mut Vec<u32>, union: &mut HashSet<&'a str>) {
    let width = y.len() + 1;
    table.clear();
    table.resize((x.len() + 1) * width, 0);
    for i in 1..=x.len() {
        for j in 1..=y.len() {
            table[i * width + j] = if x[i - 1] == y[j - 1] {
                table[(i - 1) * width + j - 1] + 1
            } else {
                table[(i - 1) * width + j].max(table[i * width + j - 1])
            };
        }
    }
    let (mut i, mut j) = (x.len(), y.len());
    while i > 0 && j > 0 {
        if x[i - 1] == y[j - 1] {
            union.insert(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if table[(i - 1) * width + j] > table[i * width + j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_python_package_on_its_test_vectors() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/rouge_vectors.json");
        let data: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let vectors = data["vectors"].as_array().unwrap();
        assert!(vectors.len() > 300);
        for vector in vectors {
            let (hyp, reference) = (vector["hyp"].as_str().unwrap(), vector["ref"].as_str().unwrap());
            let got = rouge_l_f(hyp, reference);
            match vector["f"].as_f64() {
                None => assert_eq!(got, None, "{hyp:?} vs {reference:?}"),
                Some(expected) => {
                    let got = got.unwrap_or(f64::NAN);
                    assert!(
                        (got - expected).abs() < 1e-9,
                        "{hyp:?} vs {reference:?}: {got} != {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn identical_text_scores_one_and_disjoint_zero() {
        assert!((rouge_l_f("a cat sits", "a cat sits").unwrap() - 1.0).abs() < 1e-7);
        assert_eq!(rouge_l_f("a b", "c d"), Some(0.0));
        assert_eq!(rouge_l_f("", "a"), None);
    }
}
