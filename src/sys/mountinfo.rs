//! What `/proc/self/mountinfo` says about a mountpoint. Functions take the
//! mountinfo path so tests can feed fixtures.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufReader};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use procfs_core::process::MountInfos;
use procfs_core::FromBufRead;

pub const PROC_MOUNTINFO: &str = "/proc/self/mountinfo";

/// A mount stacked at a mountpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    pub fs_type: String,
    /// Read-only as a mount (the per-mount `ro` flag, as a read-only bind has).
    pub read_only: bool,
}

/// What is mounted exactly at `target`, bottom first.
pub fn mounts_at(mountinfo: &Path, target: &Path) -> io::Result<Vec<Mounted>> {
    let file = File::open(mountinfo)?;
    let infos = MountInfos::from_buf_read(BufReader::new(file)).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", mountinfo.display()),
        )
    })?;
    Ok(infos
        .0
        .into_iter()
        .filter(|m| unescape(&m.mount_point) == target)
        .map(|m| Mounted {
            read_only: m.mount_options.contains_key("ro"),
            fs_type: m.fs_type,
        })
        .collect())
}

/// The kernel writes space, tab, newline and backslash in mount paths as
/// `\NNN` octal escapes; procfs-core hands them over as they are.
fn unescape(p: &Path) -> PathBuf {
    let bytes = p.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let oct = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Whether an rclone FUSE mount is listed at `target` (it may still be dead).
pub fn rclone_mounted_at(mountinfo: &Path, target: &Path) -> io::Result<bool> {
    Ok(mounts_at(mountinfo, target)?
        .iter()
        .any(|m| m.fs_type == "fuse.rclone"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const FIXTURE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
96 22 8:1 /data/open\\040claw /data/open\\040claw ro,relatime shared:1 - ext4 /dev/vda rw
97 96 0:52 / /data/open\\040claw rw,nosuid,nodev,relatime shared:60 - fuse.rclone s3-crypt: rw,user_id=0,group_id=0
98 22 0:53 / /data/other rw,relatime shared:61 - tmpfs tmpfs rw
";

    fn fixture() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(FIXTURE.as_bytes()).unwrap();
        f
    }

    #[test]
    fn finds_an_rclone_mount_with_an_escaped_path() {
        let f = fixture();
        assert!(rclone_mounted_at(f.path(), Path::new("/data/open claw")).unwrap());
        assert!(!rclone_mounted_at(f.path(), Path::new("/data/other")).unwrap());
        assert!(mounts_at(f.path(), Path::new("/data")).unwrap().is_empty());
    }

    #[test]
    fn a_read_only_bind_under_the_mount_is_seen_bottom_first() {
        let f = fixture();
        let at = |fs_type: &str, read_only| Mounted {
            fs_type: fs_type.into(),
            read_only,
        };
        assert_eq!(
            mounts_at(f.path(), Path::new("/data/open claw")).unwrap(),
            [at("ext4", true), at("fuse.rclone", false)]
        );
    }

    #[test]
    fn a_missing_mountinfo_is_an_error() {
        assert!(mounts_at(Path::new("/nonexistent/mountinfo"), Path::new("/")).is_err());
    }
}
