//! What a cache entry came from: template text, a picture's row, the user's
//! text or a generated token. The prompt builder knows its pieces and tells
//! the cache; policies may read it (docs/policies.md). Stored per layer and
//! slot in the pool and moved with its entry, like the position.

/// One token's kind, packed in 32 bits: the top two bits are the class;
/// for an image row, the next six the picture's index in the prompt and the
/// low 24 the row (cell) within that picture's tokens.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TokenKind(u32);

/// A [`TokenKind`] unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KindClass {
    Template,
    User,
    Generated,
    Image { index: u32, cell: u32 },
}

const CLASS_SHIFT: u32 = 30;
const INDEX_SHIFT: u32 = 24;
const CELL_MASK: u32 = (1 << INDEX_SHIFT) - 1;
const INDEX_MASK: u32 = (1 << (CLASS_SHIFT - INDEX_SHIFT)) - 1;

impl TokenKind {
    /// BOS, the system prompt and the chat template's pieces.
    pub const TEMPLATE: TokenKind = TokenKind(0);
    /// The user's text.
    pub const USER: TokenKind = TokenKind(1 << CLASS_SHIFT);
    /// A token fed back after the prompt.
    pub const GENERATED: TokenKind = TokenKind(2 << CLASS_SHIFT);
    /// The most pictures one prompt can name.
    pub const MAX_IMAGES: usize = INDEX_MASK as usize + 1;
    /// The most rows one picture can have.
    pub const MAX_CELLS: usize = CELL_MASK as usize + 1;

    /// Row `cell` of picture `index`; both are clamped to what fits (the
    /// prompt builder refuses prompts beyond [`Self::MAX_IMAGES`] first).
    pub fn image(index: usize, cell: usize) -> TokenKind {
        let index = index.min(INDEX_MASK as usize) as u32;
        let cell = cell.min(CELL_MASK as usize) as u32;
        TokenKind((3 << CLASS_SHIFT) | (index << INDEX_SHIFT) | cell)
    }

    pub fn class(self) -> KindClass {
        match self.0 >> CLASS_SHIFT {
            0 => KindClass::Template,
            1 => KindClass::User,
            2 => KindClass::Generated,
            _ => KindClass::Image {
                index: (self.0 >> INDEX_SHIFT) & INDEX_MASK,
                cell: self.0 & CELL_MASK,
            },
        }
    }

    pub fn is_image(self) -> bool {
        self.0 >> CLASS_SHIFT == 3
    }

    pub fn is_user(self) -> bool {
        self == TokenKind::USER
    }

    /// Entries of one picture share a merge class; all text (template, user,
    /// generated) shares another.
    pub fn merge_class(self) -> u32 {
        match self.class() {
            KindClass::Image { index, .. } => index + 1,
            _ => 0,
        }
    }

    /// One letter, as the Python reference's fixture writes prompt kinds:
    /// `t`, `u`, `g`, `i`.
    pub fn letter(self) -> char {
        match self.class() {
            KindClass::Template => 't',
            KindClass::User => 'u',
            KindClass::Generated => 'g',
            KindClass::Image { .. } => 'i',
        }
    }
}

impl std::fmt::Debug for TokenKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.class() {
            KindClass::Image { index, cell } => write!(f, "image({index}, {cell})"),
            other => write!(f, "{other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        assert_eq!(TokenKind::TEMPLATE.class(), KindClass::Template);
        assert_eq!(TokenKind::USER.class(), KindClass::User);
        assert_eq!(TokenKind::GENERATED.class(), KindClass::Generated);
        let k = TokenKind::image(2, 48);
        assert_eq!(k.class(), KindClass::Image { index: 2, cell: 48 });
        assert!(k.is_image() && !TokenKind::USER.is_image());
        assert_eq!(k.merge_class(), 3);
        assert_eq!(TokenKind::USER.merge_class(), TokenKind::GENERATED.merge_class());
        let last = TokenKind::image(TokenKind::MAX_IMAGES - 1, TokenKind::MAX_CELLS - 1);
        assert_eq!(
            last.class(),
            KindClass::Image {
                index: (TokenKind::MAX_IMAGES - 1) as u32,
                cell: (TokenKind::MAX_CELLS - 1) as u32
            }
        );
        let letters: String = [TokenKind::TEMPLATE, TokenKind::USER, TokenKind::GENERATED, k]
            .iter()
            .map(|k| k.letter())
            .collect();
        assert_eq!(letters, "tugi");
    }
}
