//! The spec's layout: `rclone mount s3-crypt: $OPENCLAW_STATE_DIR`, with an rc
//! socket so shutdown can drain rclone's upload queue (rclone itself cancels
//! queued uploads on SIGTERM: facts.md §2).

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::mount::{umount2, MntFlags};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::time::{sleep, sleep_until, timeout_at, Instant};

use super::FlushError;
use crate::config::{Config, S3Config};
use crate::mountinfo::{self, PROC_MOUNTINFO};
use crate::notify;
use crate::process::{Child, Exit, Reaper};
use crate::rclone::{self, rc, MountPaths};

/// How often the flush loop asks rclone for its queue while waiting for it to drain.
const FLUSH_POLL: Duration = Duration::from_millis(100);
/// rclone lines kept for error messages.
const STDERR_TAIL: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot prepare {path}: {source}")]
    Prepare { path: PathBuf, source: io::Error },
    #[error("cannot start rclone ({bin}): {source}; install rclone >= 1.75 or set RCLONE_BIN")]
    Spawn { bin: String, source: io::Error },
    #[error(
        "rclone mount exited ({exit}) before {mountpoint} was mounted. rclone said:\n{stderr}"
    )]
    Exited {
        exit: Exit,
        mountpoint: PathBuf,
        stderr: String,
    },
    #[error(
        "{mountpoint} was not mounted within {timeout:?} (CVM_MOUNT_TIMEOUT); check S3_ENDPOINT and the network. \
         rclone said:\n{stderr}"
    )]
    Timeout {
        mountpoint: PathBuf,
        timeout: Duration,
        stderr: String,
    },
    #[error("cannot unmount {mountpoint}: {source}")]
    Unmount {
        mountpoint: PathBuf,
        source: nix::Error,
    },
    #[error("rclone did not stop in time and was killed")]
    Killed,
}

pub struct Mount {
    rclone: Child,
    paths: MountPaths,
    mountpoint: PathBuf,
    notify: notify::Listener,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// The mount was live, so the gateway may have written through it.
    served: bool,
}

fn prepare_err(path: &Path) -> impl FnOnce(io::Error) -> MountError + '_ {
    move |source| MountError::Prepare {
        path: path.to_owned(),
        source,
    }
}

/// What the kernel answers for a FUSE mount whose daemon is gone: ENOTCONN,
/// or ECONNABORTED when the connection was aborted as the daemon died.
pub fn is_dead_mount_error(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ENOTCONN | Errno::ECONNABORTED)
    )
}

