//! What a small change costs on a big database: cvm-init against Litestream
//! 0.5, each replicating the same load to its own fresh Garage in one run.
//!
//! A WAL database pre-filled to each size (`BENCH_DB_MB`, default
//! `20,200`), then a 2 KB row committed every 100 ms (`BENCH_ROW_BYTES`,
//! `BENCH_EVERY`; `BENCH_LITESTREAM=0` leaves Litestream out,
//! `BENCH_REPORT` names the file written, and `BENCH_LOG=1` prints each
//! restore's log). After a warm-up (the
//! first whole copy of the database goes up), the load window meters what
//! Garage stored (`block_bytes_written`, compression off) and the CPU of
//! cvm-init with its rclone (Litestream: its own process). Then crash
//! rounds: SIGKILL of everything at a random moment, a fresh container
//! restores, and the commits lost are counted; the restore is timed against
//! stock rclone downloading an object of the restored database's size. Litestream's loss
//! is sampled with `litestream restore` during its window. Results:
//! bench/sqlite-big.md.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::load::{commits, inspect, lost_seconds, now, DB, WRITER};
use common::{wait_until, Appliance, Dirs, Garage, PASSWORD};
use support::{
    litestream_bin, litestream_cmd, litestream_config, litestream_restore, print_restore_log,
    proc_cpu_secs, rclone_under, restore_log_level, restore_took, secs, stats, stock_download_secs,
    write_report,
};

const T: Duration = Duration::from_secs(600);

/// The writer's load: a row of `row_bytes` every `every` seconds.
#[derive(Clone)]
struct Load {
    every: String,
    row_bytes: String,
}

impl Load {
    fn from_env() -> Load {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.into());
        Load {
            every: var("BENCH_EVERY", "0.1"),
            row_bytes: var("BENCH_ROW_BYTES", "2000"),
        }
    }

    fn env(&self) -> [(&'static str, String); 2] {
        [
            ("EVERY", self.every.clone()),
            ("ROW_BYTES", self.row_bytes.clone()),
        ]
    }
}

const PREFILL: &str = r#"
import os, sqlite3, sys
path, mb = sys.argv[1], int(sys.argv[2])
os.makedirs(os.path.dirname(path), exist_ok=True)
db = sqlite3.connect(path)
db.execute("pragma journal_mode=wal")
db.execute("create table if not exists tx(i integer primary key, ts real, pad blob)")
rows = mb * 1024 * 1024 // 2100
for start in range(0, rows, 10000):
    db.executemany("insert into tx values (?, 0, ?)", ((i + 1, os.urandom(2000)) for i in range(start, min(rows, start + 10000))))
    db.commit()
db.execute("pragma wal_checkpoint(truncate)")
db.close()
"#;

fn pause_until(d: Instant) {
    // Benchmark windows are measured spans of time, not synchronisation.
    wait_until(
        d.saturating_duration_since(Instant::now()) + T,
        "the window",
        || Instant::now() >= d,
    );
}

fn prefill(root: &Path, db: &Path, mb: u64) {
    let script = root.join("prefill.py");
    fs::write(&script, PREFILL).unwrap();
    let ok = Command::new("python3")
        .arg(&script)
        .arg(db)
        .arg(mb.to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "prefill");
}

#[derive(Default)]
struct Row {
    name: String,
    mb: u64,
    bytes_per_min: f64,
    cpu: f64,
    lost: Vec<f64>,
    restore_secs: Vec<f64>,
    stock_secs: f64,
    /// The size of the database the last crash round restored.
    restored_bytes: u64,
}

fn mib(b: f64) -> String {
    format!("{:.2} MiB", b / (1024.0 * 1024.0))
}

/// Boots cvm-init; `takeover` names a killed holder whose lease is taken at
/// once (`CVM_LEASE_TAKEOVER`, the operator's way after a crash).
fn boot(
    g: &Garage,
    root: &Path,
    name: &str,
    writer: &Path,
    out: &Path,
    load: &Load,
    takeover: Option<String>,
) -> (Appliance, Dirs) {
    let dirs = Dirs::new(root, name);
    fs::create_dir_all(out).unwrap();
    let mut env = g.s3_env();
    env.extend(dirs.env());
    env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    env.push((
        "CVM_GATEWAY_CMD".into(),
        format!("python3 {}", writer.display()),
    ));
    env.push(("CVM_LOG".into(), restore_log_level()));
    env.push(("CVM_LEASE_TTL".into(), "30s".into()));
    env.push(("OUT".into(), out.display().to_string()));
    env.extend(load.env().map(|(k, v)| (k.to_owned(), v)));
    env.extend(takeover.map(|id| ("CVM_LEASE_TAKEOVER".to_owned(), id)));
    (Appliance::start(&dirs, &env), dirs)
}

