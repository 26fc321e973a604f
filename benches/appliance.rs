//! Appliance benchmark: boot to ready, stop to durable, and idle cost, for
//! both layouts, against the floor (the same rclone work alone) and the
//! spec's shell procedure, in one run against real Garage, rclone and FUSE.
//! Results: bench/appliance.md. Run with `./scripts/bench`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{rclone_bin, script, unmount_below, wait_until, Appliance, Dirs, Garage, PASSWORD};
use rusqlite::Connection;
use support::{proc_cpu_secs, proc_rss_mib, rclone_under, secs, stats, write_report};

const T: Duration = Duration::from_secs(120);

fn fmt3(v: &[f64], unit: &str) -> String {
    let (a, m, b) = stats(v);
    format!("{a:.2} / {m:.2} / {b:.2} {unit}")
}

fn env_for(
    g: &Garage,
    dirs: &Dirs,
    prefix: &str,
    layout: &str,
    gateway: &str,
) -> Vec<(String, String)> {
    let mut e = g.s3_env();
    e.extend(dirs.env());
    for (k, v) in [
        ("RCLONE_CRYPT_PASSWORD", PASSWORD),
        ("S3_PREFIX", prefix),
        ("CVM_STORAGE", layout),
        ("CVM_GATEWAY_CMD", gateway),
        // The default, not the tests' short lease: what a deployment pays.
        ("CVM_LEASE_TTL", "30s"),
        ("CVM_LOG", "info"),
    ] {
        e.push((k.into(), v.into()));
    }
    e
}

