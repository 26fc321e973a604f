//! S3 faults against real Garage. At boot: an unreachable endpoint is waited
//! out (the gateway starts only after the restore), rejected credentials and
//! a missing bucket stop the boot at once, and CVM_S3_WAIT bounds the wait.
//! While running: an outage is reported and caught up with nothing lost.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::load::{commits, inspect, WRITER};
use common::{lines, raw_state, script, wait_until, Appliance, Dirs, Garage, PASSWORD};

const T: Duration = Duration::from_secs(60);

fn boot(g: &Garage, tmp: &Path, name: &str, extra: &[(&str, &str)]) -> Appliance {
    let dirs = Dirs::new(tmp, name);
    let mut env = g.s3_env();
    env.extend(dirs.env());
    env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    for (k, v) in extra {
        env.retain(|(name, _)| name != k);
        env.push(((*k).into(), (*v).into()));
    }
    Appliance::start(&dirs, &env)
}

fn attempts(app: &Appliance) -> usize {
    app.log_text()
        .matches("the gateway waits until S3 answers")
        .count()
}

fn s3_down_at_boot_is_waited_out(layout: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = Garage::start(tmp.path());
    let gw = script(
        tmp.path(),
        "gw.sh",
        "echo 'remember this' > \"$OPENCLAW_STATE_DIR/notes.md\"; exec sleep 100000",
    );
    let mut app = boot(
        &g,
        tmp.path(),
        "first",
        &[
            ("CVM_STORAGE", layout),
            ("CVM_GATEWAY_CMD", gw.to_str().unwrap()),
        ],
    );
    app.wait_ready(T);
    wait_until(T, "the note", || {
        std::fs::read_to_string(app.state_dir.join("notes.md"))
            .is_ok_and(|n| n == "remember this\n")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let before = raw_state(&g, tmp.path());

    // A new container while S3 is down: its gateway records what it found.
    g.stop();
    let seen = tmp.path().join("seen");
    let gw2 = script(
        tmp.path(),
        "gw2.sh",
        &format!(
            "cat \"$OPENCLAW_STATE_DIR/notes.md\" > {0}.tmp 2>&1; mv {0}.tmp {0}; exec sleep 100000",
            seen.display()
        ),
    );
    let down_since = Instant::now();
    let mut app = boot(
        &g,
        tmp.path(),
        "second",
        &[
            ("CVM_STORAGE", layout),
            ("CVM_GATEWAY_CMD", gw2.to_str().unwrap()),
        ],
    );
    wait_until(T, "two failed attempts", || attempts(&app) >= 2);
    let log = app.log_text();
    assert!(log.contains("connection refused"), "{log}");
    assert!(
        app.notified()
            .iter()
            .any(|l| l.starts_with("STATUS=waiting for S3 (attempt 1")),
        "{:?}",
        app.notified()
    );
    assert!(app.try_status().is_none(), "still waiting:\n{log}");
    // The outage lasts 20 s, as in the issue; cvm-init keeps waiting through it.
    let outage = Duration::from_secs(20);
    std::thread::sleep(outage.saturating_sub(down_since.elapsed()));
    assert!(
        !seen.exists(),
        "the gateway did not start while S3 was down"
    );
    assert!(app.try_status().is_none(), "{}", app.log_text());
    g.restart();

    app.wait_ready(T);
    wait_until(T, "the gateway's view", || seen.exists());
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap(),
        "remember this\n",
        "the gateway started on the restored state"
    );
    assert!(app.log_text().contains("S3 reachable again"));
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    assert_eq!(raw_state(&g, tmp.path()), before, "nothing was overwritten");
}

#[test]
fn s3_down_at_boot_is_waited_out_in_the_replicate_layout() {
    s3_down_at_boot_is_waited_out("replicate");
}

#[test]
fn s3_down_at_boot_is_waited_out_in_the_mount_layout() {
    s3_down_at_boot_is_waited_out("mount");
}

#[test]
fn rejected_credentials_and_a_missing_bucket_stop_the_boot_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start(tmp.path());
    let bad_secret = "0".repeat(64);
    let cases = [
        (
            "secret",
            vec![("AWS_SECRET_ACCESS_KEY", bad_secret.as_str())],
            "rejected the credentials",
        ),
        (
            "key",
            vec![("AWS_ACCESS_KEY_ID", "GK0123456789abcdef01234567")],
            "rejected the credentials",
        ),
        (
            "bucket",
            vec![("S3_BUCKET", "no-such-bucket")],
            "bucket no-such-bucket does not exist",
        ),
    ];
    for (name, extra, says) in cases {
        let mut extra = extra.clone();
        extra.push(("CVM_GATEWAY_CMD", "sleep 100000"));
        let mut app = boot(&g, tmp.path(), name, &extra);
        assert_eq!(app.wait_exit(T), 76, "{name}: {}", app.log_text());
        let log = app.log_text();
        assert!(log.contains(says), "{name}: {log}");
        assert_eq!(attempts(&app), 0, "{name}: not retried");
        assert!(!log.contains("gateway started"), "{log}");
        for secret in [bad_secret.as_str(), &g.secret, PASSWORD] {
            assert!(!log.contains(secret), "{name}: a secret in the log");
        }
    }
    assert_eq!(
        raw_state(&g, tmp.path()),
        "",
        "nothing was written to the bucket"
    );
}

