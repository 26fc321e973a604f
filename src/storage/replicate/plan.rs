//! What one replication pass does, decided without doing it: which files to
//! upload, which only changed mode or owner, which wait for their own
//! retry, and which remote files to remove, with the delete guard (a
//! data-safety rail: a wiped state dir must not empty the bucket).

use std::path::Path;

use super::scan::{Manifest, Stamp};
use crate::remote::bucket::local_path;
use crate::storage::replicate::treemeta::{Kind, TreeMeta};

/// Deleting more than this share of the remote tree in one pass is refused…
const MAX_DELETE_SHARE: f64 = 0.5;
/// …unless it is only a handful of files.
const MAX_DELETE_FREE: usize = 10;

/// What a pass compares.
pub struct View<'a> {
    /// What the local scan found.
    pub local: &'a Manifest,
    /// What S3 holds, as far as cvm-init knows.
    pub remote: &'a Manifest,
    /// Types, modes and owners now, and as `tree.json` on S3 has them.
    pub tree: &'a TreeMeta,
    pub tree_on_s3: &'a TreeMeta,
}

/// The pass's decisions.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Content to upload.
    pub uploads: Vec<String>,
    /// Same size and mtime, new mode or owner: `tree.json` carries it.
    pub meta_only: Vec<(String, Stamp)>,
    /// Changed, but waiting for their own retry.
    pub held: Vec<String>,
    /// Remote files whose path changed shape (file ↔ directory): removed
    /// first, and never counted by the delete guard.
    pub shape_changes: Vec<String>,
    /// Remote files deleted locally.
    pub deletes: Vec<String>,
    /// Deletes the guard refused (then `deletes` is empty).
    pub refused_deletes: usize,
}

/// Plans a pass over the names `in_scope` accepts. `unknown` names lie below
/// a directory the scan could not read: never deleted. `waiting` names are
/// held for their own retry.
pub fn plan(
    v: &View<'_>,
    in_scope: impl Fn(&str) -> bool,
    unknown: impl Fn(&str) -> bool,
    waiting: impl Fn(&str) -> bool,
) -> Plan {
    let mut p = Plan::default();
    for (name, stamp) in v.local {
        let on_s3 = v.remote.get(name);
        if !in_scope(name) || on_s3 == Some(stamp) {
            continue;
        }
        // Same size and mtime, a new change time, and a new mode or owner:
        // a chmod or chown. A new change time with the same mode and owner
        // is a write that kept size and mtime, and is uploaded.
        let key = local_path(name).to_string_lossy().into_owned();
        let attrs_changed = v.tree.get(&key) != v.tree_on_s3.get(&key);
        if attrs_changed && on_s3.is_some_and(|r| (r.0, r.1) == (stamp.0, stamp.1)) {
            p.meta_only.push((name.clone(), *stamp));
        } else if waiting(name) {
            p.held.push(name.clone());
        } else {
            p.uploads.push(name.clone());
        }
    }
    let gone = v
        .remote
        .keys()
        .filter(|k| in_scope(k) && !v.local.contains_key(*k) && !unknown(k))
        .cloned();
    (p.shape_changes, p.deletes) = gone.partition(|k| shape_changed(k, v.tree));
    if !deletes_allowed(p.deletes.len(), v.remote.len()) {
        p.refused_deletes = p.deletes.len();
        p.deletes.clear();
    }
    p
}

/// The delete guard: whether a pass may delete `deletes` of `remote_files`.
pub fn deletes_allowed(deletes: usize, remote_files: usize) -> bool {
    deletes <= MAX_DELETE_FREE || deletes as f64 <= remote_files as f64 * MAX_DELETE_SHARE
}

