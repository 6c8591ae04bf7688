//! The rules file: parsing and validating TOML into a `RuleSet`. A file with any error is refused whole, with the
//! line and the reason; nothing is half-applied.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::alerting::escalation::{Format, Owner, Step, redacted_url};

/// Which number of a series a rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Stat {
    /// Counter: the fleet's sum in the second (a rate per second). Histogram: the count.
    Rate,
    /// Same as `rate`.
    Sum,
    /// Histogram or gauge mean.
    Mean,
    /// Histogram or gauge max.
    Max,
    /// Gauge min.
    Min,
    /// Histogram median.
    P50,
    /// Histogram 90th percentile.
    P90,
    /// Histogram 99th percentile.
    P99,
    /// Histogram 99.9th percentile.
    P999,
    /// `sum(metric) / sum(over)` of two counters in the same second.
    Ratio,
}

impl fmt::Display for Stat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&name)
    }
}

/// A dimension a rule evaluates separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SplitBy {
    /// Each version on its own.
    Version,
    /// Each zone on its own.
    Zone,
}

/// Which side of the threshold is bad.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Comparison {
    /// Bad when the value is above the threshold.
    Above,
    /// Bad when the value is below the threshold.
    Below,
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Rule {
    /// Unique name.
    pub(crate) name: Arc<str>,
    /// The service it watches; `None` is every service.
    pub(crate) service: Option<String>,
    /// The metric it reads.
    pub(crate) metric: String,
    /// Which statistic.
    pub(crate) stat: Stat,
    /// The denominator counter of a ratio.
    pub(crate) over: Option<String>,
    /// Above or below.
    pub(crate) comparison: Comparison,
    /// The threshold.
    pub(crate) threshold: f64,
    /// Seconds the condition must hold before firing (0 or 1: the first bad second fires).
    pub(crate) for_secs: u32,
    /// Seconds a firing alert stays firing after the condition clears (flap damping).
    pub(crate) keep_firing_for_secs: u32,
    /// Evaluate each version and/or zone separately; empty evaluates the whole service.
    pub(crate) split_by: Vec<SplitBy>,
    /// Only series with these tags.
    pub(crate) tags: BTreeMap<String, String>,
    /// Owner to notify.
    pub(crate) owner: Option<String>,
}

impl RuleSet {
    /// The owner of `service`: its `[[services]]` entry, else the owner of the first rule naming it, else the owner
    /// of the first rule for every service.
    pub(crate) fn service_owner(&self, service: &str) -> Option<&str> {
        self.service_owners
            .get(service)
            .map(String::as_str)
            .or_else(|| {
                self.rules
                    .iter()
                    .filter(|r| r.service.as_deref() == Some(service))
                    .find_map(|r| r.owner.as_deref())
            })
            .or_else(|| {
                self.rules
                    .iter()
                    .filter(|r| r.service.is_none())
                    .find_map(|r| r.owner.as_deref())
            })
    }
}

impl Rule {
    /// Whether the rule watches `service`.
    pub(crate) fn applies_to(&self, service: &str) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
    }

    /// Whether `value` is on the bad side of the threshold.
    pub(crate) fn breaches(&self, value: f64) -> bool {
        match self.comparison {
            Comparison::Above => value > self.threshold,
            Comparison::Below => value < self.threshold,
        }
    }
}

/// Everything the rules file says, validated.
#[derive(Debug, Clone, Default)]
pub(crate) struct RuleSet {
    /// Rules in file order.
    pub(crate) rules: Vec<Arc<Rule>>,
    /// Owners by name.
    pub(crate) owners: HashMap<String, Arc<Owner>>,
    /// Who owns each service (for alerts no rule names, such as canary verdicts).
    pub(crate) service_owners: HashMap<String, String>,
    /// The TOML it came from.
    pub(crate) source: String,
    /// Which rules apply to each service a rule names (numbers in `rules`, in file order, the rules for every
    /// service among them), and to every other service: every shard asks once per sealed second, and thousands of
    /// services with rules of their own would otherwise each walk every rule.
    applying: Applying,
}

