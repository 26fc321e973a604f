//! The bucket after an hour of the SQLite bench's load (a 2 KB row every
//! 20 ms): how big cvm-init's bucket grows with its history, beside
//! Litestream's under the same load, each on its own Garage, run side by
//! side. Sampled every few minutes; at the end, what cvm-init's bucket
//! holds by kind (stock bases, kept bases, spans, segments), and how long
//! a new container takes to restore the database from that history,
//! beside stock rclone downloading an object of its size. Sizes are what
//! the bucket lists (`rclone size` of the raw bucket: ciphertext, names
//! included); bytes written are Garage's `block_bytes_written`.
//! Results: bench/sqlite-hour.md.
//!
//! Run with `./scripts/bench sqlite-hour` (~62 min; `BENCH_LOAD_SECS`
//! shortens it). `BENCH_KEEP=1` leaves cvm-init's Garage running and its
//! directory in place at the end, with `restore.env` beside it, so that
//! `env $(cat …/restore.env) cvm-init restore --to DIR` can be timed again
//! and again on that hour's bucket (stop the Garage with `kill`).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::load::{commits, inspect, DB, WRITER};
use common::{rclone, script, stock_config, wait_until, Appliance, Dirs, Garage, PASSWORD};
use support::{
    litestream_bin, litestream_cmd, litestream_config, log_took, print_restore_log,
    restore_log_level, restore_took, secs, stats, stock_download_secs, write_report,
};

