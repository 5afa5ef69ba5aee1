//! The persisted desired state, through ODBC (SQLite at `HOME/var/lb/state.db` by default, or
//! the `%odbc` connection named `LB`): one row per local LB (`stage_lb`: name, spec as JSON, a
//! revision) and one per remote LB (`stage_lb_remote`: name, its [`Record`] as JSON, a
//! revision). Written before the data plane changes, read back when the controller starts.
//! Remote LBs used to be recorded in `HOME/var/lb/remote/NAME.json`; [`Store::import_remote_files`]
//! moves such files into the table once (renaming each to `NAME.json.imported`).

use super::remote::Record;
use super::{LbError, Result, Spec};
use crate::db::session::{execute, Param};
use crate::db::{ConnSpec, Value};
use odbc_api::Connection;
use std::path::Path;
use std::sync::Mutex;

/// A store of specs by LB name.
pub struct Store {
    spec: ConnSpec,
    conn: Mutex<Option<Connection<'static>>>,
}

const TABLE: &str = "stage_lb";
const REMOTE_TABLE: &str = "stage_lb_remote";

fn fail(label: &str, e: impl std::fmt::Display) -> LbError {
    LbError::Failed(format!("lb store ({label}): {e}"))
}

impl Store {
    /// Opens (and creates) the store. Blocking.
    pub fn open(spec: ConnSpec) -> Result<Store> {
        let store = Store {
            spec,
            conn: Mutex::new(None),
        };
        store.with(|c| {
            // VARCHAR(64) + TEXT are understood by SQLite, PostgreSQL and MariaDB alike.
            for sql in [
                format!(
                    "CREATE TABLE IF NOT EXISTS {TABLE} (name VARCHAR(64) PRIMARY KEY, spec TEXT NOT NULL, revision BIGINT NOT NULL)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {REMOTE_TABLE} (name VARCHAR(64) PRIMARY KEY, record TEXT NOT NULL, revision BIGINT NOT NULL)"
                ),
            ] {
                execute(c, store.spec.driver, &sql, &[], None)?;
            }
            Ok(())
        })?;
        Ok(store)
    }

    /// SQLite in a file (the default store).
    pub fn sqlite(path: &std::path::Path) -> Result<Store> {
        Store::open(ConnSpec::from_string(&format!(
            "DRIVER={{SQLite3}};DATABASE={};Timeout=5000",
            path.display()
        )))
    }

    pub fn label(&self) -> &str {
        &self.spec.label
    }

