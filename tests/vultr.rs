//! The Vultr client, the `vultr` Lua module and `stage vultr …`, all against the emulator
//! (no test reaches the internet).

mod harness;

use serde_json::Value as Json;
use stage::cloud::vultr::{
    ApiKey, Client, CreateRequest, Instance, InstanceFilter, Settings, VultrError, WaitOptions,
};
use stage::cloud::vultr_emulator::{Emulator, EmulatorConfig, Lifecycle};
use std::process::Command;
use std::time::Duration;

const KEY: &str = "TEST-KEY-6f1d2c";

fn emulator(step_ms: u64) -> Emulator {
    Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            api_key: KEY.into(),
            lifecycle: Lifecycle::scaled(Duration::from_millis(step_ms)),
            ..Default::default()
        },
    )
    .expect("start the emulator")
}

fn settings(emu: &Emulator) -> Settings {
    Settings {
        endpoint: emu.endpoint(),
        api_key: Some(ApiKey::new(KEY)),
        timeout: Duration::from_secs(5),
        retries: 4,
        backoff: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        per_page: 100,
    }
}

fn client(emu: &Emulator) -> Client {
    Client::new(settings(emu)).unwrap()
}

fn req(region: &str, plan: &str, os_id: i64) -> CreateRequest {
    CreateRequest {
        region: region.into(),
        plan: plan.into(),
        os_id: Some(os_id),
        ..Default::default()
    }
}

fn api_status(e: &VultrError) -> u16 {
    e.status()
        .unwrap_or_else(|| panic!("expected an API error, got {e}"))
}

#[tokio::test]
async fn catalog_endpoints() {
    let emu = emulator(100);
    let c = client(&emu);
    let regions = c.regions().await.unwrap();
    assert!(regions.iter().any(|r| r.id == "icn" && r.country == "KR"));
    let all = c.plans(None).await.unwrap();
    let vhf = c.plans(Some("vhf")).await.unwrap();
    assert!(!vhf.is_empty() && vhf.len() < all.len());
    assert!(vhf.iter().all(|p| p.kind == "vhf"));
    let one = all.iter().find(|p| p.id == "vc2-1c-1gb").unwrap();
    assert_eq!((one.vcpu_count, one.ram, one.kind.as_str()), (1, 1024, "vc2"));
    assert!(one.locations.contains(&"icn".to_string()));
    let os = c.os().await.unwrap();
    assert!(os.iter().any(|o| o.id == 1743 && o.family == "ubuntu"));
    let cat = c.catalog().await.unwrap();
    assert_eq!(
        (cat.regions.len(), cat.plans.len(), cat.os.len()),
        (regions.len(), all.len(), os.len())
    );
}

