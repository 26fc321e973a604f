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
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        if let Err(e) = send_to(Path::new(&path), states) {
            tracing::debug!(error = %e, "sd-notify failed");
        }
    }
}

/// Sends without ever waiting: a manager that stopped reading fills the
/// socket's queue, and a blocking send would then stop PID 1 itself (seen:
/// the reaper and the supervisor frozen behind a `STATUS=` line). A message
/// that does not fit is dropped. `@name` is an abstract socket.
fn send_to(path: &Path, states: &[NotifyState]) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    let addr = match path.as_os_str().as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    sock.send_to_addr(msg.as_bytes(), &addr).map(drop)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manager_that_never_reads_cannot_block_us() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let manager = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let started = std::time::Instant::now();
        let mut dropped = 0;
        for i in 0..2000 {
            if send_to(&path, &[NotifyState::Status(&format!("tick {i}"))]).is_err() {
                dropped += 1;
            }
        }
        assert!(dropped > 0, "the queue filled up");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=tick 0\n");
    }
}
