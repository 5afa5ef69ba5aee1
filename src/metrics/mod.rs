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

    /// Every series summed over its labels, by sample name (`stage_frames_received_total`
    /// → total): what the admin page shows. Read from the exposition, at most once a second.
    pub fn totals(&self) -> std::collections::BTreeMap<String, f64> {
        let mut out = std::collections::BTreeMap::new();
        for line in self.encode().lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *out.entry(name.to_string()).or_insert(0.0) += v;
            }
        }
        out
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
        drop(c);
        assert!(m
            .encode()
            .contains("stage_connections{port=\"8801\",instance=\"stage#0\"} 0"));
    }
}
