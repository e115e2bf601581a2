//! A PromQL subset evaluated over the store, parsed by the `promql-parser` crate.
//!
//! Evaluation follows the Prometheus documentation ("Querying basics", "Operators",
//! "Functions"): an expression is evaluated at every step of a [`Range`] at once (an
//! instant query is a range of one step). Each node yields a scalar per step or a set of
//! series with an optional value per step; a range-vector function (`rate(x[1m])`) reads
//! each series' samples once and slides its window over the steps, so a 24 h range at
//! one-second steps costs one pass over the samples plus a binary search per step.
//!
//! Supported: vector and matrix selectors with `=`, `!=`, `=~`, `!~`; number literals,
//! unary minus, parentheses; `+ - * / % ^`, `== != > < >= <=` (with `bool`), `and`, `or`,
//! `unless`, between scalars, a vector and a scalar, or two vectors matched one-to-one
//! (`on(...)`, `ignoring(...)`); `sum`, `avg`, `min`, `max`, `count` with `by`/`without`;
//! the functions listed in [`FUNCTIONS`]. Anything else (`offset`, `@`, subqueries,
//! `group_left`/`group_right`, `topk`, other functions) is refused with
//! [`QueryError::Unsupported`] naming the construct.
//!
//! An instant vector selector takes, at each step, the newest sample at most
//! [`LOOKBACK_SECONDS`] old (Prometheus' default lookback delta), unless that is a
//! staleness marker ([`is_stale_marker`]): a series that left its host's pushes has no
//! value from then on, as in Prometheus ("Staleness" in its querying basics). Range
//! functions skip the markers.

use std::collections::{BTreeMap, HashMap};

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{
    self, AggregateExpr, BinaryExpr, Call, Expr, LabelModifier, MatrixSelector,
    VectorMatchCardinality, VectorSelector,
};

/// Label pairs sorted by name, `__name__` included.
pub type Labels = Vec<(String, String)>;

/// Raw samples of selected series: labels and `(time seconds, value)` pairs.
pub type Selected = Vec<(Labels, Vec<(f64, f64)>)>;

/// A window function: the samples in `(start, end]`, `start`, `end`.
type WindowFn<'f> = &'f dyn Fn(&[(f64, f64)], f64, f64) -> Option<f64>;

/// Seconds an instant vector selector looks back for a sample (Prometheus' default
/// `--query.lookback-delta`).
pub const LOOKBACK_SECONDS: f64 = 300.0;

/// The most steps a range query may have per series (Prometheus refuses more than 11 000
/// points per series, "exceeded maximum resolution").
pub const MAX_POINTS: usize = 11_000;

/// The functions evaluated (others are refused).
pub const FUNCTIONS: &[&str] = &[
    "rate",
    "irate",
    "increase",
    "delta",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "abs",
    "ceil",
    "floor",
    "round",
    "sqrt",
    "exp",
    "ln",
    "log2",
    "log10",
    "clamp",
    "clamp_min",
    "clamp_max",
    "time",
    "vector",
    "scalar",
    "histogram_quantile",
    "absent",
];

/// Why a query failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The text does not parse, or a parameter is invalid (Prometheus `bad_data`, 400).
    #[error("{0}")]
    BadData(String),
    /// A valid PromQL construct this subset does not evaluate (answered as `bad_data`, 400).
    #[error("unsupported in Rampart's PromQL subset: {0}")]
    Unsupported(String),
    /// Evaluation failed on the data (Prometheus `execution`, 422), e.g. a one-to-one
    /// match that found several series on one side.
    #[error("{0}")]
    Execution(String),
}

/// The bit pattern of the NaN a [`Source`] gives as a staleness marker (Prometheus'
/// `StaleNaN`, `0x7ff0000000000002`).
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// Whether `v` is a staleness marker ([`STALE_NAN_BITS`]).
pub fn is_stale_marker(v: f64) -> bool {
    v.to_bits() == STALE_NAN_BITS
}

/// Where the series come from.
pub trait Source {
    /// Every series whose labels satisfy all `matchers`, with its samples in
    /// `[start, end]` (seconds), oldest first. A series whose source stopped reporting it
    /// may end with a staleness marker ([`STALE_NAN_BITS`]) at the time it was first
    /// missing.
    fn select(&self, matchers: &[&Matcher], start: f64, end: f64)
        -> Vec<(Labels, Vec<(f64, f64)>)>;
}

/// Evaluation times: `start`, `start + step`, ... up to `end` (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    /// First step, Unix seconds.
    pub start: f64,
    /// Last step at most this, Unix seconds.
    pub end: f64,
    /// Seconds between steps (> 0).
    pub step: f64,
}

impl Range {
    /// One step at `t`: an instant query.
    pub fn instant(t: f64) -> Range {
        Range {
            start: t,
            end: t,
            step: 1.0,
        }
    }

    /// A range query's steps.
    ///
    /// Errors: `end` before `start`, a step not positive, or more than [`MAX_POINTS`] steps.
    pub fn new(start: f64, end: f64, step: f64) -> Result<Range, QueryError> {
        if !(start.is_finite() && end.is_finite()) || end < start {
            return Err(QueryError::BadData(
                "end timestamp must not be before start time".into(),
            ));
        }
        if !(step.is_finite() && step > 0.0) {
            return Err(QueryError::BadData(
                "zero or negative query resolution step widths are not accepted. Try a positive integer".into(),
            ));
        }
        if (end - start) / step >= MAX_POINTS as f64 {
            return Err(QueryError::BadData(format!(
                "exceeded maximum resolution of {MAX_POINTS} points per timeseries. Try decreasing the query resolution (?step=XX)"
            )));
        }
        Ok(Range { start, end, step })
    }

    fn times(&self) -> Vec<f64> {
        let n = ((self.end - self.start) / self.step + 1e-9).floor() as usize + 1;
        (0..n).map(|i| self.start + i as f64 * self.step).collect()
    }
}

