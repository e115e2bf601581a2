//! The in-memory series store: per host, per series (metric name + sorted labels), a bounded
//! ring of `(receive time, value)` samples, plus the times of the host's pushes.
//!
//! Times are seconds on the caller's clock (the service uses Unix time); nothing here reads
//! a clock, so the rate arithmetic is tested with explicit times.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::chunk::Chunk;
use crate::exposition::{Labels, Sample};

/// Samples per compressed chunk: four minutes at one push per second (Prometheus' TSDB
/// cuts chunks at 120 samples; longer chunks spread the 16-byte head over more samples).
pub const CHUNK_SAMPLES: usize = 240;
/// The default retention, seconds (24 h; `[monitor] retention` in the topology): older
/// samples are dropped, a chunk at a time, and a series or host silent that long is
/// forgotten.
pub const DEFAULT_RETENTION_SECONDS: f64 = 86_400.0;
/// Seconds between two passes dropping what is older than the retention.
pub const EXPIRE_INTERVAL_SECONDS: f64 = 10.0;
/// Each agent host's series budget: the most series the store keeps for one host. A
/// sample of a new series beyond it is refused ([`Refused::SeriesBudget`]); the host's
/// existing series keep being updated. With 24 h of one-second samples at about 1.5 bytes
/// each, a full budget holds about 260 MB per host; a typical agent pushes a few hundred
/// series.
pub const MAX_SERIES_PER_HOST: usize = 2_000;

/// A series of one host: metric name and labels sorted by name.
pub type SeriesId = (String, Labels);

/// One stored series, as [`Store::series`] returns it.
#[derive(Debug, Clone, Copy)]
pub struct SeriesRef<'a> {
    /// The pushing host.
    pub host: &'a str,
    /// Labels sorted by name.
    pub labels: &'a [(String, String)],
    /// The samples.
    pub samples: &'a Samples,
    /// The host pushed after this series' newest sample without it: the series left
    /// (Prometheus marks it stale), its last value is no longer current.
    pub stale: bool,
}

/// Why a whole push was not stored (it is malformed; single bad samples are
/// [`Refused`] instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The same series appeared twice in one push.
    #[error("duplicate series {0}")]
    DuplicateSeries(String),
}

/// The samples of one series, oldest first, in compressed [`Chunk`]s of at most
/// [`CHUNK_SAMPLES`] samples, times rounded to milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    sealed: VecDeque<Chunk>,
    head: Chunk,
}

/// Seconds to the store's millisecond times.
fn to_ms(t: f64) -> i64 {
    (t * 1000.0).round() as i64
}

fn to_s(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

impl Samples {
    fn push(&mut self, t: f64, v: f64) {
        if self.head.len() >= CHUNK_SAMPLES {
            let mut full = std::mem::take(&mut self.head);
            full.shrink_to_fit();
            self.sealed.push_back(full);
        }
        self.head.append(to_ms(t), v);
    }

    fn chunks(&self) -> impl DoubleEndedIterator<Item = &Chunk> + '_ {
        self.sealed.iter().chain(std::iter::once(&self.head))
    }

    /// `(time seconds, value)` pairs, oldest first.
    pub fn points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.chunks()
            .flat_map(|c| c.iter())
            .map(|(t, v)| (to_s(t), v))
    }

    /// Points with `since <= t <= until`, oldest first; only the chunks overlapping the
    /// range are decoded.
    pub fn between(&self, since: f64, until: f64) -> impl Iterator<Item = (f64, f64)> + '_ {
        let (lo, hi) = (to_ms(since), to_ms(until));
        self.chunks()
            .filter(move |c| {
                c.first_time().is_some_and(|f| f <= hi) && c.last().is_some_and(|(l, _)| l >= lo)
            })
            .flat_map(|c| c.iter())
            .filter(move |&(t, _)| t >= lo && t <= hi)
            .map(|(t, v)| (to_s(t), v))
    }

    /// The newest sample, `(time seconds, value)`.
    pub fn last(&self) -> Option<(f64, f64)> {
        self.head
            .last()
            .or_else(|| self.sealed.back().and_then(Chunk::last))
            .map(|(t, v)| (to_s(t), v))
    }

    fn last_ms(&self) -> Option<i64> {
        self.head
            .last()
            .or_else(|| self.sealed.back().and_then(Chunk::last))
            .map(|(t, _)| t)
    }

    fn last_time(&self) -> Option<f64> {
        self.last_ms().map(to_s)
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.chunks().map(Chunk::len).sum()
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.head.is_empty() && self.sealed.is_empty()
    }

    /// Bytes of compressed samples held (chunk payloads, without their headers).
    pub fn encoded_bytes(&self) -> usize {
        self.chunks().map(Chunk::encoded_bytes).sum()
    }

    /// Drops the sealed chunks whose newest sample is older than `horizon` seconds.
    fn drop_before(&mut self, horizon: f64) {
        let h = to_ms(horizon);
        while self
            .sealed
            .front()
            .and_then(Chunk::last)
            .is_some_and(|(t, _)| t < h)
        {
            self.sealed.pop_front();
        }
    }
}

#[derive(Debug, Default)]
struct HostSeries {
    /// Per push, the time of its newest stored sample (receive time for samples without
    /// a timestamp) and how many samples it stored; only pushes newer than the last.
    pushes: Samples,
    /// When the host's last push was received (monitor clock), whatever its timestamps.
    received: Option<f64>,
    series: HashMap<SeriesId, Samples>,
}

impl HostSeries {
    /// When `samples`' series went stale, up to `until` seconds: the time of the host's
    /// first push that stored samples after the series' newest one, since every push
    /// carries every series of its agent (Prometheus writes a staleness marker when a
    /// series is missing from a scrape). `None` while the series is in the newest push.
    fn stale_at(&self, samples: &Samples, until: f64) -> Option<f64> {
        let last = samples.last_time()?;
        if self.pushes.last_time().is_none_or(|p| p <= last) {
            return None;
        }
        self.pushes
            .between(last, until)
            .find(|&(t, stored)| t > last && stored > 0.0)
            .map(|(t, _)| t)
    }
}

