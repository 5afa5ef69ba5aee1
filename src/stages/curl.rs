//! The `curl` built-in stage (STAGE's `curl.so+agent`): HTTP requests answered as messages.
//! `stage.signal("agent:callback", {url = ..., header = {...}, data = "..." | {k = v},
//! timeout = ms, extra = v})` (or just the URL) makes the request on the stage's runtime (the
//! sending instance never waits) and answers the sender as message `callback` (or its `=cb`)
//! with `{url, effective_url, status, cookie = {...}, extra, data = {type, length, content,
//! charset, result, message, time}}`; `status` is 0 and `data.result` non-zero when no
//! response came (curl's codes: 28 timeout, 7 cannot connect, 6 bad host, 3 bad URL).

use super::{Builtin, Out};
use crate::router::Message;
use crate::value::Value;
use serde_json::Value as Json;
use std::time::{Duration, Instant};

/// The request timeout when neither the settings nor the request give one.
pub const TIMEOUT_MS: u64 = 10_000;

/// The state of one `curl` stage: an HTTP client and its defaults.
pub struct Curl {
    client: reqwest::Client,
    timeout: Duration,
}

fn s(x: &str) -> Value {
    Value::Str(x.as_bytes().to_vec())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Str(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Int(i) => Some(i.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn field<'v>(t: &'v [(Value, Value)], name: &str) -> Option<&'v Value> {
    t.iter()
        .find(|(k, _)| matches!(k, Value::Str(b) if b == name.as_bytes()))
        .map(|(_, v)| v)
}

/// What a request message asks for.
#[derive(Debug)]
struct Request {
    url: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    form: bool,
    timeout: Option<Duration>,
    extra: Option<Value>,
}

fn parse(values: &[Value]) -> Result<Request, String> {
    let mut r = Request {
        url: String::new(),
        headers: vec![],
        body: None,
        form: false,
        timeout: None,
        extra: None,
    };
    match values.first() {
        Some(Value::Str(u)) => r.url = String::from_utf8_lossy(u).into_owned(),
        Some(Value::Table(t)) => {
            r.url = field(t, "url")
                .and_then(text)
                .ok_or("the request has no \"url\"")?;
            if let Some(Value::Table(h)) = field(t, "header") {
                for (k, v) in h {
                    if let (Some(k), Some(v)) = (text(k), text(v)) {
                        r.headers.push((k, v));
                    }
                }
            }
            match field(t, "data") {
                Some(Value::Str(b)) => r.body = Some(b.clone()),
                Some(Value::Table(kv)) => {
                    let pairs: Vec<(String, String)> = kv
                        .iter()
                        .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                        .collect();
                    let mut ser = form_urlencoded::Serializer::new(String::new());
                    for (k, v) in &pairs {
                        ser.append_pair(k, v);
                    }
                    r.body = Some(ser.finish().into_bytes());
                    r.form = true;
                }
                _ => {}
            }
            r.timeout = match field(t, "timeout") {
                Some(Value::Int(ms)) if *ms > 0 => Some(Duration::from_millis(*ms as u64)),
                Some(Value::Float(ms)) if *ms > 0.0 => Some(Duration::from_secs_f64(ms / 1000.0)),
                _ => None,
            };
            r.extra = field(t, "extra").cloned();
        }
        _ => return Err("expected a URL or a request table".into()),
    }
    Ok(r)
}

/// curl's result code and message for a failed request.
fn failure(e: &reqwest::Error) -> (i64, String) {
    let code = if e.is_timeout() {
        28
    } else if e.is_builder() {
        3
    } else if e.is_connect() {
        7
    } else {
        56
    };
    (code, e.to_string())
}

impl Curl {
    /// STAGE's settings: `{"user-agent": ..., "timeout": ms}` (other keys are ignored).
    pub fn from_settings(stage: &str, settings: &Json) -> Result<Curl, String> {
        let bad = |what: String| format!("\"curl+{stage}\": {what}");
        let mut agent = "stage".to_string();
        let mut timeout = Duration::from_millis(TIMEOUT_MS);
        match settings {
            Json::Null => {}
            Json::Object(o) => {
                if let Some(a) = o.get("user-agent") {
                    agent = a
                        .as_str()
                        .ok_or_else(|| bad(format!("user-agent: expected a string, found {a}")))?
                        .into();
                }
                if let Some(t) = o.get("timeout") {
                    let ms = t
                        .as_u64()
                        .ok_or_else(|| bad(format!("timeout: expected milliseconds, found {t}")))?;
                    timeout = Duration::from_millis(ms);
                }
            }
            other => {
                return Err(bad(format!(
                    "expected {{\"user-agent\": ..., \"timeout\": ms}}, found {other}"
                )))
            }
        }
        let client = reqwest::Client::builder()
            .user_agent(agent)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Curl { client, timeout })
    }

    async fn fetch(client: reqwest::Client, req: Request, timeout: Duration) -> Value {
        let started = Instant::now();
        let mut builder = match &req.body {
            Some(_) => client.post(&req.url),
            None => client.get(&req.url),
        };
        for (k, v) in &req.headers {
            builder = builder.header(k, v);
        }
        if let Some(b) = req.body {
            if req.form {
                builder = builder.header("content-type", "application/x-www-form-urlencoded");
            }
            builder = builder.body(b);
        }
        let timeout = req.timeout.unwrap_or(timeout);
        let mut out = vec![(s("url"), s(&req.url))];
        let result = async {
            let resp = builder.timeout(timeout).send().await?;
            let status = resp.status().as_u16();
            let effective = resp.url().to_string();
            let cookies: Vec<String> = resp
                .headers()
                .get_all("set-cookie")
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect();
            let ctype = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, effective, cookies, ctype, body))
        }
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        let mut data = vec![];
        match result {
            Ok((status, effective, cookies, ctype, body)) => {
                out.push((s("effective_url"), s(&effective)));
                out.push((s("status"), Value::Int(status.into())));
                if !cookies.is_empty() {
                    let list = cookies
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (Value::Int(i as i64 + 1), s(c)))
                        .collect();
                    out.push((s("cookie"), Value::Table(list)));
                }
                if let Some(t) = &ctype {
                    let (mime, charset) = match t.split_once(';') {
                        Some((m, rest)) => (
                            m.trim().to_string(),
                            rest.split(';')
                                .find_map(|p| p.trim().strip_prefix("charset=").map(str::to_string)),
                        ),
                        None => (t.trim().to_string(), None),
                    };
                    data.push((s("type"), s(&mime)));
                    if let Some(c) = charset {
                        data.push((s("charset"), s(&c)));
                    }
                }
                data.push((s("length"), Value::Int(body.len() as i64)));
                data.push((s("content"), Value::Str(body.to_vec())));
                data.push((s("result"), Value::Int(0)));
                data.push((s("message"), s("No error")));
            }
            Err(e) => {
                let (code, message) = failure(&e);
                out.push((s("status"), Value::Int(0)));
                data.push((s("result"), Value::Int(code)));
                data.push((s("message"), s(&message)));
            }
        }
        data.push((s("time"), Value::Float(elapsed)));
        out.push((s("data"), Value::Table(data)));
        if let Some(x) = req.extra {
            out.push((s("extra"), x));
        }
        Value::Table(out)
    }
}

