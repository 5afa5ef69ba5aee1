//! The HAProxy driver: finding the binary, validating a config with `haproxy -c`, starting a
//! master-worker process in the background (`-W -D`), seamless reload (server state dumped,
//! then SIGUSR2 to the master, confirmed by a new worker pid), stopping, and the runtime API
//! client over the admin unix socket (`show stat`, `show servers state`, `add server`, …).
//! Everything here blocks; the controller calls it from its own threads.

use super::render::Paths;
use super::{LbError, Result};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The haproxy binary: `$STAGE_HAPROXY`, else `haproxy` on the PATH, else /usr/sbin/haproxy.
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("STAGE_HAPROXY") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]) {
        let p = dir.join("haproxy");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(LbError::Failed(
        "haproxy is not installed (scripts/setup installs Debian's haproxy; or set STAGE_HAPROXY)".into(),
    ))
}

/// `haproxy -c -f <config>`: Ok, or HAProxy's own error lines.
pub fn validate(bin: &Path, config: &Path) -> Result<()> {
    let out = Command::new(bin)
        .arg("-c")
        .arg("-f")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LbError::Failed(format!("cannot run {}: {e}", bin.display())))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    Err(LbError::Rejected(format!(
        "haproxy -c rejected the config: {}",
        alerts(&text)
    )))
}

/// HAProxy's ALERT lines without their prefixes (`[ALERT] (pid) : config : `), the summary
/// lines dropped when there is a specific one.
pub fn alerts(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ALERT"))
        .map(|l| l.split_once("] ").map(|(_, r)| r).unwrap_or(l).trim())
        .map(|l| l.split_once(") : ").map(|(_, r)| r).unwrap_or(l))
        .map(|l| l.trim_start_matches("config : ").trim())
        .collect();
    let specific: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("Error(s) found") && !l.starts_with("Fatal errors"))
        .collect();
    match (specific.is_empty(), lines.is_empty()) {
        (false, _) => specific.join("; "),
        (true, false) => lines.join("; "),
        (true, true) => text.trim().to_string(),
    }
}

