//! Every name cvm-init uses inside the bucket prefix, in one place. All of
//! them are below the crypt remote: on S3 they are encrypted like the data.
//!
//! - `sqlite/<path>`: the newest snapshot of each database;
//! - `.cvm/key-check`: the key-check marker; `.cvm/lease`: the single-writer
//!   lease, `.cvm/cas-probe` what tells whether S3 honours conditional
//!   writes; `.cvm/tree.json`: types, modes,
//!   owners and empty directories of the state dir (`.cvm/dirs.json` from
//!   older versions); `.cvm/user/…`: a user's own top-level `sqlite/` or
//!   `.cvm-trash/`;
//! - `.cvm/rollbacks`: the rollback boots done;
//! - `.cvm/hist/<name>/<start>-<end>`: overwritten and deleted files, one
//!   object per version (`storage::replicate::history`);
//! - `.cvm-trash/<UTC day>/…`: snapshots of deleted databases under
//!   `sqlite/` (and files, from versions before the history);
//! - `<name>.rclonelink`: a symbolic link, as rclone `--links` stores it.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// Database snapshots.
pub const SQLITE_DIR: &str = "sqlite";
/// cvm-init's own files.
pub const META_DIR: &str = ".cvm";
/// The key-check marker, in [`META_DIR`].
pub const KEY_MARKER: &str = "key-check";
/// The single-writer lease (`lease`), in [`META_DIR`].
pub const LEASE_FILE: &str = "lease";
/// The object that tells whether S3 honours conditional writes, in [`META_DIR`].
pub const CAS_PROBE: &str = "cas-probe";
/// Each WAL database's segments and manifest (`sqlite::line`), in [`META_DIR`].
pub const WAL_DIR: &str = "wal";
/// A WAL database's manifest, in its directory below [`WAL_DIR`].
pub const WAL_MANIFEST: &str = "manifest";
/// The state dir's tree (`treemeta`), in [`META_DIR`].
pub const TREE_FILE: &str = "tree.json";
/// What cvm-init wrote before [`TREE_FILE`]: directory modes only.
pub const LEGACY_DIR_MODES: &str = "dirs.json";
/// The rollback boots done (`storage::replicate::rollback`), in [`META_DIR`].
pub const ROLLBACKS: &str = "rollbacks";
/// Every superseded version of a file, in [`META_DIR`].
pub const HIST_DIR: &str = "hist";
/// Deleted databases, and files from before [`HIST_DIR`], by day.
pub const TRASH_DIR: &str = ".cvm-trash";
/// rclone's name for a symlink stored as an object (`--links`).
pub const LINK_SUFFIX: &str = ".rclonelink";

/// Top-level names cvm-init uses on the remote besides `.cvm`.
pub const RESERVED: [&str; 2] = [SQLITE_DIR, TRASH_DIR];
/// Where a user's own top-level entries with a reserved name live on the remote.
pub const USER_DIR: &str = ".cvm/user";

/// The remote name of the local relative path `local`: the same, but below
/// `.cvm/user/` when its first component is one of cvm-init's prefixes.
pub fn remote_name(local: &str) -> String {
    let first = local.split('/').next().unwrap_or_default();
    if RESERVED.contains(&first) {
        format!("{USER_DIR}/{local}")
    } else {
        local.to_owned()
    }
}

/// The local path of a remote name (a link's object has `.rclonelink`).
pub fn local_path(name: &str) -> PathBuf {
    let name = name.strip_suffix(LINK_SUFFIX).unwrap_or(name);
    let name = name
        .strip_prefix(USER_DIR)
        .and_then(|n| n.strip_prefix('/'))
        .unwrap_or(name);
    PathBuf::from(name)
}

/// Today's trash directory, by UTC day.
pub fn trash_day(now: SystemTime) -> String {
    let days = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    #[test]
    fn trash_days_are_utc_dates() {
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(trash_day(at(0)), "1970-01-01");
        assert_eq!(trash_day(at(951_782_400)), "2000-02-29");
        assert_eq!(trash_day(at(1_795_564_799)), "2026-11-24");
        assert_eq!(trash_day(at(1_795_564_800)), "2026-11-25");
    }

    #[test]
    fn a_users_own_top_level_sqlite_dir_lives_below_cvm_user() {
        assert_eq!(
            remote_name("sqlite/notes.txt"),
            ".cvm/user/sqlite/notes.txt"
        );
        assert_eq!(remote_name(".cvm-trash"), ".cvm/user/.cvm-trash");
        assert_eq!(remote_name("state/sqlite/x"), "state/sqlite/x");
        assert_eq!(remote_name("sqlite-like"), "sqlite-like");
        for local in ["sqlite/notes.txt", "state/x", ".cvm-trash/a"] {
            assert_eq!(local_path(&remote_name(local)), Path::new(local));
        }
        assert_eq!(
            local_path(".cvm/user/sqlite/l.rclonelink"),
            Path::new("sqlite/l")
        );
    }
}