    fn with<T>(&self, f: impl Fn(&Connection<'static>) -> crate::db::Result<T>) -> Result<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        // One retry on a fresh connection: a database restart must not lose an update.
        for attempt in 0..2 {
            if guard.is_none() {
                let env = crate::db::pool::environment().map_err(|e| fail(&self.spec.label, e))?;
                let c = env
                    .connect_with_connection_string(&self.spec.conn_str, Default::default())
                    .map_err(|e| fail(&self.spec.label, crate::db::DbError::from(e)))?;
                *guard = Some(c);
            }
            match f(guard.as_ref().expect("connected")) {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 && e.is_connection_lost() => *guard = None,
                Err(e) => return Err(fail(&self.spec.label, e)),
            }
        }
        Err(fail(&self.spec.label, "connection lost twice"))
    }

    /// Every stored spec, by name. A row that no longer parses is reported, not dropped.
    pub fn load(&self) -> Result<Vec<std::result::Result<Spec, String>>> {
        let res = self.with(|c| {
            execute(
                c,
                self.spec.driver,
                &format!("SELECT name, spec FROM {TABLE} ORDER BY name"),
                &[],
                None,
            )
        })?;
        Ok(res
            .rows
            .iter()
            .map(|row| {
                let name = text(&row[0]);
                let t = text(&row[1]);
                serde_json::from_str::<Spec>(&t)
                    .map_err(|e| format!("lb store: the stored spec of {name:?} does not parse: {e}"))
            })
            .collect())
    }

    /// Writes (inserts or replaces) one spec, in a transaction.
    pub fn put(&self, spec: &Spec) -> Result<()> {
        let json = serde_json::to_string(spec).map_err(|e| fail(&self.spec.label, e))?;
        self.upsert(TABLE, "spec", &spec.name, json)
    }

    /// Replaces the row `name` of `table` (`col` holding `json`) with a new revision, in a
    /// transaction.
    fn upsert(&self, table: &str, col: &str, name: &str, json: String) -> Result<()> {
        self.with(|c| {
            c.set_autocommit(false)?;
            let r = (|| {
                let old = execute(
                    c,
                    self.spec.driver,
                    &format!("SELECT revision FROM {table} WHERE name = ?"),
                    &[p(name)],
                    None,
                )?;
                // Strictly increasing per row, even when the clock steps back.
                let prev = old.rows.first().map(|r| int(&r[0])).unwrap_or(0);
                let revision = now_ms().max(prev + 1);
                execute(
                    c,
                    self.spec.driver,
                    &format!("DELETE FROM {table} WHERE name = ?"),
                    &[p(name)],
                    None,
                )?;
                execute(
                    c,
                    self.spec.driver,
                    &format!("INSERT INTO {table} (name, {col}, revision) VALUES (?, ?, ?)"),
                    &[
                        p(name),
                        Param {
                            value: Value::Text(json.clone()),
                            letter: Some('C'),
                            len: None,
                            dir: Default::default(),
                        },
                        Param {
                            value: Value::Int(revision),
                            letter: Some('L'),
                            len: None,
                            dir: Default::default(),
                        },
                    ],
                    None,
                )?;
                Ok(())
            })();
            match r {
                Ok(()) => c.commit()?,
                Err(_) => c.rollback()?,
            }
            c.set_autocommit(true)?;
            r
        })
    }

    fn delete_row(&self, table: &str, name: &str) -> Result<()> {
        self.with(|c| {
            execute(
                c,
                self.spec.driver,
                &format!("DELETE FROM {table} WHERE name = ?"),
                &[p(name)],
                None,
            )
            .map(|_| ())
        })
    }

    /// The revision of row `name` in the remote table (tests, diagnostics).
    pub fn remote_revision(&self, name: &str) -> Result<Option<i64>> {
        let res = self.with(|c| {
            execute(
                c,
                self.spec.driver,
                &format!("SELECT revision FROM {REMOTE_TABLE} WHERE name = ?"),
                &[p(name)],
                None,
            )
        })?;
        Ok(res.rows.first().map(|r| int(&r[0])))
    }

    /// Writes (inserts or replaces) the record of a remote LB, in a transaction.
    pub fn put_remote(&self, r: &Record) -> Result<()> {
        let json = serde_json::to_string(r).map_err(|e| fail(&self.spec.label, e))?;
        self.upsert(REMOTE_TABLE, "record", &r.spec.name, json)
    }

    /// The record of remote LB `name`, if there is one.
    pub fn load_remote(&self, name: &str) -> Result<Option<Record>> {
        let res = self.with(|c| {
            execute(
                c,
                self.spec.driver,
                &format!("SELECT record FROM {REMOTE_TABLE} WHERE name = ?"),
                &[p(name)],
                None,
            )
        })?;
        match res.rows.first() {
            None => Ok(None),
            Some(row) => serde_json::from_str(&text(&row[0])).map(Some).map_err(|e| {
                fail(
                    &self.spec.label,
                    format!("the stored record of remote lb {name:?} does not parse: {e}"),
                )
            }),
        }
    }

    /// Names of every recorded remote LB, sorted.
    pub fn remote_names(&self) -> Result<Vec<String>> {
        let res = self.with(|c| {
            execute(
                c,
                self.spec.driver,
                &format!("SELECT name FROM {REMOTE_TABLE} ORDER BY name"),
                &[],
                None,
            )
        })?;
        Ok(res.rows.iter().map(|r| text(&r[0])).collect())
    }

    /// Forgets the record of remote LB `name` (after delete).
    pub fn delete_remote(&self, name: &str) -> Result<()> {
        self.delete_row(REMOTE_TABLE, name)
    }

    /// Moves the remote LB records of an older home (`DIR/remote/NAME.json`, `DIR` the
    /// controller's directory `HOME/var/lb`) into the table, once: each file is written to
    /// the table unless the table already has that LB, then renamed to `NAME.json.imported`.
    /// A file that does not parse stays where it is, and is reported. Returns the names
    /// imported.
    pub fn import_remote_files(&self, dir: &Path) -> Vec<String> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("remote"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut out = Vec::new();
        for path in files {
            let rec = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<Record>(&t).map_err(|e| e.to_string()));
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    log::error!(target: "lb", "{}: cannot import this remote lb record: {e}", path.display());
                    continue;
                }
            };
            let name = rec.spec.name.clone();
            let done = match self.load_remote(&name) {
                Ok(Some(_)) => Ok(false),
                Ok(None) | Err(_) => self.put_remote(&rec).map(|_| true),
            };
            match done {
                Ok(imported) => {
                    let to = path.with_extension("json.imported");
                    if let Err(e) = std::fs::rename(&path, &to) {
                        log::warn!(target: "lb", "cannot rename {} to {}: {e}", path.display(), to.display());
                    }
                    if imported {
                        log::info!(target: "lb", "lb {name}: remote record imported from {} into {} ({REMOTE_TABLE})", path.display(), self.spec.label);
                        out.push(name);
                    }
                }
                Err(e) => log::error!(target: "lb", "lb {name}: cannot import {}: {e}", path.display()),
            }
        }
        out
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        self.delete_row(TABLE, name)
    }
}

