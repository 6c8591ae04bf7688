//! DogStatsD line parser: `name:value[:value..]|type[|@rate][|#tag:v,..][|c:..][|T..]`, no I/O.

use thiserror::Error;

/// The metric types the agent folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    /// `c`: increments summed within the second.
    Counter,
    /// `g`: the last value set within the second.
    Gauge,
    /// `ms`: a duration in milliseconds, folded into a histogram.
    Timer,
    /// `h`: a value folded into a histogram.
    Histogram,
    /// `d`: a distribution, folded like a histogram.
    Distribution,
}

impl MetricType {
    /// Whether values of this type go into an HDR histogram.
    pub fn is_histogram(self) -> bool {
        matches!(self, Self::Timer | Self::Histogram | Self::Distribution)
    }
}

/// Why a line was refused. Each variant is counted as a malformed line and the line is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ParseError {
    /// The line is empty or only white space.
    #[error("empty line")]
    Empty,
    /// The line is longer than the configured maximum.
    #[error("line longer than the limit")]
    TooLong,
    /// The line is not valid UTF-8.
    #[error("line is not UTF-8")]
    NotUtf8,
    /// No `:` separates the name from the value.
    #[error("missing ':' between name and value")]
    MissingValue,
    /// No `|type` follows the value.
    #[error("missing '|type'")]
    MissingType,
    /// The name is empty.
    #[error("empty metric name")]
    EmptyName,
    /// The name contains white space, control characters, `|`, `#` or `@`.
    #[error("metric name has a forbidden character")]
    BadName,
    /// A value is not a number.
    #[error("value is not a number")]
    BadValue,
    /// A value is NaN or infinite.
    #[error("value is NaN or infinite")]
    NonFinite,
    /// The type is not one of `c`, `g`, `ms`, `h`, `d`.
    #[error("unsupported metric type")]
    UnsupportedType,
    /// The `@rate` is not a number in (0, 1].
    #[error("sample rate must be in (0, 1]")]
    BadSampleRate,
    /// A tag has an empty key.
    #[error("tag with an empty key")]
    EmptyTagKey,
    /// More tags than the configured maximum.
    #[error("too many tags")]
    TooManyTags,
    /// A name, tag key or tag value is longer than the configured maximum.
    #[error("name or tag longer than the limit")]
    TooLongPart,
    /// The line is a DogStatsD event (`_e{`) or service check (`_sc|`), which the agent does not fold.
    #[error("events and service checks are not metrics")]
    NotAMetric,
}

impl ParseError {
    /// The reason as a label value (`too_long`, `bad_value`, ...), as the agent's `/metrics` counts it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLong => "too_long",
            Self::NotUtf8 => "not_utf8",
            Self::MissingValue => "missing_value",
            Self::MissingType => "missing_type",
            Self::EmptyName => "empty_name",
            Self::BadName => "bad_name",
            Self::BadValue => "bad_value",
            Self::NonFinite => "non_finite",
            Self::UnsupportedType => "unsupported_type",
            Self::BadSampleRate => "bad_sample_rate",
            Self::EmptyTagKey => "empty_tag_key",
            Self::TooManyTags => "too_many_tags",
            Self::TooLongPart => "too_long_part",
            Self::NotAMetric => "not_a_metric",
        }
    }
}

/// Bounds applied while parsing (the agent's `[agent.parse_limits]`); a line past one is refused and counted.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParseLimits {
    /// Longest line accepted, in bytes.
    pub max_line_bytes: usize,
    /// Longest metric name, tag key or tag value, in bytes.
    pub max_part_bytes: usize,
    /// Most tags on one line.
    pub max_tags: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            max_line_bytes: 8 * 1024,
            max_part_bytes: 200,
            max_tags: 32,
        }
    }
}

/// One parsed line, borrowing from the packet.
#[derive(Debug, Clone, PartialEq)]
pub struct Line<'a> {
    /// Metric name.
    pub name: &'a str,
    /// Metric type.
    pub kind: MetricType,
    /// Colon-separated values, each already checked to be a finite number.
    values: &'a str,
    /// Sample rate in (0, 1].
    pub sample_rate: f64,
    /// Tags sorted by key, keys unique (the last value of a repeated key wins); a bare tag has an empty value.
    pub tags: Vec<(&'a str, &'a str)>,
}

