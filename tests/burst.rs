//! A burst of 5,000 files in the replicate layout: a graceful stop must
//! flush all of it, and a crash must lose only its newest part. Alone in its
//! test binary so that nothing else loads the machine. How long the stop
//! takes against the default `CVM_STOP_TIMEOUT` is a benchmark
//! (`./scripts/bench burst`), not asserted here: on 2 cores it is close to
//! what stock rclone takes for the same files, and a loaded machine made a
//! timed assertion fail without anything being wrong.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::replica::{write, Setup};
use common::wait_until;

const T: Duration = Duration::from_secs(40);

#[test]
fn a_burst_of_5000_files_is_flushed_by_a_stop_and_a_crash_loses_only_the_last_seconds() {
    let s = Setup::new();
    // A budget with room: what is checked is that the stop uploads the
    // whole burst, not how fast this machine is at that moment.
    let (mut app, a) = s.boot("a", &[("CVM_STOP_TIMEOUT", "30s")]);
    // The worst case: all 5,000 appear at once (a directory moved in) and
    // the stop comes right after, so the stop uploads every one of them.
    let outside = s.tmp.path().join("prepared");
    for i in 0..5000 {
        write(
            &outside,
            &format!("burst/{:02}/{i}.json", i % 50),
            &format!("{{\"n\":{i}}}"),
        );
    }
    fs::rename(outside.join("burst"), a.state.join("burst")).unwrap();
    let t = Instant::now();
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    eprintln!(
        "MEASURED: 5000 files moved in, then SIGTERM at once: the stop flushed them in {:?}",
        t.elapsed()
    );
    assert!(
        app.log_text()
            .contains("replicate: batch upload files=5000"),
        "the stop uploads a burst of new files in one batch job"
    );
    let (mut app, b) = s.boot("b", &[]);
    let n = fs::read_dir(b.state.join("burst"))
        .unwrap()
        .flatten()
        .map(|d| fs::read_dir(d.path()).unwrap().count())
        .sum::<usize>();
    assert_eq!(n, 5000, "every file of the burst is in the new container");

    // Crash: another burst, SIGKILL 5 s after it ended.
    let mut written = Vec::new();
    for i in 0..5000 {
        write(&b.state, &format!("crash/{:02}/{i}", i % 50), "x");
        written.push((i, Instant::now()));
    }
    let end = Instant::now();
    wait_until(T, "5 s after the burst", || {
        end.elapsed() >= Duration::from_secs(5)
    });
    let killed_at = Instant::now();
    let b_log = app.log.clone();
    app.kill_all();
    let (mut app, c) = s.boot("c", &[]);
    let lost: Vec<_> = written
        .iter()
        .filter(|(i, _)| !c.state.join(format!("crash/{:02}/{i}", i % 50)).exists())
        .collect();
    let worst = lost
        .iter()
        .map(|(_, at)| killed_at.duration_since(*at))
        .max();
    eprintln!(
        "MEASURED: crash 5 s after a 5000-file burst: {} lost, the oldest of them written {worst:?} before the kill",
        lost.len()
    );
    // Oldest change first: however slow the machine, what a crash loses is
    // the newest part of the burst, never its oldest files.
    let oldest_lost: Vec<usize> = lost.iter().map(|(i, _)| *i).filter(|i| *i < 1000).collect();
    if !oldest_lost.is_empty() {
        let passes: Vec<String> = fs::read_to_string(&b_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.contains("replicate: pass")
                    || l.contains("S3 cannot be reached")
                    || l.contains("failed")
            })
            .map(str::to_owned)
            .collect();
        panic!(
            "{} of the burst's 1,000 oldest files are lost, e.g. {:?}; the passes:\n{}",
            oldest_lost.len(),
            &oldest_lost[..oldest_lost.len().min(10)],
            passes.join("\n")
        );
    }
    assert_eq!(app.stop(T), 0);
}
