//! Remote mode (designed, tested against the Vultr emulator only): an LB placed on a VM
//! created through the Vultr API, with cloud-init user data that installs HAProxy and the
//! rendered config, a reserved IP as its public address, and crash fail-over that moves the
//! reserved IP to a replacement VM.
//!
//! The runtime API is never public: the config binds it to the VM's **private** (VPC) address
//! only, which cloud-init writes in at boot (the address is not known before the VM exists),
//! and an nftables rule drops the port on every other address. The controller must run in the
//! same VPC; it talks to `PRIVATE_IP:9999` over TCP ([`runtime_command`]).
//!
//! Supervision ([`RemoteLb::check`]): a VM is down when the API reports it stopped or gone,
//! or when its runtime API does not answer `show info` over the private network, for longer
//! than [`Placement::confirm`] seconds (after [`Placement::boot_timeout`] for a new VM). Then a
//! replacement VM is created from the same user data; when it is ready (API ready and runtime
//! API answering) the reserved IP is detached from the old VM and attached to the new one, and
//! the old VM is destroyed: it is not coming back. If the old VM recovers first, the
//! replacement is destroyed instead and nothing moves.

use super::controller::ServerView;
use super::haproxy;
use super::render::{self, backend_name, server_name, Paths};
use super::{invalid, parse_address, Backend, LbError, Result, Spec, MAX_BACKENDS};
use crate::cloud::vultr::{Client, CreateRequest, Instance, VultrError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// The runtime API port on the private network.
pub const RUNTIME_PORT: u16 = 9999;
/// Where the LB's files live on the VM.
pub const VM_DIR: &str = "/var/lib/stage-lb";
/// Stands for the VM's private address in the user data until cloud-init replaces it.
pub const PRIVATE_IP_MARK: &str = "@PRIVATE_IP@";
/// Debian 12 x64 (bookworm): its haproxy is the 2.6 the local mode uses.
pub const DEFAULT_OS: i64 = 2136;

/// Where an LB VM goes: `lb.create{ ..., placement = { provider = "vultr", ... } }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub provider: String,
    pub region: String,
    pub plan: String,
    pub os_id: i64,
    /// The id of a reserved IP (`vultr.reserved_ip_create`) that follows the LB.
    pub reserved_ip: Option<String>,
    /// A VPC id to attach; absent: `enable_vpc` (the region's default VPC).
    pub vpc: Option<String>,
    /// Seconds a new VM may take to be ready and answer on its runtime API.
    pub boot_timeout: f64,
    /// Seconds a VM must stay down before it is replaced.
    pub confirm: f64,
    /// Seconds between supervision checks.
    pub interval: f64,
}

fn text(field: &str, v: &Json) -> Result<String> {
    match v.as_str() {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err(invalid(format!("{field}: expected a non-empty string, got {v}"))),
    }
}

fn seconds(field: &str, v: &Json) -> Result<f64> {
    match v.as_f64() {
        Some(f) if f > 0.0 && f <= 86_400.0 => Ok(f),
        _ => Err(invalid(format!(
            "{field}: expected seconds, more than 0 and at most 86400, got {v}"
        ))),
    }
}

impl Placement {
    pub fn from_json(field: &str, v: &Json) -> Result<Placement> {
        let m: &Map<String, Json> = v
            .as_object()
            .ok_or_else(|| invalid(format!("{field}: expected a table, got {v}")))?;
        let mut p = Placement {
            provider: String::new(),
            region: String::new(),
            plan: String::new(),
            os_id: DEFAULT_OS,
            reserved_ip: None,
            vpc: None,
            boot_timeout: 600.0,
            confirm: 10.0,
            interval: 5.0,
        };
        for (k, v) in m {
            let f = format!("{field}.{k}");
            match k.as_str() {
                "provider" => p.provider = text(&f, v)?,
                "region" => p.region = text(&f, v)?,
                "plan" => p.plan = text(&f, v)?,
                "os_id" => {
                    p.os_id = v
                        .as_i64()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| invalid(format!("{f}: expected a Vultr OS id, got {v}")))?
                }
                "reserved_ip" => p.reserved_ip = Some(text(&f, v)?),
                "vpc" => p.vpc = Some(text(&f, v)?),
                "boot_timeout" => p.boot_timeout = seconds(&f, v)?,
                "confirm" => p.confirm = seconds(&f, v)?,
                "interval" => p.interval = seconds(&f, v)?,
                other => {
                    return Err(invalid(format!(
                        "{field}: unknown field {other:?} (expected provider, region, plan, os_id, \
                         reserved_ip, vpc, boot_timeout, confirm, interval)"
                    )))
                }
            }
        }
        if p.provider != "vultr" {
            return Err(invalid(format!(
                "{field}.provider: only \"vultr\" is supported, got {:?}",
                p.provider
            )));
        }
        if p.region.is_empty() {
            return Err(invalid(format!("{field}.region: required (e.g. \"icn\")")));
        }
        if p.plan.is_empty() {
            return Err(invalid(format!("{field}.plan: required (e.g. \"vc2-1c-1gb\")")));
        }
        Ok(p)
    }
}

