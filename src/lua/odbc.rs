//! The `odbc` module: thin glue between Lua and `crate::db`. Rust provides raw functions
//! (connect, execute, fetch, apply, transactions), created once per Lua state and taking an
//! adapter or resultset handle (userdata), that convert values and run the blocking parts on
//! the ODBC executor, so the calling coroutine yields; a small Lua prelude builds the
//! adapter and resultset tables around them and handles the optional callback forms
//! (`odbc.new(conn, f)`, `begin(f)`, `fetch(keys, f)`, `apply(rows, table, f)`) so those
//! callbacks may yield too.

use crate::db::track::{Current, KeyAtom, KeyPart, Snapshot};
use crate::db::{self, ConnSpec, DbError, Executor, Param, Pool, QueryResult, Session};
use mlua::{AnyUserData, Lua, MultiValue, Table, Value as LuaValue};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

const PRELUDE: &str = r#"
local R = ...
local type, error, pcall, setmetatable, getmetatable = type, error, pcall, setmetatable, getmetatable
local next, pairs, rawget, tostring, math, table = next, pairs, rawget, tostring, math, table
local pack, unpack = table.pack, table.unpack
local r_new, r_execute, r_query, r_exec = R.new, R.execute, R.query, R.exec
local r_begin, r_commit, r_rollback, r_close = R.begin, R.commit, R.rollback, R.close
local r_fetch, r_columns, r_apply = R.fetch, R.columns, R.apply

-- rows table -> the apply function of the resultset that fetched it (weak keys)
local fetched = setmetatable({}, { __mode = "k" })

