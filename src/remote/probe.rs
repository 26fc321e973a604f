//! Is S3 there, and does it take our credentials? One small listing of the
//! bucket prefix through the plain `s3` remote tells "reachable",
//! "credentials rejected", "bucket missing" and "unreachable" apart. Boot
//! waits out the transient answer with capped, jittered backoff and stops on
//! the permanent ones: retrying a wrong key pair never makes it right.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use tokio::time::{sleep, Instant};

use crate::backoff::{jitter_unit, Backoff};
use crate::config::S3Config;
use crate::rclone;
use crate::sys::process::{Exit, Reaper};
use crate::sys::sdnotify;

/// What one probe found, when it did not find S3 ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "S3 at {endpoint} rejected the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or denied \
         them bucket {bucket}: {detail}. Not retrying: check the key pair and that it may read and write the bucket"
    )]
    CredentialsRejected {
        endpoint: String,
        bucket: String,
        detail: String,
    },
    #[error(
        "bucket {bucket} does not exist at {endpoint}. Not retrying: create it (cvm-init never creates \
         buckets) or fix S3_BUCKET / S3_ENDPOINT"
    )]
    BucketMissing { endpoint: String, bucket: String },
    #[error(
        "S3 at {endpoint} refused the request as wrong for it: {detail}. Not retrying: check S3_REGION, \
         S3_ENDPOINT and S3_PROVIDER"
    )]
    Misdirected { endpoint: String, detail: String },
    #[error("S3 at {endpoint} is unreachable: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("cannot start rclone ({bin}) to reach S3: {reason}; install rclone >= 1.75 or set RCLONE_BIN")]
    Spawn { bin: String, reason: String },
}

impl ProbeError {
    /// Waiting cannot fix it.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, ProbeError::Unreachable { .. })
    }
}

/// Why boot stopped waiting for S3.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("{0}")]
    Permanent(ProbeError),
    #[error(
        "{last}; still unreachable after {waited:?} and {attempts} attempts (CVM_S3_WAIT). Nothing was \
         restored or written and the gateway was not started; fix the network or the endpoint, or raise CVM_S3_WAIT"
    )]
    GaveUp {
        waited: Duration,
        attempts: u32,
        last: ProbeError,
    },
}

/// The probe's command line: a one-level listing of `s3:<bucket>/<prefix>`,
/// each attempt bounded so a black-holed endpoint cannot stall boot.
pub fn args(config: &Path, s3: &S3Config) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--config".into(), config.into()];
    args.extend(
        [
            "lsf",
            "--max-depth",
            "1",
            "--low-level-retries",
            "1",
            "--contimeout",
            "5s",
            "--timeout",
            "10s",
        ]
        .map(OsString::from),
    );
    args.push(s3.raw_remote().into());
    args
}

/// Reads rclone's answer. rclone reports a missing bucket (HTTP 404 on the
/// listing) as "directory not found": an empty prefix in an existing bucket
/// lists fine, so that answer can only mean the bucket.
pub fn classify(success: bool, stderr: &str, s3: &S3Config) -> Result<(), ProbeError> {
    if success {
        return Ok(());
    }
    let detail = stderr
        .lines()
        .find_map(|l| l.split_once("error listing: ").map(|(_, d)| d))
        .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("rclone printed nothing");
    // The SDK's framing says nothing a reader needs.
    let detail = detail
        .rsplit_once("request send failed, ")
        .map_or(detail, |(_, d)| d)
        .trim()
        .replace("https response error ", "")
        .replace(", RequestID: , HostID: ", "");
    let endpoint = s3.endpoint.clone();
    let bucket = s3.bucket.clone();
    if detail.contains("directory not found") {
        return Err(ProbeError::BucketMissing { endpoint, bucket });
    }
    // A skewed clock gets a 403 too, but NTP may still fix it.
    let rejected = !detail.contains("RequestTimeTooSkewed")
        && [
            "StatusCode: 401",
            "StatusCode: 403",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
        ]
        .iter()
        .any(|m| detail.contains(m));
    if rejected {
        return Err(ProbeError::CredentialsRejected {
            endpoint,
            bucket,
            detail,
        });
    }
    // A wrong region or endpoint gets the same answer however often it asks.
    // A bare 400 does not count: Garage answers "BadRequest" for a moment
    // while it starts.
    let misdirected = [
        "StatusCode: 301",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "IllegalLocationConstraintException",
    ]
    .iter()
    .any(|m| detail.contains(m));
    if misdirected {
        return Err(ProbeError::Misdirected { endpoint, detail });
    }
    Err(ProbeError::Unreachable { endpoint, detail })
}

