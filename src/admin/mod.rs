//! The admin API (`#admin`, docs/admin.md): REST over `net::http` on a thread of its own,
//! reading the node's shared state (router queues, cluster membership) and never entering a
//! Lua state. `auth` checks every request; every request is logged with who sent it.
//! Uses `host::node`, never `lua/`.

pub mod auth;
mod deploy;
mod events;
pub mod instances;
mod packages;

use crate::config::AdminConfig;
use crate::host::node::NodeShared;
use crate::net::http::{self as nhttp, Body, Handler, HandlerFuture, Request, ServerThread};
use http::{HeaderValue, Method, Response, StatusCode};
use serde_json::{json, Value as Json};
use std::rc::Rc;
use std::sync::Arc;

/// Starts the admin API of `node` as `#admin` says (`None` without `#admin`). No token on a
/// non-loopback address is an error: the API would be open to the network.
/// `check` compiles a deployed script (`host` hands in its Lua).
pub fn spawn(node: &Arc<NodeShared>, check: deploy::SyntaxCheck) -> anyhow::Result<Option<ServerThread>> {
    let Some(raw) = node.config.raw.get("#admin") else {
        return Ok(None);
    };
    let cfg = crate::config::parse_admin(raw).map_err(|e| anyhow::anyhow!("conf/stage.json: {e}"))?;
    let addr =
        crate::net::sock::parse_addr(&cfg.listen).map_err(|e| anyhow::anyhow!("#admin.listen: {e}"))?;
    if cfg.token.is_none() && !addr.ip().is_loopback() {
        anyhow::bail!(
            "#admin: no token configured, so the admin API refuses to listen on {addr} (not loopback); \
             set #admin.token (e.g. \"env:STAGE_ADMIN_TOKEN\") or listen on 127.0.0.1"
        );
    }
    if cfg.token.is_none() {
        log::warn!("admin API on {addr} without a token: anyone on this host may use it (set #admin.token)");
    }
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("#admin: cannot listen on {addr}: {e}"))?;
    let node_for_cluster = node.clone();
    let node = node.clone();
    let limits = nhttp::Limits {
        // A bundle for `PUT /packages` may be as large as `#admin.packages`.
        max_body: cfg.max_package.max(1 << 20),
        ..nhttp::Limits::default()
    };
    let t = nhttp::spawn_thread_with("admin", listener, limits, move || {
        let api = Rc::new(Api {
            node,
            cfg,
            check,
            pkg: Default::default(),
            client: Default::default(),
        });
        let a = api.clone();
        let handler: Handler = Rc::new(move |req: Request| -> HandlerFuture {
            let api = a.clone();
            Box::pin(async move { Ok(api.handle(req).await) })
        });
        let events: nhttp::Takeover =
            Rc::new(move |tcp, peer| Box::pin(events::serve(api.clone(), tcp, peer)));
        (handler, Some(("/events".to_string(), events)))
    })?;
    log::info!("admin API on http://{}/", t.addr);
    if let Some(c) = &node_for_cluster.cluster {
        // The other members reach this API through it (a deploy to every node).
        c.engine.set_admin(t.addr);
    }
    Ok(Some(t))
}

struct Api {
    node: Arc<NodeShared>,
    cfg: AdminConfig,
    check: deploy::SyntaxCheck,
    /// This node's part in deploys (`packages`).
    pkg: std::cell::RefCell<packages::NodeState>,
    /// The client that reaches the other nodes' admin APIs, made on first use.
    client: std::cell::OnceCell<reqwest::Client>,
}

/// The infrastructure map (docs/admin.md), embedded: no external asset.
const PAGE: &str = include_str!("page.html");

fn json_reply(status: StatusCode, v: &Json) -> nhttp::Reply {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: &str) -> nhttp::Reply {
    json_reply(status, &json!({ "error": msg }))
}

