//! The agent's collectors, read at scrape and push time (prometheus-client
//! [`Collector`]s): host statistics from procfs and `statvfs(3)`, after node_exporter's
//! `cpu`, `meminfo`, `filesystem`, `netdev` and `loadavg` collectors, and the firewall
//! counters of this host's listeners.
//!
//! A source that cannot be read (no `/proc`, a vanished interface) is left out of that
//! scrape rather than failing it.

use std::collections::BTreeMap;
use std::sync::Arc;

use procfs::{Current, CurrentSI};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// Host statistics, after node_exporter's `cpu`, `loadavg`, `meminfo`, `diskstats`,
/// `filesystem`, `netdev`, `tcpstat` and `stat` collectors, in base units (Prometheus
/// "Metric and label naming": seconds, bytes, `_total` for counters):
///
/// - `rampart_host_cpu_seconds_total{mode}` (`/proc/stat`, all CPUs);
/// - `rampart_host_load1`, `_load5`, `_load15` (`/proc/loadavg`);
/// - `rampart_host_memory_{total,free,available,buffers,cached}_bytes`,
///   `rampart_host_swap_{total,free}_bytes` (`/proc/meminfo`);
/// - per block device (`/proc/diskstats`, partitions, loop and RAM devices left out):
///   `rampart_host_disk_{reads,writes}_completed_total{device}`,
///   `rampart_host_disk_{read,written}_bytes_total{device}` (512-byte sectors, as the
///   kernel's Documentation/admin-guide/iostats.rst counts them),
///   `rampart_host_disk_{read,write,io}_time_seconds_total{device}`;
/// - per real filesystem (see [`real_filesystems`]):
///   `rampart_host_filesystem_{size,avail,free}_bytes{device,fstype,mountpoint}`
///   (`statvfs(3)`: `f_blocks`, `f_bavail`, `f_bfree` times `f_frsize`);
/// - per interface (`/proc/net/dev`):
///   `rampart_host_network_{receive,transmit}_{bytes,packets,errors,drops}_total{device}`;
/// - `rampart_host_tcp_connections{state}`, IPv4 and IPv6 sockets of the reader's network
///   namespace (`/proc/net/tcp`, `/proc/net/tcp6`);
/// - `rampart_host_procs_running`, `rampart_host_procs_blocked`, `rampart_host_forks_total`
///   (`/proc/stat`) and `rampart_host_threads` (scheduling entities, `/proc/loadavg`);
/// - this process, as the Prometheus client libraries name it ("Writing client libraries",
///   standard metrics): `process_cpu_seconds_total`, `process_resident_memory_bytes`,
///   `process_start_time_seconds`.
#[derive(Debug, Default)]
pub struct HostCollector {}

/// When this process started, Unix seconds, as node_exporter's and the Prometheus client
/// libraries' `process_start_time_seconds`: the boot time (`btime` of `/proc/stat`) plus
/// the process's `starttime` (field 22 of `/proc/self/stat`, in clock ticks since boot;
/// proc(5)): a later value tells a reader that the node restarted and its counters
/// started again from zero. Where `/proc` cannot be read, the time of the first call.
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

/// Filesystem types that hold no data of their own (node_exporter's default
/// `--collector.filesystem.fs-types-exclude`, less `overlay`, which is the root
/// filesystem of a container).
const PSEUDO_FS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "fusectl",
    "hugetlbfs",
    "iso9660",
    "mqueue",
    "nsfs",
    "proc",
    "procfs",
    "pstore",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "erofs",
    "sysfs",
    "tracefs",
    "tmpfs",
    "ramfs",
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "fuse.sshfs",
];

/// One filesystem to report: `(device, fstype, mountpoint)`.
pub type Mount = (String, String, String);

/// The real filesystems of a `/proc/mounts` listing: a device path (`/dev/…`) or the
/// root mount, not a pseudo or network filesystem ([`PSEUDO_FS`]; network filesystems are
/// left out because `statvfs` on an unreachable server blocks). A device mounted at
/// several places (bind mounts) is reported once, at its shortest mount point.
pub fn real_filesystems(mounts: &[procfs::MountEntry]) -> Vec<Mount> {
    let mut by_device: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    for m in mounts {
        let real = (m.fs_spec.starts_with("/dev/") || m.fs_file == "/")
            && !PSEUDO_FS.contains(&m.fs_vfstype.as_str());
        if !real {
            continue;
        }
        let e = by_device
            .entry(m.fs_spec.as_str())
            .or_insert((m.fs_vfstype.as_str(), m.fs_file.as_str()));
        if m.fs_file.len() < e.1.len() {
            *e = (m.fs_vfstype.as_str(), m.fs_file.as_str());
        }
    }
    by_device
        .into_iter()
        .map(|(dev, (ty, at))| (dev.to_string(), ty.to_string(), at.to_string()))
        .collect()
}

