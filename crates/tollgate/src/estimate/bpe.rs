//! A byte-pair encoder over the o200k vocabulary that keeps the vocabulary where the binary
//! already has it. tiktoken-rs held an encoder map, a decoder map and a sorted token list of
//! owned `Vec<u8>`s: 54 MB of heap for 200 000 tokens, the largest part of the gateway's
//! resident memory. Here the packed vocabulary stays in the binary's read-only data and the
//! index is one `u32` per token plus an open-addressed table of ranks (about 3 MB together).
//! Only counts matter to an estimate, but `encode` returns the ranks so a test can hold this
//! encoder to tiktoken's token for token.

use fancy_regex::Regex;

/// One length byte then the token's bytes, for each rank from 0 up (assets/o200k_pack.py).
static PACKED: &[u8] = include_bytes!("../../assets/o200k_base.bin");

/// o200k's pre-split (tiktoken's pattern for the GPT-4o family): the merge never crosses
/// these pieces, so each is encoded on its own.
const PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);

const NONE: u32 = u32::MAX;

pub(crate) struct Bpe {
    /// Where each rank's bytes start in `PACKED` (its length is the byte before).
    starts: Vec<u32>,
    /// rank + 1 at the slot its bytes hash to (linear probing); 0 is empty.
    slots: Vec<u32>,
    split: Regex,
}

/// A regex failure (fancy-regex gives up past its backtrack limit) ends the count: the
/// caller falls back to a byte-based guess for that text.
#[derive(Debug)]
pub(crate) struct SplitFailed;

impl Bpe {
    pub(crate) fn load() -> Result<Bpe, String> {
        let mut starts = Vec::with_capacity(200_000);
        let mut at = 0usize;
        while at < PACKED.len() {
            let len = usize::from(PACKED[at]);
            let start = at + 1;
            if len == 0 || start + len > PACKED.len() {
                return Err(format!("the packed vocabulary is cut at byte {at}"));
            }
            starts.push(u32::try_from(start).map_err(|e| e.to_string())?);
            at = start + len;
        }
        // Under half full keeps probe chains short; a power of two makes the slot a mask.
        let cap = (starts.len() * 2).next_power_of_two();
        let mut bpe = Bpe {
            starts,
            slots: vec![0; cap],
            split: Regex::new(PATTERN).map_err(|e| e.to_string())?,
        };
        for rank in 0..bpe.starts.len() as u32 {
            let mask = bpe.slots.len() - 1;
            let mut slot = hash(bpe.token(rank)) as usize & mask;
            while bpe.slots[slot] != 0 {
                if bpe.token(bpe.slots[slot] - 1) == bpe.token(rank) {
                    return Err(format!("rank {rank} repeats an earlier token"));
                }
                slot = (slot + 1) & mask;
            }
            bpe.slots[slot] = rank + 1;
        }
        Ok(bpe)
    }

    fn token(&self, rank: u32) -> &'static [u8] {
        let start = self.starts[rank as usize] as usize;
        let len = usize::from(PACKED[start - 1]);
        &PACKED[start..start + len]
    }

    fn rank(&self, bytes: &[u8]) -> u32 {
        let mask = self.slots.len() - 1;
        let mut slot = hash(bytes) as usize & mask;
        loop {
            match self.slots[slot] {
                0 => return NONE,
                r if self.token(r - 1) == bytes => return r - 1,
                _ => slot = (slot + 1) & mask,
            }
        }
    }

    /// How many tokens `text` encodes to (special tokens are not recognised: ordinary text).
    pub(crate) fn count(&self, text: &str) -> Result<u64, SplitFailed> {
        let mut parts = Vec::new();
        let mut n = 0u64;
        for piece in self.split.find_iter(text) {
            let piece = piece.map_err(|_| SplitFailed)?.as_str().as_bytes();
            n += self.merge(piece, &mut parts) as u64;
        }
        Ok(n)
    }

    #[cfg(test)]
    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let mut parts = Vec::new();
        let mut out = Vec::new();
        for piece in self.split.find_iter(text) {
            let piece = piece.unwrap().as_str().as_bytes();
            let n = self.merge(piece, &mut parts);
            if n == 1 {
                out.push(self.rank(piece));
            } else {
                out.extend(parts.windows(2).map(|w: &[(usize, u32)]| {
                    let r = self.rank(&piece[w[0].0..w[1].0]);
                    assert_ne!(r, NONE, "a merged part is not a token");
                    r
                }));
            }
        }
        out
    }

    /// Merges `piece` the way BPE does (always the adjacent pair of lowest rank, leftmost on
    /// a tie) and returns how many tokens are left. `parts` is scratch: (start of a part,
    /// rank of that part joined with the next one). Every single byte is a token in o200k,
    /// so the merge always ends in tokens.
    fn merge(&self, piece: &[u8], parts: &mut Vec<(usize, u32)>) -> usize {
        if piece.len() <= 1 {
            return piece.len();
        }
        if self.rank(piece) != NONE {
            return 1;
        }
        parts.clear();
        parts.extend((0..piece.len()).map(|i| {
            let pair = piece.get(i..i + 2).map_or(NONE, |p| self.rank(p));
            (i, pair)
        }));
        parts.push((piece.len(), NONE));
        let joined = |parts: &[(usize, u32)], i: usize| match parts.get(i + 2) {
            Some(&(end, _)) => self.rank(&piece[parts[i].0..end]),
            None => NONE,
        };
        while parts.len() > 2 {
            let (mut best, mut at) = (NONE, 0);
            for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
                if r < best {
                    (best, at) = (r, i);
                }
            }
            if best == NONE {
                break;
            }
            parts.remove(at + 1);
            parts[at].1 = joined(parts, at);
            if at > 0 {
                parts[at - 1].1 = joined(parts, at - 1);
            }
        }
        parts.len() - 1
    }
}

/// FxHash's step over 8-byte words: tokens are short, and the table only needs spread.
fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    let mut tail = 0u64;
    for (i, &b) in chunks.remainder().iter().enumerate() {
        tail |= u64::from(b) << (8 * i);
    }
    h = (h.rotate_left(5) ^ tail).wrapping_mul(K);
    // The slot is the low bits; fold the well-mixed high bits into them.
    h ^ (h >> 29)
}
