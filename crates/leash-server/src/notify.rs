//! Approval notifications: each new approval is POSTed as JSON to `[approvals] webhook_url`,
//! signed `Leash-Signature: sha256=<hex HMAC-SHA256 of the body under webhook_secret>`. A
//! background task delivers them with retries and backoff; the gateway only puts the event on a
//! bounded queue (never waits, never slows down): when the queue is full the event is dropped
//! and logged, and the approval itself is unaffected (the human can always list approvals).

use std::time::Duration;

use hmac::{Hmac, Mac as _};
use leash_core::secret::Secret;
use serde_json::Value;
use tokio::sync::mpsc;

/// Events waiting for delivery at most.
const QUEUE: usize = 1024;
/// Delivery attempts per event.
const ATTEMPTS: u32 = 6;
/// First retry delay; doubled after each failure (0.5, 1, 2, 4, 8 s).
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// How long one delivery attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateway's side of the webhook: a queue, or nothing when no webhook is configured.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    queue: Option<mpsc::Sender<Value>>,
}

impl Notifier {
    /// Starts the delivery task for `url`, signing with `secret`.
    pub fn start(url: url::Url, secret: Secret) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let (queue, events) = mpsc::channel(QUEUE);
        tokio::spawn(deliver(client, url, secret, events));
        Ok(Self { queue: Some(queue) })
    }

    /// Queues an event without waiting.
    pub fn send(&self, event: Value) {
        if let Some(queue) = &self.queue
            && queue.try_send(event).is_err()
        {
            tracing::warn!("approval webhook queue is full; a notification was dropped");
        }
    }
}

/// `sha256=<hex>` of the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &Secret, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn deliver(
    client: reqwest::Client,
    url: url::Url,
    secret: Secret,
    mut events: mpsc::Receiver<Value>,
) {
    while let Some(event) = events.recv().await {
        let body = event.to_string();
        let signature = signature(&secret, body.as_bytes());
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let sent = client
                .post(url.clone())
                .header("content-type", "application/json")
                .header("leash-signature", &signature)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => break,
                Ok(response) => {
                    tracing::warn!(
                        attempt,
                        status = response.status().as_u16(),
                        "approval webhook refused the event"
                    );
                }
                Err(e) => tracing::warn!(attempt, error = %e, "approval webhook unreachable"),
            }
            if attempt == ATTEMPTS {
                tracing::warn!("approval webhook: event dropped after {ATTEMPTS} attempts");
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
}
