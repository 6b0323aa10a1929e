//! `GET /metrics`: the backend's numbers ([`MetricsSnapshot`]) rendered as Prometheus
//! (OpenMetrics) text with `prometheus-client`.
//!
//! A fresh registry is built for every scrape from the snapshot, so there is no global metric
//! state and tests never reason in deltas.

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicU64;

/// The content type of the rendered text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Memory figures of one host NUMA node, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeMetrics {
    /// NUMA node id.
    pub node: u32,
    /// Pool memory on the node.
    pub total_bytes: u64,
    /// Free pool memory.
    pub free_bytes: u64,
    /// Guest RAM assigned to VMs.
    pub assigned_bytes: u64,
    /// Resident unmovable memory.
    pub resident_unmovable_bytes: u64,
    /// Resident movable memory.
    pub resident_movable_bytes: u64,
    /// Resident reclaimable memory.
    pub resident_reclaimable_bytes: u64,
    /// Order-9 fragmentation index (0..=1).
    pub fragmentation_index: f64,
    /// Share of resident memory backed by THP (0..=1).
    pub thp_share: f64,
}

/// A named monotonically increasing counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedCounter {
    /// Name (becomes the `event` label), e.g. `alloc`, `free`, `thp_fallback`.
    pub name: String,
    /// Value.
    pub value: u64,
}

/// Per-VM figures, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMetrics {
    /// VM id.
    pub id: String,
    /// State name (`running`, ...).
    pub state: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Boot RAM.
    pub boot_bytes: u64,
    /// Total plugged RAM.
    pub plugged_bytes: u64,
    /// Total requested RAM.
    pub requested_bytes: u64,
    /// Resident host memory.
    pub resident_bytes: u64,
    /// Memory reported free by the guest and discarded.
    pub reported_bytes: u64,
    /// Memory held by the balloon.
    pub ballooned_bytes: u64,
    /// Discarded memory touched again.
    pub refaulted_bytes: u64,
    /// vCPU exits, by reason (`io`, `mmio`, `hlt`, ...).
    pub exits: Vec<NamedCounter>,
}

/// Counters of one device of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMetrics {
    /// VM id.
    pub vm: String,
    /// Device name, e.g. `virtio-mem`, `virtio-balloon`.
    pub device: String,
    /// Event counters (`plug_requests`, `reports`, ...).
    pub counters: Vec<NamedCounter>,
}

/// One histogram bucket: number of observations in (previous bound, `le_ns`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramBucket {
    /// Upper bound in nanoseconds; `f64::INFINITY` for the last bucket.
    pub le_ns: f64,
    /// Observations in this bucket (not cumulative).
    pub count: u64,
}

/// A latency histogram (as sampled by the pool's monitor).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// Buckets in increasing `le_ns` order.
    pub buckets: Vec<HistogramBucket>,
    /// Sum of observations in nanoseconds.
    pub sum_ns: f64,
    /// Number of observations.
    pub count: u64,
}

/// A counter with arbitrary labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabeledCounter {
    /// Label pairs, in order.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: u64,
}

/// Counters of one reclaim phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReclaimPhaseMetrics {
    /// Phase name (`reported`, `balloon`, `drop_clean`, `swap_out`, `split_huge`).
    pub phase: String,
    /// Target calls.
    pub calls: u64,
    /// Calls that reclaimed or requested something.
    pub runs: u64,
    /// Bytes reclaimed at once.
    pub reclaimed_bytes: u64,
    /// Bytes requested from guests (balloon, hinting).
    pub requested_bytes: u64,
    /// Time spent, seconds.
    pub seconds: f64,
    /// Calls answered "unsupported".
    pub unsupported: u64,
    /// Calls that failed.
    pub errors: u64,
}

/// Watermark state of one reclaim domain (`budget`, `node0`, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatermarkMetrics {
    /// Domain name.
    pub domain: String,
    /// Domain size.
    pub total_bytes: u64,
    /// Free memory.
    pub free_bytes: u64,
    /// Min watermark.
    pub min_bytes: u64,
    /// Low watermark.
    pub low_bytes: u64,
    /// High watermark.
    pub high_bytes: u64,
    /// Level name (`min`, `low`, `normal`, `high`).
    pub level: String,
    /// Whether the domain is reclaiming.
    pub reclaiming: bool,
}