/// The HAProxy config of the VM: the local rendering, with the runtime API also bound to
/// `private` (the VM's VPC address, or [`PRIVATE_IP_MARK`] until boot fills it in).
pub fn vm_config(spec: &Spec, private: &str) -> String {
    let paths = Paths::new(Path::new(VM_DIR));
    let local = render::render(spec, &paths, &[]);
    let socket_line = format!("    stats socket {} mode 600 level admin", paths.socket.display());
    let private = format!("{socket_line}\n    stats socket {private}:{RUNTIME_PORT} level admin");
    local.replacen(&socket_line, &private, 1)
}

/// The boot script cloud-init runs: learns the private address from the metadata service,
/// writes it into the config, firewalls the runtime API to it, checks and starts HAProxy.
pub fn boot_script() -> String {
    format!(
        "#!/bin/sh\n\
         set -eu\n\
         # The VPC interface's address (Vultr's metadata service; interface 0 is the public one).\n\
         PRIV=$(curl -fsS --retry 30 --retry-delay 2 http://169.254.169.254/v1/interfaces/1/ipv4/address)\n\
         sed -i \"s/{PRIVATE_IP_MARK}/$PRIV/g\" /etc/haproxy/haproxy.cfg\n\
         nft add table inet stagelb\n\
         nft add chain inet stagelb input '{{ type filter hook input priority 0; }}'\n\
         nft add rule inet stagelb input tcp dport {RUNTIME_PORT} ip daddr != \"$PRIV\" drop\n\
         haproxy -c -f /etc/haproxy/haproxy.cfg\n\
         systemctl restart haproxy\n"
    )
}

fn indented(out: &mut String, text: &str) {
    for line in text.lines() {
        out.push_str("      ");
        out.push_str(line);
        out.push('\n');
    }
}

/// cloud-init `#cloud-config` user data for an LB VM: installs HAProxy and nftables, writes
/// the rendered config and the boot script, and runs the script.
pub fn user_data(spec: &Spec) -> String {
    let mut out = String::from(
        "#cloud-config\npackage_update: true\npackages:\n  - haproxy\n  - nftables\n  - curl\nwrite_files:\n",
    );
    out.push_str("  - path: /etc/haproxy/haproxy.cfg\n    permissions: '0644'\n    content: |\n");
    indented(&mut out, &vm_config(spec, PRIVATE_IP_MARK));
    out.push_str(&format!(
        "  - path: {VM_DIR}/boot.sh\n    permissions: '0755'\n    content: |\n"
    ));
    indented(&mut out, &boot_script());
    out.push_str("runcmd:\n");
    out.push_str(&format!("  - mkdir -p {VM_DIR}\n"));
    out.push_str(&format!("  - sh {VM_DIR}/boot.sh\n"));
    out
}

/// The haproxy.cfg inside `user_data` (what cloud-init writes), with the private address
/// filled in as the boot script does. `None` when the text is not such user data.
pub fn config_from_user_data(user_data: &str, private_ip: &str) -> Option<String> {
    let start = user_data.find("  - path: /etc/haproxy/haproxy.cfg\n")?;
    let body = &user_data[start..];
    let content = body.find("content: |\n")? + "content: |\n".len();
    let mut cfg = String::new();
    for line in body[content..].lines() {
        match line.strip_prefix("      ") {
            Some(l) => {
                cfg.push_str(l);
                cfg.push('\n');
            }
            None if line.is_empty() => cfg.push('\n'),
            None => break,
        }
    }
    Some(cfg.replace(PRIVATE_IP_MARK, private_ip))
}

/// One runtime API command over TCP (the private network), with a deadline.
pub async fn runtime_command(addr: SocketAddr, cmd: &str, timeout: Duration) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("{cmd}\n").as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "runtime API timed out"))?
}

