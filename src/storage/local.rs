//! Local mode: no S3, the state dir is a directory on the container's disk.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub struct Local {
    dir: PathBuf,
}

impl Local {
    pub fn prepare(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Makes the gateway's last writes durable on the local disk.
    pub fn flush(&self) -> io::Result<()> {
        let d = fs::File::open(&self.dir)?;
        nix::unistd::syncfs(d.as_raw_fd()).map_err(io::Error::from)
    }
}
