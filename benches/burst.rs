//! A burst of small files at the stop (replicate layout): how long the
//! graceful stop takes to flush 5,000 files moved into the state dir right
//! before SIGTERM, against the default stop budget's flush share and against
//! stock rclone copying the same files to the same Garage through the same
//! crypt remote with the same transfers. Results: bench/burst.md. Run with
//! `./scripts/bench burst`. `tests/burst.rs` checks that such a stop loses
//! nothing; the time it takes is measured here, not asserted there.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::fmt::Write as _;
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::replica::{write, Setup};
use common::{rclone_bin, stock_config};
use support::{log_took, stats, write_report};

const T: Duration = Duration::from_secs(120);
/// The default `CVM_STOP_TIMEOUT` (9 s) times the flush's share of it (85 %).
const FLUSH_SHARE_SECS: f64 = 9.0 * 0.85;

fn env_usize(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runs = env_usize("BENCH_RUNS", 5);
    let files = env_usize("BENCH_BURST_FILES", 5000);
    let mut rows = String::new();
    let (mut stop, mut pass, mut stock) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let s = Setup::new();
        let (mut app, a) = s.boot("a", &[]);
        let outside = s.tmp.path().join("prepared");
        for i in 0..files {
            write(
                &outside,
                &format!("burst/{:02}/{i}.json", i % 50),
                &format!("{{\"n\":{i}}}"),
            );
        }
        // The copy outside is written back before the measured stop, which
        // would otherwise compete with Garage for the disk.
        assert!(Command::new("sync").status().unwrap().success());
        fs::rename(outside.join("burst"), a.state.join("burst")).unwrap();
        let t = Instant::now();
        let code = app.stop(T);
        let stop_secs = t.elapsed().as_secs_f64();
        let log = app.log_text();
        assert_eq!(code, 0, "the stop did not flush the burst:\n{log}");
        let pass_secs =
            log_took(&log, "replicate: final pass").expect("the log times the final pass");

        // The anchor: stock rclone, the same files, the same knobs as the
        // stop's batch job (64 transfers, no check of the destination, no
        // HEAD after each PUT), to its own prefix of the same bucket.
        let conf = stock_config(&s.g, s.tmp.path());
        let t = Instant::now();
        let ok = Command::new(rclone_bin())
            .arg("--config")
            .arg(&conf)
            .args(["copy", a.state.join("burst").to_str().unwrap()])
            .arg(format!("crypt:stock-{run}"))
            .args([
                "--transfers",
                "64",
                "--checkers",
                "64",
                "--no-check-dest",
                "--no-traverse",
                "--s3-no-head",
            ])
            .status()
            .unwrap();
        let stock_secs = t.elapsed().as_secs_f64();
        assert!(ok.success(), "stock rclone copy");
        eprintln!(
            "bench: run {run}: stop {stop_secs:.2} s (final pass {pass_secs:.2} s), stock rclone {stock_secs:.2} s"
        );
        writeln!(
            rows,
            "| {run} | {stop_secs:.2} s | {pass_secs:.2} s | {stock_secs:.2} s | {:.2}× |",
            pass_secs / stock_secs
        )
        .unwrap();
        stop.push(stop_secs);
        pass.push(pass_secs);
        stock.push(stock_secs);
    }
    let ratios: Vec<f64> = pass.iter().zip(&stock).map(|(p, s)| p / s).collect();
    let fmt = |v: &[f64], unit: &str| {
        let (a, m, b) = stats(v);
        format!("{a:.2} / {m:.2} / {b:.2}{unit}")
    };
    let mut md = format!(
        "# A burst of small files at the stop (replicate layout)\n\n\
         Written by `./scripts/bench burst` ({runs} runs, {files} files of ~10 bytes in 50 directories).\n\
         Each run: a fresh Garage 2.5 on loopback, cvm-init (release build) booted on it, the files moved\n\
         into the state dir at once, then SIGTERM: the stop uploads all of them in its final pass.\n\
         Anchor, same run and bucket: stock rclone `copy` of the same files through the same crypt remote\n\
         with the stop's knobs (64 transfers, `--no-check-dest --no-traverse --s3-no-head`).\n\
         The default `CVM_STOP_TIMEOUT` (9 s) gives the flush {FLUSH_SHARE_SECS:.2} s.\n\n\
         | run | whole stop | final pass | stock rclone copy | final pass / stock |\n|---|---|---|---|---|\n{rows}\n\
         | min / median / max | |\n|---|---|\n\
         | whole stop | {} |\n| final pass | {} |\n| stock rclone copy | {} |\n| final pass / stock rclone | {} |\n",
        fmt(&stop, " s"),
        fmt(&pass, " s"),
        fmt(&stock, " s"),
        fmt(&ratios, "×"),
    );
    md.push_str(
        "\nThe stop's batch job is about as fast as stock rclone: on 2 cores both are bound by \
         rclone's and Garage's CPU per object (about 1 ms each), not by cvm-init. A state dir that \
         can get more new small files than this right before a stop needs a larger \
         `CVM_STOP_TIMEOUT` (and a runtime stop grace to match); what the budget cannot flush is \
         named in the log and the exit code is 74.\n\n\
         **What a crash loses of a burst** is printed by `tests/burst.rs` \
         (`cargo test --locked --test burst -- --nocapture`): files go up oldest change first, \
         so a SIGKILL 5 s after a 5,000-file burst loses its newest files (390–3,490 in runs so \
         far), never one of its 1,000 oldest. A file is on S3 `CVM_BACKUP_DEBOUNCE` (1 s) plus \
         the upload time of the changes made before it after it was written \
         (docs/durability.md).\n",
    );
    write_report("burst", &md);
}
