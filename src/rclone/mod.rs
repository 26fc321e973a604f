//! Everything that speaks rclone: the rendered config, the command lines
//! (which never carry a secret), and the rc client in [`rc`].

pub mod cache;
pub mod rc;
pub mod session;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::config::S3Config;
use crate::sys::process::{Child, Reaper};

/// The crypt remote everything goes through; the name the spec and the shell
/// entrypoint use, so their configs and ours read the same bucket.
pub const CRYPT_REMOTE: &str = "s3-crypt";

/// The spec's VFS cache settings (encrypted-s3-storage.md, "VFS cache
/// settings"), but for the directory cache: the mount is the only writer of
/// its prefix, so a cache that does not expire is never stale, and it keeps
/// lookups off S3. With the spec's 30 s, a file created during an S3 outage
/// blocked the gateway for as long as rclone retried listing its directory.
pub const VFS_FLAGS: [&str; 8] = [
    "--vfs-cache-mode",
    "writes",
    "--vfs-write-back",
    "5s",
    "--dir-cache-time",
    "1000h",
    "--vfs-cache-max-size",
    "500M",
];

/// Environment variables a child must never inherit: credentials, keys, and
/// rclone's own `RCLONE_*` overrides, which would silently replace what the
/// rendered config says.
pub fn is_secret_env(name: &str) -> bool {
    name.starts_with("AWS_") && name != "AWS_CA_BUNDLE"
        || name.starts_with("RCLONE_")
        || name == "MASTER_KEY"
}

/// The rclone config: remote `s3` and the crypt overlay `s3-crypt` over
/// `s3:<bucket>/<prefix>`, as in the spec and docs/facts.md §6.
pub fn render_config(s3: &S3Config) -> String {
    let mut out = String::new();
    out.push_str("[s3]\ntype = s3\n");
    out.push_str(&format!("provider = {}\n", s3.provider));
    out.push_str("env_auth = false\n");
    out.push_str(&format!("access_key_id = {}\n", s3.access_key_id.expose()));
    out.push_str(&format!(
        "secret_access_key = {}\n",
        s3.secret_access_key.expose()
    ));
    out.push_str(&format!("endpoint = {}\n", s3.endpoint));
    out.push_str(&format!("region = {}\n", s3.region));
    out.push_str("no_check_bucket = true\n");
    // A 200 answer to a single-part PUT means it is stored; the HEAD rclone
    // sends after each upload by default doubles the requests of a burst of
    // small files, the stop's worst case.
    out.push_str("no_head = true\n\n");
    out.push_str(&format!("[{CRYPT_REMOTE}]\ntype = crypt\n"));
    out.push_str(&format!("remote = {}\n", s3.raw_remote()));
    out.push_str("filename_encryption = standard\n");
    out.push_str("directory_name_encryption = true\n");
    out.push_str(&format!("password = {}\n", s3.crypt.password.expose()));
    if let Some(p2) = &s3.crypt.password2 {
        out.push_str(&format!("password2 = {}\n", p2.expose()));
    }
    out
}

/// Creates `dir` (and parents) and makes it 0700, whatever it was before.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Writes the config with mode 0600 from the first byte: a temp file created
/// 0600, then renamed over the old one, so no reader ever sees a partial or
/// world-readable config.
pub fn write_config(path: &Path, s3: &S3Config) -> io::Result<()> {
    let tmp = path.with_extension("conf.tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(render_config(s3).as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Removes the rendered config once rclone is gone: it holds the S3 keys.
pub fn remove_config(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the rclone config");
    }
}

/// Where cvm-init keeps its run-time files (`CVM_RUN_DIR`) and its local
/// scratch space (`CVM_LOCAL_DIR`), for both layouts.
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub run_dir: PathBuf,
    pub config: PathBuf,
    /// Directory (0700) holding the rc socket, so `--rc-no-auth` serves root only.
    pub rc_dir: PathBuf,
    pub rc_socket: PathBuf,
    pub notify_socket: PathBuf,
    pub cache_dir: PathBuf,
    /// Cached files a crash left partial, moved out of rclone's way ([`cache::mend`]).
    pub rescued: PathBuf,
    /// Small files on their way to or from the remote (markers, dirs.json).
    pub scratch: PathBuf,
    /// Database snapshots before upload.
    pub snapshots: PathBuf,
}

impl RunPaths {
    pub fn new(run_dir: &Path, local_dir: &Path) -> Self {
        let rc_dir = run_dir.join("rc");
        Self {
            run_dir: run_dir.to_owned(),
            config: run_dir.join("rclone.conf"),
            rc_socket: rc_dir.join("rclone.sock"),
            rc_dir,
            notify_socket: run_dir.join("rclone-notify.sock"),
            // Dirty files wait here for upload: local disk, and kept across
            // restarts so rclone can resume uploads it had queued.
            cache_dir: local_dir.join("rclone-cache"),
            rescued: local_dir.join("rescued"),
            scratch: local_dir.join("scratch"),
            snapshots: local_dir.join("snapshots"),
        }
    }