impl<'a> Line<'a> {
    /// The line's values (DogStatsD 1.1 allows several: `name:1:2:3|ms`).
    pub fn values(&self) -> impl Iterator<Item = f64> + 'a {
        self.values.split(':').filter_map(|v| v.parse::<f64>().ok())
    }
}

/// Splits a packet into lines and parses each; `f` sees every line's outcome.
pub fn parse_packet<'a>(
    packet: &'a [u8],
    limits: &ParseLimits,
    mut f: impl FnMut(Result<Line<'a>, ParseError>),
) {
    for raw in packet.split(|b| *b == b'\n') {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match std::str::from_utf8(raw) {
            Ok(line) => f(parse_line(line, limits)),
            Err(_) => f(Err(ParseError::NotUtf8)),
        }
    }
}

/// Parses one DogStatsD line.
pub fn parse_line<'a>(line: &'a str, limits: &ParseLimits) -> Result<Line<'a>, ParseError> {
    let line = line.trim();
    if line.is_empty() {
        return Err(ParseError::Empty);
    }
    if line.len() > limits.max_line_bytes {
        return Err(ParseError::TooLong);
    }
    if line.starts_with("_e{") || line.starts_with("_sc|") {
        return Err(ParseError::NotAMetric);
    }
    let (name, rest) = line.split_once(':').ok_or(ParseError::MissingValue)?;
    check_name(name, limits)?;
    let mut fields = rest.split('|');
    let values = fields.next().unwrap_or_default();
    let kind = match fields.next() {
        None => return Err(ParseError::MissingType),
        Some("c") => MetricType::Counter,
        Some("g") => MetricType::Gauge,
        Some("ms") => MetricType::Timer,
        Some("h") => MetricType::Histogram,
        Some("d") => MetricType::Distribution,
        Some(_) => return Err(ParseError::UnsupportedType),
    };
    check_values(values)?;
    let mut sample_rate = 1.0;
    let mut tags = Vec::new();
    for field in fields {
        if let Some(rate) = field.strip_prefix('@') {
            sample_rate = rate.parse::<f64>().map_err(|_| ParseError::BadSampleRate)?;
            if !(sample_rate > 0.0 && sample_rate <= 1.0) {
                return Err(ParseError::BadSampleRate);
            }
        } else if let Some(raw_tags) = field.strip_prefix('#') {
            parse_tags(raw_tags, limits, &mut tags)?;
        }
        // Container ids (`c:`), timestamps (`T..`), external data (`e:`) and future fields are ignored.
    }
    tags.sort_by(|a, b| a.0.cmp(b.0));
    // Keep the last value of a repeated key: after a stable sort the last of a run is the latest one.
    let mut deduped: Vec<(&str, &str)> = Vec::with_capacity(tags.len());
    for tag in tags {
        match deduped.last_mut() {
            Some(last) if last.0 == tag.0 => *last = tag,
            _ => deduped.push(tag),
        }
    }
    Ok(Line {
        name,
        kind,
        values,
        sample_rate,
        tags: deduped,
    })
}

fn check_name(name: &str, limits: &ParseLimits) -> Result<(), ParseError> {
    if name.is_empty() {
        return Err(ParseError::EmptyName);
    }
    if name.len() > limits.max_part_bytes {
        return Err(ParseError::TooLongPart);
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '|' | '#' | '@' | ','))
    {
        return Err(ParseError::BadName);
    }
    Ok(())
}

/// Every value must be a finite number; empty ones in a packed line (`name:1::2|h`) are skipped, as Datadog's agent
/// skips them, but a line must hold at least one. Negative values are fine for every type: counters go down
/// (decrements), and histograms record them signed (see `window`).
fn check_values(values: &str) -> Result<(), ParseError> {
    let mut any = false;
    for raw in values.split(':').filter(|v| !v.is_empty()) {
        let value = raw.parse::<f64>().map_err(|_| ParseError::BadValue)?;
        if !value.is_finite() {
            return Err(ParseError::NonFinite);
        }
        any = true;
    }
    if any {
        Ok(())
    } else {
        Err(ParseError::BadValue)
    }
}

