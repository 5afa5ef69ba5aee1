//! The `#metrics` endpoint: `GET /metrics` on its own thread, over `net::http`.

use super::Metrics;
use crate::net::http::{self as nhttp, Body, Handler, HandlerFuture, Request, ServerThread};
use http::{HeaderValue, Method, Response, StatusCode};
use std::rc::Rc;
use std::sync::Arc;

/// The content type of the OpenMetrics exposition (what Prometheus asks for first).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic text format (curl, `promtool check metrics`, older scrapers).
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `metrics` on `addr` (`host:port`); an address that cannot be bound is an error
/// naming it.
pub fn spawn(addr: &str, metrics: Arc<Metrics>) -> anyhow::Result<ServerThread> {
    let sa = crate::net::sock::parse_addr(addr).map_err(|e| anyhow::anyhow!("#metrics: {e}"))?;
    let listener = std::net::TcpListener::bind(sa)
        .map_err(|e| anyhow::anyhow!("#metrics: cannot listen on {sa}: {e}"))?;
    let t = nhttp::spawn_thread(
        "metrics",
        listener,
        nhttp::Limits::default(),
        move || -> Handler {
            Rc::new(move |req: Request| -> HandlerFuture {
                let m = metrics.clone();
                Box::pin(async move { Ok(reply(&m, &req)) })
            })
        },
    )?;
    log::info!("metrics on http://{}/metrics", t.addr);
    Ok(t)
}

fn reply(m: &Metrics, req: &Request) -> nhttp::Reply {
    if req.parts.uri.path() != "/metrics" {
        return nhttp::text(StatusCode::NOT_FOUND, "not found: the metrics are at /metrics\n");
    }
    if req.parts.method != Method::GET && req.parts.method != Method::HEAD {
        return nhttp::text(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n");
    }
    let open_metrics = req.parts.headers.get_all(http::header::ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.contains("application/openmetrics-text"))
    });
    let (body, ct) = if open_metrics {
        (m.encode(), OPENMETRICS)
    } else {
        (to_text_format(&m.encode()), TEXT)
    };
    let mut r = Response::new(Body::full(body));
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

/// OpenMetrics text → the classic text format 0.0.4: a counter's HELP and TYPE name its
/// samples' `_total` name, and the `# EOF` / `# UNIT` lines go. Sample lines are the same.
pub fn to_text_format(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 64 * counters.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = meta {
            let name = rest.split(' ').next().unwrap_or("");
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_get_their_total_name_in_the_text_format() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{x=\"1\"} 3\n# HELP g G.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            super::to_text_format(om),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 3\n# HELP g G.\n# TYPE g gauge\ng 1\n"
        );
    }
}
