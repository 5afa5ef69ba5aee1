//! The `cluster` module (ext): `cluster.members()` lists this node and every member it
//! knows with state, stage ids and load; `cluster.watch(id)` has membership events (join,
//! leave, suspect, back) delivered to this instance as message `id`; `cluster.watch(nil)`
//! stops them. Thin glue over `cluster::Engine`.

use crate::host::ctx;
use mlua::{Lua, Table, Value};

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("members", lua.create_function(members)?)?;
    t.set(
        "watch",
        lua.create_function(|lua, id: Option<String>| {
            let c = ctx(lua);
            match &c.node.cluster {
                Some(cl) => {
                    cl.engine.watch(c.number, id.as_deref().unwrap_or(""));
                    Ok(true)
                }
                None => Ok(false),
            }
        })?,
    )?;
    Ok(t)
}

/// `{ {node, addr, state, stages = {{stage, instances, load}, ...}, load}, ... }`; without a
/// cluster, this node alone.
fn members(lua: &Lua, (): ()) -> mlua::Result<Table> {
    let c = ctx(lua);
    let out = lua.create_table()?;
    let Some(cl) = &c.node.cluster else {
        let me = lua.create_table()?;
        me.set("node", c.node.node_name.as_str())?;
        me.set("state", "alive")?;
        me.set("stages", lua.create_table()?)?;
        me.set("load", 0)?;
        out.push(me)?;
        return Ok(out);
    };
    for (node, state, stages) in cl.engine.members() {
        let m = lua.create_table()?;
        m.set("node", node.as_str())?;
        m.set("addr", node.as_str())?;
        m.set("state", state.name())?;
        let st = lua.create_table()?;
        let mut load = 0u8;
        for s in &stages {
            let e = lua.create_table()?;
            e.set("stage", s.stage.as_str())?;
            e.set("instances", s.instances)?;
            e.set("load", s.load)?;
            load = load.max(s.load);
            st.push(e)?;
        }
        m.set("stages", st)?;
        m.set("load", load)?;
        out.push(Value::Table(m))?;
    }
    Ok(out)
}
