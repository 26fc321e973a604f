//! How far S3 is behind the state dir. The loops that write to S3 (backup,
//! replication, the watcher of rclone's upload queue) report here; one task
//! turns that into sd-notify `STATUS=` and log lines, so an operator sees
//! "S3 writes 40 s behind" while the gateway keeps running.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};

use crate::sys::sdnotify;

/// A backlog younger than this is normal operation (debounce, an upload in
/// flight) and not reported.
const REPORT_AFTER: Duration = Duration::from_secs(10);
/// How often the status is refreshed while behind.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// How often the warning is repeated in the log while behind.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// One writer's backlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    /// Items not on S3 yet (databases, files, queued uploads).
    pub pending: usize,
    /// The oldest change among them.
    pub since: Instant,
    pub error: String,
}

/// Backlogs by writer ("databases", "files", …). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Lag(Arc<Mutex<BTreeMap<&'static str, Behind>>>);

impl Lag {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Behind>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `what` has `pending` items not on S3, the oldest changed at `since`
    /// (replacing what it said before: each writer knows its oldest change).
    pub fn behind(&self, what: &'static str, pending: usize, since: Instant, error: String) {
        self.lock().insert(
            what,
            Behind {
                pending,
                since,
                error,
            },
        );
    }

    /// Everything `what` had pending is on S3.
    pub fn caught_up(&self, what: &'static str) {
        self.lock().remove(what);
    }

    /// One line for the status, or `None` when nothing is behind.
    pub fn summary(&self, now: Instant) -> Option<(Duration, String)> {
        let m = self.lock();
        let oldest = m.values().map(|b| b.since).min()?;
        let lag = now.saturating_duration_since(oldest);
        let parts: Vec<String> = m
            .iter()
            .map(|(what, b)| format!("{} {what}", b.pending))
            .collect();
        let error = m
            .values()
            .min_by_key(|b| b.since)
            .map(|b| b.error.as_str())
            .unwrap_or_default();
        Some((
            lag,
            format!(
                "S3 writes {}s behind ({} pending; retrying): {error}",
                lag.as_secs(),
                parts.join(", ")
            ),
        ))
    }

    /// Reports the backlog until aborted: `STATUS=` every few seconds while
    /// behind, a warning every half minute, and a line when it caught up.
    pub fn spawn_reporter(&self) -> JoinHandle<()> {
        let lag = self.clone();
        tokio::spawn(async move {
            // The worst lag of the current episode, while one lasts.
            let mut worst: Option<Duration> = None;
            let mut last_warn: Option<Instant> = None;
            loop {
                sleep(REPORT_EVERY).await;
                let now = Instant::now();
                match lag.summary(now) {
                    Some((d, line)) if d >= REPORT_AFTER => {
                        worst = Some(worst.map_or(d, |w| w.max(d)));
                        sdnotify::status(&line);
                        if last_warn.is_none_or(|t| now - t >= WARN_EVERY) {
                            tracing::warn!("{line}");
                            last_warn = Some(now);
                        }
                    }
                    _ => {
                        if let Some(w) = worst.take() {
                            tracing::info!(
                                "S3 writes caught up: nothing older than {REPORT_AFTER:?} is pending (they were up to {}s behind)",
                                w.as_secs()
                            );
                            sdnotify::status("running");
                            last_warn = None;
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_change_sets_the_lag() {
        let lag = Lag::default();
        let t0 = Instant::now();
        assert_eq!(lag.summary(t0), None);
        lag.behind("files", 3, t0, "connection refused".into());
        lag.behind(
            "databases",
            1,
            t0 + Duration::from_secs(5),
            "timeout".into(),
        );
        let (d, line) = lag.summary(t0 + Duration::from_secs(42)).unwrap();
        assert_eq!(d, Duration::from_secs(42));
        assert_eq!(
            line,
            "S3 writes 42s behind (1 databases, 3 files pending; retrying): connection refused"
        );
        // A later report replaces the earlier one: its oldest change is newer.
        lag.behind("files", 4, t0 + Duration::from_secs(9), "timeout".into());
        let (d, _) = lag.summary(t0 + Duration::from_secs(42)).unwrap();
        assert_eq!(d, Duration::from_secs(37));
        lag.caught_up("files");
        let (d, _) = lag.summary(t0 + Duration::from_secs(42)).unwrap();
        assert_eq!(d, Duration::from_secs(37));
        lag.caught_up("databases");
        assert_eq!(lag.summary(t0), None);
    }
}
