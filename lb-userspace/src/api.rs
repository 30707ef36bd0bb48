//! The local admin API: HTTP/JSON on a Unix socket (mode 0600, so only root connects), and
//! the client the CLI uses. `curl --unix-socket /run/xlb/xlb.sock http://xlb/v1/services`
//! works too.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    routing::{get, post},
};
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{net::UnixStream, sync::Mutex};

use crate::{dataplane::Attachment, engine::ServiceView};

pub use crate::control::Daemon;

pub type Shared = Arc<Mutex<Daemon>>;

/// `GET /v1/services`: the table `ipvsadm -L` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServicesResponse {
    /// Capacity of the (IPv4) connection table, shown as ipvsadm's `size=`.
    pub conn_table_size: u32,
    pub services: Vec<ServiceView>,
}

/// `GET /v1/connections`: the connection table (`ipvsadm -L -c`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnectionsResponse {
    pub connections: Vec<ConnView>,
}

/// One connection or persistence template, as `ipvsadm -L -n -c` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnView {
    /// `TCP`, `UDP`, or `IP` for a template of an all-protocol service.
    pub protocol: String,
    /// Whole seconds until it expires.
    pub expire_secs: u32,
    /// IPVS's state name: `ESTABLISHED`, `SYN_RECV`, `FIN_WAIT`, ..., `UDP`; templates
    /// `NONE` (or `ASSURED`).
    pub state: String,
    pub client: std::net::SocketAddr,
    pub vip: std::net::SocketAddr,
    pub dest: std::net::SocketAddr,
}

/// `GET /v1/health`: every checked real server.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HealthResponse {
    pub servers: Vec<ServerHealthView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerHealthView {
    pub service: crate::config::ServiceKey,
    pub addr: std::net::IpAddr,
    pub port: u16,
    #[serde(flatten)]
    pub state: crate::health::state::ServerState,
}

/// `POST /v1/changes`: administrative changes, applied together.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangesRequest {
    pub changes: Vec<crate::change::Change>,
    /// `false` (ipvsadm's commands, the API): any failing change rejects them all.
    /// `true` (`ipvsadm -R`): a change failing with an IPVS error (e.g. "Service already
    /// exists") is reported and skipped, as ipvsadm's restore goes on; the rest is still
    /// validated as a whole and applied in one switch.
    #[serde(default)]
    pub skip_failed: bool,
}

/// The answer to [`ChangesRequest`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChangesResponse {
    /// One entry per change, in order: `None` = made, `Some(e)` = refused.
    pub results: Vec<Option<crate::change::ChangeError>>,
    /// Whether anything was applied.
    pub applied: bool,
    /// Why nothing was applied (validation of the result, or the data plane refused it).
    pub error: Option<String>,
}

/// `GET /v1/counters`: every verdict/event counter of the data plane.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CountersResponse {
    pub counters: Vec<(String, u64)>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusResponse {
    pub version: String,
    pub attached: Vec<AttachmentView>,
    pub maps: Vec<MapMemory>,
    /// The configuration file the daemon runs from.
    #[serde(default)]
    pub config: String,
    /// Applied configurations since start-up.
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub last_reload: Option<crate::control::ReloadResult>,
    /// Connections in the tables.
    #[serde(default)]
    pub connections: u64,
    /// VRRP instances.
    #[serde(default)]
    pub vrrp: Vec<crate::vrrp::run::InstanceStatus>,
    /// Connection sync, if configured.
    #[serde(default)]
    pub conn_sync: Option<crate::vrrp::syncd::SyncStatus>,
}

/// `POST /v1/handover`: the daemon saves its state, leaves the data plane running and exits,
/// for a successor started with `xlb run --takeover`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HandoverResponse {
    pub generation: u64,
}

/// `POST /v1/reload`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadResponse {
    pub generation: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachmentView {
    pub interface: String,
    pub ifindex: u32,
    pub mode: String,
}

