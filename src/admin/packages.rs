//! Package deploy across the cluster (`PUT /packages`, `GET /packages`,
//! `POST /packages/rollback`; docs/admin.md). The node a request reaches coordinates: it
//! checks the bundle itself, then runs two phases over every member's admin API (the
//! addresses members advertise in their cluster state pushes), with the same token:
//!
//! 1. `prepare` — every node checks the bundle again and writes it beside `package/`
//!    (`package.next/`); nothing that runs changes. One failure (a refusal, a node that
//!    cannot be reached, another deploy in progress) → `cancel` on every node, nothing
//!    changed anywhere.
//! 2. `commit` — node by node: swap in, hot reload every instance's scripts now and wait for
//!    the outcome (`host::reload`). A node whose scripts fail to load swaps back itself and
//!    says why; the coordinator then `cancel`s every node (those that committed swap back,
//!    the others discard what they staged), so every node ends on the version it had.
//!
//! A rollback runs the same phases (prepare checks that every node has a previous version,
//! commit swaps it in). The node-level phases are the same endpoints with `?phase=…&deploy=ID`.

use super::deploy::{self, Refused};
use super::{error, json_reply, Api};
use crate::net::http::{self as nhttp, Request};
use http::{Method, StatusCode};
use serde_json::{json, Value as Json};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long every instance has to reload its scripts in a commit.
const RELOAD_LIMIT: Duration = Duration::from_secs(10);
/// A staged deploy older than this no longer blocks another one (its coordinator is gone).
const STALE: Duration = Duration::from_secs(60);
/// The time a node has for one phase over HTTP (a prepare carries the bundle).
const PHASE_TIMEOUT: Duration = Duration::from_secs(30);

/// A deploy or a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Deploy,
    Rollback,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Deploy => "deploy",
            Kind::Rollback => "rollback",
        }
    }
    fn method(self) -> Method {
        match self {
            Kind::Deploy => Method::PUT,
            Kind::Rollback => Method::POST,
        }
    }
    fn path(self) -> &'static str {
        match self {
            Kind::Deploy => "/packages",
            Kind::Rollback => "/packages/rollback",
        }
    }
}

/// This node's part in deploys: what is staged, what was committed last, whether this
/// node coordinates one now.
#[derive(Default)]
pub(super) struct NodeState {
    staged: Option<(String, Kind, Instant)>,
    committed: Option<(String, Kind)>,
    coordinating: bool,
}

/// A failure of one node in a phase: its status and its sentence.
struct Failed {
    node: String,
    status: StatusCode,
    error: String,
}

/// One member to deploy to.
#[derive(Clone)]
struct Target {
    node: String,
    /// `None` for this node (its phases are called directly).
    admin: Option<String>,
}

fn query(req: &Request, name: &str) -> Option<String> {
    let q = req.parts.uri.query()?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Routes the `/packages` endpoints; `None` for any other path.
pub(super) async fn route(
    api: &Rc<Api>,
    method: &Method,
    path: &str,
    req: &Request,
    who: &str,
) -> Option<nhttp::Reply> {
    let path = path.trim_end_matches('/');
    let kind = match path {
        "/packages" => Kind::Deploy,
        "/packages/rollback" => Kind::Rollback,
        _ => return None,
    };
    let get = *method == Method::GET || *method == Method::HEAD;
    Some(match (kind, get) {
        (Kind::Deploy, true) => match query(req, "scope").as_deref() {
            Some("node") => api.versions_reply(),
            None => cluster_versions(api).await,
            Some(other) => error(
                StatusCode::BAD_REQUEST,
                &format!("scope={other} is unknown: GET /packages?scope=node shows this node only"),
            ),
        },
        (kind, false) if *method == kind.method() => match query(req, "phase") {
            None => coordinate(api, kind, req, who).await,
            Some(phase) => match query(req, "deploy") {
                Some(id) if !id.is_empty() && id.len() <= 64 => node_phase(api, kind, &phase, &id, req, who).await,
                _ => error(
                    StatusCode::BAD_REQUEST,
                    "a phase needs the deploy's id: ?phase=prepare&deploy=ID (the coordinating node sends these)",
                ),
            },
        },
        (Kind::Deploy, _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} {path} is not supported (GET or PUT)"),
        ),
        (Kind::Rollback, _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} {path} is not supported (POST only)"),
        ),
    })
}

