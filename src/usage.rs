//! The periodic USAGE line: CPU user/system seconds and resident memory of the process.

/// CPU seconds (user, system) and RSS in kB of this process.
pub fn sample() -> (f64, f64, u64) {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    (secs(ru.ru_utime), secs(ru.ru_stime), rss)
}

/// `USAGE <pid>: CPU user 0.012s, sys 0.004s, RSS 8780 kB`.
pub fn line() -> String {
    let (user, sys, rss) = sample();
    format!(
        "USAGE {}: CPU user {user:.3}s, sys {sys:.3}s, RSS {rss} kB",
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_reports_memory() {
        let (_, _, rss) = super::sample();
        assert!(rss > 0);
        assert!(super::line().starts_with("USAGE "));
    }
}