fn cvm_init(
    root: &Path,
    writer: &Path,
    load_spec: &Load,
    mb: u64,
    warmup: Duration,
    load: Duration,
    rounds: usize,
) -> Row {
    let g = Garage::start(&root.join("g"));
    let dirs = Dirs::new(root, "load");
    prefill(root, &dirs.state.join(DB), mb);
    let out = root.join("out-load");
    let (mut app, dirs) = boot(&g, root, "load", writer, &out, load_spec, None);
    app.wait_ready(T);
    wait_until(T, "the first base", || {
        app.log_text().contains("sqlite: snapshot uploaded (base)")
    });
    pause_until(Instant::now() + warmup);
    let rclone = rclone_under(&dirs.run).or_else(|| rclone_under(root));
    let cpu = || proc_cpu_secs(app.init_pid()) + rclone.map_or(0.0, proc_cpu_secs);
    let (b0, c0, t0) = (g.bytes_written(), cpu(), Instant::now());
    pause_until(t0 + load);
    let wall = t0.elapsed().as_secs_f64();
    let mut row = Row {
        name: "cvm-init".into(),
        mb,
        bytes_per_min: (g.bytes_written() - b0) as f64 / wall * 60.0,
        cpu: (cpu() - c0) / wall,
        ..Row::default()
    };

    let mut seed = (now() * 1e6) as u64 | 1;
    let mut prev = (out, app, dirs);
    for round in 1..=rounds {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        pause_until(Instant::now() + Duration::from_millis(1000 + (seed >> 33) % 2000));
        let killed_at = now();
        prev.1.kill_all();
        // A fresh container starts on a machine with nothing of this one's
        // to write out: the killed run's files and Garage's are put on disk
        // here, not in the restore's own sync.
        assert!(Command::new("sync").status().unwrap().success());
        let holder = fs::read_to_string(prev.2.local.join("instance-id")).unwrap();
        let out = root.join(format!("out-{round}"));
        let (mut app, dirs) = boot(
            &g,
            root,
            &format!("crash-{round}"),
            writer,
            &out,
            load_spec,
            Some(holder.trim().to_owned()),
        );
        app.wait_ready(T);
        let log = app.log_text();
        row.restore_secs.push(restore_took(&log));
        print_restore_log(&format!("round {round}"), &log);
        let (max, _) =
            inspect(&dirs.state.join(DB)).expect("the restored database passes its check");
        row.restored_bytes = fs::metadata(dirs.state.join(DB)).unwrap().len();
        row.lost
            .push(lost_seconds(&commits(&prev.0), max, killed_at));
        wait_until(T, "the writer", || !commits(&out).is_empty());
        prev = (out, app, dirs);
    }
    assert_eq!(prev.1.stop(T), 0);

    // Stock rclone downloading one object of the restored database's size, same Garage.
    let size = if row.restored_bytes > 0 {
        row.restored_bytes
    } else {
        mb * 1024 * 1024
    };
    row.stock_secs = stock_download_secs(&g, root, size);
    row
}

fn litestream(
    root: &Path,
    writer: &Path,
    load_spec: &Load,
    mb: u64,
    warmup: Duration,
    load: Duration,
) -> Option<Row> {
    let bin = litestream_bin()?;
    let g = Garage::start(&root.join("g"));
    let state = root.join("state");
    let db = state.join(DB);
    prefill(root, &db, mb);
    let config = root.join("litestream.yml");
    litestream_config(&g, &db, &config);
    let out = root.join("out");
    fs::create_dir_all(&out).unwrap();
    let mut w: Child = Command::new("python3")
        .arg(writer)
        .env("OPENCLAW_STATE_DIR", &state)
        .env("OUT", &out)
        .envs(load_spec.env())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut ls = litestream_cmd(&bin, "replicate", &config)
        .spawn()
        .expect("start litestream");
    pause_until(Instant::now() + warmup);
    let pid = ls.id() as i32;
    let (b0, c0, t0) = (g.bytes_written(), proc_cpu_secs(pid), Instant::now());
    let mut row = Row {
        name: "Litestream 0.5 (sync-interval 1s)".into(),
        mb,
        ..Row::default()
    };
    let restore = |dst: &PathBuf| litestream_restore(&bin, &config, &db, dst);
    // A sample every 20 s: each restores the whole database.
    while t0.elapsed() < load {
        let next = Instant::now() + Duration::from_secs(20);
        let at = now();
        let dst = root.join("sample.sqlite");
        let _ = fs::remove_file(&dst);
        let t = Instant::now();
        let max = if restore(&dst) {
            inspect(&dst).map_or(0, |m| m.0)
        } else {
            0
        };
        row.restore_secs.push(t.elapsed().as_secs_f64());
        row.lost.push(lost_seconds(&commits(&out), max, at));
        pause_until(next.min(t0 + load));
    }
    let wall = t0.elapsed().as_secs_f64();
    row.bytes_per_min = (g.bytes_written() - b0) as f64 / wall * 60.0;
    row.cpu = (proc_cpu_secs(pid) - c0) / wall;
    let _ = ls.kill();
    let _ = ls.wait();
    let _ = w.kill();
    let _ = w.wait();
    Some(row)
}

