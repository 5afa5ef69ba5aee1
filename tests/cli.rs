//! The `stage` command line run as a person would: new, check, run, logging, stopping.

mod harness;

use harness::{stage_bin, wait_with_output, TestHome};
use std::process::Command;
use std::time::{Duration, Instant};

fn check(home: &std::path::Path) -> (bool, String) {
    let out = Command::new(stage_bin()).arg("check").arg(home).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn new_home_is_accepted_by_check_and_served_by_run() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("mygame");
    let out = Command::new(stage_bin()).arg("new").arg(&home).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    for d in [
        "conf/stage.json",
        "package/start.lua",
        "lib",
        "rollback",
        "preload",
        "logs",
    ] {
        assert!(home.join(d).exists(), "{d} missing");
    }
    let (ok, text) = check(&home);
    assert!(ok, "{text}");
    assert!(text.contains("ok: 1 script(s), 1 instance(s)"), "{text}");
    // A second `new` into the same directory refuses.
    let out = Command::new(stage_bin()).arg("new").arg(&home).output().unwrap();
    assert!(!out.status.success());
    // `run` serves it: the template logs its greeting, then SIGTERM stops it with exit 0.
    let child = Command::new(stage_bin())
        .arg("run")
        .arg(&home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let (code, out) = wait_with_output(child, Duration::from_secs(6));
    assert_eq!(code, Some(0), "{out}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(out.contains("hello from"), "{out}");
    assert!(out.contains("SIGTERM: stopping"), "{out}");
    let log = std::fs::read_to_string(home.join("logs/stage.log")).unwrap();
    assert!(
        log.contains("hello from"),
        "the rolling file gets the log too: {log}"
    );
}

#[test]
fn check_reports_file_and_line() {
    let home = TestHome::new();
    home.write("package/start.lua", "local x = 1\n");
    home.write("package/bad.lua", "local function f()\n  return 1 +\nend\n");
    home.write("lib/deep/also_bad.lua", "x = = 2\n");
    let (ok, text) = check(home.path());
    assert!(!ok, "{text}");
    assert!(text.contains("package/bad.lua:3:"), "{text}");
    assert!(text.contains("lib/deep/also_bad.lua:1:"), "{text}");
    assert!(text.contains("2 problem(s)"), "{text}");
}

#[test]
fn bad_config_names_the_key() {
    for (conf, expect) in [
        (
            r##"{"#threads": ["many"]}"##,
            "#threads[0]: expected an integer from 1 to 1024",
        ),
        (
            r##"{"#threads": [4, 2305843009213693952]}"##,
            "#threads[1]: expected an integer from 1 to 1048576",
        ),
        (
            r##"{"#threads": [100000, 8]}"##,
            "#threads[0]: expected an integer from 1 to 1024",
        ),
        (
            r##"{"#startup": [["luastage"]]}"##,
            "#startup[0][0]: expected \"engine+stage_id\"",
        ),
        (r##"{"lua": {"%pakage": []}}"##, "lua.%pakage: unknown key"),
        (r##"{"#threads": [1,"##, "invalid JSON"),
        (r##"{"%vultr": {"api_kee": "x"}}"##, "%vultr.api_kee: unknown key"),
    ] {
        let home = TestHome::new();
        home.write("conf/stage.json", conf);
        home.write("package/start.lua", "");
        let (ok, text) = check(home.path());
        assert!(!ok && text.contains(expect), "check of {conf}: {text}");
        let (code, out) = wait_with_output(home.spawn(), Duration::from_secs(10));
        assert_eq!(code, Some(2), "run of {conf}: {out}");
        assert!(out.contains(expect), "run of {conf}: {out}");
    }
}

#[test]
fn stage_sample_config_runs_with_one_warning_per_engine() {
    let home = TestHome::new();
    home.write(
        "conf/stage.json",
        r##"{"#license": "x", "#startup": [["lua.so+stage"], ["curl.so+curl"], ["=route+route"], ["index.so+rank"], ["index.so+rank2"]],
           "index.so": {}}"##,
    );
    home.write("package/start.lua", "stage.sleep(100) done()");
    let (code, out) = wait_with_output(home.spawn(), Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
    // the section named "index.so" is not read (settings go under "index.so+rank")
    assert_eq!(out.matches("engine section \"index.so\"").count(), 1, "{out}");
    // the built-in stages start, numbered after the Lua instances
    assert!(out.contains("started curl#1 (built-in curl)"), "{out}");
    assert!(out.contains("started route#2 (built-in route)"), "{out}");
    assert!(out.contains("started rank#3 (built-in index)"), "{out}");
    assert!(out.contains("started rank2#4 (built-in index)"), "{out}");
}

#[test]
fn logger_formats_and_routes() {
    let home = TestHome::new();
    home.write(
        "package/start.lua",
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/lua/logger/format.lua"
        ))
        .unwrap(),
    );
    let (code, out) = wait_with_output(home.spawn(), Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("[INFO ] stage#0: where: package/start.lua [named:2]"),
        "{out}"
    );
    assert!(
        out.contains("[WARN ] stage#0: user info at line 4 of package/start.lua"),
        "{out}"
    );
    assert!(out.contains("[ERROR] audit: to a group"), "{out}");
    assert!(out.contains("[WARN ] audit: level override"), "{out}");
    assert!(!out.contains("not shown"), "{out}");
    assert!(out.contains("[INFO ] stage#0: printed\t1\ttrue"), "{out}");
}

#[test]
fn syntax_error_in_entry_script_is_reported_and_node_keeps_running() {
    let home = TestHome::new();
    home.write("package/start.lua", "local x = \n\n = 1");
    home.write("rollback/start.lua", "logger.info('rollback start') done()");
    let (code, out) = wait_with_output(home.spawn(), Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("package/start.lua:3:"), "{out}");
    assert!(out.contains("rollback start"), "{out}");
}

#[test]
fn usage_line_is_logged_periodically() {
    let home = TestHome::new();
    home.write("conf/stage.json", r##"{"#usage": 1}"##);
    home.write("package/start.lua", "stage.addtask(1600, function() done() end)");
    let (code, out) = wait_with_output(home.spawn(), Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("USAGE "), "{out}");
    assert!(out.contains("kB"), "{out}");
}

#[test]
fn stop_does_not_wait_for_pending_timers() {
    let home = TestHome::new();
    home.write(
        "package/start.lua",
        "stage.addtask(60000, function() end) stage.submit(0, function() stage.sleep(60000) end)",
    );
    let child = home.spawn();
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let start = Instant::now();
    let (code, out) = wait_with_output(child, Duration::from_secs(6));
    assert_eq!(code, Some(0), "{out}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
}
