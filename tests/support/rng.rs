//! A small deterministic PRNG for randomized tests, seeded from an
//! environment variable so that a failure can be replayed.

/// xorshift64*: not for cryptography, only reproducible test data.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `var` when it holds a number, else a fixed default; the
    /// seed is printed so that a failing run can be replayed.
    pub fn from_env(var: &str) -> Rng {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_c0ff_ee00);
        println!("random seed: {seed} (set {var} to replay)");
        Rng(seed | 1)
    }

    /// Seeded with `seed`, whatever the environment says.
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `true` with the given probability in percent.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}
