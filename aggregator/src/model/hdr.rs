//! HdrHistogram V2 bytes merged straight into counts, without building a histogram per snapshot.
//!
//! Every accumulator has one fixed layout ([`Layout::FIXED`]: lowest discernible value 1, 2 significant digits,
//! so 256 sub-buckets per power of two, about 1% relative error), and holds counts only from the lowest to the
//! highest index actually recorded, so accumulators of one metric always line up and are merged by adding counts
//! index by index. A V2 encoding in that layout (what every Strobe agent sends) is decoded in one pass of varints straight into the
//! accumulator's counts; any other layout (another precision or lowest value) goes through values, as
//! `hdrhistogram`'s own `add` does when layouts differ, with the same result. Statistics are read from the counts
//! exactly as `hdrhistogram` reads them (property tests compare both, count for count and bit for bit). Counts
//! are 32-bit: a count above that in an encoding is refused ([`V2Error::Count`]); merged counts saturate (only
//! past four billion values in one bucket of one second), and the quantiles are then read from the counts held.
//!
//! Decoding is done twice: once at ingest to check the encoding (so a malformed histogram is refused before it
//! is acknowledged) and once when merging. Both passes only read bytes; neither allocates per histogram.
//! Pure, and a leaf: imports nothing of the crate.

use bytes::Bytes;
use hdrhistogram::Histogram;

/// Size of the V2 header: cookie, payload length, normalizing offset, digits, lowest, highest, ratio.
const HEADER: usize = 40;

/// Why a V2 encoding was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum V2Error {
    /// Not an uncompressed V2 encoding, or its payload does not decode.
    Encoding,
    /// It declares or holds values, precision or a range beyond what is accepted.
    Range,
    /// It counts more values in one bucket than an accumulator's bucket holds ([`Count::MAX`]).
    Count,
}

/// How a histogram maps values to counts indexes (the part of HdrHistogram's configuration that matters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    unit_magnitude: u32,
    sub_bucket_half_count_magnitude: u32,
}

impl Layout {
    /// Every accumulator's layout: lowest discernible value 1, 2 significant digits.
    pub(crate) const FIXED: Layout = Layout {
        unit_magnitude: 0,
        sub_bucket_half_count_magnitude: 7,
    };

    /// The layout HdrHistogram builds for `lowest` and `sigfig`, or `None` where it would refuse them.
    pub(crate) fn new(lowest: u64, sigfig: u32) -> Option<Layout> {
        if !(1..=u64::MAX / 2).contains(&lowest) || sigfig > 5 {
            return None;
        }
        let unit_magnitude = 63 - lowest.leading_zeros();
        let largest = 2 * 10_u32.pow(sigfig);
        // ceil(log2(largest)), largest >= 2.
        let sub_bucket_count_magnitude = 32 - (largest - 1).leading_zeros();
        if unit_magnitude + sub_bucket_count_magnitude > 63 {
            return None;
        }
        Some(Layout {
            unit_magnitude,
            sub_bucket_half_count_magnitude: sub_bucket_count_magnitude - 1,
        })
    }

    fn half_count(self) -> u64 {
        1 << self.sub_bucket_half_count_magnitude
    }

    fn bucket_for(self, value: u64) -> u32 {
        let mask = ((self.half_count() << 1) - 1) << self.unit_magnitude;
        let base = 64 - self.unit_magnitude - (self.sub_bucket_half_count_magnitude + 1);
        base - (value | mask).leading_zeros()
    }

    /// The counts index of `value`.
    pub(crate) fn index_of(self, value: u64) -> usize {
        let bucket = self.bucket_for(value);
        let sub_bucket = value >> (bucket + self.unit_magnitude);
        let base = u64::from(bucket + 1) << self.sub_bucket_half_count_magnitude;
        (base + sub_bucket - self.half_count()) as usize
    }

    /// The lowest value counted at `index` (`None` past the values a u64 can hold).
    pub(crate) fn value_at(self, index: usize) -> Option<u64> {
        let half = self.half_count();
        let mut bucket = (index as u64 >> self.sub_bucket_half_count_magnitude) as i64 - 1;
        let mut sub_bucket = (index as u64 & (half - 1)) + half;
        if bucket < 0 {
            sub_bucket -= half;
            bucket = 0;
        }
        let shift = u32::try_from(bucket).ok()? + self.unit_magnitude;
        let value = sub_bucket.checked_shl(shift)?;
        // A shift that drops bits is past the range too.
        (value >> shift == sub_bucket).then_some(value)
    }

    fn equivalent_range(self, value: u64) -> u64 {
        1 << (self.unit_magnitude + self.bucket_for(value))
    }

    fn lowest_equivalent(self, value: u64) -> u64 {
        let bucket = self.bucket_for(value);
        (value >> (bucket + self.unit_magnitude)) << (bucket + self.unit_magnitude)
    }

    fn highest_equivalent(self, value: u64) -> u64 {
        if value == u64::MAX {
            return u64::MAX;
        }
        self.lowest_equivalent(value)
            .saturating_add(self.equivalent_range(value))
            - 1
    }

    fn median_equivalent(self, value: u64) -> u64 {
        self.lowest_equivalent(value) + (self.equivalent_range(value) >> 1)
    }

