//! Runtime instances through the admin API (docs/admin.md): `POST /stages/{stage}/instances`
//! starts more instances of a Lua stage, `DELETE /instances/{id}` stops one (its queue
//! answered "shutting down"), `PUT /instances/{id}` reloads one. With `"node"` (body) or
//! `?node=` naming another member, the operation travels to that node as a cluster admin
//! request (`Engine::admin_request`, authenticated like every cluster datagram, taken from
//! live members only) and its answer comes back. `run_op` carries an operation out on this
//! node, for the API and for requests from other members. The work itself is
//! `host::control`.

use super::{error, json_reply, Api};
use crate::host::control::MAX_COUNT;
use crate::host::node::NodeShared;
use crate::net::http::{self as nhttp, Request};
use http::{Method, StatusCode};
use serde_json::{json, Value as Json};
use std::sync::Arc;
use std::time::Duration;

/// How long an operation on another node may take before the API answers 504 (a stop
/// waits for the instance's current callback, at most `#limits.time`).
const REMOTE_WAIT: Duration = Duration::from_secs(10);

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The body of `POST /stages/{stage}/instances`: `{}`, `{"node": "…", "count": n}`, or none.
fn start_body(body: &[u8]) -> Result<(Option<String>, u64), String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((None, 1));
    }
    let v: Json = serde_json::from_slice(body).map_err(|e| {
        format!("the body is not JSON ({e}); send {{\"node\": \"NAME\", \"count\": 1}} (both optional)")
    })?;
    let Some(o) = v.as_object() else {
        return Err(format!(
            "the body must be a JSON object like {{\"node\": \"NAME\", \"count\": 1}}, not {v}"
        ));
    };
    if let Some(k) = o.keys().find(|k| *k != "node" && *k != "count") {
        return Err(format!(
            "unknown key \"{k}\" in the body (known: \"node\", \"count\")"
        ));
    }
    let node = match o.get("node") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            return Err(format!(
                "\"node\" must be a node name (GET /nodes/all), not {other}"
            ))
        }
    };
    let count = match o.get("count") {
        None | Some(Json::Null) => 1,
        Some(c) => c
            .as_u64()
            .filter(|n| (1..=MAX_COUNT as u64).contains(n))
            .ok_or_else(|| format!("\"count\" must be an integer from 1 to {MAX_COUNT}, not {c}"))?,
    };
    Ok((node, count))
}

/// `?node=NAME` of `DELETE`/`PUT /instances/{id}`.
fn node_param(req: &Request) -> Result<Option<String>, String> {
    let Some(q) = req.parts.uri.query() else {
        return Ok(None);
    };
    let mut node = None;
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        match &*k {
            "node" if !v.is_empty() => node = Some(v.into_owned()),
            other => {
                return Err(format!(
                    "unknown query parameter \"{other}\" (only ?node=NAME is known)"
                ))
            }
        }
    }
    Ok(node)
}

impl Api {
    /// The runtime-instance endpoints; `None` for any other request.
    pub(super) async fn instances_route(
        &self,
        method: &Method,
        path: &str,
        req: &Request,
        who: &str,
    ) -> Option<nhttp::Reply> {
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let (node, op) = match (parts.as_slice(), method) {
            (["stages", stage, "instances"], &Method::POST) => match start_body(&req.body) {
                Ok((node, count)) => (node, json!({"op": "start", "stage": stage, "count": count})),
                Err(e) => return Some(error(StatusCode::BAD_REQUEST, &e)),
            },
            (["stages", _, "instances"], _) => {
                return Some(error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("{method} {path} is not supported (POST starts instances)"),
                ))
            }
            (["instances", id], &Method::DELETE | &Method::PUT) => {
                let Ok(id) = id.parse::<usize>() else {
                    return Some(error(
                        StatusCode::BAD_REQUEST,
                        &format!("instance id \"{id}\" is not a number (GET /instances lists them)"),
                    ));
                };
                let node = match node_param(req) {
                    Ok(n) => n,
                    Err(e) => return Some(error(StatusCode::BAD_REQUEST, &e)),
                };
                let what = if *method == Method::DELETE {
                    "stop"
                } else {
                    "reload"
                };
                (node, json!({"op": what, "id": id}))
            }
            _ => return None,
        };
        Some(self.dispatch(node, op, req, who).await)
    }

    /// Runs `op` here, or on member `node` through the cluster.
    async fn dispatch(&self, node: Option<String>, op: Json, req: &Request, who: &str) -> nhttp::Reply {
        let who = format!("{} ({who})", req.remote);
        let target = node.filter(|n| *n != self.node.node_name);
        let Some(target) = target else {
            let n = self.node.clone();
            return match tokio::task::spawn_blocking(move || run_op(&n, &op, &who)).await {
                Ok((code, body)) => json_reply(status(code), &body),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("the operation failed: {e}"),
                ),
            };
        };
        let Some(c) = &self.node.cluster else {
            return error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no node \"{target}\": this node ({}) is not in a cluster (#cluster)",
                    self.node.node_name
                ),
            );
        };
        let (id, rx) = match c.engine.admin_request(&target, op.to_string().as_bytes()) {
            Ok(x) => x,
            Err(e @ crate::cluster::AdminSendError::Unknown(_)) => {
                return error(StatusCode::NOT_FOUND, &e.to_string())
            }
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        };
        log::info!(target: "admin", "{who}: {op} sent to node {target}");
        match tokio::time::timeout(REMOTE_WAIT, rx).await {
            Ok(Ok(answer)) => match serde_json::from_slice::<Json>(&answer) {
                Ok(a) => json_reply(status(a["status"].as_u64().unwrap_or(500) as u16), &a["body"]),
                Err(e) => error(
                    StatusCode::BAD_GATEWAY,
                    &format!("node {target} answered something that is not JSON: {e}"),
                ),
            },
            _ => {
                c.engine.admin_forget(id);
                error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "no answer from node {target} within {} s (the cluster may have lost the request or its answer; \
                         GET /nodes/all shows whether it was carried out)",
                        REMOTE_WAIT.as_secs()
                    ),
                )
            }
        }
    }
}

