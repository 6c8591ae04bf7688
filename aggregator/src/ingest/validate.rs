//! Turns wire messages into the aggregator's types, enforcing every limit. Pure: no I/O, no tokio.
//! Bad data is dropped series by series with a reason; only a bad identity or second refuses a whole message.

use std::sync::Arc;

use prost::Message as _;
use strobe_proto as pb;
use thiserror::Error;

use crate::auth::{Denied, Tokens};
use crate::health::DropReason;
use crate::limits::Limits;
use crate::model::hdr::{CheckedV2, V2Error};
use crate::model::table::{SeriesId, SeriesTable};
use crate::model::{AgentCounts, Instance, InstanceSecond, SeriesKey, SeriesValue};

/// Why a whole hello or snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum Refusal {
    /// The hello has no identity, or a required field is empty.
    #[error("identity field `{0}` is missing or empty")]
    MissingIdentity(&'static str),
    /// An identity field is too long or has control characters.
    #[error("identity field `{0}` is longer than max_name_bytes or has control characters")]
    BadIdentity(&'static str),
    /// The token is not one of the configured agent tokens.
    #[error("unknown agent token")]
    BadToken,
    /// The token is known but bound to other services.
    #[error("this agent token may not stream for service {0:?}")]
    TokenNotForService(String),
    /// The snapshot's second is older than `max_snapshot_age`: nothing that old can still be merged or replayed.
    #[error("second {second} is {behind}s in the past (max_snapshot_age {limit}s)")]
    PastSecond {
        /// The snapshot's second.
        second: i64,
        /// How far behind the aggregator's clock.
        behind: i64,
        /// The configured limit in seconds.
        limit: u64,
    },
    /// The snapshot's second is further in the future than `max_future_skew` allows.
    #[error("second {second} is {ahead}s in the future (max_future_skew {limit}s)")]
    FutureSecond {
        /// The snapshot's second.
        second: i64,
        /// How far ahead of the aggregator's clock.
        ahead: i64,
        /// The configured limit in seconds.
        limit: u64,
    },
}

impl Refusal {
    /// The configured limit this refusal names, for the wire and for counters.
    /// Refused for now, not for what the snapshot holds: its second is ahead of this clock, which an agent fixes by
    /// following the aggregator's clock and sending it again.
    pub(crate) fn is_for_now(&self) -> bool {
        matches!(self, Refusal::FutureSecond { .. })
    }

    pub(crate) fn reason(&self) -> DropReason {
        match self {
            Refusal::MissingIdentity(_) => DropReason::Identity,
            Refusal::BadIdentity(_) => DropReason::MaxNameBytes,
            Refusal::BadToken | Refusal::TokenNotForService(_) => DropReason::AgentTokens,
            Refusal::FutureSecond { .. } => DropReason::MaxFutureSkew,
            Refusal::PastSecond { .. } => DropReason::MaxSnapshotAge,
        }
    }
}

/// Why one series was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub(crate) enum SeriesProblem {
    /// More series than `max_series_per_snapshot`.
    #[error("more series than max_series_per_snapshot")]
    TooManySeries,
    /// Empty name, or a name or tag over `max_name_bytes`, or with control characters.
    #[error("empty or over-long name or tag (max_name_bytes)")]
    BadName,
    /// More tags than `max_tags_per_series`.
    #[error("more tags than max_tags_per_series")]
    TooManyTags,
    /// No value.
    #[error("series without a value")]
    MissingValue,
    /// NaN or infinite counter or gauge (a negative counter delta is fine: a decrement).
    #[error("counter or gauge is NaN or infinite")]
    BadNumber,
    /// Not an uncompressed HdrHistogram V2 encoding, or undecodable.
    #[error("histogram is not an uncompressed HdrHistogram V2 encoding")]
    BadHistogram,
    /// A series sent by dictionary id that its stream never named.
    #[error("series id unknown on this stream (the series dictionary)")]
    UnknownSeriesId,
    /// Declares more precision or range than `max_histogram_sigfig` / `max_histogram_value`, or a bad scale.
    #[error("histogram range, precision or scale beyond the limits")]
    HistogramOutOfRange,
    /// More values in one bucket than an accumulator's bucket holds.
    #[error("histogram counts more than 4,294,967,295 values in one bucket")]
    BucketCount,
    /// A new series of a service that has `max_series_per_service` already.
    #[error("the service has max_series_per_service series already")]
    ServiceFull,
}

