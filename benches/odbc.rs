//! `scripts/bench odbc`: point reads per second through `odbc` from Lua (the release `stage`
//! binary) against the same queries through odbc-api directly in Rust, in the same run, on
//! SQLite and PostgreSQL; then whether a slow query (`pg_sleep(1)`) in one coroutine stalls
//! the instance's other callbacks. Every loop is bounded in count and time.

use odbc_api::{ConnectionOptions, Cursor, Environment, IntoParameter, Nullable};
use std::process::Command;
use std::time::Instant;

const ROWS: i64 = 1000;
const MAX_QUERIES: usize = 50_000;
const SECONDS: f64 = 3.0;

fn pg_conn() -> String {
    std::env::var("STAGE_TEST_PG").unwrap_or_else(|_| {
        "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=5432;DATABASE=stage_test;UID=stage;PWD=stage;"
            .into()
    })
}

/// The next pseudo-random id in 1..=ROWS (xorshift; the same sequence in Lua).
fn next_id(state: &mut u64) -> i64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state % ROWS as u64) as i64 + 1
}

fn setup(env: &Environment, conn_str: &str) {
    let conn = env
        .connect_with_connection_string(conn_str, ConnectionOptions::default())
        .expect("connect");
    conn.execute("DROP TABLE IF EXISTS bench_users", (), None)
        .expect("drop");
    conn.execute(
        "CREATE TABLE bench_users (id INT PRIMARY KEY, name VARCHAR(40), level INT)",
        (),
        None,
    )
    .expect("create");
    conn.set_autocommit(false).unwrap();
    for id in 1..=ROWS {
        let name = format!("user{id}");
        conn.execute(
            "INSERT INTO bench_users (id, name, level) VALUES (?, ?, ?)",
            (&id, &name.as_str().into_parameter(), &(id % 100)),
            None,
        )
        .expect("insert");
    }
    conn.commit().unwrap();
    conn.set_autocommit(true).unwrap();
}

/// Direct odbc-api: execute, read each column with get_data, as a plain Rust program would.
fn direct(env: &Environment, conn_str: &str) -> (usize, f64) {
    let conn = env
        .connect_with_connection_string(conn_str, ConnectionOptions::default())
        .expect("connect");
    let mut state = 88172645463325252u64;
    let start = Instant::now();
    let mut n = 0;
    let mut name = Vec::new();
    while n < MAX_QUERIES && start.elapsed().as_secs_f64() < SECONDS {
        let id = next_id(&mut state);
        let mut cursor = conn
            .execute("SELECT id, name, level FROM bench_users WHERE id = ?", &id, None)
            .expect("query")
            .expect("a result set");
        let mut row = cursor.next_row().expect("fetch").expect("a row");
        let mut got = Nullable::<i64>::null();
        row.get_data(1, &mut got).unwrap();
        row.get_text(2, &mut name).unwrap();
        let mut level = Nullable::<i64>::null();
        row.get_data(3, &mut level).unwrap();
        assert_eq!(got.into_opt(), Some(id));
        n += 1;
    }
    (n, n as f64 / start.elapsed().as_secs_f64())
}

