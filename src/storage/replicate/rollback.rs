//! Rollback boot (`CVM_RESTORE_AT=TIME`, replicate layout): before the
//! restore, the bucket's head becomes the state as it was at TIME, so the
//! ordinary restore that follows brings it back and everything after
//! continues from it. Nothing is lost: each head replaced or removed is
//! kept in the history first (a file as a version ending now, a database
//! as its older bases and segments), so the abandoned state stays
//! restorable with `cvm-init restore --at`, and a rollback can be undone.
//!
//! 1. The state dir's own contents are set aside under its `.cvm/` (never
//!    replicated), so a kept state dir cannot overwrite the rolled-back
//!    head; the restore then starts from an empty state dir.
//! 2. Files: per name, what it was at TIME (`timeline`): a kept version
//!    is copied (server-side) over the head, after the head is copied to
//!    the history; a name that did not exist then is moved to the history.
//! 3. Databases: each restored as of TIME, then published as the first
//!    base of a new generation (the old ones stay in its manifest); one
//!    that did not exist then moves to the trash, as a deleted one does.
//! 4. `.cvm/rollbacks` records it. A later boot with the same
//!    `CVM_RESTORE_AT` as the last rollback boots from the latest state,
//!    so a variable left set does not roll back again at every boot.
//!
//! A crash before step 4 leaves a rollback that the next boot does again.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::scan::Excludes;
use super::timeline::{self, At};
use super::{history, treemeta, ReplicateError};
use crate::rclone::rc;
use crate::rclone::CRYPT_REMOTE;
use crate::remote::bucket::{trash_day, META_DIR, ROLLBACKS, SQLITE_DIR, TRASH_DIR};
use crate::remote::lease::Fence;
use crate::sqlite::line::{self, BaseRef};
use crate::sqlite::restore::restore_databases_at;
use crate::timepoint;

/// One rollback done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `CVM_RESTORE_AT` as given.
    pub to: String,
    /// The moment it meant (Unix ms).
    pub to_ms: u64,
    /// When the rollback was done.
    pub at_ms: u64,
}

/// What a rollback boot did.
#[derive(Debug)]
pub enum Outcome {
    Done {
        to_ms: u64,
        files: usize,
        databases: usize,
        set_aside: Option<PathBuf>,
    },
    /// This value was rolled back to before, at `at_ms`.
    AlreadyDone { at_ms: u64 },
}

/// What a rollback needs.
pub struct Rollback<'a> {
    pub socket: &'a Path,
    pub state_dir: &'a Path,
    /// Local space for the databases on their way.
    pub scratch: &'a Path,
    pub excludes: &'a Excludes,
    pub fence: &'a Fence,
    pub history_days: u32,
}

