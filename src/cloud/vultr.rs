//! The Vultr API v2 client: bearer auth, JSON bodies, cursor pagination, typed errors that
//! carry the HTTP status and Vultr's message, bounded retries with backoff on 429 and 5xx,
//! request timeouts, and the readiness predicate with a polling `wait`.
//!
//! The API key lives only in [`ApiKey`], whose `Debug` hides it; it is sent in the
//! `Authorization` header and never formatted into a log line or an error.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use std::future::Future;
use std::time::{Duration, Instant};

/// The real API; tests and demos point the client at the emulator instead.
pub const DEFAULT_ENDPOINT: &str = "https://api.vultr.com/v2";

/// A Vultr API key. `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into())
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// Where the client talks to and how patiently.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Base URL including the version prefix, e.g. `https://api.vultr.com/v2`.
    pub endpoint: String,
    pub api_key: Option<ApiKey>,
    /// Per-request timeout (connect + response).
    pub timeout: Duration,
    /// Retries after the first attempt on 429, 5xx and (for idempotent requests) transport errors.
    pub retries: u32,
    /// The first retry waits this long; each next one twice as long, up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// `per_page` for list requests (Vultr's default is 100, its maximum 500).
    pub per_page: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            endpoint: DEFAULT_ENDPOINT.into(),
            api_key: None,
            timeout: Duration::from_secs(30),
            retries: 4,
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(8),
            per_page: 100,
        }
    }
}

impl Settings {
    /// Settings from `%vultr` of stage.json (already `env:`-resolved), then the environment
    /// (`VULTR_API_KEY`, `VULTR_ENDPOINT`), then the defaults. Unknown keys are errors.
    pub fn from_config(section: Option<&Json>) -> Result<Settings, VultrError> {
        let mut s = Settings::default();
        if let Ok(k) = std::env::var("VULTR_API_KEY") {
            if !k.is_empty() {
                s.api_key = Some(ApiKey(k));
            }
        }
        if let Ok(e) = std::env::var("VULTR_ENDPOINT") {
            if !e.is_empty() {
                s.endpoint = e;
            }
        }
        let Some(section) = section else { return Ok(s) };
        let Some(obj) = section.as_object() else {
            return Err(VultrError::Config("%vultr: expected an object".into()));
        };
        let ms = |k: &str, v: &Json| {
            v.as_u64().map(Duration::from_millis).ok_or_else(|| {
                VultrError::Config(format!(
                    "%vultr.{k}: expected milliseconds (a non-negative integer)"
                ))
            })
        };
        for (k, v) in obj {
            match k.as_str() {
                "api_key" => match v.as_str() {
                    Some(key) if !key.is_empty() => s.api_key = Some(ApiKey(key.into())),
                    _ => {
                        return Err(VultrError::Config(
                            "%vultr.api_key: expected a non-empty string".into(),
                        ))
                    }
                },
                "endpoint" => match v.as_str() {
                    Some(e) if e.starts_with("http://") || e.starts_with("https://") => s.endpoint = e.into(),
                    _ => {
                        return Err(VultrError::Config(
                            "%vultr.endpoint: expected an http:// or https:// URL".into(),
                        ))
                    }
                },
                "timeout" => s.timeout = ms(k, v)?,
                "retries" => {
                    s.retries = v.as_u64().filter(|n| *n <= 10).ok_or_else(|| {
                        VultrError::Config("%vultr.retries: expected an integer from 0 to 10".into())
                    })? as u32
                }
                other => {
                    return Err(VultrError::Config(format!(
                        "%vultr.{other}: unknown key (expected api_key, endpoint, timeout or retries)"
                    )))
                }
            }
        }
        Ok(s)
    }
}

