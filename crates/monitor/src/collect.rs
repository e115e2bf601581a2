//! The agent's collectors, read at scrape and push time (prometheus-client
//! [`Collector`]s): host statistics from procfs and `statvfs(3)`, after node_exporter's
//! `cpu`, `meminfo`, `filesystem`, `netdev` and `loadavg` collectors, and the firewall
//! counters of this host's listeners.
//!
//! A source that cannot be read (no `/proc`, a vanished interface) is left out of that
//! scrape rather than failing it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use procfs::{Current, CurrentSI};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// Host statistics: `rampart_host_cpu_seconds_total{mode}`,
/// `rampart_host_memory_{total,available}_bytes`,
/// `rampart_host_filesystem_{size,avail}_bytes{path}` (the filesystem holding `path`),
/// `rampart_host_network_{receive,transmit}_bytes_total{device}`,
/// `rampart_host_load{1,5,15}`.
#[derive(Debug)]
pub struct HostCollector {
    /// A path on the filesystem to report (the state directory).
    pub fs_path: PathBuf,
}

/// When this process started, Unix seconds, as node_exporter's and the Prometheus client
/// libraries' `process_start_time_seconds`: the boot time (`btime` of `/proc/stat`) plus
/// the process's `starttime` (field 22 of `/proc/self/stat`, in clock ticks since boot;
/// proc(5)). The monitor tells a counter reset (the node restarted: a later start time)
/// from a counter that went backwards (refused) by it. Where `/proc` cannot be read, the
/// time of the first call.
fn process_start_time() -> f64 {
    static START: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        let from_proc = || -> Option<f64> {
            let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
            let boot = procfs::boot_time_secs().ok()?;
            let ticks = procfs::ticks_per_second();
            (ticks > 0).then(|| boot as f64 + stat.starttime as f64 / ticks as f64)
        };
        from_proc().unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
        })
    })
}

impl Collector for HostCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let m = enc.encode_descriptor(
                "process_start_time",
                "Start time of the node process since the Unix epoch.",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            ConstGauge::new(process_start_time()).encode(m)?;
        }
        if let Ok(stats) = procfs::KernelStats::current() {
            let t = &stats.total;
            let modes = [
                ("user", Some(t.user_ms())),
                ("nice", Some(t.nice_ms())),
                ("system", Some(t.system_ms())),
                ("idle", Some(t.idle_ms())),
                ("iowait", t.iowait_ms()),
                ("irq", t.irq_ms()),
                ("softirq", t.softirq_ms()),
                ("steal", t.steal_ms()),
            ];
            let mut m = enc.encode_descriptor(
                "rampart_host_cpu",
                "Seconds the CPUs spent in each mode (/proc/stat).",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            for (mode, ms) in modes {
                if let Some(ms) = ms {
                    ConstCounter::new(ms as f64 / 1000.0)
                        .encode(m.encode_family(&[("mode", mode)])?)?;
                }
            }
        }
        if let Ok(mem) = procfs::Meminfo::current() {
            gauge(
                &mut enc,
                "rampart_host_memory_total",
                "Usable RAM (MemTotal of /proc/meminfo).",
                mem.mem_total as f64,
            )?;
            if let Some(avail) = mem.mem_available {
                gauge(
                    &mut enc,
                    "rampart_host_memory_available",
                    "Memory available to new programs without swapping (MemAvailable).",
                    avail as f64,
                )?;
            }
        }
        if let Ok(vfs) = nix::sys::statvfs::statvfs(&self.fs_path) {
            let frag = vfs.fragment_size() as f64;
            let path = escape(&self.fs_path.to_string_lossy());
            let labels = [("path", path.as_str())];
            for (name, help, blocks) in [
                (
                    "rampart_host_filesystem_size",
                    "Size of the filesystem holding the state directory (statvfs f_blocks).",
                    vfs.blocks() as f64,
                ),
                (
                    "rampart_host_filesystem_avail",
                    "Bytes available to unprivileged users on that filesystem (f_bavail).",
                    vfs.blocks_available() as f64,
                ),
            ] {
                let mut m =
                    enc.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?;
                ConstGauge::new(blocks * frag).encode(m.encode_family(&labels)?)?;
            }
        }
        if let Ok(devs) = procfs::net::dev_status() {
            let devs: BTreeMap<_, _> = devs.into_iter().collect();
            for (name, help, rx) in [
                (
                    "rampart_host_network_receive",
                    "Bytes received per interface (/proc/net/dev).",
                    true,
                ),
                (
                    "rampart_host_network_transmit",
                    "Bytes sent per interface (/proc/net/dev).",
                    false,
                ),
            ] {
                let mut m =
                    enc.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Counter)?;
                for (dev, st) in &devs {
                    let v = if rx { st.recv_bytes } else { st.sent_bytes };
                    let dev = escape(dev);
                    ConstCounter::new(v).encode(m.encode_family(&[("device", dev.as_str())])?)?;
                }
            }
        }
        if let Ok(load) = procfs::LoadAverage::current() {
            for (name, v) in [
                ("rampart_host_load1", load.one),
                ("rampart_host_load5", load.five),
                ("rampart_host_load15", load.fifteen),
            ] {
                let m = enc.encode_descriptor(
                    name,
                    "System load average (/proc/loadavg).",
                    None,
                    MetricType::Gauge,
                )?;
                ConstGauge::new(f64::from(v)).encode(m)?;
            }
        }
        Ok(())
    }
}

