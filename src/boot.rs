//! The boot, in one readable sequence. Each step names the exit status it
//! ends with when it fails; nothing is restored, written or started before
//! the step that needs it.
//!
//! 1. configuration from the environment, every problem at once (78);
//! 2. PID-1 duties: `/proc`, child subreaper, `/dev/fuse` for the mount
//!    layout (71);
//! 3. signals and the reaper: from here a SIGTERM stops in data-safe order;
//! 4. storage prepared: directories, the rclone config (69);
//! 5. S3 answers: an outage is waited out with backoff; credentials or the
//!    bucket refused (76), `CVM_S3_WAIT` passed (69);
//! 6. rclone started: `rclone rcd`, or the mount (69);
//! 7. the crypt key checked against the bucket prefix, reading only (77);
//! 8. the bucket prefix's lease taken: while another instance holds it,
//!    nothing is restored or written; `CVM_LEASE_WAIT` passed (75);
//! 9. restore: the key-check marker on first use, then the state dir and
//!    the databases. One that cannot succeed while S3 answers exits 65; a
//!    step 6–9 that failed while S3 went away again is undone and the boot
//!    goes back to step 5;
//! 10. the workers that carry changes to S3 (replication, snapshots, lag);
//! 11. supervision (`supervisor`): the gateway started, `READY=1`.

use std::path::Path;

use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::config::{self, Config};
use crate::exit::Status;
use crate::remote::keycheck::KeyCheckError;
use crate::remote::lease::LeaseError;
use crate::remote::probe::{ProbeError, WaitError};
use crate::shutdown;
use crate::sqlite::restore::RestoreError;
use crate::storage::replicate::ReplicateError;
use crate::storage::{Storage, StorageError};
use crate::supervisor::{self, signals::Signals};
use crate::sys::pid1;
use crate::sys::process::Reaper;
use crate::sys::sdnotify;

/// Boots and runs the appliance; returns its exit status.
pub fn appliance() -> Status {
    // 1. Configuration.
    let cfg = match Config::from_env() {
        Ok((cfg, warnings)) => {
            for w in warnings {
                tracing::warn!("{w}");
            }
            cfg
        }
        Err(e) => {
            for p in &e.problems {
                tracing::error!("configuration: {p}");
            }
            tracing::error!(
                "{} configuration problem(s); nothing was started or changed",
                e.problems.len()
            );
            return Status::Config;
        }
    };
    let mode = match (&cfg.s3, cfg.layout) {
        (None, _) => "local (no S3_BUCKET)",
        (Some(_), config::Layout::Replicate) => "s3, replicate layout (local state dir replicated)",
        (Some(_), config::Layout::Mount) => "s3, mount layout (rclone crypt mount)",
    };
    tracing::info!(mode, state_dir = %cfg.state_dir.display(), "configuration ok");

    // 2. PID-1 duties.
    if let Err(e) = pid1_duties(&cfg) {
        tracing::error!("{e}");
        return Status::Os;
    }

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return Status::Failure;
        }
    };
    runtime.block_on(run(cfg))
}

fn pid1_duties(cfg: &Config) -> Result<(), pid1::Pid1Error> {
    pid1::ensure_proc()?;
    if pid1::become_subreaper_unless_pid1()? {
        tracing::info!("not PID 1: running as child subreaper");
    }
    if cfg.s3.is_some() && cfg.layout == config::Layout::Mount {
        pid1::ensure_fuse(Path::new("/dev/fuse"), true)?;
    }
    Ok(())
}

async fn run(cfg: Config) -> Status {
    // 3. Signals and the reaper.
    let reaper = Reaper::default();
    let installed = Signals::install().and_then(|s| Ok((s, signal(SignalKind::child())?)));
    let (mut signals, sigchld) = match installed {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}");
            return Status::Failure;
        }
    };
    tokio::spawn(reaper.clone().run(sigchld));

    // 4. Storage prepared.
    let t = Instant::now();
    sdnotify::status("starting storage");
    let mut storage = match Storage::new(&cfg) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("storage could not start: {e}");
            return Status::StorageUnavailable;
        }
    };

    // 5.–10. Storage started, or a signal first.
    let started = tokio::select! {
        r = start_storage(&cfg, &reaper, &mut storage) => r,
        action = signals.recv() => {
            tracing::info!(?action, "signal during boot");
            return shutdown::run(None, storage, cfg.stop_timeout).await;
        }
    };
    if let Err(e) = started {
        tracing::error!("storage could not start: {e}");
        let status = failure_status(&e);
        if status == Status::Unrestorable {
            tracing::error!(
                "S3 answers, so this restore would fail the same way on every boot: cvm-init exits {} \
                 instead of starting it over. Fix the cause named above, then start again; nothing on S3 \
                 was changed",
                status as u8
            );
        }
        return status.with_stop(shutdown::run(None, storage, cfg.stop_timeout).await);
    }
    tracing::info!(storage = storage.describe(), dir = %cfg.state_dir.display(), took = ?t.elapsed(), "storage ready");

    // 11. Supervision.
    supervisor::run(&cfg, &reaper, &mut signals, storage, t).await
}