-- Fetched rows are callable, as in STAGE: rows() lists the keys of a level (sorted),
-- rows(k) reads one entry without creating it, rows({k1, k2}) reads several (by the
-- positions of the list); a function after the key receives the result instead.
local function key_order(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "number" or ta == "string" then return a < b end
    return tostring(a) < tostring(b)
end
local rows_mt = {}
rows_mt.__call = function(t, k, f)
    local r
    if k == nil then
        r = {}
        for key in next, t do r[#r + 1] = key end
        table.sort(r, key_order)
    elseif type(k) == "table" then
        r = {}
        for i, key in pairs(k) do r[i] = rawget(t, key) end
    else
        r = rawget(t, k)
    end
    if type(f) == "function" then return f(r) end
    return r
end
local function callable(t, depth)
    if type(t) ~= "table" then return t end
    if getmetatable(t) == nil then setmetatable(t, rows_mt) end
    if depth > 0 then
        for _, v in next, t do callable(v, depth - 1) end
    end
    return t
end

local function resultset(h, affected, outputs)
    local rs = setmetatable({ affected = affected, erase = R.erase, near = R.near }, {
        -- rs[n]: the value of the n-th parameter after the statement (output parameters).
        __index = function(_, n)
            if math.type(n) == "integer" and outputs then return outputs[n] end
        end,
    })
    local function apply(rows, tbl, f)
        if type(tbl) == "function" then tbl, f = nil, tbl end
        local keys, log = r_apply(h, rows, tbl)
        if f then return f(keys, log) end
        return keys, log
    end
    rs.fetch = function(keys, f)
        if type(keys) == "function" then keys, f = nil, keys end
        local rows, depth = r_fetch(h, keys)
        if type(rows) == "table" then
            fetched[rows] = apply
            callable(rows, depth)
        end
        if f then return f(rows) end
        return rows
    end
    rs.columns = function(f)
        local cols = r_columns(h)
        if f then return f(cols) end
        return cols
    end
    rs.apply = apply
    return rs
end

local function adapter(h)
    local adp = {}
    adp.execute = function(sql, ...) return resultset(r_execute(h, sql, ...)) end
    adp.query = function(sql, ...) return r_query(h, sql, ...) end
    adp.exec = function(sql, ...) return r_exec(h, sql, ...) end
    adp.commit = function() return r_commit(h) end
    adp.rollback = function() return r_rollback(h) end
    adp.close = function() return r_close(h, true) end
    adp.begin = function(f)
        r_begin(h)
        if f == nil then return end
        local res = pack(pcall(f, adp))
        if res[1] and res[2] == true then r_commit(h) else r_rollback(h) end
        if not res[1] then error(res[2], 0) end
        return unpack(res, 2, res.n)
    end
    adp.apply = function(rows, tbl, f)
        local apply = type(rows) == "table" and fetched[rows]
        if not apply then error("odbc: apply: these rows were not fetched by a resultset of odbc", 2) end
        return apply(rows, tbl, f)
    end
    return adp
end

local odbc = {}
odbc.new = function(conn, f)
    local h = r_new(conn)
    -- A connection that cannot be opened is logged (by r_new) and gives nil, as in STAGE.
    if h == nil then return nil end
    local adp = adapter(h)
    if f == nil then return adp end
    local res = pack(pcall(f, adp))
    -- Closing commits an open transaction when f succeeded and rolls it back when it failed.
    local closed, why = pcall(r_close, h, res[1])
    if not res[1] then error(res[2], 0) end
    if not closed then error(why, 0) end
    return unpack(res, 2, res.n)
end

local cache = {}
odbc.cache = function(name, f)
    local v = cache[name]
    if v ~= nil or f == nil then return v end
    v = f()
    cache[name] = v
    return v
end
odbc.purge = function(names)
    if names == nil then
        cache = {}
    elseif type(names) == "table" then
        for _, n in ipairs(names) do cache[n] = nil end
    else
        cache[names] = nil
    end
end
return odbc
"#;

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    lua.load(PRELUDE).set_name("=odbc").call(raw_functions(lua)?)
}

/// A Lua value as a database value; a table is stored as a BSON document (a BLOB), as STAGE
/// does, and comes back as a table when read.
pub fn to_db(lua: &Lua, v: &LuaValue, what: &str) -> mlua::Result<db::Value> {
    to_db_named(lua, v, || what.to_string())
}

/// `to_db` that names the value (`what`) only when it cannot be stored, so that converting
/// a query's parameters formats nothing.
fn to_db_named(lua: &Lua, v: &LuaValue, what: impl FnOnce() -> String) -> mlua::Result<db::Value> {
    Ok(match v {
        LuaValue::Table(_) => match crate::lua::bson::encode_vec(lua, v) {
            Ok(b) => db::Value::Bytes(b),
            Err(e) => {
                return Err(mlua::Error::RuntimeError(format!(
                    "odbc: {}: cannot store the table as BSON: {e}",
                    what()
                )))
            }
        },
        LuaValue::Nil => db::Value::Null,
        LuaValue::LightUserData(p) if p.0.is_null() => db::Value::Null,
        LuaValue::Boolean(b) => db::Value::Bool(*b),
        LuaValue::Integer(i) => db::Value::Int(*i),
        LuaValue::Number(n) => db::Value::Float(*n),
        LuaValue::String(s) => {
            // Strings that are not UTF-8 text, or hold a NUL byte (which text columns and
            // C-string drivers cut at), travel as binary.
            let b = s.as_bytes();
            match std::str::from_utf8(&b) {
                Ok(t) if !t.contains('\0') => db::Value::Text(t.to_string()),
                _ => db::Value::Bytes(b.to_vec()),
            }
        }
        other => {
            return Err(mlua::Error::RuntimeError(format!(
                "odbc: {}: cannot store a {} in the database",
                what(),
                other.type_name()
            )))
        }
    })
}

/// A value of a binary column: a BLOB that is one BSON document (a table stored by `to_db`)
/// decodes to a table, anything else stays a string.
fn binary_to_lua(lua: &Lua, b: &[u8]) -> mlua::Result<LuaValue> {
    if db::session::looks_like_bson(b) {
        if let Ok(v @ LuaValue::Table(_)) = crate::lua::bson::decode(lua, b) {
            return Ok(v);
        }
    }
    Ok(LuaValue::String(lua.create_string(b)?))
}

/// A database value as a Lua value; NULL is `bundle.null`.
pub fn to_lua(lua: &Lua, v: &db::Value) -> mlua::Result<LuaValue> {
    Ok(match v {
        db::Value::Null => LuaValue::NULL,
        db::Value::Bool(b) => LuaValue::Boolean(*b),
        db::Value::Int(i) => LuaValue::Integer(*i),
        db::Value::Float(f) => LuaValue::Number(*f),
        db::Value::Text(s) => LuaValue::String(lua.create_string(s)?),
        db::Value::Bytes(b) => LuaValue::String(lua.create_string(b)?),
    })
}

fn key_to_lua(lua: &Lua, a: &KeyAtom) -> mlua::Result<LuaValue> {
    to_lua(lua, &a.to_value())
}

fn key_from_lua(lua: &Lua, v: &LuaValue) -> Option<KeyAtom> {
    match v {
        LuaValue::Integer(_) | LuaValue::Number(_) | LuaValue::String(_) | LuaValue::Boolean(_) => {
            KeyAtom::from_value(&to_db(lua, v, "key").ok()?)
        }
        _ => None,
    }
}

/// Resolves `odbc.new`'s argument: a `%odbc` name, a connection string or an attribute table.
fn spec_of(lua: &Lua, conn: &LuaValue) -> mlua::Result<ConnSpec> {
    match conn {
        LuaValue::String(s) => {
            let s = s.to_str()?.to_string();
            let ctx = crate::host::ctx(lua);
            if let Some(json) = ctx.node.config.lua.odbc.get(&s) {
                ConnSpec::from_json(&s, json).map_err(mlua::Error::from)
            } else if s.contains('=') {
                Ok(ConnSpec::from_string(&s))
            } else {
                Err(mlua::Error::RuntimeError(format!(
                    "odbc.new: no connection named {s:?} in lua.%odbc of conf/stage.json (and it is not a connection string)"
                )))
            }
        }
        LuaValue::Table(t) => {
            let mut attrs = Vec::new();
            for pair in t.pairs::<String, LuaValue>() {
                let (k, v) = pair?;
                let a = match v {
                    LuaValue::String(s) => db::connstr::Attr::Text(s.to_str()?.to_string()),
                    LuaValue::Integer(i) => db::connstr::Attr::Int(i),
                    LuaValue::Number(n) => db::connstr::Attr::Float(n),
                    LuaValue::Boolean(b) => db::connstr::Attr::Bool(b),
                    other => {
                        return Err(mlua::Error::RuntimeError(format!(
                            "odbc.new: attribute {k}: expected a string or a number, found a {}",
                            other.type_name()
                        )))
                    }
                };
                attrs.push((k, a));
            }
            let mut spec = ConnSpec::from_attrs("odbc.new", &attrs).map_err(mlua::Error::from)?;
            // Messages name the connection by its string, without the password.
            spec.label = ConnSpec::from_string(&spec.conn_str).label;
            Ok(spec)
        }
        other => Err(mlua::Error::RuntimeError(format!(
            "odbc.new: expected a connection name, a connection string or a table of attributes, found a {}",
            other.type_name()
        ))),
    }
}

/// The adapter's connection, shared with the worker running its current call.
type Shared = Arc<Mutex<Option<Session>>>;

struct Adapter {
    session: Shared,
    exec: &'static Executor,
    /// A copy of the session's dialect, readable without locking the session (which a
    /// worker may hold for the length of a query).
    driver: db::QueryDriver,
}

impl Adapter {
    /// Runs `f` on the adapter's session on an executor thread; the coroutine yields meanwhile.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Session) -> db::Result<T> + Send + 'static,
    ) -> mlua::Result<T> {
        let session = self.session.clone();
        self.exec
            .run(move || {
                let mut guard = session.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_mut() {
                    Some(s) => f(s),
                    None => Err(DbError::other("the adapter is closed")),
                }
            })
            .await
            .map_err(mlua::Error::from)?
            .map_err(mlua::Error::from)
    }
}

