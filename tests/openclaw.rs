//! The real OpenClaw gateway (npm `openclaw@2026.9.6` on Node 24) under
//! cvm-init against real Garage, doing real agent turns against a model
//! server of the harness (`common::model`): its whole state comes back in a
//! new container after a graceful stop and after a crash of everything.
//! Installs the gateway once into a cache (`scripts/openclaw`); skips, saying
//! so, only when the npm registry cannot be reached.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::model::{ModelServer, MARKER, MODEL};
use common::{free_port, hex, stock_config, wait_until, Appliance, Dirs, Garage, PASSWORD};
use serde_json::json;

const T: Duration = Duration::from_secs(180);
const TOKEN: &str = "cvm-test-gateway-token";
const SESSION: &str = "cvm-e2e";
/// The crash bound docs/durability.md promises for a change: lost at most this.
const CRASH_BOUND: Duration = Duration::from_secs(3);

/// The directory whose `node_modules/.bin` has `node` and `openclaw`, or
/// `None` when the registry is unreachable.
fn openclaw() -> Option<PathBuf> {
    // Both tests need it; one install, not two npm runs into the same directory.
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(install_openclaw).clone()
}

fn install_openclaw() -> Option<PathBuf> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/openclaw");
    let out = Command::new(script).output().expect("run scripts/openclaw");
    match out.status.code() {
        Some(0) => Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())),
        Some(3) => None,
        _ => panic!(
            "installing OpenClaw failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// One HTTP/1.0 exchange (so the answer is never chunked); `None` when the
/// gateway is not there.
fn http(port: u16, request: &str, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer)
}

fn healthy(port: u16) -> bool {
    http(
        port,
        "GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(2),
    )
    .is_some_and(|a| a.starts_with("HTTP/1.1 200") && a.contains("\"ok\":true"))
}

/// One agent turn through the gateway's own `POST /v1/chat/completions`;
/// panics unless the model's answer (which echoes `marker`) comes back.
fn turn(port: u16, marker: &str, stream: bool) {
    let body = json!({
        "model": "openclaw", "stream": stream,
        "messages": [{ "role": "user", "content": format!("Please remember {marker}.") }],
    })
    .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\
         x-openclaw-session-key: {SESSION}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = http(port, &request, T).unwrap_or_default();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let content: String = if stream {
        // Server-sent events: the answer is the deltas' content, in order.
        body.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    } else {
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    };
    assert!(
        answer.starts_with("HTTP/1.1 200") && content.contains(&format!("ack {marker}")),
        "turn {marker} (stream: {stream}) answered:\n{answer}"
    );
}

/// The gateway's config: token auth, its chat endpoint on, our model server.
fn gateway_config(model: &ModelServer) -> String {
    json!({
        "gateway": {
            "mode": "local",
            "auth": { "mode": "token", "token": TOKEN },
            "http": { "endpoints": { "chatCompletions": { "enabled": true } } },
        },
        "agents": { "defaults": { "model": { "primary": format!("harness/{MODEL}") } } },
        "models": { "mode": "merge", "providers": { "harness": model.provider() } },
    })
    .to_string()
}

struct Gateway {
    tmp: tempfile::TempDir,
    g: Garage,
    path: String,
    model: ModelServer,
}

