//! Multimodal RoPE (Qwen2-VL, Qwen2.5-VL): each token has three rotary
//! positions, time, height and width.
//!
//! A text token has all three equal. The tokens of a picture whose grid is
//! `rows x cols` image tokens, starting where the next text token would
//! be (`s`), sit at `(s, s + row, s + col)`; the text after it goes on from
//! `s + max(rows, cols)`. So a picture uses `rows x cols` slots of the pool
//! but only `max(rows, cols)` positions: the sequence's positions fall
//! behind its token count by `rows x cols - max(rows, cols)` per picture.
//!
//! The pool keeps each entry's sequence position (its order: what the
//! policies sort, merge and evict by) and the cache counts the positions the
//! pictures skipped ([`crate::kv::KvCache::skipped_positions`]); a token's
//! graph positions are its sequence position minus that count, plus the
//! offsets computed here. A uniform shift of positions (a memory's re-base)
//! turns the three components alike, which is the plain rotation the pool
//! applies to the stored keys, so re-basing stays exact.

use crate::error::{Error, Result};
use crate::kv::{KindClass, TokenKind};

/// The offsets of every token of a prompt from its sequence position,
/// `[time, height, width]`, and the positions the prompt's pictures skip.
///
/// `grids[i]` is picture `i`'s grid in image tokens, `(rows, cols)`; the
/// image tokens of a picture come in row-major order (their `cell`).
pub fn prompt_offsets(kinds: &[TokenKind], grids: &[(usize, usize)], out: &mut Vec<[i64; 3]>) -> Result<usize> {
    out.clear();
    out.reserve(kinds.len());
    let mut skipped = 0usize;
    // The picture being read and the prompt index of its first token.
    let mut open: Option<(u32, usize)> = None;
    for (at, kind) in kinds.iter().enumerate() {
        match kind.class() {
            KindClass::Image { index, cell } => {
                let &(rows, cols) = grids
                    .get(index as usize)
                    .ok_or_else(|| Error::Shape(format!("the prompt names picture {index} of {}", grids.len())))?;
                let first = match open {
                    Some((open_index, first)) if open_index == index => first,
                    _ => {
                        close(&mut open, grids, &mut skipped);
                        open = Some((index, at));
                        at
                    }
                };
                let cell = cell as usize;
                if cell != at - first || cell >= rows * cols {
                    return Err(Error::Shape(format!(
                        "picture {index}'s token {cell} is out of its {rows} x {cols} grid's order"
                    )));
                }
                // Its sequence position is the picture's start plus `cell`;
                // its time position is the picture's start.
                let back = -((cell + skipped) as i64);
                out.push([back, back + (cell / cols) as i64, back + (cell % cols) as i64]);
            }
            _ => {
                close(&mut open, grids, &mut skipped);
                let back = -(skipped as i64);
                out.push([back; 3]);
            }
        }
    }
    close(&mut open, grids, &mut skipped);
    Ok(skipped)
}

/// Ends the picture being read: the positions it skipped are counted.
fn close(open: &mut Option<(u32, usize)>, grids: &[(usize, usize)], skipped: &mut usize) {
    if let Some((index, _)) = open.take() {
        // `index` was looked up in `grids` when the picture opened.
        let (rows, cols) = grids[index as usize];
        *skipped += rows * cols - rows.max(cols);
    }
}

/// Writes `[3][T]` graph positions for `T = bases.len()` tokens: the
/// token's sequence position in the pool's terms (`bases`), less the
/// positions skipped before this prompt, plus its offset.
pub fn fill_positions(bases: &[i64], skipped_before: usize, offsets: &[[i64; 3]], out: &mut Vec<i64>) {
    let t = bases.len();
    out.clear();
    out.resize(3 * t, 0);
    for (i, (&base, offset)) in bases.iter().zip(offsets).enumerate() {
        for (row, &delta) in offset.iter().enumerate() {
            out[row * t + i] = base - skipped_before as i64 + delta;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(index: u32, cells: u32) -> impl Iterator<Item = TokenKind> {
        (0..cells).map(move |cell| TokenKind::image(index as usize, cell as usize))
    }

    /// The positions Hugging Face's `get_rope_index` gives, written out by
    /// hand for a prompt of 2 text tokens, a 2 x 3 picture, 1 text token, a
    /// 1 x 2 picture and 1 text token.
    #[test]
    fn offsets_give_the_positions_of_get_rope_index() {
        let text = TokenKind::TEMPLATE;
        let kinds: Vec<TokenKind> = [text, text]
            .into_iter()
            .chain(image(0, 6))
            .chain([text])
            .chain(image(1, 2))
            .chain([text])
            .collect();
        let mut offsets = Vec::new();
        let skipped = prompt_offsets(&kinds, &[(2, 3), (1, 2)], &mut offsets).unwrap();
        // 6 - 3 for the first picture, 2 - 2 for the second
        assert_eq!(skipped, 3);
        let bases: Vec<i64> = (0..kinds.len() as i64).collect();
        let mut graph = Vec::new();
        fill_positions(&bases, 0, &offsets, &mut graph);
        let n = kinds.len();
        let (t, h, w) = (&graph[..n], &graph[n..2 * n], &graph[2 * n..]);
        assert_eq!(t, [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 6, 8]);
        assert_eq!(h, [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 6, 8]);
        assert_eq!(w, [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn text_only_prompts_are_plain_rope() {
        let kinds = vec![TokenKind::USER; 4];
        let mut offsets = Vec::new();
        assert_eq!(prompt_offsets(&kinds, &[], &mut offsets).unwrap(), 0);
        let mut graph = Vec::new();
        fill_positions(&[7, 8, 9, 10], 2, &offsets, &mut graph);
        assert_eq!(graph, [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8]);
    }

    #[test]
    fn a_picture_without_its_grid_or_out_of_order_is_refused() {
        let mut offsets = Vec::new();
        let kinds: Vec<TokenKind> = image(0, 2).collect();
        assert!(prompt_offsets(&kinds, &[], &mut offsets).is_err());
        let swapped = [TokenKind::image(0, 1), TokenKind::image(0, 0)];
        assert!(prompt_offsets(&swapped, &[(1, 2)], &mut offsets).is_err());
        assert!(
            prompt_offsets(&kinds, &[(1, 1)], &mut offsets).is_err(),
            "more cells than the grid"
        );
    }
}
