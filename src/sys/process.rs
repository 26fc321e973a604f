//! The one owner of `waitpid`: every child cvm-init spawns is registered here,
//! and a single reaper collects every exit, ours and orphans' alike.
//!
//! A `waitpid(-1)` reaper next to `tokio::process` steals exit statuses
//! (docs/facts.md §4), so nothing in cvm-init uses `tokio::process`. Spawning and
//! registering happen under the same lock the reaper takes, so a child that
//! exits at once is never reaped before its owner is known.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::process::Command;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl Exit {
    /// The shell convention: the exit code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s as i32,
        }
    }

    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

type Registry = HashMap<Pid, oneshot::Sender<Exit>>;

/// Spawns children and reaps every process that ends under cvm-init.
#[derive(Clone, Default)]
pub struct Reaper {
    owned: Arc<Mutex<Registry>>,
}

/// A child spawned through [`Reaper::spawn`]. Dropping it does not kill the process.
pub struct Child {
    pid: Pid,
    exit: oneshot::Receiver<Exit>,
    done: Option<Exit>,
}

impl Reaper {
    /// Spawns `cmd` and registers the child before the reaper can see it exit.
    /// Returns the child and its stderr handle when `cmd` asked for a pipe.
    pub fn spawn(
        &self,
        cmd: &mut Command,
    ) -> io::Result<(Child, Option<std::process::ChildStderr>)> {
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let mut std_child = cmd.spawn()?;
        let pid = Pid::from_raw(std_child.id() as i32);
        let (tx, rx) = oneshot::channel();
        owned.insert(pid, tx);
        let stderr = std_child.stderr.take();
        // Dropping std's handle neither waits nor kills; the reaper owns the wait.
        drop(std_child);
        Ok((
            Child {
                pid,
                exit: rx,
                done: None,
            },
            stderr,
        ))
    }

    /// Collects every exited child now; returns how many orphans were reaped.
    pub fn reap(&self) -> usize {
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let mut orphans = 0;
        loop {
            let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return orphans,
                // Stops and continues are not exits; keep draining.
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return orphans;
                }
            };
            match owned.remove(&pid) {
                // The owner may have given up waiting; the exit is collected either way.
                Some(tx) => drop(tx.send(exit)),
                None => {
                    orphans += 1;
                    tracing::debug!(pid = pid.as_raw(), %exit, "reaped orphan");
                }
            }
        }
    }

    /// Reaps on every SIGCHLD until the runtime shuts down.
    pub async fn run(self, mut sigchld: tokio::signal::unix::Signal) {
        loop {
            self.reap();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    }
}

impl Child {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Waits for the exit. Cancel-safe: calling it again after a cancelled
    /// wait, or after the exit was seen, gives the same answer.
    pub async fn wait(&mut self) -> Exit {
        if let Some(exit) = self.done {
            return exit;
        }
        let exit = match (&mut self.exit).await {
            Ok(exit) => exit,
            // Only possible if the reaper's registry was dropped, i.e. never in
            // a running init; report it as a kill rather than hang.
            Err(_) => Exit::Signal(Signal::SIGKILL),
        };
        self.done = Some(exit);
        exit
    }

    /// The exit, if it has already been collected.
    pub fn try_exit(&mut self) -> Option<Exit> {
        if self.done.is_none() {
            self.done = self.exit.try_recv().ok();
        }
        self.done
    }

    /// Sends `sig` to the child alone.
    pub fn signal(&self, sig: Signal) -> nix::Result<()> {
        if self.done.is_some() {
            return Ok(());
        }
        kill(self.pid, sig)
    }

    /// SIGTERM, then SIGKILL if it has not exited by `deadline`. Returns the
    /// exit and whether the kill was needed.
    pub async fn terminate(&mut self, deadline: tokio::time::Instant) -> (Exit, bool) {
        let _ = self.signal(Signal::SIGTERM);
        match tokio::time::timeout_at(deadline, self.wait()).await {
            Ok(exit) => (exit, false),
            Err(_) => {
                let _ = self.signal(Signal::SIGKILL);
                (self.wait().await, true)
            }
        }
    }

    /// Whether any process (a zombie included) is left in the child's process group.
    pub fn group_alive(&self) -> bool {
        kill(Pid::from_raw(-self.pid.as_raw()), None) != Err(Errno::ESRCH)
    }

    /// Sends `sig` to the child's process group (the child must lead one).
    pub fn signal_group(&self, sig: Signal) -> nix::Result<()> {
        match kill(Pid::from_raw(-self.pid.as_raw()), sig) {
            // The group is empty: everyone in it has exited already.
            Err(Errno::ESRCH) => Ok(()),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(Exit::Code(3).code(), 3);
        assert_eq!(Exit::Signal(Signal::SIGTERM).code(), 143);
        assert_eq!(Exit::Signal(Signal::SIGKILL).code(), 137);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_instant_exit_reaches_its_owner() {
        let sigchld =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).unwrap();
        let reaper = Reaper::default();
        tokio::spawn(reaper.clone().run(sigchld));
        let (mut child, _) = reaper
            .spawn(Command::new("sh").args(["-c", "exit 7"]))
            .unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .unwrap();
        assert_eq!(exit, Exit::Code(7));
        assert_eq!(child.wait().await, Exit::Code(7));

        let (mut child, _) = reaper
            .spawn(Command::new("sh").args(["-c", "kill -TERM $$"]))
            .unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .unwrap();
        assert_eq!(exit, Exit::Signal(Signal::SIGTERM));
    }
}
