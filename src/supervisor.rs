//! Boot and supervision: storage first, then the gateway, restarted with
//! backoff while storage serves; signals decide when to stop.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, Signal as SignalStream, SignalKind};
use tokio::time::{sleep_until, Instant};

use crate::config::Config;
use crate::exit::Status;
use crate::gateway::{self, SpawnError};
use crate::keycheck::KeyCheckError;
use crate::notify;
use crate::process::{Child, Reaper};
use crate::s3probe::{jitter_unit, Backoff, ProbeError, WaitError};
use crate::shutdown;
use crate::storage::{Event as StorageEvent, Storage, StorageError};

/// What a signal means to PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignalAction {
    /// Stop everything, in data-safe order.
    Shutdown(Signal),
    /// Pass it on to the gateway's process group.
    Forward(Signal),
}

/// PID 1 gets no default signal actions (facts.md §4): everything it obeys is listed here.
const SIGNALS: [SignalAction; 6] = [
    SignalAction::Shutdown(Signal::SIGTERM),
    SignalAction::Shutdown(Signal::SIGINT),
    SignalAction::Shutdown(Signal::SIGQUIT),
    SignalAction::Forward(Signal::SIGHUP),
    SignalAction::Forward(Signal::SIGUSR1),
    SignalAction::Forward(Signal::SIGUSR2),
];

struct Signals {
    streams: Vec<(SignalAction, SignalStream)>,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        let streams = SIGNALS
            .iter()
            .map(|&a| {
                let (SignalAction::Shutdown(s) | SignalAction::Forward(s)) = a;
                signal(SignalKind::from_raw(s as i32)).map(|st| (a, st))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { streams })
    }

    /// The next signal received. Cancel-safe.
    async fn recv(&mut self) -> SignalAction {
        std::future::poll_fn(|cx| {
            for (action, stream) in &mut self.streams {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*action);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// Storage that fails again within this long of a recovery counts as failing in a row.
const STORAGE_STEADY: Duration = Duration::from_secs(60);
/// Storage failures in a row (a failure within `STORAGE_STEADY` of the last
/// recovery, or a recovery that failed) at which cvm-init exits 69.
const STORAGE_MAX_QUICK_FAILURES: u32 = 5;

/// The exit status for a boot that failed with `e`. Storage::boot returns
/// an error only once S3 has answered after it (an outage is waited out),
/// so a restore that failed is one that would fail again.
fn boot_failure_status(e: &StorageError) -> Status {
    use crate::restore::RestoreError;
    use crate::storage::replicate::ReplicateError;
    match e {
        StorageError::KeyCheck(KeyCheckError::WrongKey { .. }) => Status::WrongKey,
        StorageError::S3(WaitError::Permanent(
            ProbeError::CredentialsRejected { .. }
            | ProbeError::BucketMissing { .. }
            | ProbeError::Misdirected { .. },
        )) => Status::S3Rejected,
        StorageError::Replicate(ReplicateError::Restore { .. })
        | StorageError::Restore(RestoreError::Fetch { .. } | RestoreError::Corrupt { .. }) => {
            Status::Unrestorable
        }
        _ => Status::StorageUnavailable,
    }
}

/// Runs `fut` to its end unless a shutdown signal comes first. A signal to
/// forward meanwhile goes to `gateway` if it runs (the replicate layout keeps
/// it running while storage recovers), else is dropped.
async fn until_shutdown<F: std::future::Future>(
    signals: &mut Signals,
    gateway: Option<&Child>,
    fut: F,
) -> Result<F::Output, Signal> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Ok(out),
            action = signals.recv() => match (action, gateway) {
                (SignalAction::Shutdown(sig), _) => return Err(sig),
                (SignalAction::Forward(sig), Some(child)) => {
                    if let Err(e) = child.signal_group(sig) {
                        tracing::warn!(signal = %sig, error = %e, "cannot forward");
                    }
                }
                (SignalAction::Forward(sig), None) => {
                    tracing::info!(signal = %sig, "gateway not running; signal dropped");
                }
            },
        }
    }
}

/// The gateway is either running or waiting out its restart delay.
enum Gateway {
    Running { child: Child, since: Instant },
    Backoff { until: Instant },
}

impl Gateway {
    fn child(&self) -> Option<&Child> {
        match self {
            Gateway::Running { child, .. } => Some(child),
            Gateway::Backoff { .. } => None,
        }
    }

