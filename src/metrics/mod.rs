//! Prometheus metrics of a node (`#metrics`), on `prometheus-client`: the instruments the
//! hot paths hold (plain atomic counters resolved once per connection or listener, labelled
//! per instance so that two instance threads never share a cache line), the values sampled
//! at scrape time (queue depth, drops, cluster members: read from their owners, nothing to
//! update on the way), and the text exposition. Every metric is listed in docs/metrics.md.
//! Plain Rust, no Lua.

pub mod serve;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};

/// Sums by sample name ([`Metrics::totals`]).
pub type Totals = std::collections::BTreeMap<String, f64>;

/// Label pairs of one series (`[("port", "8801"), ("instance", "stage#0")]`).
pub type Labels = Vec<(&'static str, String)>;

/// Request latency buckets, seconds: 100 µs to about 6.5 s.
const LATENCY_BUCKETS: [f64; 17] = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

fn latency() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// One value read at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: Labels,
    pub value: f64,
}

/// A gauge or counter whose values are read at scrape time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampledKind {
    Gauge,
    Counter,
}

/// A metric family read at scrape time: its name (without `_total`), help and samples.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: SampledKind,
    pub samples: Vec<Sample>,
}

/// What reads the sampled families at scrape time (set by the node that owns the router
/// and the cluster).
pub type Sampler = Box<dyn Fn() -> Vec<Sampled> + Send + Sync>;

/// The instruments of one node.
pub struct Metrics {
    registry: Registry,
    sampler: Arc<OnceLock<Sampler>>,
    /// `stage_connections{port,instance}`: open broker connections.
    pub connections: Family<Labels, Gauge>,
    /// `stage_connections_accepted_total{port,instance}`.
    pub accepted: Family<Labels, Counter>,
    /// `stage_frames_received_total{port,instance}`.
    pub frames_in: Family<Labels, Counter>,
    /// `stage_frames_sent_total{port,instance}`.
    pub frames_out: Family<Labels, Counter>,
    /// `stage_received_bytes_total{port,instance}`.
    pub bytes_in: Family<Labels, Counter>,
    /// `stage_sent_bytes_total{port,instance}`.
    pub bytes_out: Family<Labels, Counter>,
    /// `stage_handler_errors_total{instance}`: script errors in callbacks and handlers.
    pub handler_errors: Family<Labels, Counter>,
    /// `stage_http_request_duration_seconds{port,instance}`.
    pub http_latency: HistogramFamily,
    /// `stage_script_reloads_total{instance,result}`.
    pub reloads: Family<Labels, Counter>,
    /// `stage_admin_requests_total{method,status}`.
    pub admin_requests: Family<Labels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The query instruments of one ODBC pool (`db::Pool` holds them; encoded at scrape time as
/// `stage_odbc_query_duration_seconds` and `stage_odbc_query_errors_total`).
#[derive(Debug, Clone)]
pub struct QueryStats {
    latency: Histogram,
    errors: Counter,
}

impl Default for QueryStats {
    fn default() -> Self {
        QueryStats {
            latency: latency(),
            errors: Counter::default(),
        }
    }
}

impl QueryStats {
    /// One statement that took `took`, failed unless `ok` (a failed one counts in both).
    pub fn observe(&self, took: std::time::Duration, ok: bool) {
        self.latency.observe(took.as_secs_f64());
        if !ok {
            self.errors.inc();
        }
    }
}

/// A family read at scrape time from each `T`: name, help, and how to read a value.
type Read<T, V> = (&'static str, &'static str, fn(&T) -> V);

/// What the process holds outside a node, read at scrape time: the ODBC pools (one per
/// connection string, shared by the instances) and the LBs of the open controllers.
#[derive(Debug)]
struct ProcessCollector;

impl ProcessCollector {
    fn odbc(encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pools = crate::db::Pool::all();
        if pools.is_empty() {
            return Ok(());
        }
        // Two connection strings may share a label (a password apart): numbered then.
        let mut seen = std::collections::HashMap::<&str, usize>::new();
        let labels: Vec<Labels> = pools
            .iter()
            .map(|p| {
                let n = seen.entry(p.spec.label.as_str()).or_insert(0);
                *n += 1;
                let name = match *n {
                    1 => p.spec.label.clone(),
                    n => format!("{} ({n})", p.spec.label),
                };
                vec![("name", name)]
            })
            .collect();
        let gauges: [Read<crate::db::Pool, f64>; 4] = [
            (
                "odbc_pool_size",
                "Connections an ODBC pool may hold checked out at once",
                |p| p.size as f64,
            ),
            (
                "odbc_pool_in_use",
                "ODBC connections checked out now (open adapters)",
                |p| p.in_use() as f64,
            ),
            (
                "odbc_pool_idle",
                "ODBC connections idle in the pool, ready for reuse",
                |p| p.idle_count() as f64,
            ),
            (
                "odbc_pool_waiting",
                "odbc.new calls waiting for a free pooled connection",
                |p| p.waiting() as f64,
            ),
        ];
        for (name, help, f) in gauges {
            let mut me =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0.0f64).metric_type())?;
            for (p, l) in pools.iter().zip(&labels) {
                ConstGauge::new(f(p)).encode(me.encode_family(l)?)?;
            }
        }
        let proto = ConstCounter::new(0.0f64);
        let mut me = encoder.encode_descriptor(
            "odbc_connections_opened",
            "ODBC connections opened by a pool (reconnects included)",
            None,
            proto.metric_type(),
        )?;
        for (p, l) in pools.iter().zip(&labels) {
            ConstCounter::new(p.opened() as f64).encode(me.encode_family(l)?)?;
        }
        let mut me = encoder.encode_descriptor(
            "odbc_query_duration_seconds",
            "Time an ODBC statement took on its connection, its rows read, per pool",
            None,
            latency().metric_type(),
        )?;
        for (p, l) in pools.iter().zip(&labels) {
            p.queries.latency.encode(me.encode_family(l)?)?;
        }
        let mut me = encoder.encode_descriptor(
            "odbc_query_errors",
            "ODBC statements that failed, per pool",
            None,
            proto.metric_type(),
        )?;
        for (p, l) in pools.iter().zip(&labels) {
            p.queries.errors.encode(me.encode_family(l)?)?;
        }
        Ok(())
    }

