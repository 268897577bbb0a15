//! Webhooks (`[[webhooks]]`): migration events POSTed as JSON to receivers, signed with HMAC-SHA256 of the
//! body. Emitting never waits: each receiver has its own bounded queue and one worker that delivers in order
//! (so one migration's events arrive in the order they happened), retrying with backoff. A receiver that is
//! down fills only its own queue; what does not fit is dropped and logged, never waited for.

pub mod log;
pub mod post;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use hyper::header::{HeaderName, HeaderValue};
use hyper::Uri;
use metrics::Label;
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::WebhookConfig;
use crate::metrics::Metrics;
use log::{Delivery, DeliveryLog};

/// One event as its receivers get it.
#[derive(Debug, Serialize)]
struct Notice<'a> {
    /// Increasing across events and restarts (it starts from the clock in microseconds).
    id: u64,
    event: &'a str,
    tenant: &'a str,
    at: String,
    data: &'a Value,
}

/// What a worker delivers.
struct Item {
    id: u64,
    event: &'static str,
    tenant: String,
    body: Bytes,
}

struct Hook {
    config: WebhookConfig,
    tx: mpsc::Sender<Item>,
}

/// An event as the HTTP API's event streams get it.
#[derive(Debug)]
pub struct Published {
    pub event: &'static str,
    pub tenant: String,
    /// The webhook body (JSON).
    pub body: Bytes,
}

pub struct Notifier {
    hooks: Mutex<Vec<Hook>>,
    /// Every event, for the HTTP API's server-sent event streams (a slow reader misses events, never blocks).
    events: tokio::sync::broadcast::Sender<Arc<Published>>,
    pub log: Arc<DeliveryLog>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    /// Ends the workers when the proxy goes (in-process proxies in tests).
    stop: CancellationToken,
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Notifier {
    pub fn new(metrics: Arc<Metrics>) -> Notifier {
        Notifier {
            hooks: Mutex::new(Vec::new()),
            events: tokio::sync::broadcast::channel(1024).0,
            log: Arc::new(DeliveryLog::default()),
            next_id: AtomicU64::new(crate::migration::record::now_ms().saturating_mul(1000)),
            metrics,
            stop: CancellationToken::new(),
        }
    }

    /// Starts a worker for each new receiver and ends removed ones (after their queue); unchanged receivers
    /// keep their worker and queue. Called at start and on reload, inside the runtime.
    pub fn configure(&self, configs: &[WebhookConfig]) {
        let mut hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        hooks.retain(|h| configs.contains(&h.config));
        for c in configs {
            if hooks.iter().any(|h| &h.config == c) {
                continue;
            }
            let Ok(uri) = c.url.parse::<Uri>() else {
                continue; // validated with the config
            };
            let (tx, rx) = mpsc::channel(c.queue);
            let worker = Worker {
                uri,
                shown: metric_label(&c.url),
                config: c.clone(),
                log: self.log.clone(),
                metrics: self.metrics.clone(),
                stop: self.stop.clone(),
            };
            tokio::spawn(worker.run(rx));
            hooks.push(Hook {
                config: c.clone(),
                tx,
            });
        }
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Published>> {
        self.events.subscribe()
    }

    /// Queues `event` about `tenant` for every receiver that asked for it; never waits.
    pub fn emit(&self, event: &'static str, tenant: &str, data: Value) {
        let hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        let listeners = self.events.receiver_count() > 0;
        if !listeners && !hooks.iter().any(|h| h.config.wants(event)) {
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let notice = Notice {
            id,
            event,
            tenant,
            at: crate::state::audit::rfc3339_now(),
            data: &data,
        };
        let body = Bytes::from(serde_json::to_vec(&notice).unwrap_or_default());
        if listeners {
            let _ = self.events.send(Arc::new(Published {
                event,
                tenant: tenant.to_owned(),
                body: body.clone(),
            }));
        }
        for h in hooks.iter().filter(|h| h.config.wants(event)) {
            let item = Item {
                id,
                event,
                tenant: tenant.to_owned(),
                body: body.clone(),
            };
            if let Err(e) = h.tx.try_send(item) {
                let item = match e {
                    mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => i,
                };
                warn!(url = %shown_url(&h.config.url), event, %tenant, "webhook queue full: event dropped");
                let ended = Ended {
                    outcome: "dropped",
                    attempts: 0,
                    status: None,
                    error: Some("queue full".into()),
                };
                ended.record(
                    &self.metrics,
                    &self.log,
                    &h.config.url,
                    &item,
                    Instant::now(),
                );
            }
        }
    }
}

/// The receiver's URL as logged (the delivery log, which API viewers read, and warnings): scheme, host and port,
/// as the metric label; the path, query and user info may carry a token.
fn shown_url(url: &str) -> String {
    metric_label(url)
}

/// The receiver as a metric label, which anyone who can read `/metrics` sees: scheme, host and port only (some
/// receivers take their token in the path).
fn metric_label(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(u) => {
            let port = u.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}",
                u.scheme_str().unwrap_or(""),
                u.host().unwrap_or("")
            )
        }
        Err(_) => String::from("invalid"),
    }
}

