//! The data-safe stop, in one readable sequence. Each step has a share of
//! `CVM_STOP_TIMEOUT` and logs how long it took:
//!
//! 1. gateway: SIGTERM to its process group, SIGKILL at half the budget;
//! 2. flush: storage makes every write durable, until 85% of the budget: the
//!    final SQLite snapshots uploaded, then rclone's queue drained to S3;
//! 3. storage stop: rclone stopped and the mount released, by the deadline;
//! 4. `sync()`.

use std::time::Duration;

use tokio::time::Instant;

use crate::exit::Status;
use crate::gateway;
use crate::storage::Storage;
use crate::sys::process::Child;
use crate::sys::sdnotify;

/// Share of the budget the gateway gets to exit after SIGTERM.
const GATEWAY_SHARE: f64 = 0.5;
/// Point of the budget by which uploads must have drained; the rest is for stopping rclone.
const FLUSH_SHARE: f64 = 0.85;

pub async fn run(gateway: Option<Child>, mut storage: Storage, budget: Duration) -> Status {
    let start = Instant::now();
    let deadline = start + budget;
    sdnotify::stopping();
    tracing::info!(?budget, "shutdown: begin");
    let mut status = Status::Clean;

    if let Some(mut gw) = gateway {
        let t = Instant::now();
        let (exit, killed) = gateway::stop(&mut gw, budget.mul_f64(GATEWAY_SHARE)).await;
        tracing::info!(%exit, killed, took = ?t.elapsed(), "shutdown: gateway stopped");
    }

    sdnotify::status("stopping: flushing state to storage");
    let t = Instant::now();
    match storage.flush(start + budget.mul_f64(FLUSH_SHARE)).await {
        Ok(()) => {
            tracing::info!(took = ?t.elapsed(), storage = storage.describe(), "shutdown: state flushed")
        }
        Err(e) => {
            tracing::error!(took = ?t.elapsed(), "shutdown: NOT everything was flushed: {e}");
            status = Status::NotFlushed;
        }
    }

    sdnotify::status("stopping: releasing storage");
    let t = Instant::now();
    match storage.stop(deadline).await {
        Ok(()) => tracing::info!(took = ?t.elapsed(), "shutdown: storage stopped"),
        Err(e) => {
            tracing::error!(took = ?t.elapsed(), "shutdown: stopping storage failed: {e}");
            status = Status::NotFlushed;
        }
    }

    nix::unistd::sync();
    tracing::info!(took = ?start.elapsed(), ?status, "shutdown: done");
    status
}
