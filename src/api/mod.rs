//! The HTTP API (axum, on `proxy.metrics_listen` beside `/metrics` and `/health`): JSON REST over the admin
//! command table ([`routes`]), bearer tokens with roles checked per command, an OpenAPI description at
//! `/api/openapi.json`, and server-sent events of a migration's progress at `/api/migrations/{tenant}/events`.

pub mod panel;
pub mod routes;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, on, MethodFilter};
use axum::{Json, Router};
use futures_util::Stream;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::admin::code::{AdminCode, AdminError};
use crate::admin::request::Request;
use crate::config::ApiRole;
use crate::context::Shared;
use crate::metrics::HealthSource;

/// Most list entries one page may ask for.
const MAX_PAGE: usize = 1000;

pub struct Api {
    pub shared: Arc<Shared>,
    pub health: Arc<dyn HealthSource>,
}

type Ctx = State<Arc<Api>>;

/// Open HTTP connections served at once; more are closed as they come. Unauthenticated sockets (`/metrics` is
/// open) could otherwise hold file descriptors the client listener needs.
const MAX_CONNECTIONS: usize = 256;
/// A request's headers must arrive within this (a connection that sends nothing, or drips, is closed).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until the task is dropped: plain HTTP, or HTTPS with `tls` (`proxy.metrics_tls`). HTTP/1.1, one task
/// per connection, at most [`MAX_CONNECTIONS`] of them.
pub async fn serve(listener: TcpListener, api: Arc<Api>, tls: Option<tokio_rustls::TlsAcceptor>) {
    let app = router(api);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("HTTP connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(tcp, app).await,
                Some(tls) => {
                    if let Ok(Ok(stream)) =
                        tokio::time::timeout(HEADER_TIMEOUT, tls.accept(tcp)).await
                    {
                        serve_connection(stream, app).await;
                    }
                }
            }
        });
    }
}

/// One connection's requests, with a deadline on each request's headers.
async fn serve_connection<S>(io: S, app: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

pub fn router(api: Arc<Api>) -> Router {
    let mut r = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/api/openapi.json", get(openapi))
        .route("/api/migrations/{tenant}/events", get(events))
        .merge(panel::routes());
    for route in routes::routes() {
        let Ok(method) = MethodFilter::try_from(route.method.clone()) else {
            continue;
        };
        let (cmd, paged) = (route.cmd, route.paged);
        r = if route.path.contains('{') {
            r.route(
                route.path,
                on(
                    method,
                    move |s: Ctx,
                          h: HeaderMap,
                          Path(p): Path<HashMap<String, String>>,
                          Query(q): Query<HashMap<String, String>>,
                          body: Bytes| async move {
                        answer(run(&s.0, &h, cmd, paged, p, q, body).await)
                    },
                ),
            )
        } else {
            r.route(
                route.path,
                on(
                    method,
                    move |s: Ctx,
                          h: HeaderMap,
                          Query(q): Query<HashMap<String, String>>,
                          body: Bytes| async move {
                        answer(run(&s.0, &h, cmd, paged, HashMap::new(), q, body).await)
                    },
                ),
            )
        };
    }
    r.with_state(api)
}

async fn metrics(State(api): Ctx) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        api.health.scrape(),
    )
        .into_response()
}