    /// How many counts HdrHistogram allocates to track values up to `highest`.
    fn counts_len(self, highest: u64) -> usize {
        let mut smallest_untrackable = (self.half_count() << 1) << self.unit_magnitude;
        let mut buckets: u64 = 1;
        while smallest_untrackable <= highest {
            if smallest_untrackable > u64::MAX / 2 {
                buckets += 1;
                break;
            }
            smallest_untrackable <<= 1;
            buckets += 1;
        }
        ((buckets + 1) * self.half_count()) as usize
    }
}

/// A V2 encoding that passed every check: ready to merge, in its own layout.
#[derive(Debug, Clone)]
pub(crate) struct CheckedV2 {
    bytes: Bytes,
    layout: Layout,
    /// The highest index with a count.
    max_index: usize,
    /// The lowest index with a count.
    min_index: usize,
    /// Values recorded.
    total: u64,
}

impl CheckedV2 {
    /// Bytes of the encoding kept.
    #[cfg(test)]
    pub(crate) fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Checks an encoding: header (cookie, declared length, precision, range) first, then every varint of the
    /// payload, without allocating. Values above `max_value` and precision above `max_sigfig` are refused.
    pub(crate) fn check(bytes: Bytes, max_sigfig: u32, max_value: u64) -> Result<Self, V2Error> {
        let header = bytes.get(..HEADER).ok_or(V2Error::Encoding)?;
        let word = |at: usize| {
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let long = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&header[at..at + 8]);
            u64::from_be_bytes(a)
        };
        let (cookie, payload_len, offset, sigfig) = (word(0), word(4), word(8), word(12));
        let (lowest, highest, ratio) = (long(16), long(24), f64::from_bits(long(32)));
        if !strobe_proto::is_hdr_v2_cookie(cookie)
            || payload_len as usize != bytes.len() - HEADER
            || offset != 0
            || ratio != 1.0
        {
            return Err(V2Error::Encoding);
        }
        if sigfig > max_sigfig || highest > max_value || highest < lowest.saturating_mul(2) {
            return Err(V2Error::Range);
        }
        let layout = Layout::new(lowest, sigfig).ok_or(V2Error::Range)?;
        let len = layout.counts_len(highest);
        let Scan {
            min_index,
            max_index,
            total,
        } = scan(&bytes[HEADER..], len)?;
        let max_recorded = layout.value_at(max_index).ok_or(V2Error::Range)?;
        if total > 0 && max_recorded > max_value {
            return Err(V2Error::Range);
        }
        Ok(Self {
            bytes,
            layout,
            max_index,
            min_index,
            total,
        })
    }

    /// Values recorded.
    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}

