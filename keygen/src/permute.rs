//! A keyed bijection on IDs, so that consecutive IDs give unrelated codes.
//!
//! A balanced Feistel network over 48 bits (two 24-bit halves, six rounds,
//! SipHash-1-3 as the keyed round function) is a permutation of `0..2^48` for
//! any round function. IDs are 47 bits, so the network is applied again
//! whenever its output falls outside `0..2^47` ("cycle walking"); that keeps a
//! bijection on `0..2^47` and needs two passes on average. Without the secret,
//! codes reveal neither their order nor how many were issued.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use crate::layout::ID_BITS;

const HALF_BITS: u32 = 24;
const HALF_MASK: u64 = (1 << HALF_BITS) - 1;
const ROUNDS: u8 = 6;
const DOMAIN: u64 = 1 << ID_BITS;

/// Minimum secret length in bytes.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Clone)]
pub struct Permutation {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for Permutation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permutation([keyed])")
    }
}

impl Permutation {
    /// Derives the round key from the secret.
    pub fn new(secret: &[u8]) -> Self {
        let derive = |label: u64| {
            let mut h = SipHasher13::new_with_keys(0x6b65_7967_656e_2d76, label);
            h.write(secret);
            h.finish()
        };
        Self {
            k0: derive(1),
            k1: derive(2),
        }
    }

    fn round(&self, i: u8, half: u64) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write_u8(i);
        h.write_u32(half as u32);
        h.finish() & HALF_MASK
    }

    fn feistel(&self, x: u64) -> u64 {
        let (mut l, mut r) = (x >> HALF_BITS, x & HALF_MASK);
        for i in 0..ROUNDS {
            (l, r) = (r, l ^ self.round(i, r));
        }
        (l << HALF_BITS) | r
    }

    fn feistel_inverse(&self, y: u64) -> u64 {
        let (mut l, mut r) = (y >> HALF_BITS, y & HALF_MASK);
        for i in (0..ROUNDS).rev() {
            (l, r) = (r ^ self.round(i, l), l);
        }
        (l << HALF_BITS) | r
    }

    /// Maps an ID in `0..2^47` to another value in `0..2^47`.
    pub fn forward(&self, id: u64) -> u64 {
        assert!(id < DOMAIN, "id {id} is outside the 47-bit domain");
        let mut y = self.feistel(id);
        while y >= DOMAIN {
            y = self.feistel(y);
        }
        y
    }

    /// Undoes [`Permutation::forward`].
    pub fn inverse(&self, value: u64) -> u64 {
        assert!(value < DOMAIN, "value {value} is outside the 47-bit domain");
        let mut x = self.feistel_inverse(value);
        while x >= DOMAIN {
            x = self.feistel_inverse(x);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn perm() -> Permutation {
        Permutation::new(b"a test secret of enough length")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// An inverse on the whole domain means the map is a bijection there.
        #[test]
        fn is_a_bijection_on_the_domain(id in 0..DOMAIN) {
            let p = perm();
            let y = p.forward(id);
            prop_assert!(y < DOMAIN);
            prop_assert_eq!(p.inverse(y), id);
        }

        #[test]
        fn inverse_is_also_a_bijection(y in 0..DOMAIN) {
            let p = perm();
            prop_assert_eq!(p.forward(p.inverse(y)), y);
        }

        /// Different secrets give different maps.
        #[test]
        fn depends_on_the_secret(id in 0..DOMAIN) {
            let other = Permutation::new(b"another secret, also long enough");
            let same = (0..8).all(|k| perm().forward((id + k) % DOMAIN) == other.forward((id + k) % DOMAIN));
            prop_assert!(!same);
        }
    }

    #[test]
    fn domain_edges() {
        let p = perm();
        for id in [0, 1, DOMAIN - 2, DOMAIN - 1] {
            assert_eq!(p.inverse(p.forward(id)), id);
        }
    }

    #[test]
    fn does_not_print_its_key() {
        assert_eq!(format!("{:?}", perm()), "Permutation([keyed])");
    }
}