#[tokio::test]
async fn instance_endpoints() {
    let emu = emulator(50);
    let c = client(&emu);
    let mut r = req("icn", "vc2-1c-1gb", 1743);
    r.label = Some("game-7".into());
    r.tags = vec!["stage".into(), "rain".into()];
    r.set_user_data(b"#!/bin/sh\necho hi\n");
    let created = c.create(&r).await.unwrap();
    assert_eq!(created.id.len(), 36);
    assert_eq!(created.state_line(), "pending/running/none 0.0.0.0");
    assert!(
        !created.default_password.is_empty(),
        "create shows the default password"
    );
    assert_eq!(
        (created.region.as_str(), created.plan.as_str(), created.os_id),
        ("icn", "vc2-1c-1gb", 1743)
    );
    assert!(
        created.date_created.ends_with("+00:00"),
        "{}",
        created.date_created
    );
    let other = c.create(&req("lax", "vc2-1c-2gb", 2136)).await.unwrap();
    let got = c.get(&created.id).await.unwrap();
    assert_eq!(got.label, "game-7");
    assert_eq!(got.tags, vec!["stage", "rain"]);
    let all = c.instances(&InstanceFilter::default()).await.unwrap();
    assert_eq!(all.len(), 2);
    let tagged = c
        .instances(&InstanceFilter {
            tag: Some("rain".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        tagged.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        vec![created.id.as_str()]
    );
    let in_lax = c
        .instances(&InstanceFilter {
            region: Some("lax".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(in_lax[0].id, other.id);
    let ready = c
        .wait(
            &created.id,
            &WaitOptions {
                timeout: Duration::from_secs(5),
                interval: Duration::from_millis(20),
            },
            |_| async {},
        )
        .await
        .unwrap();
    let by_ip = c
        .instances(&InstanceFilter {
            main_ip: Some(ready.main_ip.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_ip.len(), 1);
    c.action(&created.id, "halt").await.unwrap();
    assert_eq!(c.get(&created.id).await.unwrap().power_status, "stopped");
    assert_eq!(c.get(&created.id).await.unwrap().word(), "stopped");
    c.action(&created.id, "start").await.unwrap();
    assert!(c.get(&created.id).await.unwrap().is_ready());
    c.action(&created.id, "reboot").await.unwrap();
    let rebooting = c.get(&created.id).await.unwrap();
    assert_eq!(
        rebooting.state_line(),
        format!("active/stopped/locked {}", ready.main_ip)
    );
    c.delete(&created.id).await.unwrap();
    let e = c.get(&created.id).await.unwrap_err();
    assert_eq!(api_status(&e), 404);
    assert!(e.to_string().ends_with("http 404: instance not found"), "{e}");
    assert_eq!(emu.instance_count(), 1);
}

#[tokio::test]
async fn pagination_follows_cursors_across_pages() {
    let emu = emulator(100);
    let c = client(&emu);
    for i in 0..7 {
        let mut r = req("ewr", "vc2-1c-1gb", 2136);
        r.label = Some(format!("n{i}"));
        c.create(&r).await.unwrap();
    }
    let small = Client::new(Settings {
        per_page: 2,
        ..settings(&emu)
    })
    .unwrap();
    let before = emu.requests();
    let list = small.instances(&InstanceFilter::default()).await.unwrap();
    assert_eq!(
        emu.requests() - before,
        4,
        "7 instances at 2 per page are 4 pages"
    );
    let labels: Vec<String> = list.iter().map(|i| i.label.clone()).collect();
    assert_eq!(labels, vec!["n0", "n1", "n2", "n3", "n4", "n5", "n6"]);
    let before = emu.requests();
    let regions = small.regions().await.unwrap();
    assert_eq!(regions.len(), 12);
    assert_eq!(emu.requests() - before, 6);
    // The raw page: meta.total is the whole list, links.next a cursor, prev empty on page 1.
    let page: Json = reqwest::Client::new()
        .get(format!("{}/instances?per_page=3", emu.endpoint()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["meta"]["total"], 7);
    assert_eq!(page["instances"].as_array().unwrap().len(), 3);
    assert_ne!(page["meta"]["links"]["next"], "");
    assert_eq!(page["meta"]["links"]["prev"], "");
}

#[tokio::test]
async fn errors_carry_status_and_vultr_message() {
    let emu = emulator(100);
    let bad = Client::new(Settings {
        api_key: Some(ApiKey::new("WRONG-KEY-123")),
        ..settings(&emu)
    })
    .unwrap();
    let e = bad.instances(&InstanceFilter::default()).await.unwrap_err();
    assert_eq!(api_status(&e), 401);
    assert_eq!(
        e.to_string(),
        "vultr GET /instances: http 401: Invalid API token."
    );
    assert!(
        !format!("{e} {e:?}").contains("WRONG-KEY-123"),
        "the key never shows"
    );
    // Public routes work without a key; instance routes need one and say so before any request.
    let anon = Client::new(Settings {
        api_key: None,
        ..settings(&emu)
    })
    .unwrap();
    assert!(!anon.regions().await.unwrap().is_empty());
    assert!(matches!(anon.get("x").await.unwrap_err(), VultrError::NoKey));
    let c = client(&emu);
    let e = c.get("00000000-0000-4000-8000-000000000000").await.unwrap_err();
    assert_eq!(
        (api_status(&e), e.to_string().ends_with("instance not found")),
        (404, true)
    );
    for (r, want) in [
        (req("mars", "vc2-1c-1gb", 1743), "Invalid region: mars."),
        (req("icn", "vc9-1c-1gb", 1743), "Invalid plan: vc9-1c-1gb."),
        (
            req("icn", "vc2-1c-1gb", 99999),
            "Invalid operating system: 99999.",
        ),
        (
            req("icn", "vdc-2c-8gb", 1743),
            "Plan vdc-2c-8gb is not available in region icn.",
        ),
    ] {
        let e = c.create(&r).await.unwrap_err();
        assert_eq!(api_status(&e), 400, "{e}");
        assert!(e.to_string().ends_with(want), "{e}");
    }
    let e = c.get("../plans").await.unwrap_err();
    assert!(matches!(e, VultrError::Invalid(_)), "{e}");
    // Nothing listens: a transport error, with the method and path.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gone = Client::new(Settings {
        endpoint: format!("http://127.0.0.1:{port}/v2"),
        retries: 1,
        ..settings(&emu)
    })
    .unwrap();
    let e = gone.regions().await.unwrap_err();
    assert!(matches!(e, VultrError::Transport { .. }), "{e}");
    assert!(
        e.to_string().starts_with("vultr GET /regions: cannot connect"),
        "{e}"
    );
}

#[tokio::test]
async fn rate_limit_is_retried_with_backoff() {
    let emu = emulator(100);
    let c = client(&emu);
    emu.fail_next(429, 2);
    let before = emu.requests();
    let start = std::time::Instant::now();
    assert!(!c.regions().await.unwrap().is_empty());
    assert_eq!(emu.requests() - before, 3, "two 429s then the answer");
    assert!(
        start.elapsed() >= Duration::from_millis(60),
        "backoff 20 ms then 40 ms"
    );
    // 5xx too, and a POST is retried on 429 (the request was refused, not executed).
    emu.fail_next(503, 1);
    c.os().await.unwrap();
    emu.fail_next(429, 1);
    c.create(&req("icn", "vc2-1c-1gb", 1743)).await.unwrap();
    assert_eq!(emu.instance_count(), 1);
    // Bounded: after the retries, the error surfaces with Vultr's message.
    let once = Client::new(Settings {
        retries: 1,
        ..settings(&emu)
    })
    .unwrap();
    emu.fail_next(429, 2);
    let e = once.regions().await.unwrap_err();
    assert_eq!(api_status(&e), 429);
    assert!(e.to_string().contains("Rate limit reached"), "{e}");
    // The real per-IP limit: a burst over it still completes through retries.
    let limited = Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            api_key: KEY.into(),
            rate_limit: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    let c = Client::new(Settings {
        backoff: Duration::from_millis(300),
        backoff_max: Duration::from_secs(1),
        ..settings(&limited)
    })
    .unwrap();
    for _ in 0..8 {
        c.os().await.unwrap();
    }
    assert!(
        limited.requests() > 8,
        "some requests were refused with 429 and retried"
    );
}

#[tokio::test]
async fn wait_does_not_stop_at_active_while_stopped_and_locked() {
    // Steps of 300 ms polled every 20 ms: no state is missed even on a busy machine.
    let emu = emulator(300);
    let c = client(&emu);
    let inst = c.create(&req("icn", "vc2-1c-1gb", 1743)).await.unwrap();
    let seen = std::cell::RefCell::new(Vec::<Instance>::new());
    let ready = c
        .wait(
            &inst.id,
            &WaitOptions {
                timeout: Duration::from_secs(10),
                interval: Duration::from_millis(20),
            },
            |i| {
                seen.borrow_mut().push(i);
                async {}
            },
        )
        .await
        .unwrap();
    assert!(ready.is_ready());
    let lines: Vec<String> = seen
        .borrow()
        .iter()
        .map(|i| format!("{}/{}/{}", i.status, i.power_status, i.server_status))
        .collect();
    assert_eq!(
        lines,
        vec![
            "pending/running/none",
            "active/stopped/locked",
            "active/running/installingbooting",
            "active/running/ok"
        ]
    );
    let seen = seen.borrow();
    assert_eq!(seen[0].main_ip, "0.0.0.0");
    assert_ne!(seen[1].main_ip, "0.0.0.0", "the address is assigned while locked");
    assert_eq!(ready.main_ip, seen[1].main_ip);
}

#[tokio::test]
async fn wait_times_out_with_the_last_state() {
    let emu = emulator(10_000);
    let c = client(&emu);
    let inst = c.create(&req("icn", "vc2-1c-1gb", 1743)).await.unwrap();
    let start = std::time::Instant::now();
    let e = c
        .wait(
            &inst.id,
            &WaitOptions {
                timeout: Duration::from_millis(300),
                interval: Duration::from_millis(50),
            },
            |_| async {},
        )
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    let msg = e.to_string();
    assert!(matches!(e, VultrError::WaitTimeout { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("instance {} not ready after", inst.id)),
        "{msg}"
    );
    assert!(
        msg.ends_with("(timeout 300 ms); last seen pending/running/none 0.0.0.0"),
        "{msg}"
    );
}

#[tokio::test]
async fn delete_of_a_locked_instance_is_retried() {
    let emu = Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            api_key: KEY.into(),
            lifecycle: Lifecycle::scaled(Duration::from_millis(150)),
            locked_delete_fails: true,
            ..Default::default()
        },
    )
    .unwrap();
    let c = client(&emu);
    let inst = c.create(&req("icn", "vc2-1c-1gb", 1743)).await.unwrap();
    while c.get(&inst.id).await.unwrap().server_status != "locked" {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let strict = Client::new(Settings {
        retries: 0,
        ..settings(&emu)
    })
    .unwrap();
    let e = strict.delete(&inst.id).await.unwrap_err();
    assert_eq!(api_status(&e), 500);
    assert!(e.to_string().ends_with("Server is currently locked"), "{e}");
    // With retries (20, 40, 80, 160 ms) the lock passes and the delete goes through.
    c.delete(&inst.id).await.unwrap();
    assert_eq!(emu.instance_count(), 0);
}

#[tokio::test]
async fn emulator_accepts_what_real_clients_send() {
    let emu = emulator(100);
    let http = reqwest::Client::new();
    // govultr sends explicit nulls for unset fields.
    let body = serde_json::json!({
        "region": "icn", "plan": "vc2-1c-1gb", "os_id": 1743, "label": null, "hostname": null,
        "tags": null, "block_devices": null, "sshkey_id": null, "user_data": null, "backups": "disabled"
    });
    let resp = http
        .post(format!("{}/instances", emu.endpoint()))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let v: Json = resp.json().await.unwrap();
    assert_eq!(v["instance"]["tags"], serde_json::json!([]));
    assert_eq!(v["instance"]["status"], "pending");
    let resp = http
        .post(format!("{}/instances", emu.endpoint()))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"region": "icn", "plan": "vc2-1c-1gb", "os_id": 1743, "tags": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Json = resp.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"error": "tags must be an array of strings.", "status": 400})
    );
    let resp = http
        .delete(format!("{}/instances/{}", emu.endpoint(), "nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

// ---- the Lua module ------------------------------------------------------------------

fn scenario(rel: &str, emu: &Emulator, key: &str) {
    let conf = serde_json::json!({"%vultr": {"endpoint": emu.endpoint(), "api_key": key, "retries": 4}});
    harness::run_scenario_with(rel, |home| home.write("conf/stage.json", &conf.to_string()));
}

#[test]
fn lua_catalog() {
    let emu = emulator(100);
    scenario("vultr/catalog.lua", &emu, KEY);
}

#[test]
fn lua_lifecycle() {
    let emu = emulator(300);
    scenario("vultr/lifecycle.lua", &emu, KEY);
    assert_eq!(emu.instance_count(), 0, "the scenario deletes what it created");
}

#[test]
fn lua_errors() {
    let emu = emulator(10_000);
    emu.fail_next(429, 1);
    scenario("vultr/errors.lua", &emu, KEY);
}

#[test]
fn lua_bad_key() {
    let emu = emulator(100);
    scenario("vultr/bad_key.lua", &emu, "WRONG-KEY-987");
}

// ---- the command line ----------------------------------------------------------------

fn cli(emu: &Emulator, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(harness::stage_bin())
        .arg("vultr")
        .args(["--endpoint", &emu.endpoint()])
        .args(args)
        .env("VULTR_API_KEY", KEY)
        .env_remove("VULTR_ENDPOINT")
        .output()
        .expect("run stage vultr");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_json(emu: &Emulator, args: &[&str]) -> Json {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = cli(emu, &all);
    assert_eq!(code, 0, "stage vultr {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stage vultr {args:?}: not JSON ({e}): {out}"))
}

#[test]
fn cli_subcommands_with_json() {
    let emu = emulator(150);
    let all = cli_json(&emu, &["listall"]);
    assert!(all["regions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == "icn"));
    assert!(all["plans"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == "vc2-1c-1gb"));
    assert!(all["os"].as_array().unwrap().iter().any(|o| o["id"] == 1743));
    assert_eq!(cli_json(&emu, &["regions"]).as_array().unwrap().len(), 12);
    let vhp = cli_json(&emu, &["plans", "--type", "vhp"]);
    assert!(vhp.as_array().unwrap().iter().all(|p| p["type"] == "vhp"));
    assert!(!cli_json(&emu, &["os"]).as_array().unwrap().is_empty());
    let inst = cli_json(
        &emu,
        &[
            "create",
            "icn",
            "vc2-1c-1gb",
            "1743",
            "--label",
            "cli",
            "--tag",
            "stage",
        ],
    );
    let id = inst["id"].as_str().unwrap().to_string();
    assert_eq!(inst["status"], "pending");
    assert_eq!(inst["tags"], serde_json::json!(["stage"]));
    let list = cli_json(&emu, &["list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(cli_json(&emu, &["list", "--tag", "other"]), serde_json::json!([]));
    let sub = cli_json(&emu, &["subdetail", &id]);
    assert_eq!(sub["id"], id.as_str());
    let ready = cli_json(&emu, &["wait", &id, "--interval", "0.02", "--timeout", "10"]);
    assert_eq!(
        (
            ready["status"].as_str(),
            ready["power_status"].as_str(),
            ready["server_status"].as_str()
        ),
        (Some("active"), Some("running"), Some("ok"))
    );
    assert_eq!(cli_json(&emu, &["halt", &id])["action"], "halt");
    assert_eq!(cli_json(&emu, &["subdetail", &id])["power_status"], "stopped");
    assert_eq!(cli_json(&emu, &["start", &id])["action"], "start");
    assert_eq!(cli_json(&emu, &["delete", &id])["deleted"], id.as_str());
    let (code, out, err) = cli(&emu, &["--json", "subdetail", &id]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("http 404: instance not found"), "{err}");
}

#[test]
fn cli_human_output_and_errors() {
    let emu = emulator(100);
    let (code, out, _) = cli(&emu, &["listall"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("REGION") && out.contains("vc2-1c-1gb") && out.contains("Ubuntu 22.04 LTS x64"),
        "{out}"
    );
    let (code, out, _) = cli(&emu, &["create", "icn", "vc2-1c-1gb", "1743"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("created ") && out.contains("pending/running/none"),
        "{out}"
    );
    let (code, out, _) = cli(&emu, &["list"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().next().unwrap().starts_with("ID") && out.lines().count() == 2,
        "{out}"
    );
    let (code, _, err) = cli(&emu, &["create", "mars", "vc2-1c-1gb", "1743"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "stage vultr: vultr POST /instances: http 400: Invalid region: mars."
    );
    // The key from a stage home's %vultr (env: form) wins over VULTR_API_KEY; a wrong one is a 401.
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("conf")).unwrap();
    std::fs::write(
        home.path().join("conf/stage.json"),
        r#"{"%vultr": {"api_key": "env:STAGE_TEST_VULTR_KEY"}}"#,
    )
    .unwrap();
    let out = Command::new(harness::stage_bin())
        .args(["vultr", "list", "--endpoint", &emu.endpoint(), "--home"])
        .arg(home.path())
        .env("VULTR_API_KEY", KEY)
        .env("STAGE_TEST_VULTR_KEY", "WRONG-FROM-HOME")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("http 401: Invalid API token.") && !err.contains("WRONG-FROM-HOME"),
        "{err}"
    );
}

#[test]
fn cli_emulator_serves_until_stopped() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(harness::stage_bin())
        .args(["vultr-emulator", "--port", "0", "--key", KEY, "--step-ms", "50"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let endpoint = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(
        endpoint.starts_with("http://127.0.0.1:") && endpoint.ends_with("/v2"),
        "{line}"
    );
    let out = Command::new(harness::stage_bin())
        .args([
            "vultr",
            "--json",
            "--endpoint",
            &endpoint,
            "create",
            "icn",
            "vc2-1c-1gb",
            "1743",
        ])
        .env("VULTR_API_KEY", KEY)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plan"], "vc2-1c-1gb");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "the emulator exits cleanly on SIGTERM: {status}"
    );
}

#[test]
fn lua_bad_config_names_the_key() {
    let home = harness::TestHome::new();
    home.write("conf/stage.json", r#"{"%vultr": {"api_kee": "x"}}"#);
    home.write("package/start.lua", "done()");
    // The instance cannot start, so the node never calls done(): it is stopped after 3 s.
    let (code, out) = harness::wait_with_output(home.spawn(), Duration::from_secs(3));
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("%vultr.api_kee: unknown key (expected api_key, endpoint, timeout or retries)"),
        "{out}"
    );
}

#[tokio::test]
async fn requests_time_out_and_idempotent_ones_are_retried() {
    let emu = emulator(100);
    let c = Client::new(Settings {
        timeout: Duration::from_millis(200),
        retries: 2,
        ..settings(&emu)
    })
    .unwrap();
    // One slow answer: the GET times out once and succeeds on its retry.
    emu.delay_next(Duration::from_millis(600), 1);
    assert!(!c.os().await.unwrap().is_empty());
    // Always slow: the error says what timed out and after how long.
    emu.delay_next(Duration::from_millis(600), 3);
    let e = c.regions().await.unwrap_err();
    assert_eq!(e.to_string(), "vultr GET /regions: timed out after 200 ms");
    // A POST that timed out is not sent again: it may have been executed.
    let slow_create = Client::new(Settings {
        timeout: Duration::from_millis(200),
        ..settings(&emu)
    })
    .unwrap();
    emu.delay_next(Duration::from_millis(600), 1);
    let before = emu.requests();
    let e = slow_create
        .create(&req("icn", "vc2-1c-1gb", 1743))
        .await
        .unwrap_err();
    assert!(matches!(e, VultrError::Transport { .. }), "{e}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(emu.requests() - before, 1, "create was sent once");
}

#[test]
fn the_key_never_reaches_the_log() {
    let emu = emulator(50);
    emu.fail_next(429, 1);
    let home = harness::TestHome::new();
    let conf = serde_json::json!({"%vultr": {"endpoint": emu.endpoint(), "api_key": KEY}});
    home.write("conf/stage.json", &conf.to_string());
    home.write(
        "package/start.lua",
        r#"local inst = vultr.create { region = "icn", plan = "vc2-1c-1gb", os_id = 1743 }
           logger.info("created " .. inst.id)
           check(vultr.wait(inst.id, { interval = 10, timeout = 5000, on_change = function (i) logger.info(i.server_status) end }))
           local ok, e = pcall(vultr.get, "00000000-0000-4000-8000-000000000000")
           logger.error(e)
           vultr.delete(inst.id)
           done()"#,
    );
    let child = Command::new(harness::stage_bin())
        .arg("run")
        .arg(home.path())
        .env("STAGE_LOG", "trace")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (code, out) = harness::wait_with_output(child, Duration::from_secs(20));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("retrying (1 of 4)"),
        "the 429 retry is logged: {out}"
    );
    assert!(out.contains("http 404: instance not found"), "{out}");
    assert!(!out.contains(KEY), "the api key appears in the log:\n{out}");
}

// ---- reserved IPs --------------------------------------------------------------------

#[tokio::test]
async fn reserved_ips_create_attach_move_detach_delete() {
    let emu = emulator(10);
    let c = client(&emu);
    assert!(c.reserved_ips().await.unwrap().is_empty());
    let r = c.reserved_ip_create("icn", "v4", Some("lb-web")).await.unwrap();
    assert_eq!(r.id.len(), 36);
    assert_eq!(
        (
            r.region.as_str(),
            r.ip_type.as_str(),
            r.label.as_str(),
            r.subnet_size
        ),
        ("icn", "v4", "lb-web", 32)
    );
    assert!(r.subnet.parse::<std::net::Ipv4Addr>().is_ok(), "{}", r.subnet);
    assert_eq!(r.instance_id, "", "created detached");
    let v6 = c.reserved_ip_create("icn", "v6", None).await.unwrap();
    assert!(v6.subnet.parse::<std::net::Ipv6Addr>().is_ok(), "{}", v6.subnet);
    assert_eq!(v6.subnet_size, 64);
    assert_eq!(c.reserved_ips().await.unwrap().len(), 2);

    // The raw shapes: 201 on create, `reserved_ip` / `reserved_ips` + meta, 204 on attach.
    let http = reqwest::Client::new();
    let raw = http
        .post(format!("{}/reserved-ips", emu.endpoint()))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"region": "ewr", "ip_type": "v4"}))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 201);
    let body: Json = raw.json().await.unwrap();
    let raw_id = body["reserved_ip"]["id"].as_str().unwrap().to_string();
    for k in [
        "id",
        "region",
        "ip_type",
        "subnet",
        "subnet_size",
        "label",
        "instance_id",
    ] {
        assert!(body["reserved_ip"].get(k).is_some(), "{k} in {body}");
    }
    let listed: Json = http
        .get(format!("{}/reserved-ips?per_page=2", emu.endpoint()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["reserved_ips"].as_array().unwrap().len(), 2);
    assert_eq!(listed["meta"]["total"], 3);
    assert_ne!(listed["meta"]["links"]["next"], "", "a second page");
    let mut small = settings(&emu);
    small.per_page = 1;
    assert_eq!(
        Client::new(small).unwrap().reserved_ips().await.unwrap().len(),
        3,
        "pages followed"
    );
    c.reserved_ip_delete(&raw_id).await.unwrap();

    let a = c.create(&req("icn", "vc2-1c-1gb", 1743)).await.unwrap();
    let b = c.create(&req("icn", "vc2-1c-1gb", 1743)).await.unwrap();
    let far = c.create(&req("ewr", "vc2-1c-1gb", 1743)).await.unwrap();
    c.reserved_ip_attach(&r.id, &a.id).await.unwrap();
    assert_eq!(c.reserved_ip(&r.id).await.unwrap().instance_id, a.id);
    // One instance at a time, same region only, an existing instance only.
    let e = c.reserved_ip_attach(&r.id, &b.id).await.unwrap_err();
    assert_eq!(api_status(&e), 400);
    assert!(e.to_string().contains("already attached"), "{e}");
    let e = c.reserved_ip_attach(&v6.id, &far.id).await.unwrap_err();
    assert!(e.to_string().contains("another region"), "{e}");
    let e = c
        .reserved_ip_attach(&v6.id, "00000000-0000-4000-8000-000000000000")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("invalid instance_id"), "{e}");
    // Move = detach from a, attach to b.
    let moved = c.reserved_ip_move(&r.id, &b.id).await.unwrap();
    assert_eq!(moved.instance_id, b.id);
    assert_eq!(
        c.reserved_ip_move(&r.id, &b.id).await.unwrap().instance_id,
        b.id,
        "idempotent"
    );
    let relabelled = c.reserved_ip_label(&r.id, "lb-web-2").await.unwrap();
    assert_eq!(relabelled.label, "lb-web-2");
    c.reserved_ip_detach(&r.id).await.unwrap();
    assert_eq!(c.reserved_ip(&r.id).await.unwrap().instance_id, "");
    let e = c.reserved_ip_detach(&r.id).await.unwrap_err();
    assert!(e.to_string().contains("not attached"), "{e}");
    // Deleting an instance detaches its reserved IP; the IP itself stays reserved.
    c.reserved_ip_attach(&r.id, &a.id).await.unwrap();
    c.delete(&a.id).await.unwrap();
    assert_eq!(c.reserved_ip(&r.id).await.unwrap().instance_id, "");
    // Bad input, caught by the client before any request or answered by the API.
    assert!(matches!(
        c.reserved_ip_create("icn", "v5", None).await.unwrap_err(),
        VultrError::Invalid(_)
    ));
    let e = c.reserved_ip_create("xxx", "v4", None).await.unwrap_err();
    assert!(e.to_string().contains("Invalid region: xxx"), "{e}");
    assert!(matches!(
        c.reserved_ip("../x").await.unwrap_err(),
        VultrError::Invalid(_)
    ));
    c.reserved_ip_delete(&r.id).await.unwrap();
    c.reserved_ip_delete(&v6.id).await.unwrap();
    let e = c.reserved_ip(&r.id).await.unwrap_err();
    assert_eq!(api_status(&e), 404);
    assert!(e.to_string().contains("reserved IP not found"), "{e}");
    // Without the key, 401 like the instance endpoints.
    let mut nokey = settings(&emu);
    nokey.api_key = Some(ApiKey::new("WRONG"));
    let e = Client::new(nokey).unwrap().reserved_ips().await.unwrap_err();
    assert_eq!(api_status(&e), 401);
}

#[tokio::test]
async fn vpc_addresses_user_data_and_crash() {
    let emu = emulator(10);
    let c = client(&emu);
    let mut r = req("icn", "vc2-1c-1gb", 2136);
    r.extra.insert("enable_vpc".into(), true.into());
    r.set_user_data(b"#cloud-config\npackages: [haproxy]\n");
    let inst = c.create(&r).await.unwrap();
    assert!(inst.internal_ip.starts_with("10.1.96."), "{}", inst.internal_ip);
    let plain = c.create(&req("icn", "vc2-1c-1gb", 2136)).await.unwrap();
    assert_eq!(plain.internal_ip, "", "no VPC asked, no private address");
    assert_eq!(
        c.user_data(&inst.id).await.unwrap(),
        b"#cloud-config\npackages: [haproxy]\n"
    );
    assert_eq!(c.user_data(&plain.id).await.unwrap(), b"");
    let wo = WaitOptions {
        timeout: Duration::from_secs(5),
        interval: Duration::from_millis(10),
    };
    c.wait(&inst.id, &wo, |_| async {}).await.unwrap();
    assert!(emu.crash(&inst.id));
    let after = c.get(&inst.id).await.unwrap();
    assert_eq!(after.state_line().split(' ').next(), Some("active/stopped/ok"));
    assert_eq!(after.word(), "stopped");
}

#[test]
fn lua_reserved_ips() {
    let emu = emulator(20);
    scenario("vultr/reserved_ips.lua", &emu, KEY);
    assert!(
        emu.reserved_ips().is_empty(),
        "the scenario released what it reserved"
    );
}