impl Rollback<'_> {
    /// Rolls the bucket back to `to` (`CVM_RESTORE_AT`), unless done before.
    pub async fn run(&self, to: &str) -> Result<Outcome, ReplicateError> {
        let failed = |detail: String| ReplicateError::Restore {
            dir: self.state_dir.to_owned(),
            detail: format!("rolling back to CVM_RESTORE_AT={to}: {detail}"),
            missing: Vec::new(),
        };
        let rc_failed = |e: rc::RcError| failed(e.to_string());
        let mut records = self.records().await.map_err(rc_failed)?;
        // The last rollback only: rolling back to X, then to Y, then to X
        // again is meant.
        if let Some(r) = records.last().filter(|r| r.to == to) {
            return Ok(Outcome::AlreadyDone { at_ms: r.at_ms });
        }
        let now = timepoint::now_ms();
        let to_ms = timepoint::parse(to, now).map_err(failed)?;
        let files = timeline::at(self.socket, self.excludes, to_ms)
            .await
            .map_err(rc_failed)?;
        let staging = self.scratch.join("rollback-sqlite");
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(|e| failed(format!("{}: {e}", staging.display())))?;
        let dbs = restore_databases_at(
            self.socket,
            &staging,
            &self.scratch.join("rollback-segments"),
            Some(to_ms),
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
        // The tree is rolled back with the files (`files`), but it is no
        // file: it does not count as something the moment held.
        let tree = treemeta::object();
        let files_only = || files.iter().filter(|(n, _)| **n != tree).map(|(_, w)| w);
        let heads = files_only()
            .filter(|w| !matches!(w, At::Absent { head: None }))
            .count();
        let then = files_only()
            .filter(|w| !matches!(w, At::Absent { .. }))
            .count();
        if (heads > 0 || !dbs.not_yet.is_empty()) && then == 0 && dbs.dbs.is_empty() {
            let _ = fs::remove_dir_all(&staging);
            return Err(failed(format!(
                "{} is before anything the history holds; `cvm-init history` lists what it holds",
                timepoint::format(to_ms)
            )));
        }
        let set_aside = self.set_aside(now).map_err(failed)?;
        let changed = self.files(&files, now).await.map_err(rc_failed)?;
        // A database without history (not in WAL mode) stays as it is.
        let rolled: Vec<_> = dbs.dbs.iter().filter(|(_, r)| r.point.is_some()).collect();
        for (rel, r) in &rolled {
            self.publish(rel, &r.known.sha256, &staging, now)
                .await
                .map_err(rc_failed)?;
        }
        for (rel, _) in &dbs.not_yet {
            self.to_trash(rel, now).await.map_err(rc_failed)?;
        }
        let _ = fs::remove_dir_all(&staging);
        records.push(Record {
            to: to.to_owned(),
            to_ms,
            at_ms: now,
        });
        self.write_records(&records).await.map_err(rc_failed)?;
        Ok(Outcome::Done {
            to_ms,
            files: changed,
            databases: rolled.len(),
            set_aside,
        })
    }

    async fn records(&self) -> Result<Vec<Record>, rc::RcError> {
        let remote = format!("{META_DIR}/{ROLLBACKS}");
        let Some(bytes) = rc::read_object(
            self.socket,
            &format!("{CRYPT_REMOTE}:"),
            &remote,
            self.scratch,
        )
        .await?
        else {
            return Ok(Vec::new());
        };
        serde_json::from_slice(&bytes).map_err(|e| rc::RcError::Io {
            path: PathBuf::from(remote),
            source: std::io::Error::other(e),
        })
    }

    async fn write_records(&self, records: &[Record]) -> Result<(), rc::RcError> {
        let local = self.scratch.join(ROLLBACKS);
        fs::write(&local, serde_json::to_vec(records).expect("serializable")).map_err(
            |source| rc::RcError::Io {
                path: local.clone(),
                source,
            },
        )?;
        self.writer()
            .copy(
                (&self.scratch.to_string_lossy(), ROLLBACKS),
                (&format!("{CRYPT_REMOTE}:{META_DIR}"), ROLLBACKS),
            )
            .await
    }

    /// Moves the state dir's entries (all but its `.cvm/`) to
    /// `.cvm/before-rollback-<ms>/` inside it, and removes the evidence
    /// that it is this bucket's replica. `None` when it held nothing.
    fn set_aside(&self, now: u64) -> Result<Option<PathBuf>, String> {
        let entries: Vec<_> = match fs::read_dir(self.state_dir) {
            Ok(e) => e.flatten().filter(|e| e.file_name() != META_DIR).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", self.state_dir.display())),
        };
        let meta = self.state_dir.join(META_DIR);
        let _ = fs::remove_file(meta.join(super::EVIDENCE));
        if entries.is_empty() {
            return Ok(None);
        }
        let aside = meta.join(format!("before-rollback-{now}"));
        fs::create_dir_all(&aside).map_err(|e| format!("{}: {e}", aside.display()))?;
        for e in entries {
            let to = aside.join(e.file_name());
            fs::rename(e.path(), &to).map_err(|err| format!("{}: {err}", e.path().display()))?;
        }
        Ok(Some(aside))
    }

    /// Makes each file's head what it was then; returns how many changed.
    async fn files(
        &self,
        files: &std::collections::BTreeMap<String, At>,
        now: u64,
    ) -> Result<usize, rc::RcError> {
        let root = format!("{CRYPT_REMOTE}:");
        let writer = self.writer();
        let mut changed = 0;
        for (name, what) in files {
            match what {
                At::Head | At::Absent { head: None } => continue,
                At::Absent { head: Some(m) } => {
                    self.keep_head(name, *m, now, "operations/movefile").await?;
                }
                At::Version { version, head } => {
                    if let Some(m) = head {
                        self.keep_head(name, *m, now, "operations/copyfile").await?;
                    }
                    writer
                        .copy((&root, &version.object()), (&root, name))
                        .await?;
                }
            }
            changed += 1;
        }
        Ok(changed)
    }

    /// Keeps `name`'s head, live since its mtime `m`, as a version ending
    /// `now`: a copy, or a move to take it away.
    async fn keep_head(
        &self,
        name: &str,
        m: u64,
        now: u64,
        method: &str,
    ) -> Result<(), rc::RcError> {
        let root = format!("{CRYPT_REMOTE}:");
        let kept = history::superseded(name, Some(m), now).object();
        self.writer()
            .transfer(method, (&root, name), (&root, &kept))
            .await
    }

    /// Publishes the database restored at `staging/rel` (content hash
    /// `sha256`) as the first base of a new generation.
    async fn publish(
        &self,
        rel: &Path,
        sha256: &[u8; 32],
        staging: &Path,
        now: u64,
    ) -> Result<(), rc::RcError> {
        let manifest = line::read_manifest(self.socket, rel, self.scratch)
            .await?
            .unwrap_or_default();
        let base = BaseRef::new(line::new_gen(), 0, sha256, now);
        self.writer()
            .publish(rel, (staging, &rel.to_string_lossy()), &base, &manifest)
            .await
            .map(drop)
    }

    /// A database that did not exist then: its stock base goes to today's
    /// trash, so the restore does not bring it back; its history stays,
    /// its manifest marked (a young one has no stock copy to move).
    async fn to_trash(&self, rel: &Path, now: u64) -> Result<(), rc::RcError> {
        if let Some(mut m) = line::read_manifest(self.socket, rel, self.scratch).await? {
            if m.restores_without_stock(None) {
                m.gone_ms = Some(now);
                line::write_manifest(self.socket, rel, &m, self.scratch, self.fence).await?;
            }
        }
        let day = trash_day(std::time::SystemTime::now());
        let (fs, remote) = line::stock(rel);
        let r = self
            .writer()
            .transfer(
                "operations/movefile",
                (&fs, &remote),
                (
                    &format!("{CRYPT_REMOTE}:{TRASH_DIR}/{day}/{SQLITE_DIR}"),
                    &remote,
                ),
            )
            .await;
        match r {
            Err(rc::RcError::Status { status: 404, .. }) => Ok(()),
            r => r,
        }
    }

    fn writer(&self) -> line::Writer<'_> {
        line::Writer {
            socket: self.socket,
            scratch: self.scratch,
            fence: self.fence,
            history_days: self.history_days,
        }
    }
}
