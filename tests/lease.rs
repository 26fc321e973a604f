//! One writer per bucket prefix: a second instance with the same environment
//! waits for the first one's lease, takes over when it stops or dies, and a
//! holder whose lease was taken uploads nothing more. Against Garage (no
//! conditional writes: the timed protocol) and moto (conditional writes).

mod common;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::replica::{write, Setup};
use common::{descendants, script, wait_until, Appliance, Dirs, Moto, BIN, PASSWORD};

const T: Duration = Duration::from_secs(40);
/// `common::LEASE_TTL`.
const TTL: Duration = Duration::from_secs(3);

fn ready(app: &mut Appliance) -> bool {
    app.notified().iter().any(|l| l == "READY=1")
}

/// How many times `app` has said it waits for the lease.
fn waits(app: &mut Appliance) -> usize {
    app.notified()
        .iter()
        .filter(|l| l.starts_with("STATUS=waiting for the lease"))
        .count()
}

/// `cvm-init check` with `s`'s environment: (exit code, stdout).
fn check(s: &Setup, dirs: &Dirs) -> (i32, String) {
    let mut env = s.g.s3_env();
    env.extend(dirs.env());
    env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
    let out = std::process::Command::new(BIN)
        .arg("check")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

fn on_s3(s: &Setup, name: &str) -> bool {
    s.remote("").iter().any(|n| n == name)
}

/// A holder that renews while idle: a second instance waits for it however quiet.
const RENEW: [(&str, &str); 1] = [("CVM_LEASE_WHILE_IDLE", "renew")];

#[test]
fn a_second_instance_waits_and_takes_over_within_seconds_of_a_graceful_stop() {
    let s = Setup::new();
    let (mut a, ad) = s.boot("a", &RENEW);
    assert!(a.log_text().contains("lease: held"), "{}", a.log_text());
    write(&ad.state, "from-a.txt", "a1");
    wait_until(T, "a's file on S3", || on_s3(&s, "from-a.txt"));
    let before = s.remote("");
    let (code, out) = check(&s, &Dirs::new(s.tmp.path(), "check"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok       lease: held by instance"), "{out}");
    assert!(
        out.contains("no conditional writes"),
        "Garage ignores them: {out}"
    );

    // One that may not wait gives up, naming the holder.
    let impatient = Dirs::new(s.tmp.path(), "impatient");
    let mut i = s.start(&impatient, &[("CVM_LEASE_WAIT", "1s")]);
    assert_eq!(i.wait_exit(T), 75, "{}", i.log_text());
    assert!(
        i.log_text().contains("CVM_LEASE_TAKEOVER="),
        "{}",
        i.log_text()
    );
    assert!(!ready(&mut i));
    assert_eq!(s.remote(""), before, "the impatient one changed the bucket");

    let bd = Dirs::new(s.tmp.path(), "b");
    let mut b = s.start(&bd, &[]);
    // Three TTLs of waiting (a poll a second) while a renews.
    wait_until(T, "b to wait through three TTLs", || waits(&mut b) >= 9);
    assert!(!ready(&mut b), "b's gateway started beside a's");
    assert!(
        b.log_text().contains("held by instance"),
        "{}",
        b.log_text()
    );
    assert!(
        !bd.state.join("from-a.txt").exists(),
        "b restored while a held the lease"
    );
    // a keeps working; the bucket holds what a wrote and nothing from b.
    write(&ad.state, "from-a-2.txt", "a2");
    wait_until(T, "a's second file on S3", || on_s3(&s, "from-a-2.txt"));
    let mut after = s.remote("");
    // a's own writes: its second file, and the tree that file replaced.
    after.retain(|n| n != "from-a-2.txt" && !n.starts_with(".cvm/hist/.cvm/tree.json/"));
    assert_eq!(after, before, "b changed the bucket while it waited");

    assert_eq!(a.stop(T), 0);
    let stopped = Instant::now();
    b.wait_ready(T);
    let took = stopped.elapsed();
    assert!(
        took <= Duration::from_secs(5),
        "b took {took:?} to take over"
    );
    assert_eq!(
        std::fs::read_to_string(bd.state.join("from-a.txt")).unwrap(),
        "a1"
    );
    assert_eq!(
        std::fs::read_to_string(bd.state.join("from-a-2.txt")).unwrap(),
        "a2"
    );
    assert_eq!(b.stop(T), 0);
    eprintln!("takeover after a graceful stop: {took:?}");
}

#[test]
fn a_crashed_holder_is_taken_over_after_the_ttl_and_its_own_volume_at_once() {
    let s = Setup::new();
    let (mut a, ad) = s.boot("a", &[]);
    write(&ad.state, "from-a.txt", "a1");
    wait_until(T, "a's file on S3", || on_s3(&s, "from-a.txt"));
    a.kill_all();
    let killed = Instant::now();
    let bd = Dirs::new(s.tmp.path(), "b");
    let mut b = s.start(&bd, &[]);
    b.wait_ready(T);
    let took = killed.elapsed();
    assert!(took >= TTL, "b took a live-looking lease after {took:?}");
    assert!(took <= TTL + Duration::from_secs(5), "b took {took:?}");
    assert_eq!(
        std::fs::read_to_string(bd.state.join("from-a.txt")).unwrap(),
        "a1"
    );
    eprintln!("takeover after SIGKILL: {took:?}");

    // b dies too, and comes back on its own volume: its own lease, at once.
    b.kill_all();
    let killed = Instant::now();
    let mut b2 = s.start(&bd, &[]);
    b2.wait_ready(T);
    let took = killed.elapsed();
    assert!(
        took < TTL,
        "the same volume waited {took:?} for its own lease"
    );
    assert!(b2.log_text().contains("Own"), "{}", b2.log_text());

    // An operator who knows b2 is dead names it: taken at once.
    b2.kill_all();
    let id = std::fs::read_to_string(bd.local.join("instance-id")).unwrap();
    let killed = Instant::now();
    let cd = Dirs::new(s.tmp.path(), "c");
    let mut c = s.start(&cd, &[("CVM_LEASE_TAKEOVER", id.trim())]);
    c.wait_ready(T);
    let took = killed.elapsed();
    assert!(took < TTL, "an explicit takeover waited {took:?}");
    assert!(c.log_text().contains("TakeOver"), "{}", c.log_text());
    assert_eq!(c.stop(T), 0);
}

#[test]
fn a_holder_frozen_past_its_lease_uploads_nothing_when_it_wakes_and_exits_73() {
    let s = Setup::new();
    let (mut a, ad) = s.boot("a", &[]);
    write(&ad.state, "before.txt", "a1");
    wait_until(T, "a's file on S3", || on_s3(&s, "before.txt"));
    let mut tree = descendants(a.pid());
    tree.push(a.pid());
    for p in &tree {
        kill(Pid::from_raw(*p), Signal::SIGSTOP).unwrap();
    }
    let bd = Dirs::new(s.tmp.path(), "b");
    let mut b = s.start(&bd, &[]);
    b.wait_ready(T);
    write(&bd.state, "from-b.txt", "b1");
    wait_until(T, "b's file on S3", || on_s3(&s, "from-b.txt"));

    for p in &tree {
        let _ = kill(Pid::from_raw(*p), Signal::SIGCONT);
    }
    write(&ad.state, "late-a.txt", "written after a woke");
    assert_eq!(a.wait_exit(T), 73, "{}", a.log_text());
    let log = a.log_text();
    assert!(log.contains("lost the bucket prefix's lease"), "{log}");
    assert!(
        log.contains("late-a.txt"),
        "what a could not upload is named: {log}"
    );
    assert!(
        !on_s3(&s, "late-a.txt"),
        "a uploaded after its lease was taken"
    );
    assert_eq!(
        std::fs::read_to_string(ad.state.join("late-a.txt")).unwrap(),
        "written after a woke"
    );

    assert_eq!(b.stop(T), 0);
    let (mut c, cd) = s.boot("c", &[]);
    assert_eq!(
        std::fs::read_to_string(cd.state.join("from-b.txt")).unwrap(),
        "b1"
    );
    assert_eq!(
        std::fs::read_to_string(cd.state.join("before.txt")).unwrap(),
        "a1"
    );
    assert!(!cd.state.join("late-a.txt").exists());
    assert_eq!(c.stop(T), 0);
}

#[test]
fn an_idle_holder_lets_its_lease_lapse_a_second_instance_takes_over_and_the_holder_exits_73_at_its_next_write(
) {
    let s = Setup::new();
    let (mut a, ad) = s.boot("a", &[]);
    let paused = |a: &mut Appliance| a.log_text().matches("lease: idle, renewals paused").count();
    wait_until(T, "a's renewals to pause", || paused(&mut a) >= 1);
    // Once its lease has lapsed, a change wakes a: it verifies the lease
    // (its fence closed) and uploads the change.
    let lapsed = Instant::now() + TTL;
    wait_until(T, "a's lease to lapse", || Instant::now() >= lapsed);
    write(&ad.state, "from-a.txt", "a1");
    wait_until(T, "a's file on S3", || on_s3(&s, "from-a.txt"));
    assert!(
        a.log_text().contains("lease: verified again and renewed"),
        "{}",
        a.log_text()
    );
    wait_until(T, "a's renewals to pause again", || paused(&mut a) >= 2);

    // A second instance sees the lease unchanged for a TTL and takes it.
    let bd = Dirs::new(s.tmp.path(), "b");
    let started = Instant::now();
    let mut b = s.start(&bd, &[]);
    b.wait_ready(T);
    let took = started.elapsed();
    assert!(took >= TTL, "b took a renewed lease after {took:?}");
    assert!(b.log_text().contains("Expired"), "{}", b.log_text());
    assert_eq!(
        std::fs::read_to_string(bd.state.join("from-a.txt")).unwrap(),
        "a1"
    );

    // a's next change finds the lease gone: nothing of it goes up, a says
    // what it holds that is not on S3, and stops.
    write(&ad.state, "late-a.txt", "written after b took over");
    assert_eq!(a.wait_exit(T), 73, "{}", a.log_text());
    let log = a.log_text();
    assert!(log.contains("lost the bucket prefix's lease"), "{log}");
    assert!(log.contains("late-a.txt"), "{log}");
    assert!(!on_s3(&s, "late-a.txt"), "a uploaded after b took over");
    assert_eq!(
        std::fs::read_to_string(ad.state.join("late-a.txt")).unwrap(),
        "written after b took over"
    );
    assert_eq!(b.stop(T), 0);
    eprintln!("takeover of an idle holder: {took:?}");
}

#[test]
fn s3_down_longer_than_the_ttl_keeps_the_gateway_and_verifies_the_lease_on_return() {
    let mut s = Setup::new();
    let (mut a, ad) = s.boot("a", &[]);
    // READY comes as the gateway is spawned; its script then execs sleep.
    let gateway_pid = |a: &Appliance| {
        descendants(a.pid()).into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("100000"))
        })
    };
    wait_until(T, "the gateway's sleep", || gateway_pid(&a).is_some());
    let gateway = gateway_pid(&a);
    s.g.stop();
    write(&ad.state, "during.txt", "written while S3 was down");
    // More than three TTLs behind, by a's own report.
    wait_until(T, "three TTLs of S3 outage", || {
        a.notified().iter().any(|l| {
            l.strip_prefix("STATUS=S3 writes ")
                .and_then(|r| r.split('s').next())
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|secs| secs > 3 * TTL.as_secs())
        })
    });
    assert!(a.log_text().contains("lease: cannot"), "{}", a.log_text());
    s.g.restart();
    wait_until(T, "the lease verified again", || {
        a.log_text().contains("lease: verified again")
    });
    wait_until(T, "the file written during the outage on S3", || {
        on_s3(&s, "during.txt")
    });
    assert_eq!(gateway_pid(&a), gateway, "the gateway was restarted");
    assert_eq!(a.stop(T), 0);
}

