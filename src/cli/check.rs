//! `cvm-init check`: everything the appliance would find wrong at boot,
//! found without booting. One line per check on stdout; the exit code is the
//! one the appliance would exit with for the first problem. It writes nothing
//! to S3, `CVM_RUN_DIR`, `CVM_LOCAL_DIR` or the state dir: the rclone config
//! it needs lives in a private temporary directory, removed at the end.

use std::path::Path;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use super::TempRun;
use crate::config::{Config, Layout, S3Config};
use crate::exit::Status;
use crate::rclone::RunPaths;
use crate::remote::keycheck::{self, KeyCheckError, Outcome};
use crate::remote::lease;
use crate::remote::probe::{self, ProbeError};
use crate::sys::pid1;
use crate::sys::process::Reaper;

/// The lines printed so far and the first problem's exit status.
struct Report {
    status: Status,
}

impl Report {
    fn ok(&mut self, what: &str, detail: &str) {
        println!("ok       {what}: {detail}");
    }

    fn problem(&mut self, what: &str, detail: &str, status: Status) {
        println!("PROBLEM  {what}: {detail}");
        if self.status == Status::Clean {
            self.status = status;
        }
    }

    fn skipped(&mut self, what: &str, why: &str) {
        println!("skipped  {what}: {why}");
    }
}

/// Runs every check against the environment; returns the exit status.
pub fn run() -> Status {
    let mut r = Report {
        status: Status::Clean,
    };
    let cfg = match Config::from_env() {
        Ok((cfg, warnings)) => {
            for w in warnings {
                println!("warning  config: {w}");
            }
            cfg
        }
        Err(e) => {
            for p in &e.problems {
                r.problem("config", &p.to_string(), Status::Config);
            }
            r.skipped("s3, key, fuse", "the configuration must be valid first");
            return r.status;
        }
    };
    let Some(s3) = &cfg.s3 else {
        r.ok(
            "config",
            &format!(
                "local mode (no S3_BUCKET): the state dir {} is a plain directory",
                cfg.state_dir.display()
            ),
        );
        r.skipped("s3, key, fuse", "not used in local mode");
        return r.status;
    };
    let layout = match cfg.layout {
        Layout::Replicate => "replicate",
        Layout::Mount => "mount",
    };
    r.ok(
        "config",
        &format!(
            "S3 mode, {layout} layout, bucket {} at {}, prefix {:?}",
            s3.bucket, s3.endpoint, s3.prefix
        ),
    );
    match cfg.layout {
        Layout::Mount => match pid1::ensure_fuse(Path::new("/dev/fuse"), false) {
            Ok(()) => r.ok("fuse", "/dev/fuse is the FUSE device and opens"),
            Err(e) => r.problem("fuse", &e.to_string(), Status::Os),
        },
        Layout::Replicate => r.ok("fuse", "not needed by the replicate layout"),
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            r.problem(
                "s3",
                &format!("cannot start the async runtime: {e}"),
                Status::Failure,
            );
            return r.status;
        }
    };
    runtime.block_on(check_s3(&mut r, &cfg, s3));
    r.status
}

async fn check_s3(r: &mut Report, cfg: &Config, s3: &S3Config) {
    let reaper = Reaper::default();
    match signal(SignalKind::child()) {
        Ok(sigchld) => {
            tokio::spawn(reaper.clone().run(sigchld));
        }
        Err(e) => {
            r.problem(
                "s3",
                &format!("cannot watch child processes: {e}"),
                Status::Failure,
            );
            return;
        }
    }
    let tmp = match TempRun::create("check") {
        Ok(t) => t,
        Err((path, e)) => {
            r.problem(
                "s3",
                &format!(
                    "cannot create a private directory at {}: {e}",
                    path.display()
                ),
                Status::Failure,
            );
            return;
        }
    };
    let paths = RunPaths::new(&tmp.0, &tmp.0);
    if let Err((path, e)) = paths.prepare(s3) {
        r.problem(
            "s3",
            &format!(
                "cannot write a temporary rclone config at {}: {e}",
                path.display()
            ),
            Status::Failure,
        );
        return;
    }
    match probe::probe(&reaper, &cfg.rclone_bin, &paths.config, s3).await {
        Ok(()) => r.ok(
            "s3",
            &format!(
                "{} answers and bucket {} takes these credentials",
                s3.endpoint, s3.bucket
            ),
        ),
        Err(e) => {
            let status = match e {
                ProbeError::CredentialsRejected { .. }
                | ProbeError::BucketMissing { .. }
                | ProbeError::Misdirected { .. } => Status::S3Rejected,
                ProbeError::Unreachable { .. } | ProbeError::Spawn { .. } => {
                    Status::StorageUnavailable
                }
            };
            r.problem("s3", &e.to_string(), status);
            r.skipped("key", "S3 must answer first");
            return;
        }
    }
    let (mut rcd, _) = match super::start_rcd(&reaper, cfg, &paths).await {
        Ok(rcd) => rcd,
        Err(e) => {
            r.problem("key", &e.to_string(), Status::StorageUnavailable);
            return;
        }
    };
    let key_ok = keycheck::inspect(&paths.rc_socket, &s3.raw_remote(), &paths.scratch).await;
    match &key_ok {
        Ok(Outcome::Matched) => r.ok("key", "the key marker decrypts with this key"),
        Ok(Outcome::FirstUse) => r.ok(
            "key",
            "the bucket prefix is empty; the first boot writes the key marker",
        ),
        Ok(Outcome::Adopted) => r.ok(
            "key",
            "no key marker yet, but the data there decrypts with this key; the next boot writes the marker",
        ),
        Err(e @ KeyCheckError::WrongKey { .. }) => r.problem("key", &e.to_string(), Status::WrongKey),
        Err(e) => r.problem("key", &e.to_string(), Status::StorageUnavailable),
    }
    if key_ok.is_ok() {
        lease(r, &paths, s3).await;
    } else {
        r.skipped("lease", "the key must match first");
    }
    rcd.terminate(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

/// Who holds the bucket prefix's lease, and whether S3 enforces it.
async fn lease(r: &mut Report, paths: &RunPaths, s3: &S3Config) {
    let io = match lease::Io::open(&paths.rc_socket, &paths.scratch, &s3.raw_remote()).await {
        Ok(io) => io,
        Err(e) => return r.problem("lease", &e.to_string(), Status::StorageUnavailable),
    };
    let mode = match io.mode_if_probed().await {
        Ok(Some(m)) => m.describe().to_owned(),
        Ok(None) => "conditional writes not probed yet (the first boot does)".to_owned(),
        Err(e) => return r.problem("lease", &e.to_string(), Status::StorageUnavailable),
    };
    match io.read().await {
        Ok(None) => r.ok("lease", &format!("free; {mode}")),
        Ok(Some((rec, _))) if rec.released => r.ok(
            "lease",
            &format!("free (released by {}); {mode}", rec.describe()),
        ),
        Ok(Some((rec, _))) => r.ok(
            "lease",
            &format!(
                "held by {}: a new instance waits until it is released or unrenewed for CVM_LEASE_TTL \
                 (an idle holder stops renewing unless CVM_LEASE_WHILE_IDLE=renew); {mode}",
                rec.describe()
            ),
        ),
        Err(e) => r.problem("lease", &e.to_string(), Status::StorageUnavailable),
    }
}