/// Opens an adapter; None when the connection cannot be made (the error is logged), as
/// STAGE's `odbc.new` returns nothing then. A bad argument still raises.
async fn new_adapter(lua: &Lua, conn: LuaValue) -> mlua::Result<Option<AdapterHandle>> {
    let spec = spec_of(lua, &conn)?;
    let workers = crate::host::ctx(lua).node.config.workers;
    let exec = Executor::global(workers);
    let pool = Pool::get(&spec, workers);
    let pooled = match pool.checkout(exec, spec.connection_timeout).await {
        Ok(p) => p,
        Err(e) => {
            log::error!("odbc.new: cannot connect to {}: {e}", spec.label);
            return Ok(None);
        }
    };
    let session = Session {
        conn: pooled,
        driver: spec.driver,
        timeout: spec.execute_timeout,
    };
    let adapter = Rc::new(Adapter {
        session: Arc::new(Mutex::new(Some(session))),
        exec,
        driver: spec.driver,
    });
    Ok(Some(AdapterHandle(adapter)))
}

/// `execute`'s first argument: SQL, or `{sql, "i", "=10c", ...}` with STAGE's parameter types.
fn parse_statement(sql: LuaValue) -> mlua::Result<(String, Vec<db::Spec>)> {
    match sql {
        LuaValue::String(s) => Ok((s.to_str()?.to_string(), vec![])),
        LuaValue::Table(t) => {
            let sql: String = t.get(1)?;
            let mut specs = Vec::new();
            for i in 2..=t.raw_len() {
                let l: mlua::String = t.get(i)?;
                specs.extend(db::session::parse_specs(&l.to_str()?).map_err(mlua::Error::from)?);
            }
            Ok((sql, specs))
        }
        other => Err(mlua::Error::RuntimeError(format!(
            "odbc: expected SQL text or {{sql, types...}}, found a {}",
            other.type_name()
        ))),
    }
}

