//! The HTTP API's routes: one table mapping method and path to a command of the admin command table. The router
//! and the OpenAPI description are both made from it, so they cannot disagree.

use axum::http::Method;
use serde_json::{json, Map, Value};

/// One route.
pub struct ApiRoute {
    pub method: Method,
    /// axum path syntax (`{tenant}`); path parameters become the command's arguments of the same name.
    pub path: &'static str,
    pub cmd: &'static str,
    pub summary: &'static str,
    /// A list answer the API pages (`?offset=&limit=&search=`): the field holding the list.
    pub paged: Option<&'static str>,
}

const fn get(path: &'static str, cmd: &'static str, summary: &'static str) -> ApiRoute {
    ApiRoute {
        method: Method::GET,
        path,
        cmd,
        summary,
        paged: None,
    }
}

const fn post(path: &'static str, cmd: &'static str, summary: &'static str) -> ApiRoute {
    ApiRoute {
        method: Method::POST,
        path,
        cmd,
        summary,
        paged: None,
    }
}

/// Every route of `/api`.
pub fn routes() -> Vec<ApiRoute> {
    let mut all = tenant_routes();
    all.extend(proxy_routes());
    all.extend(migration_routes());
    all.extend(move_routes());
    all
}

/// Tenants, backends, sessions, the proxy as a whole.
fn tenant_routes() -> Vec<ApiRoute> {
    vec![
        ApiRoute {
            paged: Some("tenants"),
            ..get(
                "/api/tenants",
                "tenants",
                "Routes, gates and sessions per tenant (paged, searchable)",
            )
        },
        get(
            "/api/tenants/{tenant}",
            "tenant.get",
            "One tenant's route, gate and sessions",
        ),
        ApiRoute {
            method: Method::PUT,
            ..post(
                "/api/tenants/{tenant}",
                "tenant.set",
                "Add or change a tenant's route",
            )
        },
        ApiRoute {
            method: Method::DELETE,
            ..post(
                "/api/tenants/{tenant}",
                "tenant.remove",
                "Remove a tenant's route",
            )
        },
        post(
            "/api/tenants/{tenant}/grants",
            "tenant.grants",
            "The tenant role's SQL (apply: run it)",
        ),
        post(
            "/api/tenants/{tenant}/pause",
            "pause",
            "Hold the tenant's new transactions",
        ),
        post(
            "/api/tenants/{tenant}/resume",
            "resume",
            "Release a paused tenant",
        ),
        post(
            "/api/tenants/{tenant}/kill",
            "tenant.kill",
            "End the tenant's client sessions",
        ),
        post(
            "/api/tenants/{tenant}/backup",
            "tenant.backup",
            "Back the tenant up",
        ),
        get(
            "/api/tenants/{tenant}/backups",
            "tenant.backups",
            "The tenant's backups",
        ),
    ]
}

/// The proxy as a whole: global pause, backends, sessions, stats, reload, audit, webhooks.
fn proxy_routes() -> Vec<ApiRoute> {
    vec![
        post("/api/restore", "tenant.restore", "Restore a backup"),
        post(
            "/api/pause",
            "pause.all",
            "Hold every tenant's new transactions",
        ),
        post("/api/resume", "resume.all", "Open every tenant's gate"),
        get("/api/backends", "backends", "Backends, pools and health"),
        get(
            "/api/instances",
            "instances",
            "Proxy instances sharing the control plane",
        ),
        ApiRoute {
            paged: Some("clients"),
            ..get("/api/clients", "clients", "Client sessions (paged)")
        },
        get("/api/stats", "stats", "Counters and per-tenant rates"),
        post("/api/reload", "reload", "Re-read the config file"),
        get("/api/audit", "audit", "The audit log's last entries (tail)"),
        get(
            "/api/webhooks/log",
            "webhooks.log",
            "The last webhook deliveries",
        ),
    ]
}

/// Migrations, their queue, history and source drops.
fn migration_routes() -> Vec<ApiRoute> {
    vec![
        get(
            "/api/migrations",
            "migrate.status",
            "Every migration's status",
        ),
        post(
            "/api/migrations",
            "migrate.start",
            "Start (or with at, queue) a move",
        ),
        post(
            "/api/estimate",
            "migrate.estimate",
            "Size and duration of a move; nothing installed",
        ),
        get(
            "/api/migrations/{tenant}",
            "migrate.status",
            "One migration's status",
        ),
    ]
}