/// Numbers in [`RuleSet::rules`] of the rules that apply, by service.
#[derive(Debug, Clone, Default)]
struct Applying {
    named: HashMap<String, Vec<usize>>,
    others: Vec<usize>,
}

impl Applying {
    fn of(rules: &[Arc<Rule>]) -> Self {
        let mut applying = Applying::default();
        for service in rules.iter().filter_map(|r| r.service.as_deref()) {
            applying.named.entry(service.to_owned()).or_default();
        }
        for (at, rule) in rules.iter().enumerate() {
            match &rule.service {
                Some(service) => {
                    if let Some(list) = applying.named.get_mut(service) {
                        list.push(at);
                    }
                }
                None => {
                    applying.others.push(at);
                    applying.named.values_mut().for_each(|list| list.push(at));
                }
            }
        }
        applying
    }
}

impl RuleSet {
    /// The rules that apply to `service`, in file order.
    pub(crate) fn applying(&self, service: &str) -> impl Iterator<Item = &Arc<Rule>> {
        self.applying
            .named
            .get(service)
            .unwrap_or(&self.applying.others)
            .iter()
            .filter_map(|at| self.rules.get(*at))
    }
}

/// Why a rules file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rules line {line}: {reason}")]
pub struct RulesError {
    /// 1-based line of the offending entry.
    pub(crate) line: usize,
    /// What is wrong.
    pub(crate) reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    owners: Vec<Spanned<RawOwner>>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    owner: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    service: Option<String>,
    metric: String,
    stat: Stat,
    over: Option<String>,
    above: Option<f64>,
    below: Option<f64>,
    #[serde(rename = "for", default, with = "humantime_serde")]
    for_: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    keep_firing_for: Option<Duration>,
    #[serde(default)]
    split_by: Vec<SplitBy>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    owner: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOwner {
    name: String,
    escalation: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(with = "humantime_serde")]
    after: Duration,
    webhook: String,
    #[serde(default = "default_format")]
    format: Format,
    secret: Option<String>,
    /// Several signing secrets at once (a rotation: the new one first).
    #[serde(default)]
    secrets: Vec<String>,
    routing_key: Option<String>,
}

fn default_format() -> Format {
    Format::Json
}

/// How long a firing alert stays firing after its condition clears, unless a rule says otherwise.
pub(crate) const DEFAULT_KEEP_FIRING_FOR_SECS: u32 = 5;

fn line_of(source: &str, offset: usize) -> usize {
    source[..offset.min(source.len())].matches('\n').count() + 1
}

fn whole_seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// Why a webhook host is refused whatever the allow list says: the places a request from inside a network must
/// never be aimed at by whoever can edit the rules (cloud metadata services, link-local addresses, "this host").
pub(crate) fn forbidden_host(host: &url::Host<&str>) -> Option<&'static str> {
    match host {
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            matches!(
                name.as_str(),
                "metadata.google.internal"
                    | "metadata"
                    | "instance-data"
                    | "metadata.azure.internal"
                    | "metadata.tencentyun.com"
            )
            .then_some("a cloud metadata service")
        }
        url::Host::Ipv4(ip) => forbidden_v4(*ip),
        url::Host::Ipv6(ip) => {
            // IPv4 inside IPv6 (mapped, compatible, NAT64) is judged as the IPv4 address it stands for.
            let segments = ip.segments();
            let nat64 = (segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0]).then(|| {
                core::net::Ipv4Addr::from(u32::from(segments[6]) << 16 | u32::from(segments[7]))
            });
            if let Some(v4) = ip.to_ipv4().or(nat64) {
                return forbidden_v4(v4);
            }
            (ip.is_unicast_link_local()
                || ip.is_unspecified()
                || segments[..4] == [0xfd00, 0x0ec2, 0, 0])
            .then_some("a link-local or unspecified address, or a cloud metadata service")
        }
    }
}

