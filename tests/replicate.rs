//! The replicate layout (the default), against real Garage and rclone: the
//! state dir on local disk, replicated through the crypt remote.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::load::now;
use common::replica::{remote_size, uploaded, write, Setup};
use common::{rclone, stock_config, wait_until, Appliance, Dirs, PASSWORD};

const T: Duration = Duration::from_secs(40);

/// Path → (content, mode, mtime in µs) for files; path → mode for dirs.
fn snapshot(root: &Path) -> BTreeMap<String, (Vec<u8>, u32, i64)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Vec<u8>, u32, i64)>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let m = p.symlink_metadata().unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if m.is_dir() {
                out.insert(format!("{rel}/"), (vec![], m.mode() & 0o7777, 0));
                walk(root, &p, out);
            } else {
                let mtime = m.mtime() * 1_000_000 + m.mtime_nsec() / 1000;
                out.insert(rel, (fs::read(&p).unwrap(), m.mode() & 0o7777, mtime));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn changes_replicate_and_a_new_container_gets_the_same_tree() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    assert!(
        app.log_text().contains("replicate layout"),
        "{}",
        app.log_text()
    );
    let st = &a.state;
    // Phase 1: a tree with nested dirs, a private dir, empty and hard-linked files.
    write(st, "openclaw.json", "{\"v\":1}");
    write(st, "agents/main/agent/auth.json", "secret-ish");
    fs::set_permissions(
        st.join("agents/main/agent/auth.json"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::set_permissions(
        st.join("agents/main/agent"),
        fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    write(st, "workspace/notes/a.md", "note a");
    write(st, "workspace/notes/gone.md", "to be deleted");
    write(st, "workspace/old-name.md", "renamed later");
    write(st, "empty", "");
    fs::hard_link(
        st.join("workspace/notes/a.md"),
        st.join("workspace/hardlink.md"),
    )
    .unwrap();
    write(st, "tmp/openclaw-0/x.lock", "excluded");
    write(st, "cache/blob", "excluded");
    wait_until(T, "phase 1 on S3", || uploaded(&app) >= 7);

    // Phase 2: modify, append, rename, delete; then stop at once.
    write(st, "openclaw.json", "{\"v\":2}");
    fs::OpenOptions::new()
        .append(true)
        .open(st.join("workspace/notes/a.md"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b" + more"))
        .unwrap();
    fs::rename(
        st.join("workspace/old-name.md"),
        st.join("workspace/new-name.md"),
    )
    .unwrap();
    fs::remove_file(st.join("workspace/notes/gone.md")).unwrap();
    let before = snapshot(st);
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    assert!(
        app.log_text().contains("replicate: final pass"),
        "{}",
        app.log_text()
    );

    let remote = s.remote("");
    for excluded in ["tmp/", "cache/"] {
        assert!(
            !remote.iter().any(|r| r.starts_with(excluded)),
            "{excluded} must not be replicated: {remote:?}"
        );
    }
    // Deleted and overwritten files are kept in the history, not restored.
    let hist = s.remote(".cvm/hist");
    for kept in [
        "workspace/notes/gone.md",
        "workspace/old-name.md",
        "openclaw.json",
    ] {
        assert!(
            hist.iter().any(|t| t.starts_with(&format!("{kept}/"))),
            "{kept} not in the history: {hist:?}"
        );
    }

    let (mut app, b) = s.boot("b", &[]);
    let mut after = snapshot(&b.state);
    let mut expected = before;
    for local_only in [
        ".cvm/",
        ".cvm/replica",
        "tmp/",
        "tmp/openclaw-0/",
        "tmp/openclaw-0/x.lock",
        "cache/",
        "cache/blob",
    ] {
        expected.remove(local_only);
        after.remove(local_only);
    }
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (k, v) in &expected {
        assert_eq!(&after[k], v, "{k} differs (content, mode, mtime)");
    }
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

#[test]
fn a_crash_loses_at_most_the_debounce_plus_one_upload() {
    let s = Setup::new();
    let mut seed = (now() * 1e6) as u64 | 1;
    let bound = 3.0;
    let mut lost_worst: f64 = 0.0;
    for round in 0..4 {
        let (mut app, d) = s.boot(&format!("r{round}"), &[]);
        // A file a tenth of a second, each named by the time it was written.
        let end = Instant::now() + Duration::from_millis(1500 + (seed >> 33) % 2000);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut written = Vec::new();
        while Instant::now() < end {
            let t = now();
            write(&d.state, &format!("log/{round}-{t:.3}"), "x");
            written.push(t);
            std::thread::sleep(Duration::from_millis(100));
        }
        let killed_at = now();
        app.kill_all();
        let (mut check, c) = s.boot(&format!("r{round}-check"), &[]);
        for t in &written {
            let present = c.state.join(format!("log/{round}-{t:.3}")).exists();
            if !present {
                lost_worst = lost_worst.max(killed_at - t);
            }
            assert!(
                present || killed_at - t <= bound,
                "round {round}: a file written {:.2}s before the kill is lost",
                killed_at - t
            );
        }
        assert_eq!(check.stop(T), 0);
    }
    eprintln!("replicate crash: worst file loss {lost_worst:.2}s before the kill (bound {bound}s)");
}

#[test]
fn an_interrupted_restore_is_started_over() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    write(&a.state, "keep.txt", "from S3");
    wait_until(T, "the upload", || uploaded(&app) >= 1);
    assert_eq!(app.stop(T), 0);

    // A new volume holds only lost+found: it is restored into, not kept.
    let v = Dirs::new(s.tmp.path(), "volume");
    fs::create_dir_all(v.state.join("lost+found")).unwrap();
    let mut app = s.start(&v, &[]);
    app.wait_ready(T);
    assert_eq!(
        fs::read_to_string(v.state.join("keep.txt")).unwrap(),
        "from S3"
    );
    assert_eq!(app.stop(T), 0);

    // A container whose restore died half-way: a marker and a partial tree.
    let b = Dirs::new(s.tmp.path(), "b");
    write(&b.state, "partial.txt", "half-restored junk");
    fs::create_dir_all(&b.local).unwrap();
    fs::write(b.local.join("restore-incomplete"), "").unwrap();
    let mut app = s.start(&b, &[]);
    app.wait_ready(T);
    assert!(
        app.log_text()
            .contains("an earlier restore was interrupted"),
        "{}",
        app.log_text()
    );
    assert!(!b.state.join("partial.txt").exists());
    assert_eq!(
        fs::read_to_string(b.state.join("keep.txt")).unwrap(),
        "from S3"
    );
    assert!(!b.local.join("restore-incomplete").exists());
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_wiped_state_dir_does_not_wipe_the_bucket() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[("CVM_BACKUP_INTERVAL", "1s")]);
    for i in 0..30 {
        write(&a.state, &format!("files/{i}.txt"), "data");
    }
    wait_until(T, "30 uploads", || uploaded(&app) >= 30);
    for e in fs::read_dir(a.state.join("files")).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    wait_until(T, "the refusal", || {
        app.log_text()
            .contains("refusing to delete more than half of the remote tree")
    });
    assert_eq!(s.remote("files").len(), 30, "nothing deleted on S3");
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_killed_rclone_rcd_is_restarted_and_the_gateway_keeps_running() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    write(&a.state, "before.txt", "1");
    wait_until(T, "the first upload", || uploaded(&app) >= 1);
    let rcd = common::descendant_with(&app, "rcd");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(rcd), common::Signal::SIGKILL).unwrap();
    wait_until(T, "the restart", || {
        app.log_text().contains("storage recovered")
    });
    let log = app.log_text();
    assert!(
        log.contains("rclone exited unexpectedly (signal SIGKILL); restarting it"),
        "{log}"
    );
    write(&a.state, "after.txt", "2");
    wait_until(T, "the upload after the restart", || {
        s.remote("").contains(&"after.txt".to_owned())
    });
    assert_eq!(
        app.log_text().matches("gateway started").count(),
        1,
        "the gateway was never stopped"
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

#[test]
fn replicate_needs_no_fuse_and_keeps_a_restarted_containers_local_state() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    assert!(!app.log_text().contains("FUSE"));
    write(&a.state, "one.txt", "1");
    assert_eq!(app.stop(T), 0);
    // The same container restarts: its local state is newer than S3 and kept.
    write(
        &a.state,
        "offline-edit.txt",
        "written while cvm-init was down",
    );
    restart_keeps_its_state(&s, &a, "offline-edit.txt");
}

/// A restart of the container with `dirs` keeps its state dir and uploads
/// `written` (written while cvm-init was down).
fn restart_keeps_its_state(s: &Setup, dirs: &Dirs, written: &str) {
    let mut app = s.start(dirs, &[]);
    app.wait_ready(T);
    assert!(
        app.log_text().contains("keeping the local state dir"),
        "{}",
        app.log_text()
    );
    wait_until(T, "the file written while down on S3", || {
        s.remote("").contains(&written.to_owned())
    });
    assert_eq!(app.stop(T), 0);
}

#[test]
fn idle_costs_no_s3_request_and_a_busy_file_is_uploaded_once_per_debounce() {
    let s = Setup::new();
    // The default lease (`common::LEASE_TTL`, paused while idle).
    let (mut app, a) = s.boot("a", &[("CVM_BACKUP_INTERVAL", "1s")]);
    // Twenty writes within 400 ms: one debounce window, one upload.
    for i in 0..20 {
        write(&a.state, "busy.json", &format!("{{\"n\":{i}}}"));
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_until(T, "the upload", || uploaded(&app) >= 1);
    let settle = Instant::now() + Duration::from_secs(2);
    wait_until(T, "the debounce window to pass", || {
        Instant::now() >= settle
    });
    assert_eq!(uploaded(&app), 1, "{}", app.log_text());
    assert!(s.g.s3_requests().get("PutObject").copied().unwrap_or(0) > 0);

    // Idle over four full scans (CVM_BACKUP_INTERVAL=1s) and more than a
    // lease TTL once renewals have paused: no S3 request at all.
    wait_until(T, "the lease's renewals to pause", || {
        app.log_text().contains("lease: idle, renewals paused")
    });
    let before = s.g.s3_requests();
    let until = Instant::now() + Duration::from_secs(4);
    wait_until(T, "the idle window", || Instant::now() >= until);
    assert_eq!(s.g.s3_requests(), before, "S3 requests while idle");

    // The next change goes up: the lease is verified and renewed first.
    let written = Instant::now();
    write(&a.state, "after-idle.json", "{}");
    wait_until(T, "the file written after the idle spell", || {
        s.remote("").contains(&"after-idle.json".to_owned())
    });
    eprintln!(
        "first change after the idle spell on S3 after {:?}",
        written.elapsed()
    );
    assert!(
        app.log_text().contains("lease: verified again and renewed"),
        "{}",
        app.log_text()
    );
    assert_eq!(app.stop(T), 0);
}

#[test]
fn trash_older_than_cvm_history_days_is_purged_at_boot() {
    let s = Setup::new();
    let conf = stock_config(&s.g, s.tmp.path());
    let f = s.tmp.path().join("old");
    fs::write(&f, "old version").unwrap();
    rclone(
        &conf,
        &[
            "copyto",
            f.to_str().unwrap(),
            "crypt:.cvm-trash/2001-01-01/notes.md",
        ],
    );
    let today = format!(
        "crypt:.cvm-trash/{}/recent.md",
        cvm_init::remote::bucket::trash_day(std::time::SystemTime::now())
    );
    rclone(&conf, &["copyto", f.to_str().unwrap(), &today]);
    let (mut app, _) = s.boot("a", &[("CVM_HISTORY_DAYS", "7")]);
    wait_until(T, "the purge", || {
        app.log_text()
            .contains("trash: purged a day older than CVM_HISTORY_DAYS")
    });
    let trash = s.remote(".cvm-trash");
    assert!(
        !trash.iter().any(|t| t.starts_with("2001-01-01")),
        "{trash:?}"
    );
    assert!(trash.iter().any(|t| t.ends_with("recent.md")), "{trash:?}");
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_bucket_written_in_the_mount_layout_boots_in_the_replicate_layout() {
    let s = Setup::new();
    // The mount layout leaves a link (stored as .rclonelink) where its database was.
    let py = s.tmp.path().join("db.py");
    fs::write(
        &py,
        "import os, sqlite3, time\n\
         d = os.path.join(os.environ['OPENCLAW_STATE_DIR'], 'state')\n\
         os.makedirs(d, exist_ok=True)\n\
         c = sqlite3.connect(os.path.join(d, 'openclaw.sqlite'))\n\
         c.execute('create table if not exists t(a)')\n\
         c.execute('insert into t values (42)')\n\
         c.commit()\n\
         time.sleep(3600)\n",
    )
    .unwrap();
    let cmd = format!("python3 {}", py.display());
    let (mut app, _) = s.boot("m", &[("CVM_STORAGE", "mount"), ("CVM_GATEWAY_CMD", &cmd)]);
    wait_until(T, "the database moved and saved", || {
        let log = app.log_text();
        log.contains("moved a database off the mount") && log.contains("sqlite: snapshot uploaded")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    assert!(
        s.remote("state").iter().any(|r| r.ends_with(".rclonelink")),
        "{:?}",
        s.remote("state")
    );

    let (mut app, r) = s.boot("r", &[]);
    let db = r.state.join("state/openclaw.sqlite");
    assert!(
        db.symlink_metadata().unwrap().is_file(),
        "the database is a file, not the old link"
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .unwrap();
    assert!(rows >= 1);
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

/// Path → (type and mode, uid, gid, content or link target) of everything below `root`.
fn entries(root: &Path) -> BTreeMap<String, (u32, u32, u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, u32, u32, Vec<u8>)>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let m = p.symlink_metadata().unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let content = if m.is_dir() {
                walk(root, &p, out);
                vec![]
            } else if m.file_type().is_symlink() {
                fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                fs::read(&p).unwrap()
            };
            out.insert(rel, (m.mode(), m.uid(), m.gid(), content));
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn trees_uploaded(app: &Appliance) -> usize {
    app.log_text().matches("replicate: tree uploaded").count()
}

#[test]
fn symlinks_modes_owners_and_empty_dirs_come_back_after_a_stop_and_a_crash() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    let st = &a.state;
    write(st, "target.txt", "pointed at");
    write(st, "secret", "s");
    write(st, "run.sh", "#!/bin/sh\ntrue\n");
    write(st, "owned/file", "someone else's");
    fs::create_dir_all(st.join("empty/deeper")).unwrap();
    fs::create_dir_all(st.join("private")).unwrap();
    fs::set_permissions(st.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(st.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(st.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(st.join("owned"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::chown(st.join("owned/file"), Some(1234), Some(5678)).unwrap();
    // What the gateway makes on its first agent turn: absolute links into
    // its install dir; and the other shapes a link can have.
    std::os::unix::fs::symlink("/usr/lib/os-release", st.join("absolute")).unwrap();
    std::os::unix::fs::symlink("target.txt", st.join("relative")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/skill", st.join("dangling")).unwrap();
    std::os::unix::fs::symlink("..", st.join("private/up")).unwrap();
    std::os::unix::fs::symlink("empty", st.join("to-a-dir")).unwrap();
    std::os::unix::fs::lchown(st.join("relative"), Some(1234), Some(5678)).unwrap();
    wait_until(T, "the first upload of the tree", || {
        trees_uploaded(&app) >= 1
    });
    // A mode-only change after the upload: replicated without its content.
    fs::set_permissions(st.join("secret"), fs::Permissions::from_mode(0o640)).unwrap();
    let want = entries(st);
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    let (mut app, b) = s.boot("b", &[]);
    assert_eq!(entries(&b.state), want, "after a graceful stop");
    assert!(
        !app.log_text().contains("could not be set"),
        "{}",
        app.log_text()
    );

    // The crash variant: a new link and a chmod, SIGKILL once they are on S3.
    let n = trees_uploaded(&app);
    std::os::unix::fs::symlink("secret", b.state.join("private/new-link")).unwrap();
    fs::set_permissions(b.state.join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    wait_until(T, "the tree with the new link", || trees_uploaded(&app) > n);
    let want = entries(&b.state);
    app.kill_all();
    let (mut app, c) = s.boot("c", &[]);
    assert_eq!(entries(&c.state), want, "after a crash");
    assert_eq!(app.stop(T), 0);
}

/// Unmounts a test's tmpfs even when the test fails.
struct TmpfsGuard(std::path::PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        common::unmount_below(&self.0);
    }
}

#[test]
fn a_restore_that_cannot_succeed_exits_65_naming_the_file_and_changes_nothing_on_s3() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    write(&a.state, "small.txt", "fits");
    fs::write(a.state.join("big.bin"), vec![7u8; 3 << 20]).unwrap();
    wait_until(T, "the uploads", || uploaded(&app) >= 2);
    assert_eq!(app.stop(T), 0);
    let bucket = common::raw_state(&s.g, s.tmp.path());

    // A new container whose state volume is too small for what S3 holds.
    let v = Dirs::new(s.tmp.path(), "small-volume");
    fs::create_dir_all(&v.state).unwrap();
    let _guard = TmpfsGuard(v.state.clone());
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&v.state)
        .status()
        .unwrap();
    assert!(ok.success(), "mount a 1 MiB tmpfs");
    let mut app = s.start(&v, &[]);
    assert_eq!(app.wait_exit(T), 65, "{}", app.log_text());
    let log = app.log_text();
    assert!(log.contains("big.bin"), "the file is named:\n{log}");
    // rclone preallocates, so it names the shortage before writing.
    assert!(
        log.contains("too big for remaining disk space") || log.contains("no space left on device"),
        "the cause is named:\n{log}"
    );
    assert!(
        log.contains("would fail the same way on every boot"),
        "{log}"
    );
    assert!(!log.contains("gateway started"), "{log}");
    assert_eq!(
        common::raw_state(&s.g, s.tmp.path()),
        bucket,
        "nothing on S3 changed"
    );
}

#[test]
fn a_file_appended_faster_than_it_uploads_is_always_on_s3_and_reaches_it() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    let path = a.state.join("agents/main/sessions/session.jsonl");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, vec![b'x'; 20 << 20]).unwrap();
    wait_until(T, "the first upload", || {
        remote_size(&s, "agents/main/sessions/session.jsonl").is_some()
    });
    // Append every 50 ms while watching the live tree on S3: the file is
    // never missing there, and newer versions keep arriving.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                std::io::Write::write_all(&mut f, format!("{{\"line\":{n}}}\n").as_bytes())
                    .unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Until two newer versions have arrived (a loaded machine takes seconds
    // per 20 MB version), the file is never missing from the live tree.
    let deadline = Instant::now() + T;
    let mut seen: Vec<u64> = Vec::new();
    while seen.iter().filter(|&&z| z > 20 << 20).count() < 2 {
        assert!(
            Instant::now() < deadline,
            "appended versions reach S3 within {T:?}: {seen:?}"
        );
        let size = remote_size(&s, "agents/main/sessions/session.jsonl");
        assert!(
            size.is_some(),
            "session.jsonl vanished from the live tree on S3"
        );
        if seen.last() != size.as_ref() {
            seen.push(size.unwrap());
        }
    }
    app.kill_all();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let local = fs::read(&path).unwrap();

    let (mut app, b) = s.boot("b", &[]);
    let got = fs::read(b.state.join("agents/main/sessions/session.jsonl")).unwrap();
    assert!(
        local.starts_with(&got),
        "the restored file is an earlier whole version"
    );
    let newest_seen = *seen.iter().max().unwrap();
    assert!(
        got.len() as u64 >= newest_seen,
        "the crash lost a version S3 already had: {} < {newest_seen}",
        got.len()
    );
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_file_replaced_by_rename_is_never_missing_after_a_crash() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    let old = vec![1u8; 50 << 20];
    fs::write(a.state.join("model.bin"), &old).unwrap();
    wait_until(T, "the upload", || uploaded(&app) >= 1);
    // The new version is written beside it and renamed over it, then
    // everything dies while (or before) it uploads.
    let new = vec![2u8; 60 << 20];
    fs::write(a.state.join("model.bin.tmp"), &new).unwrap();
    fs::rename(a.state.join("model.bin.tmp"), a.state.join("model.bin")).unwrap();
    wait_until(T, "the pass with the new version", || {
        app.log_text().contains("replicate: pass uploaded=0")
            || app.log_text().matches("replicate: pass").count() >= 2
            || remote_size(&s, "model.bin") == Some(60 << 20)
    });
    app.kill_all();
    let (mut app, b) = s.boot("b", &[]);
    let got = fs::read(b.state.join("model.bin")).unwrap();
    assert!(
        got == old || got == new,
        "model.bin is a whole version ({} bytes)",
        got.len()
    );
    assert_eq!(app.stop(T), 0);
}

/// cvm-init without `CAP_DAC_OVERRIDE` / `CAP_DAC_READ_SEARCH`, as in a
/// container that drops them: mode bits bind it like any user.
const NO_DAC: &[&str] = &[
    "setpriv",
    "--bounding-set",
    "-dac_override,-dac_read_search",
    "--",
];

#[test]
fn a_file_that_keeps_failing_is_named_and_never_delays_the_others() {
    let s = Setup::new();
    let dirs = Dirs::new(s.tmp.path(), "a");
    let mut env = s.g.s3_env();
    env.extend(dirs.env());
    env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    env.push(("CVM_GATEWAY_CMD".into(), s.idle.clone()));
    let mut app = Appliance::start_wrapped(&dirs, &env, NO_DAC);
    app.wait_ready(T);
    write(
        &dirs.state,
        "locked.bin",
        "cannot be read without CAP_DAC_OVERRIDE",
    );
    fs::set_permissions(
        dirs.state.join("locked.bin"),
        fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    wait_until(T, "the first failure of locked.bin", || {
        app.log_text().contains("this file failed")
    });
    // Later files still go up within the debounce and one upload.
    for i in 0..5 {
        let t = Instant::now();
        write(&dirs.state, &format!("good-{i}.txt"), "fine");
        wait_until(T, "a later file on S3", || {
            remote_size(&s, &format!("good-{i}.txt")).is_some()
        });
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "good-{i} took {:?}",
            t.elapsed()
        );
    }
    let log = app.log_text();
    assert!(
        log.contains("locked.bin") && log.contains("ermission denied"),
        "{log}"
    );
    // Reported once the backlog is older than the health threshold (10 s).
    wait_until(T, "STATUS naming the failing file", || {
        app.notified()
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("locked.bin"))
    });
    // The stop says what is not on S3.
    assert_eq!(app.stop(T), 74, "{}", app.log_text());
    assert!(
        app.log_text()
            .contains("files not replicated to S3: locked.bin"),
        "{}",
        app.log_text()
    );
    // A new container gets every other file; locked.bin was never readable.
    let (mut app, b) = s.boot("b", &[]);
    for i in 0..5 {
        assert_eq!(
            fs::read_to_string(b.state.join(format!("good-{i}.txt"))).unwrap(),
            "fine"
        );
    }
    assert!(!b.state.join("locked.bin").exists());
    assert_eq!(app.stop(T), 0);
}

#[test]
fn an_unreadable_directory_is_not_taken_for_empty() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    for i in 0..30 {
        write(&a.state, &format!("private/{i}"), "kept");
    }
    for i in 0..40 {
        write(&a.state, &format!("other/{i}"), "x");
    }
    wait_until(T, "the uploads", || uploaded(&app) >= 70);
    fs::set_permissions(a.state.join("private"), fs::Permissions::from_mode(0o000)).unwrap();
    assert_eq!(app.stop(T), 0);

    // The same state dir, now run without the capability that reads it.
    let mut env = s.g.s3_env();
    env.extend(a.env());
    env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    env.push(("CVM_GATEWAY_CMD".into(), s.idle.clone()));
    let mut app = Appliance::start_wrapped(&a, &env, NO_DAC);
    app.wait_ready(T);
    write(&a.state, "other/new", "y");
    wait_until(T, "the new file on S3", || {
        remote_size(&s, "other/new").is_some()
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    assert!(
        app.log_text().contains("cannot read this directory"),
        "{}",
        app.log_text()
    );
    assert_eq!(
        s.remote("private").len(),
        30,
        "nothing below it was deleted on S3"
    );
    // A new container (with the capability) gets all of it, mode 000 included.
    let (mut app, b) = s.boot("b", &[]);
    assert_eq!(fs::read_dir(b.state.join("private")).unwrap().count(), 30);
    assert_eq!(fs::read_to_string(b.state.join("other/new")).unwrap(), "y");
    let mode = fs::metadata(b.state.join("private")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o000, "the directory's mode came back");
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_new_container_whose_state_dir_is_not_quite_empty_is_restored_into() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    for i in 0..7 {
        write(&a.state, &format!("workspace/notes/{i}.md"), "the user's");
    }
    write(&a.state, "openclaw.json", "{\"user\":true}");
    wait_until(T, "the uploads", || uploaded(&app) >= 8);
    assert_eq!(app.stop(T), 0);

    // A nested volume's mountpoint, and files baked into the image: an older
    // default config and a file of its own.
    let b = Dirs::new(s.tmp.path(), "b");
    fs::create_dir_all(b.state.join("workspace")).unwrap();
    write(&b.state, "openclaw.json", "{\"image default\":true}");
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    fs::File::options()
        .write(true)
        .open(b.state.join("openclaw.json"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    write(&b.state, "baked.txt", "from the image");
    let mut app = s.start(&b, &[]);
    app.wait_ready(T);
    for i in 0..7 {
        assert_eq!(
            fs::read_to_string(b.state.join(format!("workspace/notes/{i}.md"))).unwrap(),
            "the user's"
        );
    }
    assert_eq!(
        fs::read_to_string(b.state.join("openclaw.json")).unwrap(),
        "{\"user\":true}",
        "S3's newer copy wins"
    );
    wait_until(T, "the image's own file on S3", || {
        s.remote("").contains(&"baked.txt".to_owned())
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    assert_eq!(
        s.remote("workspace").len(),
        7,
        "nothing of the user's was deleted on S3"
    );
    // The tree's replaced versions are kept there: no file's.
    let files_kept: Vec<String> = s
        .remote(".cvm/hist")
        .into_iter()
        .filter(|p| !p.starts_with(".cvm/tree.json/"))
        .collect();
    assert!(
        files_kept.is_empty(),
        "no file went to the history: {files_kept:?}"
    );

    // That container's state dir is now known: a restart keeps it.
    write(&b.state, "later.txt", "written while down");
    restart_keeps_its_state(&s, &b, "later.txt");
}

#[test]
fn a_directory_replaced_by_a_file_and_back_restores_after_a_stop_and_a_crash() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    for i in 0..30 {
        write(&a.state, &format!("x/f{i}"), "in the directory");
    }
    write(&a.state, "y", "a file first");
    wait_until(T, "the uploads", || uploaded(&app) >= 31);
    // Both shapes change: x becomes a file, y a directory. The 30 deletes
    // are more than half the tree, which the delete guard would refuse.
    fs::remove_dir_all(a.state.join("x")).unwrap();
    write(&a.state, "x", "now a file");
    fs::remove_file(a.state.join("y")).unwrap();
    write(&a.state, "y/inside", "now a directory");
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    assert!(
        !app.log_text().contains("refusing to delete"),
        "{}",
        app.log_text()
    );

    let (mut app, b) = s.boot("b", &[]);
    assert_eq!(fs::read_to_string(b.state.join("x")).unwrap(), "now a file");
    assert_eq!(
        fs::read_to_string(b.state.join("y/inside")).unwrap(),
        "now a directory"
    );
    let left: Vec<String> = s
        .remote("")
        .into_iter()
        .filter(|n| n.starts_with("x/"))
        .collect();
    assert!(left.is_empty(), "no x/… left on S3: {left:?}");

    // And back, then a crash once the pass is done.
    fs::remove_file(b.state.join("x")).unwrap();
    write(&b.state, "x/again", "a directory again");
    fs::remove_dir_all(b.state.join("y")).unwrap();
    write(&b.state, "y", "a file again");
    let n = trees_uploaded(&app);
    wait_until(T, "the pass with both changes", || trees_uploaded(&app) > n);
    app.kill_all();
    let (mut app, c) = s.boot("c", &[]);
    assert_eq!(
        fs::read_to_string(c.state.join("x/again")).unwrap(),
        "a directory again"
    );
    assert_eq!(
        fs::read_to_string(c.state.join("y")).unwrap(),
        "a file again"
    );
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_bucket_holding_a_file_and_a_directory_under_one_name_still_restores() {
    // What a shape change cut short by an older cvm-init left: both shapes.
    let s = Setup::new();
    let conf = stock_config(&s.g, s.tmp.path());
    let src = s.tmp.path().join("src");
    write(&src, "x/f1", "in the directory");
    write(&src, "x/f2", "in the directory");
    rclone(&conf, &["copy", &src.display().to_string(), "crypt:"]);
    let file = s.tmp.path().join("x-file");
    fs::write(&file, "the file").unwrap();
    rclone(&conf, &["copyto", &file.display().to_string(), "crypt:x"]);

    let (mut app, b) = s.boot("b", &[]);
    assert_eq!(
        fs::read_to_string(b.state.join("x/f1")).unwrap(),
        "in the directory"
    );
    wait_until(T, "the left-out file in the history", || {
        s.remote(".cvm/hist")
            .iter()
            .any(|n| n.starts_with("x/") && n.matches('/').count() == 1)
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let (mut app, c) = s.boot("c", &[]);
    assert_eq!(
        fs::read_to_string(c.state.join("x/f2")).unwrap(),
        "in the directory"
    );
    assert_eq!(app.stop(T), 0);
}

#[test]
fn names_rclone_cannot_carry_are_refused_when_they_appear_and_hold_back_nothing() {
    use std::os::unix::ffi::OsStrExt;
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    let odd = [
        std::ffi::OsStr::from_bytes(b"bad-\xff-name").to_owned(),
        "quote\u{201B}d".into(),
        "looks-like.rclonelink".into(),
    ];
    for name in &odd {
        fs::write(a.state.join(name), "odd").unwrap();
    }
    let t = Instant::now();
    write(&a.state, "plain.txt", "fine");
    wait_until(T, "plain.txt on S3", || {
        s.remote("").contains(&"plain.txt".to_owned())
    });
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    wait_until(T, "the three refusals", || {
        app.log_text().matches("cannot replicate this file").count() >= 3
    });
    let log = app.log_text();
    for why in ["not UTF-8", "U+201B", "would come back as a symbolic link"] {
        assert!(log.contains(why), "{why}:\n{log}");
    }
    assert_eq!(
        app.stop(T),
        0,
        "refused names are not pending: {}",
        app.log_text()
    );
    let (mut app, b) = s.boot("b", &[]);
    let names: Vec<_> = fs::read_dir(&b.state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".cvm")
        .collect();
    assert_eq!(names, ["plain.txt"], "only what could be carried");
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_file_at_a_database_path_that_is_no_database_is_replicated_as_a_file() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    write(&a.state, "state/notes.sqlite", "plain text, not SQLite");
    wait_until(T, "its upload", || uploaded(&app) >= 1);
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let (mut app, b) = s.boot("b", &[]);
    assert_eq!(
        fs::read_to_string(b.state.join("state/notes.sqlite")).unwrap(),
        "plain text, not SQLite"
    );
    assert_eq!(app.stop(T), 0);
}

#[test]
fn same_size_content_with_the_old_mtime_is_uploaded_and_a_chmod_is_not_an_upload() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    write(&a.state, "notes.md", "AAAA");
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let set_mtime = |p: &Path| {
        fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(old)
            .unwrap()
    };
    set_mtime(&a.state.join("notes.md"));
    wait_until(T, "the first upload", || uploaded(&app) >= 1);
    // A chmod: the tree goes up, the content does not.
    let n = trees_uploaded(&app);
    fs::set_permissions(a.state.join("notes.md"), fs::Permissions::from_mode(0o600)).unwrap();
    wait_until(T, "the tree with the new mode", || trees_uploaded(&app) > n);
    assert_eq!(uploaded(&app), 1, "a mode change is no content upload");
    // What `cp -p` or `touch -r` does: new content, same size, old mtime.
    write(&a.state, "notes.md", "BBBB");
    set_mtime(&a.state.join("notes.md"));
    wait_until(T, "the new content's upload", || uploaded(&app) >= 2);
    assert_eq!(app.stop(T), 0);
    let (mut app, b) = s.boot("b", &[]);
    assert_eq!(
        fs::read_to_string(b.state.join("notes.md")).unwrap(),
        "BBBB"
    );
    let meta = fs::metadata(b.state.join("notes.md")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.modified().unwrap(), old);
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_deleted_database_stays_deleted_and_a_renamed_one_comes_back_once() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    fs::create_dir_all(a.state.join("state")).unwrap();
    for name in ["doomed", "moving", "kept"] {
        let conn =
            rusqlite::Connection::open(a.state.join(format!("state/{name}.sqlite"))).unwrap();
        conn.execute_batch(&format!(
            "CREATE TABLE t(x); INSERT INTO t VALUES ('{name}');"
        ))
        .unwrap();
    }
    wait_until(T, "three snapshots", || {
        app.log_text().matches("sqlite: snapshot uploaded").count() >= 3
    });
    fs::remove_file(a.state.join("state/doomed.sqlite")).unwrap();
    fs::rename(
        a.state.join("state/moving.sqlite"),
        a.state.join("state/moved.sqlite"),
    )
    .unwrap();
    wait_until(T, "both old snapshots in the trash", || {
        app.log_text()
            .matches("its snapshot moved to the trash")
            .count()
            >= 2
            && app.log_text().contains("db=state/moved.sqlite")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let (mut app, b) = s.boot("b", &[]);
    let mut dbs: Vec<String> = fs::read_dir(b.state.join("state"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dbs.sort();
    assert_eq!(dbs, ["kept.sqlite", "moved.sqlite"]);
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_users_own_top_level_sqlite_and_trash_dirs_are_replicated() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    write(
        &a.state,
        "sqlite/my-notes.txt",
        "the user's, not cvm-init's",
    );
    write(&a.state, ".cvm-trash/keep.txt", "also the user's");
    std::os::unix::fs::symlink("my-notes.txt", a.state.join("sqlite/link")).unwrap();
    fs::create_dir_all(a.state.join("state")).unwrap();
    rusqlite::Connection::open(a.state.join("state/openclaw.sqlite"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    wait_until(T, "the uploads and the snapshot", || {
        uploaded(&app) >= 3 && app.log_text().contains("sqlite: snapshot uploaded")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let (mut app, b) = s.boot("b", &[]);
    assert_eq!(
        fs::read_to_string(b.state.join("sqlite/my-notes.txt")).unwrap(),
        "the user's, not cvm-init's"
    );
    assert_eq!(
        fs::read_to_string(b.state.join(".cvm-trash/keep.txt")).unwrap(),
        "also the user's"
    );
    assert_eq!(
        fs::read_link(b.state.join("sqlite/link")).unwrap(),
        Path::new("my-notes.txt")
    );
    let n: i64 = rusqlite::Connection::open(b.state.join("state/openclaw.sqlite"))
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1, "cvm-init's own sqlite/ still holds the snapshot");
    assert_eq!(app.stop(T), 0);
}

#[test]
fn a_database_truncated_to_nothing_never_replaces_the_good_one() {
    let s = Setup::new();
    let gateway = common::script(
        s.tmp.path(),
        "fill.sh",
        r#"exec python3 - <<'PY'
import os, sqlite3, time
state = os.environ["OPENCLAW_STATE_DIR"]
os.makedirs(os.path.join(state, "state"), exist_ok=True)
db = sqlite3.connect(os.path.join(state, "state", "b.sqlite"))
db.execute("pragma journal_mode=wal")
db.execute("create table t(i integer primary key, pad blob)")
db.executemany("insert into t values (?, randomblob(500))", [(i,) for i in range(1, 2001)])
db.commit()
open(os.path.join(state, "filled"), "w").close()
time.sleep(100000)  # the connection stays open, idle
PY"#,
    );
    let gateway = gateway.to_str().unwrap();
    let (mut app, a) = s.boot("a", &[("CVM_GATEWAY_CMD", gateway)]);
    wait_until(T, "2,000 rows on S3", || {
        a.state.join("filled").exists()
            && app
                .log_text()
                .contains("sqlite: segment uploaded db=state/b.sqlite")
    });
    // `: > state/b.sqlite`: no longer a database, so the file is replicated
    // as a file (an empty one).
    fs::File::create(a.state.join("state/b.sqlite")).unwrap();
    wait_until(T, "the empty file on S3", || {
        s.remote("state").contains(&"b.sqlite".to_owned())
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    let (mut app, b) = s.boot("b", &[]);
    let rows: i64 = rusqlite::Connection::open(b.state.join("state/b.sqlite"))
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        rows, 2000,
        "the good database is restored, not the empty file"
    );
    let aside: Vec<_> = fs::read_dir(b.state.join("state"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".not-a-database-"))
        .collect();
    assert_eq!(aside.len(), 1, "the empty file is kept beside it");
    assert_eq!(aside[0].metadata().unwrap().len(), 0);
    assert!(
        app.log_text().contains("is not a database"),
        "{}",
        app.log_text()
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}