/// Reads one varint as HdrHistogram writes them (LEB128, at most 9 bytes, the 9th contributing all 8 bits).
#[inline]
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    // Most counts and zero runs fit in one byte.
    let first = *bytes.first()?;
    if first & 0x80 == 0 {
        return Some((u64::from(first), 1));
    }
    let mut value = u64::from(first & 0x7f);
    for (i, b) in bytes.iter().enumerate().take(9).skip(1) {
        if i == 8 {
            return Some((value | (u64::from(*b) << 56), 9));
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Reads one byte that is a whole varint (below 0x80) as a count and the step to the next index: an even byte is a
/// count of `byte / 2` at this index (step 1); an odd one, ZigZag for a negative number, is a run of `byte / 2 + 1`
/// empty buckets (count 0). Without branches, for the merge: these bytes are most of a payload, and which kind
/// comes next is hard to predict (the kernel bench, run back to back: merging 100-value histograms 38% faster,
/// 1,000-value ones 49%). The check at ingest reads the same eight at once as lanes of one word ([`Eight`]).
#[inline(always)]
fn one_byte(byte: u8) -> (u64, usize) {
    let odd = usize::from(byte & 1);
    let half = usize::from(byte >> 1);
    let count = (half & odd.wrapping_sub(1)) as u64;
    let step = 1 + (half & odd.wrapping_neg());
    (count, step)
}

/// Reads a varint of more than one byte at `at` as a count and a step (see [`one_byte`]); `None` when truncated
/// or when a run of empty buckets does not fit an index.
#[inline]
fn long_varint(payload: &[u8], at: &mut usize) -> Option<(u64, usize)> {
    let (raw, used) = varint(&payload[*at..])?;
    *at += used;
    if raw & 1 == 1 {
        let zeros = usize::try_from(raw >> 1).ok()?;
        Some((0, zeros.checked_add(1)?))
    } else {
        Some((raw >> 1, 1))
    }
}

/// A one in each byte of a word.
const LANES: u64 = 0x0101_0101_0101_0101;

/// Eight one-byte varints read as one word, each byte a lane (first varint in the lowest): [`one_byte`] for all eight
/// at once, so that the check needs no loop over them (the index's steps chained byte after byte were most of its
/// cost).
struct Eight {
    /// Each lane's count: `byte / 2` for an even byte, 0 for a run of empty buckets.
    counts: u64,
    /// Each lane's step to the next index: 1, or `byte / 2 + 1` for a run (at most 64).
    steps: u64,
}

impl Eight {
    /// `word`'s lanes, every byte of which is below 0x80.
    #[inline(always)]
    fn of(word: u64) -> Self {
        let runs = (word & LANES) * 0xff;
        let half = (word >> 1) & (LANES * 0x3f);
        Self {
            counts: half & !runs,
            steps: LANES + (half & runs),
        }
    }

    /// The first and the last lane with a count (`counts` is not 0).
    #[inline(always)]
    fn counted_lanes(&self) -> (u32, u32) {
        // A count is at most 0x3f, so adding 0x7f sets a lane's top bit exactly when it is not 0, without a carry.
        let counted = (self.counts + LANES * 0x7f) & (LANES * 0x80);
        (
            counted.trailing_zeros() / 8,
            7 - counted.leading_zeros() / 8,
        )
    }

    /// The steps of the lanes before `lane`: how far past the word's first index `lane` is.
    #[inline(always)]
    fn steps_before(&self, lane: u32) -> usize {
        let below = (1u64 << (8 * lane)) - 1;
        lane_sum(self.steps & below) as usize
    }
}

/// The sum of a word's eight byte lanes, each at most 64 (so the sum fits the 16-bit lanes it is added in).
#[inline(always)]
fn lane_sum(word: u64) -> u64 {
    const PAIRS: u64 = 0x00ff_00ff_00ff_00ff;
    let pairs = (word & PAIRS) + ((word >> 8) & PAIRS);
    pairs.wrapping_mul(0x0001_0001_0001_0001) >> 48
}

/// What [`scan`] learns of a payload.
#[derive(Debug, PartialEq, Eq)]
struct Scan {
    /// The lowest index with a count (`usize::MAX` when none).
    min_index: usize,
    /// The highest index with a count (0 when none).
    max_index: usize,
    /// Values recorded (saturating).
    total: u64,
}

/// Checks every varint of a V2 payload and sums it up. Refuses truncated varints, counts at indexes at or past
/// `len` (what the declared range allows), runs of zeros that overflow the index, and a count above [`Count::MAX`]
/// (4,294,967,295 values in one bucket of one instance's second: absurd). Eight one-byte varints are
/// read at once when the next eight bytes allow it, as lanes of one word ([`Eight`]): in `perf` at 7,500 agents x
/// 100 series, the check, one varint at a time, took more of the aggregator's CPU (14%) than the merge (11%);
/// eight at a time but one byte after another, 6.9% at 10,000 (against the merge's 13.3%).
#[inline]
fn scan(payload: &[u8], len: usize) -> Result<Scan, V2Error> {
    let (mut index, mut at) = (0usize, 0usize);
    let (mut min_index, mut max_index, mut total) = (usize::MAX, 0usize, 0u64);
    // A count too large for an accumulator's bucket (one-byte varints never are).
    let mut over = false;
    loop {
        // Eight one-byte steps move the index by at most 8 x 64: below this, adding them cannot overflow.
        if index < usize::MAX - 8 * 64
            && let Some(chunk) = payload.get(at..at + 8)
        {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0x80; 8]));
            if word & (LANES * 0x80) == 0 {
                let eight = Eight::of(word);
                if eight.counts != 0 {
                    let (first, last) = eight.counted_lanes();
                    if min_index == usize::MAX {
                        min_index = index + eight.steps_before(first);
                    }
                    max_index = index + eight.steps_before(last);
                    total = total.saturating_add(lane_sum(eight.counts));
                }
                index += lane_sum(eight.steps) as usize;
                at += 8;
                continue;
            }
        }
        let Some(&byte) = payload.get(at) else {
            break;
        };
        let raw = if byte & 0x80 == 0 {
            at += 1;
            u64::from(byte)
        } else {
            let (raw, used) = varint(&payload[at..]).ok_or(V2Error::Encoding)?;
            at += used;
            raw
        };
        if raw & 1 == 1 {
            // ZigZag: an odd number is negative, a run of (raw >> 1) + 1 empty buckets.
            let zeros = usize::try_from(raw >> 1).map_err(|_| V2Error::Encoding)?;
            index = index
                .checked_add(zeros)
                .and_then(|i| i.checked_add(1))
                .ok_or(V2Error::Encoding)?;
        } else {
            let count = raw >> 1;
            if count > 0 {
                min_index = min_index.min(index);
                max_index = index;
                total = total.saturating_add(count);
                over |= count > u64::from(Count::MAX);
            }
            index = index.checked_add(1).ok_or(V2Error::Encoding)?;
        }
    }
    // Indexes only grow, so the highest counted one is the one to hold against the range.
    if min_index != usize::MAX && max_index >= len {
        return Err(V2Error::Encoding);
    }
    if over {
        return Err(V2Error::Count);
    }
    Ok(Scan {
        min_index,
        max_index,
        total,
    })
}

