//! `/metrics` content negotiation: OpenMetrics 1.0 for scrapers that ask for it (Prometheus
//! sends `Accept: application/openmetrics-text; version=1.0.0, …`), the classic Prometheus
//! text format 0.0.4 for everyone else (`promtool check metrics`, curl, older scrapers), as
//! Prometheus' client libraries do.
//!
//! The agent encodes OpenMetrics once (prometheus-client); [`to_text_004`] rewrites it to
//! the classic format, family by family, following the differences the OpenMetrics
//! specification lists against the text format 0.0.4: no `# EOF` and no `# UNIT`, a
//! counter's `HELP` and `TYPE` name its `_total` sample, `unknown` is `untyped`, `_created`
//! samples and exemplars have no place, and `HELP` text escapes only `\\` and `\n`.

/// The Content-Type of the classic text format (Prometheus "Exposition formats").
pub const TEXT_004_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics: it lists
/// `application/openmetrics-text` with a non-zero quality.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    accept.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        media.eq_ignore_ascii_case("application/openmetrics-text")
            && !parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
    })
}

/// Rewrites an OpenMetrics text exposition (as prometheus-client encodes it) in the classic
/// text format 0.0.4.
pub fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The current family's name and type, from its `# TYPE` line.
    let mut family: Option<(String, String)> = None;
    let mut pending_help: Option<(String, String)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name.to_string(), text.replace("\\\"", "\"")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (exposed, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_string(), "untyped"),
                "info" => (format!("{name}_info"), "gauge"),
                "stateset" | "gaugehistogram" => (name.to_string(), "gauge"),
                other => (name.to_string(), other),
            };
            if let Some((help_name, text)) = pending_help.take() {
                if help_name == name {
                    out.push_str(&format!("# HELP {exposed} {text}\n"));
                }
            }
            out.push_str(&format!("# TYPE {exposed} {kind}\n"));
            family = Some((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        // A sample: drop `_created` series and exemplars.
        let sample_name = line.split(['{', ' ']).next().unwrap_or("");
        if let Some((name, _)) = &family {
            if sample_name == format!("{name}_created") {
                continue;
            }
        }
        let sample = match line.find(" # {") {
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// Stamps every sample line of a text exposition with `ms`, milliseconds since the Unix
/// epoch (the text format 0.0.4's optional timestamp: "an int64 (milliseconds since
/// epoch)", Prometheus "Exposition formats"); comment lines are kept as they are.
pub fn stamp(text_004: &str, ms: i64) -> String {
    let suffix = format!(" {ms}\n");
    let mut out = String::with_capacity(text_004.len() + text_004.len() / 4);
    for line in text_004.lines() {
        out.push_str(line);
        if line.starts_with('#') || line.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&suffix);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_are_stamped_in_milliseconds() {
        let text = "# HELP up Up.\n# TYPE up gauge\nup 1\nx{a=\"b c\"} 2.5\n";
        assert_eq!(
            stamp(text, 1_700_000_000_123),
            "# HELP up Up.\n# TYPE up gauge\nup 1 1700000000123\nx{a=\"b c\"} 2.5 1700000000123\n"
        );
    }

    use super::*;

    #[test]
    fn accept_headers_choose_the_format() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain; version=0.0.4")));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text; q=0, text/plain"
        )));
    }

    #[test]
    fn openmetrics_becomes_text_004() {
        let om = "# HELP rampart_http_requests Requests served, by \\\"class\\\".\n\
                  # TYPE rampart_http_requests counter\n\
                  rampart_http_requests_total{code=\"2xx\"} 3\n\
                  rampart_http_requests_created{code=\"2xx\"} 1700000000.0\n\
                  # HELP rampart_host_memory_total_bytes Usable RAM.\n\
                  # TYPE rampart_host_memory_total_bytes gauge\n\
                  # UNIT rampart_host_memory_total_bytes bytes\n\
                  rampart_host_memory_total_bytes 1024 # {trace_id=\"x\"} 1\n\
                  # HELP odd Something.\n\
                  # TYPE odd unknown\n\
                  odd 1\n\
                  # EOF\n";
        let text = to_text_004(om);
        assert_eq!(
            text,
            "# HELP rampart_http_requests_total Requests served, by \"class\".\n\
             # TYPE rampart_http_requests_total counter\n\
             rampart_http_requests_total{code=\"2xx\"} 3\n\
             # HELP rampart_host_memory_total_bytes Usable RAM.\n\
             # TYPE rampart_host_memory_total_bytes gauge\n\
             rampart_host_memory_total_bytes 1024\n\
             # HELP odd Something.\n\
             # TYPE odd untyped\n\
             odd 1\n"
        );
    }
}
