//! PID-1 duties, proved in fresh namespaces: cvm-init as the real PID 1 of a
//! PID namespace, with /proc missing, and with /dev/fuse absent or unusable.

mod common;

use std::fs;
use std::time::Duration;

use common::{script, wait_until, Appliance, Dirs, Garage, Signal, PASSWORD};
use nix::sys::signal::kill;
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(30);

/// A new PID and mount namespace; the mount changes in `setup` happen only
/// inside it, then cvm-init is exec'd as PID 1.
fn in_namespaces(setup: &str) -> Vec<String> {
    vec![
        "unshare".into(),
        "--pid".into(),
        "--fork".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        format!("{setup}\nexec \"$0\""),
    ]
}

fn start(dirs: &Dirs, env: &[(String, String)], setup: &str) -> Appliance {
    let wrapper = in_namespaces(setup);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    Appliance::start_wrapped(dirs, env, &wrapper)
}

fn local_env(dirs: &Dirs, gw: &str) -> Vec<(String, String)> {
    let mut e = dirs.env();
    e.push(("CVM_GATEWAY_CMD".into(), gw.into()));
    e
}

#[test]
fn as_pid_1_without_proc_it_mounts_proc_reaps_and_obeys_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    // The gateway reports its view of PID 1 and leaves orphans behind.
    let gw = script(
        tmp.path(),
        "gw.sh",
        &format!(
            r#"cat /proc/1/comm > {out}/pid1
sh -c 'sleep 0.1 & sleep 0.1 &'
touch {out}/ready
exec sleep 100000"#,
            out = out.display()
        ),
    );
    let dirs = Dirs::new(tmp.path(), "box");
    let mut app = start(
        &dirs,
        &local_env(&dirs, gw.to_str().unwrap()),
        "umount -l /proc",
    );
    app.wait_ready(T);
    wait_until(T, "the gateway", || out.join("ready").exists());
    assert_eq!(
        fs::read_to_string(out.join("pid1")).unwrap().trim(),
        "cvm-init"
    );
    let log = app.log_text();
    assert!(log.contains("mounted /proc"), "{log}");
    assert!(
        !log.contains("child subreaper"),
        "PID 1 needs no subreaper:\n{log}"
    );
    wait_until(T, "orphans reaped", || {
        app.log_text().matches("reaped orphan").count() >= 2
    });
    // PID 1 of a namespace ignores signals it has no handler for; SIGTERM has one.
    kill(Pid::from_raw(app.init_pid()), Signal::SIGTERM).unwrap();
    assert_eq!(app.wait_exit(T), 0, "{}", app.log_text());
    assert!(app.log_text().contains("shutdown: done"));
}

#[test]
fn s3_mode_without_a_usable_fuse_device_exits_71_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = Dirs::new(tmp.path(), "box");
    let mut env = local_env(&dirs, "true");
    env.extend([
        ("S3_BUCKET".into(), "bkt".into()),
        ("S3_ENDPOINT".into(), "http://127.0.0.1:1".into()),
        ("AWS_ACCESS_KEY_ID".into(), "GKx".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "y".into()),
        ("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()),
        ("CVM_STORAGE".into(), "mount".into()),
    ]);
    // A /dev where device nodes may be created but not opened, as in a
    // container without `--device /dev/fuse`.
    let mut app = start(&dirs, &env, "mount -t tmpfs -o nodev tmpfs /dev");
    assert_eq!(app.wait_exit(T), 71, "{}", app.log_text());
    let log = app.log_text();
    assert!(
        log.contains("FUSE is not available: cannot open /dev/fuse"),
        "{log}"
    );
    assert!(
        log.contains("--device /dev/fuse --cap-add SYS_ADMIN` or `--privileged`"),
        "{log}"
    );
    assert!(
        !dirs.run.exists() && !dirs.state.exists(),
        "nothing may be set up without FUSE"
    );
}

#[test]
fn a_missing_fuse_device_is_created_when_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start(tmp.path());
    let dirs = Dirs::new(tmp.path(), "box");
    let mut env = g.s3_env();
    env.extend(local_env(&dirs, "sleep 100000"));
    env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    env.push(("CVM_STORAGE".into(), "mount".into()));
    let mut app = start(
        &dirs,
        &env,
        "mount -t tmpfs tmpfs /dev && mknod -m 666 /dev/null c 1 3",
    );
    app.wait_ready(T);
    assert!(
        app.log_text().contains("created the FUSE device node"),
        "{}",
        app.log_text()
    );
    kill(Pid::from_raw(app.init_pid()), Signal::SIGTERM).unwrap();
    assert_eq!(app.wait_exit(T), 0, "{}", app.log_text());
}
