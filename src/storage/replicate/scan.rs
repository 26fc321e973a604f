//! The local scan: what the state dir holds that is replicated, and what
//! is left out (excludes, live databases, names rclone cannot carry,
//! directories that cannot be read).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use globset::GlobSet;

use super::treemeta::{self, Kind, TreeMeta};
use crate::remote::bucket::{local_path, remote_name, LINK_SUFFIX, META_DIR, RESERVED};
use crate::sqlite::{Patterns, SIDECARS};

/// What is never replicated as a file: the user's excludes, live databases
/// and their sidecars (snapshots carry them), and cvm-init's own prefixes.
#[derive(Debug, Clone)]
pub struct Excludes {
    rules: Vec<String>,
    set: GlobSet,
    /// Paths `CVM_SQLITE_PATHS` matches: excluded when they hold a SQLite
    /// database (its snapshots carry it), replicated as files otherwise.
    db: GlobSet,
}

impl Excludes {
    pub fn new(user: &[String], dbs: &Patterns) -> Result<Excludes, globset::Error> {
        // cvm-init's own prefixes on the remote. Locally only `.cvm` is
        // cvm-init's; a user's own top-level `sqlite/` or `.cvm-trash/` is
        // replicated under `.cvm/user/` (see `remote_name`).
        let remote_only = RESERVED.map(|r| format!("/{r}/**"));
        let mut rules: Vec<String> = vec![format!("/{META_DIR}"), format!("/{META_DIR}/**")];
        rules.extend(user.iter().cloned());
        let mut db = Vec::new();
        for p in dbs
            .as_str()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            db.push(format!("/{p}"));
            rules.extend(SIDECARS.iter().map(|s| format!("/{p}{s}")));
            // The mount layout keeps a link where each database was: on a bucket
            // that switches layouts it must not come back in place of the database.
            rules.push(format!("/{p}{LINK_SUFFIX}"));
        }
        let set = crate::filter::globset(&rules)?;
        rules.extend(remote_only);
        Ok(Excludes {
            rules,
            set,
            db: crate::filter::globset(&db)?,
        })
    }

    /// The rules in rclone filter syntax (`ExcludeRule`), for the remote
    /// tree: they also leave out cvm-init's prefixes there.
    pub fn rules(&self) -> &[String] {
        &self.rules
    }

    pub fn excluded(&self, rel: &Path) -> bool {
        self.set.is_match(rel)
    }

    /// Whether `rel` below `root` is a live database (a database pattern's
    /// match that starts with the SQLite header), never replicated as a file.
    pub fn is_database(&self, root: &Path, rel: &Path) -> bool {
        self.db.is_match(rel) && crate::sqlite::is_sqlite(&root.join(rel)).unwrap_or(false)
    }
}

/// Size, mtime and change time of a file as last replicated (see `stamp`).
pub type Stamp = (u64, i64, i64);
/// Remote name (symlinks with `.rclonelink`) → stamp.
pub type Manifest = BTreeMap<String, Stamp>;
/// When remote heads were written (Unix ms), as S3 lists them.
pub type Written = BTreeMap<String, u64>;

/// What a local scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every replicated file, keyed by its remote name.
    pub files: Manifest,
    /// Every entry's type, mode and owner (`treemeta`).
    pub tree: TreeMeta,
    /// Directories that could not be read (without `CAP_DAC_OVERRIDE`, a
    /// mode-000 one): what is below them is unknown, never "deleted".
    pub unreadable: Vec<String>,
    /// Entries whose names rclone cannot carry byte for byte, with why:
    /// never replicated (see [`refusal`]).
    pub refused: Vec<(String, &'static str)>,
}

impl Scan {
    /// Whether `name` lies below a directory the scan could not read.
    pub fn unknown(&self, name: &str) -> bool {
        let p = local_path(name);
        self.unreadable.iter().any(|d| p.starts_with(d))
    }
}

/// Why an entry named `name` cannot be replicated, if it cannot. Checked
/// with rclone 1.75: a name containing `‛` (U+201B, rclone's quoting
/// character) comes back with it doubled, even with `--local-encoding None`;
/// a regular file named `*.rclonelink` comes back as a symlink (`--links`);
/// a name that is not UTF-8 cannot travel through the rc API (JSON).
/// Refused names are named in a warning when they appear, never uploaded.
pub fn refusal(name: &std::ffi::OsStr, regular_file: bool) -> Option<&'static str> {
    let Some(name) = name.to_str() else {
        return Some("the name is not UTF-8");
    };
    if name.contains('\u{201B}') {
        return Some("the name contains ‛ (U+201B), which rclone's name encoding does not carry");
    }
    if regular_file && name.ends_with(LINK_SUFFIX) {
        return Some("a regular file named *.rclonelink would come back as a symbolic link");
    }
    None
}

