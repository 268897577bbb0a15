//! `tenant grants T [--apply]`: the SQL that makes tenant T's backend role and gives it exactly its own data —
//! its schema (schema routes), its database (database and dedicated-server routes), or its rows of shared
//! tables (row-level security tied to the role, never to a setting a client could change). With `apply`, the
//! SQL runs on the backend with its admin credentials, in one transaction.
//!
//! Every name is quoted (`quote_ident`) and every value is a literal (`quote_literal`) where it reaches SQL;
//! the password goes in as a SCRAM verifier, so the printed SQL does not show it.

use crate::config::{Config, Isolation};
use crate::quote::quote_ident;
use crate::quote::quote_literal;
use crate::routing::Route;
use crate::tenant::TenantId;

/// The schema holding the role-to-key mapping and the function row-level security calls.
pub const RLS_SCHEMA: &str = "pgtenant_rls";

/// Everything the grant SQL is made from.
pub struct GrantPlan<'a> {
    pub tenant: &'a TenantId,
    pub route: &'a Route,
    pub role: String,
    /// `SCRAM-SHA-256$...` or none (the role logs in without a password: trust in pg_hba only).
    pub verifier: Option<String>,
    pub database: String,
    /// The serving role of the backend (`isolation = "shared"` routes use it): it keeps seeing every row of
    /// shared tables.
    pub serving_role: String,
    pub admin_role: String,
}