/// Whether a `/proc/diskstats` name is a whole disk worth reporting: not a partition
/// (`sda1`, `nvme0n1p1`, `vda2`), a loop, RAM, zram or floppy device (node_exporter's
/// default `--collector.diskstats.device-exclude`).
pub fn is_reported_disk(name: &str) -> bool {
    let strip = |p: &str| name.strip_prefix(p);
    if ["loop", "ram", "zram", "fd"]
        .iter()
        .any(|p| strip(p).is_some_and(|r| r.bytes().all(|b| b.is_ascii_digit())))
    {
        return false;
    }
    let digits_after = |prefix_len: usize| {
        let r = &name[prefix_len..];
        !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit())
    };
    // sda1, vdb2, hdc3, xvda1: letters after the prefix, then a partition number.
    for p in ["sd", "vd", "hd", "xvd"] {
        if let Some(r) = strip(p) {
            let letters = r.bytes().take_while(|b| b.is_ascii_lowercase()).count();
            if letters > 0 && digits_after(p.len() + letters) {
                return false;
            }
        }
    }
    // nvme0n1p1, mmcblk0p1.
    if (name.starts_with("nvme") || name.starts_with("mmcblk")) && name.contains('p') {
        if let Some(i) = name.rfind('p') {
            if i > 4 && digits_after(i + 1) {
                return false;
            }
        }
    }
    true
}

/// Label names and values of one sample.
type LabelSet<'a> = &'a [(&'a str, &'a str)];

/// Writes one family of `f64` samples: counters when `counter`, gauges otherwise.
fn family<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    counter: bool,
    samples: impl IntoIterator<Item = (LabelSet<'a>, f64)>,
) -> std::fmt::Result {
    let ty = if counter {
        MetricType::Counter
    } else {
        MetricType::Gauge
    };
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), ty)?;
    for (labels, v) in samples {
        if counter {
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        } else {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// One unlabelled sample.
fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    counter: bool,
    v: f64,
) -> std::fmt::Result {
    let ty = if counter {
        MetricType::Counter
    } else {
        MetricType::Gauge
    };
    let m = enc.encode_descriptor(name, help, unit.as_ref(), ty)?;
    if counter {
        ConstCounter::new(v).encode(m)
    } else {
        ConstGauge::new(v).encode(m)
    }
}

/// The TCP states as node_exporter's `tcpstat` collector names them.
const TCP_STATES: [(procfs::net::TcpState, &str); 11] = {
    use procfs::net::TcpState::*;
    [
        (Established, "established"),
        (SynSent, "syn_sent"),
        (SynRecv, "syn_recv"),
        (FinWait1, "fin_wait1"),
        (FinWait2, "fin_wait2"),
        (TimeWait, "time_wait"),
        (Close, "close"),
        (CloseWait, "close_wait"),
        (LastAck, "last_ack"),
        (Listen, "listen"),
        (Closing, "closing"),
    ]
};

/// How long TCP connection counts by state are reused. Reading `/proc/net/tcp` makes the
/// kernel walk its whole established-connection hash table, once per read chunk
/// (`established_get_first`): measured here at about 8 ms of CPU per scrape on an idle
/// machine, two thirds of the agent's whole cost — which is why node_exporter ships its
/// tcpstat collector disabled. Refreshed at most this often, the counts cost a per-second
/// push about 1/15 of that.
pub const TCP_STATES_REFRESH: std::time::Duration = std::time::Duration::from_secs(15);

/// Counts of IPv4 and IPv6 TCP sockets per [`TCP_STATES`] entry, read at most every
/// [`TCP_STATES_REFRESH`] (shared by every collector of the process: one host per
/// process); `None` when neither `/proc/net/tcp` nor `/proc/net/tcp6` can be read.
fn tcp_state_counts() -> Option<[u64; TCP_STATES.len()]> {
    type Cached = Option<(std::time::Instant, [u64; TCP_STATES.len()])>;
    static CACHE: std::sync::Mutex<Cached> = std::sync::Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, counts)) = *cache {
        if at.elapsed() < TCP_STATES_REFRESH {
            return Some(counts);
        }
    }
    let v4 = procfs::net::tcp();
    let v6 = procfs::net::tcp6();
    if v4.is_err() && v6.is_err() {
        return None;
    }
    let mut counts = [0u64; TCP_STATES.len()];
    for e in v4.iter().chain(v6.iter()).flatten() {
        if let Some(i) = TCP_STATES.iter().position(|(s, _)| *s == e.state) {
            counts[i] += 1;
        }
    }
    *cache = Some((std::time::Instant::now(), counts));
    Some(counts)
}