/// The parameters, by their specs. Values come as varargs, or (STAGE's source form) as ONE
/// table argument that is a list (`execute(sql, {v1, v2})`); any other table is a value (a
/// BSON blob). Output parameters (`=`) take no value: the values fill the others in order.
fn params_of(lua: &Lua, specs: &[db::Spec], args: &MultiValue) -> mlua::Result<Vec<Param>> {
    let list = match (args.len(), args.front()) {
        (1, Some(LuaValue::Table(t))) if t.raw_len() > 0 || t.is_empty() => Some(t),
        _ => None,
    };
    let spread: Vec<LuaValue> = match list {
        Some(t) => t.sequence_values::<LuaValue>().collect::<mlua::Result<_>>()?,
        None => vec![],
    };
    let values: Box<dyn Iterator<Item = &LuaValue>> = match list {
        Some(_) => Box::new(spread.iter()),
        None => Box::new(args.iter()),
    };
    let mut out = Vec::with_capacity(args.len().max(specs.len()));
    let mut next = values.enumerate();
    let mut spec_at = 0;
    loop {
        let spec = specs.get(spec_at).copied();
        spec_at += 1;
        if let Some(
            sp @ db::Spec {
                dir: db::Dir::Out, ..
            },
        ) = spec
        {
            out.push(Param {
                value: db::Value::Null,
                letter: Some(sp.letter),
                len: sp.len,
                dir: sp.dir,
            });
            continue;
        }
        let Some((i, v)) = next.next() else {
            // An in/out parameter without a value is NULL; plain ones simply end the list.
            if let Some(
                sp @ db::Spec {
                    dir: db::Dir::InOut, ..
                },
            ) = spec
            {
                out.push(Param {
                    value: db::Value::Null,
                    letter: Some(sp.letter),
                    len: sp.len,
                    dir: sp.dir,
                });
                continue;
            }
            break;
        };
        let value = to_db_named(lua, v, || format!("parameter {}", i + 1))?;
        out.push(match spec {
            Some(sp) => Param {
                value,
                letter: Some(sp.letter),
                len: sp.len,
                dir: sp.dir,
            },
            None => Param::new(value, None),
        });
    }
    Ok(out)
}

fn row_table(lua: &Lua, result: &QueryResult, row: &[db::Value]) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, row.len())?;
    for (c, v) in result.columns.iter().zip(row) {
        let v = match (c.kind, v) {
            (db::session::Kind::Binary, db::Value::Bytes(b)) => binary_to_lua(lua, b)?,
            _ => to_lua(lua, v)?,
        };
        t.raw_set(c.name.as_str(), v)?;
    }
    Ok(t)
}

struct Resultset {
    adapter: Rc<Adapter>,
    sql: String,
    result: QueryResult,
    snapshot: Option<Snapshot>,
}

fn parse_keys(keys: &LuaValue) -> mlua::Result<Vec<KeyPart>> {
    let one = |s: &str| {
        if s == "$" {
            KeyPart::RowNumber
        } else {
            KeyPart::Column(s.to_string())
        }
    };
    Ok(match keys {
        LuaValue::Nil => vec![],
        LuaValue::String(s) => vec![one(&s.to_str()?)],
        LuaValue::Table(t) => {
            let mut v = Vec::new();
            for k in t.sequence_values::<String>() {
                v.push(one(&k?));
            }
            v
        }
        other => {
            return Err(mlua::Error::RuntimeError(format!(
                "odbc: fetch: keys must be a column name, \"$\" or a list of them, found a {}",
                other.type_name()
            )))
        }
    })
}

/// The adapter as Lua holds it; when Lua collects it, the connection goes back to its pool.
struct AdapterHandle(Rc<Adapter>);

impl mlua::UserData for AdapterHandle {}

/// A resultset as Lua holds it.
struct RsHandle(Rc<RefCell<Resultset>>);

impl mlua::UserData for RsHandle {}

fn adapter_of(h: &AnyUserData) -> mlua::Result<Rc<Adapter>> {
    Ok(h.borrow::<AdapterHandle>()?.0.clone())
}