/// The same, blocking (for callers outside a runtime).
pub fn runtime_command_blocking(addr: SocketAddr, cmd: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The private runtime API address of a VM (`internal_ip:9999`), if it has one yet.
pub fn runtime_addr(inst: &Instance) -> Option<SocketAddr> {
    let ip: IpAddr = inst.internal_ip.parse().ok()?;
    Some(SocketAddr::new(ip, RUNTIME_PORT))
}

/// Whether a VM's runtime API answers `show info` over the private network.
pub async fn probe(inst: &Instance) -> bool {
    match runtime_addr(inst) {
        Some(a) => runtime_command(a, "show info", Duration::from_secs(2))
            .await
            .map(|t| t.contains("Name: HAProxy"))
            .unwrap_or(false),
        None => false,
    }
}

/// Something that happened to a remote LB (for `on_failover` and the log).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RemoteEvent {
    pub lb: String,
    /// `failover`.
    pub kind: String,
    /// `down` (a replacement is being created), `replaced` (the reserved IP moved),
    /// `recovered` (the old VM came back; the replacement was destroyed), `failed`.
    pub state: String,
    pub reason: String,
    pub old_instance: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_ip: Option<String>,
    /// For `replaced`: seconds from detection to the IP on the new VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

/// A load balancer on a VM, and its supervision state.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteLb {
    pub spec: Spec,
    pub placement: Placement,
    /// The VM serving now.
    pub instance: Instance,
    /// A replacement being prepared after the VM went down.
    pub replacing: Option<Instance>,
    pub failovers: u64,
    /// Whether the current VM was ever seen healthy (before that, it is booting).
    pub up_once: bool,
    /// Set by [`RemoteLb::delete`]; a deleted LB is never checked (nor replaced) again.
    pub deleted: bool,
    /// Supervision's view: `booting`, `up`, `down` (not yet confirmed), `replacing`, `deleted`.
    pub state: String,
    /// The backends as the VM's HAProxy reports them (`show stat` over the private network),
    /// by address; refreshed by [`RemoteLb::observe`].
    #[serde(skip)]
    pub servers: BTreeMap<String, ServerView>,
    #[serde(skip)]
    created_at: Option<Instant>,
    #[serde(skip)]
    down_since: Option<Instant>,
    #[serde(skip)]
    replace_started: Option<Instant>,
}

fn failed(e: VultrError) -> LbError {
    LbError::Failed(e.to_string())
}

/// The create request of an LB VM.
pub fn create_request(spec: &Spec, p: &Placement) -> CreateRequest {
    let mut req = CreateRequest {
        region: p.region.clone(),
        plan: p.plan.clone(),
        os_id: Some(p.os_id),
        label: Some(format!("lb-{}", spec.name)),
        hostname: Some(format!("lb-{}", spec.name)),
        tags: vec!["stage-lb".into(), format!("stage-lb-{}", spec.name)],
        ..Default::default()
    };
    req.set_user_data(user_data(spec).as_bytes());
    match &p.vpc {
        Some(v) => req.extra.insert("attach_vpc".into(), Json::from(vec![v.clone()])),
        None => req.extra.insert("enable_vpc".into(), Json::Bool(true)),
    };
    req
}

impl RemoteLb {
    /// Creates the VM, waits until the API reports it ready, and attaches the reserved IP.
    /// (HAProxy comes up when cloud-init is done; [`RemoteLb::check`] allows for that.)
    pub async fn provision(c: &Client, spec: Spec, placement: Placement) -> Result<RemoteLb> {
        let what = format!("lb.create {}", spec.name);
        if let Some(ip) = &placement.reserved_ip {
            let r = c
                .reserved_ip(ip)
                .await
                .map_err(|e| invalid(format!("{what}: placement.reserved_ip {ip:?}: {e}")))?;
            if r.region != placement.region {
                return Err(invalid(format!(
                    "{what}: placement.reserved_ip {ip:?} is in region {}, the LB in {}",
                    r.region, placement.region
                )));
            }
        }
        let inst = c
            .create(&create_request(&spec, &placement))
            .await
            .map_err(|e| LbError::Failed(format!("{what}: {e}")))?;
        let mut lb = RemoteLb {
            spec,
            placement,
            instance: inst,
            replacing: None,
            failovers: 0,
            up_once: false,
            deleted: false,
            state: "booting".into(),
            servers: BTreeMap::new(),
            created_at: Some(Instant::now()),
            down_since: None,
            replace_started: None,
        };
        lb.instance = lb.wait_ready(c, &lb.instance.id.clone()).await?;
        if let Some(ip) = &lb.placement.reserved_ip {
            c.reserved_ip_move(ip, &lb.instance.id).await.map_err(failed)?;
        }
        Ok(lb)
    }

    async fn wait_ready(&self, c: &Client, id: &str) -> Result<Instance> {
        let wo = crate::cloud::vultr::WaitOptions {
            timeout: Duration::from_secs_f64(self.placement.boot_timeout),
            interval: Duration::from_secs_f64(self.placement.interval.min(5.0)),
        };
        c.wait(id, &wo, |_| async {}).await.map_err(failed)
    }