    /// Makes the run dir and the rc socket's dir 0700 and writes the config
    /// (0600). On error, returns the path that failed.
    pub fn prepare(&self, s3: &S3Config) -> Result<(), (PathBuf, io::Error)> {
        fn at(p: &Path) -> impl FnOnce(io::Error) -> (PathBuf, io::Error) + '_ {
            move |e| (p.to_owned(), e)
        }
        private_dir(&self.run_dir).map_err(at(&self.run_dir))?;
        private_dir(&self.rc_dir).map_err(at(&self.rc_dir))?;
        write_config(&self.config, s3).map_err(at(&self.config))
    }
}

/// `rclone mount` of the crypt remote at `mountpoint`. No secrets: they are in the config file.
pub fn mount_args(paths: &RunPaths, mountpoint: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--config".into(),
        paths.config.clone().into(),
        "mount".into(),
        format!("{CRYPT_REMOTE}:").into(),
        mountpoint.into(),
    ];
    args.extend(VFS_FLAGS.iter().map(OsString::from));
    args.extend(["--cache-dir".into(), paths.cache_dir.clone().into()]);
    // Symlinks (how databases are redirected to local disk) are stored as
    // `.rclonelink` objects; without this, creating one fails with EIO.
    args.push("--links".into());
    // The mountpoint is a read-only bind of itself (storage::mount::guard),
    // which rclone >= 1.57 refuses as "already mounted"; cvm-init checks it is empty.
    args.push("--allow-non-empty".into());
    let mut rc_addr = OsString::from("unix://");
    rc_addr.push(&paths.rc_socket);
    args.extend([
        "--rc".into(),
        "--rc-addr".into(),
        rc_addr,
        "--rc-no-auth".into(),
    ]);
    args
}

/// A `Command` for rclone with the secret-bearing environment removed.
pub fn command(rclone_bin: &str, args: &[OsString]) -> Command {
    let mut cmd = Command::new(rclone_bin);
    // rclone speaks sd-notify itself; only the mount gets a (private) socket.
    cmd.args(args).env_remove("NOTIFY_SOCKET");
    // Listings give times in rclone's local zone; in UTC they end in `Z`,
    // which is what `timepoint::modtime_ms` reads on any user's machine.
    cmd.env("TZ", "UTC");
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_secret_env) {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// rclone lines kept for error messages.
const STDERR_TAIL: usize = 20;

/// The last lines a running rclone printed.
#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<Tail>>);

#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    /// rclone's stderr reached end of file: every line is in.
    closed: bool,
}

impl StderrTail {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn text(&self) -> String {
        let t = self.lock();
        if t.lines.is_empty() {
            "(nothing)".to_owned()
        } else {
            t.lines.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }

    /// The text once rclone's stderr has closed (its reader thread trails the
    /// exit), or what is there after `timeout`.
    pub async fn text_when_closed(&self, timeout: std::time::Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.lock().closed && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        self.text()
    }

    fn push(&self, line: String) {
        let mut t = self.lock();
        if t.lines.len() == STDERR_TAIL {
            t.lines.pop_front();
        }
        t.lines.push_back(line);
    }

    fn close(&self) {
        self.lock().closed = true;
    }
}

/// Spawns rclone with `args` (secret-free environment, stdin and stdout
/// closed) and forwards its stderr to our log, keeping the last lines.
pub fn spawn(
    reaper: &Reaper,
    rclone_bin: &str,
    args: &[OsString],
    env: &[(&str, &Path)],
) -> io::Result<(Child, StderrTail)> {
    spawn_logged(reaper, rclone_bin, args, env, tracing::Level::INFO)
}

/// [`spawn`], forwarding rclone's stderr at `level`: a probe repeated every
/// few seconds says what it found in one line of its own instead.
pub fn spawn_logged(
    reaper: &Reaper,
    rclone_bin: &str,
    args: &[OsString],
    env: &[(&str, &Path)],
    level: tracing::Level,
) -> io::Result<(Child, StderrTail)> {
    let mut cmd = command(rclone_bin, args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (child, stderr) = reaper.spawn(&mut cmd)?;
    let tail = StderrTail::default();
    if let Some(stderr) = stderr {
        let tail = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if level == tracing::Level::INFO {
                    tracing::info!(target: "rclone", "rclone: {line}");
                } else {
                    tracing::debug!(target: "rclone", "rclone: {line}");
                }
                tail.push(line);
            }
            tail.close();
        });
    }
    Ok((child, tail))
}

#[derive(Debug, thiserror::Error)]
pub enum RcdError {
    #[error("cannot start rclone ({bin}): {source}; install rclone >= 1.75 or set RCLONE_BIN")]
    Spawn { bin: String, source: io::Error },
    #[error("rclone rcd did not answer on {socket} within {timeout:?}. rclone said:\n{stderr}")]
    Timeout {
        socket: PathBuf,
        timeout: std::time::Duration,
        stderr: String,
    },
    #[error("rclone rcd exited ({exit}) at start. rclone said:\n{stderr}")]
    Exited {
        exit: crate::sys::process::Exit,
        stderr: String,
    },
}

