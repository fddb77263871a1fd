//! The text formats engines serve on `/metrics`: Prometheus text 0.0.4 and
//! OpenMetrics 1.0 text.
//!
//! Zero-copy and streaming: [`parse`] walks the text once and hands each `# TYPE`
//! line and each sample to a callback, with names and label values borrowed from
//! the input. A [`Wanted`] filter skips the samples of families nobody asked for
//! after reading only their name, which is where the time goes on a vLLM
//! exposition (hundreds of histogram buckets, a few gauges used).
//!
//! Why not a crate: `prometheus-parse` allocates a `String` per label and splits
//! lines with a regex, and OpenMetrics-only parsers reject Prometheus text; both
//! are compared in `cargo bench -p gpu-scaler-tests --bench exposition`.
//!
//! One malformed line makes the whole exposition an error, as for a Prometheus
//! scrape: a half-read engine must not give a half-summed number. Lines of
//! families the filter skips are not validated.

use std::{borrow::Cow, fmt};

/// A family's declared type (`# TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// OpenMetrics `gaugehistogram`: buckets that may go down.
    GaugeHistogram,
    Summary,
    Info,
    StateSet,
    /// `untyped` (Prometheus) or `unknown` (OpenMetrics), or no `# TYPE` line.
    Untyped,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "counter" => Self::Counter,
            "gauge" => Self::Gauge,
            "histogram" => Self::Histogram,
            "gaugehistogram" => Self::GaugeHistogram,
            "summary" => Self::Summary,
            "info" => Self::Info,
            "stateset" => Self::StateSet,
            "untyped" | "unknown" => Self::Untyped,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
            Self::GaugeHistogram => "gaugehistogram",
            Self::Summary => "summary",
            Self::Info => "info",
            Self::StateSet => "stateset",
            Self::Untyped => "untyped",
        }
    }

    /// Whether a sample named `sample` belongs to family `family` of this kind:
    /// exact suffixes only, so `vllm:num_requests_waiting_by_reason` is never
    /// part of `vllm:num_requests_waiting`.
    pub fn owns(self, family: &str, sample: &str) -> bool {
        let Some(rest) = sample.strip_prefix(family) else {
            return false;
        };
        match self {
            Self::Counter => matches!(rest, "" | "_total"),
            Self::Histogram | Self::GaugeHistogram => {
                matches!(rest, "_bucket" | "_sum" | "_count" | "_gsum" | "_gcount")
            }
            Self::Summary => matches!(rest, "" | "_sum" | "_count"),
            Self::Info => matches!(rest, "" | "_info"),
            Self::Gauge | Self::StateSet | Self::Untyped => rest.is_empty(),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line that is not in either format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct ParseError {
    pub line: usize,
    pub what: String,
}

/// One sample line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// The text between the braces, already checked to be well formed.
    labels: &'a str,
    /// Where its labels are in `labels`, as the check found them.
    spans: Spans,
    pub value: f64,
}

/// Most labels whose places a sample keeps; a sample with more is walked
/// again when its labels are read (engines' samples have 2 to 5).
const SPANS: usize = 8;

/// The labels' places in a checked label block, recorded by the check so that
/// reading them does not walk the block a second time (that walk was a third
/// of a full parse). `n == OVERFLOW`: not recorded, walk the block.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spans {
    n: u8,
    /// Per label: name start and end, raw value start and end.
    at: [[u16; 4]; SPANS],
}

const OVERFLOW: u8 = u8::MAX;

impl Spans {
    const EMPTY: Self = Self {
        n: 0,
        at: [[0; 4]; SPANS],
    };
}

impl<'a> Sample<'a> {
    /// The sample's labels as (name, value), values unescaped.
    pub fn labels(&self) -> Labels<'a> {
        Labels {
            rest: self.labels,
            block: self.labels,
            spans: self.spans,
            i: 0,
        }
    }

    /// The value of label `name`, unescaped.
    pub fn label(&self, name: &str) -> Option<Cow<'a, str>> {
        self.labels().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// Iterator over a checked label block.