impl HostCollector {
    fn process(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        single(
            enc,
            "process_start_time",
            "Start time of the node process since the Unix epoch.",
            Some(Unit::Seconds),
            false,
            process_start_time(),
        )?;
        if let Ok(stat) = procfs::process::Process::myself().and_then(|p| p.stat()) {
            let ticks = procfs::ticks_per_second().max(1) as f64;
            single(
                enc,
                "process_cpu",
                "User and system CPU time this process spent (/proc/self/stat utime + stime).",
                Some(Unit::Seconds),
                true,
                (stat.utime + stat.stime) as f64 / ticks,
            )?;
            single(
                enc,
                "process_resident_memory",
                "Resident set size of this process (/proc/self/stat rss times the page size).",
                Some(Unit::Bytes),
                false,
                (stat.rss * procfs::page_size()) as f64,
            )?;
        }
        Ok(())
    }

    fn cpu_and_procs(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let Ok(stats) = procfs::KernelStats::current() else {
            return Ok(());
        };
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
        let labels: Vec<([(&str, &str); 1], f64)> = modes
            .iter()
            .filter_map(|(mode, ms)| ms.map(|ms| ([("mode", *mode)], ms as f64 / 1000.0)))
            .collect();
        family(
            enc,
            "rampart_host_cpu",
            "Seconds the CPUs spent in each mode (/proc/stat).",
            Some(Unit::Seconds),
            true,
            labels.iter().map(|(l, v)| (&l[..], *v)),
        )?;
        if let Some(n) = stats.procs_running {
            single(
                enc,
                "rampart_host_procs_running",
                "Threads running or ready to run (procs_running of /proc/stat).",
                None,
                false,
                f64::from(n),
            )?;
        }
        if let Some(n) = stats.procs_blocked {
            single(
                enc,
                "rampart_host_procs_blocked",
                "Threads blocked waiting for I/O (procs_blocked of /proc/stat).",
                None,
                false,
                f64::from(n),
            )?;
        }
        single(
            enc,
            "rampart_host_forks",
            "Processes and threads created since boot (processes of /proc/stat).",
            None,
            true,
            stats.processes as f64,
        )
    }

    fn memory(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let Ok(mem) = procfs::Meminfo::current() else {
            return Ok(());
        };
        let mut rows = vec![
            (
                "rampart_host_memory_total",
                "Usable RAM (MemTotal of /proc/meminfo).",
                mem.mem_total,
            ),
            (
                "rampart_host_memory_free",
                "Unused RAM (MemFree).",
                mem.mem_free,
            ),
            (
                "rampart_host_memory_buffers",
                "RAM in block device buffers (Buffers).",
                mem.buffers,
            ),
            (
                "rampart_host_memory_cached",
                "RAM in the page cache (Cached).",
                mem.cached,
            ),
            (
                "rampart_host_swap_total",
                "Swap space (SwapTotal).",
                mem.swap_total,
            ),
            (
                "rampart_host_swap_free",
                "Unused swap space (SwapFree).",
                mem.swap_free,
            ),
        ];
        if let Some(avail) = mem.mem_available {
            rows.push((
                "rampart_host_memory_available",
                "Memory available to new programs without swapping (MemAvailable).",
                avail,
            ));
        }
        for (name, help, v) in rows {
            single(enc, name, help, Some(Unit::Bytes), false, v as f64)?;
        }
        Ok(())
    }

