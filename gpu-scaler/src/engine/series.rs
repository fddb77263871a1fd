//! Which series of an exposition a figure reads, and what one scrape holds of
//! them.
//!
//! A [`SeriesSelector`] is a family name and label matchers
//! (`vllm:num_requests_waiting`, `nv_trt_llm_request_metrics{request_type="waiting"}`).
//! One scrape reduces every series it selects to an [`Extract`]: the sum of the
//! plain samples and, for histograms, the buckets summed per `le`. Only extracts
//! are kept between scrapes, never the exposition.

use std::{collections::HashMap, fmt};

use super::exposition::{self, Event, Kind, ParseError};

/// A label matcher: `name="value"` or `name!="value"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Matcher {
    pub name: String,
    pub negated: bool,
    pub value: String,
}

/// A family and the label matchers its series must satisfy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesSelector {
    pub family: String,
    pub matchers: Vec<Matcher>,
}

impl fmt::Display for SeriesSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.family)?;
        if self.matchers.is_empty() {
            return Ok(());
        }
        f.write_str("{")?;
        for (i, m) in self.matchers.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let op = if m.negated { "!=" } else { "=" };
            let v = m
                .value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            write!(f, "{}{op}\"{v}\"", m.name)?;
        }
        f.write_str("}")
    }
}

/// Longest selector text accepted (metadata is user input).
pub const MAX_SELECTOR_LEN: usize = 1024;
/// Most matchers in one selector.
pub const MAX_MATCHERS: usize = 16;

impl SeriesSelector {
    /// A family without matchers.
    pub fn family(name: &str) -> Self {
        Self {
            family: name.to_owned(),
            matchers: Vec::new(),
        }
    }

    /// Parses `name` or `name{label="value",other!="x"}`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() > MAX_SELECTOR_LEN {
            return Err(format!("longer than {MAX_SELECTOR_LEN} characters"));
        }
        let b = text.as_bytes();
        let name_ok = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
        let end = b.iter().position(|c| !name_ok(*c)).unwrap_or(b.len());
        let family = &text[..end];
        if family.is_empty() || b[0].is_ascii_digit() {
            return Err("expected a metric family name such as vllm:num_requests_waiting".into());
        }
        let mut rest = text[end..].trim_start();
        let mut matchers = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let close = inner
                .rfind('}')
                .ok_or("missing '}' after the label matchers")?;
            if !inner[close + 1..].trim().is_empty() {
                return Err("text after '}'".into());
            }
            let mut s = &inner[..close];
            loop {
                s = s.trim_start_matches([' ', ',']);
                if s.is_empty() {
                    break;
                }
                let name_end = s
                    .bytes()
                    .position(|c| !(c.is_ascii_alphanumeric() || c == b'_'))
                    .unwrap_or(s.len());
                let name = &s[..name_end];
                if name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
                    return Err(format!("bad label name at {s:?}"));
                }
                let after = s[name_end..].trim_start();
                if after.starts_with("=~") || after.starts_with("!~") {
                    return Err(format!(
                        "label {name}: = or != only (no regular expressions)"
                    ));
                }
                let (negated, after) = if let Some(a) = after.strip_prefix("!=") {
                    (true, a)
                } else if let Some(a) = after.strip_prefix('=') {
                    (false, a)
                } else {
                    return Err(format!(
                        "label {name}: expected = or != (no regular expressions)"
                    ));
                };
                let after = after
                    .trim_start()
                    .strip_prefix('"')
                    .ok_or_else(|| format!("label {name}: the value must be quoted"))?;
                let close_q = closing_quote(after)
                    .ok_or_else(|| format!("label {name}: unterminated value"))?;
                // The escapes Display writes (and the exposition format uses).
                let value = super::exposition::unescape(&after[..close_q]).into_owned();
                matchers.push(Matcher {
                    name: name.to_owned(),
                    negated,
                    value,
                });
                if matchers.len() > MAX_MATCHERS {
                    return Err(format!("more than {MAX_MATCHERS} label matchers"));
                }
                s = &after[close_q + 1..];
            }
            rest = "";
        }
        if !rest.is_empty() {
            return Err(format!("unexpected {rest:?} after the family name"));
        }
        matchers.sort();
        let sel = Self {
            family: family.to_owned(),
            matchers,
        };
        // The limit holds for the canonical form too (escapes make it longer
        // than the text it came from), so whatever a selector prints, for the
        // peer protocol or a metric name, parses again (found by the fuzz
        // target `exposition`).
        let canonical = sel.to_string().len();
        if canonical > MAX_SELECTOR_LEN {
            return Err(format!(
                "longer than {MAX_SELECTOR_LEN} characters once its escapes are written \
                 ({canonical})"
            ));
        }
        Ok(sel)
    }

    fn matches(&self, sample: &exposition::Sample<'_>) -> bool {
        self.matchers.iter().all(|m| {
            let v = sample.label(&m.name);
            let equal = v.as_deref().unwrap_or("") == m.value;
            equal != m.negated
        })
    }
}