/// Steps through a payload that [`CheckedV2::check`] accepted, calling `each(index, count)` for every varint: a
/// count at its index, or 0 at the first index of a run of empty buckets. One-byte varints (most counts and runs)
/// are read without a branch on their kind (see [`one_byte`]).
#[inline(always)]
fn each_step(payload: &[u8], mut each: impl FnMut(usize, u64)) {
    let (mut index, mut at) = (0usize, 0usize);
    loop {
        // Eight one-byte varints at once when the next eight bytes are all below 0x80 (one test for the lot).
        // The check refused every payload whose index overflows, so adding steps cannot wrap here.
        if let Some(chunk) = payload.get(at..at + 8) {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0x80; 8]));
            if word & 0x8080_8080_8080_8080 == 0 {
                for shift in (0..64).step_by(8) {
                    let (count, step) = one_byte((word >> shift) as u8);
                    each(index, count);
                    index = index.wrapping_add(step);
                }
                at += 8;
                continue;
            }
        }
        let Some(&byte) = payload.get(at) else {
            return;
        };
        let (count, step) = if byte & 0x80 == 0 {
            at += 1;
            one_byte(byte)
        } else {
            let Some(read) = long_varint(payload, &mut at) else {
                return;
            };
            read
        };
        each(index, count);
        index = index.saturating_add(step);
    }
}

/// Adds a payload that [`CheckedV2::check`] accepted, in the fixed layout, to `counts` (holding indexes from `base`,
/// and covering every index the payload counts at). Every step adds its count, 0 for a run of empty buckets, at
/// its index clamped into `counts`, so the loop has no branch on the kind of byte.
#[inline]
fn add_fixed(payload: &[u8], counts: &mut [Count], base: usize) {
    let Some(last) = counts.len().checked_sub(1) else {
        return;
    };
    each_step(payload, |index, count| {
        // Outside the range held only while this is a run of empty buckets (adding 0, anywhere).
        let k = index.wrapping_sub(base).min(last);
        counts[k] = counts[k].saturating_add(to_count(count));
    });
}

/// One bucket's count in an accumulator: 32 bits, which halve the memory merging walks (by estimate, the counts of
/// the seconds being merged then fit the 8 MiB L3 of the 2-core machine the benchmarks run on; 64-bit ones did not).
/// A count above it is refused at ingest; merged counts saturate.
pub(crate) type Count = u32;

/// A count read from an encoding, as a bucket's count (saturating; the check refused larger ones).
#[inline(always)]
fn to_count(count: u64) -> Count {
    count.min(u64::from(Count::MAX)) as Count
}

/// Counts in [`Layout::FIXED`], held from the lowest to the highest index recorded (latencies leave the low
/// buckets empty: a 5 to 15 ms histogram holds about 200 counts, not the 1,100 from zero), so merging touches,
/// zeroes and copies only the range in use.
#[derive(Debug, Clone, Default)]
pub(crate) struct HdrAccumulator {
    /// Counts of indexes `base..base + counts.len()`.
    counts: Vec<Count>,
    base: usize,
    total: u64,
}

impl PartialEq for HdrAccumulator {
    /// The same counts at the same indexes, whatever range each holds.
    fn eq(&self, other: &Self) -> bool {
        self.total == other.total && self.nonzero().eq(other.nonzero())
    }
}

impl Eq for HdrAccumulator {}

/// What is read from an accumulator, in recorded integers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HdrStats {
    /// Values recorded.
    pub(crate) count: u64,
    /// Mean, from each bucket's median equivalent value.
    pub(crate) mean: f64,
    /// Median.
    pub(crate) p50: u64,
    /// 90th percentile.
    pub(crate) p90: u64,
    /// 99th percentile.
    pub(crate) p99: u64,
    /// 99.9th percentile.
    pub(crate) p999: u64,
    /// Largest value (the highest equivalent of the top bucket).
    pub(crate) max: u64,
}

impl HdrAccumulator {
    /// The range of fixed-layout indexes `v2` adds counts to, if it holds any.
    fn range_of(v2: &CheckedV2) -> Option<(usize, usize)> {
        if v2.total == 0 {
            return None;
        }
        let fixed = Layout::FIXED;
        if v2.layout == fixed {
            return Some((v2.min_index, v2.max_index));
        }
        let low = fixed.index_of(v2.layout.value_at(v2.min_index)?);
        let high = fixed.index_of(v2.layout.value_at(v2.max_index)?);
        Some((low, high))
    }

    /// The range held after also holding `low..=high`.
    fn covering(&self, low: usize, high: usize) -> (usize, usize) {
        if self.counts.is_empty() {
            (low, high)
        } else {
            (
                self.base.min(low),
                (self.base + self.counts.len() - 1).max(high),
            )
        }
    }

    /// Holds `low..=high` as well (new counts zero).
    fn cover(&mut self, low: usize, high: usize) {
        let (from, to) = self.covering(low, high);
        if self.counts.is_empty() {
            self.base = from;
        } else if from < self.base {
            let shift = self.base - from;
            self.counts.splice(0..0, std::iter::repeat_n(0, shift));
            self.base = from;
        }
        if to - self.base + 1 > self.counts.len() {
            self.counts.resize(to - self.base + 1, 0);
        }
    }

    /// Bytes adding `v2` would allocate (the range held grows to what `v2` reaches).
    pub(crate) fn growth(&self, v2: &CheckedV2) -> usize {
        Self::range_of(v2).map_or(0, |(low, high)| {
            let (from, to) = self.covering(low, high);
            (to - from + 1).saturating_sub(self.counts.len()) * std::mem::size_of::<Count>()
        })
    }