#[test]
fn cvm_s3_wait_bounds_the_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = Garage::start(tmp.path());
    g.stop();
    let t = Instant::now();
    let mut app = boot(
        &g,
        tmp.path(),
        "a",
        &[("CVM_S3_WAIT", "2s"), ("CVM_GATEWAY_CMD", "sleep 100000")],
    );
    assert_eq!(app.wait_exit(T), 69, "{}", app.log_text());
    assert!(t.elapsed() < Duration::from_secs(20));
    let log = app.log_text();
    assert!(
        log.contains("still unreachable after") && log.contains("CVM_S3_WAIT"),
        "{log}"
    );
    assert!(!log.contains("gateway started"), "{log}");
}

/// Garage stopped for 30 s while the gateway writes a file every 200 ms and
/// commits to SQLite every 50 ms: the gateway keeps running, the status says
/// how far behind S3 is, and once S3 is back everything written reaches it
/// without the help of a stop: after "caught up", everything is SIGKILLed and
/// a fresh container must hold every file and commit made before S3 returned.
fn s3_down_while_running_loses_nothing(layout: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = Garage::start(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let writer = tmp.path().join("writer.py");
    std::fs::write(&writer, WRITER).unwrap();
    let gw = script(
        tmp.path(),
        "gw.sh",
        &format!(
            "out={out}\nOUT=$out EVERY=0.05 python3 {writer} &\nmkdir -p \"$OPENCLAW_STATE_DIR/files\"\ni=0\n\
             while true; do\n  [ -e $out/pause ] && {{ touch $out/paused-sh; sleep 0.05; continue; }}\n  i=$((i+1)); f=f-$i\n  \
             if echo $f 2>>$out/errors > \"$OPENCLAW_STATE_DIR/files/$f\"; then echo $f >> $out/ok; fi\n  \
             sleep 0.2\ndone",
            out = out.display(),
            writer = writer.display()
        ),
    );
    let mut app = boot(
        &g,
        tmp.path(),
        "a",
        &[
            ("CVM_STORAGE", layout),
            ("CVM_GATEWAY_CMD", gw.to_str().unwrap()),
        ],
    );
    app.wait_ready(T);
    wait_until(T, "writes before the outage", || {
        lines(&out.join("ok")).len() >= 5 && commits(&out).len() >= 20
    });

    g.stop();
    let down = Instant::now();
    wait_until(T, "the status to show the backlog", || {
        app.notified()
            .iter()
            .any(|l| l.starts_with("STATUS=S3 writes") && l.contains("behind"))
    });
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down.elapsed()));
    assert!(app.try_status().is_none(), "{}", app.log_text());
    let log = app.log_text();
    assert!(log.contains("S3 writes") && log.contains("behind"), "{log}");
    assert!(
        !log.contains("gateway exited"),
        "the gateway kept running:\n{log}"
    );
    // The writers pause, so everything written was written while S3 was down
    // (or before), and must all reach S3 once it is back.
    std::fs::write(out.join("pause"), "").unwrap();
    wait_until(T, "both writers to pause", || {
        out.join("paused").exists() && out.join("paused-sh").exists()
    });
    let files_before = lines(&out.join("ok"));
    let commit_before = commits(&out).last().unwrap().0;
    g.restart();
    let up = Instant::now();
    wait_until(Duration::from_secs(120), "the catch-up", || {
        app.log_text().contains("S3 writes caught up")
    });
    println!("{layout}: caught up {:?} after S3 returned", up.elapsed());
    app.kill_all();
    assert!(files_before.len() > 100, "{} files", files_before.len());
    assert!(
        lines(&out.join("errors")).is_empty(),
        "{:?}",
        lines(&out.join("errors"))
    );

    let fresh = Dirs::new(tmp.path(), "fresh");
    let mut env = g.s3_env();
    env.extend(fresh.env());
    for (k, v) in [
        ("RCLONE_CRYPT_PASSWORD", PASSWORD),
        ("CVM_STORAGE", layout),
        ("CVM_GATEWAY_CMD", "sleep 100000"),
    ] {
        env.push((k.into(), v.into()));
    }
    let mut app = Appliance::start(&fresh, &env);
    app.wait_ready(T);
    let missing: Vec<&String> = files_before
        .iter()
        .filter(|f| !fresh.state.join("files").join(f).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} files lost: {missing:?}",
        missing.len(),
        files_before.len()
    );
    let (max, rows) = inspect(&fresh.state.join(common::load::DB)).expect("a sound database");
    assert!(
        max >= commit_before && rows == max,
        "commits up to {commit_before} made before S3 returned; restored {rows} rows up to {max}"
    );
    assert_eq!(app.stop(T), 0);
}