const T: Duration = Duration::from_secs(60);
const SAMPLE_EVERY: Duration = Duration::from_secs(300);

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// (objects, bytes) the raw bucket lists.
fn bucket_size(g: &Garage, dir: &Path) -> (u64, u64) {
    let conf = stock_config(g, dir);
    let out = rclone(&conf, &["size", "--json", &format!("s3:{}", g.bucket)]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    (v["count"].as_u64().unwrap(), v["bytes"].as_u64().unwrap())
}

/// cvm-init's objects by kind, as the crypt remote names them: (kind, objects, bytes).
fn by_kind(g: &Garage, dir: &Path) -> Vec<(&'static str, u64, u64)> {
    let conf = stock_config(g, dir);
    let out = rclone(
        &conf,
        &["lsjson", "-R", "--files-only", "--no-mimetype", "crypt:"],
    );
    let items: Vec<serde_json::Value> = serde_json::from_slice(&out).unwrap();
    let mut kinds: Vec<(&'static str, u64, u64)> = [
        "stock base (sqlite/)",
        "kept bases",
        "spans",
        "segments",
        "manifests",
        "other",
    ]
    .iter()
    .map(|k| (*k, 0, 0))
    .collect();
    for i in items {
        let path = i["Path"].as_str().unwrap_or_default();
        let size = i["Size"].as_u64().unwrap_or(0);
        let name = path.rsplit('/').next().unwrap_or_default();
        let k = if path.starts_with("sqlite/") {
            0
        } else if path.starts_with(".cvm/wal/") && path.contains("/bases/") {
            1
        } else if path.starts_with(".cvm/wal/") && path.ends_with("/manifest") {
            4
        } else if path.starts_with(".cvm/wal/") && name.split('-').count() == 3 {
            2
        } else if path.starts_with(".cvm/wal/") {
            3
        } else {
            5
        };
        kinds[k].1 += 1;
        kinds[k].2 += size;
    }
    kinds
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let load = secs("BENCH_LOAD_SECS", 3600);
    let Some(lbin) = litestream_bin() else {
        panic!("litestream is not on PATH; ./scripts/bench installs it");
    };
    let tmp = tempfile::tempdir().unwrap();
    let writer = tmp.path().join("writer.py");
    fs::write(&writer, WRITER).unwrap();

    // cvm-init, the default (replicate) layout and lease, the writer as its gateway.
    let ours = tmp.path().join("cvm");
    let g = Garage::start(&ours.join("g"));
    let out = ours.join("out");
    fs::create_dir_all(&out).unwrap();
    let dirs = Dirs::new(&ours, "c");
    let mut env = g.s3_env();
    env.extend(dirs.env());
    env.extend(
        [
            ("RCLONE_CRYPT_PASSWORD", PASSWORD.to_owned()),
            ("CVM_GATEWAY_CMD", format!("python3 {}", writer.display())),
            ("OUT", out.display().to_string()),
            ("CVM_LOG", "info".to_owned()),
            ("CVM_LEASE_TTL", "30s".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let mut app = Appliance::start(&dirs, &env);
    app.wait_ready(T);

    // Litestream, the same writer on a database of its own.
    let lite = tmp.path().join("litestream");
    let lg = Garage::start(&lite.join("g"));
    let lstate = lite.join("state");
    let lout = lite.join("out");
    let ldb = lstate.join(DB);
    fs::create_dir_all(ldb.parent().unwrap()).unwrap();
    fs::create_dir_all(&lout).unwrap();
    let config = lite.join("litestream.yml");
    litestream_config(&lg, &ldb, &config);
    let mut lw = Command::new("python3")
        .arg(&writer)
        .env("OPENCLAW_STATE_DIR", &lstate)
        .env("OUT", &lout)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(T, "the writers", || {
        !commits(&out).is_empty() && !commits(&lout).is_empty()
    });
    let mut ls = litestream_cmd(&lbin, "replicate", &config)
        .spawn()
        .expect("start litestream");

    let t0 = Instant::now();
    let (b0, lb0) = (g.bytes_written(), lg.bytes_written());
    let mut rows = String::new();
    loop {
        let k = t0.elapsed().as_secs() / SAMPLE_EVERY.as_secs() + 1;
        let next = (SAMPLE_EVERY * k as u32).min(load);
        let at = t0 + next;
        // A measured span of time, not synchronisation.
        wait_until(next + T, "the next sample", || Instant::now() >= at);
        let db = fs::metadata(dirs.state.join(DB)).map_or(0, |m| m.len());
        let (n, bytes) = bucket_size(&g, &ours);
        let (ln, lbytes) = bucket_size(&lg, &lite);
        let _ = writeln!(
            rows,
            "| {:.0} | {} | {} ({n} objects) | {} | {} ({ln} objects) | {} |",
            t0.elapsed().as_secs_f64() / 60.0,
            mib(db),
            mib(bytes),
            mib(g.bytes_written() - b0),
            mib(lbytes),
            mib(lg.bytes_written() - lb0),
        );
        eprintln!("bench: {}", rows.lines().last().unwrap());
        if next >= load {
            break;
        }
    }
    let written = g.bytes_written() - b0;
    let kinds = by_kind(&g, &ours);
    let _ = ls.kill();
    let _ = ls.wait();
    let _ = lw.kill();
    let _ = lw.wait();
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let committed = commits(&out).last().map_or(0, |c| c.0);

    // A new container restores the database from that hour of history; a
    // new machine has nothing of this one's waiting to be written.
    assert!(Command::new("sync").status().unwrap().success());
    let idle = script(&ours, "idle.sh", "exec sleep 100000");
    let after = Dirs::new(&ours, "after");
    let mut env_after = g.s3_env();
    env_after.extend(after.env());
    env_after.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    env_after.push(("CVM_GATEWAY_CMD".into(), idle.display().to_string()));
    env_after.push(("CVM_LOG".into(), restore_log_level()));
    let mut restored = Appliance::start(&after, &env_after);
    restored.wait_ready(T);
    let restore_secs = restore_took(&restored.log_text());
    print_restore_log("the hour's", &restored.log_text());
    let (max, _) = inspect(&after.state.join(DB)).expect("the restored database passes its check");
    // The writer logs a commit after it returns: the stop may fall between.
    assert!(
        (committed..=committed + 1).contains(&max),
        "every commit restored after the clean stop: {max} of {committed}"
    );
    let restored_bytes = fs::metadata(after.state.join(DB)).unwrap().len();
    assert_eq!(restored.stop(T), 0, "{}", restored.log_text());
    let stock_secs = stock_download_secs(&g, &ours, restored_bytes);
    let (again, stock_again) = restore_runs(&g, &ours, restored_bytes);
    let (r_med, s_med) = (stats(&again).1, stats(&stock_again).1);

    let mut md = String::new();
    let _ = writeln!(md, "# The bucket after an hour of the SQLite load\n");
    let _ = writeln!(
        md,
        "Load: one WAL database, a 2 KB row committed every 20 ms by a Python writer (the SQLite bench's), for \
         {:.0} min. cvm-init in its default layout and settings (replicate, debounce 1 s, `CVM_HISTORY_DAYS` 7) \
         and Litestream 0.5 (sync-interval 1 s, its default snapshot and retention settings) side by side, each \
         on its own Garage (compression off). Size: what the raw bucket lists (`rclone size`: ciphertext, names \
         included). Written: Garage's `block_bytes_written` since the load began. \
         `./scripts/bench sqlite-hour` wrote this file.\n",
        load.as_secs_f64() / 60.0
    );
    let _ = writeln!(
        md,
        "| minute | database | cvm-init bucket | cvm-init written | Litestream bucket | Litestream written |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    md.push_str(&rows);
    let _ = writeln!(md, "\ncvm-init's bucket at the end, by kind:\n");
    let _ = writeln!(md, "| kind | objects | size |");
    let _ = writeln!(md, "|---|---|---|");
    for (k, n, b) in &kinds {
        let _ = writeln!(md, "| {k} | {n} | {} |", mib(*b));
    }
    let _ = writeln!(
        md,
        "\nRestore after the hour: a new container restored the database ({:.0} MB, every commit, \
         `integrity_check` ok) in {restore_secs:.2} s, as its log times it; stock rclone downloads one \
         object of that size from the same Garage in {stock_secs:.2} s: {:.2}×.",
        restored_bytes as f64 / 1e6,
        restore_secs / stock_secs.max(0.01)
    );
    let _ = writeln!(
        md,
        "\nThe same restore {RUNS} times more with `cvm-init restore --to`, each beside stock rclone's \
         download (one run varies by a third here, so they alternate): median {r_med:.2} s (runs: {}) \
         against stock rclone's {s_med:.2} s (runs: {}): **{:.2}×**. The restore's time is its log's \
         (`sqlite: restore done`, from the listing of the lines to the database checked and synced); \
         stock rclone's is the whole command's, its start included.",
        list(&again),
        list(&stock_again),
        r_med / s_med.max(0.01)
    );
    let _ = writeln!(
        md,
        "\nHow retention bounds it (docs/durability.md, SQLite history): every restore point of the last 65 \
         minutes is kept (the newest base at or before that window's start with the spans and segments that \
         bring it there, every base after it, every span and segment after those), then one point per UTC \
         hour for `CVM_HISTORY_DAYS` (7), kept as its base and the spans that reach it; the newest base \
         always. Within the first hour nothing is old enough to go, so this table is the whole first hour. \
         A new base comes once a restore would read 1.5 times the database as it is now (the base, then \
         the spans and segments after it), or after 128 spans, or after `CVM_SQLITE_BASE_MAX_AGE` (24 h); \
         the prune runs after each base and hourly while the line changes, and deletes the segments under \
         a kept span once they leave the 65 minutes. So the bucket holds about 65 minutes to 2 hours of \
         segments (here {}/h written in all), the spans since the oldest base a kept point needs, and \
         those bases, up to the 7-day horizon. A database rewritten in place takes a base per half a \
         database of changes, so bases and spans grow the bucket by about three times what changed; one \
         that appends, as this one does, keeps its base for 128 spans (about 2.3 hours of saves a second) \
         or a day, so its spans hold each change about once. A kept base and the stock base are one \
         server-side copy: listed twice, stored once on Garage.",
        mib((written as f64 * 3600.0 / load.as_secs_f64()) as u64)
    );
    write_report("sqlite-hour", &md);
    if std::env::var_os("BENCH_KEEP").is_some() {
        keep(tmp, g, &ours);
    }
}

/// More restores of the bucket after the hour, alternating with stock
/// rclone's download.
const RUNS: usize = 5;

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// [`RUNS`] restores of `g`'s bucket by `cvm-init restore`, each followed
/// by stock rclone downloading an object of `size` bytes: (the restores'
/// own times, stock rclone's).
fn restore_runs(g: &Garage, ours: &Path, size: u64) -> (Vec<f64>, Vec<f64>) {
    let (mut restores, mut stock) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let to = ours.join(format!("again-{i}"));
        let out = Command::new(common::BIN)
            .args(["restore", "--to", to.to_str().unwrap()])
            .envs(restore_env(g))
            .env("CVM_LOG", "info")
            // Stock rclone's test object, not state.
            .env("CVM_EXCLUDE", "/stock/**")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "cvm-init restore: {log}");
        restores.push(log_took(&log, "sqlite: restore done").expect("the restore logs its time"));
        let _ = fs::remove_dir_all(&to);
        stock.push(stock_download_secs(g, ours, size));
    }
    (restores, stock)
}

/// What `cvm-init restore` needs to read `g`'s bucket.
fn restore_env(g: &Garage) -> Vec<(String, String)> {
    let mut env = g.s3_env();
    env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    env.push((
        "RCLONE_BIN".into(),
        common::rclone_bin().display().to_string(),
    ));
    env
}

/// Leaves the bucket to time restores on: the directory stays and cvm-init's
/// Garage keeps serving it (its `Drop` would stop it).
fn keep(tmp: tempfile::TempDir, g: Garage, ours: &Path) {
    let file = ours.join("restore.env");
    let lines: String = restore_env(&g)
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    fs::write(&file, lines).unwrap();
    eprintln!(
        "bench: kept {} and Garage (pid {:?}); time a restore with: env $(cat {}) cvm-init restore --to DIR",
        tmp.keep().display(),
        g.detach(),
        file.display()
    );
}