fn parse_tags<'a>(
    raw: &'a str,
    limits: &ParseLimits,
    out: &mut Vec<(&'a str, &'a str)>,
) -> Result<(), ParseError> {
    for tag in raw.split(',').filter(|t| !t.is_empty()) {
        let (key, value) = tag.split_once(':').unwrap_or((tag, ""));
        if key.is_empty() {
            return Err(ParseError::EmptyTagKey);
        }
        // `host:` names the series' host in Datadog (empty: no host), not a dimension; here the agent's instance
        // is the host, so it is dropped rather than multiplying series.
        if key == "host" {
            continue;
        }
        if key.len() > limits.max_part_bytes || value.len() > limits.max_part_bytes {
            return Err(ParseError::TooLongPart);
        }
        if out.len() == limits.max_tags {
            return Err(ParseError::TooManyTags);
        }
        out.push((key, value));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Line<'_>, ParseError> {
        parse_line(line, &ParseLimits::default())
    }

    #[test]
    fn well_formed_lines() {
        struct Case {
            line: &'static str,
            name: &'static str,
            kind: MetricType,
            values: Vec<f64>,
            rate: f64,
            tags: Vec<(&'static str, &'static str)>,
        }
        let cases = [
            Case {
                line: "page.views:1|c",
                name: "page.views",
                kind: MetricType::Counter,
                values: vec![1.0],
                rate: 1.0,
                tags: vec![],
            },
            Case {
                line: "q.depth:-3.5|g",
                name: "q.depth",
                kind: MetricType::Gauge,
                values: vec![-3.5],
                rate: 1.0,
                tags: vec![],
            },
            Case {
                line: "lat:12.25|ms|@0.5",
                name: "lat",
                kind: MetricType::Timer,
                values: vec![12.25],
                rate: 0.5,
                tags: vec![],
            },
            Case {
                line: "size:10|h|#b:2,a:1",
                name: "size",
                kind: MetricType::Histogram,
                values: vec![10.0],
                rate: 1.0,
                tags: vec![("a", "1"), ("b", "2")],
            },
            Case {
                line: "d:1:2:3|d",
                name: "d",
                kind: MetricType::Distribution,
                values: vec![1.0, 2.0, 3.0],
                rate: 1.0,
                tags: vec![],
            },
            Case {
                line: "x:1|c|#env:prod,canary|@0.1",
                name: "x",
                kind: MetricType::Counter,
                values: vec![1.0],
                rate: 0.1,
                tags: vec![("canary", ""), ("env", "prod")],
            },
            Case {
                line: "x:1|c|#k:a,k:b",
                name: "x",
                kind: MetricType::Counter,
                values: vec![1.0],
                rate: 1.0,
                tags: vec![("k", "b")],
            },
            Case {
                line: "x:1|c|#url:http://a/b",
                name: "x",
                kind: MetricType::Counter,
                values: vec![1.0],
                rate: 1.0,
                tags: vec![("url", "http://a/b")],
            },
            Case {
                line: "x:2|c|c:abc123|T1700000000|#a:1",
                name: "x",
                kind: MetricType::Counter,
                values: vec![2.0],
                rate: 1.0,
                tags: vec![("a", "1")],
            },
            Case {
                line: "  x:1e3|g  ",
                name: "x",
                kind: MetricType::Gauge,
                values: vec![1000.0],
                rate: 1.0,
                tags: vec![],
            },
            Case {
                line: "x:0|ms",
                name: "x",
                kind: MetricType::Timer,
                values: vec![0.0],
                rate: 1.0,
                tags: vec![],
            },
        ];
        for case in cases {
            let line = parse(case.line).unwrap_or_else(|e| panic!("{}: {e}", case.line));
            assert_eq!(line.name, case.name, "{}", case.line);
            assert_eq!(line.kind, case.kind, "{}", case.line);
            assert_eq!(
                line.values().collect::<Vec<_>>(),
                case.values,
                "{}",
                case.line
            );
            assert_eq!(line.sample_rate, case.rate, "{}", case.line);
            assert_eq!(line.tags, case.tags, "{}", case.line);
        }
    }

    #[test]
    fn lines_datadogs_agent_accepts_are_read_as_it_reads_them() {
        let limits = ParseLimits::default();
        let packed = parse_line("x:1::2|h", &limits).unwrap();
        assert_eq!(
            packed.values().collect::<Vec<_>>(),
            vec![1.0, 2.0],
            "empty values skipped"
        );
        let decrement = parse_line("jobs.queued:-1|c", &limits).unwrap();
        assert_eq!(decrement.values().collect::<Vec<_>>(), vec![-1.0]);
        let negative = parse_line("temp.delta:-5|h", &limits).unwrap();
        assert_eq!(negative.values().collect::<Vec<_>>(), vec![-5.0]);
        let hosted = parse_line("req:1|c|#host:web-1,route:/a,host:", &limits).unwrap();
        assert_eq!(
            hosted.tags,
            vec![("route", "/a")],
            "host: is the series' host, not a dimension"
        );
    }

    #[test]
    fn malformed_lines_are_refused_with_a_reason() {
        let long_name = format!("{}:1|c", "n".repeat(201));
        let many_tags = format!(
            "x:1|c|#{}",
            (0..33)
                .map(|i| format!("t{i}:v"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let huge = format!("x:1|c|#{}", "a".repeat(9000));
        let cases: Vec<(&str, ParseError)> = vec![
            ("", ParseError::Empty),
            ("   ", ParseError::Empty),
            ("novalue", ParseError::MissingValue),
            ("x:1", ParseError::MissingType),
            (":1|c", ParseError::EmptyName),
            ("a b:1|c", ParseError::BadName),
            ("a\tb:1|c", ParseError::BadName),
            ("x:|c", ParseError::BadValue),
            ("x:abc|c", ParseError::BadValue),
            ("x::|ms", ParseError::BadValue),
            ("x:0x10|c", ParseError::BadValue),
            ("x:NaN|g", ParseError::NonFinite),
            ("x:inf|ms", ParseError::NonFinite),
            ("x:-infinity|c", ParseError::NonFinite),
            ("x:1|s", ParseError::UnsupportedType),
            ("x:1|", ParseError::UnsupportedType),
            ("x:1|C", ParseError::UnsupportedType),
            ("x:1|c|@0", ParseError::BadSampleRate),
            ("x:1|c|@1.5", ParseError::BadSampleRate),
            ("x:1|c|@-1", ParseError::BadSampleRate),
            ("x:1|c|@NaN", ParseError::BadSampleRate),
            ("x:1|c|@", ParseError::BadSampleRate),
            ("x:1|c|#:v", ParseError::EmptyTagKey),
            (&long_name, ParseError::TooLongPart),
            (&many_tags, ParseError::TooManyTags),
            (&huge, ParseError::TooLong),
            ("_e{5,4}:title|text", ParseError::NotAMetric),
            ("_sc|svc|0", ParseError::NotAMetric),
        ];
        for (line, expected) in cases {
            assert_eq!(parse(line).err(), Some(expected), "line {line:?}");
        }
    }

    #[test]
    fn packets_split_into_lines_and_bad_bytes_do_not_spoil_the_rest() {
        let packet = b"a:1|c\nb:2|g\r\n\n\xff\xfe:1|c\nc:3|ms\nbroken\n";
        let mut good = Vec::new();
        let mut bad = Vec::new();
        parse_packet(packet, &ParseLimits::default(), |r| match r {
            Ok(line) => good.push(line.name.to_owned()),
            Err(e) => bad.push(e),
        });
        assert_eq!(good, ["a", "b", "c"]);
        assert_eq!(bad, [ParseError::NotUtf8, ParseError::MissingValue]);
    }
}
