//! One rclone serving a layout: `rclone rcd` (replicate) or `rclone mount`
//! (mount), with its rendered config and its rc socket. Both layouts start,
//! talk to, replace and stop their rclone through this one type.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::rc::{self, RcError};
use super::{RcdError, RunPaths, StderrTail};
use crate::config::{Config, LeaseConfig, S3Config};
use crate::remote::keycheck::{self, KeyCheckError, Outcome};
use crate::remote::lease::{self, Fence, Keeper, LeaseError};
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

/// Why a session stopped serving.
pub enum Ended {
    LeaseLost(String),
    Exited(Exit),
}

pub struct Session {
    pub rclone_bin: String,
    pub paths: RunPaths,
    pub s3: S3Config,
    /// How long boot waits for an unreachable S3 (`CVM_S3_WAIT`).
    s3_wait: Option<Duration>,
    running: Option<(Child, StderrTail)>,
    /// This instance's id (`CVM_LOCAL_DIR/instance-id`).
    instance: String,
    /// Opens while this instance holds the lease with margin; every upload checks it.
    pub fence: Fence,
    lease: Option<Keeper>,
    /// Why the lease was taken at boot.
    taken: Option<lease::Why>,
    /// What the key check found, until the marker is written.
    key: Option<Outcome>,
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
        let instance = lease::instance_id(&cfg.local_dir)
            .map_err(|e| (cfg.local_dir.join("instance-id"), e))?;
        Ok(Session {
            rclone_bin: cfg.rclone_bin.clone(),
            paths,
            s3: s3.clone(),
            s3_wait: cfg.s3_wait,
            running: None,
            instance,
            fence: Fence::default(),
            lease: None,
            taken: None,
            key: None,
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

    /// Checks the crypt key against the bucket prefix, writing nothing: the
    /// marker is written by [`Session::write_key_marker`], once the lease is held.
    pub async fn check_key(&mut self) -> Result<Outcome, KeyCheckError> {
        let outcome = keycheck::inspect(
            &self.paths.rc_socket,
            &self.s3.raw_remote(),
            &self.paths.scratch,
        )
        .await?;
        self.key = Some(outcome);
        Ok(outcome)
    }

    /// Writes the key-check marker if the key check found none.
    pub async fn write_key_marker(&mut self) -> Result<(), KeyCheckError> {
        if matches!(self.key, Some(Outcome::FirstUse | Outcome::Adopted)) {
            keycheck::write_marker(&self.paths.rc_socket, &self.paths.scratch).await?;
        }
        self.key = Some(Outcome::Matched);
        Ok(())
    }

    /// Whether a database's line restored at boot may go on in its
    /// generation: only when its last writer released the bucket prefix (or
    /// none held it). After a crash or a takeover, an upload of the old
    /// holder's may still land (S3 can finish a request whose sender is
    /// gone) under a segment number the new holder gives out, so each line
    /// is sealed and goes on in a new generation, from a base taken at its
    /// first change (`sqlite::backup::Line::sealed`): a generation has one
    /// writer, and a restore need not list every segment to find a number
    /// written twice (`sqlite::restore::list_generation`).
    pub fn continues_lines(&self) -> bool {
        matches!(self.taken, Some(lease::Why::Free | lease::Why::Released))
    }

    /// Takes the bucket prefix's lease (waiting for another holder) and
    /// keeps it renewed; from here the fence opens. Held already: nothing to do.
    pub async fn acquire_lease(&mut self, cfg: &LeaseConfig) -> Result<(), LeaseError> {
        if self.lease.is_some() {
            return Ok(());
        }
        let io = lease::Io::open(
            &self.paths.rc_socket,
            &self.paths.scratch,
            &self.s3.raw_remote(),
        )
        .await?;
        let mode = io.mode().await?;
        tracing::info!(?mode, "lease: the bucket has {}", mode.describe());
        let me = lease::record_for(&self.instance, cfg.ttl);
        let held = lease::acquire(io, mode, me, cfg, self.fence.clone()).await?;
        self.taken.get_or_insert(held.why());
        self.lease = Some(held.keep());
        Ok(())
    }

    /// Resolves when rclone exits, or when another instance has taken the
    /// lease: then rclone is killed at once, so nothing it holds goes up.
    /// Cancel-safe.
    pub async fn ended(&mut self) -> Ended {
        let lost = async {
            match self.lease.as_mut() {
                Some(keeper) => keeper.lost().await,
                None => std::future::pending().await,
            }
        };
        let exited = async {
            match &mut self.running {
                Some((child, _)) => child.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            by = lost => {
                if let Some((child, _)) = self.running.as_mut() {
                    let _ = child.signal(nix::sys::signal::Signal::SIGKILL);
                }
                Ended::LeaseLost(by)
            }
            exit = exited => Ended::Exited(exit),
        }
    }

    /// Stops rclone at the end of the run: SIGTERM, SIGKILL at `deadline`
    /// (an error: it may not have flushed); then removes the config, which
    /// holds the S3 keys. The lease is released first, while rclone runs.
    pub async fn stop(mut self, deadline: Instant) -> Result<(), Killed> {
        if let Some(keeper) = self.lease.take() {
            if tokio::time::timeout_at(deadline, keeper.release())
                .await
                .is_err()
            {
                tracing::warn!(
                    "lease: not released before the stop deadline; it expires on its own"
                );
            }
        }
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