    fn disks(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let Ok(disks) = procfs::diskstats() else {
            return Ok(());
        };
        let disks: Vec<_> = disks
            .into_iter()
            .filter(|d| is_reported_disk(&d.name))
            .map(|d| (escape(&d.name), d))
            .collect();
        type Field = fn(&procfs::DiskStat) -> f64;
        let rows: [(&str, &str, Option<Unit>, Field); 7] = [
            (
                "rampart_host_disk_reads_completed",
                "Reads completed per block device (/proc/diskstats).",
                None,
                |d| d.reads as f64,
            ),
            (
                "rampart_host_disk_writes_completed",
                "Writes completed per block device (/proc/diskstats).",
                None,
                |d| d.writes as f64,
            ),
            (
                "rampart_host_disk_read",
                "Bytes read per block device (sectors of 512 bytes).",
                Some(Unit::Bytes),
                |d| d.sectors_read as f64 * 512.0,
            ),
            (
                "rampart_host_disk_written",
                "Bytes written per block device (sectors of 512 bytes).",
                Some(Unit::Bytes),
                |d| d.sectors_written as f64 * 512.0,
            ),
            (
                "rampart_host_disk_read_time",
                "Time spent on reads per block device.",
                Some(Unit::Seconds),
                |d| d.time_reading as f64 / 1000.0,
            ),
            (
                "rampart_host_disk_write_time",
                "Time spent on writes per block device.",
                Some(Unit::Seconds),
                |d| d.time_writing as f64 / 1000.0,
            ),
            (
                "rampart_host_disk_io_time",
                "Time the block device had I/O in progress (its utilisation over time).",
                Some(Unit::Seconds),
                |d| d.time_in_progress as f64 / 1000.0,
            ),
        ];
        for (name, help, unit, field) in rows {
            let samples: Vec<([(&str, &str); 1], f64)> = disks
                .iter()
                .map(|(dev, d)| ([("device", dev.as_str())], field(d)))
                .collect();
            family(
                enc,
                name,
                help,
                unit,
                true,
                samples.iter().map(|(l, v)| (&l[..], *v)),
            )?;
        }
        Ok(())
    }

    fn filesystems(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let Ok(mounts) = procfs::mounts() else {
            return Ok(());
        };
        let mut rows: Vec<([String; 3], [f64; 3])> = Vec::new();
        for (dev, ty, at) in real_filesystems(&mounts) {
            let Ok(vfs) = nix::sys::statvfs::statvfs(at.as_str()) else {
                continue;
            };
            let frag = vfs.fragment_size() as f64;
            rows.push((
                [escape(&dev), escape(&ty), escape(&at)],
                [
                    vfs.blocks() as f64 * frag,
                    vfs.blocks_available() as f64 * frag,
                    vfs.blocks_free() as f64 * frag,
                ],
            ));
        }
        let help = [
            (
                "rampart_host_filesystem_size",
                "Size of each real filesystem (statvfs f_blocks).",
            ),
            (
                "rampart_host_filesystem_avail",
                "Bytes available to unprivileged users per filesystem (f_bavail).",
            ),
            (
                "rampart_host_filesystem_free",
                "Free bytes per filesystem, root's reserve included (f_bfree).",
            ),
        ];
        for (i, (name, help)) in help.into_iter().enumerate() {
            let samples: Vec<([(&str, &str); 3], f64)> = rows
                .iter()
                .map(|(l, v)| {
                    (
                        [
                            ("device", l[0].as_str()),
                            ("fstype", l[1].as_str()),
                            ("mountpoint", l[2].as_str()),
                        ],
                        v[i],
                    )
                })
                .collect();
            family(
                enc,
                name,
                help,
                Some(Unit::Bytes),
                false,
                samples.iter().map(|(l, v)| (&l[..], *v)),
            )?;
        }
        Ok(())
    }

