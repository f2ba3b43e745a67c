//! The error every storage contract (broker, result backend, stores) returns.
//!
//! One type for all of them because their failures are the same few kinds, and a caller's
//! response depends on the kind, not on which contract failed: fix the input, retry later,
//! or accept that a lease was lost.

use std::time::Duration;

use crate::envelope::EnvelopeError;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The adapter could not open or reach its storage; the message names the location.
    #[error("cannot open {location}: {reason}")]
    Open { location: String, reason: String },
    /// A broker refused an envelope that would break its guarantees.
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(#[from] EnvelopeError),
    /// An ack, nack, extension or dead-lettering came after the delivery's lease ran out and
    /// the entry was delivered again (or is gone). The entry was left alone.
    #[error("the lease on queue entry {0} was lost: it expired and the entry was delivered again")]
    LeaseLost(String),
    /// The record an operation needs does not exist (or has expired).
    #[error("{0} not found")]
    NotFound(String),
    /// A stored record could not be read back.
    #[error("stored {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error(transparent)]
    /// SQLite or Postgres.
    Sql(#[from] sqlx::Error),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl StorageError {
    /// Whether the storage refused what was written (other writes would go through), rather
    /// than being unreachable, slow or unwell: only then is it worth writing a batch's items
    /// one by one to find the one refused.
    pub fn refuses_the_data(&self) -> bool {
        match self {
            StorageError::InvalidEnvelope(_) | StorageError::Corrupt { .. } => true,
            StorageError::Sql(sqlx::Error::Database(error)) => {
                use sqlx::error::ErrorKind;
                // SQLSTATE (five characters; SQLite's codes are numbers) classes: 22 data
                // exception (NUL in text), 23 integrity, 54 limits.
                let code_refuses = error.code().is_some_and(|code| {
                    code.len() == 5 && ["22", "23", "54"].iter().any(|c| code.starts_with(c))
                });
                code_refuses
                    || matches!(
                        error.kind(),
                        ErrorKind::UniqueViolation
                            | ErrorKind::ForeignKeyViolation
                            | ErrorKind::NotNullViolation
                            | ErrorKind::CheckViolation
                    )
            }
            _ => false,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl ToString) -> StorageError {
        StorageError::Corrupt {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// A background job that runs every `interval` until this guard is dropped.
pub(crate) struct Periodic(tokio::task::JoinHandle<()>);

impl Periodic {
    pub(crate) fn spawn<F, Fut>(interval: Duration, mut job: F) -> Periodic
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        Periodic(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                job().await;
            }
        }))
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A background task that runs until this guard is dropped.
pub(crate) struct Background(tokio::task::JoinHandle<()>);

impl Background {
    pub(crate) fn spawn(
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Background {
        Background(tokio::spawn(task))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}