/// Whether S3 answers one listing of `raw` (`s3:<bucket>/<prefix>`) within
/// 15 s, asked through an rclone rc server already running at `socket` (no
/// process to start, for checks while storage runs).
pub async fn answers_via_rc(socket: &Path, raw: &str) -> bool {
    let params = serde_json::json!({ "fs": raw, "remote": "", "opt": { "dirsOnly": true } });
    let list = crate::rclone::rc::call(socket, "operations/list", &params);
    matches!(
        tokio::time::timeout(Duration::from_secs(15), list).await,
        Ok(Ok(_))
    )
}

/// One probe, through rclone spawned under `reaper`.
pub async fn probe(
    reaper: &Reaper,
    rclone_bin: &str,
    config: &Path,
    s3: &S3Config,
) -> Result<(), ProbeError> {
    let args = args(config, s3);
    let spawned = rclone::spawn_logged(reaper, rclone_bin, &args, &[], tracing::Level::DEBUG);
    let (mut child, tail) = spawned.map_err(|e| ProbeError::Spawn {
        bin: rclone_bin.to_owned(),
        reason: e.to_string(),
    })?;
    let exit = child.wait().await;
    // The tail is filled by a thread reading rclone's stderr; it may lag the exit.
    let stderr = tail.text_when_closed(Duration::from_secs(1)).await;
    classify(exit == Exit::Code(0), &stderr, s3)
}

/// What to probe, and for how long.
pub struct Target<'a> {
    pub rclone_bin: &'a str,
    pub config: &'a Path,
    pub s3: &'a S3Config,
    /// How long to wait for an unreachable S3 (`CVM_S3_WAIT`); `None` is forever.
    pub limit: Option<Duration>,
}

