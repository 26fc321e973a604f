//! The commands besides running the appliance: `cvm-init check`,
//! `cvm-init restore` and `cvm-init attest`.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::rclone::{self, RcdError, RunPaths, StderrTail};
use crate::sys::process::{Child, Reaper};

pub mod attest;
pub mod check;
pub mod restore;

/// A private directory for the rendered config, removed when dropped.
struct TempRun(PathBuf);

impl TempRun {
    /// A new 0700 directory under `$TMPDIR` with an unguessable name; one
    /// that already exists (planted by someone else) is an error, never reused.
    fn create(command: &str) -> Result<Self, (PathBuf, std::io::Error)> {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b)
            .map_err(|e| (std::env::temp_dir(), std::io::Error::other(e.to_string())))?;
        let name = format!(
            "cvm-init-{command}-{}-{}",
            std::process::id(),
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        );
        let path = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| (path.clone(), e))?;
        Ok(Self(path))
    }
}

impl Drop for TempRun {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How long rclone gets to start its rc server.
const RCD_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `rclone rcd` on the rendered config and socket of `paths` (a
/// [`TempRun`]'s).
async fn start_rcd(
    reaper: &Reaper,
    cfg: &Config,
    paths: &RunPaths,
) -> Result<(Child, StderrTail), RcdError> {
    rclone::start_rcd(
        reaper,
        &cfg.rclone_bin,
        &paths.config,
        &paths.rc_socket,
        RCD_TIMEOUT,
    )
    .await
}