/// Everything that can go wrong talking to Vultr. No variant ever holds the API key.
#[derive(Debug, thiserror::Error)]
pub enum VultrError {
    /// Vultr answered with an error status; `message` is Vultr's `error` text.
    #[error("vultr {method} {path}: http {status}: {message}")]
    Api {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    /// No answer: connection refused, timeout, TLS failure.
    #[error("vultr {method} {path}: {reason}")]
    Transport {
        method: String,
        path: String,
        reason: String,
    },
    /// An answer that is not the JSON shape the API documents.
    #[error("vultr {method} {path}: unexpected response: {reason}")]
    Decode {
        method: String,
        path: String,
        reason: String,
    },
    #[error("no vultr api key: set VULTR_API_KEY or %vultr.api_key in conf/stage.json")]
    NoKey,
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Invalid(String),
    /// `wait` gave up; `last` describes the last state seen.
    #[error("instance {id} not ready after {waited_ms} ms (timeout {timeout_ms} ms); last seen {last}")]
    WaitTimeout {
        id: String,
        waited_ms: u64,
        timeout_ms: u64,
        last: String,
    },
}

impl VultrError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            VultrError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A server instance, with the field names and types of the API.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Instance {
    pub id: String,
    pub os: String,
    pub ram: i64,
    pub disk: i64,
    pub main_ip: String,
    pub vcpu_count: i64,
    pub region: String,
    pub plan: String,
    pub date_created: String,
    pub status: String,
    pub allowed_bandwidth: i64,
    pub netmask_v4: String,
    pub gateway_v4: String,
    pub power_status: String,
    pub server_status: String,
    pub v6_network: String,
    pub v6_main_ip: String,
    pub v6_network_size: i64,
    pub label: String,
    pub internal_ip: String,
    pub kvm: String,
    pub hostname: String,
    pub os_id: i64,
    pub app_id: i64,
    pub image_id: String,
    pub snapshot_id: String,
    pub firewall_group_id: String,
    pub features: Vec<String>,
    pub tags: Vec<String>,
    pub user_scheme: String,
    pub vpc_only: bool,
    /// Only in the answers to create and get; empty otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub default_password: String,
}

impl Instance {
    /// Truly ready: the API reports `active` while the box is still stopped and locked, so
    /// all four facts are required.
    pub fn is_ready(&self) -> bool {
        self.status == "active"
            && self.power_status == "running"
            && self.server_status == "ok"
            && !self.main_ip.is_empty()
            && self.main_ip != "0.0.0.0"
    }

    /// The four facts `wait` watches, as one line (`active/stopped/locked 203.0.113.5`).
    pub fn state_line(&self) -> String {
        format!(
            "{}/{}/{} {}",
            self.status, self.power_status, self.server_status, self.main_ip
        )
    }

