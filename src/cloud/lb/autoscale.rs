//! Target-tracking autoscaling policy, pure (time is passed in): the recommendation is
//! `ceil(ready × metric / target)` clamped to `[min, max]`, skipped within a 10 % tolerance
//! (Kubernetes HPA); scale-out at once, then not again before the cooldown; scale-in only to
//! the highest recommendation seen during the stabilisation window, one backend per step, and
//! never below `min` healthy backends. A provider failure backs off exponentially (1 s, 2 s, …,
//! 60 s) before the next attempt.

use super::Autoscale;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Hold,
    /// Add this many backends through the provider.
    Out(usize),
    /// Remove one provider-created backend.
    In,
}

/// The policy's memory for one LB.
#[derive(Debug, Default)]
pub struct Scaler {
    last_out: Option<Instant>,
    window: VecDeque<(Instant, usize)>,
    retry_at: Option<Instant>,
    failures: u32,
}

/// What the controller observed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Backends the LB has (any state).
    pub total: usize,
    /// Backends UP.
    pub ready: usize,
    /// The metric summed over the backend (sessions, requests/s or queued requests).
    pub load: f64,
}

/// The tolerance around the target within which nothing changes.
pub const TOLERANCE: f64 = 0.1;
const BACKOFF_MAX: Duration = Duration::from_secs(60);

impl Scaler {
    pub fn new() -> Scaler {
        Scaler::default()
    }

    /// The desired backend count for an observation, before cooldown and stabilisation.
    pub fn recommend(cfg: &Autoscale, obs: Observation) -> usize {
        let ready = obs.ready.max(1) as f64;
        let per = obs.load / ready;
        let ratio = per / cfg.target;
        let desired = if (ratio - 1.0).abs() <= TOLERANCE {
            obs.ready.max(1)
        } else {
            (ready * ratio).ceil() as usize
        };
        desired.clamp(cfg.min.max(1), cfg.max)
    }

    /// Decides what to do at `now`.
    pub fn decide(&mut self, cfg: &Autoscale, obs: Observation, now: Instant) -> Decision {
        if let Some(t) = self.retry_at {
            if now < t {
                return Decision::Hold;
            }
        }
        let desired = Scaler::recommend(cfg, obs);
        let window = Duration::from_secs_f64(cfg.stabilization);
        self.window.push_back((now, desired));
        while let Some(&(t, _)) = self.window.front() {
            if now.duration_since(t) > window {
                self.window.pop_front();
            } else {
                break;
            }
        }
        // Below min (e.g. backends removed by hand): back to min regardless of load.
        if obs.total < cfg.min {
            return self.out(cfg, cfg.min - obs.total, now);
        }
        if desired > obs.total {
            return self.out(cfg, desired - obs.total, now);
        }
        let highest = self.window.iter().map(|&(_, d)| d).max().unwrap_or(desired);
        // The window must be full (a recommendation at least `window` old is in it) before
        // scaling in: a controller that just started has no history yet.
        let covered = self
            .window
            .front()
            .map(|&(t, _)| {
                now.duration_since(t) + Duration::from_secs_f64(cfg.period.min(cfg.stabilization)) >= window
            })
            .unwrap_or(false);
        if highest < obs.total && covered && obs.total > cfg.min && obs.ready > cfg.min {
            return Decision::In;
        }
        Decision::Hold
    }

    fn out(&mut self, cfg: &Autoscale, n: usize, now: Instant) -> Decision {
        if let Some(t) = self.last_out {
            if now.duration_since(t) < Duration::from_secs_f64(cfg.cooldown) {
                return Decision::Hold;
            }
        }
        Decision::Out(n)
    }

    /// A scale-out happened (starts the cooldown); a scale-in happened (restarts the window, so
    /// the next step down waits a full window again).
    pub fn done(&mut self, d: Decision, now: Instant) {
        self.failures = 0;
        self.retry_at = None;
        match d {
            Decision::Out(_) => self.last_out = Some(now),
            Decision::In => self.window.clear(),
            Decision::Hold => {}
        }
    }

    /// The provider failed: returns the delay before the next attempt.
    pub fn failed(&mut self, now: Instant) -> Duration {
        self.failures += 1;
        let d = Duration::from_secs(1 << self.failures.saturating_sub(1).min(6)).min(BACKOFF_MAX);
        self.retry_at = Some(now + d);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::lb::Metric;

    fn cfg() -> Autoscale {
        Autoscale {
            min: 2,
            max: 5,
            metric: Metric::SessionsPerBackend,
            target: 10.0,
            cooldown: 5.0,
            stabilization: 10.0,
            period: 1.0,
            provider: None,
            warmup: 0.0,
        }
    }

    fn obs(total: usize, load: f64) -> Observation {
        Observation {
            total,
            ready: total,
            load,
        }
    }

    #[test]
    fn recommendation_tracks_the_target() {
        let c = cfg();
        assert_eq!(Scaler::recommend(&c, obs(2, 20.0)), 2); // at target
        assert_eq!(Scaler::recommend(&c, obs(2, 21.0)), 2); // within tolerance
        assert_eq!(Scaler::recommend(&c, obs(2, 40.0)), 4);
        assert_eq!(Scaler::recommend(&c, obs(2, 400.0)), 5); // max
        assert_eq!(Scaler::recommend(&c, obs(4, 0.0)), 2); // min
    }

    #[test]
    fn scale_out_respects_cooldown_and_scale_in_the_window() {
        let c = cfg();
        let mut s = Scaler::new();
        let t0 = Instant::now();
        assert_eq!(s.decide(&c, obs(2, 40.0), t0), Decision::Out(2));
        s.done(Decision::Out(2), t0);
        // Still loaded but within the cooldown: hold.
        assert_eq!(
            s.decide(&c, obs(4, 80.0), t0 + Duration::from_secs(2)),
            Decision::Hold
        );
        assert_eq!(
            s.decide(&c, obs(4, 80.0), t0 + Duration::from_secs(6)),
            Decision::Out(1)
        );
        s.done(Decision::Out(1), t0 + Duration::from_secs(6));
        // Load falls: no scale-in until the high recommendations leave the window.
        let mut t = t0 + Duration::from_secs(7);
        let mut first_in = None;
        for _ in 0..20 {
            if s.decide(&c, obs(5, 0.0), t) == Decision::In {
                first_in = Some(t);
                break;
            }
            t += Duration::from_secs(1);
        }
        let first_in = first_in.expect("scales in eventually");
        assert!(first_in >= t0 + Duration::from_secs(16), "{:?}", first_in - t0);
        s.done(Decision::In, first_in);
        // Never below min.
        let mut s = Scaler::new();
        for i in 0..30 {
            assert_ne!(
                s.decide(&c, obs(2, 0.0), t0 + Duration::from_secs(i)),
                Decision::In
            );
        }
    }

    #[test]
    fn failures_back_off() {
        let c = cfg();
        let mut s = Scaler::new();
        let t0 = Instant::now();
        assert_eq!(s.failed(t0), Duration::from_secs(1));
        assert_eq!(
            s.decide(&c, obs(2, 40.0), t0 + Duration::from_millis(500)),
            Decision::Hold
        );
        assert_eq!(s.failed(t0 + Duration::from_secs(1)), Duration::from_secs(2));
        assert_eq!(s.failed(t0 + Duration::from_secs(3)), Duration::from_secs(4));
        assert_eq!(
            s.decide(&c, obs(2, 40.0), t0 + Duration::from_secs(8)),
            Decision::Out(2)
        );
    }
}
