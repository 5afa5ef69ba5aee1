//! `GET /events`: the infrastructure map's WebSocket. After the same authentication as the
//! REST endpoints (a browser, which cannot set headers on a WebSocket, sends the token as
//! the subprotocol `bearer.TOKEN` beside `stage-admin`), it pushes a JSON snapshot every
//! second: nodes, this node's instances, the metrics' totals and their sums per instance;
//! the page computes rates.

use super::{auth, Api};
use futures_util::SinkExt;
use http::HeaderValue;
use serde_json::json;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// The subprotocol the page asks for.
const PROTOCOL: &str = "stage-admin";
/// Between two snapshots.
const EVERY: Duration = Duration::from_secs(1);

pub(super) async fn serve(api: Rc<Api>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
    let token = api.cfg.token.clone();
    let mut refused = None;
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let mut headers = req.headers().clone();
        let protocols: Vec<String> = headers
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
            .collect();
        if let Some(t) = protocols.iter().find_map(|p| p.strip_prefix("bearer.")) {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}")) {
                headers.insert(http::header::AUTHORIZATION, v);
            }
        }
        if let Err(d) = auth::check(token.as_deref(), req.uri().query(), &headers) {
            refused = Some(d.clone());
            let mut r = ErrorResponse::new(Some(format!("{d}\n")));
            *r.status_mut() = d.status();
            return Err(r);
        }
        if protocols.iter().any(|p| p == PROTOCOL) {
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static(PROTOCOL));
        }
        Ok(resp)
    };
    let mut ws = match tokio_tungstenite::accept_hdr_async(tcp, check).await {
        Ok(ws) => ws,
        Err(e) => {
            match refused {
                Some(d) => log::warn!(target: "admin", "{peer} GET /events: {} {d}", d.status().as_u16()),
                None => log::warn!(target: "admin", "{peer} GET /events: websocket handshake failed: {e}"),
            }
            return;
        }
    };
    log::debug!(target: "admin", "{peer}: /events opened");
    let mut stop = api.node.shutdown.subscribe();
    loop {
        let (totals, per_instance) = api.node.metrics.summary();
        let snap = json!({
            "time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            "node": api.node.node_name,
            "nodes": api.nodes()["nodes"],
            "instances": api.instances(),
            "totals": totals,
            "per_instance": per_instance,
        });
        if ws.send(Message::text(snap.to_string())).await.is_err() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = ws.close(None).await;
}
