//! Local mode (no S3_BUCKET): the same supervision and shutdown, no rclone.

mod common;

use std::fs;
use std::time::Duration;

use common::{descendants, proc_stat, script, wait_until, Appliance, Dirs, Signal};

const T: Duration = Duration::from_secs(20);

fn env(dirs: &Dirs, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = dirs.env();
    e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    e
}

#[test]
fn state_survives_a_stop_and_no_rclone_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = script(
        tmp.path(),
        "gw.sh",
        r#"mkdir -p "$OPENCLAW_STATE_DIR/agents/main"
echo "boot $(date +%s%N)" >> "$OPENCLAW_STATE_DIR/agents/main/log.txt"
touch "$OPENCLAW_STATE_DIR/.done"
exec sleep 1000"#,
    );
    let dirs = Dirs::new(tmp.path(), "box");
    for boot in 1..=2 {
        let _ = fs::remove_file(dirs.state.join(".done"));
        let mut app = Appliance::start(
            &dirs,
            &env(&dirs, &[("CVM_GATEWAY_CMD", gw.to_str().unwrap())]),
        );
        app.wait_ready(T);
        wait_until(T, "the gateway's writes", || {
            dirs.state.join(".done").exists()
        });
        assert_eq!(app.stop(T), 0, "{}", app.log_text());
        let log = fs::read_to_string(dirs.state.join("agents/main/log.txt")).unwrap();
        assert_eq!(log.lines().count(), boot, "every boot's line is kept");
        assert!(!dirs.run.exists(), "local mode renders no rclone config");
        assert!(!app.log_text().contains("rclone"), "{}", app.log_text());
        let notified = app.notified().join("\n");
        for line in [
            "STATUS=starting storage",
            "READY=1",
            "STATUS=running",
            "STOPPING=1",
            "STATUS=stopping: flushing state to storage",
        ] {
            assert!(
                notified.contains(line),
                "sd-notify lacks {line:?}:\n{notified}"
            );
        }
    }
}

