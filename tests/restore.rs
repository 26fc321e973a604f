//! `cvm-init restore --to DIR`: the state S3 holds, from another machine's
//! point of view (no appliance, its own empty directories), written into
//! DIR, and nothing written to the bucket.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::load::{commits, inspect, DB, WRITER};
use common::replica::{write, Setup};
use common::{raw_state, wait_until, Appliance, Dirs, PASSWORD};

const T: Duration = Duration::from_secs(60);

/// Runs `cvm-init <args>` as from another machine: the appliance's S3
/// environment and `key`, its own empty directories; returns (exit code,
/// stdout, stderr).
fn cli(s: &Setup, key: &str, args: &[&str]) -> (i32, String, String) {
    let elsewhere = Dirs::new(s.tmp.path(), "elsewhere");
    let mut env = s.g.s3_env();
    env.extend(elsewhere.env());
    env.push(("RCLONE_CRYPT_PASSWORD".into(), key.into()));
    env.push(("CVM_GATEWAY_CMD".into(), s.idle.clone()));
    let out = Command::new(common::BIN)
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

fn restore(s: &Setup, key: &str, args: &[&str]) -> (i32, String, String) {
    cli(s, key, &[&["restore"], args].concat())
}

/// The test writer as the gateway: its command, and the directory of its
/// commit log.
fn writer(s: &Setup) -> (String, std::path::PathBuf) {
    let writer = s.tmp.path().join("writer.py");
    fs::write(&writer, WRITER).unwrap();
    let out = s.tmp.path().join("out");
    fs::create_dir_all(&out).unwrap();
    (format!("python3 {}", writer.display()), out)
}

/// Boots `name` with the test writer as the gateway and `extra`; returns
/// it with the directory of the writer's commit log.
fn boot_writer(s: &Setup, name: &str, extra: &[(&str, &str)]) -> (Appliance, Dirs, PathBuf) {
    let (cmd, out) = writer(s);
    let out_s = out.display().to_string();
    let mut env = vec![("CVM_GATEWAY_CMD", cmd.as_str()), ("OUT", out_s.as_str())];
    env.extend_from_slice(extra);
    let (app, dirs) = s.boot(name, &env);
    (app, dirs, out)
}

/// Waits until `cvm-init restore` (the latest state) gives a tree that
/// passes `done`: the last pass and the last segment are on S3.
fn wait_restorable(s: &Setup, what: &str, done: impl Fn(&Path) -> bool) {
    let mut n = 0;
    wait_until(T, what, || {
        // A name no earlier wait used.
        let to = loop {
            n += 1;
            let to = s.tmp.path().join(format!("try-{n}"));
            if !to.exists() {
                break to;
            }
        };
        let (code, _, _) = restore(s, PASSWORD, &["--to", to.to_str().unwrap()]);
        code == 0 && done(&to)
    });
}

#[test]
fn restore_writes_the_latest_files_and_databases_and_nothing_to_s3() {
    let s = Setup::new();
    let (mut app, a, out) = boot_writer(&s, "a", &[("LIMIT", "60")]);
    write(&a.state, "notes/a.txt", "hello");
    std::os::unix::fs::symlink("notes/a.txt", a.state.join("link")).unwrap();
    wait_until(T, "60 commits", || commits(&out).len() >= 60);
    wait_restorable(&s, "a restore with everything", |to| {
        inspect(&to.join(DB)) == Some((60, 60))
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
    // A moment that is not one: refused before anything is read.
    let (code, _, stderr) = restore(&s, PASSWORD, &["--to", "/nonexistent/x", "--at", "+5m"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("RFC 3339"), "{stderr}");
    // The wrong key: 77, as the appliance.
    let (code, _, stderr) = restore(
        &s,
        &common::obscure("not the key"),
        &["--to", s.tmp.path().join("wrong").to_str().unwrap()],
    );
    assert_eq!(code, 77, "{stderr}");
}

#[test]
fn a_new_databases_first_base_goes_up_packed_and_a_whole_copy_follows() {
    let s = Setup::new();
    // Rows that compress: a base that does not is sent whole, as before.
    let (mut app, _, out) = boot_writer(
        &s,
        "a",
        &[("LIMIT", "30"), ("EVERY", "0.05"), ("PAD", "zeros")],
    );
    wait_until(T, "30 commits", || commits(&out).len() >= 30);
    wait_restorable(&s, "a restore with every commit", |to| {
        inspect(&to.join(DB)) == Some((30, 30))
    });
    let log = app.log_text();
    assert!(
        log.contains("sqlite: snapshot uploaded (base) db=state/openclaw.sqlite")
            && log.contains("packed=true"),
        "{log}"
    );
    // A crash: what S3 holds is a packed base and segments, no stock copy.
    app.kill_all();
    let conf = common::stock_config(&s.g, s.tmp.path());
    let stock = String::from_utf8(common::rclone(&conf, &["lsf", "-R", "crypt:sqlite"])).unwrap();
    assert!(!stock.contains("openclaw"), "no stock copy yet: {stock}");
    // Stock rclone and zstd read the packed base: a whole database.
    let dir = format!("{LINE}/bases");
    let listing =
        String::from_utf8(common::rclone(&conf, &["lsf", &format!("crypt:{dir}")])).unwrap();
    let bases: Vec<&str> = listing.lines().collect();
    assert_eq!(bases.len(), 1, "{listing}");
    let packed = common::rclone(&conf, &["cat", &format!("crypt:{dir}/{}", bases[0])]);
    let plain = zstd::decode_all(packed.as_slice()).expect("a zstd stream");
    let unpacked = s.tmp.path().join("unpacked.sqlite");
    fs::write(&unpacked, &plain).unwrap();
    assert!(inspect(&unpacked).is_some(), "a whole database");
    eprintln!(
        "first base: {} bytes whole, {} packed",
        plain.len(),
        packed.len()
    );
    assert!(packed.len() < plain.len(), "compressed");

    // A new container restores every commit from it; while it idles, the
    // whole copy is taken once the base is CVM_SQLITE_BASE_MAX_AGE old.
    let idle = s.idle.clone();
    let (mut app, b) = s.boot(
        "b",
        &[
            ("CVM_GATEWAY_CMD", idle.as_str()),
            ("CVM_SQLITE_BASE_MAX_AGE", "2s"),
        ],
    );
    assert_eq!(inspect(&b.state.join(DB)), Some((30, 30)));
    wait_until(T, "the stock copy", || {
        String::from_utf8(common::rclone(&conf, &["lsf", "-R", "crypt:sqlite"]))
            .unwrap()
            .lines()
            .any(|l| l == DB)
    });
    let copy = s.tmp.path().join("stock.sqlite");
    common::rclone(
        &conf,
        &[
            "copyto",
            &format!("crypt:sqlite/{DB}"),
            copy.to_str().unwrap(),
        ],
    );
    assert_eq!(
        inspect(&copy),
        Some((30, 30)),
        "stock rclone's copy is whole"
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let h = history(&s);
    assert!(h["stock_base"].as_u64().is_some(), "{h}");
}

#[test]
fn restore_at_a_moment_brings_back_a_database_deleted_since() {
    let s = Setup::new();
    let idle = s.idle.clone();
    let (mut app, a) = s.boot("a", &[("CVM_GATEWAY_CMD", idle.as_str())]);
    let doomed = "state/doomed.sqlite";
    fs::create_dir_all(a.state.join("state")).unwrap();
    rusqlite::Connection::open(a.state.join(doomed))
        .unwrap()
        .execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE tx(i INTEGER PRIMARY KEY);
             INSERT INTO tx VALUES (1); INSERT INTO tx VALUES (2);",
        )
        .unwrap();
    wait_until(T, "its base on S3", || {
        app.log_text()
            .contains("snapshot uploaded (base) db=state/doomed.sqlite")
    });
    let then = std::time::SystemTime::now();
    wait_until(T, "the clock past that moment", || {
        std::time::SystemTime::now() > then + Duration::from_millis(20)
    });
    fs::remove_file(a.state.join(doomed)).unwrap();
    wait_until(T, "its line in the trash", || {
        app.log_text()
            .lines()
            .any(|l| l.contains("moved to the trash") && l.contains("state/doomed.sqlite"))
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    let (latest, _) = restore_latest(&s);
    assert!(!latest.join(doomed).exists(), "deleted now");
    let at = humantime::format_rfc3339_millis(then).to_string();
    let back = s.tmp.path().join("then");
    let (code, stdout, stderr) =
        restore(&s, PASSWORD, &["--to", back.to_str().unwrap(), "--at", &at]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        inspect(&back.join(doomed)),
        Some((2, 2)),
        "it existed then: {stdout}\n{stderr}"
    );
}

#[test]
fn a_missing_segment_ends_the_restore_there_and_is_named() {
    let s = Setup::new();
    ten_commits(&s);
    let (conf, objects) = line_objects(&s);
    let first = objects
        .iter()
        .find(|l| l.contains("/000000000001-"))
        .unwrap_or_else(|| panic!("segment 1 in {objects:?}"));
    common::rclone(&conf, &["deletefile", &format!("crypt:{LINE}/{first}")]);

    let (to, stderr) = restore_latest(&s);
    assert!(
        stderr.contains("restore stopped at segment")
            && stderr.contains(first.split('-').next().unwrap()),
        "the missing segment is named: {stderr}"
    );
    let (max, count) = inspect(&to.join(DB)).expect("what is restored passes integrity_check");
    assert_eq!(max, count, "no gap inside what was restored");
    assert!(max < 10, "nothing after the missing segment is applied");
}

/// A restore writes the segments onto the stock copy first and checks the
/// base's hash beside its own check, since the stock copy is almost always
/// the newest base its manifest names. When it is another file, what the
/// segments wrote over is put back: the file is restored as it is, and
/// said so.
#[test]
fn a_stock_copy_that_is_not_the_newest_base_is_restored_as_it_is() {
    let s = Setup::new();
    ten_commits(&s);
    // Another database where the stock copy is: a copy put there by hand.
    let other = s.tmp.path().join("other.sqlite");
    {
        let c = rusqlite::Connection::open(&other).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        // Smaller than the app's: its segments write over it and past it.
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    put(&s, &other, &format!("sqlite/{DB}"));

    let (to, stderr) = restore_latest(&s);
    assert!(
        stderr.contains("is not the one its manifest names"),
        "{stderr}"
    );
    let (got, want) = (fs::read(to.join(DB)).unwrap(), fs::read(&other).unwrap());
    assert_eq!(got.len(), want.len(), "{stderr}");
    // Past the header, whose version fields a check may rewrite.
    assert!(
        got[100..] == want[100..],
        "the file put back is the file S3 holds"
    );
}

/// A span only stands in for its segments: a damaged one is passed over
/// for them, and nothing is lost.
#[test]
fn a_damaged_span_is_passed_over_for_its_segments() {
    let s = Setup::new();
    let (mut app, _, out) = boot_writer(
        &s,
        "a",
        &[
            ("LIMIT", "12"),
            ("EVERY", "0.3"),
            ("CVM_SQLITE_SPAN_SEGMENTS", "2"),
        ],
    );
    wait_until(T, "12 commits and a span", || {
        commits(&out).len() >= 12 && app.log_text().contains("sqlite: span uploaded")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let (_, objects) = line_objects(&s);
    let span = objects
        .iter()
        .find(|l| {
            l.rsplit('/')
                .next()
                .is_some_and(|n| n.split('-').count() == 3)
        })
        .unwrap_or_else(|| panic!("a span in {objects:?}"));
    let garbage = s.tmp.path().join("garbage");
    fs::write(&garbage, "not a span").unwrap();
    put(&s, &garbage, &format!("{LINE}/{span}"));

    let (to, stderr) = restore_latest(&s);
    assert!(
        stderr.contains("a span could not be applied; its segments are taken instead"),
        "{stderr}"
    );
    assert!(!stderr.contains("restore stopped"), "{stderr}");
    assert_eq!(
        inspect(&to.join(DB)),
        Some((12, 12)),
        "every commit: {stderr}"
    );
}

/// The test writer's 10 commits, spread over 3 s (two segments at least),
/// on S3, and the appliance stopped.
/// A generation has one writer. A new container restoring after a clean
/// stop goes on in the same generation; after a crash (the lease taken
/// over), in a new one from a new base, so an upload of the dead holder's
/// that lands late can never carry a number the new holder gives out.
#[test]
fn after_a_crash_the_next_writer_goes_on_in_a_new_generation() {
    let s = Setup::new();
    let generations = || -> std::collections::BTreeSet<String> {
        line_objects(&s)
            .1
            .iter()
            .filter_map(|o| o.split_once('/'))
            .map(|(top, _)| top.to_owned())
            .filter(|top| top != "bases")
            .collect()
    };
    let ten_more = |name: &str, total: usize| {
        let (app, _, out) = boot_writer(&s, name, &[("LIMIT", "10"), ("EVERY", "0.1")]);
        wait_until(T, "ten more commits", || commits(&out).len() >= total);
        wait_restorable(&s, "every commit on S3", |to| {
            inspect(&to.join(DB)) == Some((total as i64, total as i64))
        });
        app
    };

    let mut app = ten_more("a", 10);
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let first = generations();
    assert_eq!(first.len(), 1, "{first:?}");

    // A clean stop released the lease: b goes on in a's generation.
    let mut app = ten_more("b", 20);
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    assert_eq!(generations(), first, "a clean stop's line goes on");

    // c crashes; d takes the lease over and starts a generation of its own.
    ten_more("c", 30).kill_all();
    let mut app = ten_more("d", 40);
    let log = app.log_text();
    assert!(log.contains("lease: took over"), "{log}");
    assert!(
        log.contains("sqlite: snapshot uploaded (base) db=state/openclaw.sqlite"),
        "the new generation starts from a base: {log}"
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let now = generations();
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(
        now.is_superset(&first),
        "the old generation stays for history"
    );
    let (latest, _) = restore_latest(&s);
    assert_eq!(inspect(&latest.join(DB)), Some((40, 40)));
}

fn ten_commits(s: &Setup) {
    let (mut app, _, out) = boot_writer(s, "a", &[("LIMIT", "10"), ("EVERY", "0.3")]);
    wait_until(T, "10 commits and a second segment", || {
        commits(&out).len() >= 10
            && app
                .log_text()
                .contains("sqlite: segment uploaded db=state/openclaw.sqlite seq=2")
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

/// Puts the local file `from` at `to` in the crypt remote, as stock
/// rclone does.
fn put(s: &Setup, from: &Path, to: &str) {
    let conf = common::stock_config(&s.g, s.tmp.path());
    let to = format!("crypt:{to}");
    common::rclone(&conf, &["copyto", from.to_str().unwrap(), &to]);
}

/// The test database's line in the crypt remote.
const LINE: &str = ".cvm/wal/state/openclaw.sqlite";

/// The line as stock rclone sees it: its config, and every object below
/// the line.
fn line_objects(s: &Setup) -> (PathBuf, Vec<String>) {
    let conf = common::stock_config(&s.g, s.tmp.path());
    let listing = String::from_utf8(common::rclone(
        &conf,
        &["lsf", "-R", "--files-only", &format!("crypt:{LINE}")],
    ))
    .unwrap();
    (conf, listing.lines().map(str::to_owned).collect())
}

/// `cvm-init restore` of the latest state into a new directory, which
/// must succeed; returns the directory and what it logged.
fn restore_latest(s: &Setup) -> (PathBuf, String) {
    let to = s.tmp.path().join("restored");
    let (code, _, stderr) = restore(s, PASSWORD, &["--to", to.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    (to, stderr)
}

/// `cvm-init history --json`'s summary of the one database.
fn history(s: &Setup) -> serde_json::Value {
    let (code, stdout, stderr) = cli(s, PASSWORD, &["history", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    v["databases"][DB].clone()
}

/// `ts` (the time the row was inserted, before its commit) of row `i`.
fn row_time(db: &Path, i: i64) -> f64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT ts FROM tx WHERE i = ?1", [i], |r| r.get(0))
        .unwrap()
}

#[test]
fn restore_at_a_moment_has_every_commit_before_it_and_none_after() {
    moments("wal");
}

/// The same for a database in rollback-journal mode: its changes are the
/// pages that differ between snapshots, on the same line and history.
#[test]
fn a_rollback_journal_database_has_the_same_history() {
    moments("delete");
}

fn moments(journal: &str) {
    let s = Setup::new();
    // About 20 s of commits, with a new base every few seconds: moments
    // fall on several bases and between them.
    let (mut app, _, out) = boot_writer(
        &s,
        "a",
        &[
            ("LIMIT", "250"),
            ("EVERY", "0.08"),
            ("CVM_SQLITE_BASE_MAX_AGE", "4s"),
            // Spans of four segments: moments fall inside spans, and a
            // restore mixes spans and segments.
            ("CVM_SQLITE_SPAN_SEGMENTS", "4"),
            ("JOURNAL", journal),
        ],
    );
    wait_until(
        Duration::from_secs(120),
        "250 commits and three bases",
        || {
            commits(&out).len() >= 250
                && app
                    .log_text()
                    .matches("sqlite: snapshot uploaded (base)")
                    .count()
                    >= 3
        },
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let log = commits(&out);
    // The stop comes right after the last commit, often before cvm-init
    // has read it: the app's close must leave it in the WAL for the final
    // pass (a header read once dropped the pin's lock, and the close
    // checkpointed the WAL past it and deleted it).
    let (latest, _) = restore_latest(&s);
    assert_eq!(
        inspect(&latest.join(DB)),
        Some((250, 250)),
        "the stop keeps every commit:\n{}",
        app.log_text()
    );
    // What went up per save is what changed, not the database.
    let app_log = app.log_text();

    let segments: Vec<u64> = app_log
        .lines()
        .filter(|l| l.contains("sqlite: segment uploaded db=state/openclaw.sqlite"))
        .filter_map(|l| {
            l.split(" bytes=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        app_log.matches("sqlite: span uploaded").count() >= 2,
        "segments are merged into spans:\n{app_log}"
    );
    let mean = segments.iter().sum::<u64>() / segments.len().max(1) as u64;
    assert!(
        segments.len() >= 10 && mean < 250 * 2000 / 4,
        "{} segments of {mean} bytes on average:\n{app_log}",
        segments.len()
    );

    let h = history(&s);
    let oldest = h["oldest"].as_u64().expect("an oldest point");
    let newest = h["newest"].as_u64().expect("a newest point");
    assert_eq!(
        h["continuous_from"].as_u64(),
        Some(oldest),
        "every change kept: {h}"
    );
    assert_eq!(h["hourly_points"], 0, "{h}");
    // The writer logs a commit's time after it returns; cvm-init can read it
    // from the WAL a moment before that, so the point holding the last
    // commit is only known to be after the commit before it was logged.
    assert!(
        newest as f64 / 1000.0 >= log[log.len() - 2].1,
        "the last commit is a point: {h}\nlast commits: {:?}\n{app_log}",
        &log[log.len() - 3..]
    );

    // Ten moments from the oldest point to just after the last commit.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("moments seeded with {seed}");
    // Up to just after the last commit, and never after now (a moment in
    // the future is refused).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let span = (newest + 1000).min(now_ms) - oldest;
    for k in 0..10 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at_ms = oldest + (seed >> 33) % span;
        let at = at_ms as f64 / 1000.0;
        let rfc =
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(at_ms))
                .to_string();
        let to = s.tmp.path().join(format!("at-{k}"));
        let (code, stdout, stderr) =
            restore(&s, PASSWORD, &["--to", to.to_str().unwrap(), "--at", &rfc]);
        assert_eq!(code, 0, "--at {rfc}: {stderr}");
        assert!(stdout.contains(&format!("as of {rfc}")), "{stdout}");
        let (max, count) = inspect(&to.join(DB)).expect("integrity_check passes");
        assert_eq!(max, count, "no gap");
        let mode: String = rusqlite::Connection::open(to.join(DB))
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, journal, "restored in its own journal mode");
        let before: i64 = log
            .iter()
            .filter(|&&(_, ts)| ts <= at - 3.0)
            .map(|&(i, _)| i)
            .max()
            .unwrap_or(0);
        assert!(
            max >= before,
            "--at {rfc}: commits up to {before} were made 3 s before it; restored up to {max}"
        );
        if max > 0 {
            let made = row_time(&to.join(DB), max);
            assert!(
                made <= at,
                "--at {rfc}: row {max} was inserted at {made}, after the moment"
            );
        }
    }

    // Before the oldest point: refused, named, and nothing left in DIR.
    let early = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(oldest - 60_000),
    )
    .to_string();
    let to = s.tmp.path().join("too-early");
    let (code, _, stderr) = restore(
        &s,
        PASSWORD,
        &["--to", to.to_str().unwrap(), "--at", &early],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("outside the history") && stderr.contains("oldest restore point"),
        "{stderr}"
    );
    assert_eq!(
        fs::read_dir(&to).unwrap().count(),
        0,
        "a failed restore leaves DIR empty"
    );

    // A kept base deleted from the bucket: a restore that needs it stops
    // and names it, and takes nothing else in its place.
    let (conf, objects) = line_objects(&s);
    let mut bases: Vec<&str> = objects
        .iter()
        .filter_map(|o| o.strip_prefix("bases/"))
        .collect();
    bases.sort();
    assert!(bases.len() >= 3, "{objects:?}");
    let first = bases[0];
    common::rclone(
        &conf,
        &["deletefile", &format!("crypt:{LINE}/bases/{first}")],
    );
    let to = s.tmp.path().join("no-base");
    let at = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(oldest + 100),
    )
    .to_string();
    let (code, _, stderr) = restore(&s, PASSWORD, &["--to", to.to_str().unwrap(), "--at", &at]);
    assert_eq!(code, 65, "{stderr}");
    assert!(
        stderr.contains(first) && stderr.contains("history object"),
        "{stderr}"
    );
}

/// Waits until the file `name` on S3 has `len` bytes, or is gone (`None`);
/// returns the time right after, once the clock is past it by more than
/// the kernel's coarse mtime clock lags (a tick): what is written next has
/// a later mtime.
fn on_s3(s: &Setup, name: &str, len: Option<u64>) -> std::time::SystemTime {
    wait_until(T, &format!("{name} on S3 with {len:?} bytes"), || {
        common::replica::remote_size(s, name) == len
    });
    let t = std::time::SystemTime::now();
    wait_until(T, "the clock a tick later", || {
        std::time::SystemTime::now() > t + Duration::from_millis(20)
    });
    t
}

#[test]
fn restore_at_a_moment_gives_each_file_as_it_was_then() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    // The kernel stamps mtimes with its coarse clock, up to a tick behind.
    let before_all = std::time::SystemTime::now() - Duration::from_millis(20);
    write(&a.state, "a.txt", "v1");
    write(&a.state, "d", "a file");
    on_s3(&s, "d", Some(6));
    let t0 = on_s3(&s, "a.txt", Some(2));
    write(&a.state, "a.txt", "version two");
    write(&a.state, "b.txt", "bee");
    // A file replaced by a directory of the same name.
    fs::remove_file(a.state.join("d")).unwrap();
    write(&a.state, "d/in.txt", "inside");
    on_s3(&s, "d/in.txt", Some(6));
    std::os::unix::fs::symlink("a.txt", a.state.join("l")).unwrap();
    on_s3(&s, "b.txt", Some(3));
    on_s3(&s, "l.rclonelink", Some(5));
    let t1 = on_s3(&s, "a.txt", Some(11));
    fs::remove_file(a.state.join("a.txt")).unwrap();
    let t2 = on_s3(&s, "a.txt", None);
    write(&a.state, "a.txt", "third version!");
    let t3 = on_s3(&s, "a.txt", Some(14));
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    let at = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    for (k, (when, a_txt, b_txt, link)) in [
        (before_all, None, None, false),
        (t0, Some("v1"), None, false),
        (t1, Some("version two"), Some("bee"), true),
        (t2, None, Some("bee"), true),
        (t3, Some("third version!"), Some("bee"), true),
    ]
    .into_iter()
    .enumerate()
    {
        let to = s.tmp.path().join(format!("files-at-{k}"));
        let (code, stdout, stderr) = restore(
            &s,
            PASSWORD,
            &["--to", to.to_str().unwrap(), "--at", &at(when)],
        );
        assert_eq!(code, 0, "{stderr}");
        let read = |n: &str| fs::read_to_string(to.join(n)).ok();
        assert_eq!(
            read("a.txt").as_deref(),
            a_txt,
            "a.txt at moment {k} ({}): {stdout}{:?}",
            at(when),
            s.remote(".cvm/hist")
        );
        assert_eq!(read("b.txt").as_deref(), b_txt, "b.txt at moment {k}");
        let d = match k {
            0 => (None, None),
            1 => (Some("a file"), None),
            _ => (None, Some("inside")),
        };
        assert_eq!(
            (read("d").as_deref(), read("d/in.txt").as_deref()),
            d,
            "d at moment {k}"
        );
        assert_eq!(
            fs::read_link(to.join("l")).ok(),
            link.then(|| Path::new("a.txt").to_owned()),
            "the link at moment {k}"
        );
    }
}

/// Modes, owners and empty directories travel in `.cvm/tree.json`, whose
/// versions are kept as a file's are: a restore to a moment gets the tree
/// of that moment.
#[test]
fn restore_at_a_moment_gives_modes_and_empty_directories_as_they_were_then() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new();
    let (mut app, a) = s.boot("a", &[]);
    let mode = |p: &Path| fs::metadata(p).map(|m| m.permissions().mode() & 0o777).ok();
    let set =
        |m: u32| fs::set_permissions(a.state.join("a.txt"), fs::Permissions::from_mode(m)).unwrap();
    write(&a.state, "a.txt", "content");
    set(0o644);
    wait_restorable(&s, "a.txt with mode 644", |to| {
        mode(&to.join("a.txt")) == Some(0o644)
    });
    let t0 = std::time::SystemTime::now();
    set(0o600);
    fs::create_dir(a.state.join("e")).unwrap();
    wait_restorable(&s, "mode 600 and the empty directory", |to| {
        mode(&to.join("a.txt")) == Some(0o600) && to.join("e").is_dir()
    });
    let t1 = std::time::SystemTime::now();
    set(0o640);
    fs::remove_dir(a.state.join("e")).unwrap();
    wait_restorable(&s, "mode 640, the directory gone", |to| {
        mode(&to.join("a.txt")) == Some(0o640) && !to.join("e").exists()
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    let at = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    for (k, (when, want, dir)) in [(t0, 0o644, false), (t1, 0o600, true)]
        .into_iter()
        .enumerate()
    {
        let to = s.tmp.path().join(format!("tree-at-{k}"));
        let (code, stdout, stderr) = restore(
            &s,
            PASSWORD,
            &["--to", to.to_str().unwrap(), "--at", &at(when)],
        );
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(
            mode(&to.join("a.txt")),
            Some(want),
            "a.txt's mode at moment {k}: {stdout}{:?}",
            s.remote(".cvm/hist")
        );
        assert_eq!(
            to.join("e").is_dir(),
            dir,
            "the empty directory at moment {k}"
        );
    }
}

#[test]
fn a_rollback_boot_starts_from_a_moment_and_can_itself_be_undone() {
    let s = Setup::new();
    let (cmd, out) = writer(&s);
    let out_s = out.display().to_string();
    let env = [
        ("CVM_GATEWAY_CMD", cmd.as_str()),
        ("OUT", &out_s),
        ("LIMIT", "20"),
        ("EVERY", "0.05"),
    ];
    // A: 20 commits and a file, stopped cleanly: all of it on S3.
    let (mut app, a) = s.boot("a", &env);
    write(&a.state, "f.txt", "one");
    wait_until(T, "20 commits", || commits(&out).len() >= 20);
    on_s3(&s, "f.txt", Some(3));
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let a_log = app.log_text();
    let then = on_s3(&s, "f.txt", Some(3));
    // A2, its state dir kept: 20 more commits, the file changed, another added.
    let (mut app, a2) = s.boot("a", &env);
    write(&a2.state, "f.txt", "two!");
    write(&a2.state, "g.txt", "later");
    // A database new to S3: its first base is packed, no stock copy.
    let young = "state/young.sqlite";
    rusqlite::Connection::open(a2.state.join(young))
        .unwrap()
        .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE tx(i INTEGER PRIMARY KEY); INSERT INTO tx VALUES (1);")
        .unwrap();
    wait_until(T, "40 commits", || commits(&out).len() >= 40);
    on_s3(&s, "g.txt", Some(5));
    wait_until(T, "the young database's base", || {
        app.log_text().lines().any(|l| {
            l.contains("snapshot uploaded (base) db=state/young.sqlite")
                && l.contains("packed=true")
        })
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let a2_log = app.log_text();
    let abandoned = on_s3(&s, "f.txt", Some(4));

    // A moment before anything the bucket holds: the boot stops, the bucket
    // untouched. (A2 kept its state dir, so f.txt's first version is dated
    // from S3's listing: it must not count from 1970.)
    let before = common::raw_state(&s.g, s.tmp.path());
    let idle = s.idle.clone();
    let mut app = s.start(
        &common::Dirs::new(s.tmp.path(), "too-early"),
        &[
            ("CVM_RESTORE_AT", "2001-01-01T00:00:00Z"),
            ("CVM_GATEWAY_CMD", &idle),
        ],
    );
    assert_eq!(app.wait_exit(T), 65, "{}", app.log_text());
    assert!(
        app.log_text()
            .contains("is before anything the history holds"),
        "{}",
        app.log_text()
    );
    assert_eq!(common::raw_state(&s.g, s.tmp.path()), before);

    // B rolls back to `then`, into A's own state dir (set aside, not lost).
    let rfc = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    let back = rfc(then);
    let (mut app, b) = s.boot(
        "a",
        &[
            ("CVM_RESTORE_AT", back.as_str()),
            ("CVM_GATEWAY_CMD", &idle),
        ],
    );
    assert!(
        app.log_text().contains("boot: rolled the bucket back"),
        "{}",
        app.log_text()
    );
    assert_eq!(
        inspect(&b.state.join(DB)),
        Some((20, 20)),
        "the database as it was then"
    );
    assert_eq!(
        fs::read_to_string(b.state.join("f.txt")).unwrap(),
        "one",
        "A: {a_log}\nA2: {a2_log}"
    );
    assert!(!b.state.join("g.txt").exists(), "g.txt did not exist then");
    assert!(!b.state.join(young).exists(), "nor the young database");
    assert!(
        fs::read_dir(b.state.join(".cvm"))
            .unwrap()
            .flatten()
            .any(|e| e
                .file_name()
                .to_string_lossy()
                .starts_with("before-rollback-")),
        "the state dir's contents are set aside"
    );
    write(&b.state, "h.txt", "after the rollback");
    on_s3(&s, "h.txt", Some(18));
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    // C, a new container with the variable still set: no second rollback.
    let (mut app, c) = s.boot(
        "c",
        &[
            ("CVM_RESTORE_AT", back.as_str()),
            ("CVM_GATEWAY_CMD", &idle),
        ],
    );
    assert!(
        app.log_text().contains("rolled back to already"),
        "{}",
        app.log_text()
    );
    assert_eq!(inspect(&c.state.join(DB)), Some((20, 20)));
    assert_eq!(
        fs::read_to_string(c.state.join("h.txt")).unwrap(),
        "after the rollback"
    );
    assert!(!c.state.join("g.txt").exists());
    assert!(
        !c.state.join(young).exists(),
        "a database the rollback left out stays out, stock copy or not"
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    // The abandoned state is still there: a restore to just before the
    // rollback brings it back.
    let to = s.tmp.path().join("abandoned");
    let (code, stdout, stderr) = restore(
        &s,
        PASSWORD,
        &["--to", to.to_str().unwrap(), "--at", &rfc(abandoned)],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(inspect(&to.join(DB)), Some((40, 40)), "{stdout}");
    assert_eq!(fs::read_to_string(to.join("f.txt")).unwrap(), "two!");
    assert_eq!(fs::read_to_string(to.join("g.txt")).unwrap(), "later");
    assert_eq!(inspect(&to.join(young)), Some((1, 1)), "{stdout}");
    assert!(!to.join("h.txt").exists());
}
