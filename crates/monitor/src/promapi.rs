//! The Prometheus HTTP API over the store (Prometheus docs, "HTTP API"): `/api/v1/query`,
//! `/api/v1/query_range`, `/api/v1/series`, `/api/v1/labels`,
//! `/api/v1/label/<name>/values`, `/api/v1/rules`, `/api/v1/status/buildinfo`; the
//! alerts' `data` is added to `/api/v1/alerts` by the service.
//!
//! Every answer is the documented envelope: `{"status":"success","data":...}`, or
//! `{"status":"error","errorType":"bad_data"|"execution","error":"..."}` with 400 or 422.
//! Parameters come from the query string or, for POST, a form body
//! (`application/x-www-form-urlencoded`), as Grafana sends them.

use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value as Json_};

use crate::promql::{self, QueryError, Range, Value};

/// Request parameters, in order; repeated keys (`match[]`) kept.
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    /// The query string, plus the form body of a POST.
    ///
    /// Errors: the text is not `application/x-www-form-urlencoded` (the message says
    /// which part).
    pub(crate) fn from_request(method: &Method, uri: &Uri, body: &Bytes) -> Result<Params, String> {
        let mut p: Vec<(String, String)> = match uri.query() {
            Some(q) => serde_urlencoded::from_str(q).map_err(|e| format!("query string: {e}"))?,
            None => Vec::new(),
        };
        if method == Method::POST && !body.is_empty() {
            let form: Vec<(String, String)> =
                serde_urlencoded::from_bytes(body).map_err(|e| format!("form body: {e}"))?;
            p.extend(form);
        }
        Ok(Params(p))
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// `400` with `errorType: bad_data`.
pub(crate) fn bad(msg: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_data", msg)
}

fn error(code: StatusCode, kind: &str, msg: &str) -> Response {
    (
        code,
        Json(json!({"status": "error", "errorType": kind, "error": msg})),
    )
        .into_response()
}

/// `200` with `{"status":"success","data":data}`.
pub(crate) fn success(data: Json_) -> Response {
    Json(json!({"status": "success", "data": data})).into_response()
}

fn query_error(e: QueryError) -> Response {
    match e {
        QueryError::Execution(m) => error(StatusCode::UNPROCESSABLE_ENTITY, "execution", &m),
        other => bad(&other.to_string()),
    }
}

/// A time parameter: Unix seconds (fractions allowed) or RFC 3339.
pub(crate) fn parse_time(s: &str) -> Option<f64> {
    if let Ok(t) = s.parse::<f64>() {
        return t.is_finite().then_some(t);
    }
    parse_rfc3339(s)
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        frac = format!("0.{}", &r[..n]).parse().ok()?;
        rest = &r[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 => {
            let sign = match &rest[..1] {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            sign * (rest[1..3].parse::<i64>().ok()? * 3600 + rest[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    let month = time::Month::try_from(u8::try_from(mo).ok()?).ok()?;
    let date = time::Date::from_calendar_date(i32::try_from(y).ok()?, month, u8::try_from(d).ok()?)
        .ok()?;
    let t = time::Time::from_hms(
        u8::try_from(h).ok()?,
        u8::try_from(mi).ok()?,
        u8::try_from(sec).ok()?,
    )
    .ok()?;
    let unix = time::PrimitiveDateTime::new(date, t)
        .assume_utc()
        .unix_timestamp()
        - offset;
    Some(unix as f64 + frac)
}

/// A step or duration parameter: seconds (fractions allowed) or a PromQL duration (`15s`).
fn parse_step(s: &str) -> Option<f64> {
    if let Ok(t) = s.parse::<f64>() {
        return t.is_finite().then_some(t);
    }
    promql_parser::util::parse_duration(s)
        .ok()
        .map(|d| d.as_secs_f64())
}

/// A sample value as Prometheus writes it: a string, `NaN`, `+Inf`, `-Inf`.
pub(crate) fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn metric(labels: &[(String, String)]) -> Json_ {
    Json_::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), Json_::String(v.clone())))
            .collect(),
    )
}

/// Millisecond-rounded seconds as a JSON number (Prometheus' timestamps).
fn ts(t: f64) -> Json_ {
    json!((t * 1000.0).round() / 1000.0)
}

/// `GET|POST /api/v1/query?query=&time=`: an instant query at `time` (default `now`).
pub(crate) fn instant_query(src: &dyn promql::Source, p: &Params, now: f64) -> Response {
    let Some(q) = p.get("query") else {
        return bad("missing query parameter \"query\"");
    };
    let t = match p.get("time") {
        None => now,
        Some(s) => match parse_time(s) {
            Some(t) => t,
            None => {
                return bad(&format!(
                    "invalid parameter \"time\": cannot parse {s:?} to a valid timestamp"
                ))
            }
        },
    };
    match promql::query(src, q, Range::instant(t)) {
        Err(e) => query_error(e),
        Ok((v, _)) => success(match v {
            Value::Scalar(s) => json!({"resultType": "scalar", "result": [ts(t), fmt_value(s[0])]}),
            Value::String(s) => json!({"resultType": "string", "result": [ts(t), s]}),
            Value::Vector(v) => {
                let result: Vec<Json_> = v
                    .iter()
                    .filter_map(|s| Some(json!({"metric": metric(&s.labels), "value": [ts(t), fmt_value(s.values[0]?)]})))
                    .collect();
                json!({"resultType": "vector", "result": result})
            }
            Value::Matrix(m) => {
                let result: Vec<Json_> = m
                    .iter()
                    .map(|(l, pts)| {
                        let values: Vec<Json_> = pts
                            .iter()
                            .map(|(t, v)| json!([ts(*t), fmt_value(*v)]))
                            .collect();
                        json!({"metric": metric(l), "values": values})
                    })
                    .collect();
                json!({"resultType": "matrix", "result": result})
            }
        }),
    }
}

/// `GET|POST /api/v1/query_range?query=&start=&end=&step=`: a matrix, at most
/// [`promql::MAX_POINTS`] points per series.
pub(crate) fn range_query(src: &dyn promql::Source, p: &Params) -> Response {
    let Some(q) = p.get("query") else {
        return bad("missing query parameter \"query\"");
    };
    let mut bounds = [0.0; 2];
    for (i, key) in ["start", "end"].iter().enumerate() {
        match p.get(key).map(|s| (s, parse_time(s))) {
            Some((_, Some(t))) => bounds[i] = t,
            Some((s, None)) => {
                return bad(&format!(
                    "invalid parameter \"{key}\": cannot parse {s:?} to a valid timestamp"
                ))
            }
            None => return bad(&format!("invalid parameter \"{key}\": missing")),
        }
    }
    let step = match p.get("step").map(|s| (s, parse_step(s))) {
        Some((_, Some(s))) => s,
        Some((s, None)) => {
            return bad(&format!(
                "invalid parameter \"step\": cannot parse {s:?} to a valid duration"
            ))
        }
        None => return bad("invalid parameter \"step\": missing"),
    };
    let range = match Range::new(bounds[0], bounds[1], step) {
        Ok(r) => r,
        Err(e) => return query_error(e),
    };
    match promql::query(src, q, range) {
        Err(e) => query_error(e),
        Ok((v, times)) => {
            let result: Vec<Json_> = match v {
                Value::Scalar(s) => vec![json!({
                    "metric": {},
                    "values": times.iter().zip(&s).map(|(t, v)| json!([ts(*t), fmt_value(*v)])).collect::<Vec<_>>(),
                })],
                Value::Vector(v) => v
                    .iter()
                    .map(|s| {
                        let values: Vec<Json_> = times
                            .iter()
                            .zip(&s.values)
                            .filter_map(|(t, v)| Some(json!([ts(*t), fmt_value((*v)?)])))
                            .collect();
                        json!({"metric": metric(&s.labels), "values": values})
                    })
                    .collect(),
                Value::String(_) | Value::Matrix(_) => {
                    return bad(
                        "invalid expression type for range query, must be Scalar or instant Vector",
                    )
                }
            };
            success(json!({"resultType": "matrix", "result": result}))
        }
    }
}

/// The label sets selected by the `match[]` parameters (each a series selector), or all.
fn matched(
    all: Vec<Vec<(String, String)>>,
    p: &Params,
    required: bool,
) -> Result<Vec<Vec<(String, String)>>, String> {
    let selectors = p.all("match[]");
    if selectors.is_empty() {
        return if required {
            Err("no match[] parameter provided".into())
        } else {
            Ok(all)
        };
    }
    let mut sets = Vec::new();
    for s in selectors {
        match promql_parser::parser::parse(s) {
            Ok(promql_parser::parser::Expr::VectorSelector(vs)) => {
                let mut m = vs.matchers.matchers.clone();
                if let Some(n) = &vs.name {
                    m.push(promql_parser::label::Matcher::new(
                        promql_parser::label::MatchOp::Equal,
                        "__name__",
                        n,
                    ));
                }
                sets.push(m);
            }
            Ok(_) => return Err(format!("match[] {s:?} is not a series selector")),
            Err(e) => return Err(e),
        }
    }
    Ok(all
        .into_iter()
        .filter(|l| {
            sets.iter().any(|m| {
                m.iter().all(|m| {
                    let v = l
                        .iter()
                        .find(|(k, _)| *k == m.name)
                        .map_or("", |(_, v)| v.as_str());
                    m.is_match(v)
                })
            })
        })
        .collect())
}

fn since(p: &Params, now: f64) -> f64 {
    p.get("start")
        .and_then(parse_time)
        .unwrap_or(now - 86_400.0 * 365.0)
}

/// `/api/v1/series?match[]=...`: the matching series' label sets.
pub(crate) fn series(
    all: impl Fn(f64) -> Vec<Vec<(String, String)>>,
    p: &Params,
    now: f64,
) -> Response {
    match matched(all(since(p, now)), p, true) {
        Err(e) => bad(&e),
        Ok(mut sets) => {
            sets.sort();
            success(Json_::Array(sets.iter().map(|l| metric(l)).collect()))
        }
    }
}

/// `/api/v1/labels`: label names, sorted.
pub(crate) fn labels(
    all: impl Fn(f64) -> Vec<Vec<(String, String)>>,
    p: &Params,
    now: f64,
) -> Response {
    match matched(all(since(p, now)), p, false) {
        Err(e) => bad(&e),
        Ok(sets) => {
            let names: std::collections::BTreeSet<&str> =
                sets.iter().flatten().map(|(k, _)| k.as_str()).collect();
            success(json!(names))
        }
    }
}

/// `/api/v1/label/<name>/values`: the values of label `name`, sorted.
pub(crate) fn label_values(
    all: impl Fn(f64) -> Vec<Vec<(String, String)>>,
    name: &str,
    p: &Params,
    now: f64,
) -> Response {
    match matched(all(since(p, now)), p, false) {
        Err(e) => bad(&e),
        Ok(sets) => {
            let values: std::collections::BTreeSet<&str> = sets
                .iter()
                .flatten()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect();
            success(json!(values))
        }
    }
}

/// `/api/v1/status/buildinfo`.
pub(crate) fn buildinfo() -> Response {
    success(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "revision": "",
        "branch": "",
        "buildUser": "",
        "buildDate": "",
        "goVersion": "",
        "application": "rampart",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_steps_parse_like_prometheus() {
        assert_eq!(parse_time("1700000000.5"), Some(1_700_000_000.5));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Some(1_700_000_000.0));
        assert_eq!(
            parse_time("2023-11-14T23:13:20.25+01:00"),
            Some(1_700_000_000.25)
        );
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_step("15s"), Some(15.0));
        assert_eq!(parse_step("1m"), Some(60.0));
        assert_eq!(parse_step("0.5"), Some(0.5));
        assert_eq!(fmt_value(1.5), "1.5");
        assert_eq!(fmt_value(f64::INFINITY), "+Inf");
        assert_eq!(fmt_value(2.0), "2");
    }
}
