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
    /// Another instance took over this bucket prefix's lease while this one
    /// ran: it uploaded nothing more and stopped; its state dir is untouched.
    LeaseLost = 73,
    /// Another instance holds the bucket prefix's lease and `CVM_LEASE_WAIT`
    /// ran out; nothing was restored or written.
    LeaseBusy = 75,
    /// The gateway command exists but cannot be executed.
    GatewayNotExecutable = 126,
    /// The gateway command does not exist.
    GatewayNotFound = 127,
}

impl Status {
    /// The status of a run that ended for `self` (a signal: `Clean`, or a
    /// failure) and whose data-safe stop ended with `stop`. A stop that could
    /// not flush wins over every other reason but a lost lease: state that is not on S3 is
    /// what an operator must act on before the volume is thrown away, and
    /// the reason the run ended is in the log above it.
    pub fn with_stop(self, stop: Status) -> Status {
        match (self, stop) {
            // What it did not upload it must not upload: the cause is the news.
            (Status::LeaseLost, _) => Status::LeaseLost,
            (_, Status::NotFlushed) => Status::NotFlushed,
            (Status::Clean, stop) => stop,
            (reason, _) => reason,
        }
    }
}

impl From<Status> for ExitCode {
    fn from(s: Status) -> ExitCode {
        ExitCode::from(s as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::Status::*;

    #[test]
    fn an_unflushed_stop_wins_then_the_reason_the_run_ended() {
        let table = [
            (Clean, Clean, Clean),
            (Clean, NotFlushed, NotFlushed),
            (GatewayFailing, Clean, GatewayFailing),
            (GatewayFailing, NotFlushed, NotFlushed),
            (StorageUnavailable, NotFlushed, NotFlushed),
            (Unrestorable, Clean, Unrestorable),
            (WrongKey, Clean, WrongKey),
            (Failure, NotFlushed, NotFlushed),
            (LeaseLost, NotFlushed, LeaseLost),
            (LeaseBusy, Clean, LeaseBusy),
        ];
        for (reason, stop, want) in table {
            assert_eq!(reason.with_stop(stop), want, "{reason:?} then {stop:?}");
        }
    }
}
