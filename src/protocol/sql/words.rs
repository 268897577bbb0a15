//! What the proxy looks for in every statement before it lexes any of it, found in one pass: four words, and
//! where the semicolons are.
//!
//! The search runs on every statement a client sends, so it is on the hot path. Each word is found by a pair of
//! adjacent bytes near its start that ordinary SQL rarely has (`gt` of `pgtenant`, `ep` of `replication_role`,
//! `dv` of `advisory`, `_c` of `set_config`): one pass compares 16 positions at a time against all four pairs, with
//! letter case folded in the register, and only a position where a pair matches is compared in full. The same
//! pass notes the first and last `;`, which tell whether the text may hold more than one statement. Counted with
//! `benches/instructions.sh` on `pgbench -S` (BENCHMARKS.md): four vectorised substring searches of a lower-cased
//! copy cost a transaction about 560 instructions, this pass about 180; the two semicolon searches it replaces
//! cost about 95.

/// What a statement contains (see [`Words::of`]).
///
/// The words: a tenant statement or a guarded setting (`pgtenant`, `replication_role`) and a session-state effect
/// no first word shows (`advisory`, `set_config`). One search for all four serves both readings of a statement:
/// the tenant-statement check and the session-state classification of a frame the relay forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Words {
    bits: u8,
    /// Where the first and the last `;` are, if there is one.
    semicolons: Option<(usize, usize)>,
}

/// The words, in the order of their bits, each with the offset of its rare pair (at most 3: see `REACH`).
const NEEDLES: [(&[u8], usize); 4] = [
    (b"pgtenant", 1),
    (b"replication_role", 1),
    (b"advisory", 1),
    (b"set_config", 3),
];

impl Words {
    pub(super) const PGTENANT: u8 = 1;
    pub(super) const REPLICATION_ROLE: u8 = 2;
    pub(super) const ADVISORY: u8 = 4;
    pub(super) const SET_CONFIG: u8 = 8;

    /// Which of the words `sql` contains, in any letter case, and where its semicolons are.
    pub fn of(sql: &[u8]) -> Words {
        let mut found = Found {
            bits: 0,
            semicolons: None,
        };
        search(sql, &mut found);
        Words {
            bits: found.bits,
            semicolons: found.semicolons,
        }
    }

    pub(super) fn has(self, word: u8) -> bool {
        self.bits & word != 0
    }

    /// The positions of the first and the last `;` of the text, if it has one.
    pub(super) fn semicolons(self) -> Option<(usize, usize)> {
        self.semicolons
    }
}

/// What the pass has found so far.
struct Found {
    bits: u8,
    semicolons: Option<(usize, usize)>,
}

impl Found {
    /// Takes in one chunk's semicolons (`semis`: bit `k` set where `base + k` is a `;`, up to 32 bytes). Chunks
    /// overlap at the end of the text; a semicolon seen twice changes neither end.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    fn semicolons(&mut self, base: usize, semis: u32) {
        let first = base + semis.trailing_zeros() as usize;
        let last = base + 31 - semis.leading_zeros() as usize;
        self.semicolons = Some(match self.semicolons {
            Some((f, l)) => (f.min(first), l.max(last)),
            None => (first, last),
        });
    }

    /// Compares one chunk's candidates in full (`masks[i]`: bit `k` set where word `i`'s pair matched at start
    /// `base + k`). A start seen twice (where chunks overlap) is compared again unless its word is found. Out of
    /// line: most chunks have no candidate, and the pass's loop stays small.
    #[cfg(target_arch = "x86_64")]
    #[inline(never)]
    fn confirm(&mut self, sql: &[u8], base: usize, masks: [u32; 4]) {
        for (i, mut mask) in masks.into_iter().enumerate() {
            while mask != 0 && self.bits & (1 << i) == 0 {
                let k = mask.trailing_zeros() as usize;
                if starts_at(sql, base + k, i) {
                    self.bits |= 1 << i;
                }
                mask &= mask - 1;
            }
        }
    }

    /// Takes in what [`vector::candidates`] found in the chunk at `base`.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    fn add(&mut self, sql: &[u8], base: usize, (masks, semis): (Option<[u32; 4]>, u32)) {
        if semis != 0 {
            self.semicolons(base, semis);
        }
        if let Some(masks) = masks {
            self.confirm(sql, base, masks);
        }
    }
}

/// Whether the word `needle` (its index in [`NEEDLES`]) starts at `at` of `sql`, in any letter case.
#[cfg(any(target_arch = "x86_64", test))]
fn starts_at(sql: &[u8], at: usize, needle: usize) -> bool {
    let word = NEEDLES[needle].0;
    sql.get(at..at + word.len())
        .is_some_and(|w| w.eq_ignore_ascii_case(word))
}

