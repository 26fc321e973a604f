//! What both benchmarks share: knobs from the environment, summary
//! statistics, and writing the result table where the README says.

#![allow(dead_code)] // each benchmark uses a different part

use std::fs;
use std::path::Path;
use std::time::Duration;

/// A duration in whole seconds from `var`, else `default`.
pub fn secs(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// (min, median, max); NaN for no samples.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    match (v.first(), v.last()) {
        (Some(&min), Some(&max)) => (min, v[v.len() / 2], max),
        _ => (f64::NAN, f64::NAN, f64::NAN),
    }
}

/// Prints the Markdown report and writes it to `bench/<name>.md`.
pub fn write_report(name: &str, md: &str) {
    print!("{md}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join(format!("{name}.md"));
    fs::write(&path, md).unwrap();
    eprintln!("bench: wrote {}", path.display());
}

/// CPU seconds (user + system) `pid` has used.
pub fn proc_cpu_secs(pid: i32) -> f64 {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = s
        .rsplit(") ")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = rest
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + rest
            .get(12)
            .and_then(|u| u.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}

/// Resident memory of `pid`, MiB.
pub fn proc_rss_mib(pid: i32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The rclone process whose command line names `dir` (its config or mountpoint).
pub fn rclone_under(dir: &Path) -> Option<i32> {
    let needle = dir.display().to_string();
    fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| {
            fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e.to_string_lossy().contains("rclone"))
                && fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .unwrap_or_default()
                    .contains(&needle)
        })
}

/// Litestream on `PATH`, if installed (`scripts/bench` installs it).
pub fn litestream_bin() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("litestream"))
            .find(|p| p.is_file())
    })
}

/// Writes a Litestream config at `path` replicating `db` to `g`'s bucket
/// with a 1 s sync interval.
pub fn litestream_config(g: &crate::common::Garage, db: &Path, path: &Path) {
    fs::write(
        path,
        format!(
            "dbs:\n  - path: {}\n    replica:\n      type: s3\n      bucket: {}\n      path: litestream\n      \
             endpoint: {}\n      region: {}\n      access-key-id: {}\n      secret-access-key: {}\n      \
             force-path-style: true\n      sync-interval: 1s\n",
            db.display(),
            g.bucket,
            g.endpoint,
            crate::common::REGION,
            g.key_id,
            g.secret
        ),
    )
    .unwrap();
}

/// `litestream <args> -config <config> …`, quiet, without `AWS_CA_BUNDLE`:
/// Litestream's S3 client fails with it set (docs/facts.md §7).
pub fn litestream_cmd(bin: &Path, cmd: &str, config: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(bin);
    c.args([cmd, "-config"])
        .arg(config)
        .env_remove("AWS_CA_BUNDLE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// Restores `db` with Litestream into `dst`.
pub fn litestream_restore(bin: &Path, config: &Path, db: &Path, dst: &Path) -> bool {
    litestream_cmd(bin, "restore", config)
        .arg("-o")
        .arg(dst)
        .arg(db)
        .status()
        .is_ok_and(|s| s.success())
}

/// `CVM_LOG` for a cvm-init whose restore a bench times: its phases too
/// with `BENCH_LOG=1`.
pub fn restore_log_level() -> String {
    match std::env::var_os("BENCH_LOG") {
        Some(_) => "info,cvm_init=debug".into(),
        None => "info".into(),
    }
}

/// With `BENCH_LOG=1`, prints `log` up to its restore's last line, for a
/// run by hand.
pub fn print_restore_log(what: &str, log: &str) {
    if std::env::var_os("BENCH_LOG").is_some() {
        // To the end of that line: a cut 200 bytes on could fall inside a
        // `µs`, and slicing there panics.
        let end = log.find("boot: state restored").map_or(log.len(), |i| {
            log[i..].find('\n').map_or(log.len(), |n| i + n)
        });
        eprintln!("bench: {what} restore log:\n{}", &log[..end]);
    }
}

/// The restore's own time from cvm-init's log (`boot: state restored …
/// took=…`): the lease and rclone's start are not the restore.
pub fn restore_took(log: &str) -> f64 {
    log_took(log, "boot: state restored").expect("the log says how long the restore took")
}

/// Seconds in the `took=` of the first line of `log` that contains `what`.
pub fn log_took(log: &str, what: &str) -> Option<f64> {
    let took = log
        .lines()
        .find(|l| l.contains(what))?
        .split("took=")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let (num, unit) = took.split_at(took.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let n: f64 = num.parse().ok()?;
    match unit {
        "s" => Some(n),
        "ms" => Some(n / 1e3),
        "µs" => Some(n / 1e6),
        "ns" => Some(n / 1e9),
        other => panic!("unit {other} in {took}"),
    }
}

/// Seconds stock rclone takes to download one object of `size` bytes
/// through the crypt remote from `g` (uploaded first, under `root`): a
/// restore's anchor, on the same Garage.
pub fn stock_download_secs(g: &crate::common::Garage, root: &Path, size: u64) -> f64 {
    let conf = crate::common::stock_config(g, root);
    let file = root.join("stock.bin");
    fs::write(&file, vec![7u8; size as usize]).unwrap();
    let rclone = |args: &[&str]| {
        let ok = std::process::Command::new(crate::common::rclone_bin())
            .arg("--config")
            .arg(&conf)
            .args(args)
            .status()
            .unwrap();
        assert!(ok.success(), "rclone {args:?}");
    };
    rclone(&["copyto", file.to_str().unwrap(), "crypt:stock/bin"]);
    let t = std::time::Instant::now();
    rclone(&[
        "copyto",
        "crypt:stock/bin",
        root.join("stock.back").to_str().unwrap(),
    ]);
    t.elapsed().as_secs_f64()
}