    fn network(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let Ok(devs) = procfs::net::dev_status() else {
            return Ok(());
        };
        let devs: BTreeMap<String, _> = devs.into_iter().map(|(k, v)| (escape(&k), v)).collect();
        type Field = fn(&procfs::net::DeviceStatus) -> u64;
        let rows: [(&str, &str, Option<Unit>, Field); 8] = [
            (
                "rampart_host_network_receive",
                "Bytes received per interface (/proc/net/dev).",
                Some(Unit::Bytes),
                |d| d.recv_bytes,
            ),
            (
                "rampart_host_network_transmit",
                "Bytes sent per interface (/proc/net/dev).",
                Some(Unit::Bytes),
                |d| d.sent_bytes,
            ),
            (
                "rampart_host_network_receive_packets",
                "Packets received per interface.",
                None,
                |d| d.recv_packets,
            ),
            (
                "rampart_host_network_transmit_packets",
                "Packets sent per interface.",
                None,
                |d| d.sent_packets,
            ),
            (
                "rampart_host_network_receive_errors",
                "Receive errors per interface.",
                None,
                |d| d.recv_errs,
            ),
            (
                "rampart_host_network_transmit_errors",
                "Transmit errors per interface.",
                None,
                |d| d.sent_errs,
            ),
            (
                "rampart_host_network_receive_drops",
                "Received packets dropped per interface.",
                None,
                |d| d.recv_drop,
            ),
            (
                "rampart_host_network_transmit_drops",
                "Packets dropped on transmit per interface.",
                None,
                |d| d.sent_drop,
            ),
        ];
        for (name, help, unit, field) in rows {
            let samples: Vec<([(&str, &str); 1], f64)> = devs
                .iter()
                .map(|(dev, d)| ([("device", dev.as_str())], field(d) as f64))
                .collect();
            family(
                enc,
                name,
                help,
                unit,
                true,
                samples.iter().map(|(l, v)| (&l[..], *v)),
            )?;
        }
        Ok(())
    }

    fn tcp(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let Some(counts) = tcp_state_counts() else {
            return Ok(());
        };
        let samples: Vec<([(&str, &str); 1], f64)> = TCP_STATES
            .iter()
            .zip(counts)
            .map(|((_, name), n)| ([("state", *name)], n as f64))
            .collect();
        family(
            enc,
            "rampart_host_tcp_connections",
            "TCP sockets by state, IPv4 and IPv6 (/proc/net/tcp, /proc/net/tcp6; read at most every 15 s).",
            None,
            false,
            samples.iter().map(|(l, v)| (&l[..], *v)),
        )
    }

    fn load(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let Ok(load) = procfs::LoadAverage::current() else {
            return Ok(());
        };
        for (name, v) in [
            ("rampart_host_load1", load.one),
            ("rampart_host_load5", load.five),
            ("rampart_host_load15", load.fifteen),
        ] {
            single(
                enc,
                name,
                "System load average (/proc/loadavg).",
                None,
                false,
                f64::from(v),
            )?;
        }
        single(
            enc,
            "rampart_host_threads",
            "Scheduling entities (processes and threads) that exist (/proc/loadavg).",
            None,
            false,
            f64::from(load.max),
        )
    }
}

impl Collector for HostCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.process(&mut enc)?;
        self.cpu_and_procs(&mut enc)?;
        self.load(&mut enc)?;
        self.memory(&mut enc)?;
        self.disks(&mut enc)?;
        self.filesystems(&mut enc)?;
        self.network(&mut enc)?;
        self.tcp(&mut enc)
    }
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

/// Where [`CertificateCollector`] finds certificates.
#[derive(Clone)]
pub enum CertSource {
    /// A PEM file whose first certificate is the one served; read again when the file's
    /// modification time changes (a renewed certificate replaces the file).
    File {
        /// The `role` label: which role serves it (`node` for a host's own certificate,
        /// served by every internal listener of the node; `ca` for the internal CA).
        role: String,
        /// The `certificate` label.
        certificate: String,
        /// The PEM file.
        path: std::path::PathBuf,
    },
    /// A role's own list of the certificates it serves now, as `(name, not-after Unix
    /// seconds)` (the load balancer's SNI certificates, which a reload replaces).
    Live {
        /// The `role` label.
        role: String,
        /// Read at every collection; must not block.
        read: Arc<dyn Fn() -> Vec<(String, f64)> + Send + Sync>,
    },
}

impl std::fmt::Debug for CertSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertSource::File {
                role,
                certificate,
                path,
            } => write!(f, "File({role}, {certificate}, {})", path.display()),
            CertSource::Live { role, .. } => write!(f, "Live({role})"),
        }
    }
}

/// The end of the validity of the certificates this host's roles serve:
/// `rampart_tls_certificate_not_after_timestamp_seconds{role, certificate}`, Unix seconds
/// (the X.509 `notAfter`, RFC 5280 §4.1.2.5), as the Prometheus convention for
/// timestamps (`_timestamp_seconds`) and like blackbox_exporter's
/// `probe_ssl_earliest_cert_expiry`. The built-in rule CertificateExpiring compares it
/// with `time()`.
///
/// A file that cannot be read or parsed is left out of that collection (and retried at
/// the next).
#[derive(Debug, Default)]
pub struct CertificateCollector {
    sources: Vec<CertSource>,
    /// Per file: its modification time and not-after when last read.
    cache: std::sync::Mutex<BTreeMap<std::path::PathBuf, (std::time::SystemTime, f64)>>,
}