impl Api {
    /// This node's running and previous versions.
    pub(super) fn versions(&self) -> Result<Json, String> {
        let d = self.dirs();
        let running = Self::version(&d.live)?;
        let previous = Self::version(&d.prev)?;
        Ok(json!({"node": self.node.node_name, "running": running, "previous": previous}))
    }

    fn versions_reply(&self) -> nhttp::Reply {
        match self.versions() {
            Ok(v) => json_reply(StatusCode::OK, &v),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        }
    }

    /// Moves the hot-reload generation, asks every instance to reload now and waits: `Err`
    /// names the scripts that failed.
    async fn reload_now(&self) -> Result<usize, String> {
        self.node
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let seq = self.node.reloads.ask();
        let o = self.node.reloads.wait(seq, RELOAD_LIMIT).await;
        if o.ok() {
            Ok(o.answered)
        } else {
            Err(o.describe())
        }
    }
}

fn refused_reply(r: &Refused) -> nhttp::Reply {
    error(r.status(), &r.to_string())
}

fn hash_of(v: &Json, which: &str) -> String {
    v[which]["hash"].as_str().unwrap_or("-").to_string()
}

/// One node-level phase, as the coordinator (this node or another) asks for it.
async fn node_phase(
    api: &Rc<Api>,
    kind: Kind,
    phase: &str,
    id: &str,
    req: &Request,
    who: &str,
) -> nhttp::Reply {
    let from = format!("{} ({who})", req.remote);
    match phase {
        "prepare" => match prepare(api, kind, id, &req.body) {
            Ok(v) => json_reply(StatusCode::OK, &v),
            Err(r) => {
                log::warn!(target: "admin", "{from} {} {id} prepare refused: {r}", kind.name());
                refused_reply(&r)
            }
        },
        "commit" => match commit(api, kind, id).await {
            Ok(v) => {
                log::info!(target: "admin", "{from} {} {id}: package/ is now {} (previous {})",
                    kind.name(), hash_of(&v, "running"), hash_of(&v, "previous"));
                json_reply(StatusCode::OK, &v)
            }
            Err((status, e)) => {
                log::warn!(target: "admin", "{from} {} {id} commit failed: {e}", kind.name());
                error(status, &e)
            }
        },
        "cancel" => match cancel(api, id).await {
            Ok(v) => json_reply(StatusCode::OK, &v),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        },
        "finish" => {
            finish(api, id);
            json_reply(
                StatusCode::OK,
                &json!({"node": api.node.node_name, "finished": id}),
            )
        }
        other => error(
            StatusCode::BAD_REQUEST,
            &format!("phase={other} is unknown (prepare, commit, cancel, finish)"),
        ),
    }
}

/// Phase 1 on this node: checks and stages the bundle (a deploy) or checks that there is a
/// version to go back to (a rollback). Takes this node's deploy slot.
fn prepare(api: &Api, kind: Kind, id: &str, body: &[u8]) -> Result<Json, Refused> {
    {
        let st = api.pkg.borrow();
        if let Some((other, k, at)) = &st.staged {
            if other != id && at.elapsed() < STALE {
                return Err(Refused::Conflict(format!(
                    "another {} ({other}) is in progress on this node; try again when it ends",
                    k.name()
                )));
            }
        }
    }
    let d = api.dirs();
    let staged = match kind {
        Kind::Deploy => {
            let entries = deploy::unpack(body, api.cfg.max_package, api.check)?;
            deploy::stage(&d, &entries)?;
            match deploy::staged(&d) {
                Ok(Some((hash, files))) => json!({"hash": hash, "files": files}),
                Ok(None) => Json::Null,
                Err(e) => return Err(Refused::Io(format!("cannot read {}: {e}", d.next.display()))),
            }
        }
        Kind::Rollback => {
            if !d.prev.is_dir() {
                return Err(Refused::Conflict(format!(
                    "no previous version to roll back to ({} does not exist; it is kept by PUT /packages)",
                    d.prev.display()
                )));
            }
            Api::version(&d.prev).map_err(Refused::Io)?
        }
    };
    api.pkg.borrow_mut().staged = Some((id.to_string(), kind, Instant::now()));
    let mut v = api.versions().map_err(Refused::Io)?;
    v["staged"] = staged;
    Ok(v)
}