/// The first bytes of a store snapshot (format version 2: compressed chunks).
pub const SNAPSHOT_MAGIC: &[u8] = b"RAMPART-STORE 2\n";
/// The first bytes of a snapshot in an older format, which is not read.
const SNAPSHOT_MAGIC_PREFIX: &[u8] = b"RAMPART-STORE ";

fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A cursor over snapshot bytes.
struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.b.len() < n {
            return Err("the snapshot ends inside a record".into());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn f64(&mut self) -> Result<f64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(f64::from_le_bytes(a))
    }
    fn str(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }
    fn samples(&mut self) -> Result<Samples, String> {
        let n = self.u32()? as usize;
        let mut out = Samples::default();
        for i in 0..n {
            let (c, rest) = Chunk::from_bytes(self.b)?;
            if c.len() > CHUNK_SAMPLES {
                return Err(format!(
                    "a chunk of {} samples (at most {CHUNK_SAMPLES})",
                    c.len()
                ));
            }
            let prev = out.sealed.back().and_then(Chunk::last);
            if let (Some((prev, _)), Some(first)) = (prev, c.first_time()) {
                if first <= prev {
                    return Err("chunks out of time order".into());
                }
            }
            self.b = rest;
            if i + 1 < n {
                out.sealed.push_back(c);
            } else {
                out.head = c;
            }
        }
        Ok(out)
    }
}

/// Largest counter value accepted: 2^53, beyond which an `f64` no longer counts by one.
pub const MAX_COUNTER: f64 = 9_007_199_254_740_992.0;

/// Why one sample of a push was refused (the rest of the push is stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refused {
    /// A new series while the host already has [`MAX_SERIES_PER_HOST`].
    SeriesBudget,
    /// NaN or ±Inf.
    NonFinite,
    /// A counter below zero.
    NegativeCounter,
    /// A counter above [`MAX_COUNTER`].
    CounterTooLarge,
    /// A timestamp more than [`MAX_FUTURE_SECONDS`] after the receive time.
    TooFarInFuture,
    /// A timestamp older than the retention: it would be dropped at once.
    TooOld,
    /// A timestamp not later than the series' last stored sample (Prometheus TSDB's
    /// "out of order sample"; a repeat of the same time is refused too).
    OutOfOrder,
}

/// Seconds a sample's own timestamp may lie after its receive time (clock skew between an
/// agent and the monitor); later ones are refused ([`Refused::TooFarInFuture`]).
pub const MAX_FUTURE_SECONDS: f64 = 5.0;

impl Refused {
    /// The reason as shown in the API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::SeriesBudget => "series_budget",
            Refused::NonFinite => "non_finite",
            Refused::NegativeCounter => "negative_counter",
            Refused::CounterTooLarge => "counter_too_large",
            Refused::TooFarInFuture => "too_far_in_future",
            Refused::TooOld => "too_old",
            Refused::OutOfOrder => "out_of_order",
        }
    }
}

/// Whether a sample named `name` is a counter (monotonic): `_total`, and a histogram's or
/// summary's `_count`, `_sum` and `_bucket` (OpenMetrics). Decided by the name alone, never
/// by the push's `# TYPE` lines: the rate the alert rule computes is chosen by name, so a
/// pusher must not be able to declare `rampart_http_requests_total` a gauge.
pub fn is_counter(name: &str) -> bool {
    ["_total", "_count", "_sum", "_bucket"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// What [`Store::ingest`] did with a push.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ingested {
    /// Samples stored.
    pub stored: usize,
    /// Of the stored samples, counters lower than their series' previous value: counter
    /// resets ([`Store::counter_resets`]).
    pub resets: usize,
    /// Samples refused, by reason: how many, and the name of the first such sample.
    pub refused: std::collections::BTreeMap<Refused, (u64, String)>,
}

impl Ingested {
    /// Samples refused, all reasons together.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().map(|(n, _)| n).sum()
    }
}

/// A per-second rate and the time span it was computed over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Increase per second.
    pub per_second: f64,
    /// Seconds between the first and the last push inside the window.
    pub span_seconds: f64,
}

/// The store. Not synchronised: the service holds it behind a mutex.
#[derive(Debug)]
pub struct Store {
    hosts: HashMap<String, HostSeries>,
    refused: std::collections::BTreeMap<(String, Refused), u64>,
    /// Counter resets stored so far, per host.
    resets: HashMap<String, u64>,
    /// Seconds of history kept.
    retention: f64,
    /// When what is older than the retention was last dropped.
    expired_at: Option<f64>,
}

impl Default for Store {
    fn default() -> Store {
        Store::with_retention(DEFAULT_RETENTION_SECONDS)
    }
}

impl Store {
    /// An empty store keeping [`DEFAULT_RETENTION_SECONDS`].
    pub fn new() -> Store {
        Store::default()
    }

    /// An empty store keeping `seconds` of history (positive, finite; the topology
    /// validates `[monitor] retention`).
    pub fn with_retention(seconds: f64) -> Store {
        Store {
            hosts: HashMap::new(),
            refused: std::collections::BTreeMap::new(),
            resets: HashMap::new(),
            retention: seconds,
            expired_at: None,
        }
    }

    /// Seconds of history kept.
    pub fn retention(&self) -> f64 {
        self.retention
    }

    /// Samples held and bytes of their compressed chunks, over every series of every host
    /// (push records not counted).
    pub fn footprint(&self) -> (usize, usize) {
        self.hosts
            .values()
            .flat_map(|h| h.series.values())
            .fold((0, 0), |(n, b), s| (n + s.len(), b + s.encoded_bytes()))
    }

