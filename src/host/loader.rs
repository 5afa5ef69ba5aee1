//! Script loading for one instance: the cache, hot reload driven by the file watcher's
//! generation counter, and fail-over along the search path.
//!
//! Rules (API.md §1):
//! * a name resolves to the first readable `<dir>/<name>.lua` of the search path;
//! * a cached script is served as is until the watcher reports a change in the home
//!   (the generation moves), then its file is checked (size and mtime) and reloaded;
//! * a version that fails to compile or raises while loading never replaces a working
//!   one: the previous version keeps serving, or, when there is none, the next entry of
//!   the search path is tried — a script served from an entry with position > 0 is in
//!   fail-over and is re-checked on every load, so a fixed file takes over at once;
//! * a failing file is remembered by (size, mtime) so it is reported once, not on every load;
//! * a changed file is taken only once it has been quiet for [`QUIET`] (no write since):
//!   a deploy by `cp` or truncate+write is never served half-written; until then the
//!   previous version serves and every load checks again;
//! * a new version that returns nothing (nil) where the previous version returned a value
//!   is refused like one that fails (an empty or cut file compiles and returns nil).

use crate::home::{Candidate, Home};
use mlua::{Function, Lua, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long a changed file must have been left alone before it replaces a working version.
pub const QUIET: Duration = Duration::from_millis(100);

/// Whether the file was written within the last `QUIET` (a deploy may still be writing it).
fn settling(st: &Stamp) -> bool {
    SystemTime::now()
        .duration_since(st.mtime)
        .is_ok_and(|age| age < QUIET)
}

/// What identifies one version of a file on disk.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stamp {
    size: u64,
    mtime: SystemTime,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        size: m.len(),
        mtime: m.modified().ok()?,
    })
}

/// A loaded script: what it returned and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub value: Value,
    pub path: PathBuf,
    pub position: usize,
    pub mtime: SystemTime,
    stamp: Stamp,
    generation: u64,
}

/// Why a name could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("script \"{0}\" not found in the search path ({1})")]
    NotFound(String, String),
    #[error("script \"{name}\" failed to load: {}", .errors.join("; "))]
    Failed { name: String, errors: Vec<String> },
    #[error("{0}")]
    BadName(String),
}

/// The per-instance script cache.
pub struct Loader {
    home: Arc<Home>,
    generation: Arc<AtomicU64>,
    cache: RefCell<HashMap<String, Loaded>>,
    failed: RefCell<HashMap<PathBuf, (Stamp, String)>>,
    /// Names loaded with `reload = true` (`stage.load`): what `reload_all` loads again.
    reloadable: RefCell<std::collections::BTreeSet<String>>,
    /// Where reloads are counted (`stage_script_reloads_total`), under the instance's name.
    metrics: Option<(Arc<crate::metrics::Metrics>, String)>,
}

impl Loader {
    pub fn new(home: Arc<Home>, generation: Arc<AtomicU64>) -> Loader {
        Loader {
            home,
            generation,
            cache: RefCell::new(HashMap::new()),
            failed: RefCell::new(HashMap::new()),
            reloadable: RefCell::new(Default::default()),
            metrics: None,
        }
    }

    /// Counts every reload of a changed script in `metrics` under `instance`.
    pub fn count_reloads(mut self, metrics: Arc<crate::metrics::Metrics>, instance: &str) -> Loader {
        self.metrics = Some((metrics, instance.to_string()));
        self
    }

    fn counted(&self, ok: bool) {
        if let Some((m, name)) = &self.metrics {
            m.reload(name, ok);
        }
    }

