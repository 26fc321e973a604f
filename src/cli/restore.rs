//! `cvm-init restore --to DIR [--at TIME]`: the state dir as S3 holds it,
//! written into DIR from any machine with the appliance's environment. No
//! FUSE, no lease (it only reads), nothing written to the bucket: the
//! rclone config lives in a private temporary directory, removed at the end.
//!
//! Files come as the last replication pass left them (content, symlinks,
//! then modes, owners and empty directories from `tree.json`), or with
//! `--at`, each as the version live at TIME (`storage::replicate::history`).
//! Each database as its base plus every segment after it, or with `--at`,
//! as of the newest restore point at or before TIME.

use std::fs;
use std::path::Path;

use serde_json::json;

use super::{bucket_config, fail, with_bucket, Failed};
use crate::exit::Status;
use crate::rclone::{rc, RunPaths, CRYPT_REMOTE};
use crate::remote::bucket::{local_path, LINK_SUFFIX, USER_DIR};
use crate::sqlite::restore::restore_databases_at;
use crate::storage::replicate::timeline::{self, At};
use crate::storage::replicate::{scan::Excludes, treemeta};
use crate::timepoint;

/// Restores into `to` (absent or empty) as of `at` (see
/// [`crate::timepoint::parse`]; `None`: the latest state).
pub fn run(to: &Path, at: Option<&str>) -> Status {
    match restore(to, at) {
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

fn restore(to: &Path, at: Option<&str>) -> Result<String, Failed> {
    let at = at
        .map(|a| timepoint::parse(a, timepoint::now_ms()))
        .transpose()
        .map_err(|e| Failed(Status::Usage, format!("--at {e}")))?;
    let (cfg, s3) = bucket_config()?;
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
    let r = with_bucket("restore", &cfg, &s3, async |paths| {
        fetch(paths, to, &excludes, at).await
    });
    if r.is_err() {
        // It was absent or empty: a failed restore leaves no half state to
        // be mistaken for a whole one.
        empty(to);
    }
    r
}

fn empty(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
}

async fn fetch(
    paths: &RunPaths,
    to: &Path,
    excludes: &Excludes,
    at: Option<u64>,
) -> Result<String, Failed> {
    let socket = &paths.rc_socket;
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
    let (versions, tree_at) = match at {
        Some(at) => files_at(socket, to, excludes, at)
            .await
            .map_err(|e| unavailable(format!("restoring the files' versions: {e}")))?,
        None => (0, None),
    };
    let tree = match tree_at {
        Some(At::Version { version, .. }) => {
            treemeta::fetch_object(socket, &paths.scratch, &version.object(), false)
                .await
                .map(|t| t.map(|t| (t, false)))
        }
        Some(At::Absent { .. }) => Ok(None),
        Some(At::Head) | None => treemeta::fetch(socket, &paths.scratch).await,
    }
    .map_err(|e| unavailable(e.to_string()))?;
    if let Some((tree, _)) = &tree {
        treemeta::apply(to, tree);
    }
    let dbs = restore_databases_at(socket, to, &paths.scratch.join("restore-sqlite"), at)
        .await
        .map_err(|e| Failed(Status::Unrestorable, e.to_string()))?;
    let files = crate::storage::replicate::scan::scan(to, excludes)
        .files
        .len();
    let Some(at) = at else {
        return Ok(format!(
            "restored the latest state into {}: {files} files (as of the last replication pass{}), {} databases \
             (each to its last uploaded change)",
            to.display(),
            if tree.is_some() { "" } else { "; no tree.json, so default modes" },
            dbs.dbs.len()
        ));
    };
    if dbs.dbs.is_empty() && !dbs.not_yet.is_empty() {
        let oldest = dbs.not_yet.iter().filter_map(|(_, o)| *o).min();
        return Err(Failed(
            Status::Usage,
            format!(
                "{} is outside the history: the oldest restore point is {}; `cvm-init history` lists them",
                timepoint::format(at),
                oldest.map_or_else(|| "unknown".to_owned(), timepoint::format)
            ),
        ));
    }
    let mut lines = vec![format!(
        "restored the state as of {} into {}: {} databases, {files} files ({versions} of them older versions \
         from the history)",
        timepoint::format(at),
        to.display(),
        dbs.dbs.len(),
    )];
    for (rel, r) in &dbs.dbs {
        lines.push(match r.point {
            Some(p) => format!("  {}: as of {}", rel.display(), timepoint::format(p)),
            None => format!(
                "  {}: its latest state (it has no history: not a WAL database, or saved by an older cvm-init)",
                rel.display()
            ),
        });
    }
    for (rel, oldest) in &dbs.not_yet {
        lines.push(format!(
            "  {}: left out, no restore point at or before that time (oldest: {})",
            rel.display(),
            oldest.map_or_else(|| "none".to_owned(), timepoint::format)
        ));
    }
    lines.push(
        "  files: each as it was then, with the modes, owners and empty directories of then (the oldest \
         known, for a moment before cvm-init kept them)"
            .to_owned(),
    );
    Ok(lines.join("\n"))
}

/// Turns the newest files just copied into `to` into the files as they
/// were at `at` ([`timeline::at`]): a name takes its kept version, or is
/// removed. Returns how many came from the history, and which tree
/// (modes, owners, empty directories) was live then. Removals come first,
/// so a name that was a file then and is a directory now (or the reverse)
/// finds its place free.
async fn files_at(
    socket: &Path,
    to: &Path,
    excludes: &Excludes,
    at: u64,
) -> Result<(usize, Option<At>), rc::RcError> {
    let mut names = timeline::at(socket, excludes, at).await?;
    let tree = names.remove(&treemeta::object());
    for (name, what) in &names {
        if *what == At::Head {
            continue;
        }
        let local = to.join(local_path(name));
        if fs::remove_file(&local).is_ok() {
            // Directories the head needed and the moment did not.
            for dir in local.ancestors().skip(1).take_while(|d| *d != to) {
                if fs::remove_dir(dir).is_err() {
                    break;
                }
            }
        }
    }
    let mut from_history = 0;
    for (name, what) in &names {
        let At::Version { version, .. } = what else {
            continue;
        };
        let dst = if name.ends_with(LINK_SUFFIX) {
            format!("{}{LINK_SUFFIX}", local_path(name).display())
        } else {
            local_path(name).display().to_string()
        };
        rc::call(
            socket,
            "operations/copyfile",
            &json!({
                "srcFs": format!("{CRYPT_REMOTE}:"), "srcRemote": version.object(),
                "dstFs": to.to_string_lossy(), "dstRemote": dst,
                "_config": { "Links": true },
            }),
        )
        .await?;
        from_history += 1;
    }
    Ok((from_history, tree))
}