impl SeriesProblem {
    /// The configured limit or rule this problem names.
    pub(crate) fn reason(self) -> DropReason {
        match self {
            SeriesProblem::TooManySeries => DropReason::MaxSeriesPerSnapshot,
            SeriesProblem::BadName => DropReason::MaxNameBytes,
            SeriesProblem::TooManyTags => DropReason::MaxTagsPerSeries,
            SeriesProblem::MissingValue => DropReason::MissingValue,
            SeriesProblem::BadNumber => DropReason::FiniteValues,
            SeriesProblem::BadHistogram => DropReason::HdrV2Encoding,
            SeriesProblem::HistogramOutOfRange => DropReason::MaxHistogramValue,
            SeriesProblem::BucketCount => DropReason::MaxBucketCount,
            SeriesProblem::UnknownSeriesId => DropReason::SeriesDictionary,
            SeriesProblem::ServiceFull => DropReason::MaxSeriesPerService,
        }
    }
}

/// A snapshot after validation: what is kept, and what was dropped and why.
#[derive(Debug)]
pub(crate) struct Validated {
    /// The series that passed.
    pub(crate) second: InstanceSecond,
    /// Dropped series, by reason, with their count.
    pub(crate) dropped: Vec<(SeriesProblem, u32)>,
}

/// Bytes a snapshot holds once decoded and waiting for its shard, which is what the queue to the shards is charged:
/// its encoded size (the histograms' bytes are kept as they came) and an entry of its vector of series each (80
/// bytes; 8 KB of a 100-series snapshot of about 10 KB, which the encoded size alone left out).
pub(crate) fn decoded_bytes(snapshot: &pb::Snapshot) -> usize {
    snapshot.encoded_len().saturating_add(
        snapshot
            .series
            .len()
            .saturating_mul(std::mem::size_of::<(SeriesId, SeriesValue)>()),
    )
}

fn check_text(value: &str, limits: &Limits) -> bool {
    !value.is_empty()
        && value.len() <= limits.max_name_bytes
        && !value.chars().any(char::is_control)
}

/// Validates a hello into the instance identity every snapshot of the stream carries.
pub(crate) fn validate_hello(
    hello: &pb::Hello,
    limits: &Limits,
    tokens: &Tokens,
) -> Result<Instance, Refusal> {
    let identity = hello
        .identity
        .as_ref()
        .ok_or(Refusal::MissingIdentity("identity"))?;
    match tokens.authorize_agent(&hello.token, &identity.service) {
        Ok(_) => {}
        Err(Denied::Unauthenticated) => return Err(Refusal::BadToken),
        Err(Denied::Forbidden) => {
            return Err(Refusal::TokenNotForService(identity.service.clone()));
        }
    }
    let required = [
        ("service", &identity.service),
        ("version", &identity.version),
        ("instance", &identity.instance),
    ];
    for (field, value) in required {
        if value.is_empty() {
            return Err(Refusal::MissingIdentity(field));
        }
        if !check_text(value, limits) {
            return Err(Refusal::BadIdentity(field));
        }
    }
    if !identity.zone.is_empty() && !check_text(&identity.zone, limits) {
        return Err(Refusal::BadIdentity("zone"));
    }
    Ok(Instance {
        service: identity.service.as_str().into(),
        id: identity.instance.as_str().into(),
        version: identity.version.as_str().into(),
        zone: (!identity.zone.is_empty()).then(|| identity.zone.as_str().into()),
        deployer: identity
            .labels
            .get("deployer")
            .filter(|d| check_text(d, limits))
            .map(|d| d.as_str().into()),
    })
}

