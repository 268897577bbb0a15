//! `[[api_tokens]]`: bearer tokens of the HTTP API, each with a role.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::secret::{Secret, Source};
use super::ConfigError;

/// What a token may do: `viewer` reads, `operator` also pauses, resumes and migrates, `admin` also changes
/// routes, reloads, grants and restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiRole {
    Viewer,
    Operator,
    Admin,
}

impl ApiRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiRole::Viewer => "viewer",
            ApiRole::Operator => "operator",
            ApiRole::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// Who the token is (the audit log's actor is `api:<name>`).
    pub name: String,
    pub role: ApiRole,
    /// The token (at least 16 characters): inline, a file or an environment variable.
    #[serde(default, skip_serializing)]
    pub token: String,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    #[serde(skip)]
    pub resolved: Secret,
}

impl ApiToken {
    pub fn resolve(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let token = Source {
            what: format!("api_tokens.{}.token", self.name),
            inline: Some(&self.token),
            file: self.token_file.as_deref(),
            env_var: self.token_env.as_deref(),
        }
        .resolve(env)?;
        match token {
            Some(t) if t.expose().len() >= 16 => {
                self.resolved = t;
                Ok(())
            }
            _ => Err(ConfigError::Invalid(format!(
                "api_tokens.{}: a token of at least 16 characters is required",
                self.name
            ))),
        }
    }
}
