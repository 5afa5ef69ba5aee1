//! The LB's remote mode against the Vultr emulator (never real Vultr). The "VMs" are real
//! HAProxy processes started here from each instance's user data, as cloud-init would: the
//! emulator gives VPC instances loopback private addresses (127.0.96.x), so the controller's
//! runtime API probe really crosses a "private network" to a real HAProxy.

mod harness;

use serde_json::json;
use stage::cloud::lb::haproxy;
use stage::cloud::lb::remote::{self, Placement, RemoteEvent, RemoteLb, VM_DIR};
use stage::cloud::lb::render::Paths;
use stage::cloud::lb::Spec;
use stage::cloud::vultr::{ApiKey, Client, Instance, Settings};
use stage::cloud::vultr_emulator::{Emulator, EmulatorConfig, Lifecycle};
use std::path::Path;
use std::time::{Duration, Instant};

const KEY: &str = "TEST-KEY-lbremote";

fn have_haproxy() -> bool {
    if haproxy::binary().is_ok() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("haproxy is not installed; scripts/setup installs it");
    }
    eprintln!("skipping: haproxy is not installed (scripts/setup installs it)");
    false
}

fn setup() -> (Emulator, Client) {
    let emu = Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            api_key: KEY.into(),
            lifecycle: Lifecycle::scaled(Duration::from_millis(30)),
            vpc_prefix: "127.0.96.".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let c = Client::new(Settings {
        endpoint: emu.endpoint(),
        api_key: Some(ApiKey::new(KEY)),
        timeout: Duration::from_secs(5),
        retries: 2,
        backoff: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        per_page: 100,
    })
    .unwrap();
    (emu, c)
}

fn spec(port: u16) -> Spec {
    Spec::from_json(
        "lb.create",
        &json!({"name": "edge", "listen": format!("127.0.0.1:{port}"),
                "backends": ["127.0.0.1:1", "127.0.0.1:2"],
                "health": {"protocol": "tcp", "interval": 1, "timeout": 0.5}}),
    )
    .unwrap()
}