/// One stream's series dictionary (see `strobe.proto`): what each id its agent named stands for in the service's
/// series table. Lives with its stream; ids past `max_series_per_stream` are not remembered (agents number from 1).
#[derive(Debug)]
pub(crate) struct StreamDictionary {
    table: Arc<SeriesTable>,
    ids: Vec<Option<SeriesId>>,
}

impl StreamDictionary {
    /// A stream's empty dictionary over its service's table.
    pub(crate) fn new(table: Arc<SeriesTable>) -> Self {
        Self {
            table,
            ids: Vec::new(),
        }
    }

    /// The series `series` stands for: named in full (interned, and remembered under its id if it has one and
    /// there is room), or its id alone.
    fn resolve(&mut self, series: &pb::Series, limits: &Limits) -> Result<SeriesId, SeriesProblem> {
        let id = series.id as usize;
        if series.name.is_empty() && series.tags.is_empty() && id != 0 {
            return self
                .ids
                .get(id)
                .copied()
                .flatten()
                .ok_or(SeriesProblem::UnknownSeriesId);
        }
        let interned = match find_named(&self.table, series, limits) {
            Some(known) => known,
            None => {
                let key = series_key(series, limits)?;
                self.table.intern(key).ok_or(SeriesProblem::ServiceFull)?
            }
        };
        if id != 0 && id <= limits.max_series_per_stream {
            if self.ids.len() <= id {
                self.ids.resize(id + 1, None);
            }
            self.ids[id] = Some(interned);
        }
        Ok(interned)
    }

    /// Remembers the names a refused snapshot defined, so the seconds after it can refer to them.
    fn learn(&mut self, series: &[pb::Series], limits: &Limits) {
        for s in series.iter().filter(|s| !s.name.is_empty() && s.id != 0) {
            // A malformed definition is refused when it is used.
            self.resolve(s, limits).ok();
        }
    }
}

/// Validates one snapshot of `instance`, given the aggregator's current second; `dictionary` is its stream's.
pub(crate) fn validate_snapshot(
    snapshot: pb::Snapshot,
    instance: &Arc<Instance>,
    dictionary: &mut StreamDictionary,
    limits: &Limits,
    now_second: i64,
) -> Result<Validated, Refusal> {
    let ahead = snapshot.second.saturating_sub(now_second);
    let limit = limits.max_future_skew.as_secs();
    if ahead > i64::try_from(limit).unwrap_or(i64::MAX) {
        dictionary.learn(&snapshot.series, limits);
        return Err(Refusal::FutureSecond {
            second: snapshot.second,
            ahead,
            limit,
        });
    }
    let oldest = limits.max_snapshot_age.as_secs();
    if ahead < -i64::try_from(oldest).unwrap_or(i64::MAX) {
        dictionary.learn(&snapshot.series, limits);
        return Err(Refusal::PastSecond {
            second: snapshot.second,
            behind: ahead.saturating_neg(),
            limit: oldest,
        });
    }
    let agent = snapshot
        .stats
        .map_or_else(AgentCounts::default, |s| AgentCounts {
            lines_received: s.lines_received,
            lines_malformed: s.lines_malformed,
            series_over_limit: s.series_over_limit,
            snapshots_dropped: s.snapshots_dropped,
            values_clamped: s.values_clamped,
        });
    let mut dropped: Vec<(SeriesProblem, u32)> = Vec::new();
    let mut note = |problem: SeriesProblem| match dropped.iter_mut().find(|(p, _)| *p == problem) {
        Some((_, n)) => *n += 1,
        None => dropped.push((problem, 1)),
    };
    let total = snapshot.series.len();
    let mut series = Vec::with_capacity(total.min(limits.max_series_per_snapshot));
    for (index, s) in snapshot.series.into_iter().enumerate() {
        if index >= limits.max_series_per_snapshot {
            note(SeriesProblem::TooManySeries);
            dictionary.learn(std::slice::from_ref(&s), limits);
            continue;
        }
        match validate_series(s, dictionary, limits) {
            Ok(kv) => series.push(kv),
            Err(problem) => note(problem),
        }
    }
    Ok(Validated {
        second: InstanceSecond {
            instance: instance.clone(),
            t: snapshot.second,
            series,
            table: dictionary.table.clone(),
            agent,
            requests: None,
        },
        dropped,
    })
}

