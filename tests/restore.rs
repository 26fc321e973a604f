//! `cvm-init restore --to DIR`: the state S3 holds, from another machine's
//! point of view (no appliance, its own empty directories), written into
//! DIR, and nothing written to the bucket.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::load::{commits, inspect, DB, WRITER};
use common::replica::{write, Setup};
use common::{raw_state, wait_until, Dirs, PASSWORD};

const T: Duration = Duration::from_secs(60);

/// Runs `cvm-init restore` with the appliance's S3 environment and `key`;
/// returns (exit code, stdout, stderr).
fn restore(s: &Setup, key: &str, args: &[&str]) -> (i32, String, String) {
    let elsewhere = Dirs::new(s.tmp.path(), "elsewhere");
    let mut env = s.g.s3_env();
    env.extend(elsewhere.env());
    env.push(("RCLONE_CRYPT_PASSWORD".into(), key.into()));
    env.push(("CVM_GATEWAY_CMD".into(), s.idle.clone()));
    let out = Command::new(common::BIN)
        .arg("restore")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn restore_writes_the_latest_files_and_databases_and_nothing_to_s3() {
    let s = Setup::new();
    let writer = s.tmp.path().join("writer.py");
    fs::write(&writer, WRITER).unwrap();
    let out = s.tmp.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let cmd = format!("python3 {}", writer.display());
    let out_s = out.display().to_string();
    let (mut app, a) = s.boot(
        "a",
        &[
            ("CVM_GATEWAY_CMD", cmd.as_str()),
            ("OUT", &out_s),
            ("LIMIT", "60"),
        ],
    );
    write(&a.state, "notes/a.txt", "hello");
    std::os::unix::fs::symlink("notes/a.txt", a.state.join("link")).unwrap();
    wait_until(T, "60 commits", || commits(&out).len() >= 60);
    // Until a restore has every commit and the files: the last pass and
    // the last segment are on S3.
    let mut n = 0;
    wait_until(T, "a restore with everything", || {
        n += 1;
        let to = s.tmp.path().join(format!("try-{n}"));
        let (code, _, _) = restore(&s, PASSWORD, &["--to", to.to_str().unwrap()]);
        code == 0
            && inspect(&to.join(DB)) == Some((60, 60))
            && fs::read_to_string(to.join("link")).is_ok_and(|t| t == "hello")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    let before = raw_state(&s.g, s.tmp.path());
    let to = s.tmp.path().join("restored");
    let (code, stdout, stderr) = restore(&s, PASSWORD, &["--to", to.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("restored the latest state"), "{stdout}");
    assert_eq!(inspect(&to.join(DB)), Some((60, 60)));
    assert_eq!(fs::read_to_string(to.join("notes/a.txt")).unwrap(), "hello");
    assert_eq!(
        fs::read_link(to.join("link")).unwrap(),
        Path::new("notes/a.txt")
    );
    assert!(!to.join(".cvm").exists() && !to.join("sqlite").exists());
    assert_eq!(
        raw_state(&s.g, s.tmp.path()),
        before,
        "nothing written to S3"
    );

    // Into a directory that is not empty: refused, nothing touched.
    let (code, _, stderr) = restore(&s, PASSWORD, &["--to", to.to_str().unwrap()]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("is not empty"), "{stderr}");
    // A point in time is refused until the history exists, not answered with "latest".
    let (code, _, stderr) = restore(&s, PASSWORD, &["--to", "/nonexistent/x", "--at", "-5m"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("latest state only"), "{stderr}");
    // The wrong key: 77, as the appliance.
    let (code, _, stderr) = restore(
        &s,
        &common::obscure("not the key"),
        &["--to", s.tmp.path().join("wrong").to_str().unwrap()],
    );
    assert_eq!(code, 77, "{stderr}");
}

#[test]
fn a_missing_segment_ends_the_restore_there_and_is_named() {
    let s = Setup::new();
    let writer = s.tmp.path().join("writer.py");
    fs::write(&writer, WRITER).unwrap();
    let out = s.tmp.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let cmd = format!("python3 {}", writer.display());
    let out_s = out.display().to_string();
    // Commits spread over 3 s: at least two segments.
    let (mut app, _) = s.boot(
        "a",
        &[
            ("CVM_GATEWAY_CMD", cmd.as_str()),
            ("OUT", &out_s),
            ("LIMIT", "10"),
            ("EVERY", "0.3"),
        ],
    );
    wait_until(T, "10 commits and a second segment", || {
        commits(&out).len() >= 10
            && app
                .log_text()
                .contains("sqlite: segment uploaded db=state/openclaw.sqlite seq=2")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let conf = common::stock_config(&s.g, s.tmp.path());
    let dir = ".cvm/wal/state/openclaw.sqlite";
    let listing = String::from_utf8(common::rclone(
        &conf,
        &["lsf", "-R", "--files-only", &format!("crypt:{dir}")],
    ))
    .unwrap();
    let first = listing
        .lines()
        .find(|l| l.ends_with("/000000000001"))
        .unwrap_or_else(|| panic!("segment 1 in {listing}"))
        .to_owned();
    common::rclone(&conf, &["deletefile", &format!("crypt:{dir}/{first}")]);

    let to = s.tmp.path().join("restored");
    let (code, _, stderr) = restore(&s, PASSWORD, &["--to", to.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("restore stopped at segment") && stderr.contains(&first),
        "the missing segment is named: {stderr}"
    );
    let (max, count) = inspect(&to.join(DB)).expect("what is restored passes integrity_check");
    assert_eq!(max, count, "no gap inside what was restored");
    assert!(max < 10, "nothing after the missing segment is applied");
}