    /// Stores one push of `host` received at `now` and says what was stored and refused.
    ///
    /// Each sample is stored at its own time when it carries one (`Sample::timestamp`, in
    /// seconds: the service converts the text format's milliseconds), else at `now`. That
    /// is how an agent delivers, oldest first, the pushes it buffered while the monitor was
    /// unreachable.
    ///
    /// The whole push is rejected only when it is malformed: it repeats a series at the
    /// same time. Single samples are refused and counted ([`Store::refused`]) without
    /// failing the push:
    /// - non-finite values (NaN, ±Inf), of any series;
    /// - timestamps more than [`MAX_FUTURE_SECONDS`] after `now`, older than the retention,
    ///   or not later than the series' last sample (out of order);
    /// - counters ([`is_counter`]) below zero or above [`MAX_COUNTER`];
    /// - samples of a new series once the host holds [`MAX_SERIES_PER_HOST`] series (the
    ///   series budget; in the push's order).
    ///
    /// A counter lower than its series' previous value is stored as a counter reset, as
    /// Prometheus treats it (`rate`, `increase` and `irate` count from zero again after
    /// it, see [`increase`]): the process restarted, or the kernel object behind the
    /// counter was recreated (a network interface deleted and made again restarts its
    /// byte and packet counters without the agent restarting). Resets are counted per
    /// host ([`Store::counter_resets`], `/api/v1/ingest`).
    ///
    /// What is older than the retention is dropped first (at most every
    /// [`EXPIRE_INTERVAL_SECONDS`]).
    pub fn ingest(
        &mut self,
        host: &str,
        now: f64,
        samples: Vec<Sample>,
    ) -> Result<Ingested, IngestError> {
        self.expire(now);
        let mut seen = HashSet::with_capacity(samples.len());
        for s in &samples {
            if !seen.insert((&s.name, &s.labels, s.timestamp.map(f64::to_bits))) {
                return Err(IngestError::DuplicateSeries(s.name.clone()));
            }
        }
        drop(seen);
        let entry = self.hosts.entry(host.to_string()).or_default();
        let mut out = Ingested::default();
        let mut newest: Option<f64> = None;
        for s in samples {
            let t = s.timestamp.unwrap_or(now);
            let id = (s.name, s.labels);
            let ring = entry.series.get(&id);
            let previous = ring.and_then(Samples::last).map(|p| p.1);
            let refusal = if !s.value.is_finite() || !t.is_finite() {
                Some(Refused::NonFinite)
            } else if t > now + MAX_FUTURE_SECONDS {
                Some(Refused::TooFarInFuture)
            } else if t < now - self.retention {
                Some(Refused::TooOld)
            } else if ring
                .and_then(Samples::last_ms)
                .is_some_and(|last| to_ms(t) <= last)
            {
                Some(Refused::OutOfOrder)
            } else if is_counter(&id.0) && s.value < 0.0 {
                Some(Refused::NegativeCounter)
            } else if is_counter(&id.0) && s.value > MAX_COUNTER {
                Some(Refused::CounterTooLarge)
            } else if ring.is_none() && entry.series.len() >= MAX_SERIES_PER_HOST {
                Some(Refused::SeriesBudget)
            } else {
                None
            };
            if let Some(r) = refusal {
                *self.refused.entry((host.to_string(), r)).or_default() += 1;
                out.refused.entry(r).or_insert((0, id.0)).0 += 1;
                continue;
            }
            if is_counter(&id.0) && previous.is_some_and(|p| s.value < p) {
                out.resets += 1;
            }
            entry.series.entry(id).or_default().push(t, s.value);
            newest = Some(newest.map_or(t, |n: f64| n.max(t)));
            out.stored += 1;
        }
        entry.received = Some(now);
        if out.resets > 0 {
            *self.resets.entry(host.to_string()).or_default() += out.resets as u64;
        }
        let at = newest.unwrap_or(now);
        if entry.pushes.last_time().is_none_or(|last| at > last) {
            entry.pushes.push(at, out.stored as f64);
        }
        Ok(out)
    }