/// What `execute`, `query` and `exec` start from: the adapter, the SQL and its parameters
/// converted by their type letters.
fn statement_of(
    lua: &Lua,
    h: &AnyUserData,
    sql: LuaValue,
    args: &MultiValue,
) -> mlua::Result<(Rc<Adapter>, String, Vec<Param>)> {
    let a = adapter_of(h)?;
    let (sql, specs) = parse_statement(sql)?;
    let params = params_of(lua, &specs, args)?;
    Ok((a, sql, params))
}

fn resultset_of(h: &AnyUserData) -> mlua::Result<Rc<RefCell<Resultset>>> {
    Ok(h.borrow::<RsHandle>()?.0.clone())
}

/// The raw functions the prelude builds adapters and resultsets from. They are created once
/// per Lua state and take the adapter or resultset handle as their first argument, so a
/// query creates no Rust functions.
fn raw_functions(lua: &Lua) -> mlua::Result<Table> {
    let raw = lua.create_table()?;
    raw.set(
        "new",
        lua.create_async_function(|lua, conn: LuaValue| async move { new_adapter(&lua, conn).await })?,
    )?;
    raw.set(
        "execute",
        lua.create_async_function(
            |lua, (h, sql, args): (AnyUserData, LuaValue, MultiValue)| async move {
                let (a, sql, params) = statement_of(&lua, &h, sql, &args)?;
                // The SQL goes to the worker and comes back with the result (no copy).
                let (result, sql) = a.run(move |s| Ok((s.execute(&sql, &params)?, sql))).await?;
                let affected = result.affected;
                let outputs = match &result.outputs {
                    Some(list) => {
                        let t = lua.create_table_with_capacity(list.len(), 0)?;
                        for v in list {
                            t.raw_push(to_lua(&lua, v)?)?;
                        }
                        Some(t)
                    }
                    None => None,
                };
                let rs = Resultset {
                    adapter: a,
                    sql,
                    result,
                    snapshot: None,
                };
                Ok((
                    lua.create_userdata(RsHandle(Rc::new(RefCell::new(rs))))?,
                    affected,
                    outputs,
                ))
            },
        )?,
    )?;
    raw.set(
        "query",
        lua.create_async_function(
            |lua, (h, sql, args): (AnyUserData, LuaValue, MultiValue)| async move {
                let (a, sql, params) = statement_of(&lua, &h, sql, &args)?;
                let result = a.run(move |s| s.execute(&sql, &params)).await?;
                let list = lua.create_table_with_capacity(result.rows.len(), 0)?;
                for row in &result.rows {
                    list.raw_push(row_table(&lua, &result, row)?)?;
                }
                Ok(list)
            },
        )?,
    )?;
    raw.set(
        "exec",
        lua.create_async_function(
            |lua, (h, sql, args): (AnyUserData, LuaValue, MultiValue)| async move {
                let (a, sql, params) = statement_of(&lua, &h, sql, &args)?;
                let (affected, id) = a
                    .run(move |s| {
                        let r = s.execute(&sql, &params)?;
                        let id = if db::session::is_insert(&sql) {
                            s.last_insert_id()?
                        } else {
                            db::Value::Null
                        };
                        Ok((r.affected, id))
                    })
                    .await?;
                let id = if id.is_null() {
                    LuaValue::Nil
                } else {
                    to_lua(&lua, &id)?
                };
                Ok((affected, id))
            },
        )?,
    )?;
    raw.set(
        "begin",
        lua.create_async_function(
            |_, h: AnyUserData| async move { adapter_of(&h)?.run(|s| s.begin()).await },
        )?,
    )?;
    for (name, commit) in [("commit", true), ("rollback", false)] {
        raw.set(
            name,
            lua.create_async_function(move |_, h: AnyUserData| async move {
                adapter_of(&h)?.run(move |s| s.finish(commit)).await
            })?,
        )?;
    }
    raw.set(
        "close",
        lua.create_async_function(|_, (h, commit): (AnyUserData, Option<bool>)| async move {
            let a = adapter_of(&h)?;
            let session = a.session.clone();
            // Ends an open transaction, then hands the connection back to its pool (the
            // session's drop does that, without blocking).
            let r = a
                .exec
                .run(move || {
                    let mut guard = session.lock().unwrap_or_else(|e| e.into_inner());
                    let r = match guard.as_mut() {
                        Some(s) => s.finish(commit.unwrap_or(true)),
                        None => Ok(()),
                    };
                    guard.take();
                    r
                })
                .await
                .map_err(mlua::Error::from)?;
            r.map_err(mlua::Error::from)
        })?,
    )?;
    raw.set(
        "fetch",
        lua.create_function(|lua, (h, keys): (AnyUserData, LuaValue)| {
            let rs = resultset_of(&h)?;
            let keys = parse_keys(&keys)?;
            let mut rs = rs.borrow_mut();
            let snap =
                Snapshot::new(rs.result.columns.clone(), &rs.result.rows, keys).map_err(mlua::Error::from)?;
            let out = if snap.keys.is_empty() {
                match snap.rows.first() {
                    Some((_, row)) => LuaValue::Table(row_table(lua, &rs.result, row)?),
                    None => LuaValue::Nil,
                }
            } else {
                let top = lua.create_table()?;
                for (path, row) in &snap.rows {
                    let mut t = top.clone();
                    for atom in &path[..path.len() - 1] {
                        let k = key_to_lua(lua, atom)?;
                        t = match t.raw_get::<LuaValue>(k.clone())? {
                            LuaValue::Table(inner) => inner,
                            _ => {
                                let inner = lua.create_table()?;
                                t.raw_set(k, inner.clone())?;
                                inner
                            }
                        };
                    }
                    t.raw_set(
                        key_to_lua(lua, &path[path.len() - 1])?,
                        row_table(lua, &rs.result, row)?,
                    )?;
                }
                LuaValue::Table(top)
            };
            let depth = snap.keys.len();
            rs.snapshot = Some(snap);
            Ok((out, depth))
        })?,
    )?;
    raw.set(
        "columns",
        lua.create_function(|lua, h: AnyUserData| {
            let rs = resultset_of(&h)?;
            let rs = rs.borrow();
            let list = lua.create_table()?;
            for c in &rs.result.columns {
                let t = lua.create_table()?;
                t.set("name", c.name.as_str())?;
                t.set("type", c.type_name.as_str())?;
                t.set("size", c.size)?;
                t.set("scale", c.scale)?;
                t.set("nullable", c.nullable)?;
                list.raw_push(t)?;
            }
            Ok(list)
        })?,
    )?;
    raw.set(
        "erase",
        lua.create_function(|_, (rows, path): (Table, LuaValue)| {
            // STAGE returns how many entries were removed (0 or 1).
            let path = path_of(path)?;
            let (last, parents) = path.split_last().ok_or_else(|| rt("odbc: erase: empty path"))?;
            let Some(t) = walk_path(rows, parents)? else {
                return Ok(0);
            };
            if t.raw_get::<LuaValue>(last.clone())?.is_nil() {
                return Ok(0);
            }
            t.raw_set(last.clone(), LuaValue::Nil)?;
            Ok(1)
        })?,
    )?;
    raw.set(
        "near",
        lua.create_function(|_, (rows, path): (Table, LuaValue)| {
            // The entry at the path, or nil when it is missing (STAGE creates nothing).
            let path = path_of(path)?;
            let (last, parents) = path.split_last().ok_or_else(|| rt("odbc: near: empty path"))?;
            match walk_path(rows, parents)? {
                Some(t) => t.raw_get::<LuaValue>(last.clone()),
                None => Ok(LuaValue::Nil),
            }
        })?,
    )?;
    raw.set(
        "apply",
        lua.create_async_function(
            |lua, (h, rows, table): (AnyUserData, LuaValue, Option<String>)| async move {
                let rs = resultset_of(&h)?;
                apply(&lua, &rs, rows, table).await
            },
        )?,
    )?;
    Ok(raw)
}