async fn health(State(api): Ctx) -> Response {
    let (status, body) = match api.health.health() {
        Ok(b) => (StatusCode::OK, b),
        Err(b) => (StatusCode::SERVICE_UNAVAILABLE, b),
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn openapi() -> Json<Value> {
    Json(routes::openapi(|cmd| {
        crate::admin::request::role_of(cmd).as_str()
    }))
}

/// The HTTP status of an admin refusal.
fn status_of(code: AdminCode) -> StatusCode {
    use AdminCode as C;
    match code {
        C::BadJson
        | C::RequestTooLarge
        | C::UnknownCommand
        | C::MissingArgument
        | C::InvalidArgument => StatusCode::BAD_REQUEST,
        C::Unauthorized => StatusCode::FORBIDDEN,
        C::UnknownTenant | C::UnknownBackend | C::NoMigration => StatusCode::NOT_FOUND,
        C::InvalidState
        | C::PreflightFailed
        | C::VerificationFailed
        | C::CutoverFailed
        | C::DdlPartial
        | C::BackupCorrupt => StatusCode::CONFLICT,
        C::LimitReached | C::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
        C::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A refusal that is not an admin command's: no or a wrong token.
struct Denied(StatusCode, AdminError);

impl From<AdminError> for Denied {
    fn from(e: AdminError) -> Denied {
        Denied(status_of(e.code), e)
    }
}

fn answer(r: Result<Value, Denied>) -> Response {
    match r {
        Ok(result) => Json(json!({"ok": true, "result": result})).into_response(),
        Err(Denied(status, e)) => {
            let body = Json(
                json!({"ok": false, "error": {"code": e.code.as_str(), "message": e.message}}),
            );
            let mut resp = (status, body).into_response();
            if status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            resp
        }
    }
}

/// The token's name and role; compared by their SHA-256, so the time taken says nothing of how much matched.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<(String, ApiRole), Denied> {
    let unauthorized = |m: &str| {
        Denied(
            StatusCode::UNAUTHORIZED,
            AdminError::new(AdminCode::Unauthorized, m),
        )
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("Authorization: Bearer <token> is required"))?;
    let given = Sha256::digest(given.trim().as_bytes());
    let config = shared.config.load();
    config
        .api_tokens
        .iter()
        .find(|t| {
            let ours = Sha256::digest(t.resolved.expose().as_bytes());
            ours.iter()
                .zip(given.iter())
                .fold(0u8, |d, (a, b)| d | (a ^ b))
                == 0
        })
        .map(|t| (t.name.clone(), t.role))
        .ok_or_else(|| unauthorized("unknown token"))
}

/// A query value as JSON: numbers and booleans as such, the rest as text.
fn query_value(v: &str) -> Value {
    if let Ok(n) = v.parse::<i64>() {
        return Value::from(n);
    }
    match v {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(v.to_owned()),
    }
}

async fn run(
    api: &Arc<Api>,
    headers: &HeaderMap,
    cmd: &str,
    paged: Option<&str>,
    path: HashMap<String, String>,
    query: HashMap<String, String>,
    body: Bytes,
) -> Result<Value, Denied> {
    let (name, role) = authenticate(&api.shared, headers)?;
    let mut args = Map::new();
    if !body.is_empty() {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(o)) => args = o,
            _ => {
                return Err(
                    AdminError::new(AdminCode::BadJson, "the body must be a JSON object").into(),
                )
            }
        }
    }
    if paged.is_none() {
        for (k, v) in &query {
            args.insert(k.clone(), query_value(v));
        }
    }
    for (k, v) in path {
        args.insert(k, Value::String(v));
    }
    let request = Request::from_args(cmd, Value::Object(args))?;
    if role < request.role() {
        return Err(AdminError::new(
            AdminCode::Unauthorized,
            format!(
                "{} needs role {}; token {name} has role {}",
                request.command(),
                request.role().as_str(),
                role.as_str()
            ),
        )
        .into());
    }
    let result = crate::admin::cmd::execute(&api.shared, request, &format!("api:{name}")).await?;
    Ok(match paged {
        Some(field) => page(result, field, &query),
        None => result,
    })
}

/// One page of a list answer: `offset`, `limit` (100 unless given, at most 1 000) and `search` (a part of the
/// entry's tenant name); `total` is the count after the search.
fn page(mut result: Value, field: &str, query: &HashMap<String, String>) -> Value {
    let offset: usize = query
        .get("offset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .min(MAX_PAGE);
    let search = query.get("search").map(|s| s.to_lowercase());
    let Some(list) = result.get_mut(field).and_then(Value::as_array_mut) else {
        return result;
    };
    let matching: Vec<Value> = std::mem::take(list)
        .into_iter()
        .filter(|e| {
            search.as_ref().is_none_or(|s| {
                e.get("tenant")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.to_lowercase().contains(s))
            })
        })
        .collect();
    let total = matching.len();
    *list = matching.into_iter().skip(offset).take(limit).collect();
    result["total"] = json!(total);
    result["offset"] = json!(offset);
    result["limit"] = json!(limit);
    result
}

/// `GET /api/migrations/{tenant}/events`: a `progress` event with the status each second, and the
/// migration's events (state changes, failures, verifications, cutovers) as they happen.
async fn events(
    State(api): Ctx,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    authenticate(&api.shared, &headers).map_err(|d| answer(Err(d)))?;
    let status = Request::from_args("migrate.status", json!({"tenant": tenant}))
        .map_err(|e| answer(Err(e.into())))?;
    let rx = api.shared.notifier.subscribe();
    let progress = futures_util::stream::unfold(
        (
            api.clone(),
            tokio::time::interval(Duration::from_secs(1)),
            status,
        ),
        |(api, mut tick, req)| async move {
            tick.tick().await;
            let data = match crate::admin::cmd::execute(&api.shared, req.clone(), "api").await {
                Ok(v) => v,
                Err(e) => json!({"error": {"code": e.code.as_str(), "message": e.message}}),
            };
            let ev = Event::default().event("progress").data(data.to_string());
            Some((Ok(ev), (api, tick, req)))
        },
    );
    let notices = futures_util::stream::unfold((rx, tenant), |(mut rx, tenant)| async move {
        loop {
            match rx.recv().await {
                Ok(p) if p.tenant == tenant => {
                    let ev = Event::default()
                        .event(p.event)
                        .data(String::from_utf8_lossy(&p.body));
                    return Some((Ok(ev), (rx, tenant)));
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(futures_util::stream::select(progress, notices)).keep_alive(KeepAlive::default()))
}
