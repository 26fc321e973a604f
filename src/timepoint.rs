//! Moments in the state's history, as users write them (`cvm-init restore
//! --at TIME`): RFC 3339 (`2026-11-29T18:00:00Z`), relative to now (`-15m`,
//! `-2h30m`, `-1d`), or `now`. Times are Unix milliseconds throughout.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn now_s() -> u64 {
    now_ms() / 1000
}

/// `s` as Unix milliseconds, given the time `now` (ms). A moment after
/// `now` is refused: there is no history of the future.
pub fn parse(s: &str, now: u64) -> Result<u64, String> {
    let s = s.trim();
    let at = if s == "now" {
        now
    } else if let Some(ago) = s.strip_prefix('-') {
        let d = humantime::parse_duration(ago).map_err(|e| {
            format!("{s:?}: {e}; write a time ago like -15m, -2h30m or -1d, or an RFC 3339 time")
        })?;
        now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    } else {
        let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
            format!("{s:?}: {e}; write an RFC 3339 time like 2026-11-29T18:00:00Z, or a time ago like -15m")
        })?;
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| format!("{s:?} is before 1970"))?
            .as_millis();
        u64::try_from(ms).map_err(|_| format!("{s:?} is too far ahead"))?
    };
    if at > now {
        return Err(format!(
            "{s:?} ({}) is in the future; the latest state is `now`",
            format(at)
        ));
    }
    Ok(at)
}

/// An RFC 3339 time as rclone lists an object's `ModTime`, as Unix ms.
pub fn modtime_ms(s: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
}

/// `ms` as an RFC 3339 UTC time with milliseconds.
pub fn format(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_796_000_000_000;

    #[test]
    fn modtimes_as_rclone_lists_them() {
        assert_eq!(
            modtime_ms("2026-11-29T18:00:00.250123456Z"),
            Some(1_795_975_200_250)
        );
        assert_eq!(modtime_ms("2026-11-29T18:00:00Z"), Some(1_795_975_200_000));
        assert_eq!(modtime_ms("yesterday"), None);
    }

    #[test]
    fn times_as_users_write_them() {
        for (given, want) in [
            ("now", Ok(NOW)),
            ("-15m", Ok(NOW - 15 * 60_000)),
            ("-2h30m", Ok(NOW - 150 * 60_000)),
            ("-1d", Ok(NOW - 86_400_000)),
            ("-90s", Ok(NOW - 90_000)),
            ("2026-11-29T18:00:00Z", Ok(1_795_975_200_000)),
            ("2026-11-29T18:00:00.250Z", Ok(1_795_975_200_250)),
        ] {
            assert_eq!(parse(given, NOW), want, "{given}");
        }
        for bad in [
            "",
            "-",
            "15m",
            "-15 parsecs",
            "yesterday",
            "2026-13-01T00:00:00Z",
        ] {
            assert!(parse(bad, NOW).is_err(), "{bad:?} is refused");
        }
        let future = parse("2099-01-01T00:00:00Z", NOW).unwrap_err();
        assert!(future.contains("in the future"), "{future}");
    }

    #[test]
    fn formatted_times_read_back() {
        assert_eq!(format(1_795_975_200_250), "2026-11-29T18:00:00.250Z");
        assert_eq!(parse(&format(NOW - 1), NOW), Ok(NOW - 1));
    }
}
