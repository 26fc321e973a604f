//! The watcher of rclone's write-back queue in the mount layout.
//!
//! rclone's queue has two ways of keeping a file off S3 for long: a file
//! closed again within `--vfs-write-back` (5 s) restarts its timer, so one
//! rewritten every few seconds is never uploaded while that goes on; and a
//! failed upload is retried 10 s later, doubling up to 5 min, so after an
//! outage files could wait minutes for an S3 that is back. Every
//! [`QUEUE_WATCH`] this looks at the queue (`vfs/queue`); a file's first
//! sighting dates its oldest unsaved change within one look; [`due`]
//! decides which files are made due now. It also reports the backlog.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::rclone::rc;
use crate::remote::lag::Lag;

/// How often rclone's upload queue is looked at.
const QUEUE_WATCH: Duration = Duration::from_secs(5);
/// The longest a file waits in rclone's queue before it is made due.
const QUEUE_MAX_AGE: Duration = Duration::from_secs(30);
/// How often S3 is asked whether it answers while uploads fail but it did
/// the last time (they fail for another reason; rclone's backoff stands).
const RETRY_PROBE_EVERY: Duration = Duration::from_secs(30);

/// One entry of rclone's `vfs/queue` answer.
#[derive(Debug, Clone, PartialEq)]
struct Queued {
    id: i64,
    name: String,
    uploading: bool,
    /// Seconds until rclone uploads it; 0 or less: due already.
    expiry: f64,
    /// Failed uploads so far.
    tries: u64,
}

impl Queued {
    fn parse(item: &Value) -> Option<Queued> {
        Some(Queued {
            id: item["id"].as_i64()?,
            name: item["name"].as_str()?.to_owned(),
            uploading: item["uploading"].as_bool().unwrap_or(false),
            expiry: item["expiry"].as_f64().unwrap_or(0.0),
            tries: item["tries"].as_u64().unwrap_or(0),
        })
    }
}

/// Which queued files to make due now: `(kept back, failed)`. Neither
/// counts a file that is uploading or due already. Kept back: never tried,
/// and first seen [`QUEUE_MAX_AGE`] or more ago. Failed: tried before; the
/// caller makes them due only once S3 answers again.
fn due(
    items: &[Queued],
    first_seen: &HashMap<String, (Instant, u8)>,
    now: Instant,
) -> (Vec<i64>, Vec<i64>) {
    let put_off = items.iter().filter(|i| !i.uploading && i.expiry > 0.0);
    let (failed, fresh): (Vec<&Queued>, Vec<&Queued>) = put_off.partition(|i| i.tries > 0);
    let kept_back = fresh
        .into_iter()
        .filter(|i| {
            first_seen
                .get(&i.name)
                .is_some_and(|(t, _)| now - *t >= QUEUE_MAX_AGE)
        })
        .map(|i| i.id)
        .collect();
    (kept_back, failed.into_iter().map(|i| i.id).collect())
}

/// Watches rclone's queue at `socket` until aborted; `raw` is the plain
/// bucket prefix asked whether S3 answers.
pub async fn watch(socket: PathBuf, raw: String, lag: Lag) {
    const WHAT: &str = "files in rclone's upload queue";
    // By name: (first sighting, looks in a row it was missing). A file is
    // out of the queue while it is open for writing, so one missed look does
    // not end its wait.
    let mut first_seen: HashMap<String, (Instant, u8)> = HashMap::new();
    // Whether the last listing failed: failed uploads are made due when S3
    // comes back, not on every look (a file S3 refuses for its own reasons
    // keeps rclone's backoff). While S3 answers, it is asked at most every
    // RETRY_PROBE_EVERY.
    let mut s3_down = false;
    let mut last_probe: Option<Instant> = None;
    loop {
        sleep(QUEUE_WATCH).await;
        let Ok(queue) = rc::call(&socket, "vfs/queue", &json!({})).await else {
            continue;
        };
        let items: Vec<Queued> = queue["queue"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Queued::parse)
            .collect();
        let now = Instant::now();
        for seen in first_seen.values_mut() {
            seen.1 = seen.1.saturating_add(1);
        }
        for i in &items {
            first_seen.entry(i.name.clone()).or_insert((now, 0)).1 = 0;
        }
        first_seen.retain(|_, (_, missed)| *missed < 2);
        let Some(oldest) = items.iter().map(|i| first_seen[&i.name].0).min() else {
            lag.caught_up(WHAT);
            continue;
        };
        let why = if items.iter().any(|i| i.tries > 0) {
            "uploads fail and rclone retries them"
        } else {
            "waiting for rclone's write-back"
        };
        lag.behind(WHAT, items.len(), oldest, why.into());

        let (mut due_now, retry) = due(&items, &first_seen, now);
        if !due_now.is_empty() {
            tracing::info!(files = due_now.len(), "uploading files rclone kept back for over {QUEUE_MAX_AGE:?} (rewritten before their write-back came)");
        }
        let probe_due = s3_down || last_probe.is_none_or(|t| now - t >= RETRY_PROBE_EVERY);
        if !retry.is_empty() && probe_due {
            last_probe = Some(now);
            let answers = crate::remote::probe::answers_via_rc(&socket, &raw).await;
            if answers && s3_down {
                tracing::info!(
                    files = retry.len(),
                    "S3 answers again: uploading now what rclone had put off for a later retry"
                );
                due_now.extend(retry);
            }
            s3_down = !answers;
        }
        for id in due_now {
            let due_now = json!({ "id": id, "expiry": -1e9 });
            let _ = rc::call(&socket, "vfs/queue-set-expiry", &due_now).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_kept_back_too_long_are_due_and_failed_ones_wait_for_s3() {
        let item = |id, name: &str, uploading, expiry, tries| Queued {
            id,
            name: name.to_owned(),
            uploading,
            expiry,
            tries,
        };
        let rclone_answer = json!({"queue": [
            {"id": 1, "name": "a", "uploading": false, "expiry": 4.0, "tries": 0},
        ]});
        assert_eq!(
            Queued::parse(&rclone_answer["queue"][0]),
            Some(item(1, "a", false, 4.0, 0))
        );
        let now = Instant::now() + Duration::from_secs(100);
        let seen = |ago: u64| (now - Duration::from_secs(ago), 0u8);
        let first_seen: HashMap<String, (Instant, u8)> = [
            ("old", seen(31)),
            ("young", seen(5)),
            ("old-uploading", seen(60)),
            ("old-due", seen(60)),
            ("failed", seen(1)),
            ("failed-uploading", seen(60)),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_owned(), t))
        .collect();
        let items = [
            item(1, "old", false, 3.0, 0),
            item(2, "young", false, 3.0, 0),
            item(3, "old-uploading", true, 3.0, 0),
            item(4, "old-due", false, 0.0, 0),
            item(5, "failed", false, 20.0, 2),
            item(6, "failed-uploading", true, 20.0, 1),
            item(7, "never-seen", false, 3.0, 0),
        ];
        assert_eq!(due(&items, &first_seen, now), (vec![1], vec![5]));
    }
}
