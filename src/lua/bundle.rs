//! The `bundle` module: `json`, `bson`, `random` (WELL512 with its state in a Lua table),
//! `proxy` and `viewof` (bundle.lua) and `null`.

use crate::host::convert::IntoLuaErr;
use crate::random::Well512;
use mlua::{Lua, LuaSerdeExt, Table, Value};

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("null", Value::NULL)?;
    t.set("json", lua.create_function(json)?)?;
    t.set("bson", lua.create_function(bson)?)?;
    // bundle.proxy and bundle.random (with its function form) are written in Lua.
    lua.load(include_str!("bundle.lua"))
        .set_name("=bundle")
        .call::<()>((t.clone(), lua.create_function(random)?))?;
    Ok(t)
}

fn json_options() -> mlua::SerializeOptions {
    mlua::SerializeOptions::new()
        .serialize_none_to_null(true)
        .serialize_unit_to_null(true)
}

/// `bundle.json(v)`: JSON text → value, `*.json` file name → value, table → JSON text.
/// Text starting with `{`, `[` or `"` (after whitespace) is never a file name.
fn json(lua: &Lua, v: Value) -> mlua::Result<Value> {
    match v {
        Value::String(s) => {
            let bytes = s.as_bytes();
            let text = String::from_utf8_lossy(&bytes);
            let trimmed = text.trim();
            let (parsed, what) = if trimmed.ends_with(".json") && !trimmed.starts_with(['{', '[', '"']) {
                let data =
                    std::fs::read(trimmed).lua_err_in(&format!("bundle.json: cannot read {trimmed}"))?;
                (
                    serde_json::from_slice::<serde_json::Value>(&data),
                    trimmed.to_string(),
                )
            } else {
                (serde_json::from_str(trimmed), "text".to_string())
            };
            let parsed = parsed.lua_err_in(&format!("bundle.json: invalid JSON in {what}"))?;
            lua.to_value_with(&parsed, json_options())
        }
        Value::Table(_) | Value::Integer(_) | Value::Number(_) | Value::Boolean(_) => {
            crate::lua::value::check_depth(&v)
                .map_err(|e| mlua::Error::runtime(format!("bundle.json: {e}")))?;
            let text = serde_json::to_string(&v).lua_err_in("bundle.json")?;
            lua.create_string(text).map(Value::String)
        }
        other => Err(mlua::Error::runtime(format!(
            "bundle.json: expected a JSON string, a file name or a table, got a {}",
            other.type_name()
        ))),
    }
}

/// `bundle.bson(v [, "stage"])`: BSON bytes -> table, table -> BSON bytes (the broker's
/// codec); `"stage"` chooses STAGE's array mapping (0-based arrays, `{"#1": ...}`).
fn bson(lua: &Lua, (v, mapping): (Value, Option<String>)) -> mlua::Result<Value> {
    let mode = match mapping.as_deref() {
        None | Some("standard") => crate::lua::bson::Mode::default(),
        Some("stage") => crate::lua::bson::Mode { stage_arrays: true },
        Some(other) => {
            return Err(mlua::Error::runtime(format!(
                "bundle.bson: unknown mapping {other:?} (expected \"stage\" or \"standard\")"
            )))
        }
    };
    match &v {
        Value::String(s) => crate::lua::bson::decode_with(lua, &s.as_bytes(), mode).lua_err_in("bundle.bson"),
        Value::Table(_) => {
            let bytes = crate::lua::bson::encode_vec_with(lua, &v, mode).lua_err_in("bundle.bson")?;
            lua.create_string(bytes).map(Value::String)
        }
        other => Err(mlua::Error::runtime(format!(
            "bundle.bson: expected BSON bytes or a table, got a {}",
            other.type_name()
        ))),
    }
}

/// Reads the generator state kept in `t` (`t[1..16]`, `t.index`), seeding it when empty.
fn load_state(t: &Table) -> mlua::Result<Well512> {
    if let Ok(Some(index)) = t.raw_get::<Option<i64>>("index") {
        let mut state = [0u32; 16];
        for (i, word) in state.iter_mut().enumerate() {
            *word = t.raw_get::<i64>(i + 1)? as u32;
        }
        return Ok(Well512 {
            state,
            index: (index as usize) & 15,
        });
    }
    let seed = match t.raw_get::<Option<i64>>("seed")? {
        Some(s) => s as u64,
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            now ^ ((t.to_pointer() as u64) << 17)
        }
    };
    Ok(Well512::from_seed(seed))
}

fn store_state(t: &Table, g: &Well512) -> mlua::Result<()> {
    for (i, word) in g.state.iter().enumerate() {
        t.raw_set(i + 1, *word as i64)?;
    }
    t.raw_set("index", g.index as i64)
}

/// `bundle.random(state [, lo [, hi]])`: like `math.random` — no bounds: a float in [0, 1);
/// `n`: an integer in [1, n]; `lo, hi`: an integer in [lo, hi].
fn random(_: &Lua, (state, lo, hi): (Table, Option<i64>, Option<i64>)) -> mlua::Result<Value> {
    let mut g = load_state(&state)?;
    let v = match (lo, hi) {
        (None, _) => Value::Number(g.next_f64()),
        (Some(n), None) | (Some(1), Some(n)) if n >= 1 => Value::Integer(g.range(1, n)),
        (Some(lo), Some(hi)) if lo <= hi => Value::Integer(g.range(lo, hi)),
        (Some(lo), hi) => {
            return Err(mlua::Error::runtime(format!(
                "bundle.random: empty interval [{}, {}]",
                if hi.is_some() { lo } else { 1 },
                hi.unwrap_or(lo)
            )))
        }
    };
    store_state(&state, &g)?;
    Ok(v)
}
