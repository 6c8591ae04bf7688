//! Merging one second's series across instances: counters summed, gauges spread, histograms merged bucket by
//! bucket (percentiles are read from the merged counts, never averaged). Pure: no I/O, no tokio.

use hdrhistogram::Histogram;

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
        /// Counts merged so far.
        hist: Box<Histogram<u64>>,
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
    /// The merged histogram could not hold the values.
    #[error("histogram merge failed")]
    HistogramRange,
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
            SeriesValue::Histogram { hist, scale } => {
                let mut hist = hist.clone();
                hist.auto(true);
                Cell::Histogram {
                    hist,
                    scale: *scale,
                    instances: 1,
                }
            }
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
                    hist,
                    scale,
                    instances,
                },
                SeriesValue::Histogram {
                    hist: other,
                    scale: other_scale,
                },
            ) => {
                if scale != other_scale {
                    return Err(MergeError::ScaleConflict);
                }
                hist.add(other.as_ref())
                    .map_err(|_| MergeError::HistogramRange)?;
                *instances += 1;
            }
            _ => return Err(MergeError::KindConflict),
        }
        Ok(())
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
            Cell::Histogram { hist, scale, .. } => {
                let scale = f64::from((*scale).max(1));
                let q = |quantile: f64| hist.value_at_quantile(quantile) as f64 / scale;
                if hist.is_empty() {
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
                Stats::Histogram {
                    count: hist.len(),
                    mean: hist.mean() / scale,
                    p50: q(0.5),
                    p90: q(0.9),
                    p99: q(0.99),
                    p999: q(0.999),
                    max: hist.max() as f64 / scale,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: impl IntoIterator<Item = u64>) -> SeriesValue {
        let mut h = Histogram::<u64>::new(2).unwrap();
        for v in values {
            h.record(v).unwrap();
        }
        SeriesValue::Histogram {
            hist: Box::new(h),
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
        let other_scale = SeriesValue::Histogram {
            hist: Box::new(Histogram::new(2).unwrap()),
            scale: 1,
        };
        assert_eq!(h.merge(&other_scale), Err(MergeError::ScaleConflict));
        assert_eq!(h.instances(), 1);
    }
}
