//! The `vultr` module (API.md §9): thin glue over `cloud::vultr`. Every call is an async
//! function, so the calling coroutine yields while HTTP is in flight and the instance keeps
//! serving other callbacks. Errors become Lua errors carrying the HTTP status and Vultr's
//! message; the API key never reaches Lua, logs or error text.

use crate::cloud::vultr::{Client, CreateRequest, InstanceFilter, Settings, VultrError, WaitOptions};
use crate::host::convert::{self, Unit};
use crate::host::{call_callback, ctx};
use mlua::{AnyUserData, Function, Lua, LuaSerdeExt, MultiValue, SerializeOptions, Table, Value};
use serde_json::Value as Json;
use std::time::Duration;

pub fn open(lua: &Lua) -> mlua::Result<Table> {
    // A mistake in %vultr (an unknown key, a bad endpoint) stops the instance at start,
    // naming the key, rather than surfacing at the first call.
    Settings::from_config(ctx(lua).node.config.vultr.as_ref())?;
    let t = lua.create_table()?;
    t.set(
        "regions",
        lua.create_async_function(|lua, ()| async move { to_lua(&lua, &client(&lua)?.regions().await?) })?,
    )?;
    t.set(
        "plans",
        lua.create_async_function(|lua, kind: Option<String>| async move {
            to_lua(&lua, &client(&lua)?.plans(kind.as_deref()).await?)
        })?,
    )?;
    t.set(
        "os",
        lua.create_async_function(|lua, ()| async move { to_lua(&lua, &client(&lua)?.os().await?) })?,
    )?;
    t.set(
        "listall",
        lua.create_async_function(|lua, ()| async move { to_lua(&lua, &client(&lua)?.catalog().await?) })?,
    )?;
    t.set(
        "instances",
        lua.create_async_function(|lua, filter: Option<Table>| async move {
            let filter = instance_filter(filter)?;
            to_lua(&lua, &client(&lua)?.instances(&filter).await?)
        })?,
    )?;
    t.set(
        "get",
        lua.create_async_function(
            |lua, id: String| async move { to_lua(&lua, &client(&lua)?.get(&id).await?) },
        )?,
    )?;
    t.set(
        "status",
        lua.create_async_function(|lua, id: String| async move { Ok(client(&lua)?.get(&id).await?.word()) })?,
    )?;
    t.set(
        "create",
        lua.create_async_function(|lua, spec: Table| async move {
            let req = create_request(&lua, spec)?;
            to_lua(&lua, &client(&lua)?.create(&req).await?)
        })?,
    )?;
    t.set(
        "delete",
        lua.create_async_function(|lua, id: String| async move {
            client(&lua)?.delete(&id).await?;
            Ok(true)
        })?,
    )?;
    for action in ["start", "halt", "reboot"] {
        t.set(
            action,
            lua.create_async_function(move |lua, id: String| async move {
                client(&lua)?.action(&id, action).await?;
                Ok(true)
            })?,
        )?;
    }
    t.set("wait", lua.create_async_function(wait)?)?;
    t.set(
        "user_data",
        lua.create_async_function(|lua, id: String| async move {
            let data = client(&lua)?.user_data(&id).await?;
            lua.create_string(&data)
        })?,
    )?;
    // Reserved (floating) IPs: `/v2/reserved-ips`.
    t.set(
        "reserved_ips",
        lua.create_async_function(
            |lua, ()| async move { to_lua(&lua, &client(&lua)?.reserved_ips().await?) },
        )?,
    )?;
    t.set(
        "reserved_ip",
        lua.create_async_function(|lua, id: String| async move {
            to_lua(&lua, &client(&lua)?.reserved_ip(&id).await?)
        })?,
    )?;
    t.set(
        "reserved_ip_create",
        lua.create_async_function(|lua, spec: Table| async move {
            let (region, ip_type, label) = reserved_ip_spec(spec)?;
            to_lua(
                &lua,
                &client(&lua)?
                    .reserved_ip_create(&region, &ip_type, label.as_deref())
                    .await?,
            )
        })?,
    )?;
    t.set(
        "reserved_ip_label",
        lua.create_async_function(|lua, (id, label): (String, String)| async move {
            to_lua(&lua, &client(&lua)?.reserved_ip_label(&id, &label).await?)
        })?,
    )?;
    t.set(
        "reserved_ip_attach",
        lua.create_async_function(|lua, (id, instance): (String, String)| async move {
            client(&lua)?.reserved_ip_attach(&id, &instance).await?;
            Ok(true)
        })?,
    )?;
    t.set(
        "reserved_ip_detach",
        lua.create_async_function(|lua, id: String| async move {
            client(&lua)?.reserved_ip_detach(&id).await?;
            Ok(true)
        })?,
    )?;
    t.set(
        "reserved_ip_move",
        lua.create_async_function(|lua, (id, instance): (String, String)| async move {
            to_lua(&lua, &client(&lua)?.reserved_ip_move(&id, &instance).await?)
        })?,
    )?;
    t.set(
        "reserved_ip_delete",
        lua.create_async_function(|lua, id: String| async move {
            client(&lua)?.reserved_ip_delete(&id).await?;
            Ok(true)
        })?,
    )?;
    Ok(t)
}

