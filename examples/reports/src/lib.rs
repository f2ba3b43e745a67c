//! A report pipeline: `reports.generate` aggregates a customer's orders, reporting progress,
//! and enqueues `reports.deliver` for the finished report. `reports.render` renders one week's
//! report, a step for canvas examples (a chord of weeks into `billing.email-receipt`).

use serde::{Deserialize, Serialize};
use stem_guest::{EnqueueOptions, TaskContext, TaskError};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportArgs {
    customer_id: u64,
    /// Orders to aggregate; generated deterministically from the customer id when absent.
    #[serde(default)]
    orders: Option<Vec<Order>>,
    /// Address the report goes to; no delivery is enqueued without one.
    #[serde(default)]
    deliver_to: Option<String>,
}

#[derive(Clone, Deserialize, Serialize)]
pub struct Order {
    sku: String,
    quantity: u32,
    /// Price of one unit in cents.
    unit_price_cents: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    customer_id: u64,
    order_count: usize,
    units: u64,
    total_cents: u64,
    top_sku: Option<String>,
    delivery_task_id: Option<String>,
}

/// Aggregates a customer's orders into a report and enqueues its delivery.
#[stem_guest::task(
    name = "reports.generate",
    queue = "reports",
    max_retries = 3,
    retry_backoff = "1s",
    soft_time_limit = "20s",
    time_limit = "30s"
)]
pub fn generate(ctx: &TaskContext, args: ReportArgs) -> Result<Report, TaskError> {
    let orders = args
        .orders
        .unwrap_or_else(|| sample_orders(args.customer_id, 1_000));
    ctx.info(&format!(
        "building report for customer {} from {} orders",
        args.customer_id,
        orders.len()
    ));
    let mut units: u64 = 0;
    let mut total_cents: u64 = 0;
    let mut per_sku: std::collections::BTreeMap<&str, u64> = Default::default();
    let step = (orders.len() / 4).max(1);
    for (index, order) in orders.iter().enumerate() {
        let line = u64::from(order.quantity)
            .checked_mul(order.unit_price_cents)
            .ok_or_else(|| TaskError::reject(format!("order {index} overflows")))?;
        units += u64::from(order.quantity);
        total_cents += line;
        *per_sku.entry(order.sku.as_str()).or_default() += line;
        if (index + 1) % step == 0 {
            ctx.progress(
                ((index + 1) * 100 / orders.len()) as u8,
                "aggregating orders",
            );
        }
        if ctx.is_revoked() {
            return Err(TaskError::fail("revoked while aggregating"));
        }
    }
    let top_sku = per_sku
        .iter()
        .max_by_key(|(_, cents)| **cents)
        .map(|(sku, _)| sku.to_string());
    let delivery_task_id = match args.deliver_to {
        Some(address) => Some(ctx.enqueue_with(
            "reports.deliver",
            &serde_json::json!({
                "customerId": args.customer_id,
                "to": address,
                "totalCents": total_cents,
            }),
            EnqueueOptions {
                queue: Some("reports".to_string()),
                ..EnqueueOptions::default()
            },
        )?),
        None => None,
    };
    Ok(Report {
        customer_id: args.customer_id,
        order_count: orders.len(),
        units,
        total_cents,
        top_sku,
        delivery_task_id,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliverArgs {
    customer_id: u64,
    to: String,
    total_cents: u64,
}

/// Delivers a finished report (here: formats the message it would send).
#[stem_guest::task(name = "reports.deliver", queue = "reports", max_retries = 5)]
pub fn deliver(ctx: &TaskContext, args: DeliverArgs) -> Result<String, TaskError> {
    if !args.to.contains('@') {
        return Err(TaskError::reject(format!(
            "`{}` is not an address",
            args.to
        )));
    }
    let message = format!(
        "report for customer {} sent to {}: total {}.{:02}",
        args.customer_id,
        args.to,
        args.total_cents / 100,
        args.total_cents % 100
    );
    ctx.info(&message);
    Ok(message)
}

#[derive(Deserialize)]
pub struct RenderArgs {
    /// An ISO week, `YYYY-Www`.
    week: String,
}

#[derive(Serialize)]
pub struct Rendered {
    week: String,
    pages: u32,
    total_cents: u64,
}

/// Renders the report of one week (`YYYY-Www`), the same every time for that week.
#[stem_guest::task(name = "reports.render", queue = "reports")]
pub fn render(args: RenderArgs) -> Result<Rendered, TaskError> {
    let (year, week) = parse_week(&args.week).ok_or_else(|| {
        TaskError::reject(format!(
            "`{}` is not an ISO week like 2024-W28 (YYYY-Www, week 01 to 53)",
            args.week
        ))
    })?;
    let seed = u64::from(year) * 100 + u64::from(week);
    let pages = (seed % 17) as u32 + 3;
    Ok(Rendered {
        week: args.week,
        pages,
        total_cents: u64::from(pages) * 1_250 + seed % 1_000,
    })
}

/// The year and week of `YYYY-Www`.
fn parse_week(text: &str) -> Option<(u16, u8)> {
    let (year, week) = text.split_once("-W")?;
    let digits =
        |part: &str, len: usize| part.len() == len && part.bytes().all(|b| b.is_ascii_digit());
    if !digits(year, 4) || !digits(week, 2) {
        return None;
    }
    let week: u8 = week.parse().ok()?;
    (1..=53)
        .contains(&week)
        .then_some((year.parse().ok()?, week))
}

/// Deterministic pseudo-random orders (xorshift), so a report is reproducible.
fn sample_orders(seed: u64, count: usize) -> Vec<Order> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| Order {
            sku: format!("SKU-{:03}", next() % 50),
            quantity: (next() % 10 + 1) as u32,
            unit_price_cents: next() % 10_000 + 99,
        })
        .collect()
}