/// Reclaim engine figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReclaimMetrics {
    /// Runs by trigger (`watermark`, `psi`, `alloc_failure`).
    pub runs: Vec<NamedCounter>,
    /// Urgent runs (below min).
    pub urgent_runs: u64,
    /// Bytes given back to guests (balloon deflated) after pressure went away.
    #[serde(default)]
    pub released_bytes: u64,
    /// Per phase.
    pub phases: Vec<ReclaimPhaseMetrics>,
    /// Per domain.
    pub watermarks: Vec<WatermarkMetrics>,
    /// PSI `some avg10` (percent), when readable.
    pub psi_some_avg10: Option<f64>,
    /// PSI `full avg10` (percent), when readable.
    pub psi_full_avg10: Option<f64>,
}

/// Everything `GET /metrics` shows, as plain numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// Pool figures per host node.
    pub nodes: Vec<NodeMetrics>,
    /// Pool event counters (`alloc`, `free`, `alloc_failure`, `thp_fallback`, `compaction`, ...).
    pub pool_events: Vec<NamedCounter>,
    /// Per-VM figures.
    pub vms: Vec<VmMetrics>,
    /// Per-device counters.
    pub devices: Vec<DeviceMetrics>,
    /// Allocation latency of the pool.
    pub alloc_latency: LatencyHistogram,
    /// Monitor triggers by action (`compact`, `reclaim`, `rebalance`).
    #[serde(default)]
    pub monitor_triggers: Vec<NamedCounter>,
    /// Monitor action results, labelled `action` and `outcome`.
    #[serde(default)]
    pub monitor_actions: Vec<LabeledCounter>,
    /// Reclaim engine figures, when the engine runs.
    #[serde(default)]
    pub reclaim: Option<ReclaimMetrics>,
    /// The daemon's swap file, once created.
    #[serde(default)]
    pub swap: Option<SwapMetrics>,
}

/// Figures of the daemon's swap file (all VMs together).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapMetrics {
    /// Capacity.
    pub capacity_bytes: u64,
    /// Slots in use now.
    pub used_bytes: u64,
    /// Bytes written (swap-out).
    pub bytes_written: u64,
    /// Bytes read (swap-in).
    pub bytes_read: u64,
    /// Write calls.
    pub writes: u64,
    /// Read calls.
    pub reads: u64,
    /// Clusters written (runs of contiguous pages, one write each).
    pub clusters: u64,
    /// Failed writes.
    pub write_errors: u64,
    /// Failed or short reads.
    pub read_errors: u64,
    /// Times writes became throttled (congestion back-off).
    pub throttle_events: u64,
    /// Whether writes are throttled now.
    pub congested: bool,
}

type Labels = Vec<(String, String)>;

/// A histogram whose numbers come from a snapshot instead of `observe()` calls.
#[derive(Debug)]
struct SnapshotHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl SnapshotHistogram {
    fn from_latency(h: &LatencyHistogram) -> Self {
        // Latencies are exported in seconds (Prometheus base unit).
        let mut buckets: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .map(|b| {
                let le = if b.le_ns.is_finite() {
                    b.le_ns / 1e9
                } else {
                    f64::MAX
                };
                (le, b.count)
            })
            .collect();
        let in_buckets: u64 = h.buckets.iter().map(|b| b.count).sum();
        if buckets.last().map(|b| b.0) != Some(f64::MAX) {
            // Ensure a +Inf bucket so that the buckets add up to `count`.
            buckets.push((f64::MAX, h.count.saturating_sub(in_buckets)));
        }
        SnapshotHistogram {
            sum: if h.sum_ns.is_finite() {
                h.sum_ns / 1e9
            } else {
                0.0
            },
            count: h.count.max(in_buckets),
            buckets,
        }
    }
}

