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
pub mod backup;
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

use std::path::Path;

use config::Config;
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

    let cfg = match Config::from_env() {
        Ok((cfg, warnings)) => {
            for w in warnings {
                tracing::warn!("{w}");
            }
            cfg
        }
        Err(e) => {
            for p in &e.problems {
                tracing::error!("configuration: {p}");
            }
            tracing::error!(
                "{} configuration problem(s); nothing was started or changed",
                e.problems.len()
            );
            return Status::Config;
        }
    };
    let mode = match (&cfg.s3, cfg.layout) {
        (None, _) => "local (no S3_BUCKET)",
        (Some(_), config::Layout::Replicate) => "s3, replicate layout (local state dir replicated)",
        (Some(_), config::Layout::Mount) => "s3, mount layout (rclone crypt mount)",
    };
    tracing::info!(mode, state_dir = %cfg.state_dir.display(), "configuration ok");

    if let Err(e) = pid1::ensure_proc() {
        tracing::error!("{e}");
        return Status::Os;
    }
    match pid1::become_subreaper_unless_pid1() {
        Ok(true) => tracing::info!("not PID 1: running as child subreaper"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!("{e}");
            return Status::Os;
        }
    }
    if cfg.s3.is_some() && cfg.layout == config::Layout::Mount {
        if let Err(e) = pid1::ensure_fuse(Path::new("/dev/fuse"), true) {
            tracing::error!("{e}");
            return Status::Os;
        }
    }

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return Status::Failure;
        }
    };
    let status = runtime.block_on(supervisor::run(cfg, process::Reaper::default()));
    match status {
        Ok(s) => {
            tracing::info!(exit_code = s as u8, "cvm-init exiting");
            s
        }
        Err(e) => {
            tracing::error!("{e:#}");
            Status::Failure
        }
    }
}
