//! Lua values <-> [`Value`], the copy that crosses instances:
//! `from_lua` walks a Lua value (tables recursively, functions checked to have no upvalue
//! but `_ENV` and dumped as bytecode) and names where anything that cannot travel sits;
//! `to_lua` builds the value in another state, functions getting that state's globals.
//! Used by messages (`stage.signal`, `stage.call`, ...), `thread.new` and `_SANDBOX`.

use crate::value::{SendError, Value, MAX_DEPTH};
use mlua::{ffi, ChunkMode, Function, Lua, Table};
use std::collections::HashSet;
use std::ffi::CStr;
use std::fmt::Write as _;

/// Converts Lua values to `Value`s. `base` names the first one (`arg 2`, `return 1`, ...):
/// values are numbered from `first`.
pub fn from_lua_multi(
    lua: &Lua,
    values: impl IntoIterator<Item = mlua::Value>,
    base: &str,
    first: usize,
) -> Result<Vec<Value>, SendError> {
    let mut walk = Walk {
        lua,
        open: HashSet::new(),
    };
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            walk.value(&v, 0).map_err(|mut e| {
                e.path.insert_str(0, &format!("{base} {}", first + i));
                e
            })
        })
        .collect()
}

/// Converts one Lua value; `path` names it in errors.
pub fn from_lua(lua: &Lua, v: &mlua::Value, path: &str) -> Result<Value, SendError> {
    let mut walk = Walk {
        lua,
        open: HashSet::new(),
    };
    walk.value(v, 0).map_err(|mut e| {
        e.path.insert_str(0, path);
        e
    })
}

struct Walk<'a> {
    lua: &'a Lua,
    /// Tables on the current path: meeting one again is a cycle. A table reached twice
    /// through different paths (shared, not cyclic) is simply copied twice.
    open: HashSet<usize>,
}

impl Walk<'_> {
    /// An error at the current value; each table level on the way out prepends its key,
    /// so the success path never builds path strings.
    fn fail(&self, what: impl Into<String>) -> SendError {
        SendError {
            what: what.into(),
            path: String::new(),
        }
    }

    fn value(&mut self, v: &mlua::Value, depth: usize) -> Result<Value, SendError> {
        Ok(match v {
            mlua::Value::Nil => Value::Nil,
            mlua::Value::Boolean(b) => Value::Bool(*b),
            mlua::Value::Integer(i) => Value::Int(*i),
            mlua::Value::Number(n) => Value::Float(*n),
            mlua::Value::String(s) => Value::Str(s.as_bytes().to_vec()),
            mlua::Value::Table(t) => self.table(t, depth)?,
            mlua::Value::Function(f) => self.function(f)?,
            other => return Err(self.fail(other.type_name())),
        })
    }

    fn table(&mut self, t: &Table, depth: usize) -> Result<Value, SendError> {
        if depth >= MAX_DEPTH {
            return Err(self.fail(format!("table nested deeper than {MAX_DEPTH} levels")));
        }
        let ptr = t.to_pointer() as usize;
        if !self.open.insert(ptr) {
            return Err(self.fail("table with a cycle"));
        }
        let mut pairs = Vec::new();
        let mut result = Ok(());
        // `for_each` walks with raw `next`: metatables are not consulted, as for any copy.
        let walked = t.for_each(|k: mlua::Value, v: mlua::Value| {
            let pair = self
                .value(&k, depth + 1)
                .and_then(|key| Ok((key, self.value(&v, depth + 1)?)));
            match pair {
                Ok(p) => {
                    pairs.push(p);
                    Ok(())
                }
                Err(mut e) => {
                    let mut seg = String::new();
                    push_key(&mut seg, &k);
                    e.path.insert_str(0, &seg);
                    result = Err(e);
                    // Stop the walk; the error itself is carried in `result`.
                    Err(mlua::Error::runtime("stop"))
                }
            }
        });
        self.open.remove(&ptr);
        result?;
        walked.map_err(|e| self.fail(format!("table ({e})")))?;
        Ok(Value::Table(pairs))
    }

    fn function(&mut self, f: &Function) -> Result<Value, SendError> {
        let info = f.info();
        if info.what == "C" {
            return Err(self.fail("C function"));
        }
        if info.num_upvalues > 0 {
            for name in upvalue_names(self.lua, f).map_err(|e| self.fail(format!("function ({e})")))? {
                if name != "_ENV" {
                    return Err(self.fail(format!("function with upvalue '{name}'")));
                }
            }
        }
        Ok(Value::Function(f.dump(false)))
    }
}