/// Phase 2 on this node: swaps the new version in, reloads every instance's scripts and
/// waits for them. A script that fails to load → swapped back here, and `Err` says why.
async fn commit(api: &Api, kind: Kind, id: &str) -> Result<Json, (StatusCode, String)> {
    let staged = api.pkg.borrow_mut().staged.take();
    let at = match staged {
        Some((s, k, at)) if s == id && k == kind => at,
        other => {
            api.pkg.borrow_mut().staged = other;
            return Err((
                StatusCode::CONFLICT,
                format!("{} {id} is not prepared on this node", kind.name()),
            ));
        }
    };
    // The loader takes a changed file once it has been quiet a while (loader::QUIET).
    let settle = crate::host::loader::QUIET + Duration::from_millis(30);
    if let Some(wait) = settle.checked_sub(at.elapsed()) {
        tokio::time::sleep(wait).await;
    }
    let d = api.dirs();
    let io = |r: Refused| (r.status(), r.to_string());
    match kind {
        Kind::Deploy => deploy::swap_in(&d).map_err(io)?,
        Kind::Rollback => deploy::rollback(&d).map_err(io)?,
    }
    api.pkg.borrow_mut().committed = Some((id.to_string(), kind));
    if let Err(why) = api.reload_now().await {
        let back = undo(api, kind).await;
        api.pkg.borrow_mut().committed = None;
        let now = api
            .versions()
            .map(|v| hash_of(&v, "running"))
            .unwrap_or_else(|e| e);
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the new version failed to load: {why}; {}",
                match back {
                    Ok(()) => format!("this node swapped back and runs {now} again"),
                    Err(e) => format!("swapping back failed too: {e}"),
                }
            ),
        ));
    }
    api.versions().map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e))
}

/// Swaps back what `commit` swapped in, and reloads.
async fn undo(api: &Api, kind: Kind) -> Result<(), String> {
    let d = api.dirs();
    match kind {
        Kind::Deploy => deploy::undo_swap(&d),
        Kind::Rollback => deploy::rollback(&d),
    }
    .map_err(|r| r.to_string())?;
    if let Err(e) = api.reload_now().await {
        log::warn!(target: "admin", "after swapping back, scripts still fail to load: {e}");
    }
    Ok(())
}

/// Cancels deploy `id` on this node: a commit is swapped back, a staged tree discarded.
async fn cancel(api: &Api, id: &str) -> Result<Json, String> {
    let committed = api.pkg.borrow().committed.clone();
    let done = if let Some((c, kind)) = committed.filter(|(c, _)| c == id) {
        api.pkg.borrow_mut().committed = None;
        undo(api, kind).await?;
        log::info!(target: "admin", "{} {c} undone: package/ is back on {}", kind.name(),
            api.versions().map(|v| hash_of(&v, "running")).unwrap_or_default());
        "undone"
    } else {
        let staged = api.pkg.borrow().staged.clone();
        match staged {
            Some((s, kind, _)) if s == id => {
                api.pkg.borrow_mut().staged = None;
                if kind == Kind::Deploy {
                    deploy::discard(&api.dirs()).map_err(|r| r.to_string())?;
                }
                "discarded"
            }
            _ => "nothing to cancel",
        }
    };
    let mut v = api.versions()?;
    v["cancel"] = json!(done);
    Ok(v)
}

/// Ends deploy `id` on this node: the version before the previous one goes.
fn finish(api: &Api, id: &str) {
    let mut st = api.pkg.borrow_mut();
    if st.committed.as_ref().is_some_and(|(c, _)| c == id) {
        st.committed = None;
        deploy::finish(&api.dirs());
    }
}