/// Whether the remote file `name`, gone locally, went because its path
/// changed shape: it is a directory now, or a directory above it is now a
/// file or a link.
pub fn shape_changed(name: &str, tree: &TreeMeta) -> bool {
    let p = local_path(name);
    let kind = |a: &Path| tree.get(a.to_string_lossy().as_ref()).map(|e| e.kind);
    kind(&p) == Some(Kind::Dir)
        || p.ancestors()
            .skip(1)
            .any(|a| matches!(kind(a), Some(Kind::File | Kind::Link)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::replicate::treemeta::Entry;

    fn entry(kind: Kind, mode: u32) -> Entry {
        Entry {
            kind,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    fn tree(entries: &[(&str, Kind, u32)]) -> TreeMeta {
        entries
            .iter()
            .map(|(p, k, m)| ((*p).to_owned(), entry(*k, *m)))
            .collect()
    }

    fn manifest(files: &[(&str, Stamp)]) -> Manifest {
        files.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect()
    }

    #[test]
    fn the_delete_guard_refuses_more_than_half_unless_a_handful() {
        let table = [
            (0, 0, true),
            (10, 10, true),  // a handful, even if it is everything
            (11, 22, true),  // exactly half
            (11, 21, false), // more than half
            (500, 1000, true),
            (501, 1000, false),
        ];
        for (deletes, remote, want) in table {
            assert_eq!(
                deletes_allowed(deletes, remote),
                want,
                "{deletes} of {remote}"
            );
        }
    }

    #[test]
    fn a_pass_sorts_changes_into_uploads_metadata_holds_and_deletes() {
        let remote = manifest(&[
            ("same", (1, 10, 100)),
            ("written", (1, 10, 100)),
            ("chmod", (1, 10, 100)),
            ("kept-stamp-write", (1, 10, 100)),
            ("failing", (1, 10, 100)),
            ("deleted", (1, 10, 100)),
            ("unreadable/x", (1, 10, 100)),
            ("out-of-scope", (1, 10, 100)),
            ("d", (1, 10, 100)),
        ]);
        let local = manifest(&[
            ("same", (1, 10, 100)),
            ("written", (2, 20, 200)),
            ("chmod", (1, 10, 200)),
            ("kept-stamp-write", (1, 10, 200)),
            ("failing", (3, 30, 300)),
            ("new", (1, 10, 100)),
            ("d/inside", (1, 10, 100)),
        ]);
        let on_s3 = tree(&[
            ("chmod", Kind::File, 0o644),
            ("kept-stamp-write", Kind::File, 0o644),
        ]);
        let now = tree(&[
            ("chmod", Kind::File, 0o600),
            ("kept-stamp-write", Kind::File, 0o644),
            ("d", Kind::Dir, 0o755),
        ]);
        let v = View {
            local: &local,
            remote: &remote,
            tree: &now,
            tree_on_s3: &on_s3,
        };
        let p = plan(
            &v,
            |n| n != "out-of-scope",
            |n| n.starts_with("unreadable/"),
            |n| n == "failing",
        );
        assert_eq!(
            p.uploads,
            ["d/inside", "kept-stamp-write", "new", "written"]
        );
        assert_eq!(p.meta_only, [("chmod".to_owned(), (1, 10, 200))]);
        assert_eq!(p.held, ["failing"]);
        assert_eq!(p.shape_changes, ["d"], "a file that became a directory");
        assert_eq!(p.deletes, ["deleted"]);
        assert_eq!(p.refused_deletes, 0);
    }

    #[test]
    fn a_wiped_state_dir_deletes_nothing_but_shape_changes_still_go() {
        let mut files: Vec<(String, Stamp)> =
            (0..40).map(|i| (format!("f{i}"), (1, 1, 1))).collect();
        files.push(("x".to_owned(), (1, 1, 1)));
        let remote: Manifest = files.into_iter().collect();
        let local = manifest(&[("x/now-a-dir", (1, 1, 1))]);
        let now = tree(&[("x", Kind::Dir, 0o755)]);
        let v = View {
            local: &local,
            remote: &remote,
            tree: &now,
            tree_on_s3: &TreeMeta::new(),
        };
        let p = plan(&v, |_| true, |_| false, |_| false);
        assert!(p.deletes.is_empty());
        assert_eq!(p.refused_deletes, 40);
        assert_eq!(p.shape_changes, ["x"]);
        assert_eq!(p.uploads, ["x/now-a-dir"]);
    }

    #[test]
    fn shape_changes_are_told_from_deletions() {
        let t = tree(&[
            ("x", Kind::File, 0o644),
            ("d", Kind::Dir, 0o755),
            ("l", Kind::Link, 0o777),
            ("keep", Kind::Dir, 0o755),
        ]);
        for (name, want) in [
            ("x/f1", true),         // a directory replaced by a file
            ("x/deep/f", true),     // …at any depth
            ("d", true),            // a file replaced by a directory
            ("d.rclonelink", true), // a link replaced by a directory
            ("l/f", true),          // a directory replaced by a link
            ("keep/gone", false),   // a plain deletion
            ("gone", false),
        ] {
            assert_eq!(shape_changed(name, &t), want, "{name}");
        }
    }
}