impl EncodeMetric for SnapshotHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn clean_f64(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

/// The value of the first sample line of `text` (as [`render`] writes it) that starts with
/// `prefix`: the metric's name and its labels in the order `render` writes them, e.g.
/// `tidepool_device_events_total{vm="vm-1",device="virtio-mem",event="plug_acked"} `.
pub fn sample_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Renders a snapshot as OpenMetrics text.
pub fn render(s: &MetricsSnapshot) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("tidepool");

    let node_bytes = Family::<Labels, Gauge>::default();
    let node_frag = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let node_thp = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for n in &s.nodes {
        let node = n.node.to_string();
        for (kind, v) in [
            ("total", n.total_bytes),
            ("free", n.free_bytes),
            ("assigned", n.assigned_bytes),
            ("resident_unmovable", n.resident_unmovable_bytes),
            ("resident_movable", n.resident_movable_bytes),
            ("resident_reclaimable", n.resident_reclaimable_bytes),
        ] {
            node_bytes
                .get_or_create(&labels(&[("node", &node), ("kind", kind)]))
                .set(to_i64(v));
        }
        node_frag
            .get_or_create(&labels(&[("node", &node)]))
            .set(clean_f64(n.fragmentation_index));
        node_thp
            .get_or_create(&labels(&[("node", &node)]))
            .set(clean_f64(n.thp_share));
    }
    reg.register_with_unit(
        "pool_memory",
        "Pool memory per host node, by kind",
        Unit::Bytes,
        node_bytes,
    );
    reg.register(
        "pool_fragmentation_index",
        "Order-9 fragmentation index per node (0 = none, 1 = fully fragmented)",
        node_frag,
    );
    reg.register(
        "pool_thp_share",
        "Share of resident memory backed by transparent huge pages per node",
        node_thp,
    );

    let pool_events = Family::<Labels, Counter>::default();
    for c in &s.pool_events {
        pool_events
            .get_or_create(&labels(&[("event", &c.name)]))
            .inc_by(c.value);
    }
    reg.register("pool_events", "Pool allocator events", pool_events);

    let vm_mem = Family::<Labels, Gauge>::default();
    let vm_vcpus = Family::<Labels, Gauge>::default();
    let vm_state = Family::<Labels, Gauge>::default();
    let vm_exits = Family::<Labels, Counter>::default();
    for vm in &s.vms {
        for (kind, v) in [
            ("boot", vm.boot_bytes),
            ("plugged", vm.plugged_bytes),
            ("requested", vm.requested_bytes),
            ("resident", vm.resident_bytes),
            ("reported", vm.reported_bytes),
            ("ballooned", vm.ballooned_bytes),
            ("refaulted", vm.refaulted_bytes),
        ] {
            vm_mem
                .get_or_create(&labels(&[("vm", &vm.id), ("kind", kind)]))
                .set(to_i64(v));
        }
        vm_vcpus
            .get_or_create(&labels(&[("vm", &vm.id)]))
            .set(i64::from(vm.vcpus));
        vm_state
            .get_or_create(&labels(&[("vm", &vm.id), ("state", &vm.state)]))
            .set(1);
        for e in &vm.exits {
            vm_exits
                .get_or_create(&labels(&[("vm", &vm.id), ("reason", &e.name)]))
                .inc_by(e.value);
        }
    }
    reg.register_with_unit(
        "vm_memory",
        "Guest memory per VM, by kind",
        Unit::Bytes,
        vm_mem,
    );
    reg.register("vm_vcpus", "vCPUs per VM", vm_vcpus);
    reg.register("vm_state", "VM state (1 for the current state)", vm_state);
    reg.register("vm_exits", "vCPU exits per VM, by reason", vm_exits);

    let dev = Family::<Labels, Counter>::default();
    for d in &s.devices {
        for c in &d.counters {
            dev.get_or_create(&labels(&[
                ("vm", &d.vm),
                ("device", &d.device),
                ("event", &c.name),
            ]))
            .inc_by(c.value);
        }
    }
    reg.register("device_events", "Device events per VM and device", dev);

    reg.register_with_unit(
        "pool_alloc_latency",
        "Sampled allocation latency of the pool",
        Unit::Seconds,
        SnapshotHistogram::from_latency(&s.alloc_latency),
    );

    render_monitor(&mut reg, s);
    if let Some(r) = &s.reclaim {
        render_reclaim(&mut reg, r);
    }
    if let Some(w) = &s.swap {
        render_swap(&mut reg, w);
    }

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

fn render_swap(reg: &mut Registry, w: &SwapMetrics) {
    let size = Family::<Labels, Gauge>::default();
    for (kind, v) in [("capacity", w.capacity_bytes), ("used", w.used_bytes)] {
        size.get_or_create(&labels(&[("kind", kind)]))
            .set(i64::try_from(v).unwrap_or(i64::MAX));
    }
    reg.register_with_unit(
        "swap_file",
        "The swap file: capacity and slots in use",
        Unit::Bytes,
        size,
    );
    let io = Family::<Labels, Counter>::default();
    for (dir, v) in [("write", w.bytes_written), ("read", w.bytes_read)] {
        io.get_or_create(&labels(&[("dir", dir)])).inc_by(v);
    }
    reg.register_with_unit(
        "swap_io",
        "Bytes moved to and from the swap file",
        Unit::Bytes,
        io,
    );
    let ops = Family::<Labels, Counter>::default();
    for (op, v) in [
        ("write", w.writes),
        ("read", w.reads),
        ("cluster", w.clusters),
        ("write_error", w.write_errors),
        ("read_error", w.read_errors),
        ("throttle", w.throttle_events),
    ] {
        ops.get_or_create(&labels(&[("op", op)])).inc_by(v);
    }
    reg.register("swap_ops", "Swap file operations and events", ops);
    let congested: Gauge = Gauge::default();
    congested.set(i64::from(w.congested));
    reg.register(
        "swap_congested",
        "1 while swap writes are throttled",
        congested,
    );
}

fn render_monitor(reg: &mut Registry, s: &MetricsSnapshot) {
    let triggers = Family::<Labels, Counter>::default();
    for c in &s.monitor_triggers {
        triggers
            .get_or_create(&labels(&[("action", &c.name)]))
            .inc_by(c.value);
    }
    reg.register(
        "monitor_triggers",
        "Actions the pool monitor triggered (compact, reclaim, rebalance)",
        triggers,
    );
    let actions = Family::<Labels, Counter>::default();
    for c in &s.monitor_actions {
        actions.get_or_create(&c.labels).inc_by(c.value);
    }
    reg.register(
        "monitor_actions",
        "Results of the monitor's actions, by action and outcome",
        actions,
    );
}

fn render_reclaim(reg: &mut Registry, r: &ReclaimMetrics) {
    let runs = Family::<Labels, Counter>::default();
    for c in &r.runs {
        runs.get_or_create(&labels(&[("trigger", &c.name)]))
            .inc_by(c.value);
    }
    reg.register("reclaim_runs", "Reclaim engine runs by trigger", runs);
    let urgent: Counter = Counter::default();
    urgent.inc_by(r.urgent_runs);
    reg.register(
        "reclaim_urgent_runs",
        "Reclaim runs below the min watermark",
        urgent,
    );
    let released: Counter = Counter::default();
    released.inc_by(r.released_bytes);
    reg.register_with_unit(
        "reclaim_released",
        "Memory given back to guests (balloons deflated) after pressure went away",
        Unit::Bytes,
        released,
    );

    let bytes = Family::<Labels, Counter>::default();
    let calls = Family::<Labels, Counter>::default();
    let prun = Family::<Labels, Counter>::default();
    let secs = Family::<Labels, Counter<f64, AtomicU64>>::default();
    for p in &r.phases {
        let ph = p.phase.as_str();
        for (kind, v) in [
            ("reclaimed", p.reclaimed_bytes),
            ("requested", p.requested_bytes),
        ] {
            bytes
                .get_or_create(&labels(&[("phase", ph), ("kind", kind)]))
                .inc_by(v);
        }
        let ok = p.calls.saturating_sub(p.unsupported + p.errors);
        for (result, v) in [
            ("ok", ok),
            ("unsupported", p.unsupported),
            ("error", p.errors),
        ] {
            calls
                .get_or_create(&labels(&[("phase", ph), ("result", result)]))
                .inc_by(v);
        }
        prun.get_or_create(&labels(&[("phase", ph)])).inc_by(p.runs);
        secs.get_or_create(&labels(&[("phase", ph)]))
            .inc_by(clean_f64(p.seconds).max(0.0));
    }
    reg.register_with_unit(
        "reclaim_phase",
        "Bytes taken back per reclaim phase (reclaimed now, or requested from the guest)",
        Unit::Bytes,
        bytes,
    );
    reg.register(
        "reclaim_phase_runs",
        "Reclaim phase calls that reclaimed or requested memory",
        prun,
    );
    reg.register(
        "reclaim_phase_calls",
        "Reclaim phase calls by result",
        calls,
    );
    reg.register_with_unit(
        "reclaim_phase_time",
        "Time spent in each reclaim phase",
        Unit::Seconds,
        secs,
    );

    let marks = Family::<Labels, Gauge>::default();
    let state = Family::<Labels, Gauge>::default();
    for w in &r.watermarks {
        let d = w.domain.as_str();
        for (mark, v) in [
            ("total", w.total_bytes),
            ("free", w.free_bytes),
            ("min", w.min_bytes),
            ("low", w.low_bytes),
            ("high", w.high_bytes),
        ] {
            marks
                .get_or_create(&labels(&[("domain", d), ("mark", mark)]))
                .set(to_i64(v));
        }
        state
            .get_or_create(&labels(&[
                ("domain", d),
                ("level", &w.level),
                ("reclaiming", if w.reclaiming { "true" } else { "false" }),
            ]))
            .set(1);
    }
    reg.register_with_unit(
        "reclaim_watermark",
        "Free memory and watermarks per reclaim domain (budget, nodeN)",
        Unit::Bytes,
        marks,
    );
    reg.register(
        "reclaim_watermark_state",
        "Watermark level and reclaiming flag per domain (1 for the current state)",
        state,
    );
    let psi = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for (kind, v) in [("some", r.psi_some_avg10), ("full", r.psi_full_avg10)] {
        if let Some(v) = v {
            psi.get_or_create(&labels(&[("kind", kind), ("window", "avg10")]))
                .set(clean_f64(v));
        }
    }
    reg.register(
        "host_memory_pressure",
        "Host memory PSI (percent of time stalled)",
        psi,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MetricsSnapshot {
        MetricsSnapshot {
            nodes: vec![NodeMetrics {
                node: 0,
                total_bytes: 1 << 30,
                free_bytes: 1 << 29,
                fragmentation_index: 0.25,
                thp_share: 0.5,
                ..Default::default()
            }],
            pool_events: vec![NamedCounter {
                name: "alloc".into(),
                value: 7,
            }],
            vms: vec![VmMetrics {
                id: "vm-1".into(),
                state: "running".into(),
                vcpus: 2,
                boot_bytes: 256 << 20,
                exits: vec![NamedCounter {
                    name: "mmio".into(),
                    value: 3,
                }],
                ..Default::default()
            }],
            devices: vec![DeviceMetrics {
                vm: "vm-1".into(),
                device: "virtio-mem".into(),
                counters: vec![NamedCounter {
                    name: "plug_requests".into(),
                    value: 5,
                }],
            }],
            alloc_latency: LatencyHistogram {
                buckets: vec![
                    HistogramBucket {
                        le_ns: 100.0,
                        count: 3,
                    },
                    HistogramBucket {
                        le_ns: 1000.0,
                        count: 1,
                    },
                ],
                sum_ns: 900.0,
                count: 5,
            },
            monitor_triggers: vec![NamedCounter {
                name: "compact".into(),
                value: 2,
            }],
            monitor_actions: vec![LabeledCounter {
                labels: vec![
                    ("action".into(), "rebalance".into()),
                    ("outcome".into(), "done".into()),
                ],
                value: 1,
            }],
            reclaim: Some(ReclaimMetrics {
                runs: vec![NamedCounter {
                    name: "watermark".into(),
                    value: 3,
                }],
                urgent_runs: 1,
                released_bytes: 4096,
                phases: vec![ReclaimPhaseMetrics {
                    phase: "split_huge".into(),
                    calls: 4,
                    runs: 2,
                    reclaimed_bytes: 1 << 20,
                    seconds: 0.5,
                    unsupported: 1,
                    ..Default::default()
                }],
                watermarks: vec![WatermarkMetrics {
                    domain: "budget".into(),
                    total_bytes: 1 << 30,
                    free_bytes: 1 << 20,
                    level: "min".into(),
                    reclaiming: true,
                    ..Default::default()
                }],
                psi_some_avg10: Some(12.5),
                psi_full_avg10: None,
            }),
            swap: Some(SwapMetrics {
                capacity_bytes: 1 << 30,
                used_bytes: 8192,
                bytes_written: 12288,
                bytes_read: 4096,
                writes: 2,
                reads: 1,
                clusters: 2,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn renders_every_section() {
        let text = render(&sample()).unwrap_or_default();
        for needle in [
            "tidepool_pool_memory_bytes{node=\"0\",kind=\"total\"} 1073741824",
            "tidepool_pool_fragmentation_index{node=\"0\"} 0.25",
            "tidepool_pool_events_total{event=\"alloc\"} 7",
            "tidepool_swap_file_bytes{kind=\"used\"} 8192",
            "tidepool_swap_io_bytes_total{dir=\"read\"} 4096",
            "tidepool_swap_ops_total{op=\"cluster\"} 2",
            "tidepool_swap_congested 0",
            "tidepool_vm_memory_bytes{vm=\"vm-1\",kind=\"boot\"} 268435456",
            "tidepool_vm_vcpus{vm=\"vm-1\"} 2",
            "tidepool_vm_exits_total{vm=\"vm-1\",reason=\"mmio\"} 3",
            "tidepool_device_events_total{vm=\"vm-1\",device=\"virtio-mem\",event=\"plug_requests\"} 5",
            "tidepool_pool_alloc_latency_seconds_count 5",
            "tidepool_pool_alloc_latency_seconds_bucket{le=\"+Inf\"} 5",
            "tidepool_monitor_triggers_total{action=\"compact\"} 2",
            "tidepool_monitor_actions_total{action=\"rebalance\",outcome=\"done\"} 1",
            "tidepool_reclaim_runs_total{trigger=\"watermark\"} 3",
            "tidepool_reclaim_urgent_runs_total 1",
            "tidepool_reclaim_released_bytes_total 4096",
            "tidepool_reclaim_phase_bytes_total{phase=\"split_huge\",kind=\"reclaimed\"} 1048576",
            "tidepool_reclaim_phase_runs_total{phase=\"split_huge\"} 2",
            "tidepool_reclaim_phase_calls_total{phase=\"split_huge\",result=\"ok\"} 3",
            "tidepool_reclaim_phase_calls_total{phase=\"split_huge\",result=\"unsupported\"} 1",
            "tidepool_reclaim_phase_time_seconds_total{phase=\"split_huge\"} 0.5",
            "tidepool_reclaim_watermark_bytes{domain=\"budget\",mark=\"free\"} 1048576",
            "tidepool_reclaim_watermark_state{domain=\"budget\",level=\"min\",reclaiming=\"true\"} 1",
            "tidepool_host_memory_pressure{kind=\"some\",window=\"avg10\"} 12.5",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_complete() {
        let h = SnapshotHistogram::from_latency(&sample().alloc_latency);
        assert_eq!(h.count, 5);
        assert_eq!(h.buckets.len(), 3);
        assert_eq!(h.buckets[2], (f64::MAX, 1));
        let text = render(&sample()).unwrap_or_default();
        assert!(
            text.contains("tidepool_pool_alloc_latency_seconds_bucket{le=\"0.000001\"} 4"),
            "{text}"
        );
    }

    #[test]
    fn sample_values_are_read_back_from_the_rendered_text() {
        let text = render(&sample()).unwrap_or_default();
        let dev = |vm: &str, event: &str| {
            format!(
                "tidepool_device_events_total{{vm=\"{vm}\",device=\"virtio-mem\",event=\"{event}\"}} "
            )
        };
        assert_eq!(
            sample_value(&text, &dev("vm-1", "plug_requests")),
            Some(5.0)
        );
        assert_eq!(sample_value(&text, &dev("vm-2", "plug_requests")), None);
        assert_eq!(sample_value(&text, &dev("vm-1", "no_such_event")), None);
        assert_eq!(
            sample_value(
                &text,
                "tidepool_reclaim_phase_time_seconds_total{phase=\"split_huge\"} "
            ),
            Some(0.5)
        );
    }

    #[test]
    fn empty_snapshot_renders() {
        let text = render(&MetricsSnapshot::default()).unwrap_or_default();
        assert!(text.ends_with("# EOF\n"));
    }
}