fn p(s: &str) -> Param {
    Param {
        value: Value::Text(s.to_string()),
        letter: None,
        len: None,
        dir: Default::default(),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::Float(f) => *f as i64,
        other => text(other).trim().parse().unwrap_or(0),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// SQLite at `path`; `None` (skip) only outside CI when the driver is missing.
    fn sqlite(path: &Path) -> Option<Store> {
        match Store::sqlite(path) {
            Ok(s) => Some(s),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipping: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn record(name: &str, instance: &str) -> Record {
        Record {
            spec: Spec::from_json(
                "t",
                &json!({"name": name, "listen": "0.0.0.0:80", "backends": ["10.1.96.4:8080"]}),
            )
            .unwrap(),
            placement: super::super::remote::Placement::from_json(
                "t",
                &json!({"provider": "vultr", "region": "icn", "plan": "vc2-1c-1gb"}),
            )
            .unwrap(),
            instance: instance.into(),
            replacing: None,
            failovers: 0,
            up_once: false,
            state: "booting".into(),
            internal_ip: "10.1.96.3".into(),
        }
    }

    #[test]
    fn sqlite_remote_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let Some(store) = sqlite(&path) else { return };
        assert_eq!(store.load_remote("edge").unwrap(), None);
        let mut rec = record("edge", "vm-1");
        store.put_remote(&rec).unwrap();
        let first = store.remote_revision("edge").unwrap().unwrap();
        rec.instance = "vm-2".into();
        rec.failovers = 1;
        rec.spec.backends.clear();
        store.put_remote(&rec).unwrap();
        let second = store.remote_revision("edge").unwrap().unwrap();
        assert!(second > first, "revision {first} then {second}");
        store.put_remote(&record("alpha", "vm-3")).unwrap();
        // Another connection (as after a restart) reads what was written; the local LB table
        // is separate.
        let again = Store::sqlite(&path).unwrap();
        assert_eq!(again.load_remote("edge").unwrap(), Some(rec));
        assert_eq!(again.remote_names().unwrap(), ["alpha", "edge"]);
        assert!(again.load().unwrap().is_empty());
        again.delete_remote("edge").unwrap();
        assert_eq!(again.load_remote("edge").unwrap(), None);
        assert_eq!(again.remote_names().unwrap(), ["alpha"]);
        assert_eq!(again.remote_revision("edge").unwrap(), None);
    }

    /// A home from before the table: `var/lb/remote/NAME.json` is imported once and renamed;
    /// a file that does not parse stays and is not imported.
    #[test]
    fn remote_json_files_are_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let Some(store) = sqlite(&dir.path().join("state.db")) else {
            return;
        };
        let remote = dir.path().join("remote");
        std::fs::create_dir_all(&remote).unwrap();
        let old = record("x", "vm-old");
        std::fs::write(remote.join("x.json"), serde_json::to_string_pretty(&old).unwrap()).unwrap();
        std::fs::write(remote.join("broken.json"), "{ not json").unwrap();
        assert_eq!(store.import_remote_files(dir.path()), ["x"]);
        assert_eq!(store.load_remote("x").unwrap(), Some(old.clone()));
        assert!(!remote.join("x.json").exists());
        assert!(remote.join("x.json.imported").exists());
        assert!(remote.join("broken.json").exists(), "left for a person to fix");
        assert_eq!(store.remote_names().unwrap(), ["x"]);
        // Once: a later change in the table is not overwritten by a stray old file.
        let mut newer = old.clone();
        newer.instance = "vm-new".into();
        store.put_remote(&newer).unwrap();
        std::fs::copy(remote.join("x.json.imported"), remote.join("x.json")).unwrap();
        assert!(store.import_remote_files(dir.path()).is_empty());
        assert_eq!(store.load_remote("x").unwrap(), Some(newer));
        assert!(!remote.join("x.json").exists());
    }

    #[test]
    fn sqlite_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let Some(store) = sqlite(&path) else { return };
        let mut spec = Spec::from_json(
            "t",
            &json!({"name": "web", "listen": "127.0.0.1:8080", "backends": ["127.0.0.1:1"]}),
        )
        .unwrap();
        store.put(&spec).unwrap();
        spec.backends.clear();
        store.put(&spec).unwrap();
        let again = Store::sqlite(&path).unwrap();
        let all = again.load().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].as_ref().unwrap(), &spec);
        again.delete("web").unwrap();
        assert!(again.load().unwrap().is_empty());
    }
}
