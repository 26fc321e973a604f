//! The files' time line on S3 (replicate layout): the heads and the kept
//! versions, listed, and what each name was at a moment
//! ([`history::pick`]). Used by `cvm-init restore --at` and the rollback
//! boot.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::json;

use super::history::{self, Version};
use super::scan::Excludes;
use super::treemeta;
use crate::rclone::rc;
use crate::rclone::CRYPT_REMOTE;
use crate::remote::bucket::{HIST_DIR, META_DIR, USER_DIR};

/// What a name was at the moment asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// The head, as S3 holds it now.
    Head,
    /// A kept version; `head` when a head exists now.
    Version { version: Version, head: Option<u64> },
    /// Nothing; `head` (its mtime) when a head exists now.
    Absent { head: Option<u64> },
}

/// Every name S3 holds now or kept a version of, with what it was at `at`;
/// `tree.json` ([`treemeta::object`]) among them.
pub async fn at(
    socket: &Path,
    excludes: &Excludes,
    at: u64,
) -> Result<BTreeMap<String, At>, rc::RcError> {
    let mut heads = BTreeMap::new();
    for (from, filter) in [
        ("", json!({ "ExcludeRule": excludes.rules() })),
        (USER_DIR, json!({})),
    ] {
        for (name, modtime) in list(socket, from, filter).await? {
            let name = if from.is_empty() {
                name
            } else {
                format!("{from}/{name}")
            };
            let mtime = crate::timepoint::modtime_ms(&modtime).unwrap_or(0);
            heads.insert(name, mtime);
        }
    }
    // The tree (modes, owners, empty directories) is kept and picked as a
    // file is; it lives below `.cvm/`, which the listing above leaves out.
    let tree = treemeta::object();
    if let Some(head) = rc::stat(socket, &format!("{CRYPT_REMOTE}:"), &tree, false).await? {
        let mtime = head["ModTime"]
            .as_str()
            .and_then(crate::timepoint::modtime_ms);
        heads.insert(tree.clone(), mtime.unwrap_or(0));
    }
    let mut versions: BTreeMap<String, Vec<Version>> = BTreeMap::new();
    for (v, _) in self::versions(socket).await? {
        versions.entry(v.name.clone()).or_default().push(v);
    }
    let names: BTreeSet<&String> = heads.keys().chain(versions.keys()).collect();
    let mut out: BTreeMap<String, At> = names
        .into_iter()
        .map(|name| {
            let kept: Vec<&Version> = versions.get(name).into_iter().flatten().collect();
            let head = heads.get(name).copied();
            let what = match history::pick(&kept, head, at) {
                history::Pick::Head => At::Head,
                history::Pick::Version(v) => At::Version {
                    version: v.clone(),
                    head,
                },
                history::Pick::Absent => At::Absent { head },
            };
            (name.clone(), what)
        })
        .collect();
    // A moment before the tree's kept history (a cvm-init before it kept
    // none): the oldest tree known, not none, so a restore there still
    // gets modes and owners, as it got today's before.
    if let Some(At::Absent { head }) = out.get(&tree) {
        let head = *head;
        let oldest = versions
            .get(&tree)
            .and_then(|v| v.iter().min_by_key(|v| v.start));
        let what = match (oldest, head) {
            (Some(version), head) => Some(At::Version {
                version: version.clone(),
                head,
            }),
            (None, Some(_)) => Some(At::Head),
            (None, None) => None,
        };
        if let Some(what) = what {
            out.insert(tree, what);
        }
    }
    Ok(out)
}

/// Every kept version of a file, with its size.
pub async fn versions(socket: &Path) -> Result<Vec<(Version, u64)>, rc::RcError> {
    let listed = rc::list(
        socket,
        &json!({
            "fs": format!("{CRYPT_REMOTE}:{META_DIR}/{HIST_DIR}"), "remote": "",
            "opt": { "recurse": true, "filesOnly": true, "noMimeType": true },
        }),
    )
    .await?;
    Ok(listed
        .iter()
        .filter_map(|i| Some((Version::parse(i["Path"].as_str()?)?, i["Size"].as_u64()?)))
        .collect())
}

/// Every file below `dir` of the crypt remote that `filter` lets through:
/// (path below `dir`, its mtime as rclone gives it).
async fn list(
    socket: &Path,
    dir: &str,
    filter: serde_json::Value,
) -> Result<Vec<(String, String)>, rc::RcError> {
    let listed = rc::list(
        socket,
        &json!({
            "fs": format!("{CRYPT_REMOTE}:{dir}"), "remote": "",
            "opt": { "recurse": true, "filesOnly": true, "noMimeType": true },
            "_filter": filter,
        }),
    )
    .await?;
    Ok(listed
        .iter()
        .filter_map(|i| {
            Some((
                i["Path"].as_str()?.to_owned(),
                i["ModTime"].as_str()?.to_owned(),
            ))
        })
        .collect())
}
