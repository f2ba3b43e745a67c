//! Delivers events to webhooks: the task a background queue exists for. It declares the hosts
//! it may call and the secret it signs with; an operator grants both before it can do either.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use stem_guest::http::{HttpError, Request};
use stem_guest::{TaskContext, TaskError};

#[derive(Deserialize)]
struct Delivery {
    /// Where to POST, e.g. `https://hooks.example.com/orders`.
    url: String,
    /// The event, sent as the JSON body.
    event: Value,
}

/// POSTs `event` to `url` with `Authorization: Bearer $WEBHOOK_TOKEN`. A 2xx answer is the
/// result; a 429 or 5xx answer, or a network error, is retried with backoff; any other answer
/// rejects the delivery, since sending it again would not help.
#[stem_guest::task(
    name = "webhooks.deliver",
    queue = "webhooks",
    max_retries = 5,
    retry_backoff = "2s",
    time_limit = "30s",
    outbound = ["https://hooks.example.com", "http://127.0.0.1:*"],
    secrets = ["WEBHOOK_TOKEN"],
)]
fn deliver(ctx: &TaskContext, delivery: Delivery) -> Result<Value, TaskError> {
    let token = ctx.secret("WEBHOOK_TOKEN")?;
    let request = Request::post(&delivery.url)
        .header("authorization", &format!("Bearer {token}"))
        .header("idempotency-key", ctx.id())
        .json(&delivery.event)?;
    let response = match request.send() {
        Ok(response) => response,
        // A refusal by the host will not change on a retry.
        Err(HttpError::Denied(reason)) => return Err(TaskError::reject(reason)),
        Err(error) => return Err(TaskError::retry_after(Duration::from_secs(2), error)),
    };
    ctx.info(&format!(
        "{} answered {} (attempt {})",
        delivery.url,
        response.status,
        ctx.attempt()
    ));
    match response.status {
        200..=299 => Ok(json!({
            "status": response.status,
            "attempt": ctx.attempt(),
            "reply": response.text().unwrap_or_default(),
        })),
        429 | 500..=599 => Err(TaskError::retry_after(
            Duration::from_secs(2),
            format!("{} answered {}", delivery.url, response.status),
        )),
        status => Err(TaskError::reject(format!(
            "{} answered {status}: the delivery is not retried",
            delivery.url
        ))),
    }
}