/// A mount left behind by a previous run (rclone killed with the container's
/// namespace alive, or a crashed rclone) makes every access fail with
/// ENOTCONN; detach it so the new mount can take its place.
fn detach_stale(mountpoint: &Path) -> Result<(), MountError> {
    let listed =
        mountinfo::rclone_mounted_at(Path::new(PROC_MOUNTINFO), mountpoint).unwrap_or(false);
    let dead = matches!(std::fs::metadata(mountpoint), Err(e) if is_dead_mount_error(&e));
    if listed || dead {
        tracing::warn!(mountpoint = %mountpoint.display(), "detaching a mount left by a previous run");
        umount2(mountpoint, MntFlags::MNT_DETACH).map_err(|source| MountError::Unmount {
            mountpoint: mountpoint.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// Forwards rclone's stderr to our log, keeping the last lines for error messages.
fn forward_stderr(stderr: std::process::ChildStderr, tail: Arc<Mutex<VecDeque<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            tracing::info!(target: "rclone", "rclone: {line}");
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() == STDERR_TAIL {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
}

impl Mount {
    pub fn launch(cfg: &Config, s3: &S3Config, reaper: &Reaper) -> Result<Self, MountError> {
        let paths = MountPaths::new(&cfg.run_dir, &cfg.local_dir);
        rclone::private_dir(&cfg.run_dir).map_err(prepare_err(&cfg.run_dir))?;
        rclone::private_dir(&paths.rc_dir).map_err(prepare_err(&paths.rc_dir))?;
        std::fs::create_dir_all(&paths.cache_dir).map_err(prepare_err(&paths.cache_dir))?;
        rclone::write_config(&paths.config, s3).map_err(prepare_err(&paths.config))?;
        detach_stale(&cfg.state_dir)?;
        std::fs::create_dir_all(&cfg.state_dir).map_err(prepare_err(&cfg.state_dir))?;
        let _ = std::fs::remove_file(&paths.rc_socket);
        let notify = notify::Listener::bind(&paths.notify_socket)
            .map_err(prepare_err(&paths.notify_socket))?;

        let mut cmd = rclone::command(&cfg.rclone_bin, &rclone::mount_args(&paths, &cfg.state_dir));
        cmd.env("NOTIFY_SOCKET", notify.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (rclone, stderr) = reaper.spawn(&mut cmd).map_err(|source| MountError::Spawn {
            bin: cfg.rclone_bin.clone(),
            source,
        })?;
        tracing::info!(pid = rclone.pid().as_raw(), mountpoint = %cfg.state_dir.display(), "started rclone mount");
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = stderr {
            forward_stderr(stderr, tail.clone());
        }
        Ok(Self {
            rclone,
            paths,
            mountpoint: cfg.state_dir.clone(),
            notify,
            stderr: tail,
            served: false,
        })
    }

    fn stderr_tail(&self) -> String {
        let t = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_empty() {
            "(nothing)".to_owned()
        } else {
            t.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }

    fn is_mounted(&self) -> bool {
        mountinfo::rclone_mounted_at(Path::new(PROC_MOUNTINFO), &self.mountpoint).unwrap_or(false)
    }

    /// Waits for rclone's `READY=1`, then confirms the mount in mountinfo.
    pub async fn ready(&mut self, timeout: Duration) -> Result<(), MountError> {
        let deadline = Instant::now() + timeout;
        tokio::select! {
            r = self.notify.ready() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "rclone's notify socket failed; watching mountinfo instead");
                    sleep_until(deadline).await;
                }
            }
            exit = self.rclone.wait() => {
                // rclone may still be printing why; its stderr closes when it exits.
                sleep(Duration::from_millis(50)).await;
                return Err(MountError::Exited { exit, mountpoint: self.mountpoint.clone(), stderr: self.stderr_tail() });
            }
            _ = sleep_until(deadline) => {}
        }
        if self.is_mounted() {
            self.served = true;
            return Ok(());
        }
        Err(MountError::Timeout {
            mountpoint: self.mountpoint.clone(),
            timeout,
            stderr: self.stderr_tail(),
        })
    }

    /// Resolves when rclone exits. Cancel-safe.
    pub async fn exited(&mut self) -> Exit {
        self.rclone.wait().await
    }

    async fn rc(&self, method: &str, params: Value) -> Result<Value, rc::RcError> {
        rc::call(&self.paths.rc_socket, method, &params).await
    }

    /// Uploads every file rclone holds in its write-back queue now, and waits
    /// until nothing is queued or uploading (facts.md §2).
    pub async fn flush(&mut self, deadline: Instant) -> Result<(), FlushError> {
        // rclone learns that a file was closed from an asynchronous FUSE
        // release; until it has processed it, the file is neither queued nor
        // uploading. An empty queue therefore counts only when seen twice,
        // one poll apart.
        let mut quiet_polls = 0;
        loop {
            if let Some(exit) = self.rclone.try_exit() {
                return match self.served {
                    // Never mounted: nothing can have been written through it.
                    false => Ok(()),
                    true => Err(FlushError::RcloneGone(exit)),
                };
            }
            let queue = self.rc("vfs/queue", json!({})).await?;
            let items = queue["queue"].as_array().cloned().unwrap_or_default();
            for item in &items {
                let waiting = !item["uploading"].as_bool().unwrap_or(false);
                if let (true, Some(id)) = (waiting, item["id"].as_i64()) {
                    // A negative expiry makes the item due now; errors mean it just started or finished.
                    if let Err(e) = self
                        .rc("vfs/queue-set-expiry", json!({ "id": id, "expiry": -1e9 }))
                        .await
                    {
                        tracing::debug!(error = %e, id, "queue-set-expiry");
                    }
                }
            }
            let stats = self.rc("vfs/stats", json!({})).await?;
            let in_progress = stats["diskCache"]["uploadsInProgress"]
                .as_u64()
                .unwrap_or(0);
            let queued = stats["diskCache"]["uploadsQueued"].as_u64().unwrap_or(0);
            if in_progress + queued == 0 {
                quiet_polls += 1;
                if quiet_polls == 2 {
                    return Ok(());
                }
            } else {
                quiet_polls = 0;
            }
            if Instant::now() + FLUSH_POLL >= deadline {
                let files = items
                    .iter()
                    .filter_map(|i| i["name"].as_str().map(str::to_owned))
                    .collect();
                return Err(FlushError::Timeout {
                    in_progress,
                    queued,
                    files,
                });
            }
            tracing::debug!(in_progress, queued, "waiting for rclone uploads");
            sleep(FLUSH_POLL).await;
        }
    }

    /// Stops rclone (it unmounts on SIGTERM), kills it at `deadline`, and
    /// detaches the mount if it is still there.
    pub async fn stop(mut self, deadline: Instant) -> Result<(), MountError> {
        let _ = self.rclone.signal(Signal::SIGTERM);
        let mut result = Ok(());
        match timeout_at(deadline, self.rclone.wait()).await {
            Ok(exit) => tracing::info!(%exit, "rclone stopped"),
            Err(_) => {
                let _ = self.rclone.signal(Signal::SIGKILL);
                let exit = self.rclone.wait().await;
                tracing::error!(%exit, "rclone did not stop in time and was killed");
                result = Err(MountError::Killed);
            }
        }
        // The config holds the S3 keys; nothing needs it once rclone is gone.
        if let Err(e) = std::fs::remove_file(&self.paths.config) {
            tracing::warn!(path = %self.paths.config.display(), error = %e, "cannot remove the rclone config");
        }
        if self.is_mounted() {
            tracing::warn!(mountpoint = %self.mountpoint.display(), "mount still present after rclone exited; detaching");
            umount2(&self.mountpoint, MntFlags::MNT_DETACH).map_err(|source| {
                MountError::Unmount {
                    mountpoint: self.mountpoint.clone(),
                    source,
                }
            })?;
        }
        result
    }
}
