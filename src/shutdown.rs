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
use crate::storage::{FlushError, Storage, StorageError};
use crate::sys::process::Child;
use crate::sys::sdnotify;

/// Share of the budget the gateway gets to exit after SIGTERM.
const GATEWAY_SHARE: f64 = 0.5;
/// Point of the budget by which uploads must have drained; the rest is for stopping rclone.
const FLUSH_SHARE: f64 = 0.85;

/// What the stop acts on, so its order and failure paths are tested with a
/// recording double; [`Machine`] is the real one.
pub(crate) trait Stoppable {
    /// Stops the gateway within `grace`, if it runs.
    async fn stop_gateway(&mut self, grace: Duration);
    async fn flush(&mut self, deadline: Instant) -> Result<(), FlushError>;
    async fn stop_storage(self, deadline: Instant) -> Result<(), StorageError>;
    fn describe(&self) -> &'static str;
}

/// The gateway and storage of this machine.
struct Machine {
    gateway: Option<Child>,
    storage: Storage,
}

impl Stoppable for Machine {
    async fn stop_gateway(&mut self, grace: Duration) {
        if let Some(gw) = self.gateway.as_mut() {
            let t = Instant::now();
            let (exit, killed) = gateway::stop(gw, grace).await;
            tracing::info!(%exit, killed, took = ?t.elapsed(), "shutdown: gateway stopped");
        }
    }

    async fn flush(&mut self, deadline: Instant) -> Result<(), FlushError> {
        self.storage.flush(deadline).await
    }

    async fn stop_storage(self, deadline: Instant) -> Result<(), StorageError> {
        self.storage.stop(deadline).await
    }

    fn describe(&self) -> &'static str {
        self.storage.describe()
    }
}

/// Stops `gateway` and `storage` in data-safe order within `budget`.
pub async fn run(gateway: Option<Child>, storage: Storage, budget: Duration) -> Status {
    sdnotify::stopping();
    let status = sequence(Machine { gateway, storage }, budget).await;
    nix::unistd::sync();
    status
}

/// Steps 1–3; step 4 is the caller's.
pub(crate) async fn sequence(mut m: impl Stoppable, budget: Duration) -> Status {
    let start = Instant::now();
    let deadline = start + budget;
    tracing::info!(?budget, "shutdown: begin");
    let mut status = Status::Clean;

    m.stop_gateway(budget.mul_f64(GATEWAY_SHARE)).await;

    sdnotify::status("stopping: flushing state to storage");
    let t = Instant::now();
    match m.flush(start + budget.mul_f64(FLUSH_SHARE)).await {
        Ok(()) => {
            tracing::info!(took = ?t.elapsed(), storage = m.describe(), "shutdown: state flushed")
        }
        Err(e) => {
            tracing::error!(took = ?t.elapsed(), "shutdown: NOT everything was flushed: {e}");
            status = Status::NotFlushed;
        }
    }

    sdnotify::status("stopping: releasing storage");
    let t = Instant::now();
    match m.stop_storage(deadline).await {
        Ok(()) => tracing::info!(took = ?t.elapsed(), "shutdown: storage stopped"),
        Err(e) => {
            tracing::error!(took = ?t.elapsed(), "shutdown: stopping storage failed: {e}");
            status = Status::NotFlushed;
        }
    }
    tracing::info!(took = ?start.elapsed(), ?status, "shutdown: done");
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// Records the steps with the share of the budget each got.
    struct Recording {
        log: Rc<RefCell<Vec<String>>>,
        start: Instant,
        flush_fails: bool,
        stop_fails: bool,
    }

    impl Recording {
        fn note(&self, step: &str, by: Instant) {
            let share = (by - self.start).as_secs_f64() / 10.0;
            self.log.borrow_mut().push(format!("{step} {share:.2}"));
        }
    }

    impl Stoppable for Recording {
        async fn stop_gateway(&mut self, grace: Duration) {
            self.note("gateway", self.start + grace);
        }
        async fn flush(&mut self, deadline: Instant) -> Result<(), FlushError> {
            self.note("flush", deadline);
            match self.flush_fails {
                true => Err(FlushError::NoRclone),
                false => Ok(()),
            }
        }
        async fn stop_storage(self, deadline: Instant) -> Result<(), StorageError> {
            self.note("storage", deadline);
            match self.stop_fails {
                true => Err(StorageError::Killed(crate::rclone::session::Killed)),
                false => Ok(()),
            }
        }
        fn describe(&self) -> &'static str {
            "recording"
        }
    }

    #[tokio::test]
    async fn gateway_then_flush_then_storage_each_within_its_share_and_failures_do_not_skip_steps()
    {
        for (flush_fails, stop_fails, want) in [
            (false, false, Status::Clean),
            (true, false, Status::NotFlushed),
            (false, true, Status::NotFlushed),
            (true, true, Status::NotFlushed),
        ] {
            let log = Rc::new(RefCell::new(Vec::new()));
            let m = Recording {
                log: log.clone(),
                start: Instant::now(),
                flush_fails,
                stop_fails,
            };
            let status = sequence(m, Duration::from_secs(10)).await;
            assert_eq!(
                status, want,
                "flush fails {flush_fails}, stop fails {stop_fails}"
            );
            assert_eq!(
                *log.borrow(),
                ["gateway 0.50", "flush 0.85", "storage 1.00"]
            );
        }
    }
}