/// The members to deploy to (this node first) and those skipped as down; `Err` names a
/// member that cannot take part.
fn targets(api: &Api) -> Result<(Vec<Target>, Vec<String>), Failed> {
    let me = Target {
        node: api.node.node_name.clone(),
        admin: None,
    };
    let Some(c) = &api.node.cluster else {
        return Ok((vec![me], vec![]));
    };
    let admins = c.engine.admin_addrs();
    let mut out = vec![me];
    let mut skipped = vec![];
    for (node, state, _) in c.engine.members().into_iter().skip(1) {
        if state == crate::cluster::State::Down {
            skipped.push(node);
            continue;
        }
        match admins.get(&node) {
            Some(a) => out.push(Target {
                node,
                admin: Some(a.clone()),
            }),
            None => {
                return Err(Failed {
                    error: format!(
                        "node {node} advertises no admin API (no #admin in its conf/stage.json, or its \
                         state push has not arrived yet): every live node must take the deploy; nothing was changed"
                    ),
                    node,
                    status: StatusCode::SERVICE_UNAVAILABLE,
                })
            }
        }
    }
    Ok((out, skipped))
}

impl Api {
    fn client(&self) -> Result<reqwest::Client, String> {
        if let Some(c) = self.client.get() {
            return Ok(c.clone());
        }
        let c = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(PHASE_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        Ok(self.client.get_or_init(|| c).clone())
    }
}

/// Calls `method url` on another node's admin API with this node's token; the answer's
/// JSON, or the node's failure.
async fn call(
    client: reqwest::Client,
    token: Option<String>,
    node: String,
    method: Method,
    url: String,
    body: bytes::Bytes,
) -> Result<Json, Failed> {
    let fail = |status: StatusCode, error: String| Failed {
        node: node.clone(),
        status,
        error,
    };
    // A read shows what answered within a few seconds; a phase may take longer.
    let limit = if method == Method::GET {
        Duration::from_secs(5)
    } else {
        PHASE_TIMEOUT
    };
    let mut rq = client.request(method, &url).timeout(limit);
    if let Some(t) = token {
        rq = rq.bearer_auth(t);
    }
    if !body.is_empty() {
        rq = rq.body(body);
    }
    let resp = rq.send().await.map_err(|e| {
        fail(
            StatusCode::BAD_GATEWAY,
            format!("cannot reach its admin API at {url}: {e}"),
        )
    })?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let v: Json = serde_json::from_str(&text).unwrap_or_else(|_| json!({"error": text.trim()}));
    if status.is_success() {
        return Ok(v);
    }
    let said = v["error"].as_str().unwrap_or("").to_string();
    let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    Err(match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => fail(
            StatusCode::BAD_GATEWAY,
            format!(
                "its admin API refused this node's token ({status}: {said}): every node of a cluster must have the same #admin.token"
            ),
        ),
        _ => fail(status, said),
    })
}

/// Runs one phase on remote `targets` at once; the answers in order.
async fn phase_all(
    api: &Api,
    targets: &[Target],
    kind: Kind,
    phase: &str,
    id: &str,
    body: &bytes::Bytes,
) -> Vec<(Target, Result<Json, Failed>)> {
    let client = match api.client() {
        Ok(c) => c,
        Err(e) => {
            return targets
                .iter()
                .map(|t| {
                    let f = Failed {
                        node: t.node.clone(),
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        error: e.clone(),
                    };
                    (t.clone(), Err(f))
                })
                .collect()
        }
    };
    let handles: Vec<_> = targets
        .iter()
        .map(|t| {
            let url = format!(
                "http://{}{}?phase={phase}&deploy={id}",
                t.admin.as_deref().unwrap_or(""),
                kind.path()
            );
            let body = if phase == "prepare" {
                body.clone()
            } else {
                bytes::Bytes::new()
            };
            (
                t.clone(),
                tokio::task::spawn_local(call(
                    client.clone(),
                    api.cfg.token.clone(),
                    t.node.clone(),
                    kind.method(),
                    url,
                    body,
                )),
            )
        })
        .collect();
    let mut out = vec![];
    for (t, h) in handles {
        let r = h.await.unwrap_or_else(|e| {
            Err(Failed {
                node: t.node.clone(),
                status: StatusCode::INTERNAL_SERVER_ERROR,
                error: format!("the call failed: {e}"),
            })
        });
        out.push((t, r));
    }
    out
}

/// Cancels deploy `id` on every target (this node included); what each said.
async fn cancel_all(api: &Api, targets: &[Target], kind: Kind, id: &str) -> Vec<String> {
    let mut notes = vec![];
    if let Err(e) = cancel(api, id).await {
        notes.push(format!("{}: {e}", api.node.node_name));
    }
    let remote: Vec<Target> = targets.iter().filter(|t| t.admin.is_some()).cloned().collect();
    for (t, r) in phase_all(api, &remote, kind, "cancel", id, &bytes::Bytes::new()).await {
        if let Err(f) = r {
            notes.push(format!("{}: cancel failed: {}", t.node, f.error));
        }
    }
    notes
}

