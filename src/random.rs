//! WELL512a, the generator behind `bundle.random` (STAGE keeps its state in a Lua table).

/// The 16 words of state and the index of WELL512a.
#[derive(Debug, Clone, PartialEq)]
pub struct Well512 {
    pub state: [u32; 16],
    pub index: usize,
}

impl Well512 {
    /// Seeds the state from one 64-bit number through splitmix64, so that every seed,
    /// zero included, gives a well-mixed non-zero state.
    pub fn from_seed(seed: u64) -> Well512 {
        let mut x = seed;
        let mut state = [0u32; 16];
        for pair in state.chunks_mut(2) {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            pair[0] = z as u32;
            pair[1] = (z >> 32) as u32;
        }
        Well512 { state, index: 0 }
    }

    /// The next 32-bit output (Chris Lomont's public-domain formulation of WELL512a).
    pub fn next_u32(&mut self) -> u32 {
        let s = &mut self.state;
        let i = self.index;
        let mut a = s[i];
        let mut c = s[(i + 13) & 15];
        let b = a ^ c ^ (a << 16) ^ (c << 15);
        c = s[(i + 9) & 15];
        c ^= c >> 11;
        a = b ^ c;
        s[i] = a;
        let d = a ^ ((a << 5) & 0xDA44_2D24);
        self.index = (i + 15) & 15;
        let i = self.index;
        a = s[i];
        s[i] = a ^ b ^ d ^ (a << 2) ^ (b << 18) ^ (c << 28);
        s[i]
    }

    /// A float in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        let hi = (self.next_u32() >> 5) as u64;
        let lo = (self.next_u32() >> 6) as u64;
        ((hi << 26) | lo) as f64 / (1u64 << 53) as f64
    }

    /// An integer in [lo, hi] (both inclusive), without modulo bias.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        let span = (hi as i128 - lo as i128 + 1) as u128;
        if span > u32::MAX as u128 {
            let v = ((self.next_u32() as u64) << 32) | self.next_u32() as u64;
            return (lo as i128 + (v as u128 % span) as i128) as i64;
        }
        let span = span as u64;
        let zone = (u32::MAX as u64 + 1) - ((u32::MAX as u64 + 1) % span);
        loop {
            let v = self.next_u32() as u64;
            if v < zone {
                return lo + (v % span) as i64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = Well512::from_seed(42);
        let mut b = Well512::from_seed(42);
        let xs: Vec<u32> = (0..100).map(|_| a.next_u32()).collect();
        let ys: Vec<u32> = (0..100).map(|_| b.next_u32()).collect();
        assert_eq!(xs, ys);
        let mut c = Well512::from_seed(43);
        assert_ne!(xs[0], c.next_u32());
    }

    #[test]
    fn ranges_are_inclusive_and_covered() {
        let mut g = Well512::from_seed(7);
        let mut seen = [false; 6];
        for _ in 0..1000 {
            let v = g.range(1, 6);
            assert!((1..=6).contains(&v));
            seen[(v - 1) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        for _ in 0..100 {
            let f = g.next_f64();
            assert!((0.0..1.0).contains(&f));
        }
        assert_eq!(g.range(5, 5), 5);
        let big = g.range(i64::MIN, i64::MAX);
        let _ = big;
    }
}
