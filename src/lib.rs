//! cvm-init: PID 1 for a confidential VM whose app keeps its state in an
//! S3 bucket, encrypted client-side by rclone crypt.
//!
//! Where things live: `config` (environment), `pid1` (/proc, /dev/fuse,
//! subreaper), `process` (spawning and reaping), `rclone` (config, command
//! lines, rc API), `storage` (layouts), `gateway` (the app), `supervisor`
//! (boot and supervision), `shutdown` (the data-safe stop order), `exit`
//! (exit codes).

#![forbid(unsafe_code)]

pub mod attest;
pub mod backoff;
pub mod backup;
pub mod boot;
pub mod check;
pub mod config;
pub mod exit;
pub mod filter;
pub mod gateway;
pub mod health;
pub mod keycheck;
pub mod logging;
pub mod mountinfo;
pub mod notify;
pub mod obscure;
pub mod pid1;
pub mod process;
pub mod rclone;
pub mod replication;
pub mod restore;
pub mod s3probe;
pub mod secret;
pub mod shutdown;
pub mod sqlite;
pub mod storage;
pub mod supervisor;
pub mod treemeta;

use exit::Status;

const USAGE: &str =
    "usage: cvm-init            run the appliance (configured by environment variables; see README)
       cvm-init check      check the configuration, S3, the crypt key and FUSE; writes nothing
       cvm-init attest <app-compose.json> <sha256:image digest>
       cvm-init --version";

fn attest_cmd(file: &str, digest: &str) -> Status {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cvm-init attest: cannot read {file}: {e}");
            return Status::Usage;
        }
    };
    match attest::attest(&bytes, digest) {
        Ok(report) => {
            attest::print(&report, digest);
            if report.ok() {
                Status::Clean
            } else {
                Status::Failure
            }
        }
        Err(e) => {
            eprintln!("cvm-init attest: {e}");
            Status::Usage
        }
    }
}

/// Runs cvm-init with `args` (without the program name) and returns the exit status.
pub fn main(args: &[String]) -> Status {
    match args {
        [] => {}
        [a] if a == "--version" || a == "-V" => {
            println!("cvm-init {}", env!("CARGO_PKG_VERSION"));
            return Status::Clean;
        }
        [cmd, file, digest] if cmd == "attest" => return attest_cmd(file, digest),
        [cmd] if cmd == "check" => {
            // Its report is on stdout; rclone's chatter is not part of it.
            logging::init("error");
            return check::run();
        }
        [a] if a == "--help" || a == "-h" => {
            println!("{USAGE}");
            return Status::Clean;
        }
        _ => {
            eprintln!("cvm-init: unexpected arguments {args:?}\n{USAGE}");
            return Status::Usage;
        }
    }
    logging::init(logging::DEFAULT);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        "cvm-init starting"
    );
    let status = boot::appliance();
    tracing::info!(exit_code = status as u8, "cvm-init exiting");
    status
}