/// The same with `threads` connections on as many threads (the pool's parallelism).
fn direct_parallel(env: &Environment, conn_str: &str, threads: usize) -> f64 {
    let start = Instant::now();
    let total: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| direct(env, conn_str).0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

const LUA_POINT_READS: &str = r#"
local conn, coroutines, max_n, seconds = CONN, COROUTINES, MAX_N, SECONDS
local done_n, finished, started = 0, 0, process.tick
local function worker(seed)
    local state = seed
    odbc.new(conn, function (adp)
        while done_n < max_n and process.tick - started < seconds do
            -- xorshift64, the same sequence as the Rust baseline
            state = state ~ (state << 13); state = state ~ (state >> 7); state = state ~ (state << 17)
            local id = (state % 1000) + 1
            if id < 1 then id = id + 1000 end
            local row = adp.execute({ "SELECT id, name, level FROM bench_users WHERE id = ?", "i" }, id).fetch()
            if row.id ~= id then error("wrong row " .. tostring(row.id) .. " for " .. id) end
            done_n = done_n + 1
        end
    end)
    finished = finished + 1
    if finished == coroutines then
        local elapsed = process.tick - started
        logger.info(string.format("BENCH queries=%d seconds=%.3f rate=%.1f", done_n, elapsed, done_n / elapsed))
        process.exit(0)
    end
end
for i = 1, coroutines do stage.submit(0, worker, 88172645463325252 + (i - 1) * 7919) end
"#;

const LUA_SLOW_QUERY: &str = r#"
-- A 10 ms task measures how late it runs while another coroutine waits on pg_sleep(1).
local late, samples, slow_done = {}, 0, false
local last = process.tick
stage.addtask(10, function ()
    local now = process.tick
    late[#late + 1] = (now - last) * 1000 - 10
    last = now
    if slow_done then
        table.sort(late)
        local sum = 0
        for _, v in ipairs(late) do sum = sum + v end
        logger.info(string.format("BENCH ticks=%d avg_late_ms=%.2f p99_late_ms=%.2f max_late_ms=%.2f",
            #late, sum / #late, late[math.max(1, math.floor(#late * 0.99))], late[#late]))
        process.exit(0)
    end
    return 10
end)
stage.submit(0, function ()
    local t0 = process.tick
    odbc.new(CONN, function (adp) adp.query("SELECT pg_sleep(1)") end)
    logger.info(string.format("BENCH slow_query_s=%.3f", process.tick - t0))
    slow_done = true
end)
"#;

/// Runs a Lua script in a fresh home with the release binary; returns the BENCH fields.
fn run_lua(script: &str, conn: &str, coroutines: usize) -> Vec<(String, f64)> {
    let home = tempfile::tempdir().unwrap();
    for d in ["conf", "package", "data", "logs"] {
        std::fs::create_dir_all(home.path().join(d)).unwrap();
    }
    std::fs::write(
        home.path().join("conf/stage.json"),
        r##"{"#threads": [4, 1024], "#startup": [["lua+stage"]]}"##,
    )
    .unwrap();
    let header =
        format!("CONN = {conn:?}\nCOROUTINES = {coroutines}\nMAX_N = {MAX_QUERIES}\nSECONDS = {SECONDS}\n");
    std::fs::write(home.path().join("package/start.lua"), header + script).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stage"))
        .arg("run")
        .arg(home.path())
        .env("STAGE_LOG", "info")
        .output()
        .expect("run stage");
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let mut fields = Vec::new();
    for line in text.lines().filter(|l| l.contains("BENCH ")) {
        for kv in line.split("BENCH ").nth(1).unwrap_or("").split_whitespace() {
            if let Some((k, v)) = kv.split_once('=') {
                fields.push((k.to_string(), v.parse().unwrap_or(f64::NAN)));
            }
        }
    }
    assert!(
        out.status.success() && !fields.is_empty(),
        "the Lua benchmark failed:\n{text}"
    );
    fields
}

fn field(fields: &[(String, f64)], k: &str) -> f64 {
    fields
        .iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| *v)
        .unwrap_or(f64::NAN)
}

fn main() {
    let env = Environment::new().expect("odbc environment");
    let dir = tempfile::tempdir().unwrap();
    let sqlite_db = dir.path().join("bench.db");
    let sqlite = format!("DRIVER={{SQLite3}};DATABASE={};", sqlite_db.display());
    let mut targets = vec![("SQLite", sqlite)];
    let pg = pg_conn();
    match env.connect_with_connection_string(
        &pg,
        ConnectionOptions {
            login_timeout_sec: Some(3),
            ..Default::default()
        },
    ) {
        Ok(_) => targets.push(("PostgreSQL", pg.clone())),
        Err(e) => println!("PostgreSQL unreachable ({e}); run scripts/services. Only SQLite is measured."),
    }
    println!("point reads: SELECT id, name, level FROM bench_users WHERE id = ? ({ROWS} rows), up to {MAX_QUERIES} queries or {SECONDS} s each");
    println!(
        "{:<11} {:>11} {:>15} {:>6} | {:>13} {:>16} {:>6}",
        "database", "direct q/s", "Lua 1 coro q/s", "ratio", "direct 4 thr", "Lua 4 coros q/s", "ratio"
    );
    for (name, conn) in &targets {
        setup(&env, conn);
        let (_, direct_rate) = direct(&env, conn);
        let one = field(&run_lua(LUA_POINT_READS, conn, 1), "rate");
        let direct4 = direct_parallel(&env, conn, 4);
        let four = field(&run_lua(LUA_POINT_READS, conn, 4), "rate");
        println!(
            "{name:<11} {direct_rate:>11.0} {one:>15.0} {:>6.2} | {direct4:>13.0} {four:>16.0} {:>6.2}",
            one / direct_rate,
            four / direct4
        );
    }
    if targets.len() > 1 {
        let f = run_lua(LUA_SLOW_QUERY, &pg, 1);
        println!(
            "pg_sleep(1) in one coroutine: took {:.3} s; a 10 ms task meanwhile ran {} times, late by avg {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            field(&f, "slow_query_s"),
            field(&f, "ticks"),
            field(&f, "avg_late_ms"),
            field(&f, "p99_late_ms"),
            field(&f, "max_late_ms")
        );
    }
}