    /// Is `inst` serving: API says running and ready, and its runtime API answers.
    async fn health(c: &Client, id: &str) -> (bool, String, Option<Instance>) {
        let inst = match c.get(id).await {
            Ok(i) => i,
            Err(e) if e.status() == Some(404) => return (false, format!("vm {id} is gone"), None),
            Err(e) => return (false, format!("vm {id}: {e}"), None),
        };
        if inst.power_status == "stopped" {
            return (
                false,
                format!("vm {id} is stopped ({})", inst.state_line()),
                Some(inst),
            );
        }
        if !inst.is_ready() {
            return (
                false,
                format!("vm {id} is not ready ({})", inst.state_line()),
                Some(inst),
            );
        }
        if !probe(&inst).await {
            let at = runtime_addr(&inst)
                .map(|a| a.to_string())
                .unwrap_or_else(|| "no private address".into());
            return (
                false,
                format!("vm {id}: the runtime API at {at} does not answer"),
                Some(inst),
            );
        }
        (true, String::new(), Some(inst))
    }

    fn event(&self, state: &str, reason: String) -> RemoteEvent {
        RemoteEvent {
            lb: self.spec.name.clone(),
            kind: "failover".into(),
            state: state.into(),
            reason,
            old_instance: self.instance.id.clone(),
            new_instance: self.replacing.as_ref().map(|i| i.id.clone()),
            reserved_ip: self.placement.reserved_ip.clone(),
            seconds: None,
        }
    }

    /// One supervision step (call it every [`Placement::interval`] seconds). Returns what
    /// happened, if anything. API errors end the step (it is tried again next time).
    pub async fn check(&mut self, c: &Client) -> Result<Option<RemoteEvent>> {
        if self.deleted {
            return Ok(None);
        }
        let now = Instant::now();
        if let Some(new) = self.replacing.clone() {
            let (old_up, _, _) = Self::health(c, &self.instance.id).await;
            if old_up {
                let _ = c.delete(&new.id).await;
                let ev = self.event(
                    "recovered",
                    format!(
                        "vm {} came back before its replacement was ready; replacement {} destroyed",
                        self.instance.id, new.id
                    ),
                );
                self.replacing = None;
                self.down_since = None;
                self.replace_started = None;
                self.state = "up".into();
                return Ok(Some(ev));
            }
            let (new_up, why, seen) = Self::health(c, &new.id).await;
            if new_up {
                let seen = seen.unwrap_or(new);
                if let Some(ip) = &self.placement.reserved_ip {
                    c.reserved_ip_move(ip, &seen.id).await.map_err(failed)?;
                }
                // The old VM is not coming back (it stayed down all along): destroy it.
                match c.delete(&self.instance.id).await {
                    Ok(()) => {}
                    Err(e) if e.status() == Some(404) => {}
                    Err(e) => {
                        log::warn!(target: "lb", "lb {}: cannot destroy the old vm {}: {e}", self.spec.name, self.instance.id)
                    }
                }
                let mut ev = self.event(
                    "replaced",
                    format!(
                        "vm {} replaced by {}{}",
                        self.instance.id,
                        seen.id,
                        match &self.placement.reserved_ip {
                            Some(ip) => format!("; reserved ip {ip} moved"),
                            None => String::new(),
                        }
                    ),
                );
                ev.new_instance = Some(seen.id.clone());
                ev.seconds = self.down_since.map(|t| now.duration_since(t).as_secs_f64());
                self.instance = seen;
                self.replacing = None;
                self.down_since = None;
                self.replace_started = None;
                self.failovers += 1;
                self.up_once = true;
                self.state = "up".into();
                self.servers.clear();
                return Ok(Some(ev));
            }
            let started = self.replace_started.unwrap_or(now);
            if now.duration_since(started).as_secs_f64() > self.placement.boot_timeout {
                let _ = c.delete(&new.id).await;
                let ev = self.event(
                    "failed",
                    format!(
                        "replacement {} not serving after {} s ({why}); destroyed, trying again",
                        new.id, self.placement.boot_timeout
                    ),
                );
                self.replacing = None;
                self.replace_started = None;
                return Ok(Some(ev));
            }
            return Ok(None);
        }
        let (up, why, seen) = Self::health(c, &self.instance.id).await;
        if let Some(seen) = seen.filter(|i| !i.id.is_empty()) {
            self.instance = seen; // addresses appear once the VM has them
        }
        if up {
            self.up_once = true;
            self.down_since = None;
            self.state = "up".into();
            return Ok(None);
        }
        if !self.up_once {
            let age = self
                .created_at
                .map(|t| now.duration_since(t).as_secs_f64())
                .unwrap_or(f64::MAX);
            if age < self.placement.boot_timeout {
                self.state = "booting".into();
                return Ok(None); // still booting (cloud-init installs HAProxy)
            }
        }
        let since = *self.down_since.get_or_insert(now);
        if now.duration_since(since).as_secs_f64() < self.placement.confirm {
            self.state = "down".into();
            return Ok(None);
        }
        let new = c
            .create(&create_request(&self.spec, &self.placement))
            .await
            .map_err(failed)?;
        self.replacing = Some(new);
        self.replace_started = Some(now);
        self.state = "replacing".into();
        Ok(Some(self.event("down", why)))
    }

