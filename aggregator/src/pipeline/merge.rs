//! Merging one second's series across instances: counters summed, gauges spread, histograms merged bucket by
//! bucket (percentiles are read from the merged counts, never averaged). Pure: no I/O, no tokio.

use crate::model::hdr::HdrAccumulator;
use crate::model::{SeriesValue, Stats};

/// The merge of one series in one split for one second.
#[derive(Debug, Clone)]
pub(crate) enum Cell {
    /// Sum of counter deltas.
    Counter {
        /// Running sum.
        sum: f64,
        /// Contributing instances.
        instances: u32,
    },
    /// Spread of gauge values.
    Gauge {
        /// Smallest value.
        min: f64,
        /// Largest value.
        max: f64,
        /// Sum of values.
        sum: f64,
        /// Contributing instances.
        instances: u32,
    },
    /// Merged histogram.
    Histogram {
        /// Counts merged so far, in the fixed layout.
        acc: HdrAccumulator,
        /// Recorded integers per unit; every contribution must share it.
        scale: u32,
        /// Contributing instances.
        instances: u32,
    },
}

/// Why a contribution could not be merged into a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MergeError {
    /// The series was a different kind (counter, gauge, histogram) in another instance this second.
    #[error("series kind differs from other instances")]
    KindConflict,
    /// A histogram's scale differs from other instances' for the same series.
    #[error("histogram scale differs from other instances")]
    ScaleConflict,
}

impl Cell {
    /// A cell holding one contribution.
    pub(crate) fn new(value: &SeriesValue) -> Self {
        match value {
            SeriesValue::Counter(v) => Cell::Counter {
                sum: *v,
                instances: 1,
            },
            SeriesValue::Gauge(v) => Cell::Gauge {
                min: *v,
                max: *v,
                sum: *v,
                instances: 1,
            },
            SeriesValue::Histogram { v2, scale } => {
                let mut acc = HdrAccumulator::default();
                acc.add_v2(v2);
                Cell::Histogram {
                    acc,
                    scale: *scale,
                    instances: 1,
                }
            }
        }
    }

    /// Bytes a new cell for `value` takes.
    pub(crate) fn cost(value: &SeriesValue) -> usize {
        let counts = match value {
            SeriesValue::Histogram { v2, .. } => HdrAccumulator::default().growth(v2),
            _ => 0,
        };
        std::mem::size_of::<Cell>() + counts
    }

    /// Bytes merging `value` would allocate (a histogram's counts growing).
    pub(crate) fn growth(&self, value: &SeriesValue) -> usize {
        match (self, value) {
            (Cell::Histogram { acc, .. }, SeriesValue::Histogram { v2, .. }) => acc.growth(v2),
            _ => 0,
        }
    }

    /// Adds one instance's value.
    pub(crate) fn merge(&mut self, value: &SeriesValue) -> Result<(), MergeError> {
        match (self, value) {
            (Cell::Counter { sum, instances }, SeriesValue::Counter(v)) => {
                *sum += v;
                *instances += 1;
            }
            (
                Cell::Gauge {
                    min,
                    max,
                    sum,
                    instances,
                },
                SeriesValue::Gauge(v),
            ) => {
                *min = min.min(*v);
                *max = max.max(*v);
                *sum += v;
                *instances += 1;
            }
            (
                Cell::Histogram {
                    acc,
                    scale,
                    instances,
                },
                SeriesValue::Histogram {
                    v2,
                    scale: other_scale,
                },
            ) => {
                if scale != other_scale {
                    return Err(MergeError::ScaleConflict);
                }
                acc.add_v2(v2);
                *instances += 1;
            }
            _ => return Err(MergeError::KindConflict),
        }
        Ok(())
    }

    /// Adds another cell of the same series (a leaf into a split). Leaves of one series share kind and scale:
    /// a conflicting contribution never entered any leaf.
    pub(crate) fn absorb(&mut self, other: &Cell) {
        match (self, other) {
            (
                Cell::Counter { sum, instances },
                Cell::Counter {
                    sum: s,
                    instances: n,
                },
            ) => {
                *sum += s;
                *instances += n;
            }
            (
                Cell::Gauge {
                    min,
                    max,
                    sum,
                    instances,
                },
                Cell::Gauge {
                    min: lo,
                    max: hi,
                    sum: s,
                    instances: n,
                },
            ) => {
                *min = min.min(*lo);
                *max = max.max(*hi);
                *sum += s;
                *instances += n;
            }
            (
                Cell::Histogram { acc, instances, .. },
                Cell::Histogram {
                    acc: other,
                    instances: n,
                    ..
                },
            ) => {
                acc.add(other);
                *instances += n;
            }
            _ => debug_assert!(false, "leaves of one series differ in kind"),
        }
    }

    /// Instances merged into this cell.
    pub(crate) fn instances(&self) -> u32 {
        match self {
            Cell::Counter { instances, .. }
            | Cell::Gauge { instances, .. }
            | Cell::Histogram { instances, .. } => *instances,
        }
    }