impl GrantPlan<'_> {
    /// The route's schema, or `public` when it names none.
    fn schema(&self) -> &str {
        self.route.schema.as_deref().unwrap_or("public")
    }

    /// The whole script.
    pub fn sql(&self) -> String {
        let mut out = Vec::new();
        // Names are shown escaped (`{:?}`): a name may hold a line break, which would end the comment and
        // start a statement of its own.
        out.push(format!(
            "-- pgtenant: role and grants for tenant {} ({})",
            self.tenant,
            match &self.route.tenant_column {
                Some(c) => format!(
                    "rows with {c:?} = the tenant's key in schema {:?}",
                    self.schema()
                ),
                None if self.route.schema.is_some() => format!("schema {:?}", self.schema()),
                None => format!("database {:?}", self.database),
            }
        ));
        out.extend(self.role_sql());
        out.extend(self.database_sql());
        match &self.route.tenant_column {
            Some(column) => out.extend(self.shared_rows_sql(column)),
            None => out.extend(self.schema_sql()),
        }
        out.join("\n")
    }

    fn role_sql(&self) -> Vec<String> {
        let role = quote_ident(&self.role);
        let password = match &self.verifier {
            Some(v) => format!("PASSWORD {}", quote_literal(v)),
            None => "PASSWORD NULL".to_string(),
        };
        vec![
            format!(
                "DO $pgtenant$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) THEN CREATE ROLE {role}; END IF; END $pgtenant$;",
                quote_literal(&self.role)
            ),
            // Whatever the role was before, it is now a plain login role: no superuser, no BYPASSRLS, no
            // replication, no role or database creation.
            format!("ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS {password};"),
        ]
    }

    fn database_sql(&self) -> Vec<String> {
        let db = quote_ident(&self.database);
        let role = quote_ident(&self.role);
        let mut v = vec![
            // Only roles granted CONNECT reach the database: other tenants' roles do not.
            format!("REVOKE CONNECT ON DATABASE {db} FROM PUBLIC;"),
            format!("GRANT CONNECT ON DATABASE {db} TO {role};"),
        ];
        if self.serving_role != self.admin_role {
            v.push(format!(
                "GRANT CONNECT ON DATABASE {db} TO {};",
                quote_ident(&self.serving_role)
            ));
        }
        v.push(format!(
            "ALTER ROLE {role} IN DATABASE {db} SET search_path = {};",
            quote_ident(self.schema())
        ));
        v
    }

    /// A schema of the tenant's own (schema routes, and the schema or `public` of its own database).
    fn schema_sql(&self) -> Vec<String> {
        let s = quote_ident(self.schema());
        let role = quote_ident(&self.role);
        let tables = "SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES";
        let mut v = vec![format!("CREATE SCHEMA IF NOT EXISTS {s};")];
        if self.route.schema.is_some() {
            // Nobody else may even look into a tenant's schema.
            v.push(format!("REVOKE ALL ON SCHEMA {s} FROM PUBLIC;"));
        }
        v.extend([
            format!("GRANT USAGE, CREATE ON SCHEMA {s} TO {role};"),
            format!("GRANT {tables} ON ALL TABLES IN SCHEMA {s} TO {role};"),
            format!("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {s} TO {role};"),
            format!("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {s} TO {role};"),
            format!("ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT {tables} ON TABLES TO {role};"),
            format!("ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {role};"),
        ]);
        v
    }

    /// Rows of shared tables: row-level security on every table of the schema with the tenant column, with
    /// a policy that compares the row's key with the key mapped to the current role. The mapping lives in a
    /// table only the admin can write; the function that reads it runs as its owner.
    fn shared_rows_sql(&self, column: &str) -> Vec<String> {
        let s = quote_ident(self.schema());
        let rls = quote_ident(RLS_SCHEMA);
        let role = quote_ident(&self.role);
        let key = self
            .route
            .tenant_key
            .as_deref()
            .unwrap_or(self.tenant.as_str());
        let check = format!(
            "{}::text = {rls}.tenant_key(current_user)",
            quote_ident(column)
        );
        let mut v = vec![
            format!("CREATE SCHEMA IF NOT EXISTS {rls};"),
            format!("REVOKE ALL ON SCHEMA {rls} FROM PUBLIC;"),
            format!("CREATE TABLE IF NOT EXISTS {rls}.tenant_roles (role_name name PRIMARY KEY, tenant_key text NOT NULL);"),
            format!("REVOKE ALL ON {rls}.tenant_roles FROM PUBLIC;"),
            format!(
                "CREATE OR REPLACE FUNCTION {rls}.tenant_key(r name) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER \
                 SET search_path = pg_catalog AS $f$ SELECT tenant_key FROM {rls}.tenant_roles WHERE role_name = r $f$;"
            ),
            format!("REVOKE ALL ON FUNCTION {rls}.tenant_key(name) FROM PUBLIC;"),
            format!("GRANT USAGE ON SCHEMA {rls} TO {role};"),
            format!("GRANT EXECUTE ON FUNCTION {rls}.tenant_key(name) TO {role};"),
            format!(
                "INSERT INTO {rls}.tenant_roles VALUES ({}, {}) ON CONFLICT (role_name) DO UPDATE SET tenant_key = EXCLUDED.tenant_key;",
                quote_literal(&self.role),
                quote_literal(key)
            ),
            format!("GRANT USAGE ON SCHEMA {s} TO {role};"),
            // Every tenant's names resolve in this schema: a tenant that could create in it (PUBLIC can in
            // `public` on databases made before PostgreSQL 15) could shadow a function the others call, say
            // `lower(varchar)` over `pg_catalog.lower(text)`, and run code as them.
            format!("REVOKE CREATE ON SCHEMA {s} FROM PUBLIC;"),
            // nextval needs USAGE; UPDATE (setval) would let one tenant move the others' keys.
            format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {role};"),
        ];
        let serving = (self.serving_role != self.admin_role).then(|| {
            format!(
                "IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = t.rel AND polname = 'pgtenant_serving_role') THEN \
                 EXECUTE format('CREATE POLICY pgtenant_serving_role ON %s TO %I USING (true) WITH CHECK (true)', t.rel, {}); END IF;",
                quote_literal(&self.serving_role)
            )
        });
        // No TRUNCATE: row-level security does not apply to it, and it would empty every tenant's rows.
        v.push(format!(
            "DO $pgtenant$ DECLARE t record; BEGIN \
             FOR t IN SELECT c.oid::regclass AS rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid \
             WHERE n.nspname = {schema} AND c.relkind IN ('r', 'p') AND a.attname = {col} AND NOT a.attisdropped LOOP \
             EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t.rel); \
             IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = t.rel AND polname = 'pgtenant_tenant_rows') THEN \
             EXECUTE format('CREATE POLICY pgtenant_tenant_rows ON %s USING ({check}) WITH CHECK ({check})', t.rel); END IF; \
             {serving} \
             EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO %I', t.rel, {role_lit}); \
             END LOOP; END $pgtenant$;",
            schema = quote_literal(self.schema()),
            col = quote_literal(column),
            // Inside format()'s string: its quotes doubled, and `%` (a quoted column may hold one) made literal.
            check = check.replace('%', "%%").replace('\'', "''"),
            serving = serving.unwrap_or_default(),
            role_lit = quote_literal(&self.role),
        ));
        v
    }
}