/// Whether a process exists (signal 0).
pub fn alive(pid: i32) -> bool {
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// Whether `pid` is a zombie or gone (a child we started and nobody reaped shows as alive
/// to `kill(0)`, so /proc is read as well).
pub fn running(pid: i32) -> bool {
    if !alive(pid) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// The master pid from the pid file, if it names a running process.
pub fn read_pid(pidfile: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    running(pid).then_some(pid)
}

/// Starts `haproxy -W -D` on `paths.config`; returns the master pid once the runtime API
/// answers. The process outlives the node (a controller restart adopts it).
pub fn start(bin: &Path, paths: &Paths) -> Result<i32> {
    let _ = std::fs::remove_file(&paths.pidfile);
    let _ = std::fs::remove_file(&paths.socket);
    let log = std::fs::File::create(&paths.log)
        .map_err(|e| LbError::Failed(format!("cannot create {}: {e}", paths.log.display())))?;
    let mut cmd = Command::new(bin);
    cmd.arg("-W")
        .arg("-D")
        .arg("-f")
        .arg(&paths.config)
        .arg("-p")
        .arg(&paths.pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let status = cmd
        .status()
        .map_err(|e| LbError::Failed(format!("cannot run {}: {e}", bin.display())))?;
    if !status.success() {
        let text = std::fs::read_to_string(&paths.log).unwrap_or_default();
        return Err(LbError::Rejected(format!(
            "haproxy did not start ({status}): {}",
            alerts(&text)
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = read_pid(&paths.pidfile) {
            if Runtime::new(&paths.socket).command("show info").is_ok() {
                return Ok(pid);
            }
        }
        if Instant::now() > deadline {
            return Err(LbError::Failed(format!(
                "haproxy started but its runtime API at {} did not answer within 10 s",
                paths.socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Seamless reload: dumps the server state, signals the master, and waits for a new worker
/// (a different `Pid` in `show info`). The old worker finishes its connections.
pub fn reload(paths: &Paths, master: i32) -> Result<()> {
    let rt = Runtime::new(&paths.socket);
    let before = rt.worker_pid().ok();
    if let Ok(state) = rt.command("show servers state") {
        let tmp = paths.state.with_extension("tmp");
        if std::fs::write(&tmp, state).is_ok() {
            let _ = std::fs::rename(&tmp, &paths.state);
        }
    }
    if unsafe { libc::kill(master, libc::SIGUSR2) } != 0 {
        return Err(LbError::Failed(format!("cannot signal haproxy master {master}")));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(10));
        if let Ok(pid) = rt.worker_pid() {
            if Some(pid) != before {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(LbError::Failed(
                "haproxy reload did not produce a new worker within 30 s (the previous one keeps serving)"
                    .into(),
            ));
        }
    }
}

/// Stops the master (SIGTERM: the workers stop with it), waiting up to 5 s, then SIGKILL.
pub fn stop(master: i32) {
    if !alive(master) {
        return;
    }
    unsafe { libc::kill(master, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(master) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if running(master) {
        unsafe { libc::kill(master, libc::SIGKILL) };
    }
}

/// A client of one runtime API socket (non-interactive: one command per connection).
pub struct Runtime {
    path: PathBuf,
    timeout: Duration,
}

impl Runtime {
    pub fn new(path: &Path) -> Runtime {
        Runtime {
            path: path.to_path_buf(),
            timeout: Duration::from_secs(3),
        }
    }

    /// Sends one command line and reads the whole answer.
    pub fn command(&self, cmd: &str) -> Result<String> {
        let fail =
            |e: std::io::Error| LbError::Failed(format!("runtime API {} ({cmd}): {e}", self.path.display()));
        let mut s = UnixStream::connect(&self.path).map_err(fail)?;
        s.set_read_timeout(Some(self.timeout)).map_err(fail)?;
        s.set_write_timeout(Some(self.timeout)).map_err(fail)?;
        s.write_all(cmd.as_bytes()).map_err(fail)?;
        s.write_all(b"\n").map_err(fail)?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(fail)?;
        Ok(out)
    }

    /// Runs a command whose success is a known message or an empty answer.
    pub fn expect_ok(&self, cmd: &str) -> Result<()> {
        let out = self.command(cmd)?;
        let t = out.trim();
        if t.is_empty() || t.starts_with("New server registered") || t.starts_with("Server deleted") {
            Ok(())
        } else {
            Err(LbError::Rejected(format!("haproxy refused `{cmd}`: {t}")))
        }
    }

    /// The current worker's pid (`show info`).
    pub fn worker_pid(&self) -> Result<i32> {
        let info = self.command("show info")?;
        info.lines()
            .find_map(|l| l.strip_prefix("Pid: "))
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| LbError::Failed("show info has no Pid".into()))
    }

    /// `show stat` as rows of named fields.
    pub fn stat(&self) -> Result<Vec<HashMap<String, String>>> {
        Ok(parse_csv(&self.command("show stat")?))
    }
}

/// What HAProxy's answer `t` to `del server BE/SRV` means: `Ok(true)` the server is gone
/// (deleted now or before), `Ok(false)` it still has connections (drain and ask again), an
/// error when HAProxy refused for another reason.
pub fn server_deleted(be: &str, srv: &str, t: &str) -> Result<bool> {
    if t.starts_with("Server deleted") || t.contains("No such server") {
        return Ok(true);
    }
    if !t.contains("connections") {
        return Err(LbError::Rejected(format!(
            "haproxy refused `del server {be}/{srv}`: {t}"
        )));
    }
    Ok(false)
}

/// Parses HAProxy's CSV (`# a,b,c` header, then rows) into maps by column name.
pub fn parse_csv(text: &str) -> Vec<HashMap<String, String>> {
    let mut lines = text.lines();
    let header: Vec<&str> = match lines.next() {
        Some(h) => h.trim_start_matches('#').trim().split(',').collect(),
        None => return Vec::new(),
    };
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            header
                .iter()
                .zip(l.split(','))
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// The state word of a server's `status` column: `UP`, `DOWN`, `MAINT`, `DRAIN`, `NOLB`, or
/// `no check` — HAProxy's transitional `UP 1/2` / `DOWN 1/2` count as their first word.
pub fn state_word(status: &str) -> String {
    let s = status.trim();
    if s.eq_ignore_ascii_case("no check") {
        return "UP".into();
    }
    s.split_whitespace().next().unwrap_or("UNKNOWN").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn del_server_answers() {
        assert!(server_deleted("be_web", "s1", "Server deleted.").unwrap());
        assert!(server_deleted("be_web", "s1", "No such server.").unwrap());
        assert!(!server_deleted(
            "be_web",
            "s1",
            "Server still has connections attached to it, cannot remove it."
        )
        .unwrap());
        let e =
            server_deleted("be_web", "s1", "Only servers in maintenance mode can be deleted.").unwrap_err();
        assert!(e.to_string().contains("del server be_web/s1"), "{e}");
    }

    #[test]
    fn parses_show_stat() {
        let rows = parse_csv(
            "# pxname,svname,qcur,scur,status,check_status,\nbe_web,s127_0_0_1_9001,0,3,UP 1/2,L7OK,\nbe_web,BACKEND,0,3,UP,,\n\n",
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["svname"], "s127_0_0_1_9001");
        assert_eq!(rows[0]["scur"], "3");
        assert_eq!(state_word(&rows[0]["status"]), "UP");
        assert_eq!(state_word("DOWN 1/2"), "DOWN");
        assert_eq!(state_word("MAINT (via x/y)"), "MAINT");
        assert_eq!(state_word("no check"), "UP");
    }

    #[test]
    fn alerts_keep_the_specific_line() {
        let text = "[NOTICE]   (1) : haproxy version is 2.6.12\n[ALERT]    (1) : config : parsing [/x:4] : unknown keyword 'bogus' in 'backend' section\n[ALERT]    (1) : config : Fatal errors found in configuration.\n";
        assert_eq!(
            alerts(text),
            "parsing [/x:4] : unknown keyword 'bogus' in 'backend' section"
        );
        let text =
            "[ALERT]    (26091) : [/usr/sbin/haproxy.main()] Cannot raise FD limit to 40032, limit is 20000.";
        assert_eq!(
            alerts(text),
            "[/usr/sbin/haproxy.main()] Cannot raise FD limit to 40032, limit is 20000."
        );
    }

    #[test]
    fn a_missing_socket_is_a_clear_error() {
        let e = Runtime::new(Path::new("/nonexistent/admin.sock"))
            .command("show info")
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/admin.sock"), "{e}");
    }
}
