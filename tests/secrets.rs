//! A full run, scanned for secrets: every log line cvm-init wrote (at debug
//! level, through an S3 outage, a killed rclone, a stop, a wrong-key boot and
//! `cvm-init check`), the command line of every process, the environment of
//! every process under cvm-init, and the gateway's own view of its
//! environment. None may hold a secret value.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::{
    descendant_with, descendants, obscure, script, wait_until, Appliance, Dirs, Garage, Signal, BIN,
};

const T: Duration = Duration::from_secs(60);
const MASTER_KEY: &str = "correct horse battery staple";
/// docs/facts.md §6: what MASTER_KEY derives to (the crypt password and salt).
const DERIVED_PASSWORD: &str = "fWxyhzuLSQizHmoLLNCIFuPKNGAgWm3D5LziNPZ2UdM=";
const DERIVED_SALT: &str = "H4BgUUYEIHkdwOCdLFt/MPbFWIl/8cxJmZmD5D/fVwU=";

/// `/proc/<pid>/cmdline` of every process, and `environ` of everything under cvm-init.
fn process_tables(app: &Appliance) -> String {
    let mut out = String::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = fs::read(e.path().join("cmdline")) {
            out.push_str(&String::from_utf8_lossy(&cmdline));
            out.push('\n');
        }
    }
    for pid in descendants(app.pid()) {
        // cvm-init itself is given the secrets; what it starts is not.
        if pid == app.init_pid() {
            continue;
        }
        let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        out.push_str(&String::from_utf8_lossy(&environ));
        out.push('\n');
    }
    out
}

fn run_check(env: &[(String, String)]) -> String {
    let out = Command::new(BIN)
        .arg("check")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CVM_LOG", "debug")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs everything in `layout` with the crypt `keys`; `revealed` are further
/// secrets derived from them (plain passwords, derived keys).
fn full_run_leaks_nothing(layout: &str, keys: &[(&str, String)], revealed: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = Garage::start(tmp.path());
    let mut secrets: Vec<String> = vec![g.secret.clone(), g.key_id.clone()];
    secrets.extend(keys.iter().map(|(_, v)| v.clone()));
    secrets.extend(revealed.iter().map(|s| (*s).to_owned()));
    let out = tmp.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let gw = script(
        tmp.path(),
        "gw.sh",
        &format!(
            "env > {}/gw-env.$$\ni=0\nwhile true; do i=$((i+1)); date > \"$OPENCLAW_STATE_DIR/t-$$-$i\"; sleep 0.2; done",
            out.display()
        ),
    );
    let dirs = Dirs::new(tmp.path(), "a");
    let mut env = g.s3_env();
    env.extend(dirs.env());
    env.push(("CVM_STORAGE".into(), layout.into()));
    env.extend(keys.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let mut app_env = env.clone();
    app_env.push(("CVM_GATEWAY_CMD".into(), gw.display().to_string()));
    let mut app = Appliance::start(&dirs, &app_env);
    app.wait_ready(T);
    let mut seen = process_tables(&app);
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dirs.run), 0o700);
    assert_eq!(mode(&dirs.run.join("rclone.conf")), 0o600);
    assert_eq!(mode(&dirs.run.join("rc")), 0o700);

    // S3 down long enough for uploads to fail and say why.
    g.stop();
    wait_until(T, "a failed upload in the log", || {
        app.log_text().contains("connection refused")
    });
    g.restart();
    // rclone dies: the watchdog (mount) or the restart of rclone rcd (replicate).
    let needle = if layout == "mount" {
        "\0mount\0"
    } else {
        "\0rcd\0"
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(descendant_with(&app, needle)),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_until(T, "the recovery", || {
        app.log_text().contains("storage recovered")
    });
    wait_until(T, "the gateway", || {
        descendants(app.pid()).iter().any(|p| {
            fs::read_to_string(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.contains("gw.sh"))
        })
    });
    seen.push_str(&process_tables(&app));
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    seen.push_str(&app.log_text());

    // A wrong key, and `cvm-init check` with good and bad settings.
    let wrong = Dirs::new(tmp.path(), "wrong");
    let mut wrong_env = g.s3_env();
    wrong_env.extend(wrong.env());
    wrong_env.push(("CVM_STORAGE".into(), layout.into()));
    wrong_env.push(("RCLONE_CRYPT_PASSWORD".into(), obscure("not the password")));
    wrong_env.push(("CVM_GATEWAY_CMD".into(), "sleep 100000".into()));
    let mut app = Appliance::start(&wrong, &wrong_env);
    assert_eq!(app.wait_exit(T), 77, "{}", app.log_text());
    seen.push_str(&app.log_text());
    seen.push_str(&run_check(&env));
    let mut bad = env.clone();
    bad.retain(|(k, _)| k != "AWS_SECRET_ACCESS_KEY");
    bad.push(("AWS_SECRET_ACCESS_KEY".into(), "0".repeat(64)));
    seen.push_str(&run_check(&bad));
    for e in fs::read_dir(&out).unwrap().flatten() {
        seen.push_str(&fs::read_to_string(e.path()).unwrap());
    }
    // Also every other file the run wrote outside the state: stdout captures, logs.
    for name in ["a/cvm-init.stdout", "wrong/cvm-init.stdout"] {
        seen.push_str(&fs::read_to_string(tmp.path().join(name)).unwrap_or_default());
    }

    assert!(seen.contains("gateway started"), "the scan saw the run");
    assert!(
        seen.contains("OPENCLAW_STATE_DIR="),
        "the scan saw the gateway's env"
    );
    for s in &secrets {
        assert!(
            !seen.contains(s.as_str()),
            "a secret ({} chars) leaked",
            s.len()
        );
    }
}

#[test]
fn a_full_replicate_run_with_master_key_leaks_no_secret() {
    full_run_leaks_nothing(
        "replicate",
        &[("MASTER_KEY", MASTER_KEY.to_owned())],
        &[DERIVED_PASSWORD, DERIVED_SALT],
    );
}

#[test]
fn a_full_mount_run_with_crypt_passwords_leaks_no_secret() {
    full_run_leaks_nothing(
        "mount",
        &[
            ("RCLONE_CRYPT_PASSWORD", obscure("first secret words")),
            ("RCLONE_CRYPT_PASSWORD2", obscure("second secret words")),
        ],
        &["first secret words", "second secret words"],
    );
}
