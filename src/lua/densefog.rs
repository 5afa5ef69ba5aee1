//! The `densefog` library (docs/densefog.md): Lua source shipped in the binary and offered to
//! every state as `require("densefog")` through `package.preload`, so it costs nothing until
//! a script asks for it. It is plain Lua over `odbc`, `stage`, `bundle`, `broker` and `logger`,
//! plus one native helper here: the worker's webhook post.

use crate::host::context::ctx;
use mlua::{Lua, Table};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// The library's source, `src/lua/densefog.lua`.
pub const SOURCE: &str = include_str!("densefog.lua");

/// Webhook posts in flight per instance; beyond it a notification is dropped (and logged)
/// instead of queueing without bound behind a slow or dead endpoint.
pub const WEBHOOK_IN_FLIGHT: usize = 64;

/// Registers `package.preload.densefog`.
pub fn preload(lua: &Lua) -> mlua::Result<()> {
    let preload: Table = lua.globals().get::<Table>("package")?.get("preload")?;
    let loader = lua.create_function(|lua, ()| {
        let native = lua.create_table()?;
        native.set("webhook", webhook_function(lua)?)?;
        lua.load(SOURCE)
            .set_name("@densefog.lua")
            .call::<mlua::Value>(native)
    })?;
    preload.set("densefog", loader)
}

/// The host of a URL, for logs: a Slack-style webhook URL carries its secret in the path.
fn host_of(url: &reqwest::Url) -> String {
    url.host_str().unwrap_or("?").to_string()
}

/// `webhook(url, json_body, timeout_s)`: starts a POST of the body (`application/json`) on the
/// instance's runtime and returns `true` at once, or `false, why` when the URL is unusable or
/// `WEBHOOK_IN_FLIGHT` posts are still running. The post's failure (no answer within the
/// timeout, no connection, a non-2xx status) is logged once and never retried.
fn webhook_function(lua: &Lua) -> mlua::Result<mlua::Function> {
    let client: RefCell<Option<reqwest::Client>> = RefCell::new(None);
    let in_flight = Rc::new(Cell::new(0usize));
    lua.create_function(
        move |lua, (url, body, timeout): (String, mlua::String, f64)| -> mlua::Result<(bool, Option<String>)> {
            let parsed = match reqwest::Url::parse(&url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => u,
                _ => return Ok((false, Some("the webhook is not an http:// or https:// URL".into()))),
            };
            if in_flight.get() >= WEBHOOK_IN_FLIGHT {
                return Ok((
                    false,
                    Some(format!(
                        "{WEBHOOK_IN_FLIGHT} webhook posts to {} are still in flight; this notification is dropped",
                        host_of(&parsed)
                    )),
                ));
            }
            let timeout = if timeout.is_finite() && timeout > 0.0 {
                Duration::from_secs_f64(timeout.min(3600.0))
            } else {
                Duration::from_secs(10)
            };
            let c = client
                .borrow_mut()
                .get_or_insert_with(|| {
                    reqwest::Client::builder()
                        .user_agent(concat!("stage-densefog/", env!("CARGO_PKG_VERSION")))
                        .build()
                        .unwrap_or_default()
                })
                .clone();
            let request = c
                .post(parsed.clone())
                .timeout(timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.as_bytes().to_vec());
            let name = ctx(lua).name.clone();
            let count = in_flight.clone();
            count.set(count.get() + 1);
            tokio::task::spawn_local(async move {
                let host = host_of(&parsed);
                match request.send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => log::error!(target: &name, "densefog webhook to {host}: answered {}; the notification is not retried", r.status()),
                    Err(e) => {
                        let why = if e.is_timeout() {
                            format!("no answer within {} s", timeout.as_secs_f64())
                        } else if e.is_connect() {
                            "cannot connect".to_string()
                        } else {
                            e.without_url().to_string()
                        };
                        log::error!(target: &name, "densefog webhook to {host}: {why}; the notification is not retried");
                    }
                }
                count.set(count.get() - 1);
            });
            Ok((true, None))
        },
    )
}