#[cfg(target_arch = "x86_64")]
mod vector {
    use std::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };

    use super::NEEDLES;

    /// Bytes read from a chunk's first start: 16 starts, and the farthest pair (offsets 3 and 4) behind them.
    /// A chunk ending at the text's end then still covers every start a word of 5 bytes or more can have.
    pub(super) const REACH: usize = 16 + 4;

    /// A pair's byte as the compare sees it: case folded by setting bit 0x20 (`_` becomes 0x7f, as does DEL,
    /// which the full compare then rules out).
    const fn fold(b: u8) -> i8 {
        (b | 0x20) as i8
    }

    /// The four words' candidate starts among the 16 starting at `chunk[0]` (bit `k` of `masks[i]` set where
    /// word `i`'s pair, case folded, is at `k` plus the pair's offset; `None` when there is none at all, the
    /// common case), and the semicolons among its first REACH bytes (bit `k` for `chunk[k]`). `chunk` must hold
    /// at least [`REACH`] bytes.
    pub(super) fn candidates(chunk: &[u8]) -> (Option<[u32; 4]>, u32) {
        assert!(chunk.len() >= REACH);
        #[allow(clippy::let_unit_value)]
        let () = PAIRS_FIT;
        // SAFETY: SSE2 is part of every x86_64 target. Each load reads the 16 bytes from offset 0, a pair's
        // offset or the one after it (at most 4, see `PAIRS_FIT`), so the farthest ends at byte REACH, inside the
        // slice as asserted above. (The compiler shares the loads of equal offsets.)
        unsafe {
            let p = chunk.as_ptr();
            let raw = |off: usize| _mm_loadu_si128(p.add(off).cast::<__m128i>());
            // All REACH bytes: the last chunk's are the text's last.
            let semi = |off: usize| {
                _mm_movemask_epi8(_mm_cmpeq_epi8(raw(off), _mm_set1_epi8(b';' as i8))) as u32
            };
            let semis = semi(0) | semi(REACH - 16) << (REACH - 16);
            let case = _mm_set1_epi8(0x20);
            let load = |off: usize| _mm_or_si128(raw(off), case);
            let pairs = NEEDLES.map(|(word, off)| {
                let first = _mm_cmpeq_epi8(load(off), _mm_set1_epi8(fold(word[off])));
                let second = _mm_cmpeq_epi8(load(off + 1), _mm_set1_epi8(fold(word[off + 1])));
                _mm_and_si128(first, second)
            });
            let any = _mm_or_si128(
                _mm_or_si128(pairs[0], pairs[1]),
                _mm_or_si128(pairs[2], pairs[3]),
            );
            if _mm_movemask_epi8(any) == 0 {
                return (None, semis);
            }
            (Some(pairs.map(|m| _mm_movemask_epi8(m) as u32)), semis)
        }
    }

    /// Every pair lies within the bytes [`candidates`] reads (the `unsafe` block's loads count on it), and
    /// every word is long enough for the last chunk, which starts REACH bytes before the text's end, to hold
    /// its last possible start (5 bytes before the end). Checked when the crate compiles.
    const PAIRS_FIT: () = {
        let mut i = 0;
        while i < NEEDLES.len() {
            assert!(NEEDLES[i].1 + 1 + 16 <= REACH);
            assert!(NEEDLES[i].0.len() + 15 >= REACH);
            i += 1;
        }
    };
}

/// The pass over `sql`, 16 starts at a time. The last chunk ends where the text does (overlapping the one
/// before it), so no start is left over; a text shorter than a chunk is read from a zero-padded copy (zeros fold
/// to a space, which no pair has, and are no `;`).
#[cfg(target_arch = "x86_64")]
fn search(sql: &[u8], found: &mut Found) {
    use vector::{candidates, REACH};
    let Some(last) = sql.len().checked_sub(REACH) else {
        let mut pad = [0u8; REACH];
        pad[..sql.len()].copy_from_slice(sql);
        return found.add(sql, 0, candidates(&pad));
    };
    let mut base = 0;
    loop {
        let at = base.min(last);
        found.add(sql, at, candidates(&sql[at..]));
        if at == last {
            return;
        }
        base += 16;
    }
}

