//! The `densefog` library (docs/densefog.md) against real databases: the API router and the
//! job worker as Lua scenarios under tests/lua/densefog/ on SQLite, PostgreSQL and MariaDB,
//! and several `stage` processes sharing one job table (exactly-once, `kill -9` mid-job).
//!
//! PostgreSQL and MariaDB are expected on 127.0.0.1 (`scripts/services`: database
//! `stage_test`, user/password `stage`); when one is unreachable its tests are skipped with a
//! message, except with `CI=true`, where they fail.

mod harness;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tests of one database share its `job` table names; they run one at a time per database.
static SQL_PG: Mutex<()> = Mutex::new(());
static SQL_MY: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, PartialEq)]
enum Db {
    Sqlite,
    Postgres,
    Mysql,
}

impl Db {
    /// The connection; SQLite's file is absolute so that several homes share it.
    fn conn(self, sqlite_file: &Path) -> serde_json::Value {
        match self {
            Db::Sqlite => serde_json::json!({"DRIVER": "SQLite3", "DATABASE": sqlite_file.to_str().unwrap(), ".connectionTimeout": 10000}),
            Db::Postgres => serde_json::Value::String(std::env::var("STAGE_TEST_PG").unwrap_or_else(|_| {
                "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=5432;DATABASE=stage_test;UID=stage;PWD=stage;".into()
            })),
            Db::Mysql => serde_json::Value::String(std::env::var("STAGE_TEST_MYSQL").unwrap_or_else(|_| {
                "DRIVER={MariaDB Unicode};SERVER=127.0.0.1;PORT=3306;DATABASE=stage_test;UID=stage;PWD=stage;".into()
            })),
        }
    }

    fn preload(self) -> &'static str {
        match self {
            Db::Sqlite => r#"DIALECT = "sqlite"; SQL_SLEEP = nil"#,
            Db::Postgres => r#"DIALECT = "postgres"; SQL_SLEEP = "SELECT pg_sleep(0.05)""#,
            Db::Mysql => r#"DIALECT = "mysql"; SQL_SLEEP = "SELECT SLEEP(0.05)""#,
        }
    }

    fn port(self) -> Option<u16> {
        match self {
            Db::Sqlite => None,
            Db::Postgres => Some(5432),
            Db::Mysql => Some(3306),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Db::Sqlite => "SQLite",
            Db::Postgres => "PostgreSQL",
            Db::Mysql => "MariaDB",
        }
    }

    fn lock(self) -> Option<std::sync::MutexGuard<'static, ()>> {
        let m = match self {
            Db::Sqlite => return None,
            Db::Postgres => &SQL_PG,
            Db::Mysql => &SQL_MY,
        };
        Some(m.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Whether the server of `db` answers; panics under CI when it does not.
fn available(db: Db) -> bool {
    let Some(port) = db.port() else { return true };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
        return true;
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("{} is not reachable on {addr} and CI=true: run scripts/services", db.name());
    }
    eprintln!("skipping: {} is not reachable on {addr} (run scripts/services)", db.name());
    false
}

fn config(db: Db, sqlite_file: &Path, instances: usize) -> String {
    let startup: Vec<_> = (0..instances).map(|_| serde_json::json!(["lua+stage"])).collect();
    serde_json::json!({
        "#threads": [4, 1024],
        "#startup": startup,
        "lua": { "%odbc": { "DB": db.conn(sqlite_file) } }
    })
    .to_string()
}

fn run_on(db: Db, rel: &str) {
    if !available(db) {
        return;
    }
    let _guard = db.lock();
    harness::run_scenario_with(rel, |home| {
        let file = home.path().join("data/test.db");
        std::fs::create_dir_all(home.path().join("data")).unwrap();
        home.write("conf/stage.json", &config(db, &file, 1));
        home.write("preload/10-db.lua", db.preload());
    });
}

macro_rules! on_databases {
    ($($name:ident => $path:literal,)*) => {
        mod sqlite { use super::*; $(#[test] fn $name() { run_on(Db::Sqlite, $path); })* }
        mod postgres { use super::*; $(#[test] fn $name() { run_on(Db::Postgres, $path); })* }
        mod mariadb { use super::*; $(#[test] fn $name() { run_on(Db::Mysql, $path); })* }
    };
}

on_databases! {
    api => "densefog/api.lua",
    worker => "densefog/worker.lua",
}