#[test]
fn with_conditional_writes_exactly_one_of_two_simultaneous_instances_holds_the_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let m = Moto::start(tmp.path());
    let idle = script(tmp.path(), "idle.sh", "exec sleep 100000")
        .display()
        .to_string();
    for round in 0..20 {
        let start = |name: &str| {
            let dirs = Dirs::new(tmp.path(), &format!("{round}-{name}"));
            let mut env = m.s3_env();
            env.extend(dirs.env());
            env.push(("S3_PREFIX".into(), format!("round-{round}")));
            env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
            env.push(("CVM_GATEWAY_CMD".into(), idle.clone()));
            env.extend(RENEW.map(|(k, v)| (k.into(), v.into())));
            (Appliance::start(&dirs, &env), dirs)
        };
        let (mut a, _) = start("a");
        let (mut b, _) = start("b");
        wait_until(T, "one instance ready", || ready(&mut a) || ready(&mut b));
        let (winner, loser) = if ready(&mut a) {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        wait_until(T, "the other to wait", || waits(loser) >= 2);
        assert!(!ready(loser), "round {round}: both hold the lease");
        assert!(
            winner.log_text().contains("Conditional"),
            "{}",
            winner.log_text()
        );
        assert_eq!(loser.stop(T), 0, "round {round}: {}", loser.log_text());
        assert_eq!(winner.stop(T), 0, "round {round}: {}", winner.log_text());
    }
}

#[test]
fn the_mount_layout_waits_for_the_lease_too() {
    let s = Setup::new();
    let mount = [("CVM_STORAGE", "mount")];
    let (mut a, ad) = s.boot("a", &mount);
    write(&ad.state, "from-a.txt", "a1");
    let bd = Dirs::new(s.tmp.path(), "b");
    let mut b = s.start(&bd, &mount);
    wait_until(T, "b to wait", || waits(&mut b) >= 3);
    assert!(!ready(&mut b), "b's gateway started beside a's");
    assert_eq!(a.stop(T), 0);
    let stopped = Instant::now();
    b.wait_ready(T);
    assert!(
        stopped.elapsed() <= Duration::from_secs(5),
        "took {:?}",
        stopped.elapsed()
    );
    assert_eq!(
        std::fs::read_to_string(bd.state.join("from-a.txt")).unwrap(),
        "a1"
    );
    assert_eq!(b.stop(T), 0);
}
