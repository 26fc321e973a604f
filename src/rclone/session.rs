//! One rclone serving a layout: `rclone rcd` (replicate) or `rclone mount`
//! (mount), with its rendered config and its rc socket. Both layouts start,
//! talk to, replace and stop their rclone through this one type.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::rc::{self, RcError};
use super::{RcdError, RunPaths, StderrTail};
use crate::config::{Config, S3Config};
use crate::remote::probe::Target;
use crate::sys::process::{Child, Exit, Reaper};

/// How long an rclone being replaced (after a failed boot, or a failure)
/// gets to exit on SIGTERM before it is killed.
const REPLACE_GRACE: Duration = Duration::from_secs(2);

/// rclone was still running at the stop's deadline and was killed: it may
/// not have flushed.
#[derive(Debug, thiserror::Error)]
#[error("rclone did not stop in time and was killed")]
pub struct Killed;

pub struct Session {
    pub rclone_bin: String,
    pub paths: RunPaths,
    pub s3: S3Config,
    /// How long boot waits for an unreachable S3 (`CVM_S3_WAIT`).
    s3_wait: Option<Duration>,
    running: Option<(Child, StderrTail)>,
}

impl Session {
    /// Makes the run dir (0700) and writes the config (0600); starts nothing.
    /// On error, returns the path that failed.
    pub fn prepare(
        cfg: &Config,
        s3: &S3Config,
    ) -> Result<Session, (std::path::PathBuf, std::io::Error)> {
        let paths = RunPaths::new(&cfg.run_dir, &cfg.local_dir);
        paths.prepare(s3)?;
        Ok(Session {
            rclone_bin: cfg.rclone_bin.clone(),
            paths,
            s3: s3.clone(),
            s3_wait: cfg.s3_wait,
            running: None,
        })
    }

    /// What boot probes before anything else.
    pub fn s3_target(&self) -> Target<'_> {
        Target {
            rclone_bin: &self.rclone_bin,
            config: &self.paths.config,
            s3: &self.s3,
            limit: self.s3_wait,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.paths.rc_socket
    }

    /// Calls `method` on the running rclone's rc API.
    pub async fn rc(&self, method: &str, params: Value) -> Result<Value, RcError> {
        rc::call(&self.paths.rc_socket, method, &params).await
    }

    /// Starts `rclone rcd` and waits until it answers.
    pub async fn start_rcd(&mut self, reaper: &Reaper, timeout: Duration) -> Result<(), RcdError> {
        let started = super::start_rcd(
            reaper,
            &self.rclone_bin,
            &self.paths.config,
            &self.paths.rc_socket,
            timeout,
        )
        .await?;
        self.running = Some(started);
        Ok(())
    }

    /// Takes over an rclone the layout started itself (`rclone mount`).
    pub fn adopt(&mut self, child: Child, tail: StderrTail) {
        self.running = Some((child, tail));
    }

    pub fn running(&mut self) -> Option<&mut (Child, StderrTail)> {
        self.running.as_mut()
    }

    /// Resolves when the running rclone exits; pending while none runs. Cancel-safe.
    pub async fn exited(&mut self) -> Exit {
        match &mut self.running {
            Some((child, _)) => child.wait().await,
            None => std::future::pending().await,
        }
    }

    /// Ends rclone to replace it (after a failed boot, or a failure):
    /// SIGTERM, SIGKILL after [`REPLACE_GRACE`]. Ended in place: if this is
    /// cancelled (a shutdown signal), [`Session::stop`] still finds it.
    pub async fn end(&mut self) {
        if let Some((child, _)) = self.running.as_mut() {
            let (exit, killed) = child.terminate(Instant::now() + REPLACE_GRACE).await;
            tracing::info!(%exit, killed, "the old rclone is gone");
        }
        self.running = None;
    }

    /// Stops rclone at the end of the run: SIGTERM, SIGKILL at `deadline`
    /// (an error: it may not have flushed); then removes the config, which
    /// holds the S3 keys.
    pub async fn stop(mut self, deadline: Instant) -> Result<(), Killed> {
        let result = match self.running.take() {
            None => Ok(()),
            Some((mut child, _)) => match child.terminate(deadline).await {
                (exit, false) => {
                    tracing::info!(%exit, "rclone stopped");
                    Ok(())
                }
                (exit, true) => {
                    tracing::error!(%exit, "rclone did not stop in time and was killed");
                    Err(Killed)
                }
            },
        };
        super::remove_config(&self.paths.config);
        result
    }
}
