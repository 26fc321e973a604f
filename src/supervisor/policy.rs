//! What the supervisor does next, decided without doing it: a pure function
//! of what it knows and what just happened. `supervisor::run` acts on the
//! [`Action`]; the tables below are the policy's specification.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::RestartPolicy;
use crate::exit::Status;
use crate::gateway::SpawnError;

/// A run of the gateway shorter than this counts as a failed start.
pub const FAILED_START: Duration = Duration::from_secs(10);
/// Storage that fails again within this long of a recovery counts as failing in a row.
pub const STORAGE_STEADY: Duration = Duration::from_secs(60);
/// Storage failures in a row (a failure within [`STORAGE_STEADY`] of the
/// last recovery, or a recovery that failed) at which cvm-init gives up.
pub const STORAGE_MAX_FAILURES: u32 = 5;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// The gateway exited after running for `ran_for`.
    GatewayExited { ran_for: Duration },
    /// Storage stopped serving; `recoverable` unless what failed is a bug
    /// in cvm-init (a worker loop that panicked).
    StorageFailed { recoverable: bool },
    /// A recovery attempt failed; `jitter` in [0, 1) places its retry.
    RecoveryFailed { jitter: f64 },
    /// Storage serves again.
    Recovered,
    /// Another instance took the bucket prefix's lease.
    LeaseLost,
}

/// What to do about it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Start the gateway again after this delay.
    RestartGateway { after: Duration },
    /// Try to bring storage back.
    Recover,
    /// Try the recovery again after this delay.
    RetryRecovery { after: Duration },
    /// Nothing more to do.
    Continue,
    /// Stop everything in data-safe order and exit with this status.
    Stop(Status),
}

/// The supervisor's memory: how the gateway and storage have been failing.
#[derive(Debug)]
pub struct Policy {
    restart: RestartPolicy,
    /// The delay before the last restart, doubled while runs stay short.
    delay: Option<Duration>,
    /// Gateway runs in a row that ended within [`FAILED_START`].
    failed_starts: u32,
    /// Storage failures in a row, and recovery attempts that failed.
    storage_failures: u32,
    last_recovery: Instant,
    /// Recovery attempts that failed in the current episode.
    recovery_attempts: u32,
}

impl Policy {
    /// `booted`: when storage came up (a failure soon after counts as quick).
    pub fn new(restart: RestartPolicy, booted: Instant) -> Policy {
        Policy {
            restart,
            delay: None,
            failed_starts: 0,
            storage_failures: 0,
            last_recovery: booted,
            recovery_attempts: 0,
        }
    }

    /// Decides the next action for `event`, which happened at `now`.
    pub fn decide(&mut self, event: Event, now: Instant) -> Action {
        match event {
            Event::GatewayExited { ran_for } => {
                self.failed_starts = if ran_for < FAILED_START {
                    self.failed_starts + 1
                } else {
                    0
                };
                let limit = self.restart.max_failed_starts;
                if limit > 0 && self.failed_starts >= limit {
                    return Action::Stop(Status::GatewayFailing);
                }
                let after = next_delay(&self.restart, self.delay, ran_for);
                self.delay = Some(after);
                Action::RestartGateway { after }
            }
            Event::StorageFailed { recoverable: false } => Action::Stop(Status::Failure),
            Event::StorageFailed { recoverable: true } => {
                self.storage_failures = if now.duration_since(self.last_recovery) < STORAGE_STEADY {
                    self.storage_failures + 1
                } else {
                    1
                };
                self.recovery_attempts = 0;
                if self.storage_failures >= STORAGE_MAX_FAILURES {
                    Action::Stop(Status::StorageUnavailable)
                } else {
                    Action::Recover
                }
            }
            Event::RecoveryFailed { jitter } => {
                self.storage_failures += 1;
                self.recovery_attempts += 1;
                if self.storage_failures >= STORAGE_MAX_FAILURES {
                    Action::Stop(Status::StorageUnavailable)
                } else {
                    Action::RetryRecovery {
                        after: Backoff::S3.jittered(self.recovery_attempts, jitter),
                    }
                }
            }
            Event::LeaseLost => Action::Stop(Status::LeaseLost),
            Event::Recovered => {
                self.last_recovery = now;
                Action::Continue
            }
        }
    }

    /// Gateway starts that failed in a row, for the log.
    pub fn failed_starts(&self) -> u32 {
        self.failed_starts
    }

    /// Storage failures in a row, for the log.
    pub fn storage_failures(&self) -> u32 {
        self.storage_failures
    }
}

/// The delay before the next start: the base delay after a run longer than
/// `reset_after`, else double the previous delay, capped at `max_delay`.
fn next_delay(policy: &RestartPolicy, previous: Option<Duration>, ran_for: Duration) -> Duration {
    match previous {
        Some(prev) if ran_for < policy.reset_after => (prev * 2).min(policy.max_delay),
        _ => policy.delay.min(policy.max_delay),
    }
}