fn rt(msg: &str) -> mlua::Error {
    mlua::Error::RuntimeError(msg.to_string())
}

/// The table reached by following `keys` from `t`, or None where a level is missing.
fn walk_path(mut t: Table, keys: &[LuaValue]) -> mlua::Result<Option<Table>> {
    for k in keys {
        match t.raw_get::<LuaValue>(k.clone())? {
            LuaValue::Table(inner) => t = inner,
            _ => return Ok(None),
        }
    }
    Ok(Some(t))
}

fn path_of(path: LuaValue) -> mlua::Result<Vec<LuaValue>> {
    Ok(match path {
        LuaValue::Table(t) => t
            .sequence_values::<LuaValue>()
            .collect::<mlua::Result<Vec<_>>>()?,
        LuaValue::Nil => return Err(rt("odbc: a path of keys is required")),
        other => vec![other],
    })
}

/// Reads the script's table back in the shape the snapshot was fetched in.
fn read_current(lua: &Lua, rows: &LuaValue, depth: usize) -> mlua::Result<Current> {
    let mut current = Current::default();
    fn row_fields(lua: &Lua, t: &Table) -> mlua::Result<Vec<(String, db::Value)>> {
        let mut fields = Vec::new();
        for pair in t.pairs::<LuaValue, LuaValue>() {
            let (k, v) = pair?;
            if let LuaValue::String(k) = k {
                let name = k.to_str()?.to_string();
                fields.push((name.clone(), to_db(lua, &v, &format!("apply: field {name}"))?));
            }
        }
        Ok(fields)
    }
    fn walk(
        lua: &Lua,
        t: &Table,
        depth: usize,
        path: &mut Vec<KeyAtom>,
        out: &mut Current,
    ) -> mlua::Result<()> {
        if depth == 0 {
            out.rows.push((path.clone(), row_fields(lua, t)?));
            return Ok(());
        }
        for pair in t.pairs::<LuaValue, LuaValue>() {
            let (k, v) = pair?;
            let (Some(atom), LuaValue::Table(inner)) = (key_from_lua(lua, &k), v) else {
                continue;
            };
            path.push(atom);
            walk(lua, &inner, depth - 1, path, out)?;
            path.pop();
        }
        Ok(())
    }
    match rows {
        LuaValue::Table(t) => walk(lua, t, depth, &mut Vec::new(), &mut current)?,
        LuaValue::Nil if depth == 0 => {}
        other => {
            return Err(rt(&format!(
                "odbc: apply: expected the fetched rows, found a {}",
                other.type_name()
            )))
        }
    }
    Ok(current)
}

