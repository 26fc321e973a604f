//! Bad configuration: exit 78, one message per problem naming the variable,
//! secrets never echoed, nothing created on disk.

mod common;

use std::process::Command;

use common::{Dirs, BIN, PASSWORD};

struct Run {
    code: i32,
    stderr: String,
}

/// Runs cvm-init with the harness's directories, overridden by `env`.
fn run(dirs: &Dirs, env: &[(&str, &str)]) -> Run {
    let out = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(
            dirs.env()
                .into_iter()
                .filter(|(k, _)| !env.iter().any(|(e, _)| e == k)),
        )
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Run {
        code: out.status.code().expect("exited normally"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const GOOD_S3: [(&str, &str); 5] = [
    ("S3_BUCKET", "bkt"),
    ("S3_ENDPOINT", "http://127.0.0.1:1"),
    ("AWS_ACCESS_KEY_ID", "GKtestkey"),
    ("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-never-printed"),
    ("RCLONE_CRYPT_PASSWORD", PASSWORD),
];

fn with(
    overrides: &[(&'static str, &'static str)],
    remove: &[&str],
) -> Vec<(&'static str, &'static str)> {
    let mut env: Vec<_> = GOOD_S3
        .into_iter()
        .filter(|(k, _)| !remove.contains(k) && !overrides.iter().any(|(o, _)| o == k))
        .collect();
    env.extend_from_slice(overrides);
    env
}

#[test]
fn each_bad_variable_is_named_and_nothing_is_touched() {
    let tmp = tempfile::tempdir().unwrap();
    type Env = Vec<(&'static str, &'static str)>;
    let cases: Vec<(&str, Env, &str, &str)> = vec![
        (
            "no endpoint",
            with(&[], &["S3_ENDPOINT"]),
            "S3_ENDPOINT",
            "required in S3 mode",
        ),
        (
            "endpoint not a URL",
            with(&[("S3_ENDPOINT", "localhost:9000")], &[]),
            "S3_ENDPOINT",
            "not an http(s) URL",
        ),
        (
            "endpoint wrong scheme",
            with(&[("S3_ENDPOINT", "ftp://host")], &[]),
            "S3_ENDPOINT",
            "not an http(s) URL",
        ),
        (
            "no access key",
            with(&[], &["AWS_ACCESS_KEY_ID"]),
            "AWS_ACCESS_KEY_ID",
            "required",
        ),
        (
            "no secret key",
            with(&[], &["AWS_SECRET_ACCESS_KEY"]),
            "AWS_SECRET_ACCESS_KEY",
            "required",
        ),
        (
            "no password",
            with(&[], &["RCLONE_CRYPT_PASSWORD"]),
            "RCLONE_CRYPT_PASSWORD",
            "or set MASTER_KEY",
        ),
        (
            "plaintext password",
            with(&[("RCLONE_CRYPT_PASSWORD", "hunter2-plaintext")], &[]),
            "RCLONE_CRYPT_PASSWORD",
            "rclone obscure",
        ),
        (
            "plaintext password2",
            with(&[("RCLONE_CRYPT_PASSWORD2", "another plaintext")], &[]),
            "RCLONE_CRYPT_PASSWORD2",
            "rclone obscure",
        ),
        (
            "password2 beside MASTER_KEY",
            with(
                &[("MASTER_KEY", "mk"), ("RCLONE_CRYPT_PASSWORD2", PASSWORD)],
                &["RCLONE_CRYPT_PASSWORD"],
            ),
            "RCLONE_CRYPT_PASSWORD2",
            "MASTER_KEY derives both",
        ),
        (
            "empty gateway command",
            with(&[("CVM_GATEWAY_CMD", "  ")], &[]),
            "CVM_GATEWAY_CMD",
            "is empty",
        ),
        (
            "relative state dir",
            vec![("OPENCLAW_STATE_DIR", "data/openclaw")],
            "OPENCLAW_STATE_DIR",
            "not an absolute path",
        ),
        (
            "bad duration",
            vec![("CVM_STOP_TIMEOUT", "ten")],
            "CVM_STOP_TIMEOUT",
            "not a duration",
        ),
        (
            "bad sqlite pattern",
            vec![("CVM_SQLITE_PATHS", "/abs/*.db")],
            "CVM_SQLITE_PATHS",
            "is absolute",
        ),
        (
            "debounce beyond interval",
            vec![
                ("CVM_BACKUP_DEBOUNCE", "2m"),
                ("CVM_BACKUP_INTERVAL", "60s"),
            ],
            "CVM_BACKUP_DEBOUNCE",
            "longer than CVM_BACKUP_INTERVAL",
        ),
        (
            "backoff cap below base",
            vec![
                ("OPENCLAW_GATEWAY_RESTART_DELAY", "10s"),
                ("OPENCLAW_GATEWAY_RESTART_MAX_DELAY", "1s"),
            ],
            "OPENCLAW_GATEWAY_RESTART_MAX_DELAY",
            "shorter than",
        ),
    ];
    for (i, (name, env, var, fragment)) in cases.into_iter().enumerate() {
        let dirs = Dirs::new(tmp.path(), &format!("case{i}"));
        let r = run(&dirs, &env);
        assert_eq!(r.code, 78, "{name}: {}", r.stderr);
        let line = format!("configuration: {var}: ");
        assert!(
            r.stderr
                .lines()
                .any(|l| l.contains(&line) && l.contains(fragment)),
            "{name}: expected a line with {line:?} and {fragment:?}:\n{}",
            r.stderr
        );
        for secret in [
            "s3cr3t-value-never-printed",
            "hunter2-plaintext",
            "another plaintext",
            PASSWORD,
        ] {
            assert!(
                !r.stderr.contains(secret),
                "{name}: stderr leaks a secret:\n{}",
                r.stderr
            );
        }
        assert!(
            !dirs.state.exists() && !dirs.run.exists() && !dirs.local.exists(),
            "{name}: created a directory"
        );
    }
}

#[test]
fn all_problems_are_reported_in_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = Dirs::new(tmp.path(), "all");
    let r = run(
        &dirs,
        &[
            ("S3_BUCKET", "bkt"),
            ("S3_ENDPOINT", "nope"),
            ("RCLONE_CRYPT_PASSWORD", "plain"),
            ("CVM_GATEWAY_CMD", ""),
            ("CVM_STOP_TIMEOUT", "0"),
        ],
    );
    assert_eq!(r.code, 78);
    let problems: Vec<_> = r
        .stderr
        .lines()
        .filter(|l| l.contains("configuration: "))
        .collect();
    // endpoint, access key, secret key, password, stop timeout (an empty command means the default).
    assert_eq!(problems.len(), 5, "{}", r.stderr);
    assert!(r
        .stderr
        .contains("5 configuration problem(s); nothing was started or changed"));
}

#[test]
fn unknown_arguments_are_a_usage_error() {
    let out = Command::new(BIN).arg("--frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: cvm-init"));
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cvm-init "));
}
