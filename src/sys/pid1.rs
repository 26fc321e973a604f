//! PID-1 duties that come before anything else: /proc, /dev/fuse and
//! becoming the reaper of orphans when not PID 1.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{major, makedev, minor, mknod, Mode, SFlag};
use nix::unistd::getpid;

const FUSE_MAJOR: u64 = 10;
const FUSE_MINOR: u64 = 229;

#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    #[error("cannot mount proc on {target}: {source}; run cvm-init where it may mount /proc, or mount it before")]
    MountProc { target: PathBuf, source: nix::Error },
    #[error(
        "FUSE is not available: {reason}. S3 mode mounts the bucket with FUSE: run the container with \
         `--device /dev/fuse --cap-add SYS_ADMIN` or `--privileged`"
    )]
    Fuse { reason: String },
    #[error("cannot become a child subreaper: {0}")]
    Subreaper(nix::Error),
}

/// Mounts proc at `/proc` unless it is already there.
pub fn ensure_proc() -> Result<(), Pid1Error> {
    let target = Path::new("/proc");
    if target.join("self").exists() {
        return Ok(());
    }
    let err = |source| Pid1Error::MountProc {
        target: target.to_owned(),
        source,
    };
    if let Err(e) = fs::create_dir_all(target) {
        return Err(err(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))));
    }
    mount(
        Some("proc"),
        target,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(err)?;
    tracing::info!("mounted /proc");
    Ok(())
}

/// Makes sure `dev` is the FUSE device and can be opened, creating the node
/// when it is absent, `may_create` and the kernel lets us (not inside a user
/// namespace).
pub fn ensure_fuse(dev: &Path, may_create: bool) -> Result<(), Pid1Error> {
    let fail = |reason: String| Pid1Error::Fuse { reason };
    match fs::metadata(dev) {
        Ok(m) => {
            let rdev = m.rdev();
            if !m.file_type().is_char_device()
                || major(rdev) != FUSE_MAJOR
                || minor(rdev) != FUSE_MINOR
            {
                return Err(fail(format!(
                    "{} exists but is not the FUSE character device {FUSE_MAJOR}:{FUSE_MINOR}",
                    dev.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && !may_create => {
            return Err(fail(format!("{} is missing", dev.display())));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dev.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| fail(format!("cannot create {}: {e}", parent.display())))?;
            }
            mknod(
                dev,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(FUSE_MAJOR, FUSE_MINOR),
            )
            .map_err(|e| {
                fail(format!(
                    "{} is missing and creating it failed ({e})",
                    dev.display()
                ))
            })?;
            tracing::info!(device = %dev.display(), "created the FUSE device node");
        }
        Err(e) => return Err(fail(format!("cannot stat {}: {e}", dev.display()))),
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map(drop)
        .map_err(|e| fail(format!("cannot open {}: {e}", dev.display())))
}

/// Outside PID 1, orphans of our children would go to the host's init;
/// becoming a subreaper makes cvm-init behave the same on a host as in a container.
pub fn become_subreaper_unless_pid1() -> Result<bool, Pid1Error> {
    if getpid().as_raw() == 1 {
        return Ok(false);
    }
    nix::sys::prctl::set_child_subreaper(true).map_err(Pid1Error::Subreaper)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_not_the_fuse_device() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = ensure_fuse(f.path(), true).unwrap_err();
        assert!(
            e.to_string().contains("not the FUSE character device"),
            "{e}"
        );
        assert!(e.to_string().contains("--device /dev/fuse"), "{e}");
    }
}
