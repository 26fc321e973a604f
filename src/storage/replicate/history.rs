//! File history (replicate layout): every version a file had, kept when it
//! is overwritten or deleted at `.cvm/hist/<name>/<start>-<end>`, where
//! `start` is the version's mtime (when its content was written) and `end`
//! when the next one was written or the deletion seen (Unix ms). The head,
//! the object at `<name>` itself, is live from its mtime on. Pure
//! decisions: the engine copies, `cvm-init restore --at` picks, the boot
//! prunes.

use crate::remote::bucket::{HIST_DIR, LINK_SUFFIX, META_DIR};
use crate::sqlite::history::{Window, HOUR_MS};

/// A kept version of a file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// The file's remote name (`.rclonelink` for a symlink).
    pub name: String,
    pub start: u64,
    pub end: u64,
}

impl Version {
    /// Its path in the crypt remote. A symlink's version keeps the link
    /// suffix, so it is restored as a link.
    pub fn object(&self) -> String {
        let link = if self.name.ends_with(LINK_SUFFIX) {
            LINK_SUFFIX
        } else {
            ""
        };
        format!(
            "{META_DIR}/{HIST_DIR}/{}/{:013}-{:013}{link}",
            self.name, self.start, self.end
        )
    }

    /// The version stored at `below` (a path below `.cvm/hist/`).
    pub fn parse(below: &str) -> Option<Version> {
        let (name, leaf) = below.rsplit_once('/')?;
        let leaf = leaf.strip_suffix(LINK_SUFFIX).unwrap_or(leaf);
        let (start, end) = leaf.split_once('-')?;
        if start.len() != 13 || end.len() != 13 {
            return None;
        }
        Some(Version {
            name: name.to_owned(),
            start: start.parse().ok()?,
            end: end.parse().ok()?,
        })
    }
}

/// The interval of a version written at `head_mtime` (ms; `None`: not
/// known, taken as the epoch) replaced, or deleted, at `end`.
pub fn superseded(name: &str, head_mtime: Option<u64>, end: u64) -> Version {
    let start = head_mtime.unwrap_or(0);
    Version {
        name: name.to_owned(),
        start,
        end: end.max(start),
    }
}

/// Whether content of `size` bytes with mtime `mtime` (ms) cannot be dated
/// by that mtime because it replaces a head of another size written no
/// earlier (`head`: when the head was written, its size). The kernel sets
/// a truncated file's size before its times, and a stat in between sees
/// the new size with the old times (seen: a file being rewritten staged
/// empty, dated as the content it replaced, so a restore to a moment before
/// the rewrite gave the empty file). Two writes within one clock tick look
/// the same, and are dated the same way: late, never early.
pub fn stale_mtime(head: Option<(u64, u64)>, size: u64, mtime: u64) -> bool {
    head.is_some_and(|(written, head_size)| head_size != size && mtime <= written)
}

/// What a restore to `at` takes for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick<'a> {
    Head,
    Version(&'a Version),
    Absent,
}

/// The version of a name live at `at`: a kept version whose interval holds
/// `at`, else the head if it was written by then (`head_mtime`; `None`
/// when there is no head), else none.
pub fn pick<'a>(versions: &[&'a Version], head_mtime: Option<u64>, at: u64) -> Pick<'a> {
    if let Some(v) = versions
        .iter()
        .filter(|v| v.start <= at && at < v.end)
        .max_by_key(|v| v.start)
    {
        return Pick::Version(v);
    }
    match head_mtime {
        Some(m) if m <= at => Pick::Head,
        _ => Pick::Absent,
    }
}