#[test]
fn s3_down_while_running_loses_nothing_in_the_replicate_layout() {
    s3_down_while_running_loses_nothing("replicate");
}

#[test]
fn s3_down_while_running_loses_nothing_in_the_mount_layout() {
    s3_down_while_running_loses_nothing("mount");
}

/// Garage stops while a new container restores its state (transfers slowed
/// by an rclone wrapper so the restore is surely in progress): the failed
/// boot is undone and waited out, and the gateway starts on the whole state.
#[test]
fn s3_down_during_the_restore_is_waited_out() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = Garage::start(tmp.path());
    let src = tmp.path().join("tree");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..40 {
        let body: String = format!("file {i} ").repeat(12_000);
        std::fs::write(src.join(format!("f{i}.txt")), body).unwrap();
    }
    let conf = common::stock_config(&g, tmp.path());
    common::rclone(&conf, &["copy", src.to_str().unwrap(), "crypt:"]);
    let real = common::rclone_bin();
    let slow = script(
        tmp.path(),
        "slow-rclone",
        &format!(
            "for a in \"$@\"; do [ \"$a\" = rcd ] && exec {0} \"$@\" --bwlimit 300k; done\nexec {0} \"$@\"",
            real.display()
        ),
    );
    let seen = tmp.path().join("seen");
    let gw = script(
        tmp.path(),
        "gw.sh",
        &format!(
            "cat \"$OPENCLAW_STATE_DIR\"/f*.txt | md5sum > {0}.tmp; mv {0}.tmp {0}; exec sleep 100000",
            seen.display()
        ),
    );
    let mut app = boot(
        &g,
        tmp.path(),
        "a",
        &[
            ("RCLONE_BIN", slow.to_str().unwrap()),
            ("CVM_GATEWAY_CMD", gw.to_str().unwrap()),
        ],
    );
    wait_until(T, "the restore to be under way", || {
        app.log_text().contains("restore: in progress")
    });
    g.stop();
    wait_until(T, "the failed boot to be undone", || {
        app.log_text()
            .contains("the boot failed while S3 went away again")
    });
    wait_until(T, "a wait for S3", || attempts(&app) >= 1);
    assert!(!seen.exists(), "the gateway did not start");
    g.restart();
    app.wait_ready(Duration::from_secs(120));
    wait_until(T, "the gateway's view", || seen.exists());
    let want = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("cat {}/f*.txt | md5sum", src.display()))
        .output()
        .unwrap()
        .stdout;
    assert_eq!(
        std::fs::read(&seen).unwrap(),
        want,
        "the gateway started on the whole tree"
    );
    assert!(
        app.log_text()
            .contains("an earlier restore was interrupted; starting it over"),
        "{}",
        app.log_text()
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}