/// An IPv4 address webhooks may never reach: link-local (169.254/16, where most cloud metadata lives), the
/// unspecified and broadcast addresses, and the metadata addresses outside link-local (Alibaba 100.100.100.200,
/// Oracle 192.0.0.192, Azure's WireServer 168.63.129.16).
fn forbidden_v4(ip: core::net::Ipv4Addr) -> Option<&'static str> {
    if ip.is_link_local() || ip.is_unspecified() || ip.is_broadcast() {
        return Some("a link-local, unspecified or broadcast address (cloud metadata lives there)");
    }
    matches!(
        ip.octets(),
        [100, 100, 100, 200] | [192, 0, 0, 192] | [168, 63, 129, 16]
    )
    .then_some("a cloud metadata service")
}

/// Whether a host is loopback, private (RFC 1918, unique local IPv6) or a bare machine name: inside the network.
/// Refused for webhooks when nobody needs a token to change the rules (`--insecure-no-auth`) and no allow list says
/// otherwise.
fn internal_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost") || !name.contains('.')
        }
        url::Host::Ipv4(ip) => ip.is_loopback() || ip.is_private(),
        url::Host::Ipv6(ip) => {
            ip.is_loopback()
                || ip.is_unique_local()
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_private())
        }
    }
}

/// Where webhooks may point, besides the hosts that are always refused: nothing more when the list is empty,
/// else only hosts named in it (exact names, `*.suffix`, IP addresses or CIDR blocks such as `10.0.0.0/8`).
#[derive(Debug, Clone, Default)]
pub(crate) struct WebhookPolicy {
    allow: Vec<String>,
    /// Refuse hosts inside the network (loopback, private) unless allowed by name: set when nobody needs a token
    /// to change the rules.
    refuse_internal: bool,
}

impl WebhookPolicy {
    /// A policy from the `--webhook-allow` entries; `refuse_internal` when rules can be changed without a token.
    pub(crate) fn new(allow: Vec<String>, refuse_internal: bool) -> Self {
        Self {
            allow,
            refuse_internal,
        }
    }

    fn allows(&self, url: &url::Url) -> bool {
        let Some(host) = url.host() else {
            return false;
        };
        if self.allow.is_empty() {
            return !(self.refuse_internal && internal_host(&host));
        }
        self.allow
            .iter()
            .any(|entry| match (&host, entry.split_once('/')) {
                (url::Host::Domain(name), _) => match entry.strip_prefix("*.") {
                    Some(suffix) => name
                        .to_ascii_lowercase()
                        .ends_with(&format!(".{}", suffix.to_ascii_lowercase())),
                    None => name.eq_ignore_ascii_case(entry),
                },
                (url::Host::Ipv4(ip), Some((net, bits))) => {
                    match (net.parse::<core::net::Ipv4Addr>(), bits.parse::<u32>()) {
                        (Ok(net), Ok(bits)) if bits <= 32 => {
                            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                            u32::from(*ip) & mask == u32::from(net) & mask
                        }
                        _ => false,
                    }
                }
                (url::Host::Ipv6(ip), Some((net, bits))) => {
                    match (net.parse::<core::net::Ipv6Addr>(), bits.parse::<u32>()) {
                        (Ok(net), Ok(bits)) if bits <= 128 => {
                            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                            u128::from(*ip) & mask == u128::from(net) & mask
                        }
                        _ => false,
                    }
                }
                (url::Host::Ipv4(ip), None) => {
                    entry.parse::<core::net::Ipv4Addr>().is_ok_and(|e| e == *ip)
                }
                (url::Host::Ipv6(ip), None) => entry
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<core::net::Ipv6Addr>()
                    .is_ok_and(|e| e == *ip),
            })
    }
}

