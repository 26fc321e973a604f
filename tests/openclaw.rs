//! The real OpenClaw gateway (npm `openclaw@2026.9.6` on Node 24) under
//! cvm-init against real Garage: healthy, stopped, and healthy again in a new
//! container from the same bucket. Installs the gateway once into a cache
//! (`scripts/openclaw`); skips, saying so, only when the npm registry cannot
//! be reached.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{free_port, wait_until, Appliance, Dirs, Garage, PASSWORD};

const T: Duration = Duration::from_secs(120);

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

fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.starts_with("HTTP/1.1 200") && body.contains("\"ok\":true")
}

struct Gateway {
    tmp: tempfile::TempDir,
    g: Garage,
    path: String,
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
            format!("openclaw gateway run --bind loopback --port {port} --allow-unconfigured --auth none --dev"),
        ));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        (Appliance::start(&dirs, &env), dirs)
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
    Some(Gateway { tmp, g, path })
}

#[test]
fn the_real_gateway_comes_back_healthy_in_a_new_container() {
    let Some(gw) = setup() else { return };
    let port = free_port();
    // A roomy stop budget: a gateway still busy with first-run work gets time
    // to exit on its own (the default gives it 4.5 s).
    let (mut app, a) = gw.boot("a", port, &[("CVM_STOP_TIMEOUT", "20")]);
    app.wait_ready(T);
    wait_until(T, "GET /health on the first container", || healthy(port));
    // Let the gateway's first writes be replicated and its database snapshotted.
    wait_until(T, "the database snapshot", || {
        app.log_text().contains("sqlite: snapshot uploaded")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let log = app.log_text();
    assert!(
        log.contains("shutdown: gateway stopped exit=exit code 0"),
        "SIGTERM stops the gateway cleanly:\n{log}"
    );
    let config = fs::read(a.state.join("openclaw.json")).unwrap();

    let port = free_port();
    let (mut app, b) = gw.boot("b", port, &[]);
    app.wait_ready(T);
    assert_eq!(
        fs::read(b.state.join("openclaw.json")).unwrap(),
        config,
        "openclaw.json is restored byte for byte"
    );
    wait_until(T, "GET /health on the new container", || healthy(port));
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let db = rusqlite::Connection::open(b.state.join("state/openclaw.sqlite")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok", "state/openclaw.sqlite passes integrity_check");
}

#[test]
fn on_the_mount_layout_the_gateway_fails_and_the_appliance_says_so() {
    let Some(gw) = setup() else { return };
    let port = free_port();
    let (mut app, _) = gw.boot(
        "m",
        port,
        &[
            ("CVM_STORAGE", "mount"),
            ("OPENCLAW_GATEWAY_RESTART_DELAY", "100ms"),
            ("CVM_GATEWAY_MAX_FAILED_STARTS", "2"),
        ],
    );
    assert_eq!(app.wait_exit(T), 70, "{}", app.log_text());
    let log = app.log_text();
    assert!(
        log.contains("does not support atomic bootstrap publication")
            || log.contains("file identity changed"),
        "the gateway's own reason is in the log:\n{log}"
    );
    assert!(
        log.contains("the gateway failed 2 starts in a row"),
        "{log}"
    );
}
