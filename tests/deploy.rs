//! Package deploy through the admin API (`PUT /packages`, `GET /packages`,
//! `POST /packages/rollback`) with curl against a real node on loopback, bundles made by
//! Python's `tarfile`: a good deploy changes what an HTTP handler answers (hot reload), bad
//! bundles (path traversal, absolute path, symlink, hard link, oversize compressed and
//! decompressed, syntax error, not gzip) are refused with the right status and leave the
//! package (its hash) untouched, a rollback restores the old answer, no token → 401.

mod harness;

use harness::{curl_status, free_tcp_port, stage_bin, wait_with_output, TestHome};
use serde_json::Value as Json;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "admin-token-0123456789abcdef";

/// `curl` with `args`; returns (status, body).
fn curl(args: &[&str], url: &str) -> (u16, String) {
    curl_status(args, url, 10)
}

fn start_lua(hport: u16) -> String {
    format!("broker.ready(\"http://127.0.0.1:{hport}\", function(req) return stage.load(\"answer\") end)\n")
}

fn json(body: &str) -> Json {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Makes the bundles with Python's tarfile, in `dir`.
const MAKE: &str = r#"
import io, sys, tarfile
d = sys.argv[1]
start = open(sys.argv[2]).read().encode()
def bundle(name, entries, fmt="w:gz"):
    with tarfile.open(f"{d}/{name}", fmt) as t:
        for e in entries:
            kind, path = e[0], e[1]
            info = tarfile.TarInfo(path)
            if kind == "file":
                info.size = len(e[2]); t.addfile(info, io.BytesIO(e[2]))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE; t.addfile(info)
            elif kind == "sym":
                info.type = tarfile.SYMTYPE; info.linkname = e[2]; t.addfile(info)
            elif kind == "hard":
                info.type = tarfile.LNKTYPE; info.linkname = e[2]; t.addfile(info)
good = [("dir", "package"), ("file", "package/start.lua", start),
        ("file", "package/answer.lua", b"return 'v2'\n"), ("dir", "package/lib"),
        ("file", "package/lib/util.lua", b"return {}\n")]
bundle("good.tgz", good)
bundle("traversal.tgz", good[:2] + [("file", "package/../../escaped.lua", b"return 1\n")])
bundle("absolute.tgz", good[:2] + [("file", "/tmp/stage-deploy-absolute.lua", b"return 1\n")])
bundle("symlink.tgz", good[:2] + [("sym", "package/answer.lua", "/etc/passwd")])
bundle("hardlink.tgz", good[:2] + [("hard", "package/answer.lua", "package/start.lua")])
bundle("syntax.tgz", good[:2] + [("file", "package/answer.lua", b"return 'v3'\n\nlocal x = = 1\n")])
bundle("outside.tgz", [("file", "conf/stage.json", b"{}")])
# 64 KiB of zeros compress to almost nothing: only the decompressed size is over 32 KiB.
bundle("bomb.tgz", good[:2] + [("file", "package/big.lua", b"-" * 65536)])
with open(f"{d}/big.bin", "wb") as f:
    import os; f.write(os.urandom(40000))
with open(f"{d}/notgz.tgz", "wb") as f:
    f.write(b"this is not gzip")
"#;

struct Node {
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Node {
    fn stop(&mut self) -> String {
        match self.child.take() {
            Some(mut c) => {
                let _ = c.kill();
                wait_with_output(c, Duration::from_secs(5)).1
            }
            None => String::new(),
        }
    }
}

fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    harness::wait_for(limit, || f().then_some(())).is_some()
}

#[test]
fn deploy_checks_swaps_and_rolls_back() {
    let (hport, aport) = (free_tcp_port(), free_tcp_port());
    let h = TestHome::new();
    h.write(
        "conf/stage.json",
        &format!(
            r##"{{"#admin": {{"listen": "127.0.0.1:{aport}", "token": "env:STAGE_ADMIN_TOKEN", "packages": "32k"}}}}"##
        ),
    );
    h.write("package/start.lua", &start_lua(hport));
    h.write("package/answer.lua", "return 'v1'\n");
    let bundles = h.path().join("bundles");
    std::fs::create_dir(&bundles).unwrap();
    let start_copy = h.path().join("bundles/start.lua");
    std::fs::write(&start_copy, start_lua(hport)).unwrap();
    let made = Command::new("python3")
        .args(["-c", MAKE])
        .arg(&bundles)
        .arg(&start_copy)
        .output()
        .expect("python3");
    assert!(
        made.status.success(),
        "making bundles: {}",
        String::from_utf8_lossy(&made.stderr)
    );

    let mut node = Node {
        child: Some(
            Command::new(stage_bin())
                .arg("run")
                .arg(h.path())
                .env("STAGE_LOG", "info")
                .env("STAGE_ADMIN_TOKEN", TOKEN)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start stage"),
        ),
    };
    let app = format!("http://127.0.0.1:{hport}/");
    let admin = format!("http://127.0.0.1:{aport}");
    let packages = format!("{admin}/packages");
    let auth = format!("user: {TOKEN}");
    let answer = || curl(&[], &app).1;
    if !wait_for(Duration::from_secs(15), || answer() == "v1") {
        panic!("the node did not answer v1:\n{}", node.stop());
    }
    let hash = || {
        let (code, body) = curl(&["-H", &auth], &packages);
        assert_eq!(code, 200, "{body}");
        json(&body)
    };
    let v1 = hash();
    let v1_hash = v1["running"]["hash"].as_str().unwrap().to_string();
    assert_eq!(v1_hash.len(), 64, "{v1}");
    assert_eq!(v1["running"]["files"], 2, "{v1}");
    assert!(v1["previous"].is_null(), "{v1}");
    let put = |file: &str, token: bool| {
        let data = format!("@{}", bundles.join(file).display());
        let mut args = vec!["-X", "PUT", "--data-binary", data.as_str()];
        if token {
            args.extend(["-H", auth.as_str()]);
        }
        curl(&args, &packages)
    };

    // No token: 401, nothing written.
    let (code, body) = put("good.tgz", false);
    assert_eq!(code, 401, "{body}");
    assert_eq!(hash()["running"]["hash"], v1_hash.as_str());

    // Bad bundles: the right status, a message naming the entry, the package unchanged.
    let bad: &[(&str, u16, &str)] = &[
        ("traversal.tgz", 400, "package/../../escaped.lua"),
        ("absolute.tgz", 400, "absolute"),
        ("symlink.tgz", 400, "symbolic link"),
        ("hardlink.tgz", 400, "hard link"),
        ("syntax.tgz", 400, "package/answer.lua:3:"),
        ("outside.tgz", 400, "conf/stage.json"),
        ("notgz.tgz", 400, "gzip"),
        ("bomb.tgz", 413, "decompressed"),
        ("big.bin", 413, "compressed"),
    ];
    for (file, status, says) in bad {
        let (code, body) = put(file, true);
        assert_eq!(code, *status, "{file}: {body}");
        assert!(body.contains(says), "{file}: {body:?} does not say {says:?}");
        let now = hash();
        assert_eq!(
            now["running"]["hash"],
            v1_hash.as_str(),
            "{file} changed the package"
        );
        assert!(now["previous"].is_null(), "{file} wrote package.prev: {now}");
        assert!(
            !h.path().join("package.next").exists(),
            "{file} left package.next"
        );
        assert!(
            !h.path().join("escaped.lua").exists() && !Path::new("/tmp/stage-deploy-absolute.lua").exists()
        );
    }
    assert_eq!(answer(), "v1");

    // A good bundle: hot reloaded, the old version kept as previous.
    let (code, body) = put("good.tgz", true);
    assert_eq!(code, 200, "{body}");
    let v2 = json(&body);
    let v2_hash = v2["running"]["hash"].as_str().unwrap().to_string();
    assert_ne!(v2_hash, v1_hash);
    assert_eq!(v2["previous"]["hash"], v1_hash.as_str(), "{v2}");
    assert_eq!(v2["running"]["files"], 3, "{v2}");
    assert_eq!(hash()["running"]["hash"], v2_hash.as_str());
    if !wait_for(Duration::from_secs(10), || answer() == "v2") {
        panic!("the handler did not answer v2 after the deploy:\n{}", node.stop());
    }
    assert!(h.path().join("package/lib/util.lua").is_file());

    // A bad bundle now leaves v2 running and v1 as previous.
    let (code, body) = put("syntax.tgz", true);
    assert_eq!(code, 400, "{body}");
    let now = hash();
    assert_eq!(now["running"]["hash"], v2_hash.as_str());
    assert_eq!(now["previous"]["hash"], v1_hash.as_str());

    // Rollback: v1 answers again; a second rollback swaps back to v2.
    let rollback = format!("{packages}/rollback");
    let (code, body) = curl(&["-X", "POST"], &rollback);
    assert_eq!(code, 401, "{body}");
    let (code, body) = curl(&["-X", "POST", "-H", &auth], &rollback);
    assert_eq!(code, 200, "{body}");
    let back = json(&body);
    assert_eq!(back["running"]["hash"], v1_hash.as_str(), "{back}");
    assert_eq!(back["previous"]["hash"], v2_hash.as_str(), "{back}");
    if !wait_for(Duration::from_secs(10), || answer() == "v1") {
        panic!(
            "the handler did not answer v1 after the rollback:\n{}",
            node.stop()
        );
    }
    let (code, body) = curl(&["-X", "POST", "-H", &auth], &rollback);
    assert_eq!(code, 200, "{body}");
    if !wait_for(Duration::from_secs(10), || answer() == "v2") {
        panic!(
            "the handler did not answer v2 after rolling the rollback back:\n{}",
            node.stop()
        );
    }
    let (code, body) = curl(&["-H", &auth], &rollback);
    assert_eq!(code, 405, "{body}");

    // Every change is logged with who and what.
    let log = node.stop();
    assert!(
        log.contains(&format!(
            "(token) deploy: package/ is now {v2_hash} (previous {v1_hash})"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "(token) rollback: package/ is now {v1_hash} (previous {v2_hash})"
        )),
        "{log}"
    );
    assert!(
        log.contains("(token) deploy refused: entry \"package/../../escaped.lua\""),
        "{log}"
    );
}