#[test]
fn gateway_gets_no_secrets_and_signals_reach_its_group() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let gw = script(
        tmp.path(),
        "gw.sh",
        r#"env > "$OUT/env"
trap 'echo hup >> "$OUT/hup"' HUP
# A grandchild in the same group proves the whole group is signalled.
sh -c 'trap "echo child-hup >> $OUT/hup" HUP; while :; do sleep 0.05; done' &
touch "$OUT/ready"
while :; do sleep 0.05; done"#,
    );
    let dirs = Dirs::new(tmp.path(), "box");
    let out_s = out.display().to_string();
    let mut app = Appliance::start(
        &dirs,
        &env(
            &dirs,
            &[
                ("CVM_GATEWAY_CMD", gw.to_str().unwrap()),
                ("OUT", &out_s),
                ("AWS_SECRET_ACCESS_KEY", "aws-secret-value"),
                ("AWS_ACCESS_KEY_ID", "aws-key-id-value"),
                ("RCLONE_CRYPT_PASSWORD", "crypt-password-value"),
                ("MASTER_KEY", "master-key-value"),
            ],
        ),
    );
    app.wait_ready(T);
    wait_until(T, "the gateway to start", || out.join("ready").exists());
    let genv = fs::read_to_string(out.join("env")).unwrap();
    for secret in [
        "aws-secret-value",
        "aws-key-id-value",
        "crypt-password-value",
        "master-key-value",
        "NOTIFY_SOCKET",
    ] {
        assert!(!genv.contains(secret), "gateway env has {secret}:\n{genv}");
    }
    assert!(genv.contains(&format!("OPENCLAW_STATE_DIR={}", dirs.state.display())));

    app.signal(Signal::SIGHUP);
    wait_until(T, "SIGHUP at the gateway and its child", || {
        let h = fs::read_to_string(out.join("hup")).unwrap_or_default();
        h.contains("child-hup") && h.lines().any(|l| l == "hup")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    assert!(descendants(app.pid()).is_empty());
}

#[test]
fn a_gateway_that_ignores_sigterm_is_killed_within_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = script(
        tmp.path(),
        "gw.sh",
        "trap '' TERM\ntouch \"$OPENCLAW_STATE_DIR/.trapped\"\nwhile :; do sleep 0.05; done",
    );
    let dirs = Dirs::new(tmp.path(), "box");
    let mut app = Appliance::start(
        &dirs,
        &env(
            &dirs,
            &[
                ("CVM_GATEWAY_CMD", gw.to_str().unwrap()),
                ("CVM_STOP_TIMEOUT", "1"),
            ],
        ),
    );
    app.wait_ready(T);
    wait_until(T, "the gateway to ignore SIGTERM", || {
        dirs.state.join(".trapped").exists()
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let log = app.log_text();
    assert!(
        log.contains("gateway ignored SIGTERM; killing its process group"),
        "{log}"
    );
    assert!(log.contains("killed=true"), "{log}");
}

#[test]
fn a_crashing_gateway_is_restarted_with_backoff_and_orphans_are_reaped() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("starts");
    // Each run leaves an orphan behind (the subshell exits, its sleep lives on)
    // and then crashes.
    let gw = script(
        tmp.path(),
        "gw.sh",
        r#"echo start >> "$OUT"
sh -c 'sleep 0.2 & sleep 0.2 & sleep 0.2 &'
exit 3"#,
    );
    let dirs = Dirs::new(tmp.path(), "box");
    let out_s = out.display().to_string();
    let mut app = Appliance::start(
        &dirs,
        &env(
            &dirs,
            &[
                ("CVM_GATEWAY_CMD", gw.to_str().unwrap()),
                ("OUT", &out_s),
                ("OPENCLAW_GATEWAY_RESTART_DELAY", "100ms"),
                ("OPENCLAW_GATEWAY_RESTART_MAX_DELAY", "400ms"),
                ("CVM_GATEWAY_MAX_FAILED_STARTS", "0"),
            ],
        ),
    );
    app.wait_ready(T);
    wait_until(T, "five starts", || {
        fs::read_to_string(&out).unwrap_or_default().lines().count() >= 5
    });
    let log = app.log_text();
    for delay in ["restart_in=100ms", "restart_in=200ms", "restart_in=400ms"] {
        assert!(log.contains(delay), "missing {delay}:\n{log}");
    }
    assert!(log.contains("exit=exit code 3"), "{log}");
    assert!(
        !log.contains("restart_in=800ms"),
        "the cap must hold:\n{log}"
    );
    // Orphans (sleep 0.2) land on cvm-init and must not stay zombies.
    wait_until(T, "orphans reaped", || {
        app.log_text().matches("reaped orphan").count() >= 6
    });
    wait_until(T, "no zombie children", || {
        descendants(app.pid())
            .into_iter()
            .all(|p| proc_stat(p).map(|(_, s)| s) != Some('Z'))
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

#[test]
fn a_gateway_that_keeps_failing_at_start_ends_the_appliance() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = script(
        tmp.path(),
        "gw.sh",
        "echo 'fatal: cannot start' >&2\nexit 1",
    );
    let dirs = Dirs::new(tmp.path(), "box");
    let mut app = Appliance::start(
        &dirs,
        &env(
            &dirs,
            &[
                ("CVM_GATEWAY_CMD", gw.to_str().unwrap()),
                ("OPENCLAW_GATEWAY_RESTART_DELAY", "50ms"),
                ("CVM_GATEWAY_MAX_FAILED_STARTS", "3"),
            ],
        ),
    );
    assert_eq!(app.wait_exit(T), 70, "{}", app.log_text());
    let log = app.log_text();
    assert_eq!(log.matches("fatal: cannot start").count(), 3, "{log}");
    assert!(
        log.contains("the gateway failed 3 starts in a row"),
        "{log}"
    );
}

#[test]
fn a_missing_gateway_program_exits_127_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = Dirs::new(tmp.path(), "box");
    let mut app = Appliance::start(
        &dirs,
        &env(
            &dirs,
            &[("CVM_GATEWAY_CMD", "/nonexistent/openclaw gateway run")],
        ),
    );
    assert_eq!(app.wait_exit(T), 127, "{}", app.log_text());
    assert!(
        app.log_text()
            .contains(r#"program "/nonexistent/openclaw" not found"#),
        "{}",
        app.log_text()
    );
}