/// The rules file as it may be shown: re-serialised (comments dropped) with every `secret`, `secrets` and
/// `routing_key` replaced by `(redacted)` and every `webhook` cut to scheme and host.
pub(crate) fn redacted_source(source: &str) -> String {
    fn walk(value: &mut toml::Value) {
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table.iter_mut() {
                    match (key.as_str(), &mut *value) {
                        ("secret" | "routing_key", _) => {
                            *value = toml::Value::String("(redacted)".into())
                        }
                        ("secrets", toml::Value::Array(items)) => {
                            for item in items {
                                *item = toml::Value::String("(redacted)".into());
                            }
                        }
                        ("webhook", toml::Value::String(url)) => *url = redacted_url(url),
                        _ => walk(value),
                    }
                }
            }
            toml::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    match source.parse::<toml::Table>() {
        Ok(table) => {
            let mut value = toml::Value::Table(table);
            walk(&mut value);
            toml::to_string(&value).unwrap_or_default()
        }
        // Rules in force always parse; anything else shows nothing rather than risk a secret.
        Err(_) => String::new(),
    }
}

/// Parses and validates a rules file, with no webhook allow list.
pub(crate) fn parse_rules(source: &str) -> Result<RuleSet, RulesError> {
    parse_rules_with(source, &WebhookPolicy::default())
}

