//! The one mapping from how a run ended to the process exit code. README's
//! exit-code table mirrors this enum.

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Stopped on a signal; everything was flushed and unmounted.
    Clean = 0,
    /// An unexpected internal error.
    Failure = 1,
    /// The gateway failed `CVM_GATEWAY_MAX_FAILED_STARTS` starts in a row.
    GatewayFailing = 70,
    /// Unknown command-line arguments.
    Usage = 64,
    /// Storage could not be set up at boot, or died while running.
    StorageUnavailable = 69,
    /// S3 answered, but the state in it cannot be restored here (a file that
    /// cannot be written, a database that fails its check): every boot would
    /// fail the same way. The log names the file and the cause.
    Unrestorable = 65,
    /// A PID-1 duty failed: /proc or /dev/fuse.
    Os = 71,
    /// The crypt key does not match the data in the bucket prefix; nothing was written.
    WrongKey = 77,
    /// The stop budget ran out before everything reached S3 (or rclone had to be killed).
    NotFlushed = 74,
    /// The configuration is invalid; nothing was touched.
    Config = 78,
    /// S3 answered but refused: credentials rejected or bucket missing; nothing was written.
    S3Rejected = 76,
    /// The gateway command exists but cannot be executed.
    GatewayNotExecutable = 126,
    /// The gateway command does not exist.
    GatewayNotFound = 127,
}

impl From<Status> for ExitCode {
    fn from(s: Status) -> ExitCode {
        ExitCode::from(s as u8)
    }
}