/// Probes until S3 answers, a permanent problem shows, or the target's
/// limit has passed. Logs and reports (sd-notify STATUS) every failed attempt.
pub async fn wait(reaper: &Reaper, target: &Target<'_>) -> Result<(), WaitError> {
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match probe(reaper, target.rclone_bin, target.config, target.s3).await {
            Ok(()) => {
                if attempts > 1 {
                    tracing::info!(attempts, waited = ?started.elapsed(), "S3 reachable again; continuing the boot");
                }
                return Ok(());
            }
            Err(e) if e.is_permanent() => return Err(WaitError::Permanent(e)),
            Err(e) => e,
        };
        let waited = started.elapsed();
        let mut delay = Backoff::S3.jittered(attempts, jitter_unit());
        if let Some(limit) = target.limit {
            if waited >= limit {
                return Err(WaitError::GaveUp {
                    waited,
                    attempts,
                    last,
                });
            }
            delay = delay.min(limit - waited);
        }
        tracing::warn!(
            attempt = attempts,
            waited = ?waited,
            retry_in = ?delay,
            "{last}; the gateway waits until S3 answers and the state is restored"
        );
        sdnotify::status(&format!(
            "waiting for S3 (attempt {attempts}, {}s so far): {last}",
            waited.as_secs()
        ));
        sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn s3() -> S3Config {
        let vars = [
            ("S3_BUCKET", "bkt"),
            ("S3_ENDPOINT", "http://127.0.0.1:3900"),
            ("AWS_ACCESS_KEY_ID", "GKaccess"),
            ("AWS_SECRET_ACCESS_KEY", "sekrit"),
            ("RCLONE_CRYPT_PASSWORD", "ubtafWYbU0c8NpC9CUBaxEr8xvy76Q"),
        ];
        let (c, _) = Config::from_vars(vars.map(|(k, v)| (k.to_owned(), v.to_owned()))).unwrap();
        c.s3.unwrap()
    }

    // What rclone 1.75.2 printed against Garage 2.5 for each fault.
    const REFUSED: &str = "2026/11/25 01:25:30 ERROR : error listing: operation error S3: ListObjects, exceeded maximum number of attempts, 1, https response error StatusCode: 0, RequestID: , HostID: , request send failed, Get \"http://127.0.0.1:33169/cvm-test?delimiter=%2F&max-keys=1000&prefix=\": dial tcp 127.0.0.1:33169: connect: connection refused\n2026/11/25 01:25:30 NOTICE: Failed to lsjson with 2 errors: last error was: error in ListJSON: ...";
    const BAD_SECRET: &str = "2026/11/25 01:25:29 ERROR : error listing: operation error S3: ListObjects, https response error StatusCode: 403, RequestID: , HostID: , api error AccessDenied: Forbidden: Invalid signature\n";
    const NO_BUCKET: &str = "2026/11/25 01:25:29 ERROR : error listing: directory not found\n2026/11/25 01:25:29 NOTICE: Failed to lsjson with 2 errors: last error was: error in ListJSON: directory not found\n";
    const NO_HOST: &str = "2026/11/25 01:25:30 ERROR : error listing: operation error S3: ListObjects, https response error StatusCode: 0, RequestID: , HostID: , request send failed, Get \"http://no-such-host.invalid:33169/cvm-test\": dial tcp: lookup no-such-host.invalid on 10.255.255.53:53: no such host\n";
    const WRONG_REGION: &str = "ERROR : error listing: operation error S3: ListObjects, https response error StatusCode: 400, api error AuthorizationHeaderMalformed: The authorization header is malformed; the region 'us-east-1' is wrong; expecting 'eu-west-1'\n";
    const SKEWED: &str = "ERROR : error listing: operation error S3: ListObjects, https response error StatusCode: 403, api error RequestTimeTooSkewed: The difference between the request time and the server's time is too large.\n";

    #[test]
    fn faults_are_told_apart() {
        let s3 = s3();
        assert_eq!(classify(true, "", &s3), Ok(()));
        let refused = classify(false, REFUSED, &s3).unwrap_err();
        assert!(!refused.is_permanent());
        assert!(
            refused.to_string()
                == "S3 at http://127.0.0.1:3900 is unreachable: Get \"http://127.0.0.1:33169/cvm-test?\
                    delimiter=%2F&max-keys=1000&prefix=\": dial tcp 127.0.0.1:33169: connect: connection refused",
            "{refused}"
        );
        assert!(!classify(false, NO_HOST, &s3).unwrap_err().is_permanent());
        assert!(!classify(false, SKEWED, &s3).unwrap_err().is_permanent());
        let region = classify(false, WRONG_REGION, &s3).unwrap_err();
        assert!(matches!(region, ProbeError::Misdirected { .. }), "{region}");
        for transient in [
            "ERROR : error listing: StatusCode: 400, api error RequestTimeout: Your socket connection to the server was not read from",
            "ERROR : error listing: operation error S3: ListObjects, StatusCode: 400, api error BadRequest: Bad Request",
        ] {
            assert!(!classify(false, transient, &s3).unwrap_err().is_permanent(), "{transient}");
        }
        assert_eq!(
            classify(false, NO_BUCKET, &s3),
            Err(ProbeError::BucketMissing {
                endpoint: "http://127.0.0.1:3900".into(),
                bucket: "bkt".into()
            })
        );
        let rejected = classify(false, BAD_SECRET, &s3).unwrap_err();
        assert!(rejected.is_permanent());
        assert!(
            rejected.to_string().contains(
                "operation error S3: ListObjects, StatusCode: 403, api error AccessDenied: Forbidden: Invalid signature"
            ),
            "{rejected}"
        );
        assert!(!classify(false, "", &s3).unwrap_err().is_permanent());
    }

    #[test]
    fn probe_lists_the_prefix_without_secrets() {
        let line: Vec<String> = args(Path::new("/run/cvm-init/rclone.conf"), &s3())
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            line.join(" "),
            "--config /run/cvm-init/rclone.conf lsf --max-depth 1 --low-level-retries 1 --contimeout 5s \
             --timeout 10s s3:bkt/openclaw-state"
        );
    }
}