#[derive(Clone, Debug)]
pub struct Labels<'a> {
    rest: &'a str,
    block: &'a str,
    spans: Spans,
    i: usize,
}

impl<'a> Iterator for Labels<'a> {
    type Item = (&'a str, Cow<'a, str>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.spans.n != OVERFLOW {
            let [ns, ne, vs, ve] = *self.spans.at[..usize::from(self.spans.n)].get(self.i)?;
            self.i += 1;
            let at = |a: u16, b: u16| self.block.get(usize::from(a)..usize::from(b));
            return Some((at(ns, ne)?, unescape(at(vs, ve)?)));
        }
        // The block was validated by `label_block`: walk it without checking
        // again.
        let s = self.rest.trim_start_matches([' ', ',']);
        if s.is_empty() {
            return None;
        }
        let (name, rest) = if let Some(q) = s.strip_prefix('"') {
            quoted(q).ok()?
        } else {
            let eq = memchr::memchr(b'=', s.as_bytes())?;
            (s[..eq].trim_end_matches(' '), &s[eq..])
        };
        let rest = rest.trim_start_matches(' ').strip_prefix('=')?;
        let rest = rest.trim_start_matches(' ').strip_prefix('"')?;
        let (raw, rest) = quoted(rest).ok()?;
        self.rest = rest;
        Some((name, unescape(raw)))
    }
}

/// What [`parse`] reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event<'a> {
    Type { family: &'a str, kind: Kind },
    Sample(Sample<'a>),
}

/// Which sample names the caller wants; the others are skipped unread.
pub trait Wanted {
    fn wants(&self, sample_name: &str) -> bool;
}

/// Every sample.
pub struct All;

impl Wanted for All {
    fn wants(&self, _: &str) -> bool {
        true
    }
}

/// Samples whose name starts with one of the prefixes (family names; the exact
/// family is decided by the caller from `# TYPE`).
pub struct Prefixes<'p>(pub &'p [&'p str]);

impl Wanted for Prefixes<'_> {
    fn wants(&self, sample_name: &str) -> bool {
        self.0.iter().any(|p| sample_name.starts_with(p))
    }
}

fn err(line: usize, what: impl Into<String>) -> ParseError {
    ParseError {
        line,
        what: what.into(),
    }
}

/// Character classes of names, as bits: 1 may start a metric name, 2 may
/// follow in one, 4 may start a label name, 8 may follow in one (a table:
/// names are most of an exposition's bytes).
const NAME: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphabetic() || b == b'_' {
            t[c] = 1 | 2 | 4 | 8;
        } else if b == b':' {
            t[c] = 1 | 2;
        } else if b.is_ascii_digit() {
            t[c] = 2 | 8;
        }
        c += 1;
    }
    t
};

fn is_name_start(b: u8) -> bool {
    NAME[usize::from(b)] & 1 != 0
}

fn is_name_char(b: u8) -> bool {
    NAME[usize::from(b)] & 2 != 0
}

/// A metric name at the start of `s`: the name and the rest.
fn metric_name(s: &str) -> Option<(&str, &str)> {
    let b = s.as_bytes();
    if b.is_empty() || !is_name_start(b[0]) {
        return None;
    }
    let end = b.iter().position(|c| !is_name_char(*c)).unwrap_or(b.len());
    Some((&s[..end], &s[end..]))
}

/// One `name="value"` at the start of `s` (after optional spaces): name, raw
/// (still escaped) value, and the rest after the closing quote.
fn one_label(s: &str) -> Result<(&str, &str, &str), &'static str> {
    let s = s.trim_start_matches(' ');
    let b = s.as_bytes();
    let (name, rest) = if b.first() == Some(&b'"') {
        // Prometheus 3 quoted (UTF-8) label names.
        let (raw, rest) = quoted(&s[1..])?;
        (raw, rest)
    } else {
        if b.is_empty() || NAME[usize::from(b[0])] & 4 == 0 {
            return Err("a label name must start with a letter or '_'");
        }
        let end = b
            .iter()
            .position(|c| NAME[usize::from(*c)] & 8 == 0)
            .unwrap_or(b.len());
        (&s[..end], &s[end..])
    };
    let rest = rest.trim_start_matches(' ');
    let rest = rest
        .strip_prefix('=')
        .ok_or("expected '=' after a label name")?
        .trim_start_matches(' ');
    let rest = rest
        .strip_prefix('"')
        .ok_or("a label value must be quoted")?;
    let (raw, rest) = quoted(rest)?;
    Ok((name, raw, rest))
}