    /// The cell's statistics, in the metric's unit.
    pub(crate) fn stats(&self) -> Stats {
        match self {
            Cell::Counter { sum, .. } => Stats::Counter { sum: *sum },
            Cell::Gauge {
                min,
                max,
                sum,
                instances,
            } => Stats::Gauge {
                min: *min,
                max: *max,
                mean: sum / f64::from((*instances).max(1)),
                sum: *sum,
            },
            Cell::Histogram { acc, scale, .. } => {
                let scale = f64::from((*scale).max(1));
                if acc.total() == 0 {
                    return Stats::Histogram {
                        count: 0,
                        mean: 0.0,
                        p50: 0.0,
                        p90: 0.0,
                        p99: 0.0,
                        p999: 0.0,
                        max: 0.0,
                    };
                }
                let s = acc.stats();
                let unit = |v: u64| v as f64 / scale;
                Stats::Histogram {
                    count: s.count,
                    mean: s.mean / scale,
                    p50: unit(s.p50),
                    p90: unit(s.p90),
                    p99: unit(s.p99),
                    p999: unit(s.p999),
                    max: unit(s.max),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: impl IntoIterator<Item = u64>) -> SeriesValue {
        let values: Vec<u64> = values.into_iter().collect();
        let (_, bytes) = crate::model::hdr::tests::encoded(&values, 1, 2);
        SeriesValue::Histogram {
            v2: crate::model::hdr::CheckedV2::check(bytes, 3, 1 << 53).unwrap(),
            scale: 1000,
        }
    }

    fn merge_all(values: &[SeriesValue]) -> Result<Cell, MergeError> {
        let mut cell = Cell::new(&values[0]);
        for v in &values[1..] {
            cell.merge(v)?;
        }
        Ok(cell)
    }

    #[test]
    fn counters_and_gauges() {
        let table: Vec<(Vec<SeriesValue>, Stats)> = vec![
            (
                vec![SeriesValue::Counter(3.0), SeriesValue::Counter(4.5)],
                Stats::Counter { sum: 7.5 },
            ),
            (vec![SeriesValue::Counter(0.0)], Stats::Counter { sum: 0.0 }),
            (
                vec![
                    SeriesValue::Gauge(2.0),
                    SeriesValue::Gauge(-4.0),
                    SeriesValue::Gauge(8.0),
                ],
                Stats::Gauge {
                    min: -4.0,
                    max: 8.0,
                    mean: 2.0,
                    sum: 6.0,
                },
            ),
        ];
        for (values, expected) in table {
            let cell = merge_all(&values).unwrap();
            assert_eq!(cell.stats(), expected);
            assert_eq!(cell.instances() as usize, values.len());
        }
    }

    #[test]
    fn histograms_merge_counts_not_percentiles() {
        // Instance A: 990 fast values (1 ms), B: 10 slow values (500 ms) -> the union's p99 is fast, its p99.9 slow,
        // while averaging the instances' p99s would give ~250 ms.
        let a = hist(std::iter::repeat_n(1_000, 990));
        let b = hist(std::iter::repeat_n(500_000, 10));
        let cell = merge_all(&[a, b]).unwrap();
        let Stats::Histogram {
            count,
            p50,
            p99,
            p999,
            max,
            ..
        } = cell.stats()
        else {
            panic!("not a histogram")
        };
        assert_eq!(count, 1000);
        assert!((p50 - 1.0).abs() < 0.02, "p50 {p50}");
        assert!((p99 - 1.0).abs() < 0.02, "p99 {p99}");
        assert!((p999 - 500.0).abs() < 5.0, "p999 {p999}");
        assert!((max - 500.0).abs() < 5.0, "max {max}");
    }

    #[test]
    fn conflicts_are_refused_and_leave_the_cell_intact() {
        let mut cell = Cell::new(&SeriesValue::Counter(1.0));
        assert_eq!(
            cell.merge(&SeriesValue::Gauge(1.0)),
            Err(MergeError::KindConflict)
        );
        assert_eq!(cell.stats(), Stats::Counter { sum: 1.0 });
        let mut h = Cell::new(&hist([1]));
        let SeriesValue::Histogram { v2, .. } = hist([2]) else {
            unreachable!()
        };
        let other_scale = SeriesValue::Histogram { v2, scale: 1 };
        assert_eq!(h.merge(&other_scale), Err(MergeError::ScaleConflict));
        assert_eq!(h.instances(), 1);
    }

    #[test]
    fn a_split_absorbed_from_leaves_equals_merging_every_contribution_into_it() {
        let values = [
            hist([1_000, 2_000]),
            hist([3_000]),
            hist([500_000, 7]),
            hist([40_000]),
        ];
        let whole = merge_all(&values).unwrap();
        let mut split = merge_all(&values[..1]).unwrap();
        split.absorb(&merge_all(&values[1..3]).unwrap());
        split.absorb(&merge_all(&values[3..]).unwrap());
        assert_eq!(split.stats(), whole.stats());
        assert_eq!(split.instances(), 4);
        let mut gauges = Cell::new(&SeriesValue::Gauge(3.0));
        gauges.absorb(&Cell::new(&SeriesValue::Gauge(-1.0)));
        assert_eq!(
            gauges.stats(),
            Stats::Gauge {
                min: -1.0,
                max: 3.0,
                mean: 1.0,
                sum: 2.0
            }
        );
    }
}
