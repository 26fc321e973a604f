//! The commands besides running the appliance: `cvm-init check`,
//! `cvm-init restore`, `cvm-init history` and `cvm-init attest`.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, S3Config};
use crate::exit::Status;
use crate::rclone::{self, RcdError, RunPaths, StderrTail};
use crate::remote::keycheck::{self, KeyCheckError};
use crate::sys::process::{Child, Reaper};

pub mod attest;
pub mod check;
pub mod history;
pub mod restore;

/// A command's failure, with the exit status it maps to.
struct Failed(Status, String);

fn fail(status: Status) -> impl Fn(String) -> Failed {
    move |msg| Failed(status, msg)
}

/// The appliance's configuration, for a command that reads its bucket.
fn bucket_config() -> Result<(Config, S3Config), Failed> {
    let (cfg, _) = Config::from_env().map_err(|e| {
        Failed(
            Status::Config,
            e.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let s3 = cfg.s3.clone().ok_or_else(|| {
        Failed(
            Status::Config,
            "S3_BUCKET is not set: there is no bucket to read".into(),
        )
    })?;
    Ok((cfg, s3))
}

/// Runs `f` against the bucket: its own `rclone rcd` on a config rendered
/// into a private directory (removed after), once the crypt key is checked
/// (a wrong key is 77, as for the appliance). Reads only.
fn with_bucket<T>(
    command: &str,
    cfg: &Config,
    s3: &S3Config,
    f: impl AsyncFnOnce(&RunPaths) -> Result<T, Failed>,
) -> Result<T, Failed> {
    let failure = fail(Status::Failure);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        let reaper = Reaper::default();
        let sigchld = signal(SignalKind::child())
            .map_err(|e| failure(format!("cannot watch child processes: {e}")))?;
        tokio::spawn(reaper.clone().run(sigchld));
        let tmp = TempRun::create(command).map_err(|(p, e)| {
            failure(format!(
                "cannot create a private directory at {}: {e}",
                p.display()
            ))
        })?;
        let paths = RunPaths::new(&tmp.0, &tmp.0);
        paths.prepare(s3).map_err(|(p, e)| {
            failure(format!(
                "cannot write a temporary rclone config at {}: {e}",
                p.display()
            ))
        })?;
        let (mut rcd, _) = start_rcd(&reaper, cfg, &paths)
            .await
            .map_err(|e| fail(Status::StorageUnavailable)(e.to_string()))?;
        let r = match keycheck::inspect(&paths.rc_socket, &s3.raw_remote(), &paths.scratch).await {
            Ok(_) => f(&paths).await,
            Err(e @ KeyCheckError::WrongKey { .. }) => Err(Failed(Status::WrongKey, e.to_string())),
            Err(e) => Err(Failed(Status::StorageUnavailable, e.to_string())),
        };
        rcd.terminate(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
        r
    })
}

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
