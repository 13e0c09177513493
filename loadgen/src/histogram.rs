//! A log-linear histogram in the spirit of HdrHistogram: every power of two
//! is split into 128 linear sub-buckets, so any recorded value is known to
//! within 1/128 (< 0.8 %), recording is a few instructions, and the whole
//! `u64` range fits in 7,424 counters (58 KiB).

/// Sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 7;
/// Sub-buckets per power of two.
const SUB: u64 = 1 << SUB_BITS;
/// Counters needed for the whole `u64` range.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// Counts of `u64` values (nanoseconds, here) with bounded relative error.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// One counter per bucket.
    counts: Vec<u64>,
    /// Values recorded.
    total: u64,
    /// Sum of the values, for the mean.
    sum: u128,
    /// Exact smallest value.
    min: u64,
    /// Exact largest value.
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self { counts: vec![0; BUCKETS], total: 0, sum: 0, min: u64::MAX, max: 0 }
    }

    /// Bucket index of `value`: values below `2 * SUB` have their own bucket.
    #[inline]
    fn index(value: u64) -> usize {
        if value < 2 * SUB {
            return value as usize;
        }
        let shift = (63 - value.leading_zeros()) - SUB_BITS;
        ((u64::from(shift) + 1) * SUB + ((value >> shift) - SUB)) as usize
    }

    /// Largest value that falls in bucket `index`.
    fn highest_in(index: usize) -> u64 {
        let index = index as u64;
        if index < 2 * SUB {
            return index;
        }
        let shift = index / SUB - 1;
        let low = (index % SUB + SUB) << shift;
        low + ((1u64 << shift) - 1)
    }

    /// Records one value.
    #[inline]
    pub fn record(&mut self, value: u64) {
        self.counts[Self::index(value)] += 1;
        self.total += 1;
        self.sum += u128::from(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Exact largest value (0 if empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean of the values (0 if empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 { 0.0 } else { self.sum as f64 / self.total as f64 }
    }

    /// The value at quantile `q` (0..=1): the highest value of the bucket
    /// holding the `ceil(q * count)`-th smallest value, capped at the exact
    /// maximum. 0 if empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::highest_in(index).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut previous = 0;
        for value in (0..5000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let index = Histogram::index(value);
            assert!(index < BUCKETS);
            assert!(index >= previous, "{value}");
            previous = index;
            let high = Histogram::highest_in(index);
            assert!(high >= value, "{value} -> {high}");
            assert!((high - value) as f64 <= value as f64 / 128.0 + 1.0, "{value} -> {high}");
        }
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
        assert_eq!(Histogram::highest_in(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn quantiles_are_within_a_percent() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 100_000);
        for (q, exact) in [(0.5, 50_000_000.0), (0.99, 99_000_000.0), (0.999, 99_900_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - exact).abs() / exact < 0.01, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.quantile(1.0), 100_000_000);
        assert_eq!(h.max(), 100_000_000);
        assert!((h.mean() - 50_000_500.0).abs() < 1.0);
    }
}