impl From<Attachment> for AttachmentView {
    fn from(a: Attachment) -> Self {
        AttachmentView {
            interface: a.interface,
            ifindex: a.ifindex,
            mode: a.mode.to_string(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapMemory {
    pub name: String,
    pub bytes: u64,
    pub max_entries: u32,
}

type ApiError = (StatusCode, String);

fn internal(e: anyhow::Error) -> ApiError {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

async fn services(State(s): State<Shared>) -> Result<Json<ServicesResponse>, ApiError> {
    let d = s.lock().await;
    Ok(Json(ServicesResponse {
        conn_table_size: d.dp.limits.conn_table_size,
        services: d.view().map_err(internal)?,
    }))
}

async fn connections(State(s): State<Shared>) -> Json<ConnectionsResponse> {
    let d = s.lock().await;
    Json(ConnectionsResponse {
        connections: d.connections(),
    })
}

async fn health(State(s): State<Shared>) -> Json<HealthResponse> {
    let d = s.lock().await;
    let mut servers: Vec<ServerHealthView> = d
        .health
        .servers()
        .filter(|(_, st)| !st.checks.is_empty())
        .map(|(k, st)| ServerHealthView {
            service: k.0,
            addr: k.1,
            port: k.2,
            state: st.clone(),
        })
        .collect();
    servers.sort_by_key(|a| (a.service, a.addr, a.port));
    Json(HealthResponse { servers })
}

async fn timeouts(State(s): State<Shared>) -> Json<crate::config::Timeouts> {
    Json(s.lock().await.engine.timeouts())
}

async fn changes(
    State(s): State<Shared>,
    req: Result<Json<ChangesRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ChangesResponse>, ApiError> {
    let Json(req) = req.map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("bad request: {}", e.body_text()),
        )
    })?;
    let mut d = s.lock().await;
    Ok(Json(d.apply_changes(&req)))
}

async fn reload(State(s): State<Shared>) -> Result<Json<ReloadResponse>, ApiError> {
    let mut d = s.lock().await;
    d.reload()
        .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")))?;
    Ok(Json(ReloadResponse {
        generation: d.generation,
    }))
}

async fn handover(State(s): State<Shared>) -> Result<Json<HandoverResponse>, ApiError> {
    let mut d = s.lock().await;
    if d.state_path.is_none() {
        return Err((
            StatusCode::CONFLICT,
            "this daemon's maps are not pinned: a successor could not adopt them".into(),
        ));
    }
    d.save_state().map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("saving the state for the successor: {e:#}"),
        )
    })?;
    // Under the same lock as the save: nothing changes in between.
    d.handing_over = true;
    d.handover.notify_one();
    Ok(Json(HandoverResponse {
        generation: d.generation,
    }))
}

async fn counters(State(s): State<Shared>) -> Result<Json<CountersResponse>, ApiError> {
    let d = s.lock().await;
    let values = d.dp.reasons().map_err(internal)?;
    Ok(Json(CountersResponse {
        counters: lb_common::reason::NAMES
            .iter()
            .zip(values)
            .map(|(n, v)| (n.to_string(), v))
            .collect(),
    }))
}

async fn status(State(s): State<Shared>) -> Json<StatusResponse> {
    let d = s.lock().await;
    Json(StatusResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        attached: d.dp.attachments().into_iter().map(Into::into).collect(),
        maps: d
            .dp
            .memory()
            .into_iter()
            .map(|(n, b, m)| MapMemory {
                name: n.to_string(),
                bytes: b,
                max_entries: m,
            })
            .collect(),
        config: d.source.path().display().to_string(),
        generation: d.generation,
        last_reload: d.last_reload.clone(),
        connections: d.dp.flows_in_table().unwrap_or(0),
        vrrp: d.vrrp.as_ref().map(|v| v.get()).unwrap_or_default(),
        conn_sync: d.conn_sync.as_ref().map(|s| s.status()),
    })
}

/// `GET /v1/vrrp`: the VRRP instances.
async fn vrrp(State(s): State<Shared>) -> Json<Vec<crate::vrrp::run::InstanceStatus>> {
    let d = s.lock().await;
    Json(d.vrrp.as_ref().map(|v| v.get()).unwrap_or_default())
}

/// Binds the socket (refusing to steal one a live daemon answers on) and serves the API.
pub async fn serve(path: &Path, state: Shared) -> Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another xlb daemon is serving {} (use a different [control] socket per instance)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let app = Router::new()
        .route("/v1/services", get(services))
        .route("/v1/connections", get(connections))
        .route("/v1/timeouts", get(timeouts))
        .route("/v1/health", get(health))
        .route("/v1/changes", post(changes))
        .route("/v1/reload", post(reload))
        .route("/v1/handover", post(handover))
        .route("/v1/counters", get(counters))
        .route("/v1/status", get(status))
        .route("/v1/vrrp", get(vrrp))
        .with_state(state);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("admin API stopped: {e}");
        }
    }))
}

/// Sends one request to the daemon on `socket` and decodes its JSON answer; a non-2xx
/// answer is an error carrying the daemon's message (after the status if `with_status`).
async fn call<T: DeserializeOwned>(
    socket: &Path,
    req: hyper::Request<http_body_util::Full<Bytes>>,
    with_status: bool,
) -> Result<T> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the xlb daemon at {} (is `xlb run` running? --socket / XLB_SOCKET select another instance)",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        if with_status {
            bail!("{}: {}", status, String::from_utf8_lossy(&body));
        }
        bail!("{}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).context("decoding the daemon's answer")
}

/// Client side: `GET path` on the daemon's socket, decoded from JSON.
pub async fn get_json<T: DeserializeOwned>(socket: &Path, path: &str) -> Result<T> {
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "xlb")
        .body(http_body_util::Full::new(Bytes::new()))?;
    call(socket, req, true).await
}

/// Client side: `POST path` with a JSON body on the daemon's socket; a non-2xx answer is an
/// error carrying the daemon's message.
pub async fn post_json<B: Serialize, T: DeserializeOwned>(
    socket: &Path,
    path: &str,
    body: &B,
) -> Result<T> {
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, "xlb")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::from(serde_json::to_vec(
            body,
        )?)))?;
    call(socket, req, false).await
}

/// The socket to use: `--socket`, else `XLB_SOCKET`, else the default.
pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("XLB_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_SOCKET))
}
