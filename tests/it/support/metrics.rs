//! idem's `/metrics` endpoint: scraping, the text exposition format, and reading or
//! waiting for one series.
//!
//! A series is named as exposed, `name` or `name{label="value",...}`, with its labels in
//! any order: `a{x="1",y="2"}` and `a{y="2",x="1"}` are the same series. Build one from
//! parts with [`series_id`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::{client, Idem, WAIT_TIMEOUT};

/// How often [`wait_metric`] and [`wait_metric_sum`] scrape.
const POLL: Duration = Duration::from_millis(10);

/// How many of idem's last log lines a failed wait shows.
const LOG_TAIL: usize = 40;

// ---------------------------------------------------------------------------
// The text exposition format
// ---------------------------------------------------------------------------

/// One sample of a scrape.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The identity of the sample's series (see [`series_id`]).
    pub fn id(&self) -> String {
        series_id(
            &self.name,
            self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }
}

/// The identity of a series: `name`, or `name{a="1",b="2"}` with the labels sorted.
/// Usable wherever a series is named: `series_id("idem_waiters", [])`.
pub fn series_id<'a>(name: &str, labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let sorted: BTreeMap<&str, &str> = labels.into_iter().collect();
    if sorted.is_empty() {
        return name.to_owned();
    }
    let inner = sorted
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join(",");
    format!("{name}{{{inner}}}")
}

/// The identity of a series written as exposed, labels in any order.
fn canonical(series: &str) -> String {
    let (name, labels, rest) =
        parse_series(series).unwrap_or_else(|e| panic!("series {series:?}: {e}"));
    assert!(
        rest.trim().is_empty(),
        "series {series:?}: trailing {rest:?}"
    );
    series_id(name, labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// A parsed `/metrics` body (Prometheus text format 0.0.4).
#[derive(Debug, Clone)]
pub struct Exposition {
    pub text: String,
    pub samples: Vec<Sample>,
    /// `# TYPE` of each family.
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix('#') {
                let mut words = rest.split_whitespace();
                if words.next() == Some("TYPE") {
                    if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                        types.insert(name.to_owned(), kind.to_owned());
                    }
                }
                continue;
            }
            let sample = parse_sample(line)
                .unwrap_or_else(|e| panic!("/metrics line {}: {e}: {line:?}", n + 1));
            samples.push(sample);
        }
        Exposition {
            text: text.to_owned(),
            samples,
            types,
        }
    }

    /// Every sample by series identity.
    pub fn by_id(&self) -> BTreeMap<String, f64> {
        self.samples.iter().map(|s| (s.id(), s.value)).collect()
    }

    /// The value of the series with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.value_of(&series_id(name, labels.iter().copied()))
    }

    /// The value of a series named as exposed, labels in any order.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.value_of(&canonical(series))
    }

    fn value_of(&self, id: &str) -> Option<f64> {
        self.samples.iter().find(|s| s.id() == id).map(|s| s.value)
    }

    pub fn family(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// Every sample name (histograms appear as `_bucket`, `_sum` and `_count`).
    pub fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// The `idem_` lines, for failure messages.
    pub fn idem_lines(&self) -> String {
        self.text
            .lines()
            .filter(|l| l.starts_with("idem_") && !l.contains("_bucket{"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `name{labels}` at the start of `line`, and what follows it.
fn parse_series(line: &str) -> Result<(&str, BTreeMap<String, String>, &str), String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let end = line.find(|c: char| !is_name(c)).unwrap_or(line.len());
    let name = &line[..end];
    if name.is_empty() {
        return Err("no metric name".into());
    }
    let mut rest = &line[end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut consumed = None;
        loop {
            while chars.next_if(|(_, c)| *c == ' ' || *c == ',').is_some() {}
            match chars.peek() {
                Some((i, '}')) => {
                    consumed = Some(*i + 1);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=') {
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('=')
                || chars.next().map(|(_, c)| c) != Some('"')
            {
                return Err(format!("label {key:?}: expected =\""));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("dangling escape".into()),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            labels.insert(key.trim().to_owned(), value);
        }
        let consumed = consumed.ok_or("unterminated label set")?;
        rest = &after[consumed..];
    }
    Ok((name, labels, rest))
}

/// One exposition line: series, value and optional timestamp.
pub fn parse_sample(line: &str) -> Result<Sample, String> {
    let (name, labels, rest) = parse_series(line)?;
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The value of `series` in a `/metrics` body, if it is there.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    Exposition::parse(text).get(series)
}

// ---------------------------------------------------------------------------
// Reading idem's metrics
// ---------------------------------------------------------------------------

/// The body of idem's `GET /metrics`.
pub async fn scrape(idem: &Idem) -> String {
    client()
        .get(idem.metrics_url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("read /metrics")
}

/// The value of one series, or `None` when idem does not export it (yet).
pub async fn find_metric(idem: &Idem, series: &str) -> Option<f64> {
    sample(&scrape(idem).await, series)
}

/// The value of one series, which must be exported.
pub async fn metric(idem: &Idem, series: &str) -> f64 {
    let text = scrape(idem).await;
    sample(&text, series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

/// The value of one series, 0 when it is not exported (a labelled series appears on its
/// first event).
pub async fn metric_or_zero(idem: &Idem, series: &str) -> f64 {
    find_metric(idem, series).await.unwrap_or(0.0)
}

/// Polls one series until it equals `want` (absent counts as not yet): how a test knows
/// that waiters have attached, or that a request was accounted (idem records metrics just
/// after the response is written). An event wait bounded by [`WAIT_TIMEOUT`], never a
/// pause; on expiry it panics with the last value and idem's recent log lines.
pub async fn wait_metric(idem: &Idem, series: &str, want: f64) {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let got = find_metric(idem, series).await;
        if got == Some(want) {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "metric {series}: expected {want}, still {got:?} after {WAIT_TIMEOUT:?}\n\
                 --- idem's last log lines ---\n{}",
                log_tail(idem)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls until `series` summed over `replicas` (absent counting 0) equals `want`.
pub async fn wait_metric_sum(replicas: &[Idem], series: &str, want: f64) {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let mut sum = 0.0;
        for idem in replicas {
            sum += metric_or_zero(idem, series).await;
        }
        if sum == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} summed over the replicas: expected {want}, still {sum} after {WAIT_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// idem's last [`LOG_TAIL`] stderr lines, oldest first.
pub fn log_tail(idem: &Idem) -> String {
    let log = idem.stderr_text();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
}