/// Appends `.name` for identifier keys and `[key]` for the rest.
fn push_key(path: &mut String, k: &mlua::Value) {
    match k {
        mlua::Value::String(s) => {
            let s = s.to_string_lossy();
            let ident = !s.is_empty()
                && !s.starts_with(|c: char| c.is_ascii_digit())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if ident {
                let _ = write!(path, ".{s}");
            } else {
                let _ = write!(path, "[{s:?}]");
            }
        }
        mlua::Value::Integer(i) => {
            let _ = write!(path, "[{i}]");
        }
        mlua::Value::Number(n) => {
            let _ = write!(path, "[{n}]");
        }
        other => {
            let _ = write!(path, "[{}]", other.type_name());
        }
    }
}

/// The names of `f`'s upvalues, read with the C API (`lua_getupvalue`) rather than through
/// the `debug` global, which scripts may remove or replace (`debug = nil`).
fn upvalue_names(lua: &Lua, f: &Function) -> mlua::Result<Vec<String>> {
    let mut names = Vec::new();
    // SAFETY: the closure runs inside `exec_raw`'s protected call with `f` as its only
    // argument, at stack index 1. `lua_getupvalue` never raises (no longjmp can skip the
    // `String`s made here); it pushes one value per name found, popped at once, so the
    // stack never grows past the one slot a C function always has. The name points into
    // `f`'s prototype, alive while `f` is on the stack, and is copied before the pop.
    unsafe {
        lua.exec_raw::<()>(f, |l| {
            for i in 1..=255 {
                let name = ffi::lua_getupvalue(l, 1, i);
                if name.is_null() {
                    break;
                }
                names.push(CStr::from_ptr(name).to_string_lossy().into_owned());
                ffi::lua_pop(l, 1);
            }
            ffi::lua_settop(l, 0);
        })?;
    }
    Ok(names)
}

/// Makes the Lua value of `v` in `lua`. Functions get this state's globals as `_ENV`.
pub fn to_lua(lua: &Lua, v: &Value) -> mlua::Result<mlua::Value> {
    to_lua_depth(lua, v, 0)
}

fn to_lua_depth(lua: &Lua, v: &Value, depth: usize) -> mlua::Result<mlua::Value> {
    Ok(match v {
        Value::Nil => mlua::Value::Nil,
        Value::Bool(b) => mlua::Value::Boolean(*b),
        Value::Int(i) => mlua::Value::Integer(*i),
        Value::Float(n) => mlua::Value::Number(*n),
        Value::Str(s) => mlua::Value::String(lua.create_string(s)?),
        Value::Table(pairs) => {
            if depth >= MAX_DEPTH {
                return Err(mlua::Error::runtime(format!(
                    "received table nested deeper than {MAX_DEPTH} levels"
                )));
            }
            let t = lua.create_table_with_capacity(0, pairs.len())?;
            for (k, v) in pairs {
                t.raw_set(to_lua_depth(lua, k, depth + 1)?, to_lua_depth(lua, v, depth + 1)?)?;
            }
            mlua::Value::Table(t)
        }
        Value::Function(code) => {
            // Loading a binary chunk sets its first upvalue (here `_ENV`, the only one
            // allowed) to this state's globals, so the function's globals resolve here.
            mlua::Value::Function(
                lua.load(&code[..])
                    .set_mode(ChunkMode::Binary)
                    .set_name("=received function")
                    .into_function()?,
            )
        }
    })
}

/// Checks that `v` nests tables at most `MAX_DEPTH` deep, before a walk that has no limit
/// of its own (serde serialization to JSON) runs into the thread's stack. Each table is
/// measured once (shared subtables do not make it exponential); a cycle is an error too.
pub fn check_depth(v: &mlua::Value) -> Result<(), String> {
    fn height(
        t: &Table,
        depth: usize,
        memo: &mut std::collections::HashMap<usize, usize>,
        open: &mut HashSet<usize>,
    ) -> Result<usize, String> {
        let ptr = t.to_pointer() as usize;
        if let Some(h) = memo.get(&ptr) {
            return Ok(*h);
        }
        if depth >= MAX_DEPTH {
            return Err(format!("table nested deeper than {MAX_DEPTH} levels"));
        }
        if !open.insert(ptr) {
            return Err("table with a cycle".into());
        }
        let mut h = 1;
        let mut err = None;
        let _ = t.for_each(|k: mlua::Value, v: mlua::Value| {
            for x in [k, v] {
                if let mlua::Value::Table(sub) = x {
                    match height(&sub, depth + 1, memo, open) {
                        Ok(sh) => h = h.max(sh + 1),
                        Err(e) => {
                            err = Some(e);
                            return Err(mlua::Error::runtime("stop"));
                        }
                    }
                }
            }
            Ok(())
        });
        open.remove(&ptr);
        if let Some(e) = err {
            return Err(e);
        }
        memo.insert(ptr, h);
        Ok(h)
    }
    match v {
        mlua::Value::Table(t) => height(t, 0, &mut Default::default(), &mut HashSet::new()).map(|_| ()),
        _ => Ok(()),
    }
}