    /// Adds a checked encoding's counts.
    pub(crate) fn add_v2(&mut self, v2: &CheckedV2) {
        let Some((low, high)) = Self::range_of(v2) else {
            return;
        };
        self.cover(low, high);
        let payload = &v2.bytes[HEADER..];
        let fixed = Layout::FIXED;
        let (counts, base) = (&mut self.counts, self.base);
        if v2.layout == fixed {
            add_fixed(payload, counts, base);
        } else {
            let layout = v2.layout;
            each_step(payload, |i, c| {
                if c == 0 {
                    return;
                }
                if let Some(value) = layout.value_at(i) {
                    let at = fixed.index_of(value);
                    if let Some(slot) = at.checked_sub(base).and_then(|k| counts.get_mut(k)) {
                        *slot = slot.saturating_add(to_count(c));
                    }
                }
            });
        }
        self.total = self.total.saturating_add(v2.total);
    }

    /// Adds another accumulator's counts (deriving a split from its leaves).
    pub(crate) fn add(&mut self, other: &HdrAccumulator) {
        if !other.counts.is_empty() {
            self.cover(other.base, other.base + other.counts.len() - 1);
            let at = other.base - self.base;
            for (mine, theirs) in self.counts[at..].iter_mut().zip(&other.counts) {
                *mine = mine.saturating_add(*theirs);
            }
        }
        self.total = self.total.saturating_add(other.total);
    }

