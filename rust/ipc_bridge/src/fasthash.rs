//! The hasher of the bridge's in-process caches (chunk addresses, dtype objects, the keys and
//! dtypes of media frames): looked up for every frame, so SipHash, std's default (made to
//! resist keys chosen by an attacker), costs more than the rest of the lookup. These maps are
//! small and bounded (each is cleared past a size), so a flooding producer only makes them
//! slower, never unbounded.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The multiply-rotate hash of rustc's own tables (FxHash), one 64-bit word at a time.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

const SEED: u64 = 0xf135_7aea_2e62_a9c5;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        // The product's low bits are poor (an address aligned to a page leaves its low 12
        // zero), and a table picks its bucket from the low bits: bring the middle ones down.
        self.0.rotate_left(26)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(n as u64);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
}

/// A HashMap with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use super::FastMap;

    #[test]
    fn page_aligned_addresses_and_short_keys_spread_over_the_buckets() {
        use std::hash::BuildHasher;
        let b = std::hash::BuildHasherDefault::<super::FastHasher>::default();
        let mask = 63u64;
        let mut buckets = std::collections::HashSet::new();
        for i in 0..64usize {
            buckets.insert(b.hash_one(0x7f00_0000_0000usize + i * 4096) & mask);
        }
        assert!(buckets.len() > 32, "64 page-aligned addresses fell into {} of 64 buckets", buckets.len());
        let mut m: FastMap<Vec<u8>, usize> = FastMap::default();
        for (i, k) in ["t", "rate", "data", "timestamp_ns", "sample_rate"].iter().enumerate() {
            m.insert(k.as_bytes().to_vec(), i);
        }
        assert_eq!(m.get(b"rate".as_slice()), Some(&1));
        assert_eq!(m.get(b"sample_rate".as_slice()), Some(&4));
        assert_eq!(m.get(b"rat".as_slice()), None);
    }
}
