//! `cvm-init history [--json]`: what `cvm-init restore --at` can restore,
//! per database (oldest point, the range where every change is a point,
//! hourly points before it, bytes stored) and for the files. Reads only.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::json;

use super::{bucket_config, fail, with_bucket, Failed};
use crate::exit::Status;
use crate::rclone::{rc, RunPaths, CRYPT_REMOTE};
use crate::remote::bucket::{HIST_DIR, META_DIR, TRASH_DIR, WAL_DIR};
use crate::sqlite::history::{self, Summary};
use crate::sqlite::line::{self, Object};
use crate::storage::replicate::timeline;
use crate::timepoint;

pub fn run(as_json: bool) -> Status {
    let r = bucket_config()
        .and_then(|(cfg, s3)| with_bucket("history", &cfg, &s3, async |paths| read(paths).await));
    match r {
        Ok((dbs, files, trash_days)) => {
            if as_json {
                let dbs: BTreeMap<String, &Summary> = dbs
                    .iter()
                    .map(|(rel, s)| (rel.display().to_string(), s))
                    .collect();
                println!(
                    "{}",
                    json!({ "databases": dbs, "files": files, "trash_days": trash_days })
                );
            } else {
                print!("{}", render(&dbs, &files, &trash_days));
            }
            Status::Clean
        }
        Err(Failed(status, msg)) => {
            eprintln!("cvm-init history: {msg}");
            status
        }
    }
}

type Dbs = BTreeMap<PathBuf, Summary>;

/// The files' history: older versions kept.
#[derive(Debug, serde::Serialize)]
struct Files {
    versions: usize,
    names: usize,
    /// When the oldest kept version was written (Unix ms).
    oldest: Option<u64>,
    bytes: u64,
}

async fn read(paths: &RunPaths) -> Result<(Dbs, Files, Vec<String>), Failed> {
    let socket = &paths.rc_socket;
    let unavailable = fail(Status::StorageUnavailable);
    let rels = line::with_manifests(socket)
        .await
        .map_err(|e| unavailable(format!("listing {META_DIR}/{WAL_DIR}: {e}")))?;
    let mut dbs = BTreeMap::new();
    for rel in rels {
        let manifest = line::read_manifest(socket, &rel, &paths.scratch)
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .unwrap_or_default();
        let objects = line::list(socket, &rel)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let bytes = objects.iter().map(|(_, n)| n).sum();
        let segments: Vec<_> = objects
            .iter()
            .filter_map(|(below, _)| match line::classify(below) {
                Object::Segment { gen, seg } => Some((gen, seg)),
                _ => None,
            })
            .collect();
        dbs.insert(
            rel,
            history::summarize(&manifest.bases, &segments, objects.len(), bytes),
        );
    }
    let versions = timeline::versions(socket)
        .await
        .map_err(|e| unavailable(format!("listing {META_DIR}/{HIST_DIR}: {e}")))?;
    let files = Files {
        versions: versions.len(),
        names: versions
            .iter()
            .map(|(v, _)| &v.name)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        oldest: versions.iter().map(|(v, _)| v.start).min(),
        bytes: versions.iter().map(|(_, n)| n).sum(),
    };
    let days = rc::list(
        socket,
        &json!({ "fs": format!("{CRYPT_REMOTE}:{TRASH_DIR}"), "remote": "", "opt": { "dirsOnly": true } }),
    )
    .await
    .map_err(|e| unavailable(format!("listing {TRASH_DIR}: {e}")))?
    .iter()
    .filter_map(|i| i["Path"].as_str().map(str::to_owned))
    .collect();
    Ok((dbs, files, days))
}

fn render(dbs: &Dbs, files: &Files, trash_days: &[String]) -> String {
    let t = |ms: Option<u64>| ms.map_or_else(|| "-".to_owned(), timepoint::format);
    let mut out = String::new();
    if dbs.is_empty() {
        out.push_str("databases: no history on S3 (no WAL database saved yet)\n");
    }
    for (rel, s) in dbs {
        out.push_str(&format!(
            "{}\n  every change:  {} .. {}\n  hourly points: {} before that, the oldest {}\n  stock base:    taken {}\n  stored:        {} objects, {} bytes\n",
            rel.display(),
            t(s.continuous_from),
            t(s.newest),
            s.hourly_points,
            t(s.oldest),
            t(s.stock_base),
            s.objects,
            s.bytes,
        ));
    }
    out.push_str(&format!(
        "files\n  older versions: {} of {} files, {} bytes; the oldest written {}\n  {TRASH_DIR} (deleted \
         databases, files from before the history) by UTC day: {}\n",
        files.versions,
        files.names,
        files.bytes,
        t(files.oldest),
        if trash_days.is_empty() {
            "none".to_owned()
        } else {
            trash_days.join(", ")
        }
    ));
    out
}