    /// Destroys the VM(s); the reserved IP stays reserved (detached) for the user to reuse.
    pub async fn delete(&mut self, c: &Client) -> Result<()> {
        for id in [
            Some(self.instance.id.clone()),
            self.replacing.as_ref().map(|i| i.id.clone()),
        ]
        .into_iter()
        .flatten()
        {
            match c.delete(&id).await {
                Ok(()) => {}
                Err(e) if e.status() == Some(404) => {}
                Err(e) => return Err(failed(e)),
            }
        }
        self.replacing = None;
        self.deleted = true;
        self.state = "deleted".into();
        Ok(())
    }
}

/// A backend that changed state on the VM (for `on_change`): address, new state, previous
/// state, HAProxy's check status.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub backend: String,
    pub state: String,
    pub previous: Option<String>,
    pub check: Option<String>,
}

/// A client of a VM's runtime API over the private network: one command per connection.
#[derive(Debug, Clone, Copy)]
pub struct TcpRuntime {
    pub addr: SocketAddr,
    pub timeout: Duration,
}

impl TcpRuntime {
    pub async fn command(&self, cmd: &str) -> Result<String> {
        runtime_command(self.addr, cmd, self.timeout)
            .await
            .map_err(|e| LbError::Failed(format!("runtime API {} ({cmd}): {e}", self.addr)))
    }

    /// A command whose success is a known message or an empty answer.
    pub async fn expect_ok(&self, cmd: &str) -> Result<()> {
        let out = self.command(cmd).await?;
        let t = out.trim();
        if t.is_empty() || t.starts_with("New server registered") || t.starts_with("Server deleted") {
            Ok(())
        } else {
            Err(LbError::Rejected(format!("haproxy refused `{cmd}`: {t}")))
        }
    }

    /// `add server` → `enable health` → `enable server` (HAProxy 2.6 starts a runtime-added
    /// server in maintenance with its checks off); undone when a step is refused.
    pub async fn add_server(&self, spec: &Spec, b: &Backend) -> Result<()> {
        let be = backend_name(&spec.name);
        let srv = server_name(&b.address);
        let added = async {
            self.expect_ok(&format!(
                "add server {be}/{srv} {} {}",
                b.address,
                render::server_args(spec, b.autoscaled)
            ))
            .await?;
            self.expect_ok(&format!("enable health {be}/{srv}")).await?;
            self.expect_ok(&format!("enable server {be}/{srv}")).await
        }
        .await;
        if added.is_err() {
            let _ = self.command(&format!("disable server {be}/{srv}")).await;
            let _ = self.command(&format!("del server {be}/{srv}")).await;
        }
        added
    }