/// The exit status when the gateway cannot be spawned at all.
pub fn spawn_failure_status(e: &SpawnError) -> Status {
    match e {
        SpawnError::NotFound { .. } => Status::GatewayNotFound,
        SpawnError::NotExecutable { .. } => Status::GatewayNotExecutable,
        SpawnError::Other { .. } => Status::Failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn restart(max_failed_starts: u32) -> RestartPolicy {
        RestartPolicy {
            delay: s(5),
            max_delay: s(60),
            reset_after: s(600),
            max_failed_starts,
        }
    }

    /// Feeds `steps` (seconds since boot, event) and checks each action.
    fn run(max_failed_starts: u32, steps: &[(u64, Event, Action)]) {
        let t0 = Instant::now();
        let mut p = Policy::new(restart(max_failed_starts), t0);
        for (i, (at, event, want)) in steps.iter().enumerate() {
            let got = p.decide(*event, t0 + s(*at));
            assert_eq!(got, *want, "step {i}: {event:?} at {at}s");
        }
    }

    use Action::*;
    use Event::*;

    #[test]
    fn gateway_restarts_back_off_and_give_up_after_failed_starts_in_a_row() {
        let quick = GatewayExited { ran_for: s(1) };
        run(
            3,
            &[
                (1, quick, RestartGateway { after: s(5) }),
                (7, quick, RestartGateway { after: s(10) }),
                (18, quick, Stop(Status::GatewayFailing)),
            ],
        );
        // A run past FAILED_START breaks the series; the delay keeps doubling
        // until a run past reset_after.
        run(
            3,
            &[
                (1, quick, RestartGateway { after: s(5) }),
                (7, quick, RestartGateway { after: s(10) }),
                (
                    100,
                    GatewayExited { ran_for: s(80) },
                    RestartGateway { after: s(20) },
                ),
                (101, quick, RestartGateway { after: s(40) }),
                (142, quick, RestartGateway { after: s(60) }),
                (
                    900,
                    GatewayExited { ran_for: s(700) },
                    RestartGateway { after: s(5) },
                ),
            ],
        );
        // 0 never gives up.
        let steps: Vec<_> = (0..20)
            .map(|i| {
                (
                    i * 70,
                    quick,
                    RestartGateway {
                        after: if i == 0 {
                            s(5)
                        } else {
                            s(5 << i.min(4)).min(s(60))
                        },
                    },
                )
            })
            .collect();
        run(0, &steps);
    }

    #[test]
    fn storage_recovers_and_gives_up_only_when_failing_in_a_row() {
        let failed = StorageFailed { recoverable: true };
        let retry = |n| RetryRecovery {
            after: Backoff::S3.jittered(n, 0.5),
        };
        let again = RecoveryFailed { jitter: 0.5 };
        // Failures far apart never add up.
        run(
            5,
            &[
                (100, failed, Recover),
                (100, Recovered, Continue),
                (200, failed, Recover),
                (200, Recovered, Continue),
                (300, failed, Recover),
                (300, Recovered, Continue),
                (400, failed, Recover),
                (400, Recovered, Continue),
                (500, failed, Recover),
                (500, Recovered, Continue),
            ],
        );
        // Each within STORAGE_STEADY of the last recovery: the fifth gives up.
        run(
            5,
            &[
                (10, failed, Recover),
                (10, Recovered, Continue),
                (20, failed, Recover),
                (20, Recovered, Continue),
                (30, failed, Recover),
                (30, Recovered, Continue),
                (40, failed, Recover),
                (40, Recovered, Continue),
                (50, failed, Stop(Status::StorageUnavailable)),
            ],
        );
        // Failed recoveries count too, and their retries back off.
        run(
            5,
            &[
                (100, failed, Recover),
                (101, again, retry(1)),
                (102, again, retry(2)),
                (105, again, retry(3)),
                (110, again, Stop(Status::StorageUnavailable)),
            ],
        );
        // A new episode restarts the retry schedule.
        run(
            5,
            &[
                (100, failed, Recover),
                (101, again, retry(1)),
                (102, Recovered, Continue),
                (500, failed, Recover),
                (501, again, retry(1)),
            ],
        );
    }

    #[test]
    fn restart_delay_doubles_caps_and_resets() {
        let p = restart(5);
        let table = [
            (None, s(1), s(5)),
            (Some(s(5)), s(1), s(10)),
            (Some(s(10)), s(1), s(20)),
            (Some(s(40)), s(1), s(60)),
            (Some(s(60)), s(599), s(60)),
            (Some(s(60)), s(600), s(5)),
            (None, s(10_000), s(5)),
        ];
        for (prev, ran, want) in table {
            assert_eq!(next_delay(&p, prev, ran), want, "prev {prev:?} ran {ran:?}");
        }
    }

    #[test]
    fn a_dead_worker_loop_stops_everything_as_an_internal_failure() {
        run(
            5,
            &[(
                1,
                StorageFailed { recoverable: false },
                Stop(Status::Failure),
            )],
        );
        run(5, &[(1, LeaseLost, Stop(Status::LeaseLost))]);
    }

    #[test]
    fn spawn_failures_map_to_the_shell_statuses() {
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let table = [
            (
                SpawnError::NotFound {
                    program: "x".into(),
                },
                Status::GatewayNotFound,
            ),
            (
                SpawnError::NotExecutable {
                    program: "x".into(),
                    source: io(),
                },
                Status::GatewayNotExecutable,
            ),
            (
                SpawnError::Other {
                    program: "x".into(),
                    source: io(),
                },
                Status::Failure,
            ),
        ];
        for (e, want) in table {
            assert_eq!(spawn_failure_status(&e), want, "{e}");
        }
    }
}