    /// One word for people and for `vultr.status`: `running` only when ready.
    pub fn word(&self) -> &'static str {
        if self.is_ready() {
            return "running";
        }
        match self.status.as_str() {
            "pending" => "pending",
            "suspended" => "suspended",
            "resizing" => "resizing",
            _ if self.power_status == "stopped" && self.server_status == "ok" => "stopped",
            _ => "starting",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Region {
    pub id: String,
    pub city: String,
    pub country: String,
    pub continent: String,
    pub options: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Plan {
    pub id: String,
    pub vcpu_count: i64,
    pub ram: i64,
    pub disk: i64,
    pub disk_count: i64,
    pub bandwidth: i64,
    pub monthly_cost: f64,
    #[serde(rename = "type")]
    pub kind: String,
    pub locations: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Os {
    pub id: i64,
    pub name: String,
    pub arch: String,
    pub family: String,
}

/// A reserved (floating) IP: `subnet` is the address, `instance_id` is empty when detached.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReservedIp {
    pub id: String,
    pub region: String,
    /// `v4` or `v6`.
    pub ip_type: String,
    pub subnet: String,
    pub subnet_size: i64,
    pub label: String,
    pub instance_id: String,
}

/// Regions, plans and operating systems: what `create` chooses from (VultrMaker's listall).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Catalog {
    pub regions: Vec<Region>,
    pub plans: Vec<Plan>,
    pub os: Vec<Os>,
}

/// `POST /instances`. `region`, `plan` and an image source (`os_id` or one in `extra`)
/// are required by the API; `extra` carries any other documented field as is.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CreateRequest {
    pub region: String,
    pub plan: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Base64 as the API wants it; [`CreateRequest::set_user_data`] encodes plain text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

impl CreateRequest {
    pub fn set_user_data(&mut self, plain: &[u8]) {
        self.user_data = Some(super::base64_encode(plain));
    }
}

/// Filters of `GET /instances`.
#[derive(Clone, Debug, Default)]
pub struct InstanceFilter {
    pub tag: Option<String>,
    pub label: Option<String>,
    pub main_ip: Option<String>,
    pub region: Option<String>,
}

/// How `wait` polls.
#[derive(Clone, Debug)]
pub struct WaitOptions {
    pub timeout: Duration,
    pub interval: Duration,
}

impl Default for WaitOptions {
    fn default() -> Self {
        WaitOptions {
            timeout: Duration::from_secs(600),
            interval: Duration::from_secs(5),
        }
    }
}

/// The client. Cheap to clone (the connection pool is shared).
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    settings: Settings,
}

/// Removes `null` members of objects (at any depth) so that typed decoding takes defaults.
fn strip_nulls(v: &mut Json) {
    match v {
        Json::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Json::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

impl Client {
    pub fn new(settings: Settings) -> Result<Client, VultrError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("stage/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| VultrError::Config(format!("cannot build the http client: {e}")))?;
        Ok(Client { http, settings })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// One API call with retries. `path` is relative to the endpoint (`/instances`);
    /// returns the decoded body, or `Json::Null` for 204.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Json>,
        auth: bool,
    ) -> Result<Json, VultrError> {
        let key = match (&self.settings.api_key, auth) {
            (Some(k), _) => Some(k),
            (None, true) => return Err(VultrError::NoKey),
            (None, false) => None,
        };
        let url = format!("{}{}", self.settings.endpoint.trim_end_matches('/'), path);
        let idempotent = method != reqwest::Method::POST;
        let mut attempt = 0u32;
        loop {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("Accept", "application/json")
                .query(query);
            if let Some(k) = key {
                req = req.bearer_auth(&k.0);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let retry_after;
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.text().await.unwrap_or_default();
                    log::debug!(target: "vultr", "{method} {path} -> {status}");
                    if (200..300).contains(&status) {
                        if text.trim().is_empty() {
                            return Ok(Json::Null);
                        }
                        let mut v: Json = serde_json::from_str(&text).map_err(|e| VultrError::Decode {
                            method: method.to_string(),
                            path: path.into(),
                            reason: format!("invalid JSON ({e})"),
                        })?;
                        strip_nulls(&mut v);
                        return Ok(v);
                    }
                    let retryable = status == 429 || status >= 500;
                    if !retryable || attempt >= self.settings.retries {
                        return Err(VultrError::Api {
                            method: method.to_string(),
                            path: path.into(),
                            status,
                            message: error_message(status, &text),
                        });
                    }
                    log::info!(target: "vultr", "{method} {path}: http {status}, retrying ({} of {})", attempt + 1, self.settings.retries);
                }
                Err(e) => {
                    let reason = if e.is_timeout() {
                        format!("timed out after {} ms", self.settings.timeout.as_millis())
                    } else {
                        transport_reason(&e)
                    };
                    if !idempotent || attempt >= self.settings.retries {
                        return Err(VultrError::Transport {
                            method: method.to_string(),
                            path: path.into(),
                            reason,
                        });
                    }
                    log::info!(target: "vultr", "{method} {path}: {reason}, retrying ({} of {})", attempt + 1, self.settings.retries);
                    retry_after = None;
                }
            }
            let backoff = self
                .settings
                .backoff
                .saturating_mul(1 << attempt.min(16))
                .min(self.settings.backoff_max);
            let wait = retry_after.map_or(backoff, |r| r.min(self.settings.backoff_max).max(backoff));
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    async fn get_json(&self, path: &str, query: &[(&str, String)], auth: bool) -> Result<Json, VultrError> {
        self.request(reqwest::Method::GET, path, query, None, auth).await
    }

    /// Every page of a list endpoint: follows `meta.links.next` until it is empty.
    pub async fn list_all<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        key: &str,
        query: &[(&str, String)],
        auth: bool,
    ) -> Result<Vec<T>, VultrError> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        for _page in 0..10_000 {
            let mut q: Vec<(&str, String)> = query.to_vec();
            q.push(("per_page", self.settings.per_page.to_string()));
            if !cursor.is_empty() {
                q.push(("cursor", cursor.clone()));
            }
            let mut body = self.get_json(path, &q, auth).await?;
            let decode = |reason: String| VultrError::Decode {
                method: "GET".into(),
                path: path.into(),
                reason,
            };
            let items = body
                .get_mut(key)
                .map(Json::take)
                .ok_or_else(|| decode(format!("no \"{key}\" array")))?;
            let items: Vec<T> = serde_json::from_value(items).map_err(|e| decode(e.to_string()))?;
            out.extend(items);
            cursor = body
                .pointer("/meta/links/next")
                .and_then(Json::as_str)
                .unwrap_or("")
                .to_string();
            if cursor.is_empty() {
                return Ok(out);
            }
        }
        Err(VultrError::Decode {
            method: "GET".into(),
            path: path.into(),
            reason: "more than 10000 pages".into(),
        })
    }

    fn one<T: serde::de::DeserializeOwned>(
        method: &str,
        path: &str,
        mut body: Json,
        key: &str,
    ) -> Result<T, VultrError> {
        let decode = |reason: String| VultrError::Decode {
            method: method.into(),
            path: path.into(),
            reason,
        };
        let v = body
            .get_mut(key)
            .map(Json::take)
            .ok_or_else(|| decode(format!("no \"{key}\" object")))?;
        serde_json::from_value(v).map_err(|e| decode(e.to_string()))
    }

    pub async fn regions(&self) -> Result<Vec<Region>, VultrError> {
        self.list_all("/regions", "regions", &[], false).await
    }

    /// Plans, optionally of one `type` (`vc2`, `vhf`, `vhp`, `vdc`, `voc`, ..., `all`).
    pub async fn plans(&self, kind: Option<&str>) -> Result<Vec<Plan>, VultrError> {
        let q: Vec<(&str, String)> = kind.map(|k| ("type", k.to_string())).into_iter().collect();
        self.list_all("/plans", "plans", &q, false).await
    }

    pub async fn os(&self) -> Result<Vec<Os>, VultrError> {
        self.list_all("/os", "os", &[], false).await
    }

    /// Regions, plans and operating systems, fetched concurrently.
    pub async fn catalog(&self) -> Result<Catalog, VultrError> {
        let (regions, plans, os) = tokio::join!(self.regions(), self.plans(None), self.os());
        Ok(Catalog {
            regions: regions?,
            plans: plans?,
            os: os?,
        })
    }

    /// Every instance of the account (all pages), filtered.
    pub async fn instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, VultrError> {
        let mut q = Vec::new();
        for (k, v) in [
            ("tag", &filter.tag),
            ("label", &filter.label),
            ("main_ip", &filter.main_ip),
            ("region", &filter.region),
        ] {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        }
        self.list_all("/instances", "instances", &q, true).await
    }

    fn instance_path(id: &str) -> Result<String, VultrError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(VultrError::Invalid(format!(
                "invalid instance id {id:?} (expected letters, digits and dashes)"
            )));
        }
        Ok(format!("/instances/{id}"))
    }