    /// The running gateway, if any, for the shutdown to stop.
    fn into_child(self) -> Option<Child> {
        match self {
            Gateway::Running { child, .. } => Some(child),
            Gateway::Backoff { .. } => None,
        }
    }
}

/// Boots storage and the gateway and supervises them until a shutdown
/// signal or a failure; returns the exit status.
pub async fn run(cfg: Config, reaper: Reaper) -> anyhow::Result<Status> {
    let mut signals = Signals::install()?;
    tokio::spawn(reaper.clone().run(signal(SignalKind::child())?));

    let t = Instant::now();
    notify::status("starting storage");
    let mut storage = match Storage::new(&cfg) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("storage could not start: {e}");
            return Ok(Status::StorageUnavailable);
        }
    };
    tokio::select! {
        r = storage.boot(&reaper, cfg.mount_timeout) => {
            if let Err(e) = r {
                tracing::error!("storage could not start: {e}");
                let status = boot_failure_status(&e);
                if status == Status::Unrestorable {
                    tracing::error!(
                        "S3 answers, so this restore would fail the same way on every boot: cvm-init exits {} \
                         instead of starting it over. Fix the cause named above, then start again; nothing on S3 \
                         was changed",
                        status as u8
                    );
                }
                shutdown::run(None, storage, cfg.stop_timeout).await;
                return Ok(status);
            }
        }
        action = signals.recv() => {
            tracing::info!(?action, "signal during boot");
            return Ok(shutdown::run(None, storage, cfg.stop_timeout).await);
        }
    }
    tracing::info!(storage = storage.describe(), dir = %cfg.state_dir.display(), took = ?t.elapsed(), "storage ready");

    let mut delay: Option<Duration> = None;
    let mut failed_starts = 0u32;
    let mut announced = false;
    let mut quick_failures = 0u32;
    let mut last_recovery = Instant::now();
    let mut state = Gateway::Backoff {
        until: Instant::now(),
    };
    loop {
        if let Gateway::Backoff { until } = state {
            if Instant::now() >= until {
                if let Err(e) = storage.before_gateway() {
                    tracing::error!("cannot prepare the state dir for the gateway: {e}");
                    shutdown::run(None, storage, cfg.stop_timeout).await;
                    return Ok(Status::StorageUnavailable);
                }
                match gateway::spawn(&reaper, &cfg.gateway_cmd, &cfg.state_dir) {
                    Ok(child) => {
                        tracing::info!(pid = child.pid().as_raw(), cmd = ?cfg.gateway_cmd, "gateway started");
                        if !announced {
                            tracing::info!(took = ?t.elapsed(), "ready");
                            notify::ready();
                            announced = true;
                        }
                        state = Gateway::Running {
                            child,
                            since: Instant::now(),
                        };
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        let status = match e {
                            SpawnError::NotFound { .. } => Status::GatewayNotFound,
                            SpawnError::NotExecutable { .. } => Status::GatewayNotExecutable,
                            SpawnError::Other { .. } => Status::Failure,
                        };
                        shutdown::run(None, storage, cfg.stop_timeout).await;
                        return Ok(status);
                    }
                }
            }
        }

        tokio::select! {
            action = signals.recv() => match (action, &mut state) {
                (SignalAction::Shutdown(sig), _) => {
                    tracing::info!(signal = %sig, "shutting down");
                    let gw = state.into_child();
                    return Ok(shutdown::run(gw, storage, cfg.stop_timeout).await);
                }
                (SignalAction::Forward(sig), Gateway::Running { child, .. }) => {
                    tracing::info!(signal = %sig, "forwarding to the gateway");
                    if let Err(e) = child.signal_group(sig) {
                        tracing::warn!(signal = %sig, error = %e, "cannot forward");
                    }
                }
                (SignalAction::Forward(sig), Gateway::Backoff { .. }) => {
                    tracing::info!(signal = %sig, "gateway not running; signal dropped");
                }
            },
            event = async {
                match &mut state {
                    Gateway::Running { child, since } => Some((child.wait().await, since.elapsed())),
                    Gateway::Backoff { until } => { sleep_until(*until).await; None }
                }
            } => {
                // `None`: the backoff is over and the loop head starts the gateway.
                if let Some((exit, ran_for)) = event {
                    failed_starts = if ran_for < gateway::FAILED_START { failed_starts + 1 } else { 0 };
                    let limit = cfg.restart.max_failed_starts;
                    if limit > 0 && failed_starts >= limit {
                        tracing::error!(
                            %exit, failed_starts,
                            "the gateway failed {failed_starts} starts in a row (each ended within {:?}); giving up \
                             instead of looping: its own output above says why",
                            gateway::FAILED_START
                        );
                        shutdown::run(None, storage, cfg.stop_timeout).await;
                        return Ok(Status::GatewayFailing);
                    }
                    let next = gateway::next_delay(&cfg.restart, delay, ran_for);
                    delay = Some(next);
                    tracing::warn!(%exit, ?ran_for, restart_in = ?next, "gateway exited; restarting");
                    notify::status(&format!("gateway exited ({exit}); restarting in {next:?}"));
                    state = Gateway::Backoff { until: Instant::now() + next };
                }
            }
            event = storage.next_event() => match event {
                StorageEvent::Pause(dbs) => {
                    // Only a running gateway can have put them there; moving a
                    // database it has open would lose writes, so stop it first.
                    if let Gateway::Running { child, .. } = &mut state {
                        tracing::warn!(?dbs, "databases appeared on the mount; restarting the gateway to move them to local disk");
                        let (exit, _) = gateway::stop(child, cfg.stop_timeout / 2).await;
                        tracing::info!(%exit, "gateway stopped for the move");
                    }
                    state = Gateway::Backoff { until: Instant::now() };
                }
                StorageEvent::Failed(failure) => {
                    quick_failures = if last_recovery.elapsed() < STORAGE_STEADY { quick_failures + 1 } else { 1 };
                    if quick_failures >= STORAGE_MAX_QUICK_FAILURES {
                        tracing::error!(
                            "{failure}: failure {quick_failures} in a row, each within {STORAGE_STEADY:?} of the \
                             last recovery; giving up: the log above says why rclone keeps failing"
                        );
                        let gw = state.into_child();
                        shutdown::run(gw, storage, cfg.stop_timeout).await;
                        return Ok(Status::StorageUnavailable);
                    }
                    notify::status(&format!("storage failed ({failure}); recovering"));
                    if storage.recovery_stops_gateway() {
                        tracing::error!("{failure}; stopping the gateway so nothing writes to the bare directory, then remounting");
                        if let Gateway::Running { child, .. } = &mut state {
                            let (exit, _) = gateway::stop(child, cfg.stop_timeout / 2).await;
                            tracing::info!(%exit, "gateway stopped for the remount");
                        }
                        state = Gateway::Backoff { until: Instant::now() };
                    } else {
                        tracing::error!("{failure}; restarting it (the gateway keeps running on local disk)");
                    }
                    let mut backoff = Backoff::default();
                    loop {
                        let attempt = until_shutdown(&mut signals, state.child(), storage.recover(&reaper, cfg.mount_timeout)).await;
                        let e = match attempt {
                            Ok(Ok(())) => break,
                            Ok(Err(e)) => e,
                            Err(sig) => {
                                tracing::info!(signal = %sig, "shutting down during the recovery");
                                let gw = state.into_child();
                                return Ok(shutdown::run(gw, storage, cfg.stop_timeout).await);
                            }
                        };
                        quick_failures += 1;
                        if quick_failures >= STORAGE_MAX_QUICK_FAILURES {
                            tracing::error!("storage could not be recovered: {e}; giving up after {quick_failures} failures in a row");
                            let gw = state.into_child();
                            shutdown::run(gw, storage, cfg.stop_timeout).await;
                            return Ok(Status::StorageUnavailable);
                        }
                        let delay = backoff.next(jitter_unit());
                        tracing::error!(retry_in = ?delay, "storage could not be recovered: {e}");
                        if let Err(sig) = until_shutdown(&mut signals, state.child(), tokio::time::sleep(delay)).await {
                            tracing::info!(signal = %sig, "shutting down during the recovery");
                            let gw = state.into_child();
                            return Ok(shutdown::run(gw, storage, cfg.stop_timeout).await);
                        }
                    }
                    last_recovery = Instant::now();
                    tracing::warn!(storage = storage.describe(), "storage recovered");
                    notify::status("running");
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::RestoreError;
    use crate::storage::replicate::ReplicateError;
    use std::path::PathBuf;

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
            (StorageError::Killed, Status::StorageUnavailable),
            (
                StorageError::S3(WaitError::Permanent(ProbeError::BucketMissing {
                    endpoint: "http://s3".into(),
                    bucket: "b".into(),
                })),
                Status::S3Rejected,
            ),
        ];
        for (e, want) in table {
            assert_eq!(boot_failure_status(&e), want, "{e}");
        }
    }
}
