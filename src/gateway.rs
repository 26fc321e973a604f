//! The supervised app: how it is spawned, stopped, and how long to wait
//! before restarting it.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::timeout;

use crate::rclone::is_secret_env;
use crate::sys::process::{Child, Exit, Reaper};

/// Spawning failed in a way a restart cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("CVM_GATEWAY_CMD: program {program:?} not found; install it or fix the command")]
    NotFound { program: String },
    #[error("CVM_GATEWAY_CMD: program {program:?} is not executable: {source}")]
    NotExecutable { program: String, source: io::Error },
    #[error("cannot start the gateway {program:?}: {source}")]
    Other { program: String, source: io::Error },
}

/// Starts the gateway in its own process group, so stopping it reaches every
/// process it started, without the secrets in our environment.
pub fn spawn(reaper: &Reaper, argv: &[String], state_dir: &Path) -> Result<Child, SpawnError> {
    let program = argv[0].clone();
    let mut cmd = Command::new(&program);
    cmd.args(&argv[1..])
        .env("OPENCLAW_STATE_DIR", state_dir)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .process_group(0);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_secret_env) {
            cmd.env_remove(&name);
        }
    }
    reaper
        .spawn(&mut cmd)
        .map(|(child, _)| child)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => SpawnError::NotFound { program },
            io::ErrorKind::PermissionDenied => SpawnError::NotExecutable { program, source },
            _ => SpawnError::Other { program, source },
        })
}

/// Stops the gateway's whole process group: SIGTERM, then SIGKILL once
/// `grace` has passed. Whatever is left in the group after the leader exits
/// is killed too, so nothing keeps writing while storage flushes.
pub async fn stop(child: &mut Child, grace: Duration) -> (Exit, bool) {
    if let Err(e) = child.signal_group(Signal::SIGTERM) {
        tracing::warn!(error = %e, "cannot signal the gateway's process group");
    }
    let (exit, killed) = match timeout(grace, child.wait()).await {
        Ok(exit) => (exit, false),
        Err(_) => {
            tracing::warn!(?grace, "gateway ignored SIGTERM; killing its process group");
            let _ = child.signal_group(Signal::SIGKILL);
            (child.wait().await, true)
        }
    };
    let _ = child.signal_group(Signal::SIGKILL);
    // Files the group held open are released to FUSE only when its last
    // process is gone; the flush that follows must not start before that.
    let gone = wait_group_gone(child, GROUP_EXIT_WAIT).await;
    if !gone {
        tracing::warn!(
            pgid = child.pid().as_raw(),
            "gateway process group still present after SIGKILL"
        );
    }
    (exit, killed)
}

/// How long SIGKILLed group members get to disappear (and be reaped).
const GROUP_EXIT_WAIT: Duration = Duration::from_secs(1);

async fn wait_group_gone(child: &Child, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while child.group_alive() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}