fn validate_series(
    series: pb::Series,
    dictionary: &mut StreamDictionary,
    limits: &Limits,
) -> Result<(SeriesId, SeriesValue), SeriesProblem> {
    // Named first even if its value is refused: the agent refers to it by number from now on.
    let key = dictionary.resolve(&series, limits)?;
    let value = match series.value.ok_or(SeriesProblem::MissingValue)? {
        // Counters may go down: DogStatsD decrements (`jobs.queued:-1|c`) are summed like any other delta.
        pb::series::Value::Counter(v) if v.is_finite() => SeriesValue::Counter(v),
        pb::series::Value::Gauge(v) if v.is_finite() => SeriesValue::Gauge(v),
        pb::series::Value::Counter(_) | pb::series::Value::Gauge(_) => {
            return Err(SeriesProblem::BadNumber);
        }
        pb::series::Value::Histogram(h) => decode_histogram(h, limits)?,
    };
    Ok((key, value))
}

/// The series `series` names, if its service's table already holds it (what every stream but the first to name it
/// finds): looked up by its spelling, building no key (and, up to eight tags, allocating nothing). A key in the
/// table was checked when it was interned, under the same limits, so the same spelling needs no check. Only for tags
/// in the order keys keep them (sorted, keys unique: what agents send) and within the tag limit; any other spelling
/// takes the long way, which checks, sorts and builds a key. A series new to the service is looked up both ways.
fn find_named(table: &SeriesTable, series: &pb::Series, limits: &Limits) -> Option<SeriesId> {
    // Up to this many tags are viewed on the stack (more take a vector).
    const INLINE: usize = 8;
    let n = series.tags.len();
    if n > limits.max_tags_per_series
        || !series.tags.windows(2).all(|pair| pair[0].key < pair[1].key)
    {
        return None;
    }
    fn view(tag: &pb::Tag) -> (&str, &str) {
        (tag.key.as_str(), tag.value.as_str())
    }
    if n <= INLINE {
        let mut tags = [("", ""); INLINE];
        for (slot, tag) in tags.iter_mut().zip(&series.tags) {
            *slot = view(tag);
        }
        table.find(&series.name, &tags[..n])
    } else {
        let tags: Vec<(&str, &str)> = series.tags.iter().map(view).collect();
        table.find(&series.name, &tags)
    }
}

/// A named series' key: name and tags checked, tags sorted (a repeated key keeps its last value).
fn series_key(series: &pb::Series, limits: &Limits) -> Result<SeriesKey, SeriesProblem> {
    if !check_text(&series.name, limits) {
        return Err(SeriesProblem::BadName);
    }
    if series.tags.len() > limits.max_tags_per_series {
        return Err(SeriesProblem::TooManyTags);
    }
    let mut tags: Vec<(Arc<str>, Arc<str>)> = Vec::with_capacity(series.tags.len());
    for tag in &series.tags {
        let value_ok =
            tag.value.len() <= limits.max_name_bytes && !tag.value.chars().any(char::is_control);
        if !check_text(&tag.key, limits) || !value_ok {
            return Err(SeriesProblem::BadName);
        }
        tags.push((tag.key.as_str().into(), tag.value.as_str().into()));
    }
    // Agents send tags sorted; a foreign client might not. Sort, and keep the last of a repeated key.
    tags.sort_by(|a, b| a.0.cmp(&b.0));
    tags.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            std::mem::swap(later, earlier);
            true
        } else {
            false
        }
    });
    Ok(SeriesKey::new(series.name.as_str().into(), tags.into()))
}