/// The raw text up to the closing quote of a string whose opening quote was
/// consumed, and the rest after it.
fn quoted(s: &str) -> Result<(&str, &str), &'static str> {
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(at) = memchr::memchr3(b'"', b'\\', b'\n', &b[i..]) {
        let j = i + at;
        match b[j] {
            b'\\' => {
                if !matches!(b.get(j + 1), Some(b'\\' | b'"' | b'n')) {
                    return Err("bad escape in a quoted string (allowed: \\\\ \\\" \\n)");
                }
                i = j + 2;
            }
            b'"' => return Ok((&s[..j], &s[j + 1..])),
            _ => return Err("unterminated quoted string"),
        }
    }
    Err("unterminated quoted string")
}

/// A quoted string's text without its escapes (`\\`, `\"`, `\n`).
pub(crate) fn unescape(raw: &str) -> Cow<'_, str> {
    if !raw.contains('\\') {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Checks a label block after its `{`; returns the block (without braces), the
/// labels' places in it, and the rest after `}`. A quoted metric name inside
/// the braces (Prometheus 3's `{"name", a="b"}`) is returned separately.
#[allow(clippy::type_complexity)]
fn label_block(s: &str) -> Result<(Option<&str>, &str, Spans, &str), &'static str> {
    let mut rest = s;
    let mut quoted_name = None;
    let start = s;
    let mut first = true;
    let mut block_start = 0;
    let mut spans = Spans::EMPTY;
    // Offsets into `s`; made relative to the block at the end.
    let offset = |part: &str| part.as_ptr() as usize - start.as_ptr() as usize;
    loop {
        rest = rest.trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix('}') {
            let used = start.len() - rest.len();
            if spans.n != OVERFLOW {
                for at in &mut spans.at[..usize::from(spans.n)] {
                    for x in at.iter_mut() {
                        // block_start <= every offset: a quoted name comes first.
                        *x -= block_start as u16;
                    }
                }
            }
            return Ok((quoted_name, &start[block_start..used], spans, after));
        }
        if first && rest.starts_with('"') {
            // `{"name"` followed by `,` or `}` is a quoted metric name.
            let (raw, after) = quoted(&rest[1..])?;
            let after_t = after.trim_start_matches(' ');
            if after_t.starts_with(',') || after_t.starts_with('}') {
                quoted_name = Some(raw);
                rest = after_t.strip_prefix(',').unwrap_or(after_t);
                block_start = start.len() - rest.len();
                first = false;
                continue;
            }
        }
        first = false;
        let (name, raw, after) = one_label(rest)?;
        if usize::from(spans.n) < SPANS {
            let (ns, vs) = (offset(name), offset(raw));
            let ve = vs + raw.len();
            if let (Ok(ns), Ok(ne), Ok(vs), Ok(ve)) = (
                u16::try_from(ns),
                u16::try_from(ns + name.len()),
                u16::try_from(vs),
                u16::try_from(ve),
            ) {
                spans.at[usize::from(spans.n)] = [ns, ne, vs, ve];
                spans.n += 1;
            } else {
                spans.n = OVERFLOW;
            }
        } else {
            spans.n = OVERFLOW;
        }
        rest = after.trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label");
        }
    }
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN` (any case, as Go's
/// ParseFloat and the formats allow).
fn value(s: &str) -> Option<f64> {
    if let Some(v) = whole_number(s.as_bytes()) {
        return Some(v);
    }
    match s {
        "+Inf" | "Inf" | "+inf" | "inf" => return Some(f64::INFINITY),
        "-Inf" | "-inf" => return Some(f64::NEG_INFINITY),
        "NaN" | "nan" => return Some(f64::NAN),
        _ => {}
    }
    let b = s.as_bytes();
    // Rust's parser accepts "infinity" and such; the formats do not.
    if b.is_empty()
        || !b
            .iter()
            .all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'+' | b'e' | b'E'))
    {
        return None;
    }
    s.parse().ok()
}

/// The value of `digits` or `digits.0...` up to 2^53 (counters, bucket
/// counts, gauges like `3.0`: most of an exposition's values), exact, without
/// the general float parser; `None` for anything else (the caller parses it).
fn whole_number(b: &[u8]) -> Option<f64> {
    let int_end = b
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(b.len());
    if int_end == 0 || int_end > 15 {
        return None;
    }
    match &b[int_end..] {
        [] => {}
        [b'.', zeros @ ..] if zeros.iter().all(|c| *c == b'0') => {}
        _ => return None,
    }
    let mut n: u64 = 0;
    for c in &b[..int_end] {
        n = n * 10 + u64::from(c - b'0');
    }
    // < 10^15 < 2^53: every such integer is an f64 exactly.
    Some(n as f64)
}

/// Walks `text`, calling `each` for every `# TYPE` line and every wanted sample.
pub fn parse<'a>(
    text: &'a str,
    wanted: &impl Wanted,
    mut each: impl FnMut(Event<'a>),
) -> Result<(), ParseError> {
    let mut line_no = 0;
    let mut eof = false;
    // memchr's SIMD search finds line ends at several bytes a cycle, where
    // `str::split` walks a word at a time: line splitting was an eighth of a
    // full parse.
    let mut start = 0;
    let ends = memchr::memchr_iter(b'\n', text.as_bytes()).chain(std::iter::once(text.len()));
    for end in ends {
        let raw = &text[start..end];
        start = end + 1;
        line_no += 1;
        // Leading blanks are allowed, as Prometheus's own parser skips them.
        let line = raw
            .strip_suffix('\r')
            .unwrap_or(raw)
            .trim_start_matches([' ', '\t']);
        if line.is_empty() {
            continue;
        }
        if eof {
            return Err(err(line_no, "text after # EOF"));
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start_matches(' ');
            if comment == "EOF" {
                eof = true;
            } else if let Some(t) = comment.strip_prefix("TYPE ") {
                let mut parts = t.trim().splitn(2, ' ');
                let family = parts.next().unwrap_or_default();
                let kind_text = parts.next().unwrap_or_default().trim();
                if metric_name(family).is_none_or(|(_, rest)| !rest.is_empty()) {
                    return Err(err(line_no, format!("bad family name in TYPE: {family:?}")));
                }
                let kind = Kind::parse(kind_text)
                    .ok_or_else(|| err(line_no, format!("unknown type {kind_text:?}")))?;
                each(Event::Type { family, kind });
            }
            // HELP, UNIT and plain comments carry nothing a figure needs.
            continue;
        }
        let (name, rest) = match metric_name(line) {
            Some(x) => x,
            None if line.starts_with('{') => ("", line),
            None => {
                return Err(err(line_no, format!("not a sample: {:?}", truncate(line))));
            }
        };
        if !name.is_empty() && !wanted.wants(name) {
            continue;
        }
        let (name, labels, spans, rest) = if let Some(block) = rest.strip_prefix('{') {
            let (quoted_name, labels, spans, rest) = label_block(block)
                .map_err(|w| err(line_no, format!("{w}: {:?}", truncate(line))))?;
            let name = match (name, quoted_name) {
                ("", Some(q)) => {
                    if !wanted.wants(q) {
                        continue;
                    }
                    q
                }
                ("", None) => return Err(err(line_no, "a sample without a name")),
                (n, None) => n,
                (_, Some(_)) => return Err(err(line_no, "two metric names")),
            };
            (name, labels, spans, rest)
        } else {
            (name, "", Spans::EMPTY, rest)
        };
        if !rest.starts_with([' ', '\t']) {
            return Err(err(
                line_no,
                format!("expected a space before the value: {:?}", truncate(line)),
            ));
        }
        // value [timestamp] [# exemplar]
        let rest = rest.trim_start_matches([' ', '\t']);
        let (v, _) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
        let value = value(v).ok_or_else(|| err(line_no, format!("bad value {v:?}")))?;
        each(Event::Sample(Sample {
            name,
            labels,
            spans,
            value,
        }));
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_from_recorded_places_and_past_them_alike() {
        // 2 labels (recorded), a quoted metric and label name, an escaped
        // value, and 10 labels (more than are recorded: walked again).
        let many: String = (0..10)
            .map(|i| format!("l{i}=\"v{i}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "a{{x=\"1\",y = \"two\"}} 1\n{{\"b.c\", \"k.1\"=\"q\\\"q\", z=\"\"}} 2\nd{{{many}}} 3\n"
        );
        let (_, samples) = all(&text);
        assert_eq!(
            samples[0].1,
            [("x".into(), "1".into()), ("y".into(), "two".into())]
        );
        assert_eq!(samples[1].0, "b.c");
        assert_eq!(
            samples[1].1,
            [("k.1".into(), "q\"q".into()), ("z".into(), String::new())]
        );
        let want: Vec<(String, String)> = (0..10)
            .map(|i| (format!("l{i}"), format!("v{i}")))
            .collect();
        assert_eq!(samples[2].1, want);
    }

    #[test]
    fn whole_numbers_read_exactly_as_the_float_parser_reads_them() {
        for v in [
            "0",
            "7",
            "12.0",
            "12.",
            "1234567890123.000",
            "999999999999999",
        ] {
            assert_eq!(whole_number(v.as_bytes()), v.parse::<f64>().ok(), "{v}");
        }
        for v in [
            "",
            "1.5",
            "1e3",
            "-1",
            "+1",
            "1.0e2",
            "1234567890123456",
            ".5",
            "1_0",
        ] {
            assert_eq!(whole_number(v.as_bytes()), None, "{v}");
        }
        assert_eq!(value("1.5"), Some(1.5));
        assert_eq!(value("-3"), Some(-3.0));
        assert_eq!(value("1e3"), Some(1000.0));
    }

    type Owned = (
        Vec<(String, Kind)>,
        Vec<(String, Vec<(String, String)>, f64)>,
    );

    fn all(text: &str) -> Owned {
        let mut types = Vec::new();
        let mut samples = Vec::new();
        parse(text, &All, |e| match e {
            Event::Type { family, kind } => types.push((family.to_owned(), kind)),
            Event::Sample(s) => samples.push((
                s.name.to_owned(),
                s.labels()
                    .map(|(k, v)| (k.to_owned(), v.into_owned()))
                    .collect(),
                s.value,
            )),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        (types, samples)
    }

    #[test]
    fn prometheus_text() {
        let text = "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B\"} 3.0\n\
vllm:num_requests_waiting{engine=\"1\",model_name=\"meta-llama/Llama-3.1-8B\"} 4.0\n\
# TYPE x_seconds histogram\n\
x_seconds_bucket{le=\"0.5\"} 1\r\n\
x_seconds_bucket{le=\"+Inf\"} 2 1700000000000\n\
x_seconds_sum 1.25e0\n\
x_seconds_count 2\n\
plain NaN\n\
esc{a=\"q\\\"uo\\\\te\\n\",b=\"\",} -Inf\n";
        let (types, samples) = all(text);
        assert_eq!(
            types,
            vec![
                ("vllm:num_requests_waiting".to_owned(), Kind::Gauge),
                ("x_seconds".to_owned(), Kind::Histogram)
            ]
        );
        assert_eq!(samples.len(), 8);
        assert_eq!(samples[1].1[0], ("engine".to_owned(), "1".to_owned()));
        assert_eq!(samples[1].2, 4.0);
        assert_eq!(samples[3].1, vec![("le".to_owned(), "+Inf".to_owned())]);
        assert_eq!(samples[4].2, 1.25);
        assert!(samples[6].2.is_nan());
        assert_eq!(
            samples[7].1,
            vec![
                ("a".to_owned(), "q\"uo\\te\n".to_owned()),
                ("b".to_owned(), String::new())
            ]
        );
        assert_eq!(samples[7].2, f64::NEG_INFINITY);
    }

    #[test]
    fn leading_blanks_are_skipped() {
        let (types, samples) = all("  # TYPE g gauge\n\t g{a=\"b\"} 2\n");
        assert_eq!(types, vec![("g".to_owned(), Kind::Gauge)]);
        assert_eq!(samples[0].2, 2.0);
    }

    #[test]
    fn openmetrics_text() {
        let text = "# TYPE nv_inference_request counter\n\
# UNIT nv_inference_request requests\n\
nv_inference_request_total{model=\"m\"} 10 # {trace_id=\"abc\"} 1.0 1700000000.0\n\
nv_inference_request_created{model=\"m\"} 1700000000.0\n\
{\"utf8.name\", model=\"m\"} 5\n\
# EOF\n";
        let (types, samples) = all(text);
        assert_eq!(types[0], ("nv_inference_request".to_owned(), Kind::Counter));
        assert_eq!(samples[0].0, "nv_inference_request_total");
        assert_eq!(samples[0].2, 10.0);
        assert_eq!(samples[2].0, "utf8.name");
        assert_eq!(samples[2].1, vec![("model".to_owned(), "m".to_owned())]);
        let after_eof = format!("{text}x 1\n");
        assert!(parse(&after_eof, &All, |_| {}).is_err());
    }

    #[test]
    fn family_ownership_has_no_prefix_trap() {
        let f = "vllm:num_requests_waiting";
        assert!(Kind::Gauge.owns(f, f));
        assert!(!Kind::Gauge.owns(f, "vllm:num_requests_waiting_by_reason"));
        assert!(Kind::Counter.owns("a", "a_total"));
        assert!(!Kind::Counter.owns("a", "a_created"));
        assert!(Kind::Histogram.owns("h", "h_bucket"));
        assert!(!Kind::Histogram.owns("h", "h"));
        assert!(!Kind::Histogram.owns("h", "h_bucket_x"));
    }

    #[test]
    fn filter_skips_unwanted_lines_unread() {
        let text = "a_thing 1\nnot{valid 2\nb 3\n";
        let mut seen = Vec::new();
        parse(text, &Prefixes(&["a", "b"]), |e| {
            if let Event::Sample(s) = e {
                seen.push(s.name);
            }
        })
        .expect("the malformed line is not wanted");
        assert_eq!(seen, vec!["a_thing", "b"]);
        assert!(parse(text, &All, |_| {}).is_err());
    }

    #[test]
    fn malformed_input_is_an_error_with_its_line() {
        for (text, line, what) in [
            ("x 1\ny{a=\"b} 2\n", 2, "unterminated"),
            ("x{a=b} 1\n", 1, "quoted"),
            ("x{a=\"b\" c=\"d\"} 1\n", 1, "',' or '}'"),
            ("x{1a=\"b\"} 1\n", 1, "label name"),
            ("x{a=\"\\q\"} 1\n", 1, "escape"),
            ("x one\n", 1, "bad value"),
            ("x infinity\n", 1, "bad value"),
            ("x\n", 1, "space before the value"),
            ("x{a=\"b\"}1\n", 1, "space before the value"),
            ("9x 1\n", 1, "not a sample"),
            ("# TYPE x bogus\n", 1, "unknown type"),
            ("# TYPE 9x gauge\n", 1, "family name"),
            ("{a=\"b\"} 1\n", 1, "without a name"),
        ] {
            let e = parse(text, &All, |_| {}).expect_err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.what.contains(what), "{text:?}: {e}");
        }
    }

    #[test]
    fn bytes_never_panic() {
        // A cheap stand-in for the fuzz target: every prefix of a tricky input.
        let text = "# TYPE a histogram\na_bucket{le=\"1\",x=\"\\\"\\\\\"} 1\n{\"q\\\"\",b=\"c\"} 2\n# EOF\n";
        for end in 0..=text.len() {
            if text.is_char_boundary(end) {
                let _ = parse(&text[..end], &All, |_| {});
            }
        }
    }
}
