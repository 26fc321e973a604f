//! `cvm-init check` against real Garage, rclone and FUSE: one line per
//! check, the appliance's exit code for the first problem, nothing written.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{obscure, raw_state, Appliance, Dirs, Garage, BIN, PASSWORD};

const T: Duration = Duration::from_secs(40);

/// Runs `cvm-init check` with `env` (through `wrapper` if given); returns
/// (exit code, stdout).
fn check(env: &[(String, String)], wrapper: &[&str]) -> (i32, String) {
    let mut cmd = match wrapper {
        [] => Command::new(BIN),
        [program, args @ ..] => {
            let mut c = Command::new(program);
            c.args(args).arg(BIN);
            c
        }
    };
    let out = cmd
        .arg("check")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap(), stdout)
}

fn env(g: &Garage, dirs: &Dirs, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = g.s3_env();
    e.extend(dirs.env());
    e.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    for (k, v) in extra {
        e.retain(|(name, _)| name != k);
        e.push(((*k).into(), (*v).into()));
    }
    e
}

fn nothing_local(dirs: &Dirs) {
    for d in [&dirs.state, &dirs.local, &dirs.run] {
        assert!(!d.exists(), "check created {}", d.display());
    }
}

fn line<'a>(out: &'a str, what: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(&format!("{what}:")))
        .unwrap_or_else(|| panic!("no {what} line in:\n{out}"))
}

#[test]
fn a_good_setup_passes_every_check_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start(tmp.path());
    let dirs = Dirs::new(tmp.path(), "c");
    for layout in ["replicate", "mount"] {
        let (code, out) = check(&env(&g, &dirs, &[("CVM_STORAGE", layout)]), &[]);
        assert_eq!(code, 0, "{out}");
        assert!(line(&out, "config").starts_with("ok"), "{out}");
        assert!(line(&out, "fuse").starts_with("ok"), "{out}");
        assert!(line(&out, "s3").starts_with("ok"), "{out}");
        assert!(
            line(&out, "key").contains("the bucket prefix is empty; the first boot writes"),
            "{out}"
        );
    }
    nothing_local(&dirs);
    assert_eq!(
        raw_state(&g, tmp.path()),
        "",
        "nothing written to the bucket"
    );

    // After a boot wrote the marker, the key check reads it.
    let boot = Dirs::new(tmp.path(), "boot");
    let mut app = Appliance::start(
        &boot,
        &env(&g, &boot, &[("CVM_GATEWAY_CMD", "sleep 100000")]),
    );
    app.wait_ready(T);
    assert_eq!(app.stop(T), 0);
    let before = raw_state(&g, tmp.path());
    let (code, out) = check(&env(&g, &dirs, &[]), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        line(&out, "key").contains("the key marker decrypts"),
        "{out}"
    );
    assert_eq!(raw_state(&g, tmp.path()), before);
    nothing_local(&dirs);
    // Its temporary config dir (named after its pid) is gone.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("cvm-init-check-")?
                .split('-')
                .next()?
                .to_owned();
            (!Path::new("/proc").join(pid).exists()).then_some(name)
        })
        .collect();
    assert!(left.is_empty(), "temporary configs left behind: {left:?}");
}

type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, i32, &'a str);

#[test]
fn each_problem_gets_its_line_and_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start(tmp.path());
    let boot = Dirs::new(tmp.path(), "boot");
    let mut app = Appliance::start(
        &boot,
        &env(&g, &boot, &[("CVM_GATEWAY_CMD", "sleep 100000")]),
    );
    app.wait_ready(T);
    assert_eq!(app.stop(T), 0);
    let before = raw_state(&g, tmp.path());
    let dirs = Dirs::new(tmp.path(), "c");
    let wrong = obscure("not the password");
    let bad_secret = "0".repeat(64);
    // (environment changes, the check that fails, exit code, what its line says)
    let cases: [Case; 5] = [
        (
            &[("RCLONE_CRYPT_PASSWORD", &wrong)],
            "key",
            77,
            "does not match the data",
        ),
        (
            &[("S3_BUCKET", "no-such-bucket")],
            "s3",
            76,
            "bucket no-such-bucket does not exist",
        ),
        (
            &[("AWS_SECRET_ACCESS_KEY", &bad_secret)],
            "s3",
            76,
            "rejected the credentials",
        ),
        (
            &[("S3_ENDPOINT", "http://127.0.0.1:1")],
            "s3",
            69,
            "is unreachable",
        ),
        (&[("CVM_STORAGE", "sideways")], "config", 78, "CVM_STORAGE"),
    ];
    for (extra, what, want, says) in cases {
        let (code, out) = check(&env(&g, &dirs, extra), &[]);
        assert_eq!(code, want, "{extra:?}: {out}");
        let l = line(&out, what);
        assert!(
            l.starts_with("PROBLEM") && l.contains(says),
            "{extra:?}: {out}"
        );
        for secret in [wrong.as_str(), &bad_secret, &g.secret, PASSWORD] {
            assert!(!out.contains(secret), "a secret in the report");
        }
    }
    // No FUSE: /dev/null where /dev/fuse should be, in a private mount namespace.
    let (code, out) = check(
        &env(&g, &dirs, &[("CVM_STORAGE", "mount")]),
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind /dev/null /dev/fuse && exec \"$0\" \"$@\"",
        ],
    );
    assert_eq!(code, 71, "{out}");
    assert!(
        line(&out, "fuse").starts_with("PROBLEM")
            && line(&out, "fuse").contains("not the FUSE character device"),
        "{out}"
    );
    assert!(
        line(&out, "s3").starts_with("ok"),
        "the other checks still run: {out}"
    );
    nothing_local(&dirs);
    assert_eq!(
        raw_state(&g, tmp.path()),
        before,
        "the bucket is byte-identical"
    );
}