fn main() {
    let warmup = secs("BENCH_WARMUP_SECS", 30);
    let load = secs("BENCH_LOAD_SECS", 120);
    let rounds = secs("BENCH_CRASH_ROUNDS", 5).as_secs() as usize;
    let sizes: Vec<u64> = std::env::var("BENCH_DB_MB")
        .unwrap_or_else(|_| "20,200".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let load_spec = Load::from_env();
    let with_litestream = std::env::var("BENCH_LITESTREAM").as_deref() != Ok("0");
    let report = std::env::var("BENCH_REPORT").unwrap_or_else(|_| "sqlite-big".into());
    let tmp = tempfile::tempdir().unwrap();
    let writer = tmp.path().join("writer.py");
    fs::write(&writer, WRITER).unwrap();
    let mut rows = Vec::new();
    for &mb in &sizes {
        let dir = |n: &str| {
            let d = tmp.path().join(format!("{n}-{mb}"));
            fs::create_dir_all(&d).unwrap();
            d
        };
        eprintln!("bench: cvm-init, {mb} MB…");
        rows.push(cvm_init(
            &dir("cvm"),
            &writer,
            &load_spec,
            mb,
            warmup,
            load,
            rounds,
        ));
        if with_litestream {
            eprintln!("bench: Litestream, {mb} MB…");
            rows.extend(litestream(
                &dir("litestream"),
                &writer,
                &load_spec,
                mb,
                warmup,
                load,
            ));
        }
    }

    let mut md = String::new();
    let _ = writeln!(md, "# SQLite on a big database: cost of a small change\n");
    let _ = writeln!(
        md,
        "Machine: {} cores. Load: a WAL database pre-filled to the size shown, then a row of {} random bytes \
         committed every {} s by a Python writer. Bytes are what Garage stored (`block_bytes_written`, compression \
         off) over a {}s window after a {}s warm-up; CPU is cvm-init plus its rclone (Litestream: its process) \
         over the same window. Data lost: cvm-init by {rounds} crash rounds (SIGKILL of everything, a fresh \
         container restores); Litestream by `litestream restore` every 20 s during its window. Restore: the fresh \
         container's restore as its log times it (cvm-init; the lease is taken over explicitly, \
         `CVM_LEASE_TAKEOVER`, and the host's writes are put on disk before it starts, as a new machine has none \
         waiting) or `litestream restore`, beside stock rclone downloading one \
         object of the restored database's size (shown) from the same Garage. `./scripts/bench sqlite-big` wrote \
         this file.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load_spec.row_bytes,
        load_spec.every,
        load.as_secs(),
        warmup.as_secs(),
    );
    let _ = writeln!(
        md,
        "| | database | stored per minute | CPU (of one core) | data lost median / worst | restore median | stock rclone download |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for r in &rows {
        let (_, lm, lw) = stats(&r.lost);
        let (_, rm, _) = stats(&r.restore_secs);
        let stock = if r.stock_secs > 0.0 {
            format!(
                "{:.2} s ({:.0} MB)",
                r.stock_secs,
                r.restored_bytes as f64 / 1e6
            )
        } else {
            "—".into()
        };
        let _ = writeln!(
            md,
            "| {} | {} MB | {} | {:.1} % | {lm:.2} s / {lw:.2} s ({} samples) | {rm:.2} s | {stock} |",
            r.name,
            r.mb,
            mib(r.bytes_per_min),
            r.cpu * 100.0,
            r.lost.len()
        );
    }
    let _ = writeln!(md, "\nRatios (measured in this run):\n");
    for &mb in &sizes {
        let ours = rows.iter().find(|r| r.mb == mb && r.name == "cvm-init");
        let lite = rows.iter().find(|r| r.mb == mb && r.name != "cvm-init");
        if let Some(o) = ours {
            let bytes = lite.map_or(String::new(), |l| {
                format!(
                    "cvm-init / Litestream bytes {:.2}×; ",
                    o.bytes_per_min / l.bytes_per_min.max(1.0)
                )
            });
            let _ = writeln!(
                md,
                "- {mb} MB: {bytes}cvm-init restore / stock download {:.2}×",
                stats(&o.restore_secs).1 / o.stock_secs.max(0.01)
            );
        }
    }
    if let (Some(small), Some(big)) = (
        rows.iter()
            .find(|r| r.name == "cvm-init" && Some(&r.mb) == sizes.first()),
        rows.iter()
            .find(|r| r.name == "cvm-init" && Some(&r.mb) == sizes.last()),
    ) {
        let _ = writeln!(
            md,
            "- cvm-init {} MB / {} MB bytes: {:.2}× (the cost follows the change, not the size)",
            big.mb,
            small.mb,
            big.bytes_per_min / small.bytes_per_min.max(1.0)
        );
    }
    write_report(&report, &md);
}