/// `PUT /packages` or `POST /packages/rollback` without a phase: the whole cluster.
async fn coordinate(api: &Rc<Api>, kind: Kind, req: &Request, who: &str) -> nhttp::Reply {
    let from = format!("{} ({who})", req.remote);
    if api.pkg.borrow().coordinating {
        return error(
            StatusCode::CONFLICT,
            "another deploy or rollback sent to this node is in progress; try again when it ends",
        );
    }
    api.pkg.borrow_mut().coordinating = true;
    struct Done<'a>(&'a Api);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.pkg.borrow_mut().coordinating = false;
        }
    }
    let _done = Done(api);
    let id = format!("{:016x}", crate::cluster::engine::random_u64());
    let refuse = |f: Failed, extra: &str| {
        log::warn!(target: "admin", "{from} {} refused: node {}: {}{extra}", kind.name(), f.node, f.error);
        json_reply(
            f.status,
            &json!({"error": format!("node {}: {}{extra}", f.node, f.error), "node": f.node, "deploy": id}),
        )
    };
    let (targets, skipped) = match targets(api) {
        Ok(t) => t,
        Err(f) => return refuse(f, ""),
    };
    // Phase 1: this node first (it checks the bundle before any other node sees it).
    let me = match prepare(api, kind, &id, &req.body) {
        Ok(v) => v,
        Err(r) => {
            log::warn!(target: "admin", "{from} {} refused: {r}", kind.name());
            return refused_reply(&r);
        }
    };
    let remote: Vec<Target> = targets.iter().filter(|t| t.admin.is_some()).cloned().collect();
    let body = req.body.clone();
    let mut prepared = vec![(api.node.node_name.clone(), me)];
    let mut failed = None;
    for (t, r) in phase_all(api, &remote, kind, "prepare", &id, &body).await {
        match r {
            Ok(v) => prepared.push((t.node, v)),
            Err(f) => {
                failed.get_or_insert(f);
            }
        }
    }
    if let Some(f) = failed {
        let notes = cancel_all(api, &targets, kind, &id).await;
        let extra = format!(
            "; the {} was cancelled on every node, nothing changed{}",
            kind.name(),
            if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join("; "))
            }
        );
        return refuse(f, &extra);
    }
    // A rollback goes to one version everywhere: every node must have the same previous one.
    if kind == Kind::Rollback {
        let prevs: std::collections::BTreeSet<String> =
            prepared.iter().map(|(_, v)| hash_of(v, "previous")).collect();
        if prevs.len() > 1 {
            let list: Vec<String> = prepared
                .iter()
                .map(|(n, v)| format!("{n} {}", hash_of(v, "previous")))
                .collect();
            cancel_all(api, &targets, kind, &id).await;
            return refuse(
                Failed {
                    node: api.node.node_name.clone(),
                    status: StatusCode::CONFLICT,
                    error: format!(
                        "the nodes' previous versions differ ({}): a rollback would leave them on different versions; deploy one bundle with PUT /packages instead",
                        list.join(", ")
                    ),
                },
                "; nothing changed",
            );
        }
    }
    // Phase 2: node by node; the first failure cancels the deploy everywhere.
    let client = match api.client() {
        Ok(c) => c,
        Err(e) => {
            cancel_all(api, &targets, kind, &id).await;
            return error(StatusCode::INTERNAL_SERVER_ERROR, &e);
        }
    };
    let mut answers = vec![];
    for t in &targets {
        let r = match &t.admin {
            None => commit(api, kind, &id).await.map_err(|(status, error)| Failed {
                node: t.node.clone(),
                status,
                error,
            }),
            Some(a) => {
                call(
                    client.clone(),
                    api.cfg.token.clone(),
                    t.node.clone(),
                    kind.method(),
                    format!("http://{a}{}?phase=commit&deploy={id}", kind.path()),
                    bytes::Bytes::new(),
                )
                .await
            }
        };
        match r {
            Ok(v) => answers.push(v),
            Err(f) => {
                let notes = cancel_all(api, &targets, kind, &id).await;
                let committed: Vec<&str> = answers.iter().filter_map(|v| v["node"].as_str()).collect();
                let extra = format!(
                    "; the {} was rolled back on every node ({}), every node runs the version it had{}",
                    kind.name(),
                    if committed.is_empty() {
                        "none had committed".to_string()
                    } else {
                        format!("undone on {}", committed.join(", "))
                    },
                    if notes.is_empty() {
                        String::new()
                    } else {
                        format!(" (but: {})", notes.join("; "))
                    }
                );
                return refuse(f, &extra);
            }
        }
    }
    let remote: Vec<Target> = targets.iter().filter(|t| t.admin.is_some()).cloned().collect();
    finish(api, &id);
    let _ = phase_all(api, &remote, kind, "finish", &id, &bytes::Bytes::new()).await;
    let me = answers.first().cloned().unwrap_or(Json::Null);
    log::info!(target: "admin", "{from} {}: package/ is now {} (previous {}) on {} node(s)",
        kind.name(), hash_of(&me, "running"), hash_of(&me, "previous"), answers.len());
    json_reply(
        StatusCode::OK,
        &json!({
            "deploy": id,
            "node": me["node"], "running": me["running"], "previous": me["previous"],
            "nodes": answers, "skipped": skipped,
        }),
    )
}