    pub async fn get(&self, id: &str) -> Result<Instance, VultrError> {
        let path = Self::instance_path(id)?;
        let body = self.get_json(&path, &[], true).await?;
        Self::one("GET", &path, body, "instance")
    }

    /// `POST /instances` (answered 202 with the pending instance).
    pub async fn create(&self, req: &CreateRequest) -> Result<Instance, VultrError> {
        if req.region.is_empty() || req.plan.is_empty() {
            return Err(VultrError::Invalid("create needs a region and a plan".into()));
        }
        let body = serde_json::to_value(req).map_err(|e| VultrError::Invalid(e.to_string()))?;
        let resp = self
            .request(reqwest::Method::POST, "/instances", &[], Some(&body), true)
            .await?;
        Self::one("POST", "/instances", resp, "instance")
    }

    /// `DELETE /instances/{id}`. A locked instance's 500 is retried like any 5xx.
    pub async fn delete(&self, id: &str) -> Result<(), VultrError> {
        let path = Self::instance_path(id)?;
        self.request(reqwest::Method::DELETE, &path, &[], None, true)
            .await?;
        Ok(())
    }

    /// `start`, `halt` or `reboot` one instance.
    pub async fn action(&self, id: &str, action: &str) -> Result<(), VultrError> {
        if !matches!(action, "start" | "halt" | "reboot") {
            return Err(VultrError::Invalid(format!(
                "unknown instance action {action:?} (expected start, halt or reboot)"
            )));
        }
        let path = format!("{}/{action}", Self::instance_path(id)?);
        self.request(reqwest::Method::POST, &path, &[], None, true)
            .await?;
        Ok(())
    }

    /// `GET /instances/{id}/user-data`: the user data the instance was created with, decoded
    /// from base64 (empty when there was none).
    pub async fn user_data(&self, id: &str) -> Result<Vec<u8>, VultrError> {
        let path = format!("{}/user-data", Self::instance_path(id)?);
        let body = self.get_json(&path, &[], true).await?;
        let data = body
            .pointer("/user_data/data")
            .and_then(Json::as_str)
            .unwrap_or("");
        super::base64_decode(data).ok_or_else(|| VultrError::Decode {
            method: "GET".into(),
            path,
            reason: "user_data.data is not base64".into(),
        })
    }