const CLIENT_KEY: &str = "stage.vultr.client";

/// The instance's client, created on first use from `%vultr` and the environment, and kept
/// in the Lua registry (not in app data, whose container must not be borrowed on insert).
pub(crate) fn client(lua: &Lua) -> mlua::Result<Client> {
    if let Ok(ud) = lua.named_registry_value::<AnyUserData>(CLIENT_KEY) {
        return Ok(ud.borrow::<Client>()?.clone());
    }
    let settings = Settings::from_config(ctx(lua).node.config.vultr.as_ref())?;
    let c = Client::new(settings)?;
    lua.set_named_registry_value(CLIENT_KEY, lua.create_any_userdata(c.clone())?)?;
    Ok(c)
}

fn to_lua<T: serde::Serialize>(lua: &Lua, v: &T) -> mlua::Result<Value> {
    let opts = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
        .set_array_metatable(false);
    lua.to_value_with(v, opts)
}

fn instance_filter(t: Option<Table>) -> mlua::Result<InstanceFilter> {
    let mut f = InstanceFilter::default();
    let Some(t) = t else { return Ok(f) };
    for pair in t.pairs::<String, Value>() {
        let (k, v) = pair?;
        let s = match &v {
            Value::String(s) => s.to_str()?.to_string(),
            Value::Integer(_) | Value::Number(_) => v.to_string()?,
            _ => {
                return Err(mlua::Error::runtime(format!(
                    "vultr.instances: filter {k} must be a string"
                )))
            }
        };
        match k.as_str() {
            "tag" => f.tag = Some(s),
            "label" => f.label = Some(s),
            "main_ip" => f.main_ip = Some(s),
            "region" => f.region = Some(s),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "vultr.instances: unknown filter {other} (expected tag, label, main_ip or region)"
                )))
            }
        }
    }
    Ok(f)
}

/// `vultr.create{...}` → the request. Known fields are checked here; any other field goes
/// to the API as is (converted to JSON), so every documented option is reachable.
fn create_request(lua: &Lua, t: Table) -> mlua::Result<CreateRequest> {
    let bad = |k: &str, want: &str| mlua::Error::runtime(format!("vultr.create: {k} must be {want}"));
    let mut req = CreateRequest::default();
    for pair in t.pairs::<String, Value>() {
        let (k, v) = pair?;
        let text = |v: &Value| match v {
            Value::String(s) => Ok(s.to_str()?.to_string()),
            _ => Err(bad(&k, "a string")),
        };
        match k.as_str() {
            "region" => req.region = text(&v)?,
            "plan" => req.plan = text(&v)?,
            "label" => req.label = Some(text(&v)?),
            "hostname" => req.hostname = Some(text(&v)?),
            "os_id" => {
                req.os_id = Some(match v {
                    Value::String(ref s) => s.to_str()?.parse().map_err(|_| bad(&k, "an integer"))?,
                    ref other => convert::as_integer(other).ok_or_else(|| bad(&k, "an integer"))?,
                })
            }
            "tags" => match v {
                Value::String(s) => req.tags = vec![s.to_str()?.to_string()],
                Value::Table(list) => {
                    req.tags = list
                        .sequence_values::<Value>()
                        .map(|x| x.and_then(|x| text(&x)))
                        .collect::<mlua::Result<_>>()
                        .map_err(|_| bad(&k, "a list of strings"))?
                }
                _ => return Err(bad(&k, "a list of strings")),
            },
            "user_data" => match v {
                Value::String(s) => req.set_user_data(&s.as_bytes()),
                _ => return Err(bad(&k, "a string (plain text; it is base64-encoded for the API)")),
            },
            _ => {
                let j: Json = lua.from_value(v)?;
                req.extra.insert(k, j);
            }
        }
    }
    if req.region.is_empty() {
        return Err(mlua::Error::runtime(
            "vultr.create: region is required (e.g. \"icn\")",
        ));
    }
    if req.plan.is_empty() {
        return Err(mlua::Error::runtime(
            "vultr.create: plan is required (e.g. \"vc2-1c-1gb\")",
        ));
    }
    Ok(req)
}