/// One unlabelled gauge in bytes.
fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let m = enc.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

/// The firewall counters of this host's listeners:
/// `rampart_firewall_connections_total{service, verdict="accepted"|"refused"}`, summed per
/// service when several listeners serve the same one.
#[derive(Debug)]
pub struct FirewallCollector {
    /// The listeners' filters.
    pub filters: Vec<Arc<firewall::Filter>>,
}

impl Collector for FirewallCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut by_service: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for f in &self.filters {
            let e = by_service.entry(f.service.as_str()).or_default();
            e.0 += f.accepted();
            e.1 += f.refused();
        }
        if by_service.is_empty() {
            return Ok(());
        }
        let mut m = enc.encode_descriptor(
            "rampart_firewall_connections",
            "Connections to this host's listeners by firewall verdict.",
            None,
            MetricType::Counter,
        )?;
        for (service, (accepted, refused)) in by_service {
            for (verdict, v) in [("accepted", accepted), ("refused", refused)] {
                ConstCounter::new(v)
                    .encode(m.encode_family(&[("service", service), ("verdict", verdict)])?)?;
            }
        }
        // The listeners' limits: resets by reason, evictions, open connections.
        let mut limited: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let mut evicted: BTreeMap<&str, u64> = BTreeMap::new();
        let mut open: BTreeMap<&str, u64> = BTreeMap::new();
        for f in &self.filters {
            for (reason, n) in f.limited() {
                *limited
                    .entry((f.service.as_str(), reason.as_str()))
                    .or_default() += n;
            }
            *evicted.entry(f.service.as_str()).or_default() += f.evicted();
            *open.entry(f.service.as_str()).or_default() += f.open_connections();
        }
        let mut m = enc.encode_descriptor(
            "rampart_listener_limited_connections",
            "Connections reset at accept by a listener limit (per_source, max_connections with nothing idle to evict, fd_reserve).",
            None,
            MetricType::Counter,
        )?;
        for ((service, reason), v) in &limited {
            ConstCounter::new(*v)
                .encode(m.encode_family(&[("service", *service), ("reason", *reason)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "rampart_listener_evicted_connections",
            "Idle connections closed to admit new ones on a full listener.",
            None,
            MetricType::Counter,
        )?;
        for (service, v) in &evicted {
            ConstCounter::new(*v).encode(m.encode_family(&[("service", *service)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "rampart_listener_open_connections",
            "Connections open on the host's listeners.",
            None,
            MetricType::Gauge,
        )?;
        for (service, v) in &open {
            ConstGauge::new(*v as i64).encode(m.encode_family(&[("service", *service)])?)?;
        }
        Ok(())
    }
}

/// The kernel firewall's drop counters (netns mode, or a machine whose node applied its
/// ruleset): `rampart_firewall_dropped_packets_total{reason}` and
/// `rampart_firewall_dropped_bytes_total{reason}`, one `reason` per named counter of the
/// ruleset (`policy`, `invalid`, `blocked`, `rate`; see `firewall::nft::COUNTERS`).
///
/// Read with `nft -j list counters` at most once a second (scrapes and pushes in between
/// reuse the last reading); when `nft` fails the families are left out of that scrape.
#[derive(Debug, Default)]
pub struct KernelFirewallCollector {
    last: std::sync::Mutex<Option<(std::time::Instant, Vec<firewall::nft::Counter>)>>,
}

impl KernelFirewallCollector {
    fn read(&self) -> Vec<firewall::nft::Counter> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = last.as_ref() {
            if at.elapsed() < std::time::Duration::from_secs(1) {
                return v.clone();
            }
        }
        let v = firewall::nft::Nft::here().counters().unwrap_or_default();
        *last = Some((std::time::Instant::now(), v.clone()));
        v
    }
}

impl Collector for KernelFirewallCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.read();
        if counters.is_empty() {
            return Ok(());
        }
        let reason = |name: &str| name.trim_start_matches("dropped_").to_string();
        let mut m = enc.encode_descriptor(
            "rampart_firewall_dropped_packets",
            "Packets the host's nftables ruleset dropped, by named counter.",
            None,
            MetricType::Counter,
        )?;
        for c in &counters {
            ConstCounter::new(c.packets)
                .encode(m.encode_family(&[("reason", reason(&c.name).as_str())])?)?;
        }
        let mut m = enc.encode_descriptor(
            "rampart_firewall_dropped",
            "Bytes of the packets the host's nftables ruleset dropped, by named counter.",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for c in &counters {
            ConstCounter::new(c.bytes)
                .encode(m.encode_family(&[("reason", reason(&c.name).as_str())])?)?;
        }
        Ok(())
    }
}

/// Escapes a label value as the text format requires (`\\`, `\"`, `\n`); prometheus-client
/// writes label values verbatim.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn collectors_emit_parseable_text() {
        let mut registry = Registry::default();
        let dir = tempfile::Builder::new()
            .prefix("we\"ird\\dir")
            .tempdir()
            .unwrap();
        registry.register_collector(Box::new(HostCollector {
            fs_path: dir.path().to_path_buf(),
        }));
        let policy = Arc::new(topology::Policy {
            rules: vec![],
            extra: vec![],
        });
        let f = firewall::Filter::new(policy.clone(), "lb-01", topology::Service::Agent);
        assert!(!f.check("127.0.0.1".parse().unwrap()));
        registry.register_collector(Box::new(FirewallCollector {
            filters: vec![f.clone(), f],
        }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let samples = crate::exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let find = |name: &'static str| samples.iter().filter(move |s| s.name == name);
        assert!(find("rampart_host_cpu_seconds_total").any(|s| s.labels[0].1 == "idle"));
        assert_eq!(find("rampart_host_memory_total_bytes").count(), 1);
        let fs: Vec<_> = find("rampart_host_filesystem_size_bytes").collect();
        assert_eq!(fs.len(), 1);
        assert_eq!(fs[0].labels[0].1, dir.path().to_string_lossy());
        assert!(find("rampart_host_network_receive_bytes_total").any(|s| s.labels[0].1 == "lo"));
        assert_eq!(find("rampart_host_load1").count(), 1);
        // The node's start time, which tells the monitor a restart from a forged decrease.
        let started: Vec<_> = find(crate::store::START_TIME_METRIC).collect();
        assert_eq!(started.len(), 1);
        assert!(started[0].labels.is_empty());
        assert!(started[0].value > 0.0 && started[0].value <= crate::unix_now() + 1.0);
        let refused: Vec<_> = find("rampart_firewall_connections_total")
            .filter(|s| s.labels.contains(&("verdict".into(), "refused".into())))
            .collect();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].value, 2.0);
    }
}
