//! sd-notify in both directions: what cvm-init tells its own manager (when it
//! has one) and the private socket on which rclone tells cvm-init it is ready.

use std::io;
use std::path::{Path, PathBuf};

use sd_notify::NotifyState;
use tokio::net::UnixDatagram;

/// Tells our manager (if `NOTIFY_SOCKET` is set) the current phase.
pub fn status(msg: &str) {
    send(&[NotifyState::Status(msg)]);
}

pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("running")]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd-notify failed");
    }
}

/// A datagram socket a child uses as its `NOTIFY_SOCKET`.
pub struct Listener {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Listener {
    pub fn bind(path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Self {
            socket: UnixDatagram::bind(path)?,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns once a message carrying `READY=1` arrives. Cancel-safe.
    pub async fn ready(&self) -> io::Result<()> {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self.socket.recv(&mut buf).await?;
            let msg = String::from_utf8_lossy(&buf[..n]);
            for line in msg.lines() {
                if line == "READY=1" {
                    return Ok(());
                }
                if let Some(s) = line.strip_prefix("STATUS=") {
                    tracing::debug!(status = s, "rclone");
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