/// Elsewhere: each word compared at every occurrence of its first letter, the lexer's search.
#[cfg(not(target_arch = "x86_64"))]
fn search(sql: &[u8], found: &mut Found) {
    for (i, (word, _)) in NEEDLES.iter().enumerate() {
        if super::lex::contains_at_first_letter(sql, word) {
            found.bits |= 1 << i;
        }
    }
    found.semicolons = memchr::memchr(b';', sql).zip(memchr::memrchr(b';', sql));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition: each word anywhere, in any case.
    fn naive(sql: &[u8]) -> u8 {
        let mut bits = 0;
        for i in 0..4 {
            if (0..sql.len()).any(|at| starts_at(sql, at, i)) {
                bits |= 1 << i;
            }
        }
        bits
    }

    #[test]
    fn every_word_is_found_at_every_start_in_texts_of_every_length() {
        let words = ["PgTenant", "replication_ROLE", "ADVISORY", "set_Config"];
        for (i, word) in words.iter().enumerate() {
            for len in 0..80 {
                for at in 0..len {
                    let mut text = vec![b'x'; len];
                    let end = (at + word.len()).min(len);
                    text[at..end].copy_from_slice(&word.as_bytes()[..end - at]);
                    let got = Words::of(&text);
                    assert_eq!(got.bits, naive(&text), "word {word} at {at} of {len}");
                    assert_eq!(got.bits & (1 << i) != 0, end - at == word.len());
                }
            }
        }
    }

    #[test]
    fn near_misses_and_pairs_without_their_word_are_not_words() {
        for text in [
            "pgtenan",
            "gtgtgt_r_r_r_cdvdvepEPeP",
            "pg_tenant replication-role advisor set config",
            "pgtenan\u{7f}t set\u{7f}config",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
            "p\u{e9}tenant é_r ü_c",
        ] {
            assert_eq!(Words::of(text.as_bytes()).bits, 0, "{text}");
            assert_eq!(naive(text.as_bytes()), 0, "{text}");
        }
    }

    #[test]
    fn the_first_and_last_semicolons_are_found_at_every_place() {
        for len in 0..70 {
            for first in 0..len {
                for last in first..len {
                    let mut text = vec![b'x'; len];
                    text[first] = b';';
                    text[last] = b';';
                    // A middle one changes neither end.
                    text[(first + last) / 2] = b';';
                    assert_eq!(
                        Words::of(&text).semicolons(),
                        Some((first, last)),
                        "{first} {last} {len}"
                    );
                }
            }
            assert_eq!(Words::of(&vec![b'x'; len]).semicolons(), None);
        }
        // ESC is 0x1b, a `;` with bit 0x20 cleared: no semicolon.
        assert_eq!(
            Words::of(b"select 1\x1b select 2 \x1b\x1b\x1b\x1b\x1b\x1b\x1b\x1b\x1b\x1b\x1b")
                .semicolons(),
            None
        );
    }

    #[test]
    fn all_four_in_one_long_text_with_many_candidates() {
        let filler = "gt ep dv _c GT EP eP ".repeat(40);
        let text = format!(
            "{filler}PGTENANT {filler}Replication_Role {filler}adVisory {filler}SET_CONFIG"
        );
        assert_eq!(Words::of(text.as_bytes()).bits, 15);
        assert_eq!(Words::of(filler.as_bytes()).bits, 0);
    }

    #[test]
    fn pseudo_random_texts_agree_with_the_definition() {
        // Pieces of the words and of their pairs, so that whole words, broken ones and lone pairs all occur.
        let pieces = [
            "pgt",
            "enant",
            "pg",
            "tenant",
            "replication",
            "_role",
            "_r",
            "ole",
            "adv",
            "isory",
            "ad",
            "visory",
            "set",
            "_config",
            "_c",
            "onfig",
            "gt",
            "dv",
            " ",
            "x",
            "\u{7f}",
            "\u{e9}",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut found = [0usize; 4];
        for _ in 0..20_000 {
            let mut text = Vec::new();
            for _ in 0..next() % 12 {
                let r = next();
                let piece = pieces[(r % pieces.len() as u64) as usize].as_bytes();
                let upper = r >> 32;
                text.extend(piece.iter().enumerate().map(|(j, b)| {
                    if upper >> (j % 32) & 1 == 1 {
                        b.to_ascii_uppercase()
                    } else {
                        *b
                    }
                }));
            }
            let want = naive(&text);
            assert_eq!(
                Words::of(&text).bits,
                want,
                "{:?}",
                String::from_utf8_lossy(&text)
            );
            for (i, n) in found.iter_mut().enumerate() {
                *n += usize::from(want & (1 << i) != 0);
            }
        }
        // The texts did form every word, many times.
        assert!(found.iter().all(|&n| n > 100), "{found:?}");
    }
}