/// One output series: labels and a value per step (`None`: no value at that step).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Labels sorted by name.
    pub labels: Labels,
    /// One entry per step of the [`Range`].
    pub values: Vec<Option<f64>>,
}

/// What a query evaluated to.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// One number per step.
    Scalar(Vec<f64>),
    /// Series with values per step.
    Vector(Vec<Series>),
    /// A string literal.
    String(String),
    /// Raw samples of a range selector (only as an instant query's result).
    Matrix(Selected),
}

/// Parses and evaluates `text` over `range`.
///
/// Errors: see [`QueryError`].
pub fn query(src: &dyn Source, text: &str, range: Range) -> Result<(Value, Vec<f64>), QueryError> {
    let expr = parser::parse(text).map_err(QueryError::BadData)?;
    let times = range.times();
    let ev = Eval { src, times: &times };
    let v = match &expr {
        Expr::MatrixSelector(m) if times.len() == 1 => {
            let sel = selector(&m.vs)?;
            let t = times[0];
            let range_s = m.range.as_secs_f64();
            let mut out: Vec<_> = src
                .select(&sel, t - range_s, t)
                .into_iter()
                .map(|(l, pts)| {
                    let pts: Vec<_> = pts
                        .into_iter()
                        .filter(|p| p.0 > t - range_s && !is_stale_marker(p.1))
                        .collect();
                    (l, pts)
                })
                .filter(|(_, p)| !p.is_empty())
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Matrix(out)
        }
        e => ev.eval(e)?,
    };
    Ok((v, times))
}

struct Eval<'a> {
    src: &'a dyn Source,
    times: &'a [f64],
}

fn selector(vs: &VectorSelector) -> Result<Vec<&Matcher>, QueryError> {
    if vs.offset.is_some() {
        return Err(QueryError::Unsupported("offset modifier".into()));
    }
    if vs.at.is_some() {
        return Err(QueryError::Unsupported("@ modifier".into()));
    }
    if !vs.matchers.or_matchers.is_empty() {
        return Err(QueryError::Unsupported("`or` inside a selector".into()));
    }
    Ok(vs.matchers.matchers.iter().collect())
}

/// Matchers plus the metric name as a `__name__` matcher.
fn with_name<'m>(
    vs: &VectorSelector,
    name_m: &'m Option<Matcher>,
    mut m: Vec<&'m Matcher>,
) -> Vec<&'m Matcher> {
    let _ = vs;
    if let Some(n) = name_m {
        m.push(n);
    }
    m
}

fn name_matcher(vs: &VectorSelector) -> Option<Matcher> {
    vs.name
        .as_ref()
        .filter(|_| !vs.matchers.matchers.iter().any(|m| m.name == "__name__"))
        .map(|n| Matcher::new(MatchOp::Equal, "__name__", n))
}

fn drop_name(l: &Labels) -> Labels {
    l.iter().filter(|(k, _)| k != "__name__").cloned().collect()
}