    fn reserved_ip_path(id: &str) -> Result<String, VultrError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(VultrError::Invalid(format!(
                "invalid reserved IP id {id:?} (expected letters, digits and dashes)"
            )));
        }
        Ok(format!("/reserved-ips/{id}"))
    }

    /// Every reserved IP of the account (all pages).
    pub async fn reserved_ips(&self) -> Result<Vec<ReservedIp>, VultrError> {
        self.list_all("/reserved-ips", "reserved_ips", &[], true).await
    }

    pub async fn reserved_ip(&self, id: &str) -> Result<ReservedIp, VultrError> {
        let path = Self::reserved_ip_path(id)?;
        let body = self.get_json(&path, &[], true).await?;
        Self::one("GET", &path, body, "reserved_ip")
    }

    /// `POST /reserved-ips` (201): reserves an address of `ip_type` (`v4` or `v6`) in `region`.
    pub async fn reserved_ip_create(
        &self,
        region: &str,
        ip_type: &str,
        label: Option<&str>,
    ) -> Result<ReservedIp, VultrError> {
        if region.is_empty() {
            return Err(VultrError::Invalid("reserved_ip_create needs a region".into()));
        }
        if ip_type != "v4" && ip_type != "v6" {
            return Err(VultrError::Invalid(format!(
                "reserved_ip_create: ip_type must be \"v4\" or \"v6\", got {ip_type:?}"
            )));
        }
        let mut body = serde_json::json!({"region": region, "ip_type": ip_type});
        if let Some(l) = label {
            body["label"] = l.into();
        }
        let resp = self
            .request(reqwest::Method::POST, "/reserved-ips", &[], Some(&body), true)
            .await?;
        Self::one("POST", "/reserved-ips", resp, "reserved_ip")
    }

    /// `PATCH /reserved-ips/{id}` (202): changes the label.
    pub async fn reserved_ip_label(&self, id: &str, label: &str) -> Result<ReservedIp, VultrError> {
        let path = Self::reserved_ip_path(id)?;
        let body = serde_json::json!({ "label": label });
        let resp = self
            .request(reqwest::Method::PATCH, &path, &[], Some(&body), true)
            .await?;
        Self::one("PATCH", &path, resp, "reserved_ip")
    }

    /// `POST /reserved-ips/{id}/attach` (204) to `instance_id` (same region, one at a time).
    pub async fn reserved_ip_attach(&self, id: &str, instance_id: &str) -> Result<(), VultrError> {
        let path = format!("{}/attach", Self::reserved_ip_path(id)?);
        Self::instance_path(instance_id)?;
        let body = serde_json::json!({ "instance_id": instance_id });
        self.request(reqwest::Method::POST, &path, &[], Some(&body), true)
            .await?;
        Ok(())
    }

    /// `POST /reserved-ips/{id}/detach` (204).
    pub async fn reserved_ip_detach(&self, id: &str) -> Result<(), VultrError> {
        let path = format!("{}/detach", Self::reserved_ip_path(id)?);
        self.request(reqwest::Method::POST, &path, &[], None, true)
            .await?;
        Ok(())
    }

    /// `DELETE /reserved-ips/{id}` (204): releases the address for good.
    pub async fn reserved_ip_delete(&self, id: &str) -> Result<(), VultrError> {
        let path = Self::reserved_ip_path(id)?;
        self.request(reqwest::Method::DELETE, &path, &[], None, true)
            .await?;
        Ok(())
    }

    /// Moves reserved IP `id` to `instance_id`: detaches it from wherever it is (if anywhere
    /// else), then attaches it. Idempotent: an IP already on `instance_id` is left alone.
    pub async fn reserved_ip_move(&self, id: &str, instance_id: &str) -> Result<ReservedIp, VultrError> {
        let r = self.reserved_ip(id).await?;
        if r.instance_id == instance_id {
            return Ok(r);
        }
        if !r.instance_id.is_empty() {
            self.reserved_ip_detach(id).await?;
        }
        self.reserved_ip_attach(id, instance_id).await?;
        self.reserved_ip(id).await
    }

    /// Polls `get(id)` every `interval` until [`Instance::is_ready`], calling `on_change`
    /// with the first state and every state whose four facts differ from the previous one.
    /// Never returns early on `active` alone. Errors of `get` (after its retries) end the wait.
    pub async fn wait<F, Fut>(
        &self,
        id: &str,
        opts: &WaitOptions,
        mut on_change: F,
    ) -> Result<Instance, VultrError>
    where
        F: FnMut(Instance) -> Fut,
        Fut: Future<Output = ()>,
    {
        let start = Instant::now();
        let mut last: Option<String> = None;
        loop {
            let inst = self.get(id).await?;
            let line = inst.state_line();
            if last.as_deref() != Some(line.as_str()) {
                last = Some(line);
                on_change(inst.clone()).await;
            }
            if inst.is_ready() {
                return Ok(inst);
            }
            let waited = start.elapsed();
            if waited + opts.interval > opts.timeout {
                return Err(VultrError::WaitTimeout {
                    id: id.into(),
                    waited_ms: waited.as_millis() as u64,
                    timeout_ms: opts.timeout.as_millis() as u64,
                    last: last.unwrap_or_default(),
                });
            }
            tokio::time::sleep(opts.interval).await;
        }
    }
}