/// Why grants cannot be made for a tenant.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("tenant {0:?} is not routed")]
    UnknownTenant(String),
    #[error("tenant {tenant:?} routes to backend {backend:?}, which is not configured")]
    UnknownBackend { tenant: String, backend: String },
    #[error("tenant {0:?} uses isolation = \"shared\": its connections log in as the backend's serving role, so there is no role of its own to grant to (set isolation = \"role\" on the route or backend)")]
    Shared(String),
    #[error("tenant {0:?}: no database (the route, its backend and the request name none)")]
    NoDatabase(String),
    #[error("{0}")]
    Identity(String),
}

/// Builds the plan for `tenant` on `route` (the route's database, else the backend's).
pub fn plan<'a>(
    config: &Config,
    backend: &crate::backend::Backend,
    tenant: &'a TenantId,
    route: &'a Route,
) -> Result<GrantPlan<'a>, GrantError> {
    if route.isolation(&backend.config) != Isolation::Role {
        return Err(GrantError::Shared(tenant.to_string()));
    }
    let login = crate::backend::identity::login_for(config, backend, route, tenant)
        .map_err(|e| GrantError::Identity(e.to_string()))?;
    let database = route
        .database
        .clone()
        .or_else(|| backend.config.database.clone())
        .ok_or_else(|| GrantError::NoDatabase(tenant.to_string()))?;
    let verifier = (!login.password.is_empty())
        .then(|| postgres_protocol::password::scram_sha_256(login.password.expose().as_bytes()));
    Ok(GrantPlan {
        tenant,
        route,
        role: login.user,
        verifier,
        database,
        serving_role: backend.config.user.clone(),
        admin_role: backend.config.admin_user().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_for(route: Route) -> String {
        let tenant = TenantId::parse("acme").unwrap();
        GrantPlan {
            tenant: &tenant,
            route: &route,
            role: "t_acme".into(),
            verifier: Some("SCRAM-SHA-256$4096:c2FsdA==$a:b".into()),
            database: "app".into(),
            serving_role: "pgtenant".into(),
            admin_role: "postgres".into(),
        }
        .sql()
    }

    #[test]
    fn schema_routes_get_their_schema_only() {
        let sql = plan_for(Route::new(
            crate::routing::BackendId::parse("b").unwrap(),
            None,
            Some("tenant_acme".into()),
        ));
        assert!(sql.contains("REVOKE ALL ON SCHEMA \"tenant_acme\" FROM PUBLIC;"));
        assert!(sql.contains("GRANT USAGE, CREATE ON SCHEMA \"tenant_acme\" TO \"t_acme\";"));
        assert!(sql.contains("NOSUPERUSER") && sql.contains("NOBYPASSRLS"));
        assert!(sql.contains("PASSWORD 'SCRAM-SHA-256$4096"));
        assert!(sql.contains("REVOKE CONNECT ON DATABASE \"app\" FROM PUBLIC;"));
        assert!(!sql.contains("ROW LEVEL SECURITY"));
    }

    #[test]
    fn shared_tables_get_row_level_security_and_no_truncate() {
        let mut route = Route::new(crate::routing::BackendId::parse("b").unwrap(), None, None);
        route.tenant_column = Some("tenant_id".into());
        route.tenant_key = Some("4'2".into());
        let sql = plan_for(route);
        assert!(sql.contains("ENABLE ROW LEVEL SECURITY"));
        assert!(sql.contains("VALUES ('t_acme', '4''2')"), "{sql}");
        assert!(sql.contains("pgtenant_serving_role"));
        assert!(!sql.contains("TRUNCATE"));
        assert!(!sql.contains("REVOKE ALL ON SCHEMA \"public\""));
    }

    #[test]
    fn hostile_names_stay_quoted() {
        let sql = plan_for(Route::new(
            crate::routing::BackendId::parse("b").unwrap(),
            None,
            Some("x\"; DROP TABLE y; --".into()),
        ));
        assert!(sql.contains("\"x\"\"; DROP TABLE y; --\""));
    }

    #[test]
    fn a_line_break_in_a_name_does_not_leave_the_comment() {
        let mut route = Route::new(
            crate::routing::BackendId::parse("b").unwrap(),
            None,
            Some("s\nALTER ROLE app SUPERUSER;--".into()),
        );
        route.tenant_column = Some("t%I".into());
        let sql = plan_for(route);
        // The comment is one line, the break shown escaped (elsewhere the name is a quoted identifier).
        let comment = sql.lines().next().unwrap();
        assert!(comment.ends_with("SUPERUSER;--\")"), "{comment}");
        assert!(comment.contains("s\\nALTER ROLE"), "{comment}");
        // The column's `%` is literal in the policy's format() string.
        assert!(sql.contains("\"t%%I\"::text"), "{sql}");
    }
}