impl Eval<'_> {
    fn n(&self) -> usize {
        self.times.len()
    }

    fn eval(&self, e: &Expr) -> Result<Value, QueryError> {
        match e {
            Expr::NumberLiteral(n) => Ok(Value::Scalar(vec![n.val; self.n()])),
            Expr::StringLiteral(s) => Ok(Value::String(s.val.clone())),
            Expr::Paren(p) => self.eval(&p.expr),
            Expr::Unary(u) => match self.eval(&u.expr)? {
                Value::Scalar(v) => Ok(Value::Scalar(v.into_iter().map(|x| -x).collect())),
                Value::Vector(v) => Ok(Value::Vector(
                    v.into_iter()
                        .map(|s| Series {
                            labels: drop_name(&s.labels),
                            values: s.values.into_iter().map(|x| x.map(|x| -x)).collect(),
                        })
                        .collect(),
                )),
                _ => Err(QueryError::BadData(
                    "unary minus needs a number or a vector".into(),
                )),
            },
            Expr::VectorSelector(vs) => self.instant_selector(vs),
            Expr::MatrixSelector(_) => Err(QueryError::BadData(
                "a range vector is only accepted as a function argument or as an instant query"
                    .into(),
            )),
            Expr::Subquery(_) => Err(QueryError::Unsupported("subqueries".into())),
            Expr::Aggregate(a) => self.aggregate(a),
            Expr::Binary(b) => self.binary(b),
            Expr::Call(c) => self.call(c),
            Expr::Extension(_) => Err(QueryError::Unsupported("extension expressions".into())),
        }
    }

    /// The samples of `vs` from `back` seconds before the first step to the last, without
    /// staleness markers (what range functions read).
    fn fetch(&self, vs: &VectorSelector, back: f64) -> Result<Selected, QueryError> {
        let mut data = self.fetch_with_markers(vs, back)?;
        for (_, pts) in &mut data {
            pts.retain(|p| !is_stale_marker(p.1));
        }
        data.retain(|(_, pts)| !pts.is_empty());
        Ok(data)
    }

    fn fetch_with_markers(&self, vs: &VectorSelector, back: f64) -> Result<Selected, QueryError> {
        let nm = name_matcher(vs);
        let m = with_name(vs, &nm, selector(vs)?);
        let first = self.times[0];
        let last = *self.times.last().unwrap_or(&first);
        Ok(self.src.select(&m, first - back, last))
    }

    fn instant_selector(&self, vs: &VectorSelector) -> Result<Value, QueryError> {
        let data = self.fetch_with_markers(vs, LOOKBACK_SECONDS)?;
        let mut out = Vec::with_capacity(data.len());
        for (labels, pts) in data {
            let values: Vec<Option<f64>> = self
                .times
                .iter()
                .map(|&t| {
                    let i = pts.partition_point(|p| p.0 <= t);
                    let (pt, pv) = *pts.get(i.checked_sub(1)?)?;
                    (t - pt <= LOOKBACK_SECONDS && !is_stale_marker(pv)).then_some(pv)
                })
                .collect();
            if values.iter().any(Option::is_some) {
                out.push(Series { labels, values });
            }
        }
        Ok(Value::Vector(out))
    }

    fn matrix_arg<'e>(&self, e: &'e Expr, func: &str) -> Result<&'e MatrixSelector, QueryError> {
        match e {
            Expr::MatrixSelector(m) => Ok(m),
            Expr::Paren(p) => self.matrix_arg(&p.expr, func),
            Expr::Subquery(_) => Err(QueryError::Unsupported(format!(
                "a subquery as {func}()'s argument"
            ))),
            _ => Err(QueryError::BadData(format!(
                "{func}() expects a range vector"
            ))),
        }
    }

    /// Applies `f` to each series' samples in each step's window `(t - range, t]`.
    fn over_window(
        &self,
        m: &MatrixSelector,
        keep_name: bool,
        f: WindowFn<'_>,
    ) -> Result<Value, QueryError> {
        let range = m.range.as_secs_f64();
        let data = self.fetch(&m.vs, range)?;
        let mut out = Vec::new();
        for (labels, pts) in data {
            let values: Vec<Option<f64>> = self
                .times
                .iter()
                .map(|&t| {
                    let lo = pts.partition_point(|p| p.0 <= t - range);
                    let hi = pts.partition_point(|p| p.0 <= t);
                    f(&pts[lo..hi.max(lo)], t - range, t)
                })
                .collect();
            if values.iter().any(Option::is_some) {
                let labels = if keep_name {
                    labels
                } else {
                    drop_name(&labels)
                };
                out.push(Series { labels, values });
            }
        }
        Ok(Value::Vector(out))
    }

    fn call(&self, c: &Call) -> Result<Value, QueryError> {
        let name = c.func.name;
        let args = &c.args.args;
        let arg = |i: usize| -> Result<&Expr, QueryError> {
            args.get(i)
                .map(|b| &**b)
                .ok_or_else(|| QueryError::BadData(format!("{name}() is missing an argument")))
        };
        let scalar_arg = |i: usize| -> Result<Vec<f64>, QueryError> {
            match self.eval(arg(i)?)? {
                Value::Scalar(v) => Ok(v),
                _ => Err(QueryError::BadData(format!(
                    "{name}() expects a number as argument {}",
                    i + 1
                ))),
            }
        };
        match name {
            "rate" | "increase" | "delta" => {
                let m = self.matrix_arg(arg(0)?, name)?;
                let range = m.range.as_secs_f64();
                let (counter, per_second) = match name {
                    "rate" => (true, true),
                    "increase" => (true, false),
                    _ => (false, false),
                };
                if !counter {
                    return self.over_window(m, false, &|w, start, end| {
                        extrapolated_rate(w, start, end, range, None, per_second)
                    });
                }
                // Counter resets corrected once per series: `adj[i]` is the value plus
                // every value before a reset up to `i`, so a window's increase is
                // `adj[last] - adj[first]` (one subtraction per step, not a scan).
                let data = self.fetch(&m.vs, range)?;
                let mut out = Vec::new();
                for (labels, pts) in data {
                    let mut adj = Vec::with_capacity(pts.len());
                    let mut offset = 0.0;
                    let mut prev = f64::NAN;
                    for &(_, v) in &pts {
                        if v < prev {
                            offset += prev;
                        }
                        adj.push(v + offset);
                        prev = v;
                    }
                    let values: Vec<Option<f64>> = self
                        .times
                        .iter()
                        .map(|&t| {
                            let lo = pts.partition_point(|p| p.0 <= t - range);
                            let hi = pts.partition_point(|p| p.0 <= t);
                            if hi < lo + 2 {
                                return None;
                            }
                            let increase = adj[hi - 1] - adj[lo];
                            extrapolated_rate(
                                &pts[lo..hi],
                                t - range,
                                t,
                                range,
                                Some(increase),
                                per_second,
                            )
                        })
                        .collect();
                    if values.iter().any(Option::is_some) {
                        out.push(Series {
                            labels: drop_name(&labels),
                            values,
                        });
                    }
                }
                Ok(Value::Vector(out))
            }
            "irate" => {
                let m = self.matrix_arg(arg(0)?, name)?;
                self.over_window(m, false, &|w, _, _| {
                    let [.., (t0, v0), (t1, v1)] = w else {
                        return None;
                    };
                    let d = if v1 < v0 { *v1 } else { v1 - v0 };
                    (t1 > t0).then(|| d / (t1 - t0))
                })
            }
            "avg_over_time" | "min_over_time" | "max_over_time" | "sum_over_time"
            | "count_over_time" | "last_over_time" => {
                let m = self.matrix_arg(arg(0)?, name)?;
                let keep = name == "last_over_time";
                self.over_window(m, keep, &|w, _, _| {
                    if w.is_empty() {
                        return None;
                    }
                    let vals = w.iter().map(|p| p.1);
                    Some(match name {
                        "avg_over_time" => vals.sum::<f64>() / w.len() as f64,
                        "min_over_time" => vals.fold(f64::INFINITY, f64::min),
                        "max_over_time" => vals.fold(f64::NEG_INFINITY, f64::max),
                        "sum_over_time" => vals.sum(),
                        "count_over_time" => w.len() as f64,
                        _ => w[w.len() - 1].1,
                    })
                })
            }
            "abs" | "ceil" | "floor" | "round" | "sqrt" | "exp" | "ln" | "log2" | "log10" => {
                if name == "round" && args.len() > 1 {
                    return Err(QueryError::Unsupported(
                        "round() with a to_nearest argument".into(),
                    ));
                }
                let f: fn(f64) -> f64 = match name {
                    "abs" => f64::abs,
                    "ceil" => f64::ceil,
                    "floor" => f64::floor,
                    // Prometheus rounds half up: floor(x + 0.5)
                    "round" => |x: f64| (x + 0.5).floor(),
                    "sqrt" => f64::sqrt,
                    "exp" => f64::exp,
                    "ln" => f64::ln,
                    "log2" => f64::log2,
                    _ => f64::log10,
                };
                self.map_vector(self.eval(arg(0)?)?, name, |x, _| Some(f(x)))
            }
            "clamp" | "clamp_min" | "clamp_max" => {
                let v = self.eval(arg(0)?)?;
                let a = scalar_arg(1)?;
                let b = if name == "clamp" {
                    scalar_arg(2)?
                } else {
                    a.clone()
                };
                self.map_vector(v, name, |x, i| match name {
                    "clamp_min" => Some(x.max(a[i])),
                    "clamp_max" => Some(x.min(a[i])),
                    _ => (a[i] <= b[i]).then(|| x.max(a[i]).min(b[i])),
                })
            }
            "time" => Ok(Value::Scalar(self.times.to_vec())),
            "vector" => Ok(Value::Vector(vec![Series {
                labels: Vec::new(),
                values: scalar_arg(0)?.into_iter().map(Some).collect(),
            }])),
            "scalar" => match self.eval(arg(0)?)? {
                Value::Vector(v) => Ok(Value::Scalar(
                    (0..self.n())
                        .map(|i| {
                            let mut it = v.iter().filter_map(|s| s.values[i]);
                            match (it.next(), it.next()) {
                                (Some(x), None) => x,
                                _ => f64::NAN,
                            }
                        })
                        .collect(),
                )),
                _ => Err(QueryError::BadData(
                    "scalar() expects an instant vector".into(),
                )),
            },
            "absent" => {
                let v = self.eval(arg(0)?)?;
                let Value::Vector(v) = v else {
                    return Err(QueryError::BadData(
                        "absent() expects an instant vector".into(),
                    ));
                };
                // labels from the selector's equality matchers, as Prometheus does
                let labels: Labels = match arg(0)? {
                    Expr::VectorSelector(vs) => {
                        let mut l: Labels = vs
                            .matchers
                            .matchers
                            .iter()
                            .filter(|m| matches!(m.op, MatchOp::Equal) && m.name != "__name__")
                            .map(|m| (m.name.clone(), m.value.clone()))
                            .collect();
                        l.sort();
                        l
                    }
                    _ => Vec::new(),
                };
                let values = (0..self.n())
                    .map(|i| (!v.iter().any(|s| s.values[i].is_some())).then_some(1.0))
                    .collect();
                Ok(Value::Vector(vec![Series { labels, values }]))
            }
            "histogram_quantile" => {
                let q = scalar_arg(0)?;
                let Value::Vector(v) = self.eval(arg(1)?)? else {
                    return Err(QueryError::BadData(
                        "histogram_quantile() expects an instant vector".into(),
                    ));
                };
                let mut groups: BTreeMap<Labels, Vec<(f64, &Series)>> = BTreeMap::new();
                for s in &v {
                    let Some(le) = s.labels.iter().find(|(k, _)| k == "le") else {
                        continue;
                    };
                    let Ok(upper) = parse_le(&le.1) else {
                        continue;
                    };
                    let key: Labels = s
                        .labels
                        .iter()
                        .filter(|(k, _)| k != "le" && k != "__name__")
                        .cloned()
                        .collect();
                    groups.entry(key).or_default().push((upper, s));
                }
                let out = groups
                    .into_iter()
                    .map(|(labels, mut buckets)| {
                        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                        let values = (0..self.n())
                            .map(|i| {
                                let b: Vec<(f64, f64)> = buckets
                                    .iter()
                                    .filter_map(|(u, s)| Some((*u, s.values[i]?)))
                                    .collect();
                                bucket_quantile(q[i], &b)
                            })
                            .collect();
                        Series { labels, values }
                    })
                    .collect();
                Ok(Value::Vector(out))
            }
            other => Err(QueryError::Unsupported(format!("function {other}()"))),
        }
    }

    fn map_vector(
        &self,
        v: Value,
        name: &str,
        f: impl Fn(f64, usize) -> Option<f64>,
    ) -> Result<Value, QueryError> {
        match v {
            Value::Vector(v) => Ok(Value::Vector(
                v.into_iter()
                    .map(|s| Series {
                        labels: drop_name(&s.labels),
                        values: s
                            .values
                            .into_iter()
                            .enumerate()
                            .map(|(i, x)| f(x?, i))
                            .collect(),
                    })
                    .collect(),
            )),
            _ => Err(QueryError::BadData(format!(
                "{name}() expects an instant vector"
            ))),
        }
    }

    fn aggregate(&self, a: &AggregateExpr) -> Result<Value, QueryError> {
        let op = a.op.to_string();
        if !matches!(op.as_str(), "sum" | "avg" | "min" | "max" | "count") {
            return Err(QueryError::Unsupported(format!("aggregation {op}")));
        }
        let Value::Vector(v) = self.eval(&a.expr)? else {
            return Err(QueryError::BadData(format!(
                "{op} expects an instant vector"
            )));
        };
        let key = |l: &Labels| -> Labels {
            match &a.modifier {
                None => Vec::new(),
                Some(LabelModifier::Include(by)) => l
                    .iter()
                    .filter(|(k, _)| by.labels.iter().any(|b| b == k))
                    .cloned()
                    .collect(),
                Some(LabelModifier::Exclude(without)) => l
                    .iter()
                    .filter(|(k, _)| k != "__name__" && !without.labels.iter().any(|b| b == k))
                    .cloned()
                    .collect(),
            }
        };
        let mut groups: BTreeMap<Labels, Vec<&Series>> = BTreeMap::new();
        for s in &v {
            groups.entry(key(&s.labels)).or_default().push(s);
        }
        let out = groups
            .into_iter()
            .map(|(labels, members)| {
                let values = (0..self.n())
                    .map(|i| {
                        let xs: Vec<f64> = members.iter().filter_map(|s| s.values[i]).collect();
                        if xs.is_empty() {
                            return None;
                        }
                        Some(match op.as_str() {
                            "sum" => xs.iter().sum(),
                            "avg" => xs.iter().sum::<f64>() / xs.len() as f64,
                            "min" => xs.iter().copied().fold(f64::INFINITY, f64::min),
                            "max" => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                            _ => xs.len() as f64,
                        })
                    })
                    .collect();
                Series { labels, values }
            })
            .filter(|s| s.values.iter().any(Option::is_some))
            .collect();
        Ok(Value::Vector(out))
    }

    fn binary(&self, b: &BinaryExpr) -> Result<Value, QueryError> {
        let op = b.op.to_string();
        let modifier = b.modifier.as_ref();
        let return_bool = modifier.is_some_and(|m| m.return_bool);
        let comparison = matches!(op.as_str(), "==" | "!=" | ">" | "<" | ">=" | "<=");
        let set_op = matches!(op.as_str(), "and" | "or" | "unless");
        if !comparison && !set_op && !matches!(op.as_str(), "+" | "-" | "*" | "/" | "%" | "^") {
            return Err(QueryError::Unsupported(format!("binary operator {op}")));
        }
        if let Some(m) = modifier {
            if matches!(
                m.card,
                VectorMatchCardinality::ManyToOne(_) | VectorMatchCardinality::OneToMany(_)
            ) {
                return Err(QueryError::Unsupported("group_left/group_right".into()));
            }
        }
        let arith = |x: f64, y: f64| -> f64 {
            match op.as_str() {
                "+" => x + y,
                "-" => x - y,
                "*" => x * y,
                "/" => x / y,
                "%" => x % y,
                _ => x.powf(y),
            }
        };
        let compare = |x: f64, y: f64| -> bool {
            match op.as_str() {
                "==" => x == y,
                "!=" => x != y,
                ">" => x > y,
                "<" => x < y,
                ">=" => x >= y,
                _ => x <= y,
            }
        };
        // x op y for one step: the result value, or None when filtered out.
        let apply = |x: f64, y: f64, keep: f64| -> Option<f64> {
            if comparison {
                let hit = compare(x, y);
                if return_bool {
                    Some(if hit { 1.0 } else { 0.0 })
                } else {
                    hit.then_some(keep)
                }
            } else {
                Some(arith(x, y))
            }
        };
        let lhs = self.eval(&b.lhs)?;
        let rhs = self.eval(&b.rhs)?;
        let keep_name = comparison && !return_bool;
        match (lhs, rhs) {
            (Value::Scalar(x), Value::Scalar(y)) => {
                if comparison && !return_bool {
                    return Err(QueryError::BadData(
                        "comparisons between scalars must use BOOL modifier".into(),
                    ));
                }
                if set_op {
                    return Err(QueryError::BadData(format!(
                        "set operator {op} not allowed between scalars"
                    )));
                }
                Ok(Value::Scalar(
                    x.iter()
                        .zip(&y)
                        .map(|(a, b)| apply(*a, *b, *a).unwrap_or(f64::NAN))
                        .collect(),
                ))
            }
            (Value::Vector(v), Value::Scalar(y)) | (Value::Scalar(y), Value::Vector(v))
                if set_op =>
            {
                let _ = (v, y);
                Err(QueryError::BadData(format!(
                    "set operator {op} needs vectors on both sides"
                )))
            }
            (Value::Vector(v), Value::Scalar(y)) => {
                Ok(Value::Vector(
                    self.vs(v, keep_name, |x, i| apply(x, y[i], x)),
                ))
            }
            (Value::Scalar(y), Value::Vector(v)) => {
                Ok(Value::Vector(
                    self.vs(v, keep_name, |x, i| apply(y[i], x, x)),
                ))
            }
            (Value::Vector(l), Value::Vector(r)) => {
                let on = modifier.and_then(|m| m.matching.as_ref());
                let sig = |labels: &Labels| -> Labels {
                    match on {
                        Some(LabelModifier::Include(on)) => labels
                            .iter()
                            .filter(|(k, _)| on.labels.iter().any(|o| o == k))
                            .cloned()
                            .collect(),
                        Some(LabelModifier::Exclude(ign)) => labels
                            .iter()
                            .filter(|(k, _)| k != "__name__" && !ign.labels.iter().any(|o| o == k))
                            .cloned()
                            .collect(),
                        None => drop_name(labels),
                    }
                };
                let mut right: HashMap<Labels, Vec<&Series>> = HashMap::new();
                for s in &r {
                    right.entry(sig(&s.labels)).or_default().push(s);
                }
                let n = self.n();
                let pick = |cands: Option<&Vec<&Series>>,
                            i: usize|
                 -> Result<Option<f64>, QueryError> {
                    let mut found = None;
                    for s in cands.into_iter().flatten() {
                        if let Some(x) = s.values[i] {
                            if found.is_some() {
                                return Err(QueryError::Execution(
                                    "found duplicate series for the match group on the right hand-side of the operation; many-to-many matching not allowed: matching labels must be unique on one side".into(),
                                ));
                            }
                            found = Some(x);
                        }
                    }
                    Ok(found)
                };
                let mut out: Vec<Series> = Vec::new();
                match op.as_str() {
                    "and" | "unless" => {
                        for s in &l {
                            let c = right.get(&sig(&s.labels));
                            let values = (0..n)
                                .map(|i| {
                                    let other =
                                        c.into_iter().flatten().any(|r| r.values[i].is_some());
                                    s.values[i].filter(|_| other == (op == "and"))
                                })
                                .collect();
                            out.push(Series {
                                labels: s.labels.clone(),
                                values,
                            });
                        }
                    }
                    "or" => {
                        let mut left_sigs: HashMap<Labels, Vec<usize>> = HashMap::new();
                        for (j, s) in l.iter().enumerate() {
                            left_sigs.entry(sig(&s.labels)).or_default().push(j);
                        }
                        out.extend(l.iter().cloned());
                        for s in &r {
                            let ls = left_sigs.get(&sig(&s.labels));
                            let values = (0..n)
                                .map(|i| {
                                    let covered =
                                        ls.into_iter().flatten().any(|&j| l[j].values[i].is_some());
                                    s.values[i].filter(|_| !covered)
                                })
                                .collect();
                            out.push(Series {
                                labels: s.labels.clone(),
                                values,
                            });
                        }
                    }
                    _ => {
                        let mut seen: HashMap<Labels, usize> = HashMap::new();
                        for s in &l {
                            let key = sig(&s.labels);
                            let c = right.get(&key);
                            let mut values = Vec::with_capacity(n);
                            for i in 0..n {
                                let v = match (s.values[i], pick(c, i)?) {
                                    (Some(x), Some(y)) => apply(x, y, x),
                                    _ => None,
                                };
                                values.push(v);
                            }
                            let labels = match on {
                                Some(LabelModifier::Include(_)) if !keep_name => key.clone(),
                                Some(LabelModifier::Exclude(_)) if !keep_name => key.clone(),
                                _ if keep_name => s.labels.clone(),
                                _ => drop_name(&s.labels),
                            };
                            if let Some(&j) = seen.get(&labels) {
                                // two left series with one signature meeting one right series
                                let clash = (0..n)
                                    .any(|i| values[i].is_some() && out[j].values[i].is_some());
                                if clash {
                                    return Err(QueryError::Execution(
                                        "found duplicate series for the match group on the left hand-side of the operation; many-to-many matching not allowed".into(),
                                    ));
                                }
                                for (i, v) in values.into_iter().enumerate() {
                                    if v.is_some() {
                                        out[j].values[i] = v;
                                    }
                                }
                                continue;
                            }
                            seen.insert(labels.clone(), out.len());
                            out.push(Series { labels, values });
                        }
                    }
                }
                out.retain(|s| s.values.iter().any(Option::is_some));
                Ok(Value::Vector(out))
            }
            _ => Err(QueryError::BadData(format!(
                "operator {op} is not defined for strings or range vectors"
            ))),
        }
    }

    fn vs(
        &self,
        v: Vec<Series>,
        keep_name: bool,
        f: impl Fn(f64, usize) -> Option<f64>,
    ) -> Vec<Series> {
        v.into_iter()
            .map(|s| Series {
                labels: if keep_name {
                    s.labels
                } else {
                    drop_name(&s.labels)
                },
                values: s
                    .values
                    .into_iter()
                    .enumerate()
                    .map(|(i, x)| f(x?, i))
                    .collect(),
            })
            .filter(|s| s.values.iter().any(Option::is_some))
            .collect()
    }
}