/// Starts `rclone rcd` serving its rc API on the unix socket `socket` (in a
/// 0700 directory, so `--rc-no-auth` serves root only) and waits until it answers.
pub async fn start_rcd(
    reaper: &Reaper,
    rclone_bin: &str,
    config: &Path,
    socket: &Path,
    timeout: std::time::Duration,
) -> Result<(Child, StderrTail), RcdError> {
    let _ = fs::remove_file(socket);
    let mut addr = OsString::from("unix://");
    addr.push(socket);
    let args: Vec<OsString> = vec![
        "--config".into(),
        config.into(),
        "rcd".into(),
        "--rc-addr".into(),
        addr,
        "--rc-no-auth".into(),
        // Every caller retries with its own backoff: a transfer that cannot
        // reach S3 fails in seconds (rclone's default 10 low-level retries
        // take ~20 s per file) and a black-holed connection within a minute.
        "--low-level-retries".into(),
        "3".into(),
        "--contimeout".into(),
        "10s".into(),
        "--timeout".into(),
        "1m".into(),
    ];
    let (mut child, tail) =
        spawn(reaper, rclone_bin, &args, &[]).map_err(|source| RcdError::Spawn {
            bin: rclone_bin.to_owned(),
            source,
        })?;
    tracing::info!(pid = child.pid().as_raw(), "started rclone rcd");
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if rc::call(socket, "core/version", &serde_json::json!({}))
            .await
            .is_ok()
        {
            return Ok((child, tail));
        }
        if let Some(exit) = child.try_exit() {
            let stderr = tail
                .text_when_closed(std::time::Duration::from_secs(1))
                .await;
            return Err(RcdError::Exited { exit, stderr });
        }
        if tokio::time::Instant::now() >= deadline {
            // Not left running behind the error: nothing else holds it.
            let _ = child.signal(nix::sys::signal::Signal::SIGKILL);
            child.wait().await;
            return Err(RcdError::Timeout {
                socket: socket.to_owned(),
                timeout,
                stderr: tail.text(),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn s3() -> S3Config {
        let (c, _) = Config::from_vars(
            [
                ("S3_BUCKET", "bkt"),
                ("S3_ENDPOINT", "http://127.0.0.1:3900"),
                ("AWS_ACCESS_KEY_ID", "GKaccess"),
                ("AWS_SECRET_ACCESS_KEY", "sekrit"),
                ("RCLONE_CRYPT_PASSWORD", "ubtafWYbU0c8NpC9CUBaxEr8xvy76Q"),
                ("S3_PREFIX", "/team/state/"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .unwrap();
        c.s3.unwrap()
    }

    #[test]
    fn config_has_both_remotes_as_the_spec_names_them() {
        let text = render_config(&s3());
        assert!(
            text.contains("[s3]\ntype = s3\nprovider = Other\n"),
            "{text}"
        );
        assert!(text.contains("no_check_bucket = true\nno_head = true\n"));
        assert!(
            text.contains("[s3-crypt]\ntype = crypt\nremote = s3:bkt/team/state\n"),
            "{text}"
        );
        assert!(text.contains("filename_encryption = standard\ndirectory_name_encryption = true\n"));
        assert!(text.contains("password = ubtafWYbU0c8NpC9CUBaxEr8xvy76Q\n"));
        assert!(!text.contains("password2"));
    }

    #[test]
    fn config_file_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rclone.conf");
        write_config(&path, &s3()).unwrap();
        write_config(&path, &s3()).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn command_line_carries_no_secret() {
        let paths = RunPaths::new(Path::new("/run/cvm-init"), Path::new("/data/local"));
        let args = mount_args(&paths, Path::new("/data/openclaw"));
        let line = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            line,
            "--config /run/cvm-init/rclone.conf mount s3-crypt: /data/openclaw --vfs-cache-mode writes \
             --vfs-write-back 5s --dir-cache-time 1000h --vfs-cache-max-size 500M \
             --cache-dir /data/local/rclone-cache --links --allow-non-empty --rc --rc-addr unix:///run/cvm-init/rc/rclone.sock --rc-no-auth"
        );
    }

    #[test]
    fn secret_env_names() {
        for n in [
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ACCESS_KEY_ID",
            "RCLONE_CRYPT_PASSWORD",
            "RCLONE_CONFIG_S3_TYPE",
            "MASTER_KEY",
        ] {
            assert!(is_secret_env(n), "{n}");
        }
        for n in ["AWS_CA_BUNDLE", "PATH", "HOME", "S3_BUCKET", "MASTER_KEYS"] {
            assert!(!is_secret_env(n), "{n}");
        }
    }
}