impl Gateway {
    fn boot(&self, name: &str, port: u16, extra: &[(&str, &str)]) -> (Appliance, Dirs) {
        let dirs = Dirs::new(self.tmp.path(), name);
        let home = self.tmp.path().join(format!("{name}-home"));
        fs::create_dir_all(&home).unwrap();
        let mut env = self.g.s3_env();
        env.extend(dirs.env());
        env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
        env.push(("PATH".into(), self.path.clone()));
        env.push(("HOME".into(), home.display().to_string()));
        env.push((
            "CVM_GATEWAY_CMD".into(),
            format!("openclaw gateway run --bind loopback --port {port}"),
        ));
        // The gateway's own shutdown (its SQLite maintenance worker) took
        // over 4.5 s, the default budget's half it gets, on a loaded 2-core
        // machine: a graceful stop of the real gateway is given room here.
        env.push(("CVM_STOP_TIMEOUT".into(), "20s".into()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        (Appliance::start(&dirs, &env), dirs)
    }

    /// Puts the gateway's config into the bucket, as a user setting up a
    /// deployment would, so the first container restores it.
    fn seed_config(&self) {
        let src = self.tmp.path().join("seed");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("openclaw.json"), gateway_config(&self.model)).unwrap();
        let conf = stock_config(&self.g, self.tmp.path());
        common::rclone(
            &conf,
            &[
                "copyto",
                &src.join("openclaw.json").display().to_string(),
                "crypt:openclaw.json",
            ],
        );
    }
}

fn setup() -> Option<Gateway> {
    let Some(dir) = openclaw() else {
        eprintln!("SKIPPED: the npm registry is unreachable, so OpenClaw cannot be installed");
        return None;
    };
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start(tmp.path());
    let path = format!(
        "{}:{}",
        dir.join("node_modules/.bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let gw = Gateway {
        tmp,
        g,
        path,
        model: ModelServer::start(),
    };
    gw.seed_config();
    Some(gw)
}

/// Every event of the agent's transcripts, as text.
fn transcript(state: &Path) -> String {
    let db = rusqlite::Connection::open_with_flags(
        state.join("agents/main/agent/openclaw-agent.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut q = db
        .prepare("SELECT coalesce(event_json, '') FROM transcript_events")
        .unwrap();
    let rows = q.query_map([], |r| r.get::<_, String>(0)).unwrap();
    rows.map(Result::unwrap).collect::<Vec<_>>().join("\n")
}

/// `PRAGMA integrity_check` of every database the gateway keeps (the lease
/// files beside them are not databases of state, see `CVM_EXCLUDE`).
fn check_databases(state: &Path) -> usize {
    let mut n = 0;
    for db in [
        "state/openclaw.sqlite",
        "state/openclaw-quarantine.sqlite",
        "agents/main/agent/openclaw-agent.sqlite",
    ] {
        let path = state.join(db);
        if !path.exists() {
            continue;
        }
        let conn = rusqlite::Connection::open(&path).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok", "{db} passes integrity_check");
        n += 1;
    }
    n
}

/// Kind, mode and content (link target) of every entry below `root` that
/// cvm-init replicates as a file: not the live databases (snapshots carry
/// them) and nothing `CVM_EXCLUDE` names.
fn tree(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in fs::read_dir(root.join(rel)).unwrap().flatten() {
            let child = rel.join(e.file_name());
            let name = child.to_string_lossy().into_owned();
            let skip = ["tmp", "cache"]
                .iter()
                .any(|t| name == *t || name.starts_with(&format!("{t}/")))
                || name.contains(".sqlite")
                || name.ends_with(".lock");
            if skip {
                continue;
            }
            let meta = e.path().symlink_metadata().unwrap();
            let content = if meta.is_dir() {
                walk(root, &child, out);
                Vec::new()
            } else if meta.file_type().is_symlink() {
                fs::read_link(e.path())
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                fs::read(e.path()).unwrap()
            };
            out.insert(name, (meta.mode(), content));
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn markers(prefix: &str, n: usize) -> Vec<String> {
    let tag = hex(4);
    (0..n)
        .map(|i| format!("{MARKER}{prefix}{i}-{tag}"))
        .collect()
}

/// Plaintext bytes and uploads per file in a cvm-init log (its debug lines
/// for files, its segment and base lines for databases), most bytes first:
/// where a turn's cost goes.
fn uploads_by_file(log: &str) -> Vec<(String, (u64, u64))> {
    let field = |l: &str, key: &str| -> Option<String> {
        let v = l.split(&format!(" {key}=")).nth(1)?;
        let v = v.strip_prefix('"').map_or_else(
            || v.split_whitespace().next().map(str::to_owned),
            |q| q.split('"').next().map(str::to_owned),
        )?;
        Some(v)
    };
    let mut by: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for l in log.lines() {
        let name = if l.contains("replicate: uploaded") {
            field(l, "file")
        } else if l.contains("sqlite: segment uploaded") {
            field(l, "db").map(|d| format!("{d} (segments)"))
        } else if l.contains("sqlite: snapshot uploaded") {
            let packed = field(l, "packed").as_deref() == Some("true");
            field(l, "db")
                .map(|d| format!("{d} ({})", if packed { "first, packed" } else { "whole" }))
        } else {
            None
        };
        // A base's `sent` is what went up (compressed or not); `bytes` its size.
        let sent = field(l, "sent").or_else(|| field(l, "bytes"));
        if let (Some(name), Some(bytes)) = (name, sent.and_then(|b| b.parse::<u64>().ok())) {
            let e = by.entry(name).or_default();
            e.0 += bytes;
            e.1 += 1;
        }
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by_key(|(_, (b, _))| std::cmp::Reverse(*b));
    v
}

#[test]
fn real_agent_turns_survive_a_graceful_stop_and_a_crash() {
    let Some(gw) = setup() else { return };
    let turns: usize = std::env::var("CVM_E2E_TURNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(6);

    // Container A: real turns, then a graceful stop.
    let port = free_port();
    let (mut app, a) = gw.boot("a", port, &[]);
    app.wait_ready(T);
    wait_until(T, "GET /health on container A", || healthy(port));
    let first = markers("a", turns);
    let bytes_before = gw.g.bytes_written();
    let log_before = app.log_text().len();
    let started = Instant::now();
    for (i, m) in first.iter().enumerate() {
        turn(port, m, i % 2 == 1);
    }
    let took = started.elapsed();
    assert_eq!(
        app.stop(T),
        0,
        "a graceful stop flushes everything:\n{}",
        app.log_text()
    );
    // Everything A did is on S3 by now, and B has not started: the moment
    // the point-in-time round below restores.
    let after_a = std::time::SystemTime::now();
    let bytes = gw.g.bytes_written() - bytes_before;
    eprintln!(
        "MEASURED: {turns} agent turns in {took:?}; S3 stored {bytes} bytes for them (Garage block_bytes_written), \
         {} KiB per turn",
        bytes / turns as u64 / 1024
    );
    let log = app.log_text();
    let by_file = uploads_by_file(log.get(log_before..).unwrap_or_default());
    eprintln!(
        "MEASURED: what went up for them, by file (plaintext bytes, uploads; {} files, {} bytes in all):",
        by_file.len(),
        by_file.iter().map(|(_, (b, _))| b).sum::<u64>()
    );
    for (name, (bytes, n)) in by_file.iter().take(15) {
        eprintln!("  {bytes:>9} {n:>4}  {name}");
    }
    assert!(
        log.contains("shutdown: gateway stopped exit=exit code 0"),
        "{log}"
    );
    let before = tree(&a.state);
    for link in ["plugin-skills/canvas", "plugin-skills/browser-automation"] {
        assert!(
            a.state
                .join(link)
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink(),
            "the gateway made {link} a symlink"
        );
    }
    assert!(
        a.state.join("workspace/.git/HEAD").exists(),
        "the workspace is a git repository"
    );

    // Container B: everything A wrote is back, and the session goes on.
    let port = free_port();
    let (mut app, b) = gw.boot("b", port, &[]);
    app.wait_ready(T);
    let after = tree(&b.state);
    for (name, (mode, content)) in &before {
        let got = after
            .get(name)
            .unwrap_or_else(|| panic!("{name} is restored"));
        assert_eq!(got.0, *mode, "{name}: mode (with its type) restored");
        if !name.starts_with("workspace/") && !name.ends_with(".json") {
            continue;
        }
        assert!(got.1 == *content, "{name}: content restored byte for byte");
    }
    for link in ["plugin-skills/canvas", "plugin-skills/browser-automation"] {
        assert_eq!(
            fs::read_link(b.state.join(link)).unwrap(),
            fs::read_link(a.state.join(link)).unwrap(),
            "{link} comes back as the same link"
        );
    }
    wait_until(T, "GET /health on container B", || healthy(port));
    let resumed = markers("b", 1).remove(0);
    turn(port, &resumed, false);
    let sent = gw.model.requests_for(&resumed).join("\n");
    for m in &first {
        assert!(
            sent.contains(m.as_str()),
            "the restored session's history carries {m}"
        );
    }
    assert_eq!(check_databases(&b.state), 3);

    // Still B: turns go on while everything is SIGKILLed.
    let done: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let busy = {
        let done = done.clone();
        let list = markers("c", 1000);
        std::thread::spawn(move || {
            for (i, m) in list.iter().enumerate() {
                if std::panic::catch_unwind(|| turn(port, m, i % 2 == 0)).is_err() {
                    return;
                }
                done.lock().unwrap().push((m.clone(), Instant::now()));
            }
        })
    };
    wait_until(T, "turns before the crash", || {
        done.lock().unwrap().len() >= turns
    });
    let t0 = done.lock().unwrap().last().unwrap().1;
    // A crash some way into a turn, while the gateway keeps writing.
    wait_until(T, "one more turn", || {
        done.lock().unwrap().last().unwrap().1 > t0
    });
    let killed_at = Instant::now();
    app.kill_all();
    let _ = busy.join();
    let finished = done.lock().unwrap().clone();

    // Container C: what finished long enough before the crash is back.
    let port = free_port();
    let (mut app, c) = gw.boot("c", port, &[]);
    app.wait_ready(T);
    wait_until(T, "GET /health on container C", || healthy(port));
    let last = markers("d", 1).remove(0);
    turn(port, &last, true);
    let sent = gw.model.requests_for(&last).join("\n");
    let mut newest_kept = None;
    for (m, at) in &finished {
        let before_kill = killed_at - *at;
        if sent.contains(m.as_str()) {
            newest_kept = Some(newest_kept.map_or(before_kill, |d: Duration| d.min(before_kill)));
        } else {
            assert!(
                before_kill < CRASH_BOUND,
                "turn {m} finished {before_kill:?} before the crash and is lost"
            );
        }
    }
    let lost = finished
        .iter()
        .filter(|(m, _)| !sent.contains(m.as_str()))
        .count();
    eprintln!(
        "MEASURED: crash after {} finished turns: {lost} lost (each finished < {CRASH_BOUND:?} before the kill); \
         the newest turn kept had finished {newest_kept:?} before it",
        finished.len()
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let text = transcript(&c.state);
    for m in first.iter().chain([&resumed, &last]) {
        assert!(
            text.contains(m.as_str()),
            "{m} is in the restored transcript"
        );
    }
    assert_eq!(check_databases(&c.state), 3);

    // Point in time: the databases as they were when A stopped, from the
    // bucket alone. A's turns are there, B's and C's are not, and the
    // gateway runs on the result.
    let at = humantime::format_rfc3339_millis(after_a).to_string();
    let pitr = Dirs::new(gw.tmp.path(), "pitr");
    let elsewhere = Dirs::new(gw.tmp.path(), "pitr-cli");
    let mut env = gw.g.s3_env();
    env.extend(elsewhere.env());
    env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    let out = Command::new(common::BIN)
        .args(["restore", "--to", pitr.state.to_str().unwrap(), "--at", &at])
        .env_clear()
        .env("PATH", &gw.path)
        .envs(env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("as of {at}")), "{stdout}");
    let text = transcript(&pitr.state);
    for m in &first {
        assert!(
            text.contains(m.as_str()),
            "{m}, from before the moment, is restored"
        );
    }
    for m in finished.iter().map(|(m, _)| m).chain([&resumed, &last]) {
        assert!(
            !text.contains(m.as_str()),
            "{m}, from after the moment, is not restored"
        );
    }
    assert!(check_databases(&pitr.state) >= 1);
    let port = free_port();
    let home = gw.tmp.path().join("pitr-home");
    fs::create_dir_all(&home).unwrap();
    // Local mode (no bucket): the restored directory as it is.
    let mut env = pitr.env();
    env.push(("PATH".into(), gw.path.clone()));
    env.push(("HOME".into(), home.display().to_string()));
    env.push((
        "CVM_GATEWAY_CMD".into(),
        format!("openclaw gateway run --bind loopback --port {port}"),
    ));
    let mut app = Appliance::start(&pitr, &env);
    app.wait_ready(T);
    wait_until(T, "GET /health on the restored state", || healthy(port));
    let probe = markers("e", 1).remove(0);
    turn(port, &probe, false);
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

/// With a model configured, a gateway that fails at start runs OpenClaw's
/// automatic triage first (it asks the model) and exits ~25 s later, so it is
/// no quick failure for `CVM_GATEWAY_MAX_FAILED_STARTS` (10 s): cvm-init
/// restarts it with backoff, and a stop still ends everything cleanly.
#[test]
fn on_the_mount_layout_the_gateway_refuses_the_state_dir_and_is_restarted_with_backoff() {
    let Some(gw) = setup() else { return };
    let port = free_port();
    let (mut app, _) = gw.boot(
        "m",
        port,
        &[
            ("CVM_STORAGE", "mount"),
            ("OPENCLAW_GATEWAY_RESTART_DELAY", "100ms"),
        ],
    );
    wait_until(T, "two failed gateway starts", || {
        app.log_text().matches("gateway exited; restarting").count() >= 2
    });
    let log = app.log_text();
    assert!(
        [
            "does not support atomic bootstrap publication",
            "file identity changed",
            "could not be verified"
        ]
        .iter()
        .any(|reason| log.contains(reason)),
        "the gateway's own reason is in the log:\n{log}"
    );
    assert!(!healthy(port), "the gateway never serves on the mount");
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}
