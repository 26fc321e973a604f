//! Supervision, after the boot: the gateway runs, and is restarted with
//! backoff while storage serves; storage that fails is recovered; a signal
//! or a failure ends the run. `policy` decides each next step; this loop
//! only acts on it. Every way out goes through [`finish`]: the data-safe
//! stop, and one combined exit status.

pub mod policy;
pub mod signals;

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::{sleep_until, Instant};

use crate::backoff::jitter_unit;
use crate::config::Config;
use crate::exit::Status;
use crate::gateway;
use crate::shutdown;
use crate::storage::{Event as StorageEvent, Storage, StorageFailure};
use crate::sys::process::{Child, Reaper};
use crate::sys::sdnotify;
use policy::{Action, Event, Policy};
use signals::{SignalAction, Signals};

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

    /// Stops a running gateway (for a remount or a database move); the next
    /// start is due at once.
    async fn pause(&mut self, grace: Duration, why: &str) {
        if let Gateway::Running { child, .. } = self {
            let (exit, _) = gateway::stop(child, grace).await;
            tracing::info!(%exit, "gateway stopped {why}");
        }
        *self = Gateway::Backoff {
            until: Instant::now(),
        };
    }
}

/// Ends the run for `reason`: the data-safe stop, then the status of both.
async fn finish(reason: Status, gateway: Gateway, storage: Storage, cfg: &Config) -> Status {
    reason.with_stop(shutdown::run(gateway.into_child(), storage, cfg.stop_timeout).await)
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
            action = signals.recv() => match action {
                SignalAction::Shutdown(sig) => return Err(sig),
                SignalAction::Forward(sig) => forward(gateway, sig),
            },
        }
    }
}

fn forward(gateway: Option<&Child>, sig: Signal) {
    match gateway {
        Some(child) => {
            tracing::info!(signal = %sig, "forwarding to the gateway");
            if let Err(e) = child.signal_group(sig) {
                tracing::warn!(signal = %sig, error = %e, "cannot forward");
            }
        }
        None => tracing::info!(signal = %sig, "gateway not running; signal dropped"),
    }
}

