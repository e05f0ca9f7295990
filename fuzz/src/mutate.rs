//! A deterministic generator and the mutations the stable harness applies:
//! no coverage feedback (that is what `cargo fuzz` adds), so the mutations
//! lean on the corpus: splices of seeds, tokens of the input's language
//! (`Target::dictionary`), boundary numbers, repeated chunks.

/// xorshift64*: small, fast and the same on every machine for one seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so nearby seeds start far apart (and 0 works).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
}

/// Bytes that sit on boundaries: signs, widths, zero, ASCII structure.
const INTERESTING: &[&[u8]] = &[
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"-1",
    b"0",
    b"4294967295",
    b"4294967296",
    b"18446744073709551615",
    b"-9223372036854775808",
    b"1e309",
    b"NaN",
    b"\r\n",
    b"\r\n\r\n",
    b"\"",
    b"'",
    b"[",
    b"{",
    b"}",
    b"]",
    b":",
    b",",
    b"%",
    b"/",
    b"..",
    b"\\",
    b"\xc3\xa9",
    b"\xe2\x80\xae",
];

/// Largest input a mutation produces: enough for every format here, small
/// enough that one input stays fast.
pub const MAX_LEN: usize = 16 * 1024;

/// One mutation of `input` (1 to 4 steps), using `corpus` for splices and
/// `dictionary` for tokens.
pub fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>], dictionary: &[&[u8]]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        step(rng, &mut out, corpus, dictionary);
    }
    out.truncate(MAX_LEN);
    out
}

fn step(rng: &mut Rng, out: &mut Vec<u8>, corpus: &[Vec<u8>], dictionary: &[&[u8]]) {
    let at = |rng: &mut Rng, len: usize| rng.below(len + 1);
    match rng.below(10) {
        // Flip a bit.
        0 if !out.is_empty() => {
            let i = rng.below(out.len());
            out[i] ^= 1 << rng.below(8);
        }
        // Set a byte.
        1 if !out.is_empty() => {
            let i = rng.below(out.len());
            out[i] = rng.byte();
        }
        // Delete a range.
        2 if !out.is_empty() => {
            let i = rng.below(out.len());
            let n = 1 + rng.below((out.len() - i).min(32));
            out.drain(i..i + n);
        }
        // Insert random bytes.
        3 => {
            let i = at(rng, out.len());
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            out.splice(i..i, bytes);
        }
        // Insert or overwrite with a boundary value.
        4 => {
            let v = INTERESTING[rng.below(INTERESTING.len())];
            insert_or_overwrite(rng, out, v);
        }
        // A token of the target's language.
        5 | 6 if !dictionary.is_empty() => {
            let v = dictionary[rng.below(dictionary.len())];
            insert_or_overwrite(rng, out, v);
        }
        // Duplicate a chunk (nesting, repetition).
        7 if !out.is_empty() => {
            let i = rng.below(out.len());
            let n = 1 + rng.below((out.len() - i).min(64));
            let chunk = out[i..i + n].to_vec();
            let times = 1 + rng.below(16);
            let j = at(rng, out.len());
            for _ in 0..times {
                out.splice(j..j, chunk.iter().copied());
            }
        }
        // Splice in a piece of another seed.
        8 if !corpus.is_empty() => {
            let other = &corpus[rng.below(corpus.len())];
            if !other.is_empty() {
                let i = rng.below(other.len());
                let n = 1 + rng.below(other.len() - i);
                let j = at(rng, out.len());
                out.splice(j..j, other[i..i + n].iter().copied());
            }
        }
        // Truncate.
        _ if !out.is_empty() => {
            let n = rng.below(out.len());
            out.truncate(n);
        }
        _ => out.push(rng.byte()),
    }
}

fn insert_or_overwrite(rng: &mut Rng, out: &mut Vec<u8>, v: &[u8]) {
    let i = rng.below(out.len() + 1);
    if rng.below(2) == 0 || i + v.len() > out.len() {
        out.splice(i..i, v.iter().copied());
    } else {
        out[i..i + v.len()].copy_from_slice(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_gives_one_sequence() {
        let corpus = vec![b"service: payments".to_vec()];
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..100)
                .map(|_| mutate(&mut rng, &corpus[0], &corpus, &[b"retries"]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn mutations_stay_within_the_length_bound() {
        let mut rng = Rng::new(1);
        let mut input = vec![b'a'; MAX_LEN];
        for _ in 0..200 {
            input = mutate(&mut rng, &input, std::slice::from_ref(&input), &[]);
            assert!(input.len() <= MAX_LEN);
        }
    }
}