/// One move's commands.
fn move_routes() -> Vec<ApiRoute> {
    vec![
        post(
            "/api/migrations/{tenant}/verify",
            "migrate.verify",
            "Compare both sides now",
        ),
        post(
            "/api/migrations/{tenant}/cutover",
            "migrate.cutover",
            "Switch the tenant to the target",
        ),
        post(
            "/api/migrations/{tenant}/rollback",
            "migrate.rollback",
            "Move a migrated tenant back",
        ),
        post(
            "/api/migrations/{tenant}/abort",
            "migrate.abort",
            "Stop a move before cutover",
        ),
        post(
            "/api/migrations/{tenant}/finalize",
            "migrate.finalize",
            "End a migrated move",
        ),
        post(
            "/api/migrations/{tenant}/pause",
            "migrate.pause",
            "Hold copy and tee work",
        ),
        post(
            "/api/migrations/{tenant}/resume",
            "migrate.resume",
            "Continue, or retry a failed move",
        ),
        post(
            "/api/migrations/{tenant}/repair",
            "migrate.repair",
            "Re-copy mismatching ranges",
        ),
        post(
            "/api/migrations/{tenant}/ddl",
            "migrate.ddl",
            "A schema change on both sides",
        ),
        post(
            "/api/migrations/{tenant}/cancel",
            "migrate.cancel",
            "Drop a queued move",
        ),
        post(
            "/api/migrations/{tenant}/cancel-drop",
            "migrate.cancel_drop",
            "Keep a source copy",
        ),
        get("/api/queue", "migrate.queue", "Queued moves"),
        get(
            "/api/drops",
            "migrate.drops",
            "Source copies waiting for their drop",
        ),
        get(
            "/api/history",
            "migrate.history",
            "Finished moves and a summary",
        ),
    ]
}

/// The OpenAPI 3 description of [`routes`], the event stream and the role each route needs.
pub fn openapi(roles: impl Fn(&str) -> &'static str) -> Value {
    let mut paths = Map::new();
    for r in routes() {
        let params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "operationId": r.cmd,
            "summary": r.summary,
            "description": format!("Runs the admin command `{}`; needs role `{}`.", r.cmd, roles(r.cmd)),
            "x-pgtenant-role": roles(r.cmd),
            "parameters": params,
            "responses": {
                "200": {"description": "the command's result", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ok"}}}},
                "400": {"$ref": "#/components/responses/Error"},
                "401": {"$ref": "#/components/responses/Error"},
                "403": {"$ref": "#/components/responses/Error"},
                "404": {"$ref": "#/components/responses/Error"},
                "409": {"$ref": "#/components/responses/Error"}
            }
        });
        if r.method == Method::POST || r.method == Method::PUT {
            op["requestBody"] = json!({"required": false, "content": {"application/json": {"schema": {"type": "object", "description": "the command's arguments, as for pgtenant ctl"}}}});
        } else if r.paged.is_some() {
            op["parameters"] = json!([
                {"name": "offset", "in": "query", "schema": {"type": "integer"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                {"name": "search", "in": "query", "schema": {"type": "string"}}
            ]);
        }
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        entry[r.method.as_str().to_lowercase()] = op;
    }
    paths.insert(
        "/api/migrations/{tenant}/events".into(),
        json!({"get": {
            "operationId": "migrate.events",
            "summary": "Server-sent events: `progress` (the status, each second) and the migration's events as webhooks get them",
            "x-pgtenant-role": "viewer",
            "parameters": [{"name": "tenant", "in": "path", "required": true, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "text/event-stream"}}
        }}),
    );
    json!({
        "openapi": "3.0.3",
        "info": {"title": "pgtenant", "version": env!("CARGO_PKG_VERSION"),
                 "description": "The admin command table over HTTP. Authorization: Bearer <token> of [[api_tokens]]."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Ok": {"type": "object", "properties": {"ok": {"type": "boolean"}, "result": {}}},
                "Error": {"type": "object", "properties": {"ok": {"type": "boolean"}, "error": {"type": "object",
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
            },
            "responses": {"Error": {"description": "refused", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}
        },
        "security": [{"bearer": []}],
        "paths": paths
    })
}