fn parse_le(s: &str) -> Result<f64, ()> {
    match s {
        "+Inf" | "Inf" | "inf" => Ok(f64::INFINITY),
        _ => s.parse().map_err(|_| ()),
    }
}

/// Prometheus' `extrapolatedRate` (promql/functions.go): the increase between the first
/// and last sample in the window — for a counter, `counter_increase`, already corrected
/// for resets by the caller — extrapolated
/// towards the window's edges by at most half a sample interval (and not below zero for
/// a counter), per second when `per_second`. `None` with fewer than two samples.
fn extrapolated_rate(
    w: &[(f64, f64)],
    start: f64,
    end: f64,
    range: f64,
    counter_increase: Option<f64>,
    per_second: bool,
) -> Option<f64> {
    if w.len() < 2 {
        return None;
    }
    let (first_t, first_v) = w[0];
    let (last_t, last_v) = w[w.len() - 1];
    let counter = counter_increase.is_some();
    let result = counter_increase.unwrap_or(last_v - first_v);
    let sampled = last_t - first_t;
    if sampled <= 0.0 {
        return None;
    }
    let avg = sampled / (w.len() - 1) as f64;
    let mut to_start = first_t - start;
    let mut to_end = end - last_t;
    if counter && result > 0.0 && first_v >= 0.0 {
        let to_zero = sampled * (first_v / result);
        if to_zero < to_start {
            to_start = to_zero;
        }
    }
    let threshold = avg * 1.1;
    if to_start >= threshold {
        to_start = avg / 2.0;
    }
    if to_end >= threshold {
        to_end = avg / 2.0;
    }
    let mut factor = (sampled + to_start + to_end) / sampled;
    if per_second {
        factor /= range;
    }
    Some(result * factor)
}

