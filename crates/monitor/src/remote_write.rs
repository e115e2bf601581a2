//! The Prometheus remote-write 1.0 client side: the agent's samples as a `WriteRequest`
//! protobuf, snappy-compressed (block format), for any endpoint that speaks it — Prometheus
//! with `--web.enable-remote-write-receiver`, VictoriaMetrics, Mimir, Thanos receive.
//!
//! Source: the Prometheus "Remote-Write 1.0" specification: the body is a `WriteRequest`
//! (`prometheus/prompb/remote.proto`, `types.proto`), encoded with the snappy *block*
//! format, sent as `POST` with `Content-Encoding: snappy`, `Content-Type:
//! application/x-protobuf`, `X-Prometheus-Remote-Write-Version: 0.1.0`; every series
//! carries its `__name__` label, labels sorted by name; timestamps in milliseconds. A 5xx
//! or 429 answer is retried, other 4xx answers are not (the push sender's rules).

use crate::exposition;

/// `prometheus.WriteRequest` (field 1: timeseries; metadata, field 3, is not sent).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    /// The series, each with its samples.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// Labels sorted by name, `__name__` included.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Samples, oldest first.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    /// Label name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Label value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// The value.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The Content-Type of a remote-write body.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// The protocol version header's value for remote-write 1.0.
pub const VERSION: &str = "0.1.0";

/// The samples of an exposition (as [`exposition::parse`] reads it) as one
/// `WriteRequest`, every sample at `ms`, with `extra` labels added to every series (e.g.
/// `instance`, `job`); a label of the exposition with the same name as an extra one is
/// replaced. OpenMetrics `_created` samples are left out.
pub fn write_request(
    samples: &[exposition::Sample],
    extra: &[(String, String)],
    ms: i64,
) -> WriteRequest {
    let timeseries = samples
        .iter()
        .filter(|s| !s.name.ends_with("_created"))
        .map(|s| {
            let mut labels: Vec<Label> = Vec::with_capacity(s.labels.len() + extra.len() + 1);
            labels.push(Label {
                name: "__name__".into(),
                value: s.name.clone(),
            });
            for (k, v) in s
                .labels
                .iter()
                .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            {
                labels.push(Label {
                    name: k.clone(),
                    value: v.clone(),
                });
            }
            for (k, v) in extra {
                labels.push(Label {
                    name: k.clone(),
                    value: v.clone(),
                });
            }
            labels.sort_by(|a, b| a.name.cmp(&b.name));
            TimeSeries {
                labels,
                samples: vec![Sample {
                    value: s.value,
                    timestamp: ms,
                }],
            }
        })
        .collect();
    WriteRequest { timeseries }
}

/// A `WriteRequest` encoded and snappy-compressed (block format): a remote-write body.
///
/// Errors: snappy refuses the input (larger than its 4 GiB block limit).
pub fn encode(req: &WriteRequest) -> Result<Vec<u8>, snap::Error> {
    snap::raw::Encoder::new().compress_vec(&prost::Message::encode_to_vec(req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_sorted_labels() {
        let text =
            "# TYPE x counter\nx_total{b=\"2\",a=\"1\",instance=\"old\"} 7\nx_created 1\n# EOF\n";
        let samples = exposition::parse(text).unwrap();
        let req = write_request(
            &samples,
            &[("instance".into(), "h".into())],
            1_700_000_000_000,
        );
        assert_eq!(req.timeseries.len(), 1);
        let names: Vec<_> = req.timeseries[0]
            .labels
            .iter()
            .map(|l| format!("{}={}", l.name, l.value))
            .collect();
        assert_eq!(names, ["__name__=x_total", "a=1", "b=2", "instance=h"]);
        let body = encode(&req).unwrap();
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        let back: WriteRequest = prost::Message::decode(raw.as_slice()).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.timeseries[0].samples[0].value, 7.0);
    }
}