fn closing_quote(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Histogram buckets summed over the selected series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    /// (upper bound, cumulative count), sorted by bound; `+Inf` last.
    pub le: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

/// What one scrape holds of one selector.
#[derive(Clone, Debug, PartialEq)]
pub struct Extract {
    /// The family's `# TYPE` (untyped when the exposition gave none).
    pub kind: Kind,
    /// Series selected (for a histogram: distinct `_count` samples).
    pub series: u32,
    /// Sum of the selected plain samples (gauge, counter, untyped values).
    pub sum: f64,
    pub buckets: Option<Buckets>,
}

/// Every selector's extract from one exposition. A selector whose family the
/// exposition does not have is absent from the map.
pub fn extract(
    text: &str,
    selectors: &[&SeriesSelector],
) -> Result<HashMap<SeriesSelector, Extract>, ParseError> {
    let families: Vec<&str> = selectors.iter().map(|s| s.family.as_str()).collect();
    let mut kinds: HashMap<&str, Kind> = HashMap::new();
    let mut out: HashMap<SeriesSelector, Extract> = HashMap::new();
    exposition::parse(text, &exposition::Prefixes(&families), |e| match e {
        Event::Type { family, kind } => {
            if families.contains(&family) {
                kinds.insert(family, kind);
            }
        }
        Event::Sample(sample) => {
            for sel in selectors {
                let kind = kinds
                    .get(sel.family.as_str())
                    .copied()
                    .unwrap_or(Kind::Untyped);
                if !kind.owns(&sel.family, sample.name) || !sel.matches(&sample) {
                    continue;
                }
                let x = out.entry((*sel).clone()).or_insert_with(|| Extract {
                    kind,
                    series: 0,
                    sum: 0.0,
                    buckets: None,
                });
                let suffix = &sample.name[sel.family.len()..];
                match (kind, suffix) {
                    (Kind::Histogram | Kind::GaugeHistogram, "_bucket") => {
                        let b = x.buckets.get_or_insert_with(Buckets::default);
                        let le = sample
                            .label("le")
                            .and_then(|l| match l.as_ref() {
                                "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
                                other => other.parse::<f64>().ok(),
                            })
                            .unwrap_or(f64::NAN);
                        match b.le.iter_mut().find(|(bound, _)| *bound == le) {
                            Some((_, c)) => *c += sample.value,
                            None => b.le.push((le, sample.value)),
                        }
                    }
                    (Kind::Histogram | Kind::GaugeHistogram, "_sum" | "_gsum") => {
                        x.buckets.get_or_insert_with(Buckets::default).sum += sample.value;
                    }
                    (Kind::Histogram | Kind::GaugeHistogram, "_count" | "_gcount") => {
                        x.buckets.get_or_insert_with(Buckets::default).count += sample.value;
                        x.series += 1;
                    }
                    (Kind::Summary, "_sum" | "_count") => {}
                    (Kind::Summary, _) => {
                        // Quantile samples are not summable across series.
                    }
                    _ => {
                        x.series += 1;
                        x.sum += sample.value;
                    }
                }
            }
        }
    })?;
    for x in out.values_mut() {
        if let Some(b) = &mut x.buckets {
            b.le.retain(|(le, _)| !le.is_nan());
            b.le.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    // A family declared by TYPE but without a selected series is present with
    // zero series (a gauge no engine reported yet), not absent.
    for sel in selectors {
        if let Some(kind) = kinds.get(sel.family.as_str()) {
            out.entry((*sel).clone()).or_insert(Extract {
                kind: *kind,
                series: 0,
                sum: 0.0,
                buckets: None,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_limit_holds_for_what_a_selector_prints() {
        // Raw newlines print as `\n`: 600 of them are 1,200 characters written.
        let long = format!("a{{b=\"{}\"}}", "\n".repeat(600));
        assert!(long.len() <= MAX_SELECTOR_LEN);
        let e = SeriesSelector::parse(&long).expect_err("too long once escaped");
        assert!(e.contains("escapes"), "{e}");
        let short = format!("a{{b=\"{}\"}}", "\n".repeat(300));
        let sel = SeriesSelector::parse(&short).expect("within the limit escaped");
        assert_eq!(SeriesSelector::parse(&sel.to_string()), Ok(sel));
    }

    #[test]
    fn selector_text_round_trips() {
        let s = SeriesSelector::parse(
            r#"nv_trt_llm_request_metrics{request_type="waiting", model!="x\"y"}"#,
        )
        .expect("parses");
        assert_eq!(s.family, "nv_trt_llm_request_metrics");
        assert_eq!(s.matchers.len(), 2);
        assert_eq!(SeriesSelector::parse(&s.to_string()).expect("again"), s);
        for bad in [
            "",
            "9abc",
            "a{b}",
            "a{b=c}",
            "a{b=~\"c\"}",
            "a{b=\"c\"",
            "a{b=\"c\"} x",
            "a b",
        ] {
            assert!(SeriesSelector::parse(bad).is_err(), "{bad:?}");
        }
        // A newline, a quote and a backslash survive the round trip (fuzz).
        let odd = SeriesSelector {
            family: "f".into(),
            matchers: vec![Matcher {
                name: "t".into(),
                negated: false,
                value: "a\nb\"c\\d".into(),
            }],
        };
        assert_eq!(
            SeriesSelector::parse(&odd.to_string()).expect("parses"),
            odd
        );
        let long = format!("a{{{}}}", "b=\"c\",".repeat(17));
        assert!(SeriesSelector::parse(&long).is_err());
    }

    #[test]
    fn extracts_sum_series_and_buckets() {
        let text = "# TYPE g gauge\ng{engine=\"0\"} 2\ng{engine=\"1\"} 3\n\
g_by_reason{reason=\"x\"} 100\n\
# TYPE h histogram\nh_bucket{le=\"0.1\",engine=\"0\"} 1\nh_bucket{le=\"+Inf\",engine=\"0\"} 2\n\
h_bucket{le=\"0.1\",engine=\"1\"} 3\nh_bucket{le=\"+Inf\",engine=\"1\"} 4\n\
h_sum{engine=\"0\"} 0.5\nh_count{engine=\"0\"} 2\nh_sum{engine=\"1\"} 0.7\nh_count{engine=\"1\"} 4\n\
# TYPE empty gauge\n";
        let g = SeriesSelector::family("g");
        let g1 = SeriesSelector::parse("g{engine=\"1\"}").expect("sel");
        let h = SeriesSelector::family("h");
        let empty = SeriesSelector::family("empty");
        let absent = SeriesSelector::family("absent");
        let x = extract(text, &[&g, &g1, &h, &empty, &absent]).expect("parses");
        assert_eq!((x[&g].series, x[&g].sum), (2, 5.0));
        assert_eq!((x[&g1].series, x[&g1].sum), (1, 3.0));
        let b = x[&h].buckets.as_ref().expect("buckets");
        assert_eq!(b.le, vec![(0.1, 4.0), (f64::INFINITY, 6.0)]);
        assert_eq!((b.sum, b.count, x[&h].series), (1.2, 6.0, 2));
        assert_eq!(x[&empty].series, 0);
        assert!(!x.contains_key(&absent));
    }
}