/// `vultr.reserved_ip_create{region, ip_type = "v4", label}` → (region, ip_type, label).
fn reserved_ip_spec(t: Table) -> mlua::Result<(String, String, Option<String>)> {
    let what = "vultr.reserved_ip_create";
    let (mut region, mut ip_type, mut label) = (String::new(), "v4".to_string(), None);
    for pair in t.pairs::<String, Value>() {
        let (k, v) = pair?;
        let Value::String(text) = &v else {
            return Err(mlua::Error::runtime(format!("{what}: {k} must be a string")));
        };
        let text = text.to_str()?.to_string();
        match k.as_str() {
            "region" => region = text,
            "ip_type" => ip_type = text,
            "label" => label = Some(text),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "{what}: unknown field {other} (expected region, ip_type or label)"
                )))
            }
        }
    }
    if region.is_empty() {
        return Err(mlua::Error::runtime(format!(
            "{what}: region is required (e.g. \"icn\")"
        )));
    }
    if ip_type != "v4" && ip_type != "v6" {
        return Err(mlua::Error::runtime(format!(
            "{what}: ip_type must be \"v4\" or \"v6\", got {ip_type:?}"
        )));
    }
    Ok((region, ip_type, label))
}

/// A millisecond option of `vultr.wait` (clamped to a year; negative and NaN are errors).
fn ms_option(opts: &Table, key: &str, default: Duration) -> mlua::Result<Duration> {
    let what = || format!("vultr.wait: {key}");
    match opts.get::<Value>(key)? {
        Value::Nil => Ok(default),
        Value::Integer(i) => Ok(convert::timeout(&what(), i as f64, Unit::Millis)?),
        Value::Number(n) => Ok(convert::timeout(&what(), n, Unit::Millis)?),
        other => Err(mlua::Error::runtime(format!(
            "{}: expected a non-negative number of milliseconds, got a {}",
            what(),
            other.type_name()
        ))),
    }
}

/// `vultr.wait(id [, {timeout, interval, on_change}])` → instance, or nil and a reason when
/// it times out or the instance disappears. Other errors raise.
async fn wait(lua: Lua, (id, opts): (String, Option<Table>)) -> mlua::Result<MultiValue> {
    let mut wo = WaitOptions::default();
    let mut on_change: Option<Function> = None;
    if let Some(o) = &opts {
        wo.timeout = ms_option(o, "timeout", wo.timeout)?;
        wo.interval = ms_option(o, "interval", wo.interval)?.max(Duration::from_millis(10));
        on_change = o.get("on_change")?;
    }
    let c = client(&lua)?;
    let result = c
        .wait(&id, &wo, |inst| {
            let lua = lua.clone();
            let f = on_change.clone();
            async move {
                if let Some(f) = f {
                    if let Ok(v) = to_lua(&lua, &inst) {
                        call_callback(&lua, "vultr.wait on_change", &f, v).await;
                    }
                }
            }
        })
        .await;
    match result {
        Ok(inst) => Ok(MultiValue::from_iter([to_lua(&lua, &inst)?])),
        Err(e @ VultrError::WaitTimeout { .. }) => nil_reason(&lua, e.to_string()),
        Err(e) if e.status() == Some(404) => nil_reason(&lua, e.to_string()),
        Err(e) => Err(e.into()),
    }
}

fn nil_reason(lua: &Lua, reason: String) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([
        Value::Nil,
        Value::String(lua.create_string(reason)?),
    ]))
}