    /// The path shown to people and used as the chunk name: relative to the home.
    pub fn display_path(&self, path: &Path) -> String {
        path.strip_prefix(&self.home.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Compiles a file into a function whose chunk name is its home-relative path.
    pub fn compile(&self, lua: &Lua, path: &Path) -> Result<Function, String> {
        let src = std::fs::read(path).map_err(|e| format!("{}: {e}", self.display_path(path)))?;
        lua.load(src)
            .set_name(format!("@{}", self.display_path(path)))
            .into_function()
            .map_err(|e| crate::host::script_error::format(&e))
    }

    /// Loads `name` (a file name, without `+id`). `reload = false` is `stage.require`:
    /// once cached, never checked again.
    pub async fn load(&self, lua: &Lua, name: &str, reload: bool) -> Result<Loaded, LoadError> {
        if reload && !self.reloadable.borrow().contains(name) {
            self.reloadable.borrow_mut().insert(name.to_string());
        }
        let generation = self.generation.load(Ordering::Acquire);
        let cached = self.cache.borrow().get(name).cloned();
        if let Some(c) = &cached {
            if !reload || (c.generation == generation && c.position == 0) {
                return Ok(c.clone());
            }
        }
        let candidates = self.home.candidates(name).map_err(LoadError::BadName)?;
        let mut errors = vec![];
        for Candidate { path, position } in candidates {
            let Some(st) = stamp(&path) else { continue };
            if let Some(c) = &cached {
                if c.path == path && c.stamp == st {
                    return Ok(self.remember(
                        name,
                        Loaded {
                            generation,
                            ..c.clone()
                        },
                    ));
                }
            }
            if let Some(c) = &cached {
                if settling(&st) {
                    if c.path == path {
                        // Still being written: the previous version serves, and the cached
                        // generation stays old so the next load looks again.
                        return Ok(c.clone());
                    }
                    continue;
                }
            }
            let known_bad = self
                .failed
                .borrow()
                .get(&path)
                .and_then(|(s, e)| (*s == st).then(|| e.clone()));
            let outcome = match known_bad {
                Some(e) => Err(e),
                None => match (self.run(lua, &path).await, &cached) {
                    (Ok(Value::Nil), Some(c)) if c.value != Value::Nil => Err(format!(
                        "{} returned nothing where the previous version returned a {}; \
                         the previous version keeps serving",
                        self.display_path(&path),
                        c.value.type_name()
                    )),
                    (outcome, _) => outcome,
                },
            };
            match outcome {
                Ok(value) => {
                    if cached.is_some() {
                        self.counted(true);
                    }
                    if self.failed.borrow_mut().remove(&path).is_some() || cached.is_some() {
                        log::info!(
                            "script {} (re)loaded at position {position}",
                            self.display_path(&path)
                        );
                    }
                    let loaded = Loaded {
                        value,
                        mtime: st.mtime,
                        path,
                        position,
                        stamp: st,
                        generation,
                    };
                    if position > 0 {
                        log::warn!(
                            "script \"{name}\" is served in fail-over from {} (position {position})",
                            self.display_path(&loaded.path)
                        );
                    }
                    return Ok(self.remember(name, loaded));
                }
                Err(e) => {
                    if self.failed.borrow().get(&path).map(|(s, _)| *s) != Some(st) {
                        log::error!("script {} failed to load: {e}", self.display_path(&path));
                        if cached.is_some() {
                            self.counted(false);
                        }
                        self.failed.borrow_mut().insert(path.clone(), (st, e.clone()));
                    }
                    if let Some(c) = &cached {
                        if c.path == path {
                            // The previous version of this very file keeps serving.
                            return Ok(self.remember(
                                name,
                                Loaded {
                                    generation,
                                    ..c.clone()
                                },
                            ));
                        }
                    }
                    errors.push(e);
                }
            }
        }
        if let Some(c) = cached {
            // Every candidate is gone or broken: keep what worked rather than fail.
            return Ok(c);
        }
        if errors.is_empty() {
            let dirs = self
                .home
                .search
                .iter()
                .map(|e| {
                    if e.dir.is_empty() {
                        ".".to_string()
                    } else {
                        e.dir.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            Err(LoadError::NotFound(name.to_string(), dirs))
        } else {
            Err(LoadError::Failed {
                name: name.to_string(),
                errors,
            })
        }
    }

    /// Loads again, now, every script cached from `stage.load` but `skip` (the entry script,
    /// which runs once): the hot reload a deploy asks for (`host::reload`). Returns the
    /// failures it met, one sentence each naming the file; a failing script keeps its
    /// previous version serving, as on any reload. Files known to fail before are not
    /// reported again.
    pub async fn reload_all(&self, lua: &Lua, skip: &str) -> Vec<String> {
        let before: HashMap<PathBuf, Stamp> = self
            .failed
            .borrow()
            .iter()
            .map(|(p, (st, _))| (p.clone(), *st))
            .collect();
        let names: Vec<String> = {
            let cache = self.cache.borrow();
            self.reloadable
                .borrow()
                .iter()
                .filter(|n| n.as_str() != skip && cache.contains_key(n.as_str()))
                .cloned()
                .collect()
        };
        let mut errors = vec![];
        for name in names {
            match self.load(lua, &name, true).await {
                Err(e) => errors.push(e.to_string()),
                // The file it serves from is known to fail as it is on disk now (a request
                // may have met the new version first): the previous version serves.
                Ok(l) => {
                    if let Some((st, e)) = self.failed.borrow().get(&l.path) {
                        if stamp(&l.path) == Some(*st) {
                            errors.push(format!(
                                "script {} failed to load: {e}",
                                self.display_path(&l.path)
                            ));
                        }
                    }
                }
            }
        }
        for (p, (st, e)) in self.failed.borrow().iter() {
            if before.get(p) != Some(st) {
                errors.push(format!("script {} failed to load: {e}", self.display_path(p)));
            }
        }
        errors.sort();
        errors.dedup();
        errors
    }

    fn remember(&self, name: &str, loaded: Loaded) -> Loaded {
        self.cache.borrow_mut().insert(name.to_string(), loaded.clone());
        loaded
    }

    /// Compiles and runs one file as a coroutine (it may yield while loading).
    async fn run(&self, lua: &Lua, path: &Path) -> Result<Value, String> {
        let f = self.compile(lua, path)?;
        let runner = crate::host::callback::xpcall_runner(lua).map_err(|e| e.to_string())?;
        let mut rets =
            crate::host::callback::run_protected(&runner, mlua::MultiValue::from_iter([Value::Function(f)]))
                .await?;
        Ok(rets.pop_front().unwrap_or(Value::Nil))
    }
}

/// Compiles `src` as the script `name` without running it (`PUT /packages` checks a bundle
/// with it): `Err` is the syntax error, naming the script and the line.
pub fn syntax_check(name: &str, src: &[u8]) -> Result<(), String> {
    thread_local! {
        static LUA: Lua = Lua::new();
    }
    LUA.with(|lua| {
        lua.load(src)
            .set_name(format!("@{name}"))
            .into_function()
            .map(|_| ())
            .map_err(|e| match e {
                mlua::Error::SyntaxError { message, .. } => message,
                other => other.to_string(),
            })
    })
}