fn placement(reserved_ip: &str) -> Placement {
    Placement::from_json(
        "placement",
        &json!({"provider": "vultr", "region": "icn", "plan": "vc2-1c-1gb",
                "reserved_ip": reserved_ip, "confirm": 0.3, "interval": 0.1, "boot_timeout": 10}),
    )
    .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// "Boots" a VM: reads its user data from the API, takes the config cloud-init would write
/// (private address filled in), checks it with `haproxy -c` and runs it. Returns the master pid.
async fn boot(c: &Client, inst: &Instance, spec: &Spec, root: &Path) -> i32 {
    let ud = String::from_utf8(c.user_data(&inst.id).await.unwrap()).unwrap();
    assert!(ud.starts_with("#cloud-config\n"), "{ud}");
    assert!(
        ud.contains("  - haproxy\n") && ud.contains(&format!("sh {VM_DIR}/boot.sh")),
        "{ud}"
    );
    assert!(!inst.internal_ip.is_empty(), "the LB VM is in a VPC");
    let cfg = remote::config_from_user_data(&ud, &inst.internal_ip).expect("a haproxy.cfg in the user data");
    assert_eq!(
        cfg,
        remote::vm_config(spec, &inst.internal_ip),
        "the rendered config, as is"
    );
    assert!(
        cfg.contains(&format!("stats socket {}:9999 level admin", inst.internal_ip)),
        "runtime API on the private address only: {cfg}"
    );
    let dir = root.join(&inst.id);
    std::fs::create_dir_all(&dir).unwrap();
    let paths = Paths::new(&dir);
    std::fs::write(&paths.config, cfg.replace(VM_DIR, dir.to_str().unwrap())).unwrap();
    let bin = haproxy::binary().unwrap();
    haproxy::validate(&bin, &paths.config).expect("haproxy -c accepts the VM's config");
    haproxy::start(&bin, &paths).expect("the VM's haproxy starts")
}

async fn check_until(
    lb: &mut RemoteLb,
    c: &Client,
    within: Duration,
    mut stop: impl FnMut(&RemoteLb, Option<&RemoteEvent>) -> bool,
) -> Vec<RemoteEvent> {
    let t0 = Instant::now();
    let mut events = Vec::new();
    loop {
        let ev = lb.check(c).await.unwrap();
        if let Some(e) = &ev {
            events.push(e.clone());
        }
        if stop(lb, ev.as_ref()) {
            return events;
        }
        assert!(
            t0.elapsed() < within,
            "not done within {within:?}; events so far: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn remote_lb_fails_over_to_a_new_vm_and_moves_the_reserved_ip() {
    if !have_haproxy() {
        return;
    }
    let (emu, c) = setup();
    let root = tempfile::tempdir().unwrap();
    let ip = c.reserved_ip_create("icn", "v4", Some("edge")).await.unwrap();
    let spec = spec(free_port());
    let mut lb = RemoteLb::provision(&c, spec.clone(), placement(&ip.id))
        .await
        .unwrap();
    let first = lb.instance.clone();
    assert!(first.is_ready(), "{}", first.state_line());
    assert_eq!(first.label, "lb-edge");
    assert!(first.tags.contains(&"stage-lb-edge".to_string()));
    assert_eq!(
        c.reserved_ip(&ip.id).await.unwrap().instance_id,
        first.id,
        "IP attached"
    );

    // Booting: the probe fails until HAProxy runs, which is not a crash.
    assert_eq!(lb.check(&c).await.unwrap(), None);
    assert!(!lb.up_once);
    let pid1 = boot(&c, &first, &spec, root.path()).await;
    check_until(&mut lb, &c, Duration::from_secs(5), |lb, _| lb.up_once).await;
    let info = remote::runtime_command(
        remote::runtime_addr(&first).unwrap(),
        "show servers state",
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert!(
        info.contains("be_edge"),
        "runtime API reached over the private address: {info}"
    );

    // The crash: the API reports the VM stopped, and its HAProxy is gone.
    let t0 = Instant::now();
    assert!(emu.crash(&first.id));
    haproxy::stop(pid1);
    let mut booted: Option<i32> = None;
    let events = {
        let mut evs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(ev) = lb.check(&c).await.unwrap() {
                evs.push(ev);
            }
            if booted.is_none() {
                if let Some(new) = lb.replacing.clone() {
                    // cloud-init runs on the replacement once it has its private address.
                    let seen = c.get(&new.id).await.unwrap();
                    if !seen.internal_ip.is_empty() {
                        booted = Some(boot(&c, &seen, &spec, root.path()).await);
                    }
                }
            }
            if evs.iter().any(|e: &RemoteEvent| e.state == "replaced") {
                break evs;
            }
            assert!(Instant::now() < deadline, "no fail-over; events {evs:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let took = t0.elapsed();
    let states: Vec<&str> = events.iter().map(|e| e.state.as_str()).collect();
    assert_eq!(states, ["down", "replaced"], "{events:?}");
    assert!(events[0].reason.contains("stopped"), "{}", events[0].reason);
    let second = lb.instance.clone();
    assert_ne!(second.id, first.id);
    assert_eq!(events[1].new_instance.as_deref(), Some(second.id.as_str()));
    assert_eq!(events[1].reserved_ip.as_deref(), Some(ip.id.as_str()));
    assert_eq!(
        c.reserved_ip(&ip.id).await.unwrap().instance_id,
        second.id,
        "IP moved"
    );
    let e = c.get(&first.id).await.unwrap_err();
    assert_eq!(
        e.status(),
        Some(404),
        "the old VM is destroyed: it was not coming back"
    );
    assert_eq!(emu.instance_count(), 1);
    assert_eq!(lb.failovers, 1);
    assert!(remote::probe(&second).await, "the new VM's runtime API answers");
    eprintln!(
        "remote fail-over (emulator, confirm 0.3 s): {:.2} s",
        took.as_secs_f64()
    );

    lb.delete(&c).await.unwrap();
    assert_eq!(emu.instance_count(), 0);
    assert_eq!(
        c.reserved_ip(&ip.id).await.unwrap().instance_id,
        "",
        "kept, detached"
    );
    if let Some(p) = booted {
        haproxy::stop(p);
    }
}

#[tokio::test]
async fn remote_lb_keeps_the_old_vm_when_it_comes_back_first() {
    if !have_haproxy() {
        return;
    }
    let (emu, c) = setup();
    let root = tempfile::tempdir().unwrap();
    let ip = c.reserved_ip_create("icn", "v4", None).await.unwrap();
    let spec = spec(free_port());
    let mut lb = RemoteLb::provision(&c, spec.clone(), placement(&ip.id))
        .await
        .unwrap();
    let first = lb.instance.clone();
    let pid = boot(&c, &first, &spec, root.path()).await;
    check_until(&mut lb, &c, Duration::from_secs(5), |lb, _| lb.up_once).await;
    // The VM stops (its HAProxy keeps its state), a replacement is started...
    assert!(emu.crash(&first.id));
    let evs = check_until(&mut lb, &c, Duration::from_secs(5), |_, e| e.is_some()).await;
    assert_eq!(evs[0].state, "down");
    let replacement = lb.replacing.clone().expect("a replacement is being created");
    // ...and the old VM is started again before the replacement serves.
    c.action(&first.id, "start").await.unwrap();
    let evs = check_until(&mut lb, &c, Duration::from_secs(5), |_, e| e.is_some()).await;
    assert_eq!(evs[0].state, "recovered", "{evs:?}");
    assert_eq!(lb.instance.id, first.id);
    assert!(lb.replacing.is_none());
    assert_eq!(
        c.get(&replacement.id).await.unwrap_err().status(),
        Some(404),
        "replacement destroyed"
    );
    assert_eq!(
        c.reserved_ip(&ip.id).await.unwrap().instance_id,
        first.id,
        "the IP did not move"
    );
    assert_eq!(lb.failovers, 0);
    lb.delete(&c).await.unwrap();
    haproxy::stop(pid);
}

#[tokio::test]
async fn remote_lb_bad_placement_is_refused_before_any_vm() {
    let (emu, c) = setup();
    let other = c.reserved_ip_create("ewr", "v4", None).await.unwrap();
    let e = RemoteLb::provision(&c, spec(free_port()), placement(&other.id))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("placement.reserved_ip") && e.contains("region ewr"),
        "{e}"
    );
    let e = RemoteLb::provision(
        &c,
        spec(free_port()),
        placement("00000000-0000-4000-8000-000000000000"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("reserved IP not found"), "{e}");
    let mut p = placement(&other.id);
    p.reserved_ip = None;
    p.plan = "vc2-9c-9gb".into();
    let e = RemoteLb::provision(&c, spec(free_port()), p)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("Invalid plan: vc2-9c-9gb"), "{e}");
    assert_eq!(emu.instance_count(), 0);
}

#[test]
fn lua_remote_lb_create_failover_delete() {
    if !have_haproxy() {
        return;
    }
    let (emu, _c) = setup();
    let conf = json!({"%vultr": {"endpoint": emu.endpoint(), "api_key": KEY, "retries": 2}});
    harness::run_scenario_with("lb/remote.lua", |home| {
        home.write("conf/stage.json", &conf.to_string())
    });
    assert_eq!(emu.instance_count(), 0, "the scenario's VMs are destroyed");
    assert!(emu.reserved_ips().is_empty());
}

#[test]
fn remote_lb_survives_a_node_restart() {
    if !have_haproxy() {
        return;
    }
    let (emu, _c) = setup();
    let home = harness::TestHome::new();
    let out = tempfile::tempdir().unwrap();
    home.write(
        "conf/stage.json",
        &json!({"%vultr": {"endpoint": emu.endpoint(), "api_key": KEY, "retries": 2}}).to_string(),
    );
    home.write(
        "preload/01-lb-env.lua",
        &format!("LB_ENV = {{ out = {:?} }}\n", out.path().display().to_string()),
    );
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lua/lb/remote_restart.lua"),
    )
    .unwrap();
    home.write("package/start.lua", &text);
    let stop = |child: std::process::Child| {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        harness::wait_with_output(child, Duration::from_secs(10))
    };
    let wait = |p: &Path| {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if p.exists() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    let node = home.spawn();
    let first = out.path().join("first");
    let created = wait(&first);
    let (code, log1) = stop(node);
    assert!(created, "the first run did not create the lb:\n{log1}");
    assert_eq!(code, Some(0), "{log1}");
    assert_eq!(emu.instance_count(), 1, "the VM outlives the node");
    assert!(home.path().join("var/lb/remote/edge.json").exists());
    let node = home.spawn();
    let second = out.path().join("second");
    let restored = wait(&out.path().join("deleted"));
    let (_, log2) = stop(node);
    assert!(
        restored,
        "the second run did not restore and delete the lb:\n{log2}"
    );
    assert_eq!(
        std::fs::read_to_string(&first).unwrap(),
        std::fs::read_to_string(&second).unwrap(),
        "the same VM and reserved IP after the restart"
    );
    assert!(log2.contains("lb edge: restored on vm"), "{log2}");
    assert_eq!(emu.instance_count(), 0, "deleted");
    assert!(
        !home.path().join("var/lb/remote/edge.json").exists(),
        "record forgotten"
    );
}