/// `GET /packages`: every node's versions (those down left out), differences marked.
async fn cluster_versions(api: &Rc<Api>) -> nhttp::Reply {
    let mut me = match api.versions() {
        Ok(v) => v,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let mut nodes = vec![];
    let mut remote = vec![];
    if let Some(c) = &api.node.cluster {
        let admins = c.engine.admin_addrs();
        for (node, state, _) in c.engine.members().into_iter().skip(1) {
            let entry = json!({"node": node, "state": state.name(), "admin": admins.get(&node)});
            match admins.get(&node) {
                Some(a) if state != crate::cluster::State::Down => remote.push((entry, a.clone())),
                _ => nodes.push(entry),
            }
        }
    }
    me["state"] = json!("alive");
    me["admin"] = json!(api
        .node
        .cluster
        .as_ref()
        .and_then(|c| c.engine.admin_addrs().remove(&api.node.node_name)));
    let client = api.client();
    let handles: Vec<_> = remote
        .into_iter()
        .map(|(entry, a)| {
            let node = entry["node"].as_str().unwrap_or("").to_string();
            let call = client.clone().map(|c| {
                tokio::task::spawn_local(call(
                    c,
                    api.cfg.token.clone(),
                    node,
                    Method::GET,
                    format!("http://{a}/packages?scope=node"),
                    bytes::Bytes::new(),
                ))
            });
            (entry, call)
        })
        .collect();
    let mut all = vec![me.clone()];
    for (mut entry, h) in handles {
        let r = match h {
            Ok(h) => h.await.unwrap_or_else(|e| {
                Err(Failed {
                    node: String::new(),
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    error: e.to_string(),
                })
            }),
            Err(e) => Err(Failed {
                node: String::new(),
                status: StatusCode::INTERNAL_SERVER_ERROR,
                error: e,
            }),
        };
        match r {
            Ok(v) => {
                entry["running"] = v["running"].clone();
                entry["previous"] = v["previous"].clone();
            }
            Err(f) => entry["error"] = json!(f.error),
        }
        all.push(entry);
    }
    all.extend(nodes);
    // The version most nodes run; the others are marked.
    let mut count: std::collections::BTreeMap<String, usize> = Default::default();
    for n in &all {
        if n.get("running").is_some() {
            *count.entry(hash_of(n, "running")).or_default() += 1;
        }
    }
    let common = count
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(h, _)| h.clone())
        .unwrap_or_default();
    for n in all.iter_mut() {
        let differs = n.get("running").is_some() && hash_of(n, "running") != common;
        n["differs"] = json!(differs);
    }
    let same = count.len() <= 1 && all.iter().all(|n| n.get("error").is_none());
    json_reply(
        StatusCode::OK,
        &json!({
            "node": me["node"], "running": me["running"], "previous": me["previous"],
            "same": same, "nodes": all,
        }),
    )
}