    /// Every index with a count, and its count, in index order.
    fn nonzero(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(k, c)| (self.base + k, u64::from(*c)))
    }

    /// Values recorded.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// The value at `quantile`, as `hdrhistogram`'s `value_at_quantile` reads it.
    #[cfg(test)]
    pub(crate) fn value_at_quantile(&self, quantile: f64) -> u64 {
        let quantile = quantile.min(1.0);
        let wanted = ((quantile * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, count) in self.nonzero() {
            seen = seen.saturating_add(count);
            if seen >= wanted {
                let value = Layout::FIXED.value_at(i).unwrap_or(u64::MAX);
                return if quantile == 0.0 {
                    Layout::FIXED.lowest_equivalent(value)
                } else {
                    Layout::FIXED.highest_equivalent(value)
                };
            }
        }
        0
    }

    /// Count, mean, percentiles and max, each as `hdrhistogram` computes it, in one pass over the counts.
    pub(crate) fn stats(&self) -> HdrStats {
        const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];
        let fixed = Layout::FIXED;
        // Ranks and mean from the counts held: the total, unless a bucket saturated (billions of values in one
        // bucket of one second), when the counts add up to less and the total would put ranks past them. No bucket
        // can hold more than the total, so below `Count::MAX` values nothing saturated and the sum is not needed.
        let held: u64 = if self.total <= u64::from(Count::MAX) {
            self.total
        } else {
            self.counts.iter().map(|c| u64::from(*c)).sum()
        };
        let wanted = QUANTILES.map(|q| ((q * held as f64).ceil() as u64).max(1));
        let mut found = [0u64; 4];
        let mut next = 0;
        let (mut seen, mut mean, mut top) = (0u64, 0.0_f64, None);
        for (i, count) in self.nonzero() {
            let value = fixed.value_at(i).unwrap_or(u64::MAX);
            seen = seen.saturating_add(count);
            while next < wanted.len() && seen >= wanted[next] {
                found[next] = fixed.highest_equivalent(value);
                next += 1;
            }
            mean += fixed.median_equivalent(value) as f64 * count as f64 / held as f64;
            top = Some(value);
        }
        let max = top.map_or(0, |v| fixed.highest_equivalent(v));
        HdrStats {
            count: self.total,
            mean: if held == 0 { 0.0 } else { mean },
            p50: found[0],
            p90: found[1],
            p99: found[2],
            p999: found[3],
            max,
        }
    }

    /// The same counts as an `hdrhistogram` histogram (for the canary's tests on merged buckets).
    pub(crate) fn to_histogram(&self) -> Histogram<u64> {
        let top = self
            .nonzero()
            .last()
            .and_then(|(i, _)| Layout::FIXED.value_at(i))
            .unwrap_or(2);
        let mut h = Histogram::new_with_bounds(1, top.max(2), 2).unwrap_or_else(|_| {
            Histogram::new(2).expect("two significant digits are a valid precision")
        });
        h.auto(true);
        for (i, count) in self.nonzero() {
            if let Some(value) = Layout::FIXED.value_at(i) {
                // Same layout: lands on index i. Cannot fail with auto-resize on.
                h.record_n(value, count).ok();
            }
        }
        h
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hdrhistogram::serialization::{Serializer, V2Serializer};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// `values` recorded in a histogram of `lowest` and `sigfig`, encoded as V2.
    pub(crate) fn encoded(values: &[u64], lowest: u64, sigfig: u8) -> (Histogram<u64>, Bytes) {
        let mut h = Histogram::<u64>::new_with_bounds(lowest, lowest * 2, sigfig).unwrap();
        h.auto(true);
        for v in values {
            h.record(*v).unwrap();
        }
        let mut out = Vec::new();
        V2Serializer::new().serialize(&h, &mut out).unwrap();
        (h, out.into())
    }

    fn random_values(rng: &mut SmallRng) -> Vec<u64> {
        let n = rng.random_range(0..300);
        let spread = rng.random_range(1..40);
        let mut values: Vec<u64> = (0..n)
            .map(|_| {
                let magnitude = rng.random_range(0..spread);
                rng.random_range(0..=(1u64 << magnitude))
            })
            .collect();
        // A few buckets with counts of 64 or more (varints of two bytes) amid the one-byte ones.
        for _ in 0..rng.random_range(0..4) {
            let magnitude = rng.random_range(0..spread);
            let value = rng.random_range(0..=(1u64 << magnitude));
            values.extend(std::iter::repeat_n(value, rng.random_range(40..300)));
        }
        values
    }

    /// Property: for random histograms of random layouts, merging their V2 bytes into an accumulator gives the
    /// same counts and the same statistics as `hdrhistogram`'s deserialize + `add` into a 2-digit histogram.
    #[test]
    fn merging_v2_bytes_equals_hdrhistogram_deserialize_and_add() {
        for seed in 0..300 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut reference = Histogram::<u64>::new_with_bounds(1, 2, 2).unwrap();
            reference.auto(true);
            let mut acc = HdrAccumulator::default();
            for _ in 0..rng.random_range(1..6) {
                let (lowest, sigfig) = match rng.random_range(0..4) {
                    0 => (1, 3),
                    1 => (1000, 2),
                    _ => (1, 2),
                };
                let values = random_values(&mut rng);
                let (h, bytes) = encoded(&values, lowest, sigfig);
                let checked = CheckedV2::check(bytes, 3, u64::MAX / 4).unwrap();
                assert_eq!(checked.total(), h.len());
                acc.add_v2(&checked);
                reference.add(&h).unwrap();
            }
            assert_eq!(acc.total(), reference.len(), "seed {seed}");
            for (k, count) in acc.counts.iter().enumerate() {
                let i = acc.base + k;
                let value = Layout::FIXED.value_at(i).unwrap();
                assert_eq!(
                    u64::from(*count),
                    reference.count_at(value),
                    "seed {seed}, index {i}"
                );
            }
            assert_eq!(
                acc.counts.iter().map(|c| u64::from(*c)).sum::<u64>(),
                reference.len(),
                "no count outside the accumulator, seed {seed}"
            );
            if reference.is_empty() {
                continue;
            }
            let stats = acc.stats();
            let expected = HdrStats {
                count: reference.len(),
                mean: reference.mean(),
                p50: reference.value_at_quantile(0.5),
                p90: reference.value_at_quantile(0.9),
                p99: reference.value_at_quantile(0.99),
                p999: reference.value_at_quantile(0.999),
                max: reference.max(),
            };
            assert_eq!(stats.mean.to_bits(), expected.mean.to_bits(), "seed {seed}");
            for q in [0.0, 0.25, 0.75, 1.0] {
                assert_eq!(
                    acc.value_at_quantile(q),
                    reference.value_at_quantile(q),
                    "seed {seed} q {q}"
                );
            }
            assert_eq!(stats, expected, "seed {seed}");
            let back = acc.to_histogram();
            assert_eq!(back.len(), reference.len());
            assert_eq!(back.value_at_quantile(0.99), expected.p99);
        }
    }

    /// ZigZag LEB128, as HdrHistogram's V2 payload writes each count (negative: a run of empty buckets).
    fn zigzag(value: i64, out: &mut Vec<u8>) {
        let mut v = ((value << 1) ^ (value >> 63)) as u64;
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Writes `v` as HdrHistogram's varint (LEB128, the ninth byte contributing all eight bits), no ZigZag.
    fn raw_varint(mut v: u64, out: &mut Vec<u8>) {
        for _ in 0..8 {
            if v < 0x80 {
                out.push(v as u8);
                return;
            }
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Every non-zero count of a payload at its index, read one varint at a time with nothing else in the way;
    /// refuses truncated varints and indexes past `usize::MAX`.
    fn counts_one_at_a_time(payload: &[u8]) -> Result<Vec<(usize, u64)>, V2Error> {
        let (mut index, mut at, mut counts) = (0usize, 0usize, Vec::new());
        while at < payload.len() {
            let (raw, used) = varint(&payload[at..]).ok_or(V2Error::Encoding)?;
            at += used;
            let step = if raw & 1 == 1 {
                usize::try_from(raw >> 1)
                    .ok()
                    .and_then(|zeros| zeros.checked_add(1))
                    .ok_or(V2Error::Encoding)?
            } else {
                if raw > 0 {
                    counts.push((index, raw >> 1));
                }
                1
            };
            index = index.checked_add(step).ok_or(V2Error::Encoding)?;
        }
        Ok(counts)
    }

    /// What [`scan`] must say of any input, well-formed or not, from the counts read one varint at a time: the
    /// same refusals, the same range check, the same lowest and highest index and total.
    fn scan_one_at_a_time(payload: &[u8], len: usize) -> Result<Scan, V2Error> {
        let counts = counts_one_at_a_time(payload)?;
        if counts.last().is_some_and(|(index, _)| *index >= len) {
            return Err(V2Error::Encoding);
        }
        if counts.iter().any(|(_, c)| *c > u64::from(Count::MAX)) {
            return Err(V2Error::Count);
        }
        Ok(Scan {
            min_index: counts.first().map_or(usize::MAX, |(index, _)| *index),
            max_index: counts.last().map_or(0, |(index, _)| *index),
            total: counts
                .iter()
                .fold(0u64, |sum, (_, c)| sum.saturating_add(*c)),
        })
    }

    /// On random bytes (mostly one-byte varints, some longer, some cut short), on payloads that only skip, and on
    /// runs of empty buckets that bring the index next to overflow before one-byte varints, the check says what the
    /// one-at-a-time check says: the same refusal or the same lowest and highest index and total.
    #[test]
    fn the_check_agrees_with_one_varint_at_a_time_on_any_bytes() {
        let mut rng = SmallRng::seed_from_u64(21);
        let mut payloads: Vec<Vec<u8>> = Vec::new();
        for _ in 0..20_000 {
            let n = rng.random_range(0..40);
            payloads.push(
                (0..n)
                    .map(|_| {
                        if rng.random_bool(0.9) {
                            rng.random_range(0..0x80u8)
                        } else {
                            rng.random::<u8>()
                        }
                    })
                    .collect(),
            );
        }
        // Only runs of empty buckets, up to the longest a byte holds (0x7f: 64 buckets).
        payloads.push(vec![0x7f; 24]);
        payloads.push([1u8, 3, 0x7f, 5, 7, 9, 11, 13, 15, 0x7f, 1].to_vec());
        // A run that brings the index to just below, at and past where the eight-at-once path stops, then
        // one-byte counts and runs: one way or the other, an index past usize::MAX is refused.
        for below in [700u64, 600, 513, 512, 511, 70, 64, 1, 0] {
            // Two runs (one holds at most 2^63 buckets) to index usize::MAX - below.
            let mut payload = Vec::new();
            let first = 1u64 << 63;
            raw_varint(((first - 1) << 1) | 1, &mut payload);
            raw_varint(((u64::MAX - below - first - 1) << 1) | 1, &mut payload);
            let mut longest = payload.clone();
            payload.extend_from_slice(&[2, 0x7f, 4, 0x7f, 0x7f, 6, 0x7f, 0x7f, 0x7f, 0x7f, 8, 2]);
            payloads.push(payload);
            // Eight of the longest runs (512 buckets) in one window: the most an eight-at-once step moves.
            longest.extend_from_slice(&[0x7f; 8]);
            longest.extend_from_slice(&[2, 4]);
            payloads.push(longest);
        }
        for payload in &payloads {
            for len in [0usize, 1, 64, 300, usize::MAX] {
                assert_eq!(
                    scan(payload, len),
                    scan_one_at_a_time(payload, len),
                    "payload {payload:?}, len {len}"
                );
            }
        }
    }

    /// The eight-at-once paths of the merge and of the check read what one varint at a time reads, whichever
    /// offset of an eight-byte window a longer varint starts at, and in payloads shorter than, equal to and just
    /// past one or two windows.
    #[test]
    fn reading_eight_bytes_at_once_agrees_with_one_at_a_time() {
        for len in [7usize, 8, 9, 15, 16, 17, 40] {
            for long_at in 0..len {
                let mut payload = Vec::new();
                for i in 0..len {
                    let value = if i == long_at {
                        300
                    } else if i % 3 == 2 {
                        -(i as i64 % 5 + 1)
                    } else {
                        (i as i64 % 7) + 1
                    };
                    zigzag(value, &mut payload);
                }
                let mut stepped = Vec::new();
                each_step(&payload, |index, count| {
                    if count > 0 {
                        stepped.push((index, count));
                    }
                });
                let reference = counts_one_at_a_time(&payload).unwrap();
                assert_eq!(stepped, reference, "len {len}, long varint at {long_at}");
                let scanned = scan(&payload, usize::MAX).unwrap();
                let expected = Scan {
                    min_index: stepped.first().unwrap().0,
                    max_index: stepped.last().unwrap().0,
                    total: stepped.iter().map(|(_, count)| count).sum(),
                };
                assert_eq!(scanned, expected, "len {len}, long varint at {long_at}");
                assert!(
                    stepped.iter().any(|(_, count)| *count == 300),
                    "the two-byte count is read"
                );
                // The range holds the last count exactly, and refuses it one index short, whichever path read it.
                let last = expected.max_index;
                assert!(scan(&payload, last + 1).is_ok());
                assert_eq!(scan(&payload, last), Err(V2Error::Encoding));
            }
        }
    }

    #[test]
    fn adding_accumulators_equals_adding_their_bytes() {
        let mut rng = SmallRng::seed_from_u64(9);
        let (mut a, mut b, mut both) = Default::default();
        for target in [&mut a, &mut b] {
            let (_, bytes) = encoded(&random_values(&mut rng), 1, 2);
            let checked = CheckedV2::check(bytes, 3, u64::MAX / 4).unwrap();
            HdrAccumulator::add_v2(target, &checked);
            HdrAccumulator::add_v2(&mut both, &checked);
        }
        HdrAccumulator::add(&mut a, &b);
        assert_eq!(a, both);
    }

    #[test]
    fn hostile_encodings_are_refused_before_anything_is_allocated() {
        let (_, good) = encoded(&[5, 50, 500], 1, 2);
        let mut cases: Vec<(&str, Vec<u8>, V2Error)> = Vec::new();
        cases.push(("empty", Vec::new(), V2Error::Encoding));
        cases.push(("header only, cut", good[..20].to_vec(), V2Error::Encoding));
        let mut cookie = good.to_vec();
        cookie[3] ^= 0x01;
        cases.push(("cookie", cookie, V2Error::Encoding));
        let mut length = good.to_vec();
        length[7] = length[7].wrapping_add(1);
        cases.push(("declared length", length, V2Error::Encoding));
        let mut sigfig = good.to_vec();
        sigfig[15] = 5;
        cases.push(("precision", sigfig, V2Error::Range));
        let mut highest = good.to_vec();
        highest[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        cases.push(("declared range", highest, V2Error::Range));
        let mut truncated = good.to_vec();
        truncated.push(0x80);
        let len = (truncated.len() - HEADER) as u32;
        truncated[4..8].copy_from_slice(&len.to_be_bytes());
        cases.push(("truncated varint", truncated, V2Error::Encoding));
        let mut skip = good[..HEADER].to_vec();
        skip.extend([0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x02]);
        let len = (skip.len() - HEADER) as u32;
        skip[4..8].copy_from_slice(&len.to_be_bytes());
        cases.push(("count far past the declared range", skip, V2Error::Encoding));
        let mut huge = good[..HEADER].to_vec();
        zigzag(1 << 32, &mut huge);
        let len = (huge.len() - HEADER) as u32;
        huge[4..8].copy_from_slice(&len.to_be_bytes());
        cases.push(("a count too large for a bucket", huge, V2Error::Count));
        for (what, bytes, error) in cases {
            assert_eq!(
                CheckedV2::check(bytes.into(), 3, 1 << 53).map(|c| c.total()),
                Err(error),
                "{what}"
            );
        }
        assert_eq!(CheckedV2::check(good, 3, 1 << 53).map(|c| c.total()), Ok(3));
    }

    /// Three instances with the largest count a bucket takes at 10, one with half of it at 1,000: the bucket at 10
    /// saturates, the total does not, and the quantiles are read from the counts held (from the total, the median
    /// would land past the saturated bucket, at 1,000).
    #[test]
    fn a_saturated_bucket_keeps_the_quantiles_of_what_is_held() {
        let mut acc = HdrAccumulator::default();
        for (value, count) in [(10, Count::MAX); 3]
            .into_iter()
            .chain([(1000, Count::MAX / 2)])
        {
            let mut h = Histogram::<u64>::new_with_bounds(1, 2, 2).unwrap();
            h.auto(true);
            h.record_n(value, u64::from(count)).unwrap();
            let mut out = Vec::new();
            V2Serializer::new().serialize(&h, &mut out).unwrap();
            acc.add_v2(&CheckedV2::check(out.into(), 3, 1 << 53).unwrap());
        }
        let stats = acc.stats();
        assert_eq!(
            stats.count,
            3 * u64::from(Count::MAX) + u64::from(Count::MAX / 2)
        );
        let high = Layout::FIXED.highest_equivalent(1000);
        assert_eq!((stats.p50, stats.p99, stats.max), (10, high, high));
    }

    /// The largest count a bucket takes passes; one more is refused as a count, unless the payload is also
    /// malformed or counts past its range, which are what is said first (as the one-at-a-time check says).
    #[test]
    fn a_count_past_a_bucket_is_refused_after_encoding_errors() {
        let one = |count: u64, then: &[u8]| {
            let mut payload = Vec::new();
            zigzag(count as i64, &mut payload);
            payload.extend_from_slice(then);
            payload
        };
        let cases = [
            (one(u64::from(Count::MAX), &[]), 10, Ok(())),
            (one(u64::from(Count::MAX) + 1, &[]), 10, Err(V2Error::Count)),
            (
                one(u64::from(Count::MAX) + 1, &[0x80]),
                10,
                Err(V2Error::Encoding),
            ),
            (
                one(u64::from(Count::MAX) + 1, &[]),
                0,
                Err(V2Error::Encoding),
            ),
        ];
        for (payload, len, expected) in cases {
            assert_eq!(
                scan(&payload, len).map(|_| ()),
                expected,
                "{payload:?} {len}"
            );
            assert_eq!(
                scan_one_at_a_time(&payload, len).map(|_| ()),
                expected,
                "{payload:?} {len}"
            );
        }
    }

    #[test]
    fn the_fixed_layout_is_hdrhistograms_two_digit_layout() {
        let reference = Histogram::<u64>::new(2).unwrap();
        for value in [
            0,
            1,
            127,
            128,
            255,
            256,
            257,
            1000,
            123_456,
            1 << 40,
            u64::MAX / 3,
        ] {
            let index = Layout::FIXED.index_of(value);
            let lowest = Layout::FIXED.value_at(index).unwrap();
            assert_eq!(lowest, reference.lowest_equivalent(value), "{value}");
            assert_eq!(
                Layout::FIXED.highest_equivalent(value),
                reference.highest_equivalent(value),
                "{value}"
            );
        }
        assert_eq!(Layout::new(1, 2), Some(Layout::FIXED));
        assert_eq!(Layout::new(0, 2), None);
    }
}