impl Api {
    async fn handle(self: &Rc<Self>, req: Request) -> nhttp::Reply {
        let method = req.parts.method.clone();
        let path = req.parts.uri.path().to_string();
        // The page holds no data (it reads `/events` with the token), so it is public.
        if path == "/" && (method == Method::GET || method == Method::HEAD) {
            let mut r = Response::new(Body::full(PAGE));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            return r;
        }
        let who = auth::check(
            self.cfg.token.as_deref(),
            req.parts.uri.query(),
            &req.parts.headers,
        );
        let reply = match who {
            Err(denied) => {
                log::warn!(target: "admin", "{} {method} {path}: {} {denied}", req.remote, denied.status().as_u16());
                let mut r = error(denied.status(), &denied.to_string());
                if denied == auth::Denied::Missing {
                    r.headers_mut()
                        .insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                r
            }
            Ok(who) => {
                let r = match packages::route(self, &method, &path, &req, who).await {
                    Some(r) => Some(r),
                    None => self.instances_route(&method, &path, &req, who).await,
                };
                let r = match r {
                    Some(r) => r,
                    None => self.route(&method, &path, &req, who),
                };
                // Reads are logged at debug, anything else (a change) at info with who.
                if method == Method::GET || method == Method::HEAD {
                    log::debug!(target: "admin", "{} ({who}) {method} {path}: {}", req.remote, r.status().as_u16());
                } else {
                    log::info!(target: "admin", "{} ({who}) {method} {path}: {}", req.remote, r.status().as_u16());
                }
                r
            }
        };
        self.node
            .metrics
            .admin_requests
            .get_or_create(&vec![
                ("method", method.as_str().to_string()),
                ("status", reply.status().as_u16().to_string()),
            ])
            .inc();
        reply
    }

    fn route(&self, method: &Method, path: &str, req: &Request, who: &str) -> nhttp::Reply {
        let _ = (req, who);
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let get = *method == Method::GET || *method == Method::HEAD;
        match (parts.as_slice(), get) {
            (["nodes", "all"] | ["rainservers", "all"], true) => json_reply(StatusCode::OK, &self.nodes()),
            (["stages"], true) => json_reply(StatusCode::OK, &self.stages()),
            (["instances"], true) => json_reply(StatusCode::OK, &Json::Array(self.instances())),
            (["instances", id], true) => {
                match self
                    .instances()
                    .into_iter()
                    .find(|i| i["id"].as_u64().is_some_and(|n| n.to_string() == *id))
                {
                    Some(i) => json_reply(StatusCode::OK, &i),
                    None => error(
                        StatusCode::NOT_FOUND,
                        &format!("no instance {id} on this node (GET /instances lists them)"),
                    ),
                }
            }
            (
                ["nodes", "all"] | ["rainservers", "all"] | ["stages"] | ["instances"] | ["instances", _],
                false,
            ) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} {path} is not supported (GET only)"),
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                &format!("no endpoint {method} {path} (see docs/admin.md: /nodes/all, /stages, /instances, /packages)"),
            ),
        }
    }

    fn dirs(&self) -> deploy::Dirs {
        deploy::Dirs::new(&self.node.home.root)
    }

    /// The hash of `dir`'s tree as JSON (`null` when there is none).
    fn version(dir: &std::path::Path) -> Result<Json, String> {
        match deploy::hash(dir) {
            Ok(Some((hash, files))) => Ok(json!({"hash": hash, "files": files})),
            Ok(None) => Ok(Json::Null),
            Err(e) => Err(format!("cannot read {}: {e}", dir.display())),
        }
    }

    /// Every node of the cluster (this one first), as the membership knows them.
    fn nodes(&self) -> Json {
        let n = &self.node;
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        // Each node's admin API, as it advertises it (`null`: none, or not heard yet).
        let admins = n
            .cluster
            .as_ref()
            .map(|c| c.engine.admin_addrs())
            .unwrap_or_default();
        let me = |stages: Vec<(String, usize, u8)>| {
            json!({
                "node": n.node_name, "self": true, "state": "alive", "address": n.node_name,
                "admin": admins.get(&n.node_name).unwrap_or(&self.cfg.listen),
                "uptime": n.started.elapsed().as_secs(),
                "instances": stages.iter().map(|s| s.1).sum::<usize>(),
                "load": stages.iter().map(|s| s.2).max().unwrap_or(0),
                "stages": stages.iter().map(|(s, i, l)| json!({"stage": s, "instances": i, "load": l})).collect::<Vec<_>>(),
            })
        };
        let Some(c) = &n.cluster else {
            return json!({ "nodes": [me(n.router.load())] });
        };
        let started = c.engine.started_us();
        let nodes: Vec<Json> = c
            .engine
            .members()
            .into_iter()
            .enumerate()
            .map(|(i, (node, state, stages))| {
                if i == 0 {
                    return me(n.router.load());
                }
                let uptime = started.get(&node).map(|s| now_us.saturating_sub(*s) / 1_000_000);
                json!({
                    "node": node, "self": false, "state": state.name(), "address": node,
                    "admin": admins.get(&node),
                    "uptime": uptime,
                    "instances": stages.iter().map(|s| s.instances).sum::<u32>(),
                    "load": stages.iter().map(|s| s.load).max().unwrap_or(0),
                    "stages": stages.iter().map(|s| json!({"stage": s.stage, "instances": s.instances, "load": s.load})).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({ "nodes": nodes })
    }

    /// Every stage id known in the cluster with its instances per node.
    fn stages(&self) -> Json {
        let mut by: std::collections::BTreeMap<String, serde_json::Map<String, Json>> = Default::default();
        let members = match &self.node.cluster {
            Some(c) => c.engine.members(),
            None => vec![(
                self.node.node_name.clone(),
                crate::cluster::State::Alive,
                self.node
                    .router
                    .load()
                    .into_iter()
                    .map(|(stage, i, load)| crate::cluster::StageLoad {
                        stage,
                        instances: i as u32,
                        load,
                    })
                    .collect(),
            )],
        };
        for (node, state, stages) in members {
            if state == crate::cluster::State::Down {
                continue;
            }
            for s in stages {
                by.entry(s.stage)
                    .or_default()
                    .insert(node.clone(), json!({"instances": s.instances, "load": s.load}));
            }
        }
        let list: Vec<Json> = by
            .into_iter()
            .map(|(stage, nodes)| {
                let total: u64 = nodes.values().filter_map(|v| v["instances"].as_u64()).sum();
                json!({"stage": stage, "instances": total, "nodes": nodes})
            })
            .collect();
        json!({ "stages": list })
    }

    /// This node's instances with their queues.
    fn instances(&self) -> Vec<Json> {
        let lua = self.node.config.startup.len();
        let builtin = lua..lua + self.node.config.builtins.len();
        self.node
            .router
            .queues()
            .into_iter()
            .map(|q| {
                json!({
                    "id": q.instance, "name": format!("{}#{}", q.stage, q.instance), "stage": q.stage,
                    "node": self.node.node_name,
                    "kind": if builtin.contains(&q.instance) { "builtin" } else { "lua" },
                    "running": q.open, "queue": q.depth, "capacity": q.capacity, "dropped": q.dropped,
                })
            })
            .collect()
    }
}