/// Prometheus' `bucketQuantile` for classic histograms: `buckets` are `(upper bound,
/// cumulative count)` sorted by bound and must end with `+Inf`; linear interpolation
/// inside the bucket holding the rank. NaN when the histogram is unusable.
fn bucket_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    if buckets.is_empty() {
        return None;
    }
    if q.is_nan() {
        return Some(f64::NAN);
    }
    if q < 0.0 {
        return Some(f64::NEG_INFINITY);
    }
    if q > 1.0 {
        return Some(f64::INFINITY);
    }
    if buckets.last().is_none_or(|b| b.0 != f64::INFINITY) || buckets.len() < 2 {
        return Some(f64::NAN);
    }
    // make the counts monotonic (scrapes of different buckets may race)
    let mut b: Vec<(f64, f64)> = buckets.to_vec();
    for i in 1..b.len() {
        if b[i].1 < b[i - 1].1 {
            b[i].1 = b[i - 1].1;
        }
    }
    let total = b[b.len() - 1].1;
    if total == 0.0 {
        return Some(f64::NAN);
    }
    let rank = q * total;
    let i = b.iter().position(|x| x.1 >= rank).unwrap_or(b.len() - 1);
    if i == b.len() - 1 {
        return Some(b[b.len() - 2].0);
    }
    if i == 0 && b[0].0 <= 0.0 {
        return Some(b[0].0);
    }
    let (start, count_before) = if i == 0 {
        (0.0, 0.0)
    } else {
        (b[i - 1].0, b[i - 1].1)
    };
    let (end, count) = (b[i].0, b[i].1 - count_before);
    if count == 0.0 {
        return Some(end);
    }
    Some(start + (end - start) * ((rank - count_before) / count))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Series with samples at 1 s intervals.
    struct Mem(Vec<(Labels, Vec<(f64, f64)>)>);

    impl Source for Mem {
        fn select(&self, m: &[&Matcher], start: f64, end: f64) -> Selected {
            self.0
                .iter()
                .filter(|(l, _)| {
                    m.iter().all(|m| {
                        let v = l
                            .iter()
                            .find(|(k, _)| *k == m.name)
                            .map_or("", |(_, v)| v.as_str());
                        m.is_match(v)
                    })
                })
                .map(|(l, p)| {
                    (
                        l.clone(),
                        p.iter()
                            .copied()
                            .filter(|x| x.0 >= start && x.0 <= end)
                            .collect(),
                    )
                })
                .collect()
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        let mut l: Labels = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.sort();
        l
    }

    fn mem() -> Mem {
        let counter = |per_s: f64| {
            (0..=600)
                .map(|t| (f64::from(t), per_s * f64::from(t)))
                .collect::<Vec<_>>()
        };
        let gauge = |v: f64| (0..=600).map(|t| (f64::from(t), v)).collect::<Vec<_>>();
        Mem(vec![
            (
                labels(&[
                    ("__name__", "req_total"),
                    ("instance", "lb-01"),
                    ("code", "2xx"),
                ]),
                counter(10.0),
            ),
            (
                labels(&[
                    ("__name__", "req_total"),
                    ("instance", "lb-01"),
                    ("code", "5xx"),
                ]),
                counter(1.0),
            ),
            (
                labels(&[
                    ("__name__", "req_total"),
                    ("instance", "web-01"),
                    ("code", "2xx"),
                ]),
                counter(4.0),
            ),
            (
                labels(&[("__name__", "up"), ("instance", "lb-01")]),
                gauge(1.0),
            ),
            (
                labels(&[("__name__", "up"), ("instance", "web-01")]),
                gauge(0.0),
            ),
            (
                labels(&[("__name__", "lat_bucket"), ("le", "0.1")]),
                counter(50.0),
            ),
            (
                labels(&[("__name__", "lat_bucket"), ("le", "0.5")]),
                counter(90.0),
            ),
            (
                labels(&[("__name__", "lat_bucket"), ("le", "+Inf")]),
                counter(100.0),
            ),
        ])
    }

    fn instant(q: &str, t: f64) -> Vec<(Labels, f64)> {
        match query(&mem(), q, Range::instant(t)).unwrap().0 {
            Value::Vector(v) => {
                let mut out: Vec<_> = v
                    .into_iter()
                    .filter_map(|s| Some((s.labels, s.values[0]?)))
                    .collect();
                out.sort_by(|a, b| a.0.cmp(&b.0));
                out
            }
            Value::Scalar(s) => vec![(Vec::new(), s[0])],
            other => panic!("{other:?}"),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn rates_aggregations_and_matchers() {
        let r = instant("sum by (instance) (rate(req_total[1m]))", 300.0);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, labels(&[("instance", "lb-01")]));
        assert!(close(r[0].1, 11.0), "{r:?}");
        assert!(close(r[1].1, 4.0), "{r:?}");
        let r = instant("increase(req_total{code=~\"5..\"}[1m])", 300.0);
        assert_eq!(r.len(), 1);
        assert!(close(r[0].1, 60.0), "{r:?}");
        assert_eq!(
            instant("irate(req_total{instance!=\"lb-01\"}[10s])", 300.0)[0].1,
            4.0
        );
        assert_eq!(instant("count(up)", 300.0)[0].1, 2.0);
        assert_eq!(instant("count without (instance) (up)", 300.0)[0].1, 2.0);
        assert_eq!(instant("max(up) + min(up)", 300.0)[0].1, 1.0);
        assert_eq!(instant("avg(up)", 300.0)[0].1, 0.5);
        assert_eq!(instant("up{instance!~\"web.*\"}", 300.0).len(), 1);
        // the lookback: nothing newer than 5 minutes before t
        assert!(instant("up", 901.0).is_empty());
        assert_eq!(instant("up", 900.0).len(), 2);
    }

    #[test]
    fn counter_resets_count_from_zero() {
        // 5/s, reset at t=30 to 0, then 5/s again: increase over (0, 60] is 5 * 60 - 5
        // (the sample at 0 is outside the window; one step is lost to the reset)
        let pts: Vec<(f64, f64)> = (0..=60)
            .map(|t| {
                (
                    f64::from(t),
                    5.0 * f64::from(if t < 30 { t } else { t - 30 }),
                )
            })
            .collect();
        let src = Mem(vec![(labels(&[("__name__", "c_total")]), pts)]);
        let (v, _) = query(&src, "increase(c_total[60s])", Range::instant(60.0)).unwrap();
        let Value::Vector(v) = v else { panic!() };
        // samples 1..=60: raw increase 145 + reset correction 145 = 290 over 59 s,
        // extrapolated to the 60 s window (first sample 1 s after its start)
        let want = 290.0 * 60.0 / 59.0;
        assert!(close(v[0].values[0].unwrap(), want), "{v:?}");
        // rate is the same increase per second of the window
        let (v, _) = query(&src, "rate(c_total[60s])", Range::instant(60.0)).unwrap();
        let Value::Vector(v) = v else { panic!() };
        assert!(close(v[0].values[0].unwrap(), want / 60.0), "{v:?}");
        // irate across the reset: 145 → 0 is a reset to 0 (0/s), then 0 → 5 is 5/s;
        // a window that ends before the reset sees 5/s
        for (at, want) in [(29.0, 5.0), (30.0, 0.0), (31.0, 5.0)] {
            let (v, _) = query(&src, "irate(c_total[10s])", Range::instant(at)).unwrap();
            let Value::Vector(v) = v else { panic!() };
            assert!(close(v[0].values[0].unwrap(), want), "t={at}: {v:?}");
        }
    }

    #[test]
    fn operators_and_matching() {
        // 5xx ratio per instance, one-to-one with on()
        let r = instant(
            "sum by (instance) (rate(req_total{code=\"5xx\"}[1m])) / on(instance) sum by (instance) (rate(req_total[1m]))",
            300.0,
        );
        assert_eq!(r.len(), 1, "web-01 has no 5xx series: no match");
        assert!(close(r[0].1, 1.0 / 11.0), "{r:?}");
        // comparison filters and keeps the name; bool gives 0/1
        let r = instant("up == 0", 300.0);
        assert_eq!(
            r,
            vec![(labels(&[("__name__", "up"), ("instance", "web-01")]), 0.0)]
        );
        let r = instant("up > bool 0", 300.0);
        assert_eq!(r.iter().map(|x| x.1).collect::<Vec<_>>(), [1.0, 0.0]);
        assert!(r[0].0.iter().all(|(k, _)| k != "__name__"));
        assert_eq!(instant("2 * 3 + time() - time()", 300.0)[0].1, 6.0);
        assert_eq!(instant("1 < bool 2", 300.0)[0].1, 1.0);
        assert_eq!(instant("-up{instance=\"lb-01\"}", 300.0)[0].1, -1.0);
        assert_eq!(instant("up and on(instance) (up == 1)", 300.0).len(), 1);
        assert_eq!(instant("up unless on(instance) (up == 1)", 300.0).len(), 1);
        assert_eq!(instant("(up == 1) or up", 300.0).len(), 2);
        assert_eq!(instant("clamp_min(up, 0.5)", 300.0)[1].1, 0.5);
        assert_eq!(instant("abs(-up{instance=\"lb-01\"})", 300.0)[0].1, 1.0);
        assert_eq!(
            instant("absent(nothing{job=\"x\"})", 300.0),
            vec![(labels(&[("job", "x")]), 1.0)]
        );
        assert!(instant("absent(up)", 300.0).is_empty());
        assert_eq!(
            instant("scalar(up{instance=\"lb-01\"}) * 2", 300.0)[0].1,
            2.0
        );
        // the same labels on both sides of ignoring(code) → many-to-many
        let e = query(
            &mem(),
            "req_total / ignoring(code) up",
            Range::instant(300.0),
        )
        .unwrap_err();
        assert!(matches!(e, QueryError::Execution(_)), "{e}");
    }

    #[test]
    fn histogram_quantile_interpolates() {
        // rates: 50/s ≤ 0.1, 90/s ≤ 0.5, 100/s total. p50 → 0.1; p90 → 0.5; p70 halfway
        let q = |phi: f64| {
            instant(
                &format!("histogram_quantile({phi}, rate(lat_bucket[1m]))"),
                300.0,
            )[0]
            .1
        };
        assert!(close(q(0.5), 0.1), "{}", q(0.5));
        assert!(close(q(0.7), 0.3), "{}", q(0.7));
        assert!(close(q(0.9), 0.5), "{}", q(0.9));
        assert_eq!(
            q(0.99),
            0.5,
            "the +Inf bucket yields the largest finite bound"
        );
    }

    #[test]
    fn range_queries_step_and_are_bounded() {
        let (v, times) = query(
            &mem(),
            "sum(rate(req_total[1m]))",
            Range::new(100.0, 200.0, 10.0).unwrap(),
        )
        .unwrap();
        assert_eq!(times.len(), 11);
        let Value::Vector(v) = v else { panic!() };
        assert!(
            v[0].values
                .iter()
                .all(|x| x.is_some_and(|x| close(x, 15.0))),
            "{v:?}"
        );
        assert!(Range::new(0.0, 11_000.0, 1.0).is_err());
        assert!(Range::new(0.0, 10_999.0, 1.0).is_ok());
        assert!(Range::new(10.0, 0.0, 1.0).is_err());
        assert!(Range::new(0.0, 10.0, 0.0).is_err());
        // a raw range selector as an instant query: the samples in (t - 10s, t]
        let (v, _) = query(&mem(), "up{instance=\"lb-01\"}[10s]", Range::instant(300.0)).unwrap();
        let Value::Matrix(m) = v else { panic!() };
        assert_eq!(m[0].1.len(), 10);
    }

    #[test]
    fn unsupported_and_malformed_queries_say_what() {
        let err = |q: &str| {
            query(&mem(), q, Range::instant(300.0))
                .unwrap_err()
                .to_string()
        };
        assert!(err("topk(1, up)").contains("aggregation topk"));
        assert!(err("up offset 5m").contains("offset"));
        assert!(err("rate(up[5m:1m])").contains("subquer"));
        assert!(err("label_replace(up, \"a\", \"b\", \"c\", \"d\")").contains("label_replace"));
        assert!(err("up * on(instance) group_left req_total").contains("group_left"));
        assert!(matches!(
            query(&mem(), "sum(", Range::instant(0.0)),
            Err(QueryError::BadData(_))
        ));
        assert!(err("1 > 2").contains("BOOL"));
    }
}