/// Vultr's `error` text from an error body, or the body itself, or the status reason.
fn error_message(status: u16, body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Json>(body) {
        if let Some(m) = v.get("error").and_then(Json::as_str) {
            return m.to_string();
        }
    }
    let body = body.trim();
    if !body.is_empty() {
        return body.chars().take(200).collect();
    }
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error")
        .to_lowercase()
}

/// The chain of causes of a transport error, without the URL's query (no secrets live
/// there, but cursors are long and unhelpful).
fn transport_reason(e: &reqwest::Error) -> String {
    let mut msg = if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(status: &str, power: &str, server: &str, ip: &str) -> Instance {
        Instance {
            status: status.into(),
            power_status: power.into(),
            server_status: server.into(),
            main_ip: ip.into(),
            ..Default::default()
        }
    }

    #[test]
    fn readiness_needs_all_four_facts() {
        assert!(inst("active", "running", "ok", "203.0.113.5").is_ready());
        assert!(!inst("active", "stopped", "locked", "203.0.113.5").is_ready());
        assert!(!inst("active", "running", "installingbooting", "203.0.113.5").is_ready());
        assert!(!inst("active", "running", "ok", "0.0.0.0").is_ready());
        assert!(!inst("pending", "running", "none", "0.0.0.0").is_ready());
        assert_eq!(inst("pending", "running", "none", "0.0.0.0").word(), "pending");
        assert_eq!(inst("active", "stopped", "locked", "1.2.3.4").word(), "starting");
        assert_eq!(inst("active", "stopped", "ok", "1.2.3.4").word(), "stopped");
        assert_eq!(inst("active", "running", "ok", "1.2.3.4").word(), "running");
    }

    #[test]
    fn error_messages_come_from_the_body() {
        assert_eq!(
            error_message(401, r#"{"error":"Invalid API token.","status":401}"#),
            "Invalid API token."
        );
        assert_eq!(error_message(502, ""), "bad gateway");
        assert_eq!(error_message(500, "oops"), "oops");
    }

    #[test]
    fn nulls_are_defaults() {
        let mut v: Json = serde_json::json!({"id": "x", "tags": null, "label": null, "os_id": 1});
        strip_nulls(&mut v);
        let i: Instance = serde_json::from_value(v).unwrap();
        assert_eq!(i.tags, Vec::<String>::new());
        assert_eq!(i.os_id, 1);
    }

    #[test]
    fn the_key_never_shows() {
        let s = Settings {
            api_key: Some(ApiKey::new("SECRETKEY")),
            ..Default::default()
        };
        assert!(!format!("{s:?}").contains("SECRETKEY"));
        let c = Client::new(s).unwrap();
        assert!(!format!("{c:?}").contains("SECRETKEY"));
    }

    #[test]
    fn config_section_is_checked() {
        let e = Settings::from_config(Some(&serde_json::json!({"api_kye": "x"}))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "%vultr.api_kye: unknown key (expected api_key, endpoint, timeout or retries)"
        );
        let e = Settings::from_config(Some(&serde_json::json!({"endpoint": "ftp://x"}))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "%vultr.endpoint: expected an http:// or https:// URL"
        );
        let s = Settings::from_config(Some(
            &serde_json::json!({"endpoint": "http://127.0.0.1:1/v2", "timeout": 1500}),
        ))
        .unwrap();
        assert_eq!(s.endpoint, "http://127.0.0.1:1/v2");
        assert_eq!(s.timeout, Duration::from_millis(1500));
    }
}