/// Starts the gateway on booted `storage` and supervises both until a
/// shutdown signal or a failure; returns the exit status.
pub async fn run(
    cfg: &Config,
    reaper: &Reaper,
    signals: &mut Signals,
    mut storage: Storage,
    booted: Instant,
) -> Status {
    let mut policy = Policy::new(cfg.restart, Instant::now());
    let mut announced = false;
    let mut gw = Gateway::Backoff {
        until: Instant::now(),
    };
    loop {
        if let Gateway::Backoff { until } = gw {
            if Instant::now() >= until {
                if let Err(e) = storage.before_gateway() {
                    tracing::error!("cannot prepare the state dir for the gateway: {e}");
                    return finish(Status::StorageUnavailable, gw, storage, cfg).await;
                }
                match gateway::spawn(reaper, &cfg.gateway_cmd, &cfg.state_dir) {
                    Ok(child) => {
                        tracing::info!(pid = child.pid().as_raw(), cmd = ?cfg.gateway_cmd, "gateway started");
                        if !announced {
                            tracing::info!(took = ?booted.elapsed(), "ready");
                            sdnotify::ready();
                            announced = true;
                        }
                        gw = Gateway::Running {
                            child,
                            since: Instant::now(),
                        };
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        let status = policy::spawn_failure_status(&e);
                        return finish(status, gw, storage, cfg).await;
                    }
                }
            }
        }

        tokio::select! {
            action = signals.recv() => match action {
                SignalAction::Shutdown(sig) => {
                    tracing::info!(signal = %sig, "shutting down");
                    return finish(Status::Clean, gw, storage, cfg).await;
                }
                SignalAction::Forward(sig) => forward(gw.child(), sig),
            },
            exited = async {
                match &mut gw {
                    Gateway::Running { child, since } => Some((child.wait().await, since.elapsed())),
                    Gateway::Backoff { until } => { sleep_until(*until).await; None }
                }
            } => {
                // `None`: the backoff is over and the loop head starts the gateway.
                let Some((exit, ran_for)) = exited else { continue };
                gw = Gateway::Backoff { until: Instant::now() };
                match policy.decide(Event::GatewayExited { ran_for }, Instant::now()) {
                    Action::RestartGateway { after } => {
                        tracing::warn!(%exit, ?ran_for, restart_in = ?after, "gateway exited; restarting");
                        sdnotify::status(&format!("gateway exited ({exit}); restarting in {after:?}"));
                        gw = Gateway::Backoff { until: Instant::now() + after };
                    }
                    action => {
                        let n = policy.failed_starts();
                        tracing::error!(
                            %exit,
                            "the gateway failed {n} starts in a row (each ended within {:?}); giving up instead \
                             of looping: its own output above says why",
                            policy::FAILED_START
                        );
                        return finish(stop_status(action), gw, storage, cfg).await;
                    }
                }
            }
            event = storage.next_event() => match event {
                StorageEvent::Pause(dbs) => {
                    // Only a running gateway can have put them there; moving a
                    // database it has open would lose writes, so stop it first.
                    tracing::warn!(?dbs, "databases appeared on the mount; restarting the gateway to move them to local disk");
                    gw.pause(cfg.stop_timeout / 2, "for the move").await;
                }
                StorageEvent::Failed(failure) => {
                    let event = match failure {
                        StorageFailure::LeaseLost(_) => Event::LeaseLost,
                        StorageFailure::WorkerDied { .. } => Event::StorageFailed { recoverable: false },
                        _ => Event::StorageFailed { recoverable: true },
                    };
                    let action = policy.decide(event, Instant::now());
                    if action != Action::Recover {
                        if let StorageFailure::LeaseLost(_) = failure {
                            tracing::error!(
                                "{failure}: stopping the gateway and uploading nothing more; the state dir is kept \
                                 as it is (what it holds that is not on S3 is named below)"
                            );
                        } else {
                            let n = policy.storage_failures();
                            tracing::error!(
                                "{failure}: giving up ({n} failure(s) in a row, each within {:?} of the last \
                                 recovery, or a failure no recovery can fix): the log above says why",
                                policy::STORAGE_STEADY
                            );
                        }
                        return finish(stop_status(action), gw, storage, cfg).await;
                    }
                    sdnotify::status(&format!("storage failed ({failure}); recovering"));
                    if storage.recovery_stops_gateway() {
                        tracing::error!("{failure}; stopping the gateway so nothing writes to the bare directory, then remounting");
                        gw.pause(cfg.stop_timeout / 2, "for the remount").await;
                    } else {
                        tracing::error!("{failure}; restarting it (the gateway keeps running on local disk)");
                    }
                    if let Err(status) = recover(cfg, reaper, signals, &mut policy, &mut storage, &gw).await {
                        return finish(status, gw, storage, cfg).await;
                    }
                    tracing::warn!(storage = storage.describe(), "storage recovered");
                    sdnotify::status("running");
                }
            },
        }
    }
}

/// Brings storage back, retrying as `policy` says; `Err` is the status to
/// stop with (a shutdown signal, or too many failures).
async fn recover(
    cfg: &Config,
    reaper: &Reaper,
    signals: &mut Signals,
    policy: &mut Policy,
    storage: &mut Storage,
    gw: &Gateway,
) -> Result<(), Status> {
    loop {
        let attempt = storage.recover(reaper, cfg.mount_timeout);
        let e = match until_shutdown(signals, gw.child(), attempt).await {
            Ok(Ok(())) => {
                policy.decide(Event::Recovered, Instant::now());
                return Ok(());
            }
            Ok(Err(e)) => e,
            Err(sig) => {
                tracing::info!(signal = %sig, "shutting down during the recovery");
                return Err(Status::Clean);
            }
        };
        let event = Event::RecoveryFailed {
            jitter: jitter_unit(),
        };
        match policy.decide(event, Instant::now()) {
            Action::RetryRecovery { after } => {
                tracing::error!(retry_in = ?after, "storage could not be recovered: {e}");
                let wait = tokio::time::sleep(after);
                if let Err(sig) = until_shutdown(signals, gw.child(), wait).await {
                    tracing::info!(signal = %sig, "shutting down during the recovery");
                    return Err(Status::Clean);
                }
            }
            action => {
                let n = policy.storage_failures();
                tracing::error!(
                    "storage could not be recovered: {e}; giving up after {n} failures in a row"
                );
                return Err(stop_status(action));
            }
        }
    }
}

/// The status of an action that ends the run.
fn stop_status(action: Action) -> Status {
    match action {
        Action::Stop(status) => status,
        // The policy answers these events only with their own actions or Stop.
        other => {
            tracing::error!(?other, "supervisor: unexpected action; stopping");
            Status::Failure
        }
    }
}
