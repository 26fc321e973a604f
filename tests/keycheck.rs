//! The key check against real Garage and rclone: a wrong crypt key is refused
//! before anything is written, in both layouts.

mod common;

use std::time::Duration;

use common::{
    obscure, raw_state, rclone, script, stock_config, wait_until, Appliance, Dirs, Garage, PASSWORD,
};

const T: Duration = Duration::from_secs(40);

fn boot(
    g: &Garage,
    tmp: &std::path::Path,
    name: &str,
    password: &str,
    layout: &str,
    gateway: &str,
) -> Appliance {
    let dirs = Dirs::new(tmp, name);
    let mut env = g.s3_env();
    env.extend(dirs.env());
    for (k, v) in [
        ("RCLONE_CRYPT_PASSWORD", password),
        ("CVM_STORAGE", layout),
        ("CVM_GATEWAY_CMD", gateway),
    ] {
        env.push((k.into(), v.into()));
    }
    Appliance::start(&dirs, &env)
}

fn wrong_key_is_refused(layout: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start(tmp.path());
    let gw = script(
        tmp.path(),
        "gw.sh",
        "echo data > \"$OPENCLAW_STATE_DIR/notes.md\"; exec sleep 100000",
    );
    let mut app = boot(
        &g,
        tmp.path(),
        "right",
        PASSWORD,
        layout,
        gw.to_str().unwrap(),
    );
    app.wait_ready(T);
    assert!(
        app.log_text().contains("outcome=FirstUse"),
        "{}",
        app.log_text()
    );
    wait_until(T, "the gateway's write", || {
        app.log_text().contains("gateway started")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    // The marker is readable with the right key, by stock rclone too.
    let conf = stock_config(&g, tmp.path());
    assert_eq!(
        String::from_utf8(rclone(&conf, &["cat", "crypt:.cvm/key-check"])).unwrap(),
        "cvm-init key check v1\n"
    );

    let before = raw_state(&g, tmp.path());
    let wrong = obscure("not the password");
    let started = tmp.path().join("started");
    let gw2 = script(
        tmp.path(),
        "gw2.sh",
        &format!("touch {}; exec sleep 100000", started.display()),
    );
    let mut app = boot(
        &g,
        tmp.path(),
        "wrong",
        &wrong,
        layout,
        gw2.to_str().unwrap(),
    );
    assert_eq!(app.wait_exit(T), 77, "{}", app.log_text());
    let log = app.log_text();
    assert!(log.contains("does not match the data"), "{log}");
    assert!(!log.contains(&wrong), "the password is never logged");
    assert!(!started.exists(), "the gateway never started");
    assert_eq!(
        raw_state(&g, tmp.path()),
        before,
        "the bucket is byte-identical"
    );

    // The right key still works afterwards.
    let mut app = boot(
        &g,
        tmp.path(),
        "again",
        PASSWORD,
        layout,
        gw.to_str().unwrap(),
    );
    app.wait_ready(T);
    assert!(
        app.log_text().contains("outcome=Matched"),
        "{}",
        app.log_text()
    );
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_wrong_key_is_refused_in_the_replicate_layout() {
    wrong_key_is_refused("replicate");
}

#[test]
fn a_wrong_key_is_refused_in_the_mount_layout() {
    wrong_key_is_refused("mount");
}

#[test]
fn data_written_before_the_marker_is_adopted_with_the_right_key() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start(tmp.path());
    // As the shell entrypoint left it: data through the crypt remote, no marker.
    let conf = stock_config(&g, tmp.path());
    let f = tmp.path().join("openclaw.json");
    std::fs::write(&f, "{}").unwrap();
    rclone(
        &conf,
        &["copyto", f.to_str().unwrap(), "crypt:openclaw.json"],
    );
    let mut app = boot(&g, tmp.path(), "a", PASSWORD, "replicate", "sleep 100000");
    app.wait_ready(T);
    assert!(
        app.log_text().contains("outcome=Adopted"),
        "{}",
        app.log_text()
    );
    assert_eq!(app.stop(T), 0);
    assert_eq!(
        String::from_utf8(rclone(&conf, &["cat", "crypt:.cvm/key-check"])).unwrap(),
        "cvm-init key check v1\n"
    );
}

#[test]
fn a_wrong_key_is_refused_when_chance_decrypts_some_names() {
    // A wrong key decrypts about one name in 256 (valid PKCS#7 padding by
    // chance): with 300 names at the top and no marker, some almost surely
    // "decrypt", and the key must still be refused.
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start(tmp.path());
    let conf = stock_config(&g, tmp.path());
    let src = tmp.path().join("legacy");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..300 {
        std::fs::write(src.join(format!("file-{i}.json")), format!("{{\"n\":{i}}}")).unwrap();
    }
    rclone(&conf, &["copy", src.to_str().unwrap(), "crypt:"]);
    let before = raw_state(&g, tmp.path());
    for (i, layout) in ["replicate", "mount"].iter().enumerate() {
        let wrong = obscure(&format!("wrong password {i}"));
        let mut app = boot(
            &g,
            tmp.path(),
            &format!("w{i}"),
            &wrong,
            layout,
            "sleep 100000",
        );
        assert_eq!(app.wait_exit(T), 77, "{}", app.log_text());
        assert_eq!(
            raw_state(&g, tmp.path()),
            before,
            "the bucket is byte-identical"
        );
    }
    let mut app = boot(
        &g,
        tmp.path(),
        "right",
        PASSWORD,
        "replicate",
        "sleep 100000",
    );
    app.wait_ready(T);
    assert!(
        app.log_text().contains("outcome=Adopted"),
        "{}",
        app.log_text()
    );
    assert_eq!(app.stop(T), 0);
}