/// Steps 5–10 as storage does them, so their order and failure paths are
/// tested with a recording double; [`Booting`] is the real one.
pub(crate) trait StorageSteps {
    async fn wait_for_s3(&mut self, since: Instant) -> Result<(), StorageError>;
    async fn start_rclone(&mut self) -> Result<(), StorageError>;
    async fn check_key(&mut self) -> Result<(), StorageError>;
    async fn acquire_lease(&mut self) -> Result<(), StorageError>;
    async fn restore(&mut self) -> Result<(), StorageError>;
    /// After a failed step: S3's answer if it has gone away meanwhile.
    async fn s3_gone(&mut self) -> Option<ProbeError>;
    /// Ends what the failed steps started.
    async fn undo(&mut self);
    fn start_workers(&mut self);
}

struct Booting<'a> {
    storage: &'a mut Storage,
    reaper: &'a Reaper,
    cfg: &'a Config,
}

impl StorageSteps for Booting<'_> {
    async fn wait_for_s3(&mut self, since: Instant) -> Result<(), StorageError> {
        self.storage.wait_for_s3(self.reaper, since).await
    }
    async fn start_rclone(&mut self) -> Result<(), StorageError> {
        self.storage
            .start_rclone(self.reaper, self.cfg.mount_timeout)
            .await
    }
    async fn check_key(&mut self) -> Result<(), StorageError> {
        self.storage.check_key().await
    }
    async fn acquire_lease(&mut self) -> Result<(), StorageError> {
        self.storage.acquire_lease(&self.cfg.lease).await
    }
    async fn restore(&mut self) -> Result<(), StorageError> {
        self.storage.restore().await
    }
    async fn s3_gone(&mut self) -> Option<ProbeError> {
        self.storage.s3_gone(self.reaper).await
    }
    async fn undo(&mut self) {
        self.storage.undo_boot().await;
    }
    fn start_workers(&mut self) {
        self.storage.start_workers();
    }
}

/// Steps 5–10. Cancel-safe: what was started is in `storage`, and the
/// shutdown stops it.
async fn start_storage(
    cfg: &Config,
    reaper: &Reaper,
    storage: &mut Storage,
) -> Result<(), StorageError> {
    storage_steps(Booting {
        storage,
        reaper,
        cfg,
    })
    .await
}

pub(crate) async fn storage_steps(mut s: impl StorageSteps) -> Result<(), StorageError> {
    let since = Instant::now();
    loop {
        // 5. S3 answers.
        s.wait_for_s3(since).await?;
        let steps = async {
            // 6. rclone started.
            s.start_rclone().await?;
            // 7. The crypt key checked: before anything is written.
            s.check_key().await?;
            // 8. The lease: before anything is restored or written.
            s.acquire_lease().await?;
            // 9. Restore.
            s.restore().await
        };
        let Err(e) = steps.await else {
            break;
        };
        match s.s3_gone().await {
            Some(gone) => {
                tracing::warn!("the boot failed while S3 went away again ({gone}): {e}; undoing it and waiting for S3");
                s.undo().await;
            }
            None => return Err(e),
        }
    }
    // 10. The workers.
    s.start_workers();
    Ok(())
}