/// Carries out admin operation `req` on this node (blocking: a stop waits for the
/// instance's thread): `{"op": "start", "stage": S, "count": n}`, `{"op": "stop", "id": i}`
/// or `{"op": "reload", "id": i}`. `who` is logged. Returns the HTTP status and the body.
pub fn run_op(node: &Arc<NodeShared>, req: &Json, who: &str) -> (u16, Json) {
    let name = node.node_name.as_str();
    let Some(control) = node.control.get() else {
        return (503, json!({"node": name, "error": "the node is still starting"}));
    };
    let fail = |e: crate::host::control::ControlError| {
        log::warn!(target: "admin", "{who}: {req} refused: {e}");
        (e.status(), json!({"node": name, "error": e.to_string()}))
    };
    let id = req["id"].as_u64().map(|i| i as usize);
    match (req["op"].as_str(), req["stage"].as_str(), id) {
        (Some("start"), Some(stage), _) => {
            let count = req["count"].as_u64().unwrap_or(1);
            if !(1..=MAX_COUNT as u64).contains(&count) {
                return (
                    400,
                    json!({"node": name, "error": format!("\"count\" must be an integer from 1 to {MAX_COUNT}")}),
                );
            }
            match control.start(node, stage, count as usize) {
                Ok(ids) => {
                    log::info!(target: "admin", "{who}: started {} instance(s) of {stage} on {name}: {ids:?}", ids.len());
                    (
                        201,
                        json!({
                            "node": name, "stage": stage, "started": ids,
                            "instances": ids.iter().map(|i| json!({"id": i, "name": format!("{stage}#{i}")})).collect::<Vec<_>>(),
                        }),
                    )
                }
                Err(e) => fail(e),
            }
        }
        (Some("stop"), _, Some(id)) => match control.stop(node, id) {
            Ok((stage, d)) => {
                log::info!(target: "admin", "{who}: stopped {stage}#{id} on {name}: {} queued request(s) answered \"shutting down\", {} signal(s) dropped", d.requests, d.signals);
                (
                    200,
                    json!({
                        "node": name, "id": id, "name": format!("{stage}#{id}"), "stopped": true,
                        "drained": {"requests": d.requests, "signals": d.signals},
                    }),
                )
            }
            Err(e) => fail(e),
        },
        (Some("reload"), _, Some(id)) => match control.reload(node, id) {
            Ok(stage) => {
                log::info!(target: "admin", "{who}: reloaded {stage}#{id} on {name}");
                (
                    200,
                    json!({"node": name, "id": id, "name": format!("{stage}#{id}"), "reloaded": true}),
                )
            }
            Err(e) => fail(e),
        },
        _ => (
            400,
            json!({"node": name, "error": format!("not an admin operation: {req} (start with stage, stop or reload with id)")}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_bodies() {
        assert_eq!(start_body(b""), Ok((None, 1)));
        assert_eq!(start_body(b" {} "), Ok((None, 1)));
        assert_eq!(
            start_body(br#"{"node": "127.0.0.1:7000", "count": 3}"#),
            Ok((Some("127.0.0.1:7000".into()), 3))
        );
        for (bad, says) in [
            (&b"{nope"[..], "not JSON"),
            (b"[1]", "must be a JSON object"),
            (b"{\"count\": 0}", "from 1 to 64"),
            (b"{\"count\": \"2\"}", "from 1 to 64"),
            (b"{\"node\": 5}", "node name"),
            (b"{\"nodes\": \"x\"}", "unknown key \"nodes\""),
        ] {
            let e = start_body(bad).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
