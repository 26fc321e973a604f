//! Consistent copies of files on their way to S3. rclone aborts an upload
//! whose source changes while it reads it, so a file appended faster than it
//! uploads never reached S3; a copy made first (a reflink where the file
//! system has them: `io::copy` uses `copy_file_range`) is still while it
//! uploads.

use std::fs;
use std::io;
use std::path::Path;

use super::scan::{stamp, Stamp};

/// Copies tried before the last one is taken as it is.
const ATTEMPTS: u32 = 3;

/// Copies `src` to `dst` with `src`'s mtime and returns the stamp `src`
/// had when the copy began. A copy during which `src` did not change is
/// exactly that version; if it changes during every attempt, the last copy
/// is taken (for a file that only grows, a whole earlier version plus part
/// of the new tail), and since `src` no longer has that stamp the next pass
/// uploads it again. So a file that never stops changing still reaches S3
/// once per pass.
pub(super) fn copy(src: &Path, dst: &Path) -> io::Result<Stamp> {
    if let Some(dir) = dst.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let before = fs::symlink_metadata(src)?;
        if !before.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no longer a regular file",
            ));
        }
        let _ = fs::remove_file(dst);
        // Through `held`: a file that became a database since the scan may
        // be open in SQLite here, and closing it would drop SQLite's locks.
        crate::sqlite::held::with_open(src, |f| {
            let mut out = fs::File::create(dst)?;
            io::copy(&mut &*f, &mut out)?;
            out.set_permissions(f.metadata()?.permissions())
        })?;
        let after = fs::symlink_metadata(src)?;
        let still = stamp(&before) == stamp(&after);
        if still || attempt >= ATTEMPTS {
            fs::File::options()
                .write(true)
                .open(dst)?
                .set_modified(before.modified()?)?;
            return Ok(stamp(&before));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_content_and_mtime() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::write(&src, b"hello").unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        fs::File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let dst = d.path().join("stage/0");
        let st = copy(&src, &dst).unwrap();
        assert_eq!(fs::read(&dst).unwrap(), b"hello");
        assert_eq!(fs::metadata(&dst).unwrap().modified().unwrap(), old);
        assert_eq!(st, stamp(&fs::metadata(&src).unwrap()));
        assert!(copy(d.path(), &dst).is_err(), "a directory is not staged");
    }
}
