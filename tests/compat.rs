//! STAGE's API surface (issue 11, shared/reference/stage-compat.md §1, §4): its config
//! shape, logger, stage.* forms, sandbox, bundle.proxy/random, process and the Lua 5.3
//! names, one Lua scenario each under tests/lua/compat/, asserting STAGE's documented
//! behaviour.

#[macro_use]
mod harness;

use harness::{stage_bin, TestHome};
use std::process::Command;

scenarios! {
    process_forms => "compat/process_forms.lua",
    sandbox => "compat/sandbox.lua",
    bundle_forms => "compat/bundle_forms.lua",
    lua53 => "compat/lua53.lua",
    lua53_off => "compat/lua53_off.lua",
    thread_state => "compat/thread_state.lua",
    viewof => "compat/viewof.lua",
}

#[test]
fn config_shape_runs() {
    harness::run_scenario_with("compat/config.lua", |home| {
        home.write("extra/list.json", r#"["extra/a.lua", "extra/b.lua"]"#);
        home.write(
            "extra/a.lua",
            "EXTRA_A = 'a'; EXTRA_ORDER = (EXTRA_ORDER or '') .. 'a'",
        );
        home.write(
            "extra/b.lua",
            "EXTRA_B = 'b'; EXTRA_ORDER = (EXTRA_ORDER or '') .. 'b'",
        );
    });
}

#[test]
fn stage_forms() {
    harness::run_scenario_with("compat/stage_forms.lua", |home| {
        home.write(
            "package/grp/sub.lua",
            "return { f = function (a, b) return (a or 0) + (b or 0) end }",
        );
        home.write(
            "package/lib1.lua",
            "return function (...) return select('#', ...), ... end",
        );
    });
}

#[test]
fn logger_forms() {
    std::env::set_var("STAGE_COMPAT_WORD", "word");
    let out = harness::run_scenario_output("compat/logger.lua", |_| {});
    let line = |needle: &str| -> String {
        out.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{out}"))
            .to_string()
    };
    assert!(line("many\t1\ttrue\tnil\tend").contains("INFO"), "{out}");
    let routed = line("routed inline\tvalue");
    assert!(routed.contains("WARN") && routed.contains("bot"), "{routed}");
    let out_line = line("word package/start.lua [main chunk:");
    assert!(
        out_line.contains("ERROR") && out_line.contains("bot"),
        "{out_line}"
    );
    assert!(out_line.ends_with("] - msg"), "{out_line}");
    line("[    word] [wor] []");
    line("a\tb");
}

/// A home whose conf/stage.json has every key of STAGE's sample config (bin/conf/stage.json,
/// rewritten here) passes `stage check` with warnings only. One key is added: this build
/// authenticates cluster datagrams and refuses `#cluster` without `#cluster-key`
/// (docs/porting-from-stage.md).
#[test]
fn stage_sample_config_passes_check() {
    let home = TestHome::new();
    home.write(
        "conf/stage.json",
        r##"{
    "#license": ["LICENSE-NAME", "0123456789abcdef"],
    "#services": {"tcp": ["0.0.0.0:18801"]},
    "#router": [1500, 900],
    "#cluster": [19801],
    "#cluster-key": "env:STAGE_COMPAT_CLUSTER_KEY",
    "#threads": [10, 10000],
    "#startup": [
        ["=route+route"], ["=ticket+ticket"], ["index.so+index"], ["curl.so+curl"],
        ["luajit.so+stage"]
    ],
    "curl.so+curl": {"user-agent": "compat-test/1.0", "verbose": 0, "timeout": 5000},
    "lua.so+process": {
        "%preload": "preload",
        "%package": ["package", "rollback", "[0]lib", "[0]"],
        "%odbc": {},
        "%cluster": "tcp://[::]:18081?bson=64k,128k",
        "lua.so+process": "start"
    },
    "lua.so": {
        "%preload": "preload",
        "%package": ["package", "rollback", "[0]lib", "[0]"],
        "%odbc": {},
        "%cluster": ["tcp://127.0.0.1:18081?bson=64k,128k"],
        "%reflush": 30,
        "lua.so+stage": "start"
    },
    "luajit.so": {
        "%preload": "preload",
        "%package": ["package", "rollback", "[0]lib", "[0]"],
        "%odbc": {},
        "%cluster": "tcp://[::]:18081?bson=64k,128k",
        "luajit.so+stage": "start"
    },
    "=ticket+ticket": [1000, {"odbc": 10}],
    "index.so+index": ["index/", 128, 1000]
}"##,
    );
    home.write("package/start.lua", "logger.info('started')");
    let out = Command::new(stage_bin())
        .arg("check")
        .arg(home.path())
        .env("STAGE_COMPAT_CLUSTER_KEY", "compat-test-cluster-key-0123456789")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("warning:")).collect();
    // (index.so is built in now: no warning for it.)
    assert!(!warnings.iter().any(|l| l.contains("index.so")), "{text}");
    for w in ["\"lua.so\", \"luajit.so\"", "lua.so+process", "%reflush"] {
        assert!(
            warnings.iter().any(|l| l.contains(w)),
            "no warning about {w}:\n{text}"
        );
    }
    // one warning each: no duplicates
    let mut sorted = warnings.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), warnings.len(), "{text}");

    // an unknown key is still an error naming its JSON path
    home.write(
        "conf/stage.json",
        r##"{"luajit.so": {"%preload": "preload", "%clustr": "x"}}"##,
    );
    let out = Command::new(stage_bin())
        .arg("check")
        .arg(home.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("luajit.so.%clustr: unknown key"), "{text}");
}
