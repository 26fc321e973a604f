//! `cvm-init restore --to DIR`: the state dir as S3 holds it now, written
//! into DIR from any machine with the appliance's environment. No FUSE, no
//! lease (it only reads), nothing written to the bucket: the rclone config
//! lives in a private temporary directory, removed at the end.
//!
//! Files come as the last replication pass left them (content, symlinks,
//! then modes, owners and empty directories from `tree.json`); each database
//! as its base plus every segment after it.

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use super::TempRun;
use crate::config::Config;
use crate::exit::Status;
use crate::rclone::{rc, RunPaths, CRYPT_REMOTE};
use crate::remote::bucket::USER_DIR;
use crate::remote::keycheck::{self, KeyCheckError};
use crate::sqlite::restore::restore_databases;
use crate::storage::replicate::{scan::Excludes, treemeta};
use crate::sys::process::Reaper;

/// A failure, with the exit status it maps to.
struct Failed(Status, String);

fn fail(status: Status) -> impl Fn(String) -> Failed {
    move |msg| Failed(status, msg)
}

/// Restores into `to` (absent or empty). `at` is refused until the state
/// history lands: a silent "latest" would restore the wrong moment.
pub fn run(to: &Path, at: Option<&str>) -> Status {
    if let Some(at) = at {
        eprintln!(
            "cvm-init restore: --at {at}: point-in-time restore is not available yet; this version restores \
             the latest state only (omit --at)"
        );
        return Status::Usage;
    }
    match restore(to) {
        Ok(summary) => {
            println!("{summary}");
            Status::Clean
        }
        Err(Failed(status, msg)) => {
            eprintln!("cvm-init restore: {msg}");
            status
        }
    }
}

fn restore(to: &Path) -> Result<String, Failed> {
    let (cfg, _) = Config::from_env().map_err(|e| {
        Failed(
            Status::Config,
            e.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let s3 = cfg.s3.clone().ok_or_else(|| {
        Failed(
            Status::Config,
            "S3_BUCKET is not set: there is no bucket to restore from".into(),
        )
    })?;
    match fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Failed(
                    Status::Usage,
                    format!(
                        "{} is not empty; give an absent or empty directory",
                        to.display()
                    ),
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(to).map_err(|e| {
                Failed(
                    Status::Failure,
                    format!("cannot create {}: {e}", to.display()),
                )
            })?
        }
        Err(e) => {
            return Err(Failed(
                Status::Failure,
                format!("cannot read {}: {e}", to.display()),
            ))
        }
    }
    let excludes = Excludes::new(&cfg.exclude, &cfg.sqlite.patterns)
        .map_err(|e| Failed(Status::Config, format!("CVM_EXCLUDE: {e}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            Failed(
                Status::Failure,
                format!("cannot start the async runtime: {e}"),
            )
        })?;
    runtime.block_on(async {
        let reaper = Reaper::default();
        let sigchld = signal(SignalKind::child()).map_err(|e| {
            Failed(
                Status::Failure,
                format!("cannot watch child processes: {e}"),
            )
        })?;
        tokio::spawn(reaper.clone().run(sigchld));
        let tmp = TempRun::create("restore").map_err(|(p, e)| {
            Failed(
                Status::Failure,
                format!("cannot create a private directory at {}: {e}", p.display()),
            )
        })?;
        let paths = RunPaths::new(&tmp.0, &tmp.0);
        paths.prepare(&s3).map_err(|(p, e)| {
            Failed(
                Status::Failure,
                format!(
                    "cannot write a temporary rclone config at {}: {e}",
                    p.display()
                ),
            )
        })?;
        let (mut rcd, _) = super::start_rcd(&reaper, &cfg, &paths)
            .await
            .map_err(|e| fail(Status::StorageUnavailable)(e.to_string()))?;
        let r = fetch(&paths, &s3.raw_remote(), to, &excludes).await;
        rcd.terminate(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
        r
    })
}

async fn fetch(
    paths: &RunPaths,
    raw_remote: &str,
    to: &Path,
    excludes: &Excludes,
) -> Result<String, Failed> {
    let socket = &paths.rc_socket;
    match keycheck::inspect(socket, raw_remote, &paths.scratch).await {
        Ok(_) => {}
        Err(e @ KeyCheckError::WrongKey { .. }) => {
            return Err(Failed(Status::WrongKey, e.to_string()))
        }
        Err(e) => return Err(Failed(Status::StorageUnavailable, e.to_string())),
    }
    let unavailable = fail(Status::StorageUnavailable);
    for (from, filter) in [
        ("", json!({ "ExcludeRule": excludes.rules() })),
        // A user's own top-level `sqlite/` or `.cvm-trash/`.
        (USER_DIR, json!({})),
    ] {
        let params = json!({
            "srcFs": format!("{CRYPT_REMOTE}:{from}"), "dstFs": to.to_string_lossy(),
            "_filter": filter,
            "_config": { "Links": true, "Transfers": 8, "Checkers": 16 },
        });
        match rc::call(socket, "sync/copy", &params).await {
            Ok(_) => {}
            Err(rc::RcError::Status { body, .. }) if body.contains("directory not found") => {}
            Err(e) => return Err(unavailable(format!("copying the files: {e}"))),
        }
    }
    let tree = treemeta::fetch(socket, &paths.scratch)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    if let Some((tree, _)) = &tree {
        treemeta::apply(to, tree);
    }
    let dbs = restore_databases(socket, to, &paths.scratch.join("restore-sqlite"))
        .await
        .map_err(|e| Failed(Status::Unrestorable, e.to_string()))?;
    let files = crate::storage::replicate::scan::scan(to, excludes)
        .files
        .len();
    Ok(format!(
        "restored the latest state into {}: {files} files (as of the last replication pass{}), {} databases \
         (each to its last uploaded change)",
        to.display(),
        if tree.is_some() { "" } else { "; no tree.json, so default modes" },
        dbs.len()
    ))
}