    /// The whole store (every host's pushes and series; not the refusal and reset
    /// counts) in the snapshot format: `RAMPART-STORE 2\n`, then little-endian records —
    /// per host its name, an unused f64 (written NaN, skipped on load; it held the agent's
    /// start time when a counter decrease still needed a restart to count as a reset),
    /// push records and series (name, labels,
    /// samples) — then an FNV-1a 64 checksum of everything before it, so a torn or
    /// corrupted file is detected rather than half loaded. Strings are a u32 length and
    /// UTF-8 bytes; samples a u32 chunk count and the chunks as [`Chunk::to_bytes`] writes
    /// them (still compressed: a day of one-second samples costs about as much on disk as
    /// in memory).
    pub fn encode_snapshot(&self) -> Vec<u8> {
        fn put_str(b: &mut Vec<u8>, s: &str) {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        fn put_ring(b: &mut Vec<u8>, r: &Samples) {
            let chunks: Vec<&Chunk> = r.chunks().filter(|c| !c.is_empty()).collect();
            b.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
            for c in chunks {
                c.to_bytes(b);
            }
        }
        let mut b = SNAPSHOT_MAGIC.to_vec();
        b.extend_from_slice(&(self.hosts.len() as u32).to_le_bytes());
        for (host, h) in &self.hosts {
            put_str(&mut b, host);
            b.extend_from_slice(&f64::NAN.to_le_bytes());
            put_ring(&mut b, &h.pushes);
            b.extend_from_slice(&(h.series.len() as u32).to_le_bytes());
            for ((name, labels), ring) in &h.series {
                put_str(&mut b, name);
                b.extend_from_slice(&(labels.len() as u32).to_le_bytes());
                for (k, v) in labels {
                    put_str(&mut b, k);
                    put_str(&mut b, v);
                }
                put_ring(&mut b, ring);
            }
        }
        let sum = fnv64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// A store keeping `retention` seconds from [`Store::encode_snapshot`]'s bytes,
    /// without what is older than the retention at `now`.
    ///
    /// Errors: an older snapshot format (version 1 held raw rings; it is not converted),
    /// not a snapshot, a checksum mismatch (torn or corrupted file), or records that do
    /// not parse; the message says which.
    pub fn decode_snapshot(bytes: &[u8], now: f64, retention: f64) -> Result<Store, String> {
        if !bytes.starts_with(SNAPSHOT_MAGIC) && bytes.starts_with(SNAPSHOT_MAGIC_PREFIX) {
            let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
            return Err(format!(
                "snapshot format {:?} is not read by this version (it reads {:?})",
                String::from_utf8_lossy(line),
                String::from_utf8_lossy(&SNAPSHOT_MAGIC[..SNAPSHOT_MAGIC.len() - 1])
            ));
        }
        if bytes.len() < SNAPSHOT_MAGIC.len() + 8 || !bytes.starts_with(SNAPSHOT_MAGIC) {
            return Err("not a Rampart store snapshot".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        let mut want = [0u8; 8];
        want.copy_from_slice(sum);
        if fnv64(body) != u64::from_le_bytes(want) {
            return Err("checksum mismatch: the snapshot is torn or corrupted".into());
        }
        let mut r = Reader {
            b: &body[SNAPSHOT_MAGIC.len()..],
        };
        let mut store = Store::with_retention(retention);
        for _ in 0..r.u32()? {
            let host = r.str()?;
            let _unused = r.f64()?;
            let pushes = r.samples()?;
            let mut h = HostSeries {
                received: pushes.last_time(),
                pushes,
                series: HashMap::new(),
            };
            for _ in 0..r.u32()? {
                let name = r.str()?;
                let mut labels = Vec::new();
                for _ in 0..r.u32()? {
                    labels.push((r.str()?, r.str()?));
                }
                let ring = r.samples()?;
                if h.series.len() < MAX_SERIES_PER_HOST {
                    h.series.insert((name, labels), ring);
                }
            }
            store.hosts.insert(host, h);
        }
        if !r.b.is_empty() {
            return Err("trailing bytes after the last record".into());
        }
        store.expire(now);
        Ok(store)
    }

    /// How many series `host` holds now (at most [`MAX_SERIES_PER_HOST`]).
    pub fn series_count(&self, host: &str) -> usize {
        self.hosts.get(host).map_or(0, |h| h.series.len())
    }

    fn expire(&mut self, now: f64) {
        if self
            .expired_at
            .is_some_and(|at| (at..at + EXPIRE_INTERVAL_SECONDS).contains(&now))
        {
            return;
        }
        self.expired_at = Some(now);
        let horizon = now - self.retention;
        self.hosts.retain(|_, h| {
            h.series.retain(|_, r| {
                r.drop_before(horizon);
                r.last_time().is_some_and(|t| t >= horizon)
            });
            h.pushes.drop_before(horizon);
            h.received
                .or(h.pushes.last_time())
                .is_some_and(|t| t >= horizon)
        });
    }

    /// Samples refused so far, by host and reason.
    pub fn refused(&self) -> &std::collections::BTreeMap<(String, Refused), u64> {
        &self.refused
    }

    /// Counter resets `host`'s pushes carried since this store was made (a counter lower
    /// than its series' previous value, stored as a reset; see [`Store::ingest`]).
    pub fn counter_resets(&self, host: &str) -> u64 {
        self.resets.get(host).copied().unwrap_or(0)
    }

    /// When `host`'s last push was received (the `now` of [`Store::ingest`]), if it
    /// pushed since this store was made; after a snapshot restore, its newest push's time.
    pub fn last_push(&self, host: &str) -> Option<f64> {
        self.hosts
            .get(host)
            .and_then(|h| h.received.or(h.pushes.last_time()))
    }

    /// The per-second rate of the sum of `host`'s counters named `name` over the `window`
    /// seconds up to `now` (samples received in `[now - window, now]`, so an earlier `now`
    /// evaluates the rate as it was then), Prometheus `sum(rate(name[window]))` without
    /// extrapolation:
    /// each series' increase between the pushes inside the window (a decrease means the
    /// counter restarted from zero), summed, divided by the time between the first and the
    /// last push inside the window. A host that pushed but has no such series has rate 0.
    ///
    /// `None` when fewer than two pushes fall inside the window.
    pub fn rate(&self, host: &str, name: &str, now: f64, window: f64) -> Option<Rate> {
        let h = self.hosts.get(host)?;
        let since = now - window;
        let mut pushes = h.pushes.between(since, now);
        let first = pushes.next()?.0;
        let last = pushes.last()?.0;
        let span = last - first;
        if span <= 0.0 {
            return None;
        }
        let total: f64 = h
            .series
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, ring)| increase(ring.between(since, now)))
            // Folded from +0.0: an empty `Sum` of f64 is -0.0, which would print as "-0".
            .fold(0.0, |acc, x| acc + x);
        Some(Rate {
            per_second: total / span,
            span_seconds: span,
        })
    }

    /// Every stored series named `name`, of `host` only when given, as
    /// sorted by host then labels.
    pub fn series(&self, name: &str, host: Option<&str>) -> Vec<SeriesRef<'_>> {
        let mut out: Vec<_> =
            self.hosts
                .iter()
                .filter(|(h, _)| host.is_none_or(|want| want == h.as_str()))
                .flat_map(|(h, hs)| {
                    hs.series.iter().filter(|((n, _), _)| n == name).map(
                        move |((_, labels), ring)| SeriesRef {
                            host: h.as_str(),
                            labels: labels.as_slice(),
                            samples: ring,
                            stale: hs.stale_at(ring, f64::INFINITY).is_some(),
                        },
                    )
                })
                .collect();
        out.sort_by(|a, b| (a.host, a.labels).cmp(&(b.host, b.labels)));
        out
    }
}

/// The job label every stored series carries in queries.
pub const JOB: &str = "rampart";

/// A stored series' labels as queries see them (Prometheus' target labels): its own
/// labels, `__name__`, `instance` (the pushing host) and `job` ([`JOB`]); a pushed label
/// named `instance` or `job` becomes `exported_instance`/`exported_job`
/// (`honor_labels: false`). Sorted by name.
pub fn query_labels(host: &str, name: &str, labels: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| match k.as_str() {
            "instance" | "job" => (format!("exported_{k}"), v.clone()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    out.push(("__name__".into(), name.into()));
    out.push(("instance".into(), host.into()));
    out.push(("job".into(), JOB.into()));
    out.sort();
    out
}

impl crate::promql::Source for Store {
    fn select(
        &self,
        matchers: &[&promql_parser::label::Matcher],
        start: f64,
        end: f64,
    ) -> crate::promql::Selected {
        // the name is the cheap filter: test it before building label sets
        let name_eq = matchers.iter().find_map(|m| {
            (m.name == "__name__" && matches!(m.op, promql_parser::label::MatchOp::Equal))
                .then_some(m.value.as_str())
        });
        let mut out = Vec::new();
        for (host, h) in &self.hosts {
            for ((name, labels), samples) in &h.series {
                if name_eq.is_some_and(|n| n != name) {
                    continue;
                }
                let l = query_labels(host, name, labels);
                let ok = matchers.iter().all(|m| {
                    let v = l
                        .iter()
                        .find(|(k, _)| *k == m.name)
                        .map_or("", |(_, v)| v.as_str());
                    m.is_match(v)
                });
                if ok {
                    let mut pts: Vec<(f64, f64)> = samples.between(start, end).collect();
                    if !pts.is_empty() {
                        if let Some(at) = h.stale_at(samples, end) {
                            pts.push((at, f64::from_bits(crate::promql::STALE_NAN_BITS)));
                        }
                        out.push((l, pts));
                    }
                }
            }
        }
        out
    }
}

impl Store {
    /// Every stored series' query labels ([`query_labels`]), of series with a sample at
    /// or after `since` seconds.
    pub fn all_series_labels(&self, since: f64) -> Vec<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (host, h) in &self.hosts {
            for ((name, labels), samples) in &h.series {
                if samples.last_time().is_some_and(|t| t >= since) {
                    out.push(query_labels(host, name, labels));
                }
            }
        }
        out
    }
}

/// The increase of a counter over consecutive points: the sum of the positive steps, and
/// after a decrease (a counter reset, the process restarted) the new value itself, as the
/// counter counted from zero since the restart. Non-finite values are skipped.
pub fn increase(points: impl IntoIterator<Item = (f64, f64)>) -> f64 {
    let mut prev: Option<f64> = None;
    let mut total = 0.0;
    for (_, v) in points {
        if !v.is_finite() {
            continue;
        }
        if let Some(p) = prev {
            total += if v >= p { v - p } else { v };
        }
        prev = Some(v);
    }
    total
}

#[cfg(test)]
mod hygiene_tests {
    use super::*;

    const REQ: &str = "rampart_http_requests_total";
    const START_TIME_METRIC: &str = "process_start_time_seconds";

    fn sample(name: &str, value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: Vec::new(),
            value,
            timestamp: None,
        }
    }

    /// One push of lb-01: its start time (when given) and its requests counter.
    fn push(store: &mut Store, t: f64, started: Option<f64>, requests: f64) -> Ingested {
        let mut samples = vec![sample(REQ, requests)];
        samples.extend(started.map(|v| sample(START_TIME_METRIC, v)));
        store.ingest("lb-01", t, samples).unwrap()
    }

    fn refused(store: &Store, reason: Refused) -> u64 {
        store
            .refused()
            .get(&("lb-01".to_string(), reason))
            .copied()
            .unwrap_or(0)
    }

    /// 10 requests/s from t = 0 to t = 9, started at 1000.
    fn steady() -> Store {
        let mut s = Store::new();
        for t in 0..10 {
            let r = push(&mut s, f64::from(t), Some(1000.0), 10.0 * f64::from(t));
            assert_eq!((r.stored, r.refused_total()), (2, 0));
        }
        s
    }

    #[test]
    fn a_snapshot_round_trips_and_a_damaged_one_is_refused() {
        let mut st = Store::new();
        for i in 0..10 {
            let t = 1_000.0 + f64::from(i);
            st.ingest(
                "lb-01",
                t,
                crate::exposition::parse(&format!(
                    "rampart_http_requests_total{{code=\"2xx\"}} {}\nprocess_start_time_seconds 5\n",
                    i * 10
                ))
                .unwrap(),
            )
            .unwrap();
        }
        let bytes = st.encode_snapshot();
        let back = Store::decode_snapshot(&bytes, 1_010.0, DEFAULT_RETENTION_SECONDS).unwrap();
        let rate = |s: &Store| s.rate("lb-01", "rampart_http_requests_total", 1_009.0, 5.0);
        assert_eq!(rate(&back).map(|r| r.per_second), Some(10.0));
        assert_eq!(
            rate(&back).map(|r| r.span_seconds),
            rate(&st).map(|r| r.span_seconds)
        );
        assert_eq!(back.last_push("lb-01"), Some(1_009.0));
        assert_eq!(back.series_count("lb-01"), 2);
        // everything expired by a much later `now`
        assert_eq!(
            Store::decode_snapshot(&bytes, 1_000_000.0, DEFAULT_RETENTION_SECONDS)
                .unwrap()
                .series_count("lb-01"),
            0
        );
        // torn, flipped, foreign
        assert!(Store::decode_snapshot(
            &bytes[..bytes.len() - 3],
            1_010.0,
            DEFAULT_RETENTION_SECONDS
        )
        .is_err());
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert!(
            Store::decode_snapshot(&flipped, 1_010.0, DEFAULT_RETENTION_SECONDS)
                .unwrap_err()
                .contains("checksum")
        );
        assert!(Store::decode_snapshot(b"hello", 1_010.0, DEFAULT_RETENTION_SECONDS).is_err());
        let old = Store::decode_snapshot(b"RAMPART-STORE 1\nxxxxxxxxxxxx", 1_010.0, 60.0);
        assert!(old.unwrap_err().contains("RAMPART-STORE 1"));
    }

    #[test]
    fn two_hours_of_history_survive_a_snapshot_in_compressed_form() {
        let mut st = Store::new();
        let t0 = 1_700_000_000.0;
        let n = 7_200;
        for i in 0..n {
            let text = format!(
                "rampart_http_requests_total{{code=\"2xx\"}} {}\nup 1\n",
                3 * i
            );
            st.ingest(
                "web-01",
                t0 + f64::from(i),
                crate::exposition::parse(&text).unwrap(),
            )
            .unwrap();
        }
        let (samples, bytes) = st.footprint();
        assert_eq!(samples, 2 * n as usize);
        let snap = st.encode_snapshot();
        assert!(
            snap.len() < samples * 2,
            "{} bytes for {samples} samples",
            snap.len()
        );
        let now = t0 + f64::from(n);
        let back = Store::decode_snapshot(&snap, now, DEFAULT_RETENTION_SECONDS).unwrap();
        assert_eq!(back.footprint(), (samples, bytes));
        let pts: Vec<_> = back.series(REQ, None)[0].samples.points().collect();
        assert_eq!(pts.first(), Some(&(t0, 0.0)));
        assert_eq!(pts.last(), Some(&(now - 1.0, 3.0 * f64::from(n - 1))));
        // the restored series keep growing
        let mut back = back;
        let r = back
            .ingest("web-01", now, crate::exposition::parse("up 1\n").unwrap())
            .unwrap();
        assert_eq!(r.stored, 1);
        // a shorter retention drops what is older at load
        let short = Store::decode_snapshot(&snap, now, 3_600.0).unwrap();
        let kept = short.series(REQ, None)[0].samples.len();
        assert!((3_600..=3_600 + CHUNK_SAMPLES).contains(&kept), "{kept}");
    }

    #[test]
    fn impossible_counters_are_refused_and_cannot_move_the_rate() {
        let mut s = steady();
        let before = s.rate("lb-01", REQ, 9.0, 10.0).unwrap();
        assert!((before.per_second - 10.0).abs() < 1e-9, "{before:?}");
        let forged = [
            (f64::NAN, Refused::NonFinite),
            (f64::INFINITY, Refused::NonFinite),
            (f64::NEG_INFINITY, Refused::NonFinite),
            (1e300, Refused::CounterTooLarge),
            (MAX_COUNTER * 2.0, Refused::CounterTooLarge),
            (-5.0, Refused::NegativeCounter),
        ];
        for (i, (value, reason)) in forged.into_iter().enumerate() {
            let r = push(&mut s, 9.1 + 0.1 * i as f64, Some(1000.0), value);
            assert_eq!(r.stored, 1, "{value}: only the start time is stored");
            assert_eq!(r.refused.keys().collect::<Vec<_>>(), [&reason], "{value}");
            assert_eq!(r.refused[&reason].1, REQ);
        }
        assert_eq!(refused(&s, Refused::NonFinite), 3);
        assert_eq!(refused(&s, Refused::CounterTooLarge), 2);
        assert_eq!(refused(&s, Refused::NegativeCounter), 1);
        assert_eq!(s.counter_resets("lb-01"), 0);
        // The counter kept its last good value: nothing happened, the rate only spreads
        // the same increase over more pushes.
        let kept: Vec<f64> = s.series(REQ, None)[0]
            .samples
            .points()
            .map(|p| p.1)
            .collect();
        assert_eq!(kept.last(), Some(&90.0));
        let after = s.rate("lb-01", REQ, 9.9, 10.0).unwrap();
        assert!(
            after.per_second <= before.per_second,
            "{before:?} {after:?}"
        );
        // And the next genuine sample continues from there.
        let r = push(&mut s, 10.0, Some(1000.0), 100.0);
        assert_eq!((r.stored, r.refused_total(), r.resets), (2, 0, 0));
    }

    /// A network interface deleted and created again restarts its counters while the
    /// agent keeps running (same start time): the decrease is stored as a reset and
    /// counted, the series is not dropped, and the rate counts from zero again.
    #[test]
    fn a_counter_that_restarts_without_the_agent_is_a_reset() {
        let mut s = steady();
        for (t, v) in [(10.0, 4.0), (11.0, 14.0), (12.0, 24.0)] {
            let r = push(&mut s, t, Some(1000.0), v);
            assert_eq!((r.stored, r.refused_total()), (2, 0), "t={t}");
            assert_eq!(r.resets, usize::from(t == 10.0), "t={t}");
        }
        // Or without a start time at all (a pusher that never sends one).
        let r = push(&mut s, 13.0, None, 1.0);
        assert_eq!((r.stored, r.refused_total(), r.resets), (1, 0, 1));
        assert!(s.refused().is_empty());
        assert_eq!(s.counter_resets("lb-01"), 2);
        assert_eq!(s.counter_resets("web-01"), 0);
        let kept: Vec<f64> = s.series(REQ, None)[0]
            .samples
            .points()
            .map(|p| p.1)
            .collect();
        assert_eq!(kept[9..], [90.0, 4.0, 14.0, 24.0, 1.0]);
        // Over 9..12: 90 → (reset) 4 → 14 → 24 is 24 requests in 3 s.
        let r = s.rate("lb-01", REQ, 12.0, 3.0).unwrap();
        assert!((r.per_second - 8.0).abs() < 1e-9, "{r:?}");
        // Gauges go down freely and are no resets.
        for (t, v) in [(14.0, 5.0), (15.0, 1.0)] {
            let r = s
                .ingest("lb-01", t, vec![sample("temperature", v)])
                .unwrap();
            assert_eq!((r.stored, r.resets), (1, 0));
        }
        assert_eq!(s.counter_resets("lb-01"), 2);
    }

    #[test]
    fn histogram_counters_are_counters_and_gauges_keep_finite_values() {
        let mut s = Store::new();
        let ok = s
            .ingest(
                "lb-01",
                0.0,
                vec![
                    sample("x_seconds_bucket", 4.0),
                    sample("x_seconds_count", 4.0),
                    sample("x_seconds_sum", 0.5),
                    sample("temperature", -40.0),
                    sample("huge_gauge", 1e300),
                ],
            )
            .unwrap();
        assert_eq!((ok.stored, ok.refused_total()), (5, 0));
        let bad = s
            .ingest(
                "lb-01",
                1.0,
                vec![
                    sample("x_seconds_bucket", 3.0),
                    sample("x_seconds_count", -1.0),
                    sample("x_seconds_sum", f64::INFINITY),
                    sample("temperature", -41.0),
                    sample("huge_gauge", f64::NAN),
                ],
            )
            .unwrap();
        assert_eq!(
            (bad.stored, bad.resets),
            (2, 1),
            "the finite gauge, and the bucket's reset"
        );
        let reasons: Vec<_> = bad.refused.iter().map(|(r, (n, _))| (*r, *n)).collect();
        assert_eq!(
            reasons,
            [(Refused::NonFinite, 2), (Refused::NegativeCounter, 1)]
        );
        assert!(is_counter("x_bucket") && is_counter("x_total") && !is_counter("x_bytes"));
    }

    #[test]
    fn timestamped_samples_are_stored_at_their_time_and_bad_times_refused() {
        let mut s = Store::new();
        let at = |name: &str, v: f64, t: f64| Sample {
            timestamp: Some(t),
            ..sample(name, v)
        };
        let now = 10_000.0;
        // A spooled delivery, oldest first: three pushes from a minute ago in one body.
        let r = s
            .ingest(
                "lb-01",
                now,
                vec![
                    at(REQ, 1.0, now - 60.0),
                    at(REQ, 2.0, now - 59.0),
                    at(REQ, 3.0, now - 58.0),
                ],
            )
            .unwrap();
        assert_eq!((r.stored, r.refused_total()), (3, 0));
        let times: Vec<f64> = s.series(REQ, None)[0]
            .samples
            .points()
            .map(|p| p.0)
            .collect();
        assert_eq!(times, [now - 60.0, now - 59.0, now - 58.0]);
        assert_eq!(
            s.last_push("lb-01"),
            Some(now),
            "host-down looks at the receive time"
        );
        let r = s
            .ingest(
                "lb-01",
                now,
                vec![
                    at(REQ, 4.0, now - 58.0),
                    at("other_total", 1.0, now + MAX_FUTURE_SECONDS + 1.0),
                    at("old_total", 1.0, now - DEFAULT_RETENTION_SECONDS - 1.0),
                    at("skewed_total", 1.0, now + MAX_FUTURE_SECONDS),
                ],
            )
            .unwrap();
        assert_eq!(r.stored, 1, "only the sample within the allowed skew");
        assert_eq!(r.refused[&Refused::OutOfOrder].0, 1);
        assert_eq!(r.refused[&Refused::TooFarInFuture].0, 1);
        assert_eq!(r.refused[&Refused::TooOld].0, 1);
        assert_eq!(refused(&s, Refused::OutOfOrder), 1);
        // Without a timestamp the receive time counts, and it is later: stored.
        let r = s.ingest("lb-01", now, vec![sample(REQ, 5.0)]).unwrap();
        assert_eq!((r.stored, r.refused_total()), (1, 0));
        // The same series twice at the same time is a malformed push.
        assert!(s
            .ingest(
                "lb-01",
                now + 1.0,
                vec![at(REQ, 6.0, now + 1.0), at(REQ, 6.0, now + 1.0)]
            )
            .is_err());
    }

    #[test]
    fn the_series_budget_refuses_new_series_only() {
        let mut s = Store::new();
        let full: Vec<_> = (0..MAX_SERIES_PER_HOST)
            .map(|i| sample(&format!("m{i}"), 1.0))
            .collect();
        let r = s.ingest("lb-01", 0.0, full.clone()).unwrap();
        assert_eq!((r.stored, r.refused_total()), (MAX_SERIES_PER_HOST, 0));
        let mut more = full;
        more.push(sample("one_too_many", 1.0));
        more.push(sample("two_too_many", 1.0));
        let r = s.ingest("lb-01", 1.0, more).unwrap();
        assert_eq!(
            r.stored, MAX_SERIES_PER_HOST,
            "the known series are still stored"
        );
        assert_eq!(
            r.refused[&Refused::SeriesBudget],
            (2, "one_too_many".to_string())
        );
        assert_eq!(s.series_count("lb-01"), MAX_SERIES_PER_HOST);
        assert!(s.series("one_too_many", None).is_empty());
        // Other hosts have budgets of their own.
        let r = s.ingest("web-01", 1.0, vec![sample("m0", 1.0)]).unwrap();
        assert_eq!(r.stored, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, code: &str, value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: vec![("code".into(), code.into())],
            value,
            timestamp: None,
        }
    }

    const REQ: &str = "rampart_http_requests_total";

    /// Instant query `q` at `t` over `store`: labels (without `job`) and value per series.
    fn instant(store: &Store, q: &str, t: f64) -> Vec<(String, f64)> {
        match crate::promql::query(store, q, crate::promql::Range::instant(t))
            .unwrap()
            .0
        {
            crate::promql::Value::Vector(v) => {
                let mut out: Vec<_> = v
                    .into_iter()
                    .filter_map(|s| {
                        let l = s.labels.iter().find(|(k, _)| k == "code");
                        Some((l.map_or(String::new(), |l| l.1.clone()), s.values[0]?))
                    })
                    .collect();
                out.sort_by(|a, b| a.0.cmp(&b.0));
                out
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_series_missing_from_a_later_push_is_stale_from_that_push_on() {
        let mut s = Store::new();
        // Two series in each push up to t=10, then only "a" (the other left: a reload
        // removed a backend).
        for t in 0..=20 {
            let mut push = vec![sample("g", "a", 1.0), sample("c_total", "a", f64::from(t))];
            if t <= 10 {
                push.push(sample("g", "b", 0.0));
                push.push(sample("c_total", "b", f64::from(t)));
            }
            s.ingest("lb-01", f64::from(t), push).unwrap();
        }
        let both = vec![("a".to_string(), 1.0), ("b".to_string(), 0.0)];
        // Before it left, it is there, as it was.
        assert_eq!(instant(&s, "g", 10.0), both);
        // From the first push without it, it has no value, although its last sample is
        // well inside the 5 min lookback.
        assert_eq!(instant(&s, "g", 11.0), vec![("a".to_string(), 1.0)]);
        assert_eq!(instant(&s, "g", 20.0), vec![("a".to_string(), 1.0)]);
        // A range query (the dashboard's charts) has its values up to the push that left
        // it out, none after.
        let range = crate::promql::Range::new(8.0, 12.0, 1.0).unwrap();
        let crate::promql::Value::Vector(v) =
            crate::promql::query(&s, "g{code=\"b\"}", range).unwrap().0
        else {
            panic!("not a vector");
        };
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].values, [Some(0.0), Some(0.0), Some(0.0), None, None]);
        // Range functions read its samples and skip the marker.
        assert_eq!(
            instant(&s, "count_over_time(g[30s])", 20.0),
            vec![("a".to_string(), 21.0), ("b".to_string(), 11.0)]
        );
        let inc = instant(&s, "increase(c_total[15s])", 20.0);
        assert_eq!(inc[0], ("a".to_string(), 15.0));
        // b: 4 between its samples at 6 and 10, extrapolated (never NaN from the marker)
        assert!(
            inc[1].0 == "b" && (4.0..=6.0).contains(&inc[1].1),
            "{inc:?}"
        );
        // `series` says which left.
        let stale: Vec<(String, bool)> = s
            .series("g", Some("lb-01"))
            .iter()
            .map(|r| (r.labels[0].1.clone(), r.stale))
            .collect();
        assert_eq!(stale, [("a".into(), false), ("b".into(), true)]);
        // Back in a push: current again.
        s.ingest(
            "lb-01",
            21.0,
            vec![sample("g", "a", 1.0), sample("g", "b", 1.0)],
        )
        .unwrap();
        assert_eq!(
            instant(&s, "g", 21.0),
            vec![("a".to_string(), 1.0), ("b".to_string(), 1.0)]
        );
        assert!(s.series("g", None).iter().all(|r| !r.stale));
    }

    #[test]
    fn increase_handles_counter_resets() {
        let pts = [(0.0, 10.0), (1.0, 15.0), (2.0, 3.0), (3.0, 8.0)];
        // 10→15: +5; reset to 3: +3; 3→8: +5
        assert_eq!(increase(pts), 13.0);
        assert_eq!(increase([(0.0, 4.0)]), 0.0);
        assert_eq!(increase([(0.0, 1.0), (1.0, f64::NAN), (2.0, 2.0)]), 1.0);
    }

    #[test]
    fn rate_sums_series_over_the_window() {
        let mut s = Store::new();
        for t in 0..=20 {
            let t = f64::from(t);
            s.ingest(
                "web-01",
                t,
                vec![
                    sample(REQ, "2xx", 10.0 * t),
                    sample(REQ, "5xx", t),
                    sample("other_total", "2xx", 1000.0 * t),
                ],
            )
            .unwrap();
        }
        let r = s.rate("web-01", REQ, 20.0, 10.0).unwrap();
        assert_eq!(r.span_seconds, 10.0);
        assert!((r.per_second - 11.0).abs() < 1e-9, "{r:?}");
        assert_eq!(s.rate("web-02", REQ, 20.0, 10.0), None);
        // a host without the series has rate 0, and +0 (JSON would show "-0.0" otherwise)
        let absent = s
            .rate("web-01", "absent_total", 20.0, 10.0)
            .unwrap()
            .per_second;
        assert_eq!(absent, 0.0);
        assert!(absent.is_sign_positive());
        // one push inside the window is not enough
        assert_eq!(s.rate("web-01", REQ, 20.0, 0.5), None);
    }

    #[test]
    fn rate_across_a_restart() {
        let mut s = Store::new();
        // 5/s, then the process restarts at t=5 (its start time changes) and counts from
        // zero again at 5/s
        let values = [0.0, 5.0, 10.0, 15.0, 20.0, 5.0, 10.0, 15.0];
        for (t, v) in values.iter().enumerate() {
            let started = Sample {
                name: "process_start_time_seconds".into(),
                labels: Vec::new(),
                value: if t < 5 { 100.0 } else { 105.0 },
                timestamp: None,
            };
            s.ingest("lb-01", t as f64, vec![sample(REQ, "2xx", *v), started])
                .unwrap();
        }
        let r = s.rate("lb-01", REQ, 7.0, 10.0).unwrap();
        assert_eq!(r.span_seconds, 7.0);
        assert!((r.per_second - 5.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn rate_at_an_earlier_time_ignores_later_samples() {
        let mut s = Store::new();
        // 2/s up to t=10, then 20/s
        for t in 0..=20 {
            let v = if t <= 10 { 2 * t } else { 20 + 20 * (t - 10) };
            s.ingest(
                "lb-01",
                f64::from(t),
                vec![sample(REQ, "2xx", f64::from(v))],
            )
            .unwrap();
        }
        let then = s.rate("lb-01", REQ, 10.0, 5.0).unwrap();
        assert_eq!(then.span_seconds, 5.0);
        assert!((then.per_second - 2.0).abs() < 1e-9, "{then:?}");
        let now = s.rate("lb-01", REQ, 20.0, 5.0).unwrap();
        assert!((now.per_second - 20.0).abs() < 1e-9, "{now:?}");
        // before the first push there is nothing to compute a rate from
        assert_eq!(s.rate("lb-01", REQ, -1.0, 5.0), None);
        assert_eq!(s.rate("lb-01", REQ, 0.5, 5.0), None);
    }

    #[test]
    fn pushes_are_validated_and_bounded() {
        let mut s = Store::new();
        let dup = vec![sample(REQ, "2xx", 1.0), sample(REQ, "2xx", 2.0)];
        assert!(matches!(
            s.ingest("h", 0.0, dup),
            Err(IngestError::DuplicateSeries(_))
        ));
        assert_eq!(s.last_push("h"), None);
        let many: Vec<_> = (0..=MAX_SERIES_PER_HOST)
            .map(|i| sample("m", &i.to_string(), 1.0))
            .collect();
        let r = s.ingest("big", 0.0, many).unwrap();
        assert_eq!(r.stored, MAX_SERIES_PER_HOST);
        assert_eq!(r.refused[&Refused::SeriesBudget].0, 1);
        let mut s = Store::with_retention(1_000.0);
        for t in 0..3_000 {
            s.ingest("h", t as f64, vec![sample("m", "x", t as f64)])
                .unwrap();
        }
        let series = s.series("m", Some("h"));
        assert_eq!(series.len(), 1);
        // whole chunks older than the retention are dropped: at most one chunk more
        let kept = series[0].samples.len();
        assert!(
            (1_000..=1_000 + CHUNK_SAMPLES + 10).contains(&kept),
            "{kept}"
        );
        assert_eq!(series[0].samples.last(), Some((2_999.0, 2_999.0)));
        // silent for longer than the retention: dropped on the next push
        s.ingest("other", 10_000.0, vec![]).unwrap();
        assert!(s.series("m", None).is_empty());
        assert_eq!(s.last_push("h"), None);
    }
}
