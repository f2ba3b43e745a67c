//! The end of a canvas: `billing.email-receipt` is the callback of a chord of
//! `reports.render` tasks, and mails one receipt for all the weeks they rendered.

use serde::{Deserialize, Serialize};
use stem_guest::{TaskContext, TaskError};

#[derive(Deserialize)]
pub struct ReceiptArgs {
    to: String,
    /// The results of the chord's header, in order: what `reports.render` returns.
    input: Vec<RenderedReport>,
}

#[derive(Deserialize)]
pub struct RenderedReport {
    week: String,
    total_cents: u64,
}

#[derive(Serialize)]
pub struct Receipt {
    to: String,
    reports: usize,
    total_cents: u64,
    weeks: Vec<String>,
}

/// Mails one receipt for the reports of a chord (here: logs the line it would send).
#[stem_guest::task(name = "billing.email-receipt", queue = "emails")]
pub fn email_receipt(ctx: &TaskContext, args: ReceiptArgs) -> Result<Receipt, TaskError> {
    if !args.to.contains('@') {
        return Err(TaskError::reject(format!(
            "`{}` is not an address",
            args.to
        )));
    }
    let total_cents = args
        .input
        .iter()
        .try_fold(0u64, |sum, report| sum.checked_add(report.total_cents))
        .ok_or_else(|| TaskError::reject("the reports' total overflows"))?;
    let weeks: Vec<String> = args.input.into_iter().map(|report| report.week).collect();
    ctx.info(&format!(
        "receipt for {} reports ({}) sent to {}: total {}.{:02}",
        weeks.len(),
        weeks.join(", "),
        args.to,
        total_cents / 100,
        total_cents % 100
    ));
    Ok(Receipt {
        to: args.to,
        reports: weeks.len(),
        total_cents,
        weeks,
    })
}
