//! cvm-init: PID 1 for a confidential VM whose app keeps its state in an
//! S3 bucket, encrypted client-side by rclone crypt.
//!
//! The lifecycle reads top to bottom in three files: `boot` (the numbered
//! boot sequence), `supervisor` (the loop that acts, `supervisor::policy`
//! decides) and `shutdown` (the numbered, data-safe stop); `exit` maps how
//! a run ended to its exit code.
//!
//! Module map (docs/architecture.md has the long form):
//! - `config`: environment → `Config`, every problem at once;
//! - `gateway`: the app's process group, started and stopped;
//! - `storage`: the layouts behind one interface: `local`, `mount`
//!   (with `redirect` of databases to local disk), `replicate` (its
//!   `engine`, `plan`, `stage`, `treemeta`), and the `worker` loop under
//!   both engines;
//! - `sqlite`: snapshots and checks, `patterns`, the `backup` engine, `restore`;
//! - `rclone`: rendered config and command lines, `rc` client, `session`;
//! - `remote`: S3 `probe`, crypt `keycheck`, upload `lag`;
//! - `sys`: `pid1` duties, `process` (the one owner of waitpid), `mountinfo`,
//!   `sdnotify`;
//! - `cli`: `check`, `restore` and `attest`;
//! - `backoff`, `filter` (rclone filter patterns), `logging`, `secret`,
//!   `obscure` (rclone's password obscuring, MASTER_KEY derivation).

#![forbid(unsafe_code)]

pub mod backoff;
pub mod boot;
pub mod cli;
pub mod config;
pub mod exit;
pub mod filter;
pub mod gateway;
pub mod logging;
pub mod obscure;
pub mod rclone;
pub mod remote;
pub mod secret;
pub mod shutdown;
pub mod sqlite;
pub mod storage;
pub mod supervisor;
pub mod sys;
pub mod timepoint;

use exit::Status;

const USAGE: &str =
    "usage: cvm-init            run the appliance (configured by environment variables; see README)
       cvm-init check      check the configuration, S3, the crypt key and FUSE; writes nothing
       cvm-init restore --to DIR [--at TIME]
                           write the state S3 holds into DIR: the latest, or databases as of TIME
                           (RFC 3339, or ago: -15m, -2h30m, -1d); writes nothing to S3
       cvm-init history [--json]
                           list what restore --at can restore
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
    match cli::attest::attest(&bytes, digest) {
        Ok(report) => {
            cli::attest::print(&report, digest);
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
        [cmd, rest @ ..] if cmd == "restore" => {
            let (mut to, mut at) = (None, None);
            let mut it = rest.iter();
            while let Some(flag) = it.next() {
                match (flag.as_str(), it.next()) {
                    ("--to", Some(v)) => to = Some(v),
                    ("--at", Some(v)) => at = Some(v),
                    _ => {
                        eprintln!("cvm-init restore: unexpected arguments {rest:?}\n{USAGE}");
                        return Status::Usage;
                    }
                }
            }
            let Some(to) = to else {
                eprintln!("cvm-init restore: --to DIR is required\n{USAGE}");
                return Status::Usage;
            };
            // Its summary is on stdout; problems and rclone's errors on stderr.
            logging::init("warn");
            return cli::restore::run(std::path::Path::new(to), at.map(String::as_str));
        }
        [cmd, rest @ ..] if cmd == "history" => {
            let as_json = match rest {
                [] => false,
                [j] if j == "--json" => true,
                _ => {
                    eprintln!("cvm-init history: unexpected arguments {rest:?}\n{USAGE}");
                    return Status::Usage;
                }
            };
            logging::init("warn");
            return cli::history::run(as_json);
        }
        [cmd] if cmd == "check" => {
            // Its report is on stdout; rclone's chatter is not part of it.
            logging::init("error");
            return cli::check::run();
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
