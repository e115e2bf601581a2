//! A strict parser for the subset of the Prometheus/OpenMetrics text exposition format that
//! Rampart agents emit (prometheus-client's OpenMetrics encoder).
//!
//! Accepted lines, one per `\n`:
//! - `# HELP <name> <text>`, `# TYPE <name> <type>`, `# UNIT <name> <unit>`;
//! - `# EOF`, which must be the last line when present (OpenMetrics requires it, the
//!   Prometheus 0.0.4 text format has none, both are accepted);
//! - `name{label="value",...} value [timestamp]`, with the escapes `\\`, `\"` and `\n`
//!   in label values (OpenMetrics 1.0, "ABNF": `escaped-string`).
//!
//! Anything else (blank lines, other comments, exemplars, duplicate label names, values that
//! are not numbers) is rejected with the line number and a reason: the ingest answers
//! `400 Bad Request` with that text rather than storing half a push.

use std::fmt;

/// The most samples one exposition may hold.
pub const MAX_SAMPLES: usize = 10_000;

/// Label pairs, sorted by name once parsed.
pub type Labels = Vec<(String, String)>;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name as written, e.g. `rampart_http_requests_total`.
    pub name: String,
    /// Labels sorted by name (names are unique).
    pub labels: Labels,
    /// The value; `NaN`, `+Inf` and `-Inf` are allowed.
    pub value: f64,
    /// The exposed timestamp, if any, the number as written (the Prometheus text format
    /// 0.0.4 gives milliseconds since the Unix epoch, which is what the monitoring service
    /// expects in a push; OpenMetrics gives seconds).
    pub timestamp: Option<f64>,
}

/// Why an exposition was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number (0 for the whole text).
    pub line: usize,
    /// What was wrong.
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "line {}: {}", self.line, self.reason)
        }
    }
}

impl std::error::Error for ParseError {}

const TYPES: [&str; 8] = [
    "counter",
    "gauge",
    "histogram",
    "gaugehistogram",
    "stateset",
    "info",
    "summary",
    "unknown",
];

/// Parses an exposition into its samples, in order.
///
/// Errors: the first offending line, see the module documentation; more than
/// [`MAX_SAMPLES`] samples; text that does not end with a newline.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let Some(body) = text.strip_suffix('\n') else {
        return Err(ParseError {
            line: 0,
            reason: "the exposition must end with a newline".into(),
        });
    };
    let mut samples = Vec::new();
    let mut eof = false;
    let mut typed = std::collections::HashSet::new();
    for (i, line) in body.split('\n').enumerate() {
        let n = i + 1;
        let fail = |reason: String| ParseError { line: n, reason };
        if eof {
            return Err(fail("content after # EOF".into()));
        }
        if let Some(rest) = line.strip_prefix('#') {
            eof = parse_comment(rest).map_err(fail)?;
            // One family per name (OpenMetrics "MetricFamilies MUST NOT appear more than once").
            if let Some(name) = rest
                .strip_prefix(" TYPE ")
                .and_then(|r| r.split(' ').next())
            {
                if !typed.insert(name) {
                    return Err(fail(format!("metric family {name:?} declared twice")));
                }
            }
            continue;
        }
        if samples.len() == MAX_SAMPLES {
            return Err(fail(format!("more than {MAX_SAMPLES} samples")));
        }
        samples.push(parse_sample(line).map_err(fail)?);
    }
    Ok(samples)
}

/// A `#` line without the `#`; returns whether it was `# EOF`.
fn parse_comment(rest: &str) -> Result<bool, String> {
    if rest == " EOF" {
        return Ok(true);
    }
    let mut parts = rest.splitn(4, ' ');
    let (Some(""), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("unsupported comment {:?}", truncate(rest)));
    };
    let arg = parts.next();
    if !is_metric_name(name) {
        return Err(format!("invalid metric name {:?}", truncate(name)));
    }
    match (kind, arg) {
        ("HELP", _) => Ok(false),
        ("TYPE", Some(t)) if TYPES.contains(&t) => Ok(false),
        ("TYPE", t) => Err(format!("unknown metric type {:?}", t.unwrap_or(""))),
        ("UNIT", Some(u)) if u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => Ok(false),
        ("UNIT", u) => Err(format!("invalid unit {:?}", u.unwrap_or(""))),
        _ => Err(format!("unsupported comment {:?}", truncate(rest))),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value in {:?}", truncate(line)))?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("invalid metric name {:?}", truncate(name)));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after)?;
        labels = parsed;
        rest = after;
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or_else(|| "expected one space before the value".to_string())?;
    let mut fields = rest.split(' ');
    let value = parse_number(fields.next().unwrap_or(""))?;
    let timestamp = match fields.next() {
        None => None,
        Some("#") => return Err("exemplars are not accepted".into()),
        Some(t) => Some(parse_number(t)?),
    };
    if fields.next().is_some() {
        return Err("unexpected text after the timestamp".into());
    }
    labels.sort_by(|a, b| a.0.cmp(&b.0));
    if labels.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(format!("duplicate label name in {:?}", truncate(line)));
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
        timestamp,
    })
}