    /// drain → maint → wait until the server's sessions end (`drain` seconds, then they are
    /// shut) → `del server`.
    pub async fn remove_server(&self, lb: &str, address: &str, drain: f64) -> Result<()> {
        let be = backend_name(lb);
        let srv = server_name(address);
        self.expect_ok(&format!("set server {be}/{srv} state drain"))
            .await?;
        self.expect_ok(&format!("set server {be}/{srv} state maint"))
            .await?;
        let deadline = Instant::now() + Duration::from_secs_f64(drain);
        let mut shut = false;
        loop {
            let out = self.command(&format!("del server {be}/{srv}")).await?;
            let t = out.trim();
            if haproxy::server_deleted(&be, &srv, t)? {
                return Ok(());
            }
            if Instant::now() > deadline && !shut {
                log::warn!(target: "lb", "lb {lb}: {address} still has sessions after {drain} s; shutting them");
                let _ = self
                    .command(&format!("shutdown sessions server {be}/{srv}"))
                    .await;
                shut = true;
            }
            if Instant::now() > deadline + Duration::from_secs(5) {
                return Err(LbError::Failed(format!(
                    "haproxy still refuses to delete {address}: {t}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `show stat` as rows of named fields.
    pub async fn stat(&self) -> Result<Vec<std::collections::HashMap<String, String>>> {
        Ok(haproxy::parse_csv(&self.command("show stat").await?))
    }
}

/// `haproxy -c` of the config a VM would run for `spec` (files under a scratch directory),
/// so that a config HAProxy rejects is refused before any VM is created or replaced.
pub fn validate(spec: &Spec) -> Result<()> {
    let bin = haproxy::binary()?;
    let dir = std::env::temp_dir().join(format!("stage-lb-check-{}-{}", std::process::id(), spec.name));
    std::fs::create_dir_all(&dir).map_err(|e| LbError::Failed(format!("{}: {e}", dir.display())))?;
    let cfg = vm_config(spec, "127.0.0.1").replace(VM_DIR, &dir.display().to_string());
    let path = dir.join("haproxy.cfg");
    let r = std::fs::write(&path, cfg)
        .map_err(|e| LbError::Failed(format!("{}: {e}", path.display())))
        .and_then(|_| haproxy::validate(&bin, &path));
    let _ = std::fs::remove_dir_all(&dir);
    r
}

impl RemoteLb {
    /// The runtime API of the serving VM over the private network.
    pub fn runtime(&self) -> Result<TcpRuntime> {
        let addr = runtime_addr(&self.instance).ok_or_else(|| {
            LbError::Failed(format!(
                "lb {}: vm {} has no private address yet",
                self.spec.name, self.instance.id
            ))
        })?;
        Ok(TcpRuntime {
            addr,
            timeout: Duration::from_secs(3),
        })
    }

    /// The desired state with `address` added; an error names what is wrong.
    pub fn with_backend(&self, what: &str, address: &str) -> Result<(Spec, Backend)> {
        let addr = parse_address(what, address)?.to_string();
        if self.spec.backends.iter().any(|b| b.address == addr) {
            return Err(LbError::Exists(format!(
                "{what}: {addr} is already a backend of {}",
                self.spec.name
            )));
        }
        if self.spec.backends.len() >= MAX_BACKENDS {
            return Err(invalid(format!(
                "{what}: {} has {MAX_BACKENDS} backends, the most allowed",
                self.spec.name
            )));
        }
        let b = Backend {
            address: addr,
            autoscaled: false,
        };
        let mut spec = self.spec.clone();
        spec.backends.push(b.clone());
        Ok((spec, b))
    }

    /// The desired state without `address`.
    pub fn without_backend(&self, what: &str, address: &str) -> Result<(Spec, String)> {
        let addr = parse_address(what, address)?.to_string();
        let mut spec = self.spec.clone();
        let Some(pos) = spec.backends.iter().position(|b| b.address == addr) else {
            return Err(LbError::NotFound(format!(
                "{what}: {addr} is not a backend of {}",
                self.spec.name
            )));
        };
        spec.backends.remove(pos);
        Ok((spec, addr))
    }

    /// Reads `show stat` from the VM into [`RemoteLb::servers`] and makes the VM's servers
    /// match the desired state (a VM that rebooted from its user data, or missed a change,
    /// gets the runtime-added backends back; extra ones are removed). Returns the state
    /// changes. Call it only while the VM is up.
    pub async fn observe(&mut self) -> Result<Vec<Change>> {
        let rt = self.runtime()?;
        let rows = rt.stat().await?;
        let be = backend_name(&self.spec.name);
        let by_server: std::collections::HashMap<String, &Backend> = self
            .spec
            .backends
            .iter()
            .map(|b| (server_name(&b.address), b))
            .collect();
        let mut present = Vec::new();
        let mut changes = Vec::new();
        for r in rows.iter().filter(|r| r.get("pxname") == Some(&be)) {
            let sv = r.get("svname").cloned().unwrap_or_default();
            if sv == "BACKEND" {
                continue;
            }
            present.push(sv.clone());
            let Some(b) = by_server.get(&sv) else { continue };
            let new = ServerView::from_row(r);
            let view = self.servers.entry(b.address.clone()).or_default();
            if !view.state.is_empty() && view.state != new.state {
                changes.push(Change {
                    backend: b.address.clone(),
                    state: new.state.clone(),
                    previous: Some(view.state.clone()),
                    check: Some(new.check.clone()),
                });
            }
            *view = new;
        }
        let wanted: Vec<Backend> = self.spec.backends.clone();
        self.servers.retain(|a, _| wanted.iter().any(|b| &b.address == a));
        for b in &wanted {
            if !present.contains(&server_name(&b.address)) {
                log::info!(target: "lb", "lb {}: vm {} lacks backend {}; adding it", self.spec.name, self.instance.id, b.address);
                rt.add_server(&self.spec, b).await?;
            }
        }
        for sv in present {
            if !by_server.contains_key(&sv) {
                log::info!(target: "lb", "lb {}: vm {} has server {sv} that is not desired; deleting it", self.spec.name, self.instance.id);
                let _ = rt.command(&format!("set server {be}/{sv} state maint")).await;
                let _ = rt.command(&format!("shutdown sessions server {be}/{sv}")).await;
                let _ = rt.command(&format!("del server {be}/{sv}")).await;
            }
        }
        Ok(changes)
    }

    /// A structural change (`update`): blue-green, since a VM's config is its user data. A
    /// new VM is created with `spec` rendered into its user data, and once it serves (API
    /// ready and runtime API answering within `boot_timeout`) the reserved IP moves to it and
    /// the old VM is destroyed. When the new VM does not come up it is destroyed and nothing
    /// else changes.
    pub async fn roll(&mut self, c: &Client, what: &str, spec: Spec) -> Result<()> {
        validate(&spec).map_err(|e| LbError::Rejected(format!("{what}: {e}")))?;
        let new = c
            .create(&create_request(&spec, &self.placement))
            .await
            .map_err(|e| LbError::Failed(format!("{what}: {e}")))?;
        let t0 = Instant::now();
        let budget = Duration::from_secs_f64(self.placement.boot_timeout);
        let mut why = String::from("not ready");
        let serving = loop {
            let (up, w, seen) = Self::health(c, &new.id).await;
            if up {
                break seen;
            }
            why = w;
            if t0.elapsed() > budget {
                break None;
            }
            tokio::time::sleep(Duration::from_secs_f64(self.placement.interval.min(1.0))).await;
        };
        let Some(seen) = serving else {
            let _ = c.delete(&new.id).await;
            return Err(LbError::Failed(format!(
                "{what}: the new vm {} did not serve within {} s ({why}); it was destroyed and \
                 the running LB is unchanged",
                new.id, self.placement.boot_timeout
            )));
        };
        if let Some(ip) = &self.placement.reserved_ip {
            if let Err(e) = c.reserved_ip_move(ip, &seen.id).await {
                let _ = c.delete(&new.id).await;
                return Err(LbError::Failed(format!(
                    "{what}: cannot move reserved ip {ip} to the new vm ({e}); it was destroyed"
                )));
            }
        }
        match c.delete(&self.instance.id).await {
            Ok(()) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => {
                log::warn!(target: "lb", "lb {}: cannot destroy the old vm {}: {e}", self.spec.name, self.instance.id)
            }
        }
        log::info!(target: "lb", "lb {}: {what}: vm {} replaced by {} in {:.1} s", self.spec.name, self.instance.id, seen.id, t0.elapsed().as_secs_f64());
        self.instance = seen;
        self.spec = spec;
        self.servers.clear();
        self.up_once = true;
        self.state = "up".into();
        self.down_since = None;
        Ok(())
    }

    /// What `info()` and `lb.list()` show of a remote LB.
    pub fn info(&self) -> RemoteInfo {
        RemoteInfo {
            name: self.spec.name.clone(),
            remote: true,
            protocol: self.spec.protocol.word().into(),
            listen: self.spec.listen.clone(),
            algorithm: self.spec.algorithm.word().into(),
            state: self.state.clone(),
            running: self.state == "up",
            vm: self.instance.id.clone(),
            main_ip: self.instance.main_ip.clone(),
            internal_ip: self.instance.internal_ip.clone(),
            reserved_ip: self.placement.reserved_ip.clone(),
            failovers: self.failovers,
            backends: self
                .spec
                .backends
                .iter()
                .map(|b| super::controller::BackendInfo::of(b, self.servers.get(&b.address)))
                .collect(),
            health: self.spec.health.clone(),
            project: self.spec.project.clone(),
            spec: self.spec.clone(),
            placement: self.placement.clone(),
            instance: self.instance.clone(),
            replacing: self.replacing.clone(),
            up_once: self.up_once,
            deleted: self.deleted,
        }
    }
}

/// A remote LB as `info()` / `lb.list()` show it: the fields a local LB has (name, protocol,
/// listen, algorithm, running, failovers, backends, health, project) and the VM's.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteInfo {
    pub name: String,
    /// Always true: tells a remote LB from a local one in `lb.list()`.
    pub remote: bool,
    pub protocol: String,
    pub listen: String,
    pub algorithm: String,
    /// Supervision's view: `booting`, `up`, `down`, `replacing`, `deleted`.
    pub state: String,
    pub running: bool,
    /// The serving VM's id and addresses.
    pub vm: String,
    pub main_ip: String,
    pub internal_ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_ip: Option<String>,
    pub failovers: u64,
    pub backends: Vec<super::controller::BackendInfo>,
    pub health: super::Health,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    pub spec: Spec,
    pub placement: Placement,
    pub instance: Instance,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replacing: Option<Instance>,
    pub up_once: bool,
    pub deleted: bool,
}

/// What is persisted of a remote LB (a row of `stage_lb_remote`, [`super::store::Store::put_remote`]):
/// enough to resume supervising it after a node restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub spec: Spec,
    pub placement: Placement,
    pub instance: String,
    pub replacing: Option<String>,
    pub failovers: u64,
    pub up_once: bool,
    /// Supervision's last view (for `stage lb status` while the node is down).
    #[serde(default)]
    pub state: String,
    /// The serving VM's private address: where `stage lb status` reaches its runtime API.
    #[serde(default)]
    pub internal_ip: String,
}

impl RemoteLb {
    pub fn record(&self) -> Record {
        Record {
            spec: self.spec.clone(),
            placement: self.placement.clone(),
            instance: self.instance.id.clone(),
            replacing: self.replacing.as_ref().map(|i| i.id.clone()),
            failovers: self.failovers,
            up_once: self.up_once,
            state: self.state.clone(),
            internal_ip: self.instance.internal_ip.clone(),
        }
    }

    /// Resumes a remote LB from its record: the VMs are looked up again (one that is gone is
    /// kept by id, so that the next check sees it gone and fails over). A replacement that was
    /// being prepared gets a new `boot_timeout`.
    pub async fn restore(c: &Client, r: Record) -> Result<RemoteLb> {
        let fetch = |id: String| async move {
            match c.get(&id).await {
                Ok(i) => Ok(i),
                Err(e) if e.status() == Some(404) => Ok(Instance {
                    id,
                    ..Default::default()
                }),
                Err(e) => Err(failed(e)),
            }
        };
        let instance = fetch(r.instance).await?;
        let replacing = match r.replacing {
            Some(id) => Some(fetch(id).await?),
            None => None,
        };
        let now = Instant::now();
        let state = if replacing.is_some() {
            "replacing"
        } else {
            "booting"
        };
        Ok(RemoteLb {
            state: state.into(),
            spec: r.spec,
            placement: r.placement,
            instance,
            down_since: replacing.as_ref().map(|_| now),
            replace_started: replacing.as_ref().map(|_| now),
            replacing,
            failovers: r.failovers,

            up_once: r.up_once,
            deleted: false,
            servers: BTreeMap::new(),
            created_at: Some(now),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> Spec {
        Spec::from_json(
            "t",
            &json!({"name": "web", "listen": "0.0.0.0:80", "backends": ["10.1.96.4:8080"]}),
        )
        .unwrap()
    }

    #[test]
    fn runtime_api_only_on_the_private_address() {
        let ud = user_data(&spec());
        assert!(ud.starts_with("#cloud-config"));
        assert!(
            ud.contains(&format!("stats socket {PRIVATE_IP_MARK}:9999 level admin")),
            "{ud}"
        );
        assert!(!ud.contains("stats socket 0.0.0.0"), "{ud}");
        assert!(ud.contains("server s10_1_96_4_8080 10.1.96.4:8080"));
        assert!(ud.contains("ip daddr != \"$PRIV\" drop"));
        let cfg = config_from_user_data(&ud, "10.1.96.3").unwrap();
        assert!(cfg.contains("stats socket 10.1.96.3:9999 level admin"), "{cfg}");
        assert!(cfg.contains("frontend fe_web\n    bind 0.0.0.0:80\n"), "{cfg}");
        assert!(
            !cfg.contains("boot.sh") && !cfg.contains(PRIVATE_IP_MARK),
            "{cfg}"
        );
    }

    #[test]
    fn placement_errors_name_the_field() {
        let ok = Placement::from_json(
            "lb.create: placement",
            &json!({"provider": "vultr", "region": "icn", "plan": "vc2-1c-1gb", "reserved_ip": "x"}),
        )
        .unwrap();
        assert_eq!((ok.os_id, ok.confirm), (DEFAULT_OS, 10.0));
        for (v, want) in [
            (
                json!({"provider": "aws", "region": "icn", "plan": "p"}),
                "placement.provider: only \"vultr\"",
            ),
            (
                json!({"provider": "vultr", "plan": "p"}),
                "placement.region: required",
            ),
            (
                json!({"provider": "vultr", "region": "icn"}),
                "placement.plan: required",
            ),
            (
                json!({"provider": "vultr", "region": "icn", "plan": "p", "size": 1}),
                "unknown field \"size\"",
            ),
            (
                json!({"provider": "vultr", "region": "icn", "plan": "p", "confirm": -1}),
                "placement.confirm",
            ),
        ] {
            let e = Placement::from_json("lb.create: placement", &v)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{v}: {e}");
        }
    }
}