async fn apply(
    lua: &Lua,
    rs: &Rc<RefCell<Resultset>>,
    rows: LuaValue,
    table: Option<String>,
) -> mlua::Result<(Table, Table)> {
    let (changes, statements, current, adapter) = {
        let r = rs.borrow();
        let snap = r
            .snapshot
            .as_ref()
            .ok_or_else(|| rt("odbc: apply: nothing was fetched from this resultset"))?;
        let table = match table {
            Some(t) => t,
            None => db::track::table_from_sql(&r.sql)
                .ok_or_else(|| rt("odbc: apply: name the table (the query has no FROM to take it from)"))?,
        };
        let current = read_current(lua, &rows, snap.keys.len())?;
        let changes = snap.diff(&current, &table);
        let driver = r.adapter.driver;
        let statements: Vec<_> = changes
            .iter()
            .map(|c| {
                (
                    db::track::statement(c, &snap.columns, driver),
                    c.action,
                    c.generated.is_some(),
                )
            })
            .collect();
        (changes, statements, current, r.adapter.clone())
    };
    let keys = if statements.is_empty() {
        vec![]
    } else {
        adapter
            .run(move |s| {
                // One transaction for the whole apply, unless the script already opened one.
                let own = !s.conn.in_transaction;
                if own {
                    s.begin()?;
                }
                let mut keys = Vec::new();
                let result = (|| {
                    for ((sql, params), action, generated) in &statements {
                        let r = s.execute(sql, params)?;
                        if *action == db::track::Action::Insert {
                            let key = if !r.rows.is_empty() {
                                db::session::first_value(&r)
                            } else if *generated || s.driver != db::QueryDriver::Postgres {
                                s.last_insert_id()?
                            } else {
                                db::Value::Null
                            };
                            keys.push(key);
                        }
                    }
                    Ok(())
                })();
                if own {
                    match &result {
                        Ok(()) => s.finish(true)?,
                        Err(_) => {
                            let _ = s.finish(false);
                        }
                    }
                }
                result.map(|_| keys)
            })
            .await?
    };
    let moves = {
        let mut r = rs.borrow_mut();
        let snap = r.snapshot.as_mut().expect("checked above");
        snap.commit(&current, &changes, &keys)
    };
    if let LuaValue::Table(rows) = &rows {
        for (from, to, col, key) in &moves {
            let from = key_to_lua(lua, &from[0])?;
            let row: LuaValue = rows.raw_get(from.clone())?;
            if let LuaValue::Table(row) = &row {
                row.raw_set(col.as_str(), to_lua(lua, key)?)?;
            }
            rows.raw_set(from, LuaValue::Nil)?;
            rows.raw_set(key_to_lua(lua, &to[0])?, row)?;
        }
    }
    let ai = lua.create_table()?;
    let log = lua.create_table()?;
    let mut inserts = keys.iter();
    for c in &changes {
        let entry = lua.create_table()?;
        entry.set("table", c.table.as_str())?;
        entry.set("action", c.action as i64)?;
        let filter = lua.create_table()?;
        for (k, v) in &c.filter {
            filter.set(k.as_str(), to_lua(lua, v)?)?;
        }
        if c.action == db::track::Action::Insert {
            if let Some(key) = inserts.next() {
                if !key.is_null() {
                    ai.raw_push(to_lua(lua, key)?)?;
                    entry.set("key", to_lua(lua, key)?)?;
                    if let Some(col) = &c.generated {
                        filter.set(col.as_str(), to_lua(lua, key)?)?;
                    }
                }
            }
        }
        entry.set("where", filter)?;
        let value = lua.create_table()?;
        let pairs = |list: &[(String, db::Value)]| -> mlua::Result<Table> {
            let t = lua.create_table()?;
            for (k, v) in list {
                t.set(k.as_str(), to_lua(lua, v)?)?;
            }
            Ok(t)
        };
        if c.action != db::track::Action::Insert {
            value.set("o", pairs(&c.old)?)?;
        }
        if c.action != db::track::Action::Delete {
            value.set("n", pairs(&c.new)?)?;
        }
        let types = lua.create_table()?;
        for (k, t) in &c.types {
            types.set(k.as_str(), t.as_str())?;
        }
        value.set("t", types)?;
        entry.set("value", value)?;
        log.raw_push(entry)?;
    }
    Ok((ai, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_convert_and_a_bad_one_is_named_by_its_position() {
        let lua = Lua::new();
        let spec = |s: &str| db::session::parse_specs(s).unwrap();
        let f = LuaValue::Function(lua.create_function(|_, ()| Ok(())).unwrap());
        let args = MultiValue::from_vec(vec![
            LuaValue::Integer(7),
            LuaValue::String(lua.create_string("kim").unwrap()),
            f.clone(),
        ]);
        let e = params_of(&lua, &spec("i"), &args).unwrap_err();
        assert_eq!(
            e.to_string(),
            "runtime error: odbc: parameter 3: cannot store a function in the database"
        );
        let ok = params_of(
            &lua,
            &spec("i"),
            &MultiValue::from_vec(args.into_iter().take(2).collect()),
        )
        .unwrap();
        assert_eq!(ok[0].value, db::Value::Int(7));
        assert_eq!(ok[0].letter, Some('i'));
        assert_eq!(ok[1].value, db::Value::Text("kim".into()));
        assert_eq!(ok[1].letter, None);
        let e = to_db(&lua, &f, "key").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("odbc: key: cannot store a function in the database"),
            "{e}"
        );
    }

    #[test]
    fn one_list_argument_is_the_parameters_and_other_tables_are_bson() {
        let lua = Lua::new();
        let list: Table = lua.load("return { 1, 'a' }").eval().unwrap();
        let ps = params_of(&lua, &[], &MultiValue::from_vec(vec![LuaValue::Table(list)])).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[1].value, db::Value::Text("a".into()));
        let doc: Table = lua.load("return { blob = 'HAHA' }").eval().unwrap();
        let ps = params_of(&lua, &[], &MultiValue::from_vec(vec![LuaValue::Table(doc)])).unwrap();
        assert_eq!(ps.len(), 1);
        let db::Value::Bytes(b) = &ps[0].value else {
            panic!("{:?}", ps[0].value)
        };
        assert!(db::session::looks_like_bson(b));
        assert!(matches!(binary_to_lua(&lua, b).unwrap(), LuaValue::Table(_)));
        // Output parameters take no value; the values fill the others in order.
        let ps = params_of(
            &lua,
            &spec_list(&["i", "=10c", "+i"]),
            &MultiValue::from_vec(vec![LuaValue::Integer(5), LuaValue::Integer(6)]),
        )
        .unwrap();
        assert_eq!(
            ps.iter().map(|p| p.dir).collect::<Vec<_>>(),
            vec![db::Dir::In, db::Dir::Out, db::Dir::InOut]
        );
        assert_eq!(ps[2].value, db::Value::Int(6));
        assert_eq!(ps[1].len, Some(10));
    }

    fn spec_list(l: &[&str]) -> Vec<db::Spec> {
        l.iter()
            .flat_map(|s| db::session::parse_specs(s).unwrap())
            .collect()
    }
}