/// The exit status for a boot that failed with `e`. Storage reports an error
/// only once S3 has answered after it (an outage is waited out), so a
/// restore that failed is one that would fail again.
fn failure_status(e: &StorageError) -> Status {
    match e {
        StorageError::KeyCheck(KeyCheckError::WrongKey { .. }) => Status::WrongKey,
        StorageError::S3(WaitError::Permanent(
            ProbeError::CredentialsRejected { .. }
            | ProbeError::BucketMissing { .. }
            | ProbeError::Misdirected { .. },
        )) => Status::S3Rejected,
        StorageError::Lease(LeaseError::Busy { .. }) => Status::LeaseBusy,
        StorageError::Replicate(ReplicateError::Restore { .. })
        | StorageError::Restore(RestoreError::Fetch { .. } | RestoreError::Corrupt { .. }) => {
            Status::Unrestorable
        }
        _ => Status::StorageUnavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    /// Records each step; `fail` names the steps that fail, in order, each
    /// once; `gone` says whether S3 has gone away after each failure.
    #[derive(Default)]
    struct Recording {
        log: Vec<&'static str>,
        fail: Vec<&'static str>,
        gone: Vec<bool>,
    }

    impl Recording {
        fn step(&mut self, name: &'static str) -> Result<(), StorageError> {
            self.log.push(name);
            if self.fail.first() == Some(&name) {
                self.fail.remove(0);
                return Err(match name {
                    "key" => StorageError::KeyCheck(KeyCheckError::WrongKey {
                        raw: "s3:b/p".into(),
                    }),
                    _ => StorageError::Replicate(ReplicateError::Stalled(Duration::from_secs(10))),
                });
            }
            Ok(())
        }
    }

    impl StorageSteps for &mut Recording {
        async fn wait_for_s3(&mut self, _: Instant) -> Result<(), StorageError> {
            self.step("wait")
        }
        async fn start_rclone(&mut self) -> Result<(), StorageError> {
            self.step("rclone")
        }
        async fn check_key(&mut self) -> Result<(), StorageError> {
            self.step("key")
        }
        async fn acquire_lease(&mut self) -> Result<(), StorageError> {
            self.step("lease")
        }
        async fn restore(&mut self) -> Result<(), StorageError> {
            self.step("restore")
        }
        async fn s3_gone(&mut self) -> Option<ProbeError> {
            self.log.push("probe");
            self.gone.remove(0).then(|| ProbeError::Unreachable {
                endpoint: "http://s3".into(),
                detail: "connection refused".into(),
            })
        }
        async fn undo(&mut self) {
            self.log.push("undo");
        }
        fn start_workers(&mut self) {
            self.log.push("workers");
        }
    }

    #[tokio::test]
    async fn storage_boots_in_order_and_a_failure_while_s3_is_gone_is_waited_out() {
        // (failing steps, S3 gone after each failure, boot ok, steps taken)
        type Row = (
            &'static [&'static str],
            &'static [bool],
            bool,
            &'static [&'static str],
        );
        let table: [Row; 5] = [
            (
                &[],
                &[],
                true,
                &["wait", "rclone", "key", "lease", "restore", "workers"],
            ),
            // A wrong key while S3 answers: no lease taken, nothing restored, no workers.
            (
                &["key"],
                &[false],
                false,
                &["wait", "rclone", "key", "probe"],
            ),
            // Another holder past CVM_LEASE_WAIT: nothing restored.
            (
                &["lease"],
                &[false],
                false,
                &["wait", "rclone", "key", "lease", "probe"],
            ),
            // A restore that failed while S3 went away: undone, back to waiting.
            (
                &["restore"],
                &[true],
                true,
                &[
                    "wait", "rclone", "key", "lease", "restore", "probe", "undo", "wait", "rclone",
                    "key", "lease", "restore", "workers",
                ],
            ),
            // One that fails while S3 answers is the state's: the boot fails.
            (
                &["restore"],
                &[false],
                false,
                &["wait", "rclone", "key", "lease", "restore", "probe"],
            ),
        ];
        for (fail, gone, ok, want) in table {
            let mut r = Recording {
                fail: fail.to_vec(),
                gone: gone.to_vec(),
                ..Recording::default()
            };
            let result = storage_steps(&mut r).await;
            assert_eq!(result.is_ok(), ok, "{fail:?}: {result:?}");
            assert_eq!(r.log, want, "{fail:?}");
        }
    }

    #[test]
    fn boot_failures_map_to_documented_statuses() {
        let restore = || ReplicateError::Restore {
            dir: PathBuf::from("/data/openclaw"),
            detail: "no space left on device".into(),
            missing: vec!["a".into()],
        };
        let table: Vec<(StorageError, Status)> = vec![
            (StorageError::Replicate(restore()), Status::Unrestorable),
            (
                StorageError::Restore(RestoreError::Fetch {
                    exit: "exit code 1".into(),
                    stderr: String::new(),
                }),
                Status::Unrestorable,
            ),
            (
                StorageError::Replicate(ReplicateError::Stalled(Duration::from_secs(10))),
                Status::StorageUnavailable,
            ),
            (
                StorageError::Killed(crate::rclone::session::Killed),
                Status::StorageUnavailable,
            ),
            (
                StorageError::KeyCheck(KeyCheckError::WrongKey {
                    raw: "s3:b/p".into(),
                }),
                Status::WrongKey,
            ),
            (
                StorageError::S3(WaitError::Permanent(ProbeError::BucketMissing {
                    endpoint: "http://s3".into(),
                    bucket: "b".into(),
                })),
                Status::S3Rejected,
            ),
        ];
        for (e, want) in table {
            assert_eq!(failure_status(&e), want, "{e}");
        }
    }
}