/// Parses `name="value",...}` (the opening brace already consumed); returns the labels and
/// the text after the closing brace.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    if let Some(after) = s.strip_prefix('}') {
        return Ok((labels, after));
    }
    loop {
        let eq = s
            .find('=')
            .ok_or_else(|| "expected '=' after a label name".to_string())?;
        let key = &s[..eq];
        if !is_label_name(key) {
            return Err(format!("invalid label name {:?}", truncate(key)));
        }
        let after = s[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {key}: expected '\"'"))?;
        let (value, after) = parse_quoted(after).map_err(|e| format!("label {key}: {e}"))?;
        labels.push((key.to_string(), value));
        if let Some(after) = after.strip_prefix(',') {
            s = after;
        } else if let Some(after) = after.strip_prefix('}') {
            return Ok((labels, after));
        } else {
            return Err(format!("label {key}: expected ',' or '}}'"));
        }
    }
}

/// Reads an escaped string up to its closing quote; returns it and the text after the quote.
fn parse_quoted(s: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((_, 'n')) => out.push('\n'),
                Some((_, other)) => return Err(format!("invalid escape \\{other}")),
                None => return Err("unterminated escape".into()),
            },
            c => out.push(c),
        }
    }
    Err("unterminated label value".into())
}

/// A float as OpenMetrics writes it: decimal or exponent notation, `NaN`, `+Inf`, `-Inf`.
fn parse_number(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => return Ok(f64::NAN),
        "+Inf" | "Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    let plausible = !s.is_empty()
        && s.bytes().any(|b| b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if !plausible {
        return Err(format!("{:?} is not a number", truncate(s)));
    }
    s.parse::<f64>()
        .map_err(|_| format!("{:?} is not a number", truncate(s)))
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` (Prometheus data model).
fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*` (Prometheus data model).
fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// At most 60 characters of `s`, for error messages.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(60) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_what_prometheus_client_emits() {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        let mut registry = prometheus_client::registry::Registry::default();
        let family = Family::<Vec<(String, String)>, Counter>::default();
        registry.register("rampart_http_requests", "Requests.", family.clone());
        family
            .get_or_create(&vec![
                ("role".into(), "lb".into()),
                ("code".into(), "2xx".into()),
            ])
            .inc_by(7);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let samples = parse(&text).unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].name, "rampart_http_requests_total");
        assert_eq!(
            samples[0].labels,
            labels(&[("code", "2xx"), ("role", "lb")])
        );
        assert_eq!(samples[0].value, 7.0);
    }

    #[test]
    fn valid_exposition() {
        let text = "# HELP up Whether it is up.\n# TYPE up gauge\n# UNIT x_bytes bytes\n\
                    up 1\nload{} 0.25 1700000000.5\nx_bytes{a=\"b\",c=\"d\"} 1.5e9\n\
                    nan_gauge NaN\ninf{le=\"+Inf\"} +Inf\n# EOF\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].name, "up");
        assert!(s[0].labels.is_empty());
        assert_eq!(s[1].timestamp, Some(1_700_000_000.5));
        assert_eq!(s[2].labels, labels(&[("a", "b"), ("c", "d")]));
        assert_eq!(s[2].value, 1.5e9);
        assert!(s[3].value.is_nan());
        assert_eq!(s[4].value, f64::INFINITY);
        assert_eq!(parse("").unwrap(), Vec::new());
    }

    #[test]
    fn label_value_escapes() {
        let s =
            parse("m{path=\"a\\\\b\",q=\"say \\\"hi\\\"\",nl=\"x\\ny\",u=\"é,}\"} 2\n").unwrap();
        assert_eq!(
            s[0].labels,
            labels(&[
                ("nl", "x\ny"),
                ("path", "a\\b"),
                ("q", "say \"hi\""),
                ("u", "é,}")
            ])
        );
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("no newline 1", "newline"),
            ("1abc 1\n", "metric name"),
            ("m{a=\"b\"}1\n", "space"),
            ("m nope\n", "not a number"),
            ("m inf\n", "not a number"),
            ("m 1 2 3\n", "after the timestamp"),
            ("m{a=b} 1\n", "expected '\"'"),
            ("m{a=\"b} 1\n", "unterminated"),
            ("m{a=\"\\t\"} 1\n", "invalid escape"),
            ("m{a=\"1\",a=\"2\"} 1\n", "duplicate"),
            ("m{a=\"1\",} 1\n", "label name"),
            ("m{a=\"1\" b=\"2\"} 1\n", "expected ','"),
            ("m 1 # {a=\"b\"} 1\n", "exemplars"),
            ("m 1\n\nm 2\n", "no value"),
            ("# random comment\n", "unsupported comment"),
            ("# TYPE m banana\n", "unknown metric type"),
            (
                "# TYPE m counter\nm_total 1\n# TYPE m counter\n",
                "declared twice",
            ),
            ("# EOF\nm 1\n", "after # EOF"),
            ("m\n", "no value"),
            ("<html> x\n", "metric name"),
        ];
        for (text, want) in cases {
            let e = parse(text).expect_err(text);
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
        let e = parse("ok 1\nbad line\n").unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    fn too_many_samples() {
        let text = "m 1\n".repeat(MAX_SAMPLES + 1);
        assert!(parse(&text).unwrap_err().reason.contains("more than"));
    }
}