/// Parses and validates a rules file; webhooks must pass `policy`.
pub(crate) fn parse_rules_with(
    source: &str,
    policy: &WebhookPolicy,
) -> Result<RuleSet, RulesError> {
    let raw: RawFile = toml::from_str(source).map_err(|e| RulesError {
        line: e.span().map_or(1, |s| line_of(source, s.start)),
        reason: e.message().to_owned(),
    })?;
    let mut owners = HashMap::new();
    for spanned in raw.owners {
        let line = line_of(source, spanned.span().start);
        let fail = |reason: String| RulesError { line, reason };
        let raw = spanned.into_inner();
        if raw.name.trim().is_empty() {
            return Err(fail("owner name must not be empty".into()));
        }
        if raw.escalation.is_empty() {
            return Err(fail(format!(
                "owner {:?} has an empty escalation",
                raw.name
            )));
        }
        let mut steps = Vec::with_capacity(raw.escalation.len());
        for step in raw.escalation {
            let url = url::Url::parse(&step.webhook)
                .map_err(|e| fail(format!("a webhook is not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(fail(format!(
                    "webhook {:?} must be http or https",
                    redacted_url(&step.webhook)
                )));
            }
            if let Some(reason) = url.host().and_then(|host| forbidden_host(&host)) {
                return Err(fail(format!(
                    "webhook {:?} is refused: {reason}",
                    redacted_url(&step.webhook)
                )));
            }
            if !policy.allows(&url) {
                return Err(fail(format!(
                    "webhook {:?} is not in the webhook allow list (--webhook-allow)",
                    redacted_url(&step.webhook)
                )));
            }
            if step.format == Format::Pagerduty && step.routing_key.is_none() {
                return Err(fail(format!(
                    "pagerduty step {:?} needs a routing_key",
                    redacted_url(&step.webhook)
                )));
            }
            if steps
                .last()
                .is_some_and(|prev: &Step| prev.after > step.after)
            {
                return Err(fail(format!(
                    "owner {:?}: escalation steps must be in order of `after`",
                    raw.name
                )));
            }
            steps.push(Step {
                after: step.after,
                webhook: step.webhook,
                format: step.format,
                secrets: step.secret.into_iter().chain(step.secrets).collect(),
                routing_key: step.routing_key,
            });
        }
        let name = raw.name.clone();
        let owner = Arc::new(Owner {
            name: raw.name,
            escalation: steps,
        });
        if owners.insert(name.clone(), owner).is_some() {
            return Err(fail(format!("owner {name:?} is defined twice")));
        }
    }
    let mut rules: Vec<Arc<Rule>> = Vec::new();
    for spanned in raw.rules {
        let line = line_of(source, spanned.span().start);
        let fail = |reason: String| RulesError { line, reason };
        let raw = spanned.into_inner();
        if raw.name.trim().is_empty() {
            return Err(fail("rule name must not be empty".into()));
        }
        if rules.iter().any(|r| *r.name == *raw.name) {
            return Err(fail(format!("rule {:?} is defined twice", raw.name)));
        }
        if raw.metric.trim().is_empty() {
            return Err(fail(format!(
                "rule {:?}: metric must not be empty",
                raw.name
            )));
        }
        let (comparison, threshold) = match (raw.above, raw.below) {
            (Some(v), None) => (Comparison::Above, v),
            (None, Some(v)) => (Comparison::Below, v),
            _ => {
                return Err(fail(format!(
                    "rule {:?}: give exactly one of `above` or `below`",
                    raw.name
                )));
            }
        };
        if !threshold.is_finite() {
            return Err(fail(format!(
                "rule {:?}: the threshold must be a finite number",
                raw.name
            )));
        }
        match (raw.stat, &raw.over) {
            (Stat::Ratio, None) => {
                return Err(fail(format!(
                    "rule {:?}: stat \"ratio\" needs `over` (the denominator counter)",
                    raw.name
                )));
            }
            (stat, Some(_)) if stat != Stat::Ratio => {
                return Err(fail(format!(
                    "rule {:?}: `over` is only for stat \"ratio\"",
                    raw.name
                )));
            }
            _ => {}
        }
        if let Some(owner) = &raw.owner
            && !owners.contains_key(owner)
        {
            return Err(fail(format!(
                "rule {:?}: owner {owner:?} is not defined in [[owners]]",
                raw.name
            )));
        }
        let mut split_by = raw.split_by;
        split_by.dedup();
        rules.push(Arc::new(Rule {
            name: raw.name.into(),
            service: raw.service,
            metric: raw.metric,
            stat: raw.stat,
            over: raw.over,
            comparison,
            threshold,
            for_secs: raw.for_.map_or(0, whole_seconds),
            keep_firing_for_secs: raw
                .keep_firing_for
                .map_or(DEFAULT_KEEP_FIRING_FOR_SECS, whole_seconds),
            split_by,
            tags: raw.tags,
            owner: raw.owner,
        }));
    }
    let mut service_owners = HashMap::new();
    for spanned in raw.services {
        let line = line_of(source, spanned.span().start);
        let raw = spanned.into_inner();
        if !owners.contains_key(&raw.owner) {
            return Err(RulesError {
                line,
                reason: format!(
                    "service {:?}: owner {:?} is not defined in [[owners]]",
                    raw.name, raw.owner
                ),
            });
        }
        if service_owners.insert(raw.name.clone(), raw.owner).is_some() {
            return Err(RulesError {
                line,
                reason: format!("service {:?} is listed twice", raw.name),
            });
        }
    }
    Ok(RuleSet {
        applying: Applying::of(&rules),
        rules,
        owners,
        service_owners,
        source: source.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules that apply to a service are those that name it or no service, in file order, for services named
    /// in the file and for any other.
    #[test]
    fn the_rules_applying_to_a_service_are_found_by_name() {
        let rule = |name: &str, service: Option<&str>| {
            let service = service.map_or(String::new(), |s| format!("service = \"{s}\"\n"));
            format!(
                "[[rules]]\nname = \"{name}\"\n{service}metric = \"m\"\nstat = \"sum\"\nabove = 1.0\n\n"
            )
        };
        let source: String = [
            rule("a1", Some("a")),
            rule("all1", None),
            rule("b1", Some("b")),
            rule("a2", Some("a")),
            rule("all2", None),
        ]
        .concat();
        let rules = parse_rules(&source).unwrap();
        for service in ["a", "b", "c", ""] {
            let found: Vec<&str> = rules.applying(service).map(|r| &*r.name).collect();
            let walked: Vec<&str> = rules
                .rules
                .iter()
                .filter(|r| r.applies_to(service))
                .map(|r| &*r.name)
                .collect();
            assert_eq!(found, walked, "{service}");
        }
        let names = |service| -> Vec<&str> { rules.applying(service).map(|r| &*r.name).collect() };
        assert_eq!(names("a"), ["a1", "all1", "a2", "all2"]);
        assert_eq!(names("c"), ["all1", "all2"]);
        assert!(RuleSet::default().applying("a").next().is_none());
    }

    const GOOD: &str = r#"
[[rules]]
name = "checkout-p99"
service = "checkout"
metric = "request.latency"
stat = "p99"
above = 250.0
for = "2s"
split_by = ["version"]
owner = "checkout-oncall"

[[rules]]
name = "errors"
metric = "request.errors"
stat = "ratio"
over = "request.count"
above = 0.02
owner = "checkout-oncall"

[[owners]]
name = "checkout-oncall"
escalation = [
  { after = "0s",  webhook = "http://127.0.0.1:9000/dev",  format = "json", secret = "s3cret" },
  { after = "60s", webhook = "http://127.0.0.1:9000/lead", format = "slack" },
]
"#;

    #[test]
    fn a_good_file_parses_into_rules_and_owners() {
        let set = parse_rules(GOOD).unwrap();
        assert_eq!(set.rules.len(), 2);
        let p99 = &set.rules[0];
        assert_eq!(
            (p99.stat, p99.for_secs, p99.threshold),
            (Stat::P99, 2, 250.0)
        );
        assert_eq!(p99.split_by, vec![SplitBy::Version]);
        assert!(p99.applies_to("checkout") && !p99.applies_to("search"));
        let errors = &set.rules[1];
        assert_eq!(errors.over.as_deref(), Some("request.count"));
        assert!(errors.applies_to("anything"));
        assert_eq!(errors.keep_firing_for_secs, DEFAULT_KEEP_FIRING_FOR_SECS);
        let owner = &set.owners["checkout-oncall"];
        assert_eq!(owner.escalation.len(), 2);
        assert_eq!(owner.escalation[1].after, Duration::from_secs(60));
        assert_eq!(owner.escalation[0].secrets, vec!["s3cret".to_owned()]);
        assert_eq!(set.service_owner("checkout"), Some("checkout-oncall"));
        assert_eq!(
            set.service_owner("anything"),
            Some("checkout-oncall"),
            "from the rule for every service"
        );
        let listed = parse_rules(&format!(
            "{GOOD}\n[[services]]\nname = \"search\"\nowner = \"checkout-oncall\"\n"
        ))
        .unwrap();
        assert_eq!(listed.service_owner("search"), Some("checkout-oncall"));
    }

    #[test]
    fn webhooks_at_metadata_or_link_local_addresses_are_refused_and_the_allow_list_holds() {
        let owner = |url: &str| {
            format!(
                "\n\n[[owners]]\nname = \"o\"\nescalation = [{{ after = \"0s\", webhook = \"{url}\" }}]\n"
            )
        };
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://[fe80::1]/x",
            "http://[fd00:ec2::254]/x",
            "http://0.0.0.0:80/x",
            "http://[::ffff:169.254.169.254]/x",
            "http://[::a9fe:a9fe]/x",
            "http://[64:ff9b::a9fe:a9fe]/x",
            "http://100.100.100.200/latest/",
            "http://168.63.129.16/x",
            "http://2852039166/latest/",
        ] {
            let error = parse_rules(&owner(url)).unwrap_err();
            assert_eq!(error.line, 3, "{url}: {error}");
            assert!(error.reason.contains("refused"), "{url}: {error}");
        }
        assert!(parse_rules(&owner("https://hooks.slack.com/services/x")).is_ok());
        let policy = WebhookPolicy::new(
            vec![
                "*.example.com".into(),
                "10.0.0.0/8".into(),
                "pager.internal".into(),
            ],
            true,
        );
        for (url, allowed) in [
            ("https://hooks.example.com/x", true),
            ("https://example.com.evil.net/x", false),
            ("http://10.1.2.3:9000/x", true),
            ("http://11.1.2.3/x", false),
            ("http://pager.internal/x", true),
            ("http://127.0.0.1/x", false),
        ] {
            let result = parse_rules_with(&owner(url), &policy);
            assert_eq!(result.is_ok(), allowed, "{url}: {:?}", result.err());
        }
        // With nobody needing a token to change rules, the inside of the network is off limits too.
        let open = WebhookPolicy::new(vec![], true);
        for (url, allowed) in [
            ("http://127.0.0.1:9000/x", false),
            ("http://10.0.0.7/x", false),
            ("http://localhost/x", false),
            ("http://pager/x", false),
            ("https://hooks.slack.com/x", true),
        ] {
            let result = parse_rules_with(&owner(url), &open);
            assert_eq!(result.is_ok(), allowed, "{url}: {:?}", result.err());
        }
    }

    #[test]
    fn the_source_shown_has_no_secret() {
        let shown = redacted_source(&format!(
            "{GOOD}\n[[owners]]\nname = \"pd\"\nescalation = [{{ after = \"0s\", webhook = \"https://events.pagerduty.com/v2/enqueue\", format = \"pagerduty\", routing_key = \"rk-123\", secrets = [\"new1\", \"old1\"] }}]\n"
        ));
        for secret in [
            "s3cret",
            "rk-123",
            "new1",
            "old1",
            "/dev",
            "/lead",
            "/v2/enqueue",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("http://127.0.0.1:9000/…"), "{shown}");
        assert!(shown.contains("routing_key = \"(redacted)\""), "{shown}");
    }

    #[test]
    fn bad_files_are_refused_with_line_and_reason() {
        let rule =
            |body: &str| format!("# comment\n[[rules]]\nname = \"r\"\nmetric = \"m\"\n{body}\n");
        let table: Vec<(String, usize, &str)> = vec![
            (rule("stat = \"p42\"\nabove = 1.0"), 5, "p42"),
            (rule("stat = \"p99\"\nabove = 1.0\nbogus = 1"), 7, "bogus"),
            (rule("stat = \"ratio\"\nabove = 1.0"), 2, "needs `over`"),
            (rule("stat = \"p99\"\nover = \"x\"\nabove = 1.0"), 2, "only for stat"),
            (rule("stat = \"p99\"\nabove = 1.0\nfor = \"two seconds\""), 7, "duration"),
            (rule("stat = \"p99\"\nabove = 1.0\nowner = \"ghost\""), 2, "ghost"),
            (rule("stat = \"p99\""), 2, "exactly one"),
            (rule("stat = \"p99\"\nabove = 1.0\nbelow = 2.0"), 2, "exactly one"),
            (rule("stat = \"p99\"\nabove = nan"), 2, "finite"),
            (rule("stat = \"p99\"\nabove = 1.0\nsplit_by = [\"region\"]"), 7, "region"),
            (format!("{}\n[[rules]]\nname = \"r\"\nmetric = \"m\"\nstat = \"max\"\nabove = 1.0\n", rule("stat = \"max\"\nabove = 1.0")), 8, "twice"),
            ("[[owners]]\nname = \"o\"\nescalation = []\n".to_owned(), 1, "empty escalation"),
            ("[[owners]]\nname = \"o\"\nescalation = [{ after = \"0s\", webhook = \"not a url\" }]\n".to_owned(), 1, "not a URL"),
            ("[[owners]]\nname = \"o\"\nescalation = [{ after = \"0s\", webhook = \"http://x/\", format = \"pagerduty\" }]\n".to_owned(), 1, "routing_key"),
            ("[[owners]]\nname = \"o\"\nescalation = [{ after = \"9s\", webhook = \"http://x/\" }, { after = \"1s\", webhook = \"http://y/\" }]\n".to_owned(), 1, "in order"),
            ("[[rules]\n".to_owned(), 1, ""),
            ("[[services]]\nname = \"s\"\nowner = \"nobody\"\n".to_owned(), 1, "nobody"),
        ];
        for (source, line, needle) in table {
            let err = parse_rules(&source).unwrap_err();
            assert_eq!(err.line, line, "{source}\n=> {err}");
            assert!(err.reason.contains(needle), "{source}\n=> {err}");
        }
    }
}