/// Whether retention keeps `v` at `now`: superseded within the last
/// 65 minutes ([`Window`]), or live at one of the hourly points of the last
/// `days`.
pub fn keep(v: &Version, now: u64, days: u32) -> bool {
    let Window { recent, horizon } = Window::at(now, days);
    if v.end >= recent {
        return true;
    }
    // The first hour boundary at or after its start.
    let first = v.start.div_ceil(HOUR_MS) * HOUR_MS;
    first < v.end && first <= recent && v.end > horizon
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;
    /// Midnight UTC.
    const T0: u64 = 1_795_910_400_000;

    fn v(name: &str, start: u64, end: u64) -> Version {
        Version {
            name: name.into(),
            start,
            end,
        }
    }

    #[test]
    fn an_mtime_that_did_not_move_with_the_size_is_stale() {
        for (head, size, mtime, stale, why) in [
            (Some((100, 3)), 0, 100, true, "truncated, times not yet set"),
            (Some((100, 3)), 5, 100, true, "grew within one clock tick"),
            (Some((100, 3)), 0, 90, true, "an mtime before the head's"),
            (Some((100, 3)), 0, 101, false, "rewritten later"),
            (
                Some((100, 3)),
                3,
                100,
                false,
                "same size and mtime: re-uploaded at a kept boot",
            ),
            (
                Some((100, 3)),
                3,
                90,
                false,
                "same size, mtime set back by hand",
            ),
            (None, 0, 100, false, "a new file"),
        ] {
            assert_eq!(stale_mtime(head, size, mtime), stale, "{why}");
        }
    }

    #[test]
    fn names_round_trip() {
        let x = v("notes/a b.md", T0, T0 + 5);
        let below = x.object().strip_prefix(".cvm/hist/").unwrap().to_owned();
        assert_eq!(below, format!("notes/a b.md/{T0}-{}", T0 + 5));
        assert_eq!(Version::parse(&below), Some(x));
        let link = v("l.rclonelink", 1_000_000_000_000, 1_000_000_000_001);
        assert!(link.object().ends_with("-1000000000001.rclonelink"));
        let below = link.object().strip_prefix(".cvm/hist/").unwrap().to_owned();
        assert_eq!(Version::parse(&below), Some(link));
        assert_eq!(Version::parse("x/stray"), None);
        assert_eq!(
            superseded("a", None, 5),
            v("a", 0, 5),
            "an unknown start: since ever"
        );
        assert_eq!(
            superseded("a", Some(9), 5),
            v("a", 9, 9),
            "never ends before it starts"
        );
    }

    #[test]
    fn the_version_live_at_a_moment() {
        // Written at 10, overwritten at 20, deleted at 30, written again at 40.
        let a = v("f", 10, 20);
        let b = v("f", 20, 30);
        let vs = [&a, &b];
        for (at, want) in [
            (5, Pick::Absent),
            (10, Pick::Version(&a)),
            (19, Pick::Version(&a)),
            (20, Pick::Version(&b)),
            (35, Pick::Absent),
            (40, Pick::Head),
            (99, Pick::Head),
        ] {
            assert_eq!(pick(&vs, Some(40), at), want, "at {at}");
        }
        assert_eq!(pick(&vs, None, 35), Pick::Absent, "deleted for good");
        assert_eq!(pick(&[], Some(40), 39), Pick::Absent, "not written yet");
        assert_eq!(pick(&[], Some(40), 40), Pick::Head);
    }

    #[test]
    fn retention_keeps_the_last_hour_and_the_versions_live_at_each_hour() {
        let now = T0 + 100 * HOUR_MS;
        for (start, end, days, kept) in [
            (now - 90 * MIN, now - 10 * MIN, 0, true),
            (
                now - 3 * HOUR_MS - 10 * MIN,
                now - 3 * HOUR_MS - 5 * MIN,
                7,
                false,
            ),
            (
                now - 3 * HOUR_MS - 10 * MIN,
                now - 3 * HOUR_MS + 5 * MIN,
                7,
                true,
            ),
            (
                now - 3 * HOUR_MS - 10 * MIN,
                now - 3 * HOUR_MS + 5 * MIN,
                0,
                false,
            ),
            (T0, T0 + 5 * MIN, 7, true),
            (T0, T0 + 5 * MIN, 3, false),
            (T0 + 1, T0 + 5 * MIN, 7, false),
            (
                now - 8 * 24 * HOUR_MS - 1,
                now - 8 * 24 * HOUR_MS + 5 * MIN,
                7,
                false,
            ),
            (
                now - 6 * 24 * HOUR_MS - 1,
                now - 6 * 24 * HOUR_MS + 5 * MIN,
                7,
                true,
            ),
        ] {
            assert_eq!(
                keep(&v("f", start, end), now, days),
                kept,
                "{start} {end} {days}"
            );
        }
    }
}