    fn lb(encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let lbs = crate::cloud::lb::controller::metrics::samples();
        if lbs.is_empty() {
            return Ok(());
        }
        let mut me = encoder.encode_descriptor(
            "lb_backends",
            "Backends of an LB by their HAProxy state (up, down, maint, drain, unknown)",
            None,
            ConstGauge::new(0.0f64).metric_type(),
        )?;
        for lb in &lbs {
            for (state, n) in &lb.backends {
                let l: Labels = vec![("lb", lb.lb.clone()), ("state", state.clone())];
                ConstGauge::new(*n as f64).encode(me.encode_family(&l)?)?;
            }
        }
        let counters: [Read<crate::cloud::lb::controller::metrics::LbSample, u64>; 2] = [
            (
                "lb_failovers",
                "Crashed HAProxy processes of an LB replaced (fail-overs)",
                |s| s.failovers,
            ),
            ("lb_reloads", "Configuration reloads of an LB's HAProxy", |s| {
                s.reloads
            }),
        ];
        for (name, help, f) in counters {
            let mut me =
                encoder.encode_descriptor(name, help, None, ConstCounter::new(0.0f64).metric_type())?;
            for lb in &lbs {
                let l: Labels = vec![("lb", lb.lb.clone())];
                ConstCounter::new(f(lb) as f64).encode(me.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        ProcessCollector::odbc(&mut encoder)?;
        ProcessCollector::lb(&mut encoder)
    }
}

/// The scrape-time families, as a `prometheus-client` collector.
struct SampledCollector(Arc<OnceLock<Sampler>>);

impl std::fmt::Debug for SampledCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SampledCollector")
    }
}

impl prometheus_client::collector::Collector for SampledCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(sampler) = self.0.get() else {
            return Ok(());
        };
        for fam in sampler() {
            match fam.kind {
                SampledKind::Gauge => {
                    let proto = ConstGauge::new(0.0f64);
                    let mut me = encoder.encode_descriptor(fam.name, fam.help, None, proto.metric_type())?;
                    for s in &fam.samples {
                        ConstGauge::new(s.value).encode(me.encode_family(&s.labels)?)?;
                    }
                }
                SampledKind::Counter => {
                    let proto = ConstCounter::new(0.0f64);
                    let mut me = encoder.encode_descriptor(fam.name, fam.help, None, proto.metric_type())?;
                    for s in &fam.samples {
                        ConstCounter::new(s.value).encode(me.encode_family(&s.labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("stage");
        let m = Metrics {
            sampler: Arc::new(OnceLock::new()),
            connections: Family::default(),
            accepted: Family::default(),
            frames_in: Family::default(),
            frames_out: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            handler_errors: Family::default(),
            http_latency: Family::new_with_constructor(latency),
            reloads: Family::default(),
            admin_requests: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open broker connections per listening port and instance",
            m.connections.clone(),
        );
        registry.register(
            "connections_accepted",
            "Broker connections accepted per listening port and instance",
            m.accepted.clone(),
        );
        registry.register(
            "frames_received",
            "Frames received on broker connections per listening port and instance",
            m.frames_in.clone(),
        );
        registry.register(
            "frames_sent",
            "Frames queued for sending on broker connections per listening port and instance",
            m.frames_out.clone(),
        );
        registry.register(
            "received_bytes",
            "Bytes read from broker connections per listening port and instance",
            m.bytes_in.clone(),
        );
        registry.register(
            "sent_bytes",
            "Bytes written to broker connections per listening port and instance",
            m.bytes_out.clone(),
        );
        registry.register(
            "handler_errors",
            "Script errors in callbacks, receive functions and message handlers per instance",
            m.handler_errors.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a complete HTTP request to its response per listening port and instance",
            m.http_latency.clone(),
        );
        registry.register(
            "script_reloads",
            "Scripts loaded again after a change per instance, by result (ok, failed)",
            m.reloads.clone(),
        );
        registry.register(
            "admin_requests",
            "Requests to the admin API by method and status",
            m.admin_requests.clone(),
        );
        registry.register_collector(Box::new(SampledCollector(m.sampler.clone())));
        registry.register_collector(Box::new(ProcessCollector));
        Metrics { registry, ..m }
    }

    /// Sets what is read at scrape time (once; later calls are ignored).
    pub fn set_sampler(&self, s: Sampler) {
        let _ = self.sampler.set(s);
    }

    /// The counters of one accepted connection on `port` served by `instance`; counts the
    /// connection as open until the returned value is dropped.
    pub fn connection(&self, port: u16, instance: &str) -> ConnMetrics {
        let l: Labels = vec![("port", port.to_string()), ("instance", instance.to_string())];
        let open = self.connections.get_or_create(&l).clone();
        open.inc();
        self.accepted.get_or_create(&l).inc();
        ConnMetrics {
            open,
            frames_in: self.frames_in.get_or_create(&l).clone(),
            frames_out: self.frames_out.get_or_create(&l).clone(),
            bytes_in: self.bytes_in.get_or_create(&l).clone(),
            bytes_out: self.bytes_out.get_or_create(&l).clone(),
        }
    }

    /// The latency histogram of HTTP listener `port` of `instance`.
    pub fn http(&self, port: u16, instance: &str) -> Histogram {
        let l: Labels = vec![("port", port.to_string()), ("instance", instance.to_string())];
        self.http_latency.get_or_create(&l).clone()
    }

    /// One script error in `instance`.
    pub fn handler_error(&self, instance: &str) {
        self.handler_errors
            .get_or_create(&vec![("instance", instance.to_string())])
            .inc();
    }

    /// A script of `instance` was loaded again after a change.
    pub fn reload(&self, instance: &str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create(&vec![
                ("instance", instance.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
    }

    /// Instance `instance` stopped at run time: its series labelled by the instance alone
    /// (script errors, reloads) leave the exposition. Its numbers are never reused, so
    /// nothing else would update them; series of its connections and HTTP listeners stay
    /// as they ended (their gauges at 0 once the state closed its sockets).
    pub fn forget_instance(&self, instance: &str) {
        self.handler_errors
            .remove(&vec![("instance", instance.to_string())]);
        for result in ["ok", "failed"] {
            self.reloads.remove(&vec![
                ("instance", instance.to_string()),
                ("result", result.to_string()),
            ]);
        }
    }

    /// Every series summed over its labels, by sample name (`stage_frames_received_total`
    /// → total): what the admin page shows. Read from the exposition, at most once a second.
    pub fn totals(&self) -> std::collections::BTreeMap<String, f64> {
        self.summary().0
    }

    /// [`Metrics::totals`], and beside it the series that carry an `instance` label summed
    /// per instance (`"web#0"` → `stage_frames_received_total` → sum over its ports): the
    /// admin page's per-instance figures. One pass over the exposition.
    pub fn summary(&self) -> (Totals, std::collections::BTreeMap<String, Totals>) {
        let mut totals = Totals::new();
        let mut per = std::collections::BTreeMap::<String, Totals>::new();
        for line in self.encode().lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            *totals.entry(name.to_string()).or_insert(0.0) += v;
            // Histogram buckets would only repeat `_count`.
            if name.ends_with("_bucket") {
                continue;
            }
            if let Some(inst) = line
                .split_once("instance=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(i, _)| i)
            {
                *per.entry(inst.to_string())
                    .or_default()
                    .entry(name.to_string())
                    .or_insert(0.0) += v;
            }
        }
        (totals, per)
    }

    /// The text exposition (OpenMetrics text, which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(8192);
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("writing to a String");
        s
    }
}

/// The instruments of one broker connection: each update is one relaxed atomic add on a
/// counter of this port and instance only.
pub struct ConnMetrics {
    open: Gauge,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        self.open.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_counts() {
        let m = Metrics::new();
        let c = m.connection(8801, "stage#0");
        c.frames_in.inc_by(3);
        c.bytes_out.inc_by(100);
        m.handler_error("stage#1");
        m.reload("stage#0", false);
        m.http(8080, "web#2").observe(0.003);
        m.set_sampler(Box::new(|| {
            vec![Sampled {
                name: "queue_depth",
                help: "Messages waiting",
                kind: SampledKind::Gauge,
                samples: vec![Sample {
                    labels: vec![("instance", "db#1".into())],
                    value: 7.0,
                }],
            }]
        }));
        let t = m.encode();
        for want in [
            "stage_connections{port=\"8801\",instance=\"stage#0\"} 1",
            "stage_frames_received_total{port=\"8801\",instance=\"stage#0\"} 3",
            "stage_sent_bytes_total{port=\"8801\",instance=\"stage#0\"} 100",
            "stage_handler_errors_total{instance=\"stage#1\"} 1",
            "stage_script_reloads_total{instance=\"stage#0\",result=\"failed\"} 1",
            "stage_http_request_duration_seconds_count{port=\"8080\",instance=\"web#2\"} 1",
            "stage_queue_depth{instance=\"db#1\"} 7",
            "# EOF",
        ] {
            assert!(t.contains(want), "missing {want} in\n{t}");
        }
        assert_eq!(m.totals().get("stage_frames_received_total"), Some(&3.0));
        let (_, per) = m.summary();
        assert_eq!(per["stage#0"]["stage_frames_received_total"], 3.0);
        assert_eq!(per["stage#1"]["stage_handler_errors_total"], 1.0);
        assert_eq!(per["db#1"]["stage_queue_depth"], 7.0);
        assert!(!per["web#2"].contains_key("stage_http_request_duration_seconds_bucket"));
        drop(c);
        assert!(m
            .encode()
            .contains("stage_connections{port=\"8801\",instance=\"stage#0\"} 0"));
    }
}