/// Checks an HdrHistogram V2 encoding without decoding it into a histogram: the header first (cookie, declared
/// length, precision, range), so a hostile header cannot make anything allocate, then every varint of the payload.
fn decode_histogram(h: pb::Histogram, limits: &Limits) -> Result<SeriesValue, SeriesProblem> {
    if h.scale == 0 || h.scale > limits.max_histogram_scale {
        return Err(SeriesProblem::HistogramOutOfRange);
    }
    let v2 = CheckedV2::check(
        h.hdr_v2,
        u32::from(limits.max_histogram_sigfig),
        limits.max_histogram_value,
    )
    .map_err(|error| match error {
        V2Error::Encoding => SeriesProblem::BadHistogram,
        V2Error::Range => SeriesProblem::HistogramOutOfRange,
        V2Error::Count => SeriesProblem::BucketCount,
    })?;
    Ok(SeriesValue::Histogram { v2, scale: h.scale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram;
    use hdrhistogram::serialization::{Serializer, V2Serializer};

    /// Validates `snapshot` as the first of a new stream.
    fn validate_fresh(
        snapshot: pb::Snapshot,
        limits: &Limits,
        now: i64,
    ) -> Result<Validated, Refusal> {
        validate_snapshot(snapshot, &instance(), &mut fresh_dictionary(), limits, now)
    }

    fn fresh_dictionary() -> StreamDictionary {
        StreamDictionary::new(Arc::new(SeriesTable::new(1_000)))
    }

    fn instance() -> Arc<Instance> {
        Arc::new(Instance {
            service: "svc".into(),
            id: "i1".into(),
            version: "v1".into(),
            zone: None,
            deployer: None,
        })
    }

    fn encoded(values: &[u64]) -> Vec<u8> {
        let mut h = Histogram::<u64>::new(2).unwrap();
        for v in values {
            h.record(*v).unwrap();
        }
        let mut out = Vec::new();
        V2Serializer::new().serialize(&h, &mut out).unwrap();
        out
    }

    fn series(name: &str, value: pb::series::Value) -> pb::Series {
        pb::Series {
            id: 0,
            name: name.into(),
            tags: vec![],
            value: Some(value),
        }
    }

    fn histogram(bytes: Vec<u8>) -> pb::series::Value {
        pb::series::Value::Histogram(pb::Histogram {
            hdr_v2: bytes.into(),
            scale: 1000,
            unit: "ms".into(),
        })
    }

    /// What the queue charges a snapshot covers what it holds once decoded: its vector of series and the
    /// histograms' bytes (the encoded size alone does not).
    #[test]
    fn a_snapshot_is_charged_at_least_what_it_holds_decoded() {
        let snapshot = pb::Snapshot {
            second: 100,
            series: (0..100)
                .map(|i| series(&format!("m{i}"), histogram(encoded(&[1, 10, 100]))))
                .collect(),
            ..Default::default()
        };
        let charged = decoded_bytes(&snapshot);
        let validated = validate_fresh(snapshot, &Limits::default(), 100).expect("valid");
        let series = &validated.second.series;
        assert_eq!(series.len(), 100);
        let held = series.capacity() * std::mem::size_of::<(SeriesId, SeriesValue)>()
            + series
                .iter()
                .map(|(_, v)| match v {
                    SeriesValue::Histogram { v2, .. } => v2.byte_len(),
                    _ => 0,
                })
                .sum::<usize>();
        assert!(charged >= held, "charged {charged} for {held} held");
    }

    #[test]
    fn each_bad_series_is_dropped_with_its_reason_and_the_rest_kept() {
        let mut absurd_range = encoded(&[5]);
        absurd_range[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        let mut absurd_precision = encoded(&[5]);
        absurd_precision[12..16].copy_from_slice(&9u32.to_be_bytes());
        let mut lying_length = encoded(&[5]);
        lying_length[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
        let mut compressed_cookie = encoded(&[5]);
        compressed_cookie[0..4].copy_from_slice(&0x1c84_9314u32.to_be_bytes());
        let table: Vec<(pb::Series, Option<SeriesProblem>)> = vec![
            (series("ok.counter", pb::series::Value::Counter(2.0)), None),
            (series("ok.gauge", pb::series::Value::Gauge(-1.0)), None),
            (series("ok.hist", histogram(encoded(&[1, 2, 3]))), None),
            (
                series("", pb::series::Value::Counter(1.0)),
                Some(SeriesProblem::BadName),
            ),
            (
                series(&"n".repeat(201), pb::series::Value::Counter(1.0)),
                Some(SeriesProblem::BadName),
            ),
            (
                series("nan", pb::series::Value::Gauge(f64::NAN)),
                Some(SeriesProblem::BadNumber),
            ),
            (
                series("inf", pb::series::Value::Counter(f64::INFINITY)),
                Some(SeriesProblem::BadNumber),
            ),
            (series("decrement", pb::series::Value::Counter(-1.0)), None),
            (
                pb::Series {
                    id: 0,
                    name: "none".into(),
                    tags: vec![],
                    value: None,
                },
                Some(SeriesProblem::MissingValue),
            ),
            (
                series("garbage", histogram(vec![1, 2, 3])),
                Some(SeriesProblem::BadHistogram),
            ),
            (
                series("empty", histogram(vec![])),
                Some(SeriesProblem::BadHistogram),
            ),
            (
                series("range", histogram(absurd_range)),
                Some(SeriesProblem::HistogramOutOfRange),
            ),
            (
                series("precision", histogram(absurd_precision)),
                Some(SeriesProblem::HistogramOutOfRange),
            ),
            (
                series("length", histogram(lying_length)),
                Some(SeriesProblem::BadHistogram),
            ),
            (
                series("deflate", histogram(compressed_cookie)),
                Some(SeriesProblem::BadHistogram),
            ),
            (
                pb::Series {
                    id: 0,
                    name: "tags".into(),
                    tags: (0..33)
                        .map(|i| pb::Tag {
                            key: format!("k{i}"),
                            value: "v".into(),
                        })
                        .collect(),
                    value: Some(pb::series::Value::Counter(1.0)),
                },
                Some(SeriesProblem::TooManyTags),
            ),
        ];
        let limits = Limits::default();
        for (s, expected) in table {
            let name = s.name.clone();
            let snapshot = pb::Snapshot {
                second: 100,
                series: vec![s],
                stats: None,
            };
            let v = validate_fresh(snapshot, &limits, 100).unwrap();
            match expected {
                None => {
                    assert_eq!(v.second.series.len(), 1, "{name}");
                    assert!(v.dropped.is_empty(), "{name}");
                }
                Some(problem) => {
                    assert!(v.second.series.is_empty(), "{name}");
                    assert_eq!(v.dropped, vec![(problem, 1)], "{name}");
                }
            }
        }
    }

    #[test]
    fn series_over_the_limit_are_counted_and_the_first_kept() {
        let limits = Limits {
            max_series_per_snapshot: 3,
            ..Limits::default()
        };
        let snapshot = pb::Snapshot {
            second: 5,
            series: (0..10)
                .map(|i| series(&format!("m{i}"), pb::series::Value::Counter(1.0)))
                .collect(),
            stats: None,
        };
        let v = validate_fresh(snapshot, &limits, 5).unwrap();
        assert_eq!(v.second.series.len(), 3);
        assert_eq!(v.dropped, vec![(SeriesProblem::TooManySeries, 7)]);
    }

    #[test]
    fn seconds_far_in_the_future_are_refused() {
        let limits = Limits::default();
        let ok = pb::Snapshot {
            second: 105,
            series: vec![],
            stats: None,
        };
        assert!(validate_fresh(ok, &limits, 100).is_ok());
        let far = pb::Snapshot {
            second: 1_000_000,
            series: vec![],
            stats: None,
        };
        let err = validate_fresh(far, &limits, 100).unwrap_err();
        assert_eq!(err.reason(), DropReason::MaxFutureSkew);
    }

    #[test]
    fn hellos_need_a_full_identity_and_a_known_token() {
        let limits = Limits::default();
        let hello = |service: &str, version: &str, instance: &str, token: &str| pb::Hello {
            identity: Some(pb::Identity {
                service: service.into(),
                version: version.into(),
                zone: String::new(),
                instance: instance.into(),
                labels: Default::default(),
            }),
            token: token.into(),
            replay_through: 0,
        };
        let tokens = Tokens::new(
            &[],
            &[],
            &["secret-secret".to_owned(), "bound-bound=t*".to_owned()],
        )
        .unwrap();
        let none = Tokens::default();
        let table: Vec<(pb::Hello, &Tokens, Option<Refusal>)> = vec![
            (hello("s", "v", "i", ""), &none, None),
            (hello("s", "v", "i", "secret-secret"), &tokens, None),
            (hello("t1", "v", "i", "bound-bound"), &tokens, None),
            (
                hello("s", "v", "i", "bound-bound"),
                &tokens,
                Some(Refusal::TokenNotForService("s".into())),
            ),
            (
                hello("s", "v", "i", "wrong"),
                &tokens,
                Some(Refusal::BadToken),
            ),
            (
                hello("", "v", "i", ""),
                &none,
                Some(Refusal::MissingIdentity("service")),
            ),
            (
                hello("s", "", "i", ""),
                &none,
                Some(Refusal::MissingIdentity("version")),
            ),
            (
                hello("s", "v", "", ""),
                &none,
                Some(Refusal::MissingIdentity("instance")),
            ),
            (
                hello("s\n", "v", "i", ""),
                &none,
                Some(Refusal::BadIdentity("service")),
            ),
            (
                pb::Hello {
                    identity: None,
                    ..Default::default()
                },
                &none,
                Some(Refusal::MissingIdentity("identity")),
            ),
        ];
        for (h, tokens, expected) in table {
            assert_eq!(validate_hello(&h, &limits, tokens).err(), expected, "{h:?}");
        }
    }

    /// A second stream naming a series its service already has finds it by its spelling; tags in another order
    /// or repeated take the long way and reach the same series; a spelling that is not a valid key is refused
    /// whichever way it comes.
    #[test]
    fn a_stream_naming_a_known_series_gets_its_id_however_it_orders_the_tags() {
        let limits = Limits::default();
        let table = Arc::new(SeriesTable::new(1_000));
        let tag = |key: &str, value: &str| pb::Tag {
            key: key.into(),
            value: value.into(),
        };
        let named = |name: &str, tags: Vec<pb::Tag>| pb::Series {
            id: 1,
            name: name.into(),
            tags,
            value: Some(pb::series::Value::Counter(1.0)),
        };
        let resolve =
            |series: pb::Series| StreamDictionary::new(table.clone()).resolve(&series, &limits);
        let sorted = || vec![tag("route", "/pay"), tag("status", "2xx")];
        let found = |series: pb::Series| find_named(&table, &series, &limits);
        assert_eq!(found(named("req", sorted())), None);
        let first = resolve(named("req", sorted())).unwrap();
        // Found by its spelling from now on.
        assert_eq!(found(named("req", sorted())), Some(first));
        assert_eq!(resolve(named("req", sorted())), Ok(first));
        let reversed = || vec![tag("status", "2xx"), tag("route", "/pay")];
        assert_eq!(found(named("req", reversed())), None);
        assert_eq!(resolve(named("req", reversed())), Ok(first));
        // A repeated key keeps its last value, as on the long way.
        let repeated = || {
            vec![
                tag("route", "/old"),
                tag("route", "/pay"),
                tag("status", "2xx"),
            ]
        };
        assert_eq!(found(named("req", repeated())), None);
        assert_eq!(resolve(named("req", repeated())), Ok(first));
        assert_ne!(resolve(named("req", vec![tag("route", "/pay")])), Ok(first));
        // More tags than are viewed on the stack: the same, through a vector.
        let many = || (0..12).map(|i| tag(&format!("k{i:02}"), "v")).collect();
        let wide = resolve(named("req", many())).unwrap();
        assert_eq!(found(named("req", many())), Some(wide));
        assert_eq!(
            resolve(named("req\n", sorted())),
            Err(SeriesProblem::BadName)
        );
        let too_many = (0..=limits.max_tags_per_series)
            .map(|i| tag(&format!("k{i:02}"), "v"))
            .collect();
        assert_eq!(
            resolve(named("req", too_many)),
            Err(SeriesProblem::TooManyTags)
        );
        assert_eq!(table.keys().at(1).map(|k| k.tags.len()), Some(1));
        assert_eq!(table.keys().at(2).map(|k| k.tags.len()), Some(12));
        assert!(table.keys().at(3).is_none(), "nothing else was interned");
    }

    #[test]
    fn the_series_dictionary_names_once_refers_after_and_survives_a_refused_second() {
        let limits = Limits::default();
        let mut dictionary = fresh_dictionary();
        let named = |id: u32, name: &str, v: f64| pb::Series {
            id,
            name: name.into(),
            tags: vec![pb::Tag {
                key: "route".into(),
                value: "/pay".into(),
            }],
            value: Some(pb::series::Value::Counter(v)),
        };
        let by_id = |id: u32, v: f64| pb::Series {
            id,
            name: String::new(),
            tags: vec![],
            value: Some(pb::series::Value::Counter(v)),
        };
        let snapshot = |second: i64, series: Vec<pb::Series>| pb::Snapshot {
            second,
            series,
            stats: None,
        };
        // Second 10 names series 1, but is refused whole (too far ahead): its names still count.
        let refused = validate_snapshot(
            snapshot(10, vec![named(1, "req", 1.0)]),
            &instance(),
            &mut dictionary,
            &limits,
            0,
        );
        assert!(refused.is_err());
        // So do those of a second refused as too old.
        let ancient = validate_snapshot(
            snapshot(-1_000_000, vec![named(2, "err", 1.0)]),
            &instance(),
            &mut dictionary,
            &limits,
            11,
        );
        assert_eq!(
            ancient.map(|_| ()).map_err(|r| r.reason()),
            Err(DropReason::MaxSnapshotAge)
        );
        let v = validate_snapshot(
            snapshot(11, vec![by_id(1, 2.0), by_id(7, 3.0), by_id(2, 4.0)]),
            &instance(),
            &mut dictionary,
            &limits,
            11,
        )
        .unwrap();
        let keys = v.second.table.keys();
        let names: Vec<(String, usize)> = v
            .second
            .series
            .iter()
            .map(|(id, _)| (keys.get(*id).metric.to_string(), keys.get(*id).tags.len()))
            .collect();
        assert_eq!(names, [("req".to_owned(), 1), ("err".to_owned(), 1)]);
        assert_eq!(v.dropped, vec![(SeriesProblem::UnknownSeriesId, 1)]);
        // Another stream knows none of it.
        let other = validate_snapshot(
            snapshot(11, vec![by_id(1, 2.0)]),
            &instance(),
            &mut fresh_dictionary(),
            &limits,
            11,
        )
        .unwrap();
        assert!(other.second.series.is_empty());
    }

    #[test]
    fn a_service_past_its_series_limit_refuses_new_series_and_keeps_the_known_ones() {
        let limits = Limits::default();
        let table = Arc::new(SeriesTable::new(2));
        let counter = |name: &str| pb::Series {
            id: 0,
            name: name.into(),
            tags: vec![],
            value: Some(pb::series::Value::Counter(1.0)),
        };
        let snapshot = pb::Snapshot {
            second: 5,
            series: vec![counter("a"), counter("b"), counter("c")],
            stats: None,
        };
        let mut first = StreamDictionary::new(table.clone());
        let v = validate_snapshot(snapshot, &instance(), &mut first, &limits, 5).unwrap();
        assert_eq!(v.second.series.len(), 2);
        assert_eq!(v.dropped, vec![(SeriesProblem::ServiceFull, 1)]);
        // Another stream of the service shares the table: the known series still pass.
        let snapshot = pb::Snapshot {
            second: 5,
            series: vec![counter("b"), counter("d")],
            stats: None,
        };
        let mut second = StreamDictionary::new(table);
        let v = validate_snapshot(snapshot, &instance(), &mut second, &limits, 5).unwrap();
        assert_eq!(v.second.series.len(), 1);
        assert_eq!(
            v.dropped.first().map(|(p, _)| p.reason()),
            Some(DropReason::MaxSeriesPerService)
        );
    }
}
