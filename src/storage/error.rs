//! What can go wrong in storage: at boot and in recovery (`StorageError`),
//! while the gateway runs (`StorageFailure`), and at the stop (`FlushError`).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::sqlite::restore::RestoreError;
use crate::storage::mount::redirect::RedirectError;
use crate::sys::process::Exit;

impl From<crate::rclone::session::Ended> for StorageFailure {
    fn from(e: crate::rclone::session::Ended) -> StorageFailure {
        use crate::rclone::session::Ended;
        match e {
            Ended::LeaseLost(by) => StorageFailure::LeaseLost(by),
            Ended::Exited(exit) => StorageFailure::RcloneExited(exit),
        }
    }
}

/// Why storage could not start, or be brought back.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
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
    #[error(
        "{mountpoint} is not empty before it was mounted: it holds {entries:?}. They are not on S3 \
         (written while the mount was down, or shipped in the image) and the mount would hide them; \
         move them away or into the bucket, then start again"
    )]
    NotEmpty {
        mountpoint: PathBuf,
        entries: Vec<String>,
    },
    #[error("cannot unmount {mountpoint}: {source}")]
    Unmount {
        mountpoint: PathBuf,
        source: nix::Error,
    },
    #[error(transparent)]
    Killed(#[from] crate::rclone::session::Killed),
    #[error("CVM_EXCLUDE holds a pattern that is not usable: {0}")]
    Exclude(globset::Error),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error(transparent)]
    Replicate(#[from] super::replicate::ReplicateError),
    #[error(transparent)]
    KeyCheck(#[from] crate::remote::keycheck::KeyCheckError),
    #[error(transparent)]
    S3(#[from] crate::remote::probe::WaitError),
    #[error(transparent)]
    Lease(#[from] crate::remote::lease::LeaseError),
}

/// Why storage stopped serving while the gateway ran.
#[derive(Debug, thiserror::Error)]
pub enum StorageFailure {
    #[error("rclone exited unexpectedly ({0})")]
    RcloneExited(Exit),
    #[error("the rclone mount is gone from the mount table")]
    MountGone,
    #[error("the rclone mount is dead ({0})")]
    MountDead(std::io::Error),
    #[error("the rclone mount did not answer {0} looks in a row: rclone is hung")]
    MountHung(u32),
    /// Another instance holds the lease now: nothing more may be uploaded.
    #[error("another instance took over the bucket prefix: {0}")]
    LeaseLost(String),
    /// A bug: what the loop did is not known, so no recovery is tried.
    #[error("{what} ended unexpectedly ({detail}): uploads from it stopped")]
    WorkerDied { what: &'static str, detail: String },
}

/// What could not be made durable during shutdown.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(
        "{in_progress} upload(s) in progress and {queued} queued when the stop budget ran out; \
         not on S3: {files:?}. They stay in rclone's cache under CVM_LOCAL_DIR and upload on the next boot"
    )]
    Timeout {
        in_progress: u64,
        queued: u64,
        files: Vec<String>,
    },
    #[error(
        "rclone exited ({0}) before its upload queue could be drained; files written since their \
         last upload stay in rclone's cache under CVM_LOCAL_DIR and upload on the next boot"
    )]
    RcloneGone(Exit),
    #[error("{0}")]
    Databases(#[from] crate::sqlite::backup::FinalPassError),
    #[error("{0}")]
    Files(#[from] crate::storage::replicate::engine::Unreplicated),
    #[error("{0} had ended before the stop (see the error logged then); what it had not saved is not on S3")]
    WorkerGone(&'static str),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<FlushError>),
    #[error("cannot ask rclone for its upload queue: {0}")]
    Rc(#[from] crate::rclone::rc::RcError),
    #[error(
        "rclone did not answer about its upload queue before the stop budget ran out; files written \
         since their last upload stay in rclone's cache under CVM_LOCAL_DIR and upload on the next boot"
    )]
    Unresponsive,
    #[error(
        "rclone was not running at the stop (the last remount failed); files written since their last \
         upload stay in rclone's cache under CVM_LOCAL_DIR and upload on the next boot"
    )]
    NoRclone,
    #[error("syncing the state dir failed: {0}")]
    Sync(std::io::Error),
}

impl FlushError {
    /// Every error of `results`, as one.
    pub fn all(
        results: impl IntoIterator<Item = Result<(), FlushError>>,
    ) -> Result<(), FlushError> {
        let mut errors: Vec<FlushError> = results.into_iter().filter_map(Result::err).collect();
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(FlushError::Several(errors)),
        }
    }
}
