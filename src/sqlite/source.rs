//! Where a followed database's changes are read from: its WAL (`pin`), or,
//! in a rollback-journal mode, snapshots compared page by page (`differ`).
//! Both give segments and bases of the same form, so one line on S3, one
//! restore and one history serve either.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::differ::Differ;
use super::pin::Tracker;
use super::segment::Segment;
use super::{Snapshot, SqliteError};
use crate::storage::worker::Interrupt;

pub enum Source {
    Wal(Box<Tracker>),
    Copies(Box<Differ>),
}

impl Source {
    /// Follows `db`: from its WAL in WAL mode, else by snapshots compared
    /// with the last, kept at `mirror`.
    pub fn open(db: &Path, mirror: PathBuf) -> Result<Source, SqliteError> {
        Ok(match Tracker::open(db)? {
            Some(t) => Source::Wal(Box::new(t)),
            None => Source::Copies(Box::new(Differ::open(db, mirror)?)),
        })
    }

    /// What was committed since the last call, or `None`. A long read
    /// (a rollback-journal database's copy) gives up once `interrupt` is set.
    pub fn changes(&mut self, interrupt: &AtomicBool) -> Result<Option<Segment>, SqliteError> {
        match self {
            Source::Wal(t) => t.changes(),
            Source::Copies(d) => d.changes(interrupt),
        }
    }

    /// Reads ahead between saves, where there is something to read (a WAL).
    pub fn move_pin(&mut self) -> Result<Option<Segment>, SqliteError> {
        match self {
            Source::Wal(t) => t.move_pin(),
            Source::Copies(_) => Ok(None),
        }
    }

    /// A whole copy as of what was last read, at `dst`; gives up once
    /// `interrupt` is raised.
    pub fn base(&self, dst: &Path, interrupt: &Arc<Interrupt>) -> Result<Snapshot, SqliteError> {
        match self {
            Source::Wal(t) => t.base(dst, interrupt),
            Source::Copies(d) => d.base(dst, interrupt.flag()),
        }
    }

    /// Whether what is followed is still the database opened, in the same
    /// journal mode, with nothing missed.
    pub fn still_followed(&self) -> bool {
        match self {
            Source::Wal(t) => t.same_file() && !t.lost(),
            Source::Copies(d) => d.same_file(),
        }
    }

    /// Whether the database is in a rollback-journal mode.
    pub fn rollback(&self) -> bool {
        matches!(self, Source::Copies(_))
    }

    /// For a rollback-journal database, the content hash of the state its
    /// changes are counted from.
    pub fn counted_from(&self) -> Option<[u8; 32]> {
        match self {
            Source::Wal(_) => None,
            Source::Copies(d) => Some(d.sha256()),
        }
    }
}