/// 200 files (20 MB) and three databases (50 MB) as a state dir, uploaded by
/// one cvm-init run in the replicate layout, so both layouts boot from it.
fn seed(g: &Garage, root: &Path, prefix: &str, idle: &str) {
    let dirs = Dirs::new(root, "seed");
    let mut buf = vec![0u8; 100 * 1024];
    let mut rng = fs::File::open("/dev/urandom").unwrap();
    for i in 0..200 {
        let p = dirs.state.join(format!("workspace/d{}/f{i}.bin", i % 10));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::io::Read::read_exact(&mut rng, &mut buf).unwrap();
        fs::write(p, &buf).unwrap();
    }
    let mut blob = vec![0u8; 1024 * 1024];
    for db in [
        "state/openclaw.sqlite",
        "memory/main.sqlite",
        "agents/main/agent/openclaw-agent.sqlite",
    ] {
        let p = dirs.state.join(db);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let c = Connection::open(&p).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE blobs(b BLOB)")
            .unwrap();
        for _ in 0..16 {
            std::io::Read::read_exact(&mut rng, &mut blob).unwrap();
            c.execute("INSERT INTO blobs VALUES (?1)", [&blob]).unwrap();
        }
    }
    let mut app = Appliance::start(&dirs, &env_for(g, &dirs, prefix, "replicate", idle));
    app.wait_ready(T);
    wait_until(T, "the seed on S3", || {
        let log = app.log_text();
        log.matches("sqlite: snapshot uploaded").count() >= 3 && log.contains("uploaded=200")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

fn boot_cvm(g: &Garage, root: &Path, name: &str, prefix: &str, layout: &str, idle: &str) -> f64 {
    let dirs = Dirs::new(root, name);
    let env = env_for(g, &dirs, prefix, layout, idle);
    let t = Instant::now();
    let mut app = Appliance::start(&dirs, &env);
    app.wait_ready(T);
    let took = t.elapsed().as_secs_f64();
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    took
}

fn run_rclone(conf: &Path, args: &[&str]) {
    let ok = Command::new(rclone_bin())
        .arg("--config")
        .arg(conf)
        .args(args)
        .status()
        .unwrap()
        .success();
    assert!(ok, "rclone {args:?}");
}

/// A crypt-remote config like cvm-init's for `prefix` (remotes `s3` and `s3-crypt`).
fn spec_config(g: &Garage, dir: &Path, prefix: &str) -> PathBuf {
    let stock = fs::read_to_string(g.rclone_config(dir, prefix, PASSWORD, None)).unwrap();
    let path = dir.join(format!("spec-{prefix}.conf"));
    fs::write(&path, stock.replace("[crypt]", "[s3-crypt]")).unwrap();
    path
}

fn floor_replicate(conf: &Path, root: &Path, name: &str) -> f64 {
    let dst = root.join(name);
    let t = Instant::now();
    run_rclone(
        conf,
        &[
            "copy",
            "s3-crypt:",
            dst.to_str().unwrap(),
            "--transfers",
            "8",
            "--checkers",
            "16",
            "--metadata",
            "--links",
        ],
    );
    t.elapsed().as_secs_f64()
}

fn mounted(mp: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .contains(&format!(" {} ", mp.display()))
}

fn floor_mount(conf: &Path, root: &Path, name: &str) -> f64 {
    let (local, mp) = (root.join(name).join("sqlite"), root.join(name).join("mnt"));
    fs::create_dir_all(&mp).unwrap();
    let t = Instant::now();
    run_rclone(conf, &["copy", "s3-crypt:sqlite", local.to_str().unwrap()]);
    let mut child = Command::new(rclone_bin())
        .arg("--config")
        .arg(conf)
        .args([
            "mount",
            "s3-crypt:",
            mp.to_str().unwrap(),
            "--vfs-cache-mode",
            "writes",
            "--vfs-write-back",
            "5s",
        ])
        .args([
            "--dir-cache-time",
            "30s",
            "--vfs-cache-max-size",
            "500M",
            "--links",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(T, "the floor mount", || mounted(&mp));
    let took = t.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    unmount_below(&mp);
    took
}

/// The spec's entrypoint, as documented: render the config, restore the
/// SQLite copies, `rclone mount --daemon`, poll the mount every 0.5 s, start
/// the gateway, and back up SQLite files every 60 s.
const SPEC: &str = r#"set -e
mkdir -p "$RUN" "$LOCAL/sqlite" "$STATE"
cp "$SPEC_CONF" "$RUN/rclone.conf"
rclone --config "$RUN/rclone.conf" copy s3-crypt:sqlite "$LOCAL/sqlite" || true
rclone --config "$RUN/rclone.conf" mount s3-crypt: "$STATE" --vfs-cache-mode writes --vfs-write-back 5s \
  --dir-cache-time 30s --vfs-cache-max-size 500M --links --daemon
until grep -qs " $STATE " /proc/self/mountinfo; do sleep 0.5; done
( while sleep 60; do rclone --config "$RUN/rclone.conf" copy "$LOCAL/sqlite" s3-crypt:sqlite || true; done ) &
exec $GATEWAY"#;

fn spec_cmd(root: &Path, name: &str, conf: &Path, gateway: &str, pid1: bool) -> Command {
    let spec = script(root, "spec-entrypoint.sh", SPEC);
    let base = root.join(name);
    let mut cmd = if pid1 {
        let mut c = Command::new("unshare");
        c.args([
            "--pid",
            "--fork",
            "--mount",
            "--propagation",
            "private",
            "sh",
        ])
        .arg(&spec);
        c
    } else {
        let mut c = Command::new("sh");
        c.arg(&spec);
        c
    };
    cmd.env("RUN", base.join("run"))
        .env("LOCAL", base.join("local"))
        .env("STATE", base.join("state"))
        .env("SPEC_CONF", conf)
        .env("GATEWAY", gateway)
        .env(
            "PATH",
            format!(
                "{}:{}",
                rclone_bin().parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn spec_boot(root: &Path, name: &str, conf: &Path, marker_gateway: &str, marker: &Path) -> f64 {
    let t = Instant::now();
    let mut child = spec_cmd(root, name, conf, marker_gateway, false)
        .spawn()
        .unwrap();
    wait_until(T, "the spec's gateway", || marker.exists());
    let took = t.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    let _ = Command::new("pkill")
        .args(["-f", &format!("rclone.*{}", root.join(name).display())])
        .status();
    unmount_below(&root.join(name));
    took
}

/// What reached S3 after a stop: (files under out/, rows in the database).
/// cvm-init's database is what `cvm-init restore` makes of S3 (base plus
/// segments); the spec's, its snapshot as stock rclone reads it.
fn durable(g: &Garage, root: &Path, prefix: &str, by_cvm: bool) -> (usize, i64) {
    let conf = g.rclone_config(root, prefix, PASSWORD, None);
    let files = Command::new(rclone_bin())
        .arg("--config")
        .arg(&conf)
        .args(["lsf", "crypt:out"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0);
    let db = root.join(format!("{prefix}.sqlite"));
    let fetched = if by_cvm {
        let to = root.join(format!("{prefix}-restored"));
        let elsewhere = Dirs::new(root, &format!("{prefix}-elsewhere"));
        let ok = Command::new(common::BIN)
            .args(["restore", "--to"])
            .arg(&to)
            .envs(env_for(g, &elsewhere, prefix, "replicate", "true"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok && fs::rename(to.join("state/openclaw.sqlite"), &db).is_ok()
    } else {
        Command::new(rclone_bin())
            .arg("--config")
            .arg(&conf)
            .args(["copyto", "crypt:sqlite/state/openclaw.sqlite"])
            .arg(&db)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let rows = if fetched {
        Connection::open(&db)
            .and_then(|c| c.query_row("SELECT count(*) FROM tx", [], |r| r.get(0)))
            .unwrap_or(0)
    } else {
        0
    };
    (files, rows)
}

/// A gateway that, once, writes 10 files of 1 MB and commits 100
/// transactions over about 2 s, then idles; like OpenClaw it exits at once on
/// SIGTERM. `DB` is where the database lives.
const STOP_GATEWAY: &str = r#"
import os, signal, sqlite3, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
state, db = os.environ["OPENCLAW_STATE_DIR"], os.environ["DB"]
os.makedirs(os.path.join(state, "out"), exist_ok=True)
os.makedirs(os.path.dirname(db), exist_ok=True)
c = sqlite3.connect(db, isolation_level=None)
c.execute("pragma journal_mode=wal")
c.execute("create table if not exists tx(i integer primary key, pad blob)")
for i in range(100):
    c.execute("insert into tx(pad) values (?)", (os.urandom(1000),))
    if i % 10 == 0:
        with open(os.path.join(state, "out", f"f{i // 10}"), "wb") as f:
            f.write(os.urandom(1 << 20))
    time.sleep(0.02)
open(os.environ["DONE"], "w").close()
while True:
    time.sleep(3600)
"#;

struct StopResult {
    exit_secs: f64,
    files: usize,
    rows: i64,
}

/// SIGTERM, 10 s, then SIGKILL to everything left: what `docker stop` does.
fn stop_like_docker(pid1: i32, child: &mut Child) -> f64 {
    let t = Instant::now();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid1),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return t.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    t.elapsed().as_secs_f64()
}

fn pid1_of(child: &Child) -> i32 {
    let mut pid = 0;
    wait_until(T, "PID 1 of the namespace", || {
        pid = common::descendants(child.id() as i32)
            .into_iter()
            .min()
            .unwrap_or(0);
        pid != 0
    });
    pid
}

fn stop_cvm(g: &Garage, root: &Path, name: &str, layout: &str, gateway_py: &Path) -> StopResult {
    let prefix = format!("stop-{name}");
    let dirs = Dirs::new(root, name);
    let done = root.join(format!("{name}.done"));
    let db = match layout {
        "mount" => dirs.local.join("sqlite/state/openclaw.sqlite"),
        _ => dirs.state.join("state/openclaw.sqlite"),
    };
    let mut env = env_for(
        g,
        &dirs,
        &prefix,
        layout,
        &format!("python3 {}", gateway_py.display()),
    );
    env.push(("DB".into(), db.display().to_string()));
    env.push(("DONE".into(), done.display().to_string()));
    let wrapper = [
        "unshare",
        "--pid",
        "--fork",
        "--mount",
        "--propagation",
        "private",
    ];
    let mut app = Appliance::start_wrapped(&dirs, &env, &wrapper);
    app.wait_ready(T);
    wait_until(T, "the gateway's writes", || done.exists());
    let pid = app.init_pid();
    let t = Instant::now();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && app.try_status().is_none() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let exit_secs = t.elapsed().as_secs_f64();
    app.kill_all();
    drop(app);
    let (files, rows) = durable(g, root, &prefix, true);
    StopResult {
        exit_secs,
        files,
        rows,
    }
}

fn stop_spec(g: &Garage, root: &Path, name: &str, gateway_py: &Path) -> StopResult {
    let prefix = format!("stop-{name}");
    let conf = spec_config(g, root, &prefix);
    let done = root.join(format!("{name}.done"));
    let base = root.join(name);
    let mut cmd = spec_cmd(
        root,
        name,
        &conf,
        &format!("python3 {}", gateway_py.display()),
        true,
    );
    // The spec keeps memory.db on local disk behind a symlink; the writer uses the local path.
    cmd.env("OPENCLAW_STATE_DIR", base.join("state"))
        .env("DB", base.join("local/sqlite/state/openclaw.sqlite"))
        .env("DONE", &done);
    let mut child = cmd.spawn().unwrap();
    wait_until(T, "the spec's gateway writes", || done.exists());
    let pid = pid1_of(&child);
    let exit_secs = stop_like_docker(pid, &mut child);
    unmount_below(&base);
    let (files, rows) = durable(g, root, &prefix, false);
    StopResult {
        exit_secs,
        files,
        rows,
    }
}

struct Idle {
    name: String,
    init_pid: i32,
    /// Where its rclone's command line points; looked up at the end, since
    /// `rclone mount --daemon` replaces its first process.
    root: PathBuf,
    g: Garage,
}

fn main() {
    let idle_window = secs("BENCH_IDLE_SECS", 600);
    let runs = secs("BENCH_RUNS", 5).as_secs() as usize;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let idle_gw = script(root, "idle.sh", "exec sleep 100000")
        .display()
        .to_string();
    let g = Garage::start(root);
    eprintln!("bench: seeding 200 files (20 MB) and 3 databases (50 MB)…");
    seed(&g, root, "boot", &idle_gw);
    let conf = spec_config(&g, root, "boot");

    eprintln!("bench: boot to ready, {runs} runs each…");
    let (mut ours_r, mut floor_r, mut ours_m, mut floor_m, mut spec) =
        (vec![], vec![], vec![], vec![], vec![]);
    // Replicate first: the mount layout leaves links in the bucket (where its
    // databases were), which a plain `rclone copy` floor would then retry over.
    for i in 0..runs {
        ours_r.push(boot_cvm(
            &g,
            root,
            &format!("boot-r{i}"),
            "boot",
            "replicate",
            &idle_gw,
        ));
        floor_r.push(floor_replicate(&conf, root, &format!("floor-r{i}")));
    }
    for i in 0..runs {
        ours_m.push(boot_cvm(
            &g,
            root,
            &format!("boot-m{i}"),
            "boot",
            "mount",
            &idle_gw,
        ));
        floor_m.push(floor_mount(&conf, root, &format!("floor-m{i}")));
        let marker = root.join(format!("spec-{i}.up"));
        let gw = format!("touch {}", marker.display());
        spec.push(spec_boot(root, &format!("spec-b{i}"), &conf, &gw, &marker));
    }

    eprintln!("bench: stop to durable…");
    let gateway_py = root.join("stop-gateway.py");
    fs::write(&gateway_py, STOP_GATEWAY).unwrap();
    let mut stops: Vec<(String, Vec<StopResult>)> = vec![
        ("cvm-init replicate".into(), vec![]),
        ("cvm-init mount".into(), vec![]),
        ("spec procedure".into(), vec![]),
    ];
    for i in 0..3 {
        stops[0].1.push(stop_cvm(
            &g,
            root,
            &format!("stop-r{i}"),
            "replicate",
            &gateway_py,
        ));
        stops[1].1.push(stop_cvm(
            &g,
            root,
            &format!("stop-m{i}"),
            "mount",
            &gateway_py,
        ));
        stops[2]
            .1
            .push(stop_spec(&g, root, &format!("stop-s{i}"), &gateway_py));
    }

    eprintln!(
        "bench: idle cost over {}s, the three side by side on their own Garage…",
        idle_window.as_secs()
    );
    let mut idles = Vec::new();
    let mut keep = Vec::new();
    for (name, layout) in [
        ("cvm-init replicate", "replicate"),
        ("cvm-init mount", "mount"),
    ] {
        let iroot = root.join(format!("idle-{layout}"));
        fs::create_dir_all(&iroot).unwrap();
        let ig = Garage::start(&iroot);
        let dirs = Dirs::new(&iroot, "box");
        let writer = script(&iroot, "w.sh", "mkdir -p \"$OPENCLAW_STATE_DIR/state\"; echo x > \"$OPENCLAW_STATE_DIR/notes.md\"; exec sleep 100000");
        let mut app = Appliance::start(
            &dirs,
            &env_for(&ig, &dirs, "idle", layout, writer.to_str().unwrap()),
        );
        app.wait_ready(T);
        idles.push(Idle {
            name: name.into(),
            init_pid: app.pid(),
            root: iroot.clone(),
            g: ig,
        });
        keep.push(app);
    }
    let sroot = root.join("idle-spec");
    fs::create_dir_all(&sroot).unwrap();
    let sg = Garage::start(&sroot);
    let sconf = spec_config(&sg, &sroot, "idle");
    let mut spec_child = spec_cmd(&sroot, "box", &sconf, "sleep 100000", false)
        .spawn()
        .unwrap();
    wait_until(T, "the spec's mount", || mounted(&sroot.join("box/state")));
    let spid = spec_child.id() as i32;
    idles.push(Idle {
        name: "spec procedure".into(),
        init_pid: spid,
        root: sroot.clone(),
        g: sg,
    });
    // Let boot-time work settle, then measure.
    let settle = Instant::now() + Duration::from_secs(15);
    wait_until(T, "settling", || Instant::now() >= settle);
    let start: Vec<(f64, u64)> = idles
        .iter()
        .map(|i| (proc_cpu_secs(i.init_pid), i.g.s3_requests().values().sum()))
        .collect();
    let t0 = Instant::now();
    let end = Instant::now() + idle_window;
    wait_until(idle_window + T, "the idle window", || Instant::now() >= end);
    let elapsed = t0.elapsed().as_secs_f64();
    let mut idle_rows = Vec::new();
    for (i, (cpu0, req0)) in idles.iter().zip(start) {
        let cpu = proc_cpu_secs(i.init_pid) - cpu0;
        let reqs: u64 = i.g.s3_requests().values().sum::<u64>() - req0;
        idle_rows.push((
            i.name.clone(),
            proc_rss_mib(i.init_pid),
            cpu / elapsed * 100.0,
            rclone_under(&i.root).map_or(0.0, proc_rss_mib),
            reqs as f64 / elapsed * 600.0,
        ));
    }
    for mut app in keep {
        let _ = app.stop(T);
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(spid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = spec_child.wait();
    let _ = Command::new("pkill")
        .args(["-f", &format!("rclone.*{}", sroot.display())])
        .status();
    unmount_below(&sroot);

    let mut md = String::new();
    let _ = writeln!(md, "# Appliance benchmark\n");
    let _ = writeln!(
        md,
        "Machine: {} cores, Garage on loopback. `./scripts/bench` wrote this file. Figures are min / median / max.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let _ = writeln!(
        md,
        "## Boot to ready ({runs} runs; 200 files / 20 MB and 3 databases / 50 MB in the bucket)\n"
    );
    let _ = writeln!(
        md,
        "| | cvm-init | floor | cvm-init / floor | spec procedure | cvm-init / spec |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let med = |v: &[f64]| stats(v).1;
    for (name, ours, floor) in [
        ("replicate", &ours_r, &floor_r),
        ("mount", &ours_m, &floor_m),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {:.2}× | {} | {:.2}× |",
            fmt3(ours, "s"),
            fmt3(floor, "s"),
            med(ours) / med(floor),
            fmt3(&spec, "s"),
            med(ours) / med(&spec)
        );
    }
    let _ = writeln!(md, "\nFloor, replicate: one `rclone copy` of the tree and the databases. Floor, mount: the restore copy of the databases, then `rclone mount` until mountinfo shows it. Spec: its documented entrypoint (config, restore copy, `mount --daemon`, poll every 0.5 s, start the gateway).\n");
    let _ = writeln!(md, "## Stop to durable (3 runs; 10 files of 1 MB and 100 SQLite commits in the 2 s before SIGTERM; 10 s, then SIGKILL)\n");
    let _ = writeln!(
        md,
        "| | exit after SIGTERM | files on S3 (of 10) | rows on S3 (of 100) |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for (name, runs) in &stops {
        let exits: Vec<f64> = runs.iter().map(|r| r.exit_secs).collect();
        let files: Vec<String> = runs.iter().map(|r| r.files.to_string()).collect();
        let rows: Vec<String> = runs.iter().map(|r| r.rows.to_string()).collect();
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} |",
            fmt3(&exits, "s"),
            files.join(", "),
            rows.join(", ")
        );
    }
    let _ = writeln!(md, "\n## Idle cost ({:.0} s, gateway idle)\n", elapsed);
    let _ = writeln!(
        md,
        "| | init RSS | init CPU (% of a core) | rclone RSS | S3 requests / 10 min |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for (name, rss, cpu, rrss, reqs) in &idle_rows {
        let _ = writeln!(
            md,
            "| {name} | {rss:.1} MiB | {cpu:.3} % | {rrss:.1} MiB | {reqs:.0} |"
        );
    }
    let _ = writeln!(
        md,
        "\nThe spec's \"init\" is its entrypoint shell (its 60 s backup loop is a subshell)."
    );
    write_report("appliance", &md);
}
