//! Statements the proxy answers itself: `SET`/`RESET`/`SHOW pgtenant.tenant`, and everything a session without a
//! tenant sends (which can only be refused until it picks one).

use tracing::{info, warn};

use super::parts::SkipEnd;
use super::resolve::connect_server;
use super::session::Session;
use crate::errors::ClientError;
use crate::protocol::sql::{Recognised, TenantCommand};
use crate::protocol::{inspect, messages, sql, PgError};
use crate::tenant::{may_reach, TenantId};

use super::parts::End;
use crate::protocol::tag::{frontend as fe, status};

impl Session {
    /// Answers a simple Query the recogniser flagged. Called only when the backend owes no reply.
    pub(super) async fn answer_simple(&mut self, r: Recognised) {
        match r {
            Recognised::Command(cmd) => self.tenant_command(cmd).await,
            Recognised::Refuse(msg) => {
                ClientError::Unsupported(msg)
                    .to_pg()
                    .encode(&mut self.client.cout);
                let status = self.status();
                messages::ready_for_query(&mut self.client.cout, status);
            }
            Recognised::Forbidden(msg) => {
                ClientError::Forbidden(msg)
                    .to_pg()
                    .encode(&mut self.client.cout);
                let status = self.status();
                messages::ready_for_query(&mut self.client.cout, status);
            }
            Recognised::Pass => {
                ClientError::NoTenant.to_pg().encode(&mut self.client.cout);
                let status = self.status();
                messages::ready_for_query(&mut self.client.cout, status);
            }
        }
    }

    /// A frame from a client that has no backend. `frame` is `None` for a frame too large to hold whole.
    pub(super) async fn unrouted(&mut self, tag: u8, frame: Option<&[u8]>) -> Result<(), End> {
        match tag {
            fe::QUERY => {
                let text = frame.and_then(inspect::query_text).unwrap_or_default();
                let r = sql::recognise(text);
                self.answer_simple(r).await;
            }
            fe::FUNCTION_CALL => {
                ClientError::NoTenant.to_pg().encode(&mut self.client.cout);
                messages::ready_for_query(&mut self.client.cout, status::IDLE);
            }
            fe::PARSE | fe::BIND | fe::DESCRIBE | fe::EXECUTE | fe::CLOSE => {
                ClientError::NoTenant.to_pg().encode(&mut self.client.cout);
                self.client.skip = Some(SkipEnd::Local);
            }
            fe::SYNC => messages::ready_for_query(&mut self.client.cout, status::IDLE),
            // Flush has nothing to flush; copy messages outside COPY are ignored, as PostgreSQL does.
            _ => {}
        }
        Ok(())
    }

    async fn tenant_command(&mut self, cmd: TenantCommand) {
        let result = match cmd {
            TenantCommand::Show => {
                let name = self.place.tenant.as_ref().map(|t| t.as_str()).unwrap_or("");
                messages::single_text_row(
                    &mut self.client.cout,
                    "pgtenant.tenant",
                    Some(name),
                    "SHOW",
                );
                Ok(None)
            }
            // (An unfinished batch or COPY never gets here, see `refuse_query_in_batch`; checked again because
            // a switch would drop their work with the connection.)
            _ if self.status() != status::IDLE
                || self
                    .server
                    .as_ref()
                    .is_some_and(|s| s.batch_open || s.copy_in) =>
            {
                Err(ClientError::TenantChangeInTransaction.into())
            }
            TenantCommand::Set(name) => match TenantId::parse(&name) {
                Ok(t) => self.switch_tenant(Some(t)).await.map(|_| Some("SET")),
                Err(e) => Err(ClientError::InvalidTenantName(e.to_string()).into()),
            },
            TenantCommand::Reset => {
                let t = self.info.startup_tenant.clone();
                self.switch_tenant(t).await.map(|_| Some("RESET"))
            }
        };
        match result {
            Ok(Some(tag)) => messages::command_complete(&mut self.client.cout, tag),
            Ok(None) => {}
            Err(e) => e.encode(&mut self.client.cout),
        }
        let status = self.status();
        messages::ready_for_query(&mut self.client.cout, status);
    }

    /// Moves the session to `target` (or to no tenant). Runs only when idle outside a transaction.
    async fn switch_tenant(&mut self, target: Option<TenantId>) -> Result<(), PgError> {
        if target == self.place.tenant {
            return Ok(());
        }
        if self.info.tenant_fixed && target != self.info.startup_tenant {
            let fixed = self
                .info
                .startup_tenant
                .as_ref()
                .map(|t| t.as_str())
                .unwrap_or("");
            return Err(ClientError::TenantFixed(fixed.to_owned()).into());
        }
        let server = match &target {
            Some(t) => {
                let Some(route) = self.shared.router.load().get(t.as_str()).cloned() else {
                    return Err(ClientError::UnknownTenant(t.to_string()).into());
                };
                if !may_reach(&self.info.user.tenants, t) {
                    warn!(user = %self.info.user.name, tenant = %t, "user tried to reach a tenant it may not");
                    return Err(ClientError::TenantNotAllowed {
                        user: self.info.user.name.clone(),
                        tenant: t.clone(),
                    }
                    .into());
                }
                super::guards::check_startup(
                    &self.info.params,
                    &self.info.options,
                    &route,
                    t.as_str(),
                )?;
                let slot = super::login::tenant_slot_for(&self.shared, t)?;
                Some((connect_server(&self.shared, &self.info, t).await?, slot))
            }
            None => None,
        };
        let (server, slot) = match server {
            Some((server, slot)) => (Some(server), Some(slot)),
            None => (None, None),
        };
        // Nothing is open here (see `tenant_command`); a gate pass still held is the old tenant's and goes
        // back to its gate, or that tenant's pause would wait for this session forever.
        self.end_transaction(false);
        self.info.admission.tenant = slot;
        info!(user = %self.info.user.name, from = ?self.place.tenant, to = ?target, "session moved by SET pgtenant.tenant");
        // A session that picks its tenant itself starts afresh there: nothing pins it yet.
        self.state.clear();
        self.pooling.statements.clear();
        self.pooling.resolved = None;
        self.install(target, server);
        Box::pin(self.settle()).await;
        Ok(())
    }
}