impl CertificateCollector {
    /// A collector over `sources`.
    pub fn new(sources: Vec<CertSource>) -> CertificateCollector {
        CertificateCollector {
            sources,
            cache: Default::default(),
        }
    }

    fn file_not_after(&self, path: &std::path::Path) -> Option<f64> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = cache.get(path) {
            if *at == modified {
                return Some(*v);
            }
        }
        let v = not_after(path)?;
        cache.insert(path.to_path_buf(), (modified, v));
        Some(v)
    }
}

/// The `notAfter` of the first certificate in the PEM file `path`, Unix seconds.
pub fn not_after(path: &std::path::Path) -> Option<f64> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let certs = pki::load_certs(path).ok()?;
    let (_, cert) = X509Certificate::from_der(certs.first()?.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp() as f64)
}

impl Collector for CertificateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut rows: BTreeMap<(String, String), f64> = BTreeMap::new();
        for s in &self.sources {
            match s {
                CertSource::File {
                    role,
                    certificate,
                    path,
                } => {
                    if let Some(v) = self.file_not_after(path) {
                        rows.insert((escape(role), escape(certificate)), v);
                    }
                }
                CertSource::Live { role, read } => {
                    for (name, v) in read() {
                        rows.insert((escape(role), escape(&name)), v);
                    }
                }
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let mut m = enc.encode_descriptor(
            "rampart_tls_certificate_not_after_timestamp",
            "End of the validity (X.509 notAfter) of a certificate a role serves, Unix time.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for ((role, certificate), v) in &rows {
            ConstGauge::new(*v).encode(m.encode_family(&[
                ("role", role.as_str()),
                ("certificate", certificate.as_str()),
            ])?)?;
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

    /// Writes a self-signed certificate for `name` valid until `days` from now to
    /// `dir/stem.pem`; returns the file and its not-after, Unix seconds.
    fn short_lived(
        dir: &std::path::Path,
        stem: &str,
        name: &str,
        days: i64,
    ) -> (std::path::PathBuf, f64) {
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
        let after = params.not_after.unix_timestamp() as f64;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{stem}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        (path, after)
    }

    /// The certificate series from a file (read again once the file is replaced) and from
    /// a role's live list; unreadable files are left out.
    #[test]
    fn certificate_expiry_series() {
        let dir = tempfile::tempdir().unwrap();
        let (host, host_after) = short_lived(dir.path(), "web-01", "web-01", 2);
        let live = Arc::new(std::sync::Mutex::new(vec![(
            "www.foobar.com".to_string(),
            1_900_000_000.0,
        )]));
        let read = {
            let live = live.clone();
            Arc::new(move || live.lock().unwrap().clone())
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(CertificateCollector::new(vec![
            CertSource::File {
                role: "node".into(),
                certificate: "host/web-01".into(),
                path: host.clone(),
            },
            CertSource::File {
                role: "ca".into(),
                certificate: "missing".into(),
                path: dir.path().join("missing.pem"),
            },
            CertSource::Live {
                role: "lb".into(),
                read,
            },
        ])));
        let scrape = || {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            let samples = crate::exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            samples
                .into_iter()
                .filter(|s| s.name == "rampart_tls_certificate_not_after_timestamp_seconds")
                .map(|s| (s.labels, s.value))
                .collect::<Vec<_>>()
        };
        let l = |role: &str, cert: &str| {
            vec![
                ("certificate".to_string(), cert.to_string()),
                ("role".to_string(), role.to_string()),
            ]
        };
        let mut got = scrape();
        got.iter_mut().for_each(|(labels, _)| labels.sort());
        assert_eq!(
            got,
            [
                (l("lb", "www.foobar.com"), 1_900_000_000.0),
                (l("node", "host/web-01"), host_after)
            ]
        );
        // A renewed certificate (the file replaced) and a reloaded load balancer.
        let (_, renewed_after) = short_lived(dir.path(), "web-01", "web-01", 90);
        // A later modification time, whatever the file system's time resolution.
        std::fs::File::options()
            .write(true)
            .open(&host)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(10))
            .unwrap();
        live.lock().unwrap()[0].1 = 1_950_000_000.0;
        let got = scrape();
        assert!(got.iter().any(|(_, v)| *v == renewed_after), "{got:?}");
        assert!(got.iter().any(|(_, v)| *v == 1_950_000_000.0), "{got:?}");
        assert!(renewed_after > host_after + 80.0 * 86_400.0);
    }

    #[test]
    fn collectors_emit_parseable_text() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(HostCollector::default()));
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
        // The root filesystem is always a real one.
        assert!(find("rampart_host_filesystem_size_bytes")
            .any(|s| s.labels.contains(&("mountpoint".into(), "/".into())) && s.value > 0.0));
        assert!(find("rampart_host_tcp_connections").any(|s| s.labels[0].1 == "listen"));
        assert!(find("rampart_host_network_receive_packets_total").any(|s| s.labels[0].1 == "lo"));
        assert_eq!(find("rampart_host_swap_total_bytes").count(), 1);
        assert_eq!(find("rampart_host_procs_running").count(), 1);
        assert!(find("process_cpu_seconds_total").all(|s| s.value >= 0.0));
        assert!(find("process_resident_memory_bytes").any(|s| s.value > 1e5));
        assert!(find("rampart_host_network_receive_bytes_total").any(|s| s.labels[0].1 == "lo"));
        assert_eq!(find("rampart_host_load1").count(), 1);
        // The node's start time, which tells a reader that the node restarted.
        let started: Vec<_> = find("process_start_time_seconds").collect();
        assert_eq!(started.len(), 1);
        assert!(started[0].labels.is_empty());
        assert!(started[0].value > 0.0 && started[0].value <= crate::unix_now() + 1.0);
        let refused: Vec<_> = find("rampart_firewall_connections_total")
            .filter(|s| s.labels.contains(&("verdict".into(), "refused".into())))
            .collect();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].value, 2.0);
    }

    #[test]
    fn disks_and_filesystems_are_chosen_like_node_exporter() {
        for d in ["sda", "vda", "nvme0n1", "mmcblk0", "xvdb", "dm-0", "md0"] {
            assert!(is_reported_disk(d), "{d}");
        }
        for d in [
            "sda1",
            "vda15",
            "nvme0n1p2",
            "mmcblk0p1",
            "loop3",
            "ram0",
            "zram0",
            "xvda1",
        ] {
            assert!(!is_reported_disk(d), "{d}");
        }
        let m = |spec: &str, file: &str, ty: &str| procfs::MountEntry {
            fs_spec: spec.into(),
            fs_file: file.into(),
            fs_vfstype: ty.into(),
            fs_mntops: Default::default(),
            fs_freq: 0,
            fs_passno: 0,
        };
        let mounts = [
            m("proc", "/proc", "proc"),
            m("overlay", "/", "overlay"),
            m("/dev/vda1", "/etc/hosts", "ext4"),
            m("/dev/vda1", "/data", "ext4"),
            m("tmpfs", "/run", "tmpfs"),
            m("/dev/vdb", "/srv", "xfs"),
            m("server:/x", "/mnt/nfs", "nfs4"),
        ];
        assert_eq!(
            real_filesystems(&mounts),
            [
                ("/dev/vda1".into(), "ext4".into(), "/data".into()),
                ("/dev/vdb".into(), "xfs".into(), "/srv".into()),
                ("overlay".into(), "overlay".into(), "/".into()),
            ]
        );
    }

    /// `promtool check metrics` (the Prometheus project's linter: naming, units, help
    /// text) accepts what the agent serves to a client asking for the classic text
    /// format.
    #[test]
    fn promtool_accepts_the_host_metrics() {
        let Some(promtool) = test_support::find_binary("promtool") else {
            test_support::skip("promtool is not installed (apt-get install prometheus)");
            return;
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(HostCollector::default()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let text = crate::negotiate::to_text_004(&text);
        let (ok, report) = promtool_check_metrics(&promtool, &text);
        assert!(ok, "promtool check metrics failed:\n{report}\n{text}");
    }

    /// Runs `promtool check metrics` on `text` (on its stdin): whether it passed, and what
    /// it printed.
    pub(crate) fn promtool_check_metrics(promtool: &std::path::Path, text: &str) -> (bool, String) {
        use std::io::Write;
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), report)
    }
}
