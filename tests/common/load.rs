//! The SQLite write load shared by the tests and the benchmark: a Python
//! writer committing numbered transactions, and how to judge what survived.

use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};

/// The writer's source; run it with `python3` and `OUT` set.
pub const WRITER: &str = include_str!("writer.py");
/// The database the writer commits to, relative to the state dir.
pub const DB: &str = "state/openclaw.sqlite";

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Commits the writer logged to `out`: (number, unix time).
pub fn commits(out: &Path) -> Vec<(i64, f64)> {
    fs::read_to_string(out.join("commits"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (i, ts) = l.split_once(' ')?;
            Some((i.parse().ok()?, ts.parse().ok()?))
        })
        .collect()
}

/// Checks the database at `path` (`integrity_check`) and returns
/// (max i, row count), or `None` if it cannot be read or is corrupt.
pub fn inspect(path: &Path) -> Option<(i64, i64)> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .ok()?;
    if ok != "ok" {
        return None;
    }
    c.query_row("SELECT coalesce(max(i),0), count(*) FROM tx", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .ok()
}

/// Seconds of commits lost if the database held commits up to `max` at
/// time `at`: from the oldest commit made before `at` that is missing, to `at`.
pub fn lost_seconds(commits: &[(i64, f64)], max: i64, at: f64) -> f64 {
    commits
        .iter()
        .find(|&&(i, ts)| i > max && ts < at)
        .map_or(0.0, |&(_, ts)| at - ts)
}