impl Builtin for Curl {
    fn handle(&mut self, msg: Message, out: &Out, _now: Instant) {
        let req = match parse(&msg.values) {
            Ok(r) => r,
            Err(why) => {
                log::warn!("{}: \"{}\": {why}", out.me.stage, msg.id);
                return;
            }
        };
        let (client, timeout, out) = (self.client.clone(), self.timeout, out.clone());
        // The request runs on this stage's runtime; the answer goes out when it is done.
        tokio::spawn(async move {
            let result = Curl::fetch(client, req, timeout).await;
            if !out.router.answer(&msg, &out.me, Ok(vec![result])) {
                log::debug!(
                    "{}: the answer to \"{}\" could not be delivered",
                    out.me.stage,
                    msg.id
                );
            }
        });
    }

    fn expire(&mut self, _out: &Out, _now: Instant) {}

    fn next_deadline(&self) -> Option<Instant> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_like_stage() {
        let r = parse(&[s("http://x/")]).unwrap();
        assert_eq!((r.url.as_str(), r.body.is_none()), ("http://x/", true));
        let t = Value::Table(vec![
            (s("url"), s("http://x/post")),
            (s("header"), Value::Table(vec![(s("X-A"), s("1"))])),
            (s("data"), Value::Table(vec![(s("a b"), s("c&d"))])),
            (s("timeout"), Value::Int(250)),
            (s("extra"), Value::Int(7)),
        ]);
        let r = parse(&[t]).unwrap();
        assert_eq!(r.headers, [("X-A".to_string(), "1".to_string())]);
        assert_eq!(r.body.as_deref(), Some(&b"a+b=c%26d"[..]));
        assert!(r.form);
        assert_eq!(r.timeout, Some(Duration::from_millis(250)));
        assert_eq!(r.extra, Some(Value::Int(7)));
        assert!(parse(&[Value::Int(1)]).is_err());
        assert!(parse(&[Value::Table(vec![])]).unwrap_err().contains("url"));
        assert!(Curl::from_settings("agent", &serde_json::json!({"timeout": "x"})).is_err());
    }
}