/// Makes Lua values of all of `vs`.
pub fn to_lua_multi(lua: &Lua, vs: &[Value]) -> mlua::Result<mlua::MultiValue> {
    vs.iter().map(|v| to_lua(lua, v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lua() -> Lua {
        unsafe { Lua::unsafe_new_with(mlua::StdLib::ALL, mlua::LuaOptions::new()) }
    }

    fn send(lua: &Lua, code: &str) -> Result<Value, SendError> {
        let v: mlua::Value = lua.load(code).eval().unwrap();
        from_lua(lua, &v, "arg 2")
    }

    #[test]
    fn depth_is_checked_once_per_table() {
        let a = lua();
        let deep: mlua::Value = a
            .load("local t = {} for i = 1, 5000 do t = {next = t} end return t")
            .eval()
            .unwrap();
        assert_eq!(
            check_depth(&deep).unwrap_err(),
            format!("table nested deeper than {MAX_DEPTH} levels")
        );
        let ok: mlua::Value = a
            .load("local t = {} for i = 1, 90 do t = {next = t, [{}] = 1} end return t")
            .eval()
            .unwrap();
        check_depth(&ok).unwrap();
        // 60 levels of a table shared twice per level: 2^60 paths, 60 tables.
        let shared: mlua::Value = a
            .load("local t = {} for i = 1, 60 do t = {a = t, b = t} end return t")
            .eval()
            .unwrap();
        let t = std::time::Instant::now();
        check_depth(&shared).unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        let cyc: mlua::Value = a.load("local t = {} t.self = t return t").eval().unwrap();
        assert_eq!(check_depth(&cyc).unwrap_err(), "table with a cycle");
    }

    #[test]
    fn scalars_keep_their_kind() {
        let a = lua();
        assert_eq!(send(&a, "return 3").unwrap(), Value::Int(3));
        assert_eq!(send(&a, "return 3.0").unwrap(), Value::Float(3.0));
        assert_eq!(send(&a, "return '\\0\\255'").unwrap(), Value::Str(vec![0, 255]));
        let b = lua();
        let v = to_lua(&b, &Value::Float(3.0)).unwrap();
        assert!(matches!(v, mlua::Value::Number(n) if n == 3.0));
    }

    #[test]
    fn tables_and_functions_cross_states() {
        let a = lua();
        let v = send(
            &a,
            "return {1, 2.5, x = {y = 'z'}, f = function(n) return n * K end}",
        )
        .unwrap();
        let b = lua();
        b.globals().set("K", 10).unwrap();
        b.globals().set("v", to_lua(&b, &v).unwrap()).unwrap();
        let (n, f, y): (i64, i64, String) = b.load("return v[1], v.f(4), v.x.y").eval().unwrap();
        assert_eq!((n, f, y), (1, 40, "z".into()));
    }

    #[test]
    fn errors_name_where_the_value_sits() {
        let a = lua();
        let e = send(
            &a,
            "local count = 0; return {handler = function() count = count + 1 end}",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot send function with upvalue 'count' at arg 2.handler"
        );
        let e = send(&a, "local t = {1, {}}; t[2][1] = t; return t").unwrap_err();
        assert_eq!(e.to_string(), "cannot send table with a cycle at arg 2[2][1]");
        let e = send(&a, "return {['a b'] = coroutine.create(print)}").unwrap_err();
        assert_eq!(e.to_string(), "cannot send thread at arg 2[\"a b\"]");
        let e = send(&a, "return print").unwrap_err();
        assert_eq!(e.to_string(), "cannot send C function at arg 2");
        // a shared (not cyclic) subtable is fine
        assert!(send(&a, "local s = {}; return {s, s}").is_ok());
    }

    #[test]
    fn functions_are_checked_without_the_debug_global() {
        let a = lua();
        a.load("debug = nil").exec().unwrap();
        assert!(matches!(
            send(&a, "return function(n) return n * K end").unwrap(),
            Value::Function(_)
        ));
        let e = send(&a, "local up = 1; return function() return up end").unwrap_err();
        assert_eq!(e.to_string(), "cannot send function with upvalue 'up' at arg 2");
        // a fake `debug` cannot make a closure pass either
        a.load("debug = {getupvalue = function() return nil end}")
            .exec()
            .unwrap();
        assert!(send(&a, "local up = 1; return function() return up end").is_err());
    }
}
