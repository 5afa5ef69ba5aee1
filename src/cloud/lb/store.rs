//! The persisted desired state: one row per LB (`stage_lb`: name, spec as JSON, a revision),
//! through ODBC (SQLite at `HOME/var/lb/state.db` by default, or the `%odbc` connection named
//! `LB`). Written before the data plane changes, read back when the controller starts.

use super::{LbError, Result, Spec};
use crate::db::session::{execute, Param};
use crate::db::{ConnSpec, Value};
use odbc_api::Connection;
use std::sync::Mutex;

/// A store of specs by LB name.
pub struct Store {
    spec: ConnSpec,
    conn: Mutex<Option<Connection<'static>>>,
}

const TABLE: &str = "stage_lb";

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
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {TABLE} (name VARCHAR(64) PRIMARY KEY, spec TEXT NOT NULL, revision BIGINT NOT NULL)"
            );
            execute(c, store.spec.driver, &sql, &[], None).map(|_| ())
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
        let name = spec.name.clone();
        self.with(|c| {
            c.set_autocommit(false)?;
            let r = (|| {
                execute(
                    c,
                    self.spec.driver,
                    &format!("DELETE FROM {TABLE} WHERE name = ?"),
                    &[p(&name)],
                    None,
                )?;
                execute(
                    c,
                    self.spec.driver,
                    &format!("INSERT INTO {TABLE} (name, spec, revision) VALUES (?, ?, ?)"),
                    &[
                        p(&name),
                        Param {
                            value: Value::Text(json.clone()),
                            letter: Some('C'),
                            len: None,
                            dir: Default::default(),
                        },
                        Param {
                            value: Value::Int(now_ms()),
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

    pub fn delete(&self, name: &str) -> Result<()> {
        self.with(|c| {
            execute(
                c,
                self.spec.driver,
                &format!("DELETE FROM {TABLE} WHERE name = ?"),
                &[p(name)],
                None,
            )
            .map(|_| ())
        })
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

    #[test]
    fn sqlite_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = match Store::sqlite(&path) {
            Ok(s) => s,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipping: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
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
