//! What the Prometheus metrics read of the LBs at scrape time (`stage_lb_backends`,
//! `stage_lb_failovers_total`, docs/metrics.md): every LB of every controller open in this
//! process, with its backends counted by their last polled state. Reads the controller's
//! state under its locks, starts nothing.

use super::{lock, registry};

/// The states `stage_lb_backends` always reports (0 when none), so a series does not vanish
/// when its last backend leaves it. Other HAProxy words (`nolb`, ...) appear when seen.
pub const STATES: [&str; 5] = ["up", "down", "maint", "drain", "unknown"];

/// One LB as the metrics see it.
#[derive(Debug, Clone, PartialEq)]
pub struct LbSample {
    pub lb: String,
    /// Backends by state (lowercase HAProxy word: `up`, `down`, `maint`, `drain`, `unknown`
    /// before the first poll), every one of [`STATES`] present.
    pub backends: Vec<(String, u64)>,
    /// HAProxy processes replaced after a crash (fail-overs).
    pub failovers: u64,
    pub reloads: u64,
}

/// Every LB of every open controller, by name.
pub fn samples() -> Vec<LbSample> {
    let controllers: Vec<_> = lock(registry()).values().cloned().collect();
    let mut out = Vec::new();
    for c in controllers {
        let lbs: Vec<_> = lock(&c.inner.lbs).values().cloned().collect();
        for lb in lbs {
            let st = lock(&lb.st);
            if st.deleted {
                continue;
            }
            let mut backends: Vec<(String, u64)> = STATES.iter().map(|s| (s.to_string(), 0)).collect();
            for b in &st.spec.backends {
                let word = st
                    .servers
                    .get(&b.address)
                    .map(|v| v.state.to_ascii_lowercase())
                    .filter(|w| !w.is_empty())
                    .unwrap_or_else(|| "unknown".into());
                match backends.iter_mut().find(|(s, _)| *s == word) {
                    Some((_, n)) => *n += 1,
                    None => backends.push((word, 1)),
                }
            }
            out.push(LbSample {
                lb: st.spec.name.clone(),
                backends,
                failovers: st.failovers,
                reloads: st.reloads,
            });
        }
    }
    out.sort_by(|a, b| a.lb.cmp(&b.lb));
    out.dedup_by(|a, b| a.lb == b.lb);
    out
}