/// Scans `root` for what is replicated.
pub fn scan(root: &Path, excludes: &Excludes) -> Scan {
    fn walk(root: &Path, rel: &Path, ex: &Excludes, out: &mut Scan) {
        let entries = match fs::read_dir(root.join(rel)) {
            Ok(e) => e,
            // Gone since its parent was read: nothing below it any more.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => {
                out.unreadable.push(rel.to_string_lossy().into_owned());
                return;
            }
        };
        for e in entries.flatten() {
            let child = rel.join(e.file_name());
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if ex.excluded(&child) {
                continue;
            }
            if meta.is_file() && ex.is_database(root, &child) {
                continue;
            }
            let name = child.to_string_lossy().into_owned();
            if let Some(why) = refusal(&e.file_name(), meta.is_file()) {
                out.refused.push((name, why));
                continue;
            }
            let Some(entry) = treemeta::Entry::of(&meta) else {
                continue;
            };
            match entry.kind {
                Kind::Dir => walk(root, &child, ex, out),
                Kind::Link => {
                    out.files
                        .insert(format!("{}{LINK_SUFFIX}", remote_name(&name)), stamp(&meta));
                }
                Kind::File => {
                    out.files.insert(remote_name(&name), stamp(&meta));
                }
            }
            out.tree.insert(name, entry);
        }
    }
    let mut out = Scan::default();
    walk(root, Path::new(""), excludes, &mut out);
    out
}

/// Size, mtime (ms) and change time (ns) of a file. The change time moves
/// with any write, also one that puts the old size and mtime back (`cp -p`,
/// `touch -r`, `tar x`), and with a mode or owner change (see `Engine::pass`).
pub fn stamp(meta: &fs::Metadata) -> Stamp {
    (
        meta.len(),
        meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn excludes_follow_rclone_semantics() {
        let ex = Excludes::new(
            &crate::config::DEFAULT_EXCLUDE
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>(),
            &Patterns::default(),
        )
        .unwrap();
        for yes in [
            "tmp/openclaw-0/x.lock",
            "cache/a/b",
            "agents/a/x.lock",
            "state/openclaw.sqlite-wal",
            "state/openclaw.sqlite-shm",
            ".cvm/replica",
        ] {
            assert!(ex.excluded(Path::new(yes)), "{yes}");
        }
        for no in [
            // A user's own: replicated below `.cvm/user/`.
            ".cvm-trash/2026-01-01/a",
            "sqlite/state/openclaw.sqlite",
            "openclaw.json",
            "workspace/tmp/notes.md",
            "agents/main/agent/auth.json",
            "state/other.json",
        ] {
            assert!(!ex.excluded(Path::new(no)), "{no}");
        }
        assert!(ex.rules().contains(&"/state/*.sqlite-wal".to_owned()));
        assert!(ex.excluded(Path::new("state/openclaw.sqlite.rclonelink")));
        // A database path is a database only with the SQLite header.
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("state")).unwrap();
        let db = Path::new("state/openclaw.sqlite");
        fs::write(dir.path().join(db), "{\"not\": \"a database\"}").unwrap();
        assert!(!ex.excluded(db) && !ex.is_database(dir.path(), db));
        fs::remove_file(dir.path().join(db)).unwrap();
        rusqlite::Connection::open(dir.path().join(db))
            .unwrap()
            .execute_batch("CREATE TABLE t(x)")
            .unwrap();
        assert!(ex.is_database(dir.path(), db));
    }

    #[test]
    fn cvm_init_names_are_excluded_and_a_users_reserved_names_are_not() {
        let ex = Excludes::new(&[], &Patterns::default()).unwrap();
        assert!(!ex.excluded(Path::new("sqlite/notes.txt")));
        assert!(ex.excluded(Path::new(".cvm/replica")));
        assert!(ex.rules().contains(&"/sqlite/**".to_owned()));
    }

    #[test]
    fn names_rclone_cannot_carry_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let os = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_owned();
        assert!(refusal(&os(b"bad\xff"), true).is_some());
        assert!(refusal(&os("a\u{201B}b".as_bytes()), true).is_some());
        assert!(refusal(&os(b"x.rclonelink"), true).is_some());
        assert!(
            refusal(&os(b"x.rclonelink"), false).is_none(),
            "a directory may have that name"
        );
        assert!(refusal(&os("caf\u{e9} (1).md".as_bytes()), true).is_none());
    }

    #[test]
    fn scan_lists_files_links_and_dir_modes() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::set_permissions(r.join("a"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(r.join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink("f", r.join("a/b/l")).unwrap();
        fs::create_dir_all(r.join("tmp")).unwrap();
        fs::write(r.join("tmp/skip"), "x").unwrap();
        let ex = Excludes::new(&["/tmp/**".to_owned()], &Patterns::default()).unwrap();
        let Scan { files, tree, .. } = scan(r, &ex);
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["a/b/f", "a/b/l.rclonelink"]
        );
        assert_eq!(tree["a"].kind, Kind::Dir);
        assert_eq!(tree["a"].mode, 0o700);
        assert_eq!(tree["a/b/l"].kind, Kind::Link);
        assert!(!tree.contains_key("tmp/skip"));
    }
}