/// How one event's delivery to one receiver ended.
struct Ended {
    outcome: &'static str,
    attempts: u32,
    status: Option<u16>,
    error: Option<String>,
}

impl Ended {
    /// Counts it (`pgtenant_webhook_deliveries_total`) and logs it, its duration measured from `started`.
    fn record(
        self,
        metrics: &Metrics,
        log: &DeliveryLog,
        url: &str,
        item: &Item,
        started: Instant,
    ) {
        metrics
            .counter(
                "webhook_deliveries_total",
                vec![
                    Label::new("webhook", metric_label(url)),
                    Label::new("outcome", self.outcome),
                ],
            )
            .increment(1);
        log.push(Delivery {
            at: crate::state::audit::rfc3339_now(),
            url: shown_url(url),
            event: item.event.to_owned(),
            tenant: item.tenant.clone(),
            id: item.id,
            outcome: self.outcome.to_owned(),
            attempts: self.attempts,
            status: self.status,
            error: self.error,
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }
}

/// `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length: this never fails.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    format!("sha256={}", crate::state::hex(&mac.finalize().into_bytes()))
}

/// One receiver's deliverer.
struct Worker {
    uri: Uri,
    shown: String,
    config: WebhookConfig,
    log: Arc<DeliveryLog>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Item>) {
        loop {
            let item = tokio::select! {
                _ = self.stop.cancelled() => return,
                i = rx.recv() => match i { Some(i) => i, None => return },
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.deliver(&item) => {}
            }
        }
    }

    /// Tries `item` up to `max_attempts` times, doubling the wait from 500 ms (at most 30 s).
    async fn deliver(&self, item: &Item) {
        let started = Instant::now();
        let headers = self.headers(item);
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let mut wait = Duration::from_millis(500);
        let mut last = (None, None);
        for attempt in 1..=self.config.max_attempts {
            match post::post(&self.uri, &headers, item.body.clone(), timeout).await {
                Ok(s) if s.is_success() => {
                    let ended = Ended {
                        outcome: "delivered",
                        attempts: attempt,
                        status: Some(s.as_u16()),
                        error: None,
                    };
                    ended.record(&self.metrics, &self.log, &self.config.url, item, started);
                    return;
                }
                Ok(s) => last = (Some(s.as_u16()), Some(format!("answered {s}"))),
                Err(e) => last = (None, Some(e.to_string())),
            }
            self.metrics
                .counter(
                    "webhook_attempts_failed_total",
                    vec![Label::new("webhook", self.shown.clone())],
                )
                .increment(1);
            if attempt < self.config.max_attempts {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
        warn!(url = %self.shown, event = item.event, tenant = %item.tenant, error = ?last.1, "webhook delivery failed");
        let ended = Ended {
            outcome: "failed",
            attempts: self.config.max_attempts,
            status: last.0,
            error: last.1,
        };
        ended.record(&self.metrics, &self.log, &self.config.url, item, started);
    }

    fn headers(&self, item: &Item) -> Vec<(HeaderName, HeaderValue)> {
        let sig = signature(self.config.resolved.expose().as_bytes(), &item.body);
        let mut h = vec![(
            HeaderName::from_static("x-pgtenant-event"),
            HeaderValue::from_static(item.event),
        )];
        if let Ok(v) = HeaderValue::from_str(&sig) {
            h.push((HeaderName::from_static("x-pgtenant-signature"), v));
        }
        if let Ok(v) = HeaderValue::from_str(&item.id.to_string()) {
            h.push((HeaderName::from_static("x-pgtenant-delivery"), v));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let s = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            s,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn logged_urls_lose_their_query() {
        assert_eq!(shown_url("https://h/x?token=1"), "https://h");
        assert_eq!(shown_url("https://u:secret@h:8443/x#f"), "https://h:8443");
    }

    #[test]
    fn metric_labels_keep_only_the_receivers_host() {
        assert_eq!(
            metric_label("https://hooks.example/services/T0/B0/secret?x=1"),
            "https://hooks.example"
        );
        assert_eq!(
            metric_label("http://u:p@127.0.0.1:9000/hook"),
            "http://127.0.0.1:9000"
        );
    }
}
