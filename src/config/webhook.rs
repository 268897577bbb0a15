//! `[[webhooks]]`: where migration events are POSTed, which ones, and the key that signs them.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::secret::{Secret, Source};
use super::ConfigError;

/// The events a webhook can ask for (`events = ["*"]` is all of them).
pub const EVENTS: [&str; 4] = [
    "migration.state",
    "migration.failed",
    "migration.verification",
    "migration.cutover",
];

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` (checked against the system's web roots) URL the events are POSTed to.
    pub url: String,
    /// Event names from [`EVENTS`], or `"*"`.
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    /// The HMAC-SHA256 key of the `X-Pgtenant-Signature` header: inline, a file or an environment variable.
    #[serde(default)]
    pub secret: String,
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    /// One attempt's limit (connect, send, answer).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts per event before it is logged as failed (backoff doubles from 500 ms, at most 30 s).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Events waiting for this receiver; beyond it new events are dropped (and logged), never waited for.
    #[serde(default = "default_queue")]
    pub queue: usize,
    #[serde(skip)]
    pub resolved: Secret,
}

fn all_events() -> Vec<String> {
    vec!["*".into()]
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_attempts() -> u32 {
    6
}
fn default_queue() -> usize {
    1_024
}

impl WebhookConfig {
    /// Whether this receiver asked for `event`.
    pub fn wants(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == "*" || e == event)
    }

    pub fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("webhooks[{i}]: {m}")));
        let uri: hyper::Uri = match self.url.parse() {
            Ok(u) => u,
            Err(e) => return bad(format!("url {:?} is not a URL: {e}", self.url)),
        };
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return bad(format!(
                "url {:?} must be http:// or https:// with a host",
                self.url
            ));
        }
        if let Some(e) = self
            .events
            .iter()
            .find(|e| *e != "*" && !EVENTS.contains(&e.as_str()))
        {
            return bad(format!(
                "unknown event {e:?} (known: {}, or \"*\")",
                EVENTS.join(", ")
            ));
        }
        if !(100..=120_000).contains(&self.timeout_ms) {
            return bad("timeout_ms must be between 100 and 120000".into());
        }
        if !(1..=100).contains(&self.max_attempts) {
            return bad("max_attempts must be between 1 and 100".into());
        }
        if !(1..=1_000_000).contains(&self.queue) {
            return bad("queue must be between 1 and 1000000".into());
        }
        Ok(())
    }

    /// Reads the secret; every webhook is signed, so one is required.
    pub fn resolve(&mut self, i: usize, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let secret = Source {
            what: format!("webhooks[{i}].secret"),
            inline: Some(&self.secret),
            file: self.secret_file.as_deref(),
            env_var: self.secret_env.as_deref(),
        }
        .resolve(env)?;
        match secret {
            Some(s) if !s.is_empty() => {
                self.resolved = s;
                Ok(())
            }
            _ => Err(ConfigError::Invalid(format!(
                "webhooks[{i}]: a secret is required (secret, secret_file or secret_env): receivers check the signature"
            ))),
        }
    }
}
