//! Container-level proof with a real OCI runtime (podman + runc): an image
//! with the Nix image's contents and entrypoint (`scripts/container-image`),
//! cvm-init as PID 1, against Garage on the host's loopback.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use common::{wait_until, Garage, BIN, PASSWORD};

const T: Duration = Duration::from_secs(60);
const IMAGE: &str = "localhost/cvm-init-test:latest";

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .arg("--runtime")
        .arg("runc")
        .args(args)
        .output()
        .expect("podman runs")
}

fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/container-image");
        let out = Command::new(script).args([IMAGE, BIN]).output().unwrap();
        assert!(
            out.status.success(),
            "container-image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    IMAGE
}

/// Seconds since boot, the clock a container shares with the host.
fn uptime() -> f64 {
    fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

struct Container {
    name: String,
}

impl Container {
    /// Starts a detached container; `flags` go before the image.
    fn run(name: &str, flags: &[String]) -> Container {
        let _ = podman(&["rm", "-f", name]);
        let mut args: Vec<&str> = vec!["run", "-d", "--name", name, "--network", "host"];
        args.extend(flags.iter().map(String::as_str));
        args.push(image());
        let out = podman(&args);
        assert!(
            out.status.success(),
            "podman run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Container {
            name: name.to_owned(),
        }
    }

    fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    fn exec(&self, script: &str) -> String {
        let out = podman(&["exec", &self.name, "sh", "-c", script]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn running(&self) -> bool {
        String::from_utf8_lossy(
            &podman(&["inspect", "--format", "{{.State.Running}}", &self.name]).stdout,
        )
        .trim()
            == "true"
    }

    fn exit_code(&self) -> i32 {
        wait_until(T, "the container to exit", || !self.running());
        String::from_utf8_lossy(
            &podman(&["inspect", "--format", "{{.State.ExitCode}}", &self.name]).stdout,
        )
        .trim()
        .parse()
        .unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- podman logs {} ---\n{}", self.name, self.logs());
        }
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

struct Setup {
    tmp: tempfile::TempDir,
    g: Garage,
    out: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let g = Garage::start(tmp.path());
        let out = tmp.path().join("out");
        fs::create_dir_all(&out).unwrap();
        Setup { tmp, g, out }
    }

    /// `-e` flags for S3 mode against this Garage, a gateway script, and /out mounted.
    fn flags(&self, gateway: &str, extra: &[(&str, &str)]) -> Vec<String> {
        let mut env = self.g.s3_env();
        env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
        env.push(("CVM_GATEWAY_CMD".into(), format!("sh -c '{gateway}'")));
        env.push(("CVM_LOG".into(), "debug".into()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut flags = vec!["-v".to_owned(), format!("{}:/out", self.out.display())];
        for (k, v) in env {
            flags.push("-e".into());
            flags.push(format!("{k}={v}"));
        }
        flags
    }

    fn marker(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }
}

const WRITER: &str = "mkdir -p /data/openclaw/agents/main && echo state-$RUN > /data/openclaw/agents/main/notes.md && \
                      echo {} > /data/openclaw/openclaw.json && touch /out/$RUN && exec sleep 100000";

#[test]
fn replicate_without_privileges_stops_clean_and_restores_in_a_new_container() {
    let s = Setup::new();
    let c1 = Container::run("cvm-t-rep1", &s.flags(WRITER, &[("RUN", "one")]));
    wait_until(T, "the gateway in container 1", || s.marker("one").exists());
    let out = podman(&["stop", "-t", "10", &c1.name]);
    assert!(out.status.success());
    assert_eq!(c1.exit_code(), 0, "{}", c1.logs());
    assert!(c1.logs().contains("shutdown: done"), "{}", c1.logs());

    let idle = "touch /out/two && exec sleep 100000";
    let c2 = Container::run("cvm-t-rep2", &s.flags(idle, &[]));
    wait_until(T, "container 2", || s.marker("two").exists());
    assert_eq!(
        c2.exec("cat /data/openclaw/agents/main/notes.md").trim(),
        "state-one"
    );
    assert!(c2.logs().contains("replicate layout"), "{}", c2.logs());
}

#[test]
fn podman_kill_loses_at_most_the_rpo() {
    let s = Setup::new();
    // A file every 100 ms, its number and the shared clock logged to /out.
    let writer = "mkdir -p /data/openclaw/log; i=0; while :; do i=$((i+1)); echo $i > /data/openclaw/log/$i; \
                  read up _ < /proc/uptime; echo \"$i $up\" >> /out/written; sleep 0.1; done";
    let c1 = Container::run("cvm-t-kill1", &s.flags(writer, &[]));
    wait_until(T, "30 files", || {
        fs::read_to_string(s.marker("written"))
            .unwrap_or_default()
            .lines()
            .count()
            >= 30
    });
    let killed_at = uptime();
    assert!(podman(&["kill", &c1.name]).status.success());
    assert_ne!(c1.exit_code(), 0);
    let written: Vec<(u64, f64)> = fs::read_to_string(s.marker("written"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (i, t) = l.split_once(' ')?;
            Some((i.parse().ok()?, t.parse().ok()?))
        })
        .collect();

    let c2 = Container::run(
        "cvm-t-kill2",
        &s.flags("touch /out/up && exec sleep 100000", &[]),
    );
    wait_until(T, "container 2", || s.marker("up").exists());
    let restored: Vec<u64> = c2
        .exec("ls /data/openclaw/log")
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let bound = 3.0;
    for (i, t) in &written {
        assert!(
            restored.contains(i) || killed_at - t <= bound,
            "file {i}, written {:.2}s before the kill, is lost",
            killed_at - t
        );
    }
}

#[test]
fn pid_1_reaps_a_burst_of_orphans() {
    let s = Setup::new();
    let burst = "for i in $(seq 50); do (sleep 0.2 &) ; done; touch /out/burst; exec sleep 100000";
    let c = Container::run("cvm-t-zomb", &s.flags(burst, &[]));
    wait_until(T, "the burst", || s.marker("burst").exists());
    wait_until(T, "50 orphans reaped", || {
        c.logs().matches("reaped orphan").count() >= 50
    });
    wait_until(T, "no zombies", || {
        !c.exec("cat /proc/[0-9]*/stat")
            .lines()
            .any(|l| l.rsplit(") ").next().is_some_and(|r| r.starts_with("Z ")))
    });
    assert_eq!(c.exec("cat /proc/1/comm").trim(), "cvm-init");
}

#[test]
fn the_mount_layout_runs_privileged_from_an_env_file_as_the_spec_does() {
    let s = Setup::new();
    let env_file = s.tmp.path().join("r2.env");
    let mut text = String::new();
    for (k, v) in s.g.s3_env() {
        text.push_str(&format!("{k}={v}\n"));
    }
    text.push_str(&format!(
        "RCLONE_CRYPT_PASSWORD={PASSWORD}\nCVM_STORAGE=mount\n"
    ));
    fs::write(&env_file, text).unwrap();
    let flags = |gateway: &str, run: &str| {
        vec![
            "--privileged".to_owned(),
            "--env-file".into(),
            env_file.display().to_string(),
            "-e".into(),
            format!("RUN={run}"),
            "-e".into(),
            format!("CVM_GATEWAY_CMD=sh -c '{gateway}'"),
            "-v".into(),
            format!("{}:/out", s.out.display()),
        ]
    };
    let c1 = Container::run("cvm-t-mnt1", &flags(WRITER, "m1"));
    wait_until(T, "the gateway on the mount", || s.marker("m1").exists());
    assert!(podman(&["stop", "-t", "10", &c1.name]).status.success());
    assert_eq!(c1.exit_code(), 0, "{}", c1.logs());
    assert!(c1.logs().contains("mount layout"), "{}", c1.logs());

    let c2 = Container::run(
        "cvm-t-mnt2",
        &flags("touch /out/m2 && exec sleep 100000", "m2"),
    );
    wait_until(T, "container 2", || s.marker("m2").exists());
    assert_eq!(
        c2.exec("cat /data/openclaw/agents/main/notes.md").trim(),
        "state-m1"
    );
}

#[test]
fn the_mount_layout_without_fuse_fails_with_the_clear_error() {
    let s = Setup::new();
    let c = Container::run(
        "cvm-t-nofuse",
        &s.flags("exec sleep 100000", &[("CVM_STORAGE", "mount")]),
    );
    assert_eq!(c.exit_code(), 71, "{}", c.logs());
    let logs = c.logs();
    assert!(logs.contains("FUSE is not available"), "{logs}");
    assert!(
        logs.contains("--device /dev/fuse --cap-add SYS_ADMIN` or `--privileged`"),
        "{logs}"
    );
}

#[test]
fn cvm_init_check_runs_as_the_images_entrypoint() {
    let s = Setup::new();
    let check = |extra: &[(&str, &str)]| {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--rm".into(),
            "--network".into(),
            "host".into(),
        ];
        args.extend(s.flags("true", extra));
        args.push(image().into());
        args.push("check".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = podman(&args);
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = check(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok       s3:") && out.contains("ok       key:"),
        "{out}"
    );
    // No --device /dev/fuse: the mount layout's check names the problem.
    let (code, out) = check(&[("CVM_STORAGE", "mount")]);
    assert_eq!(code, 71, "{out}");
    assert!(
        out.contains("PROBLEM  fuse: FUSE is not available: /dev/fuse is missing"),
        "{out}"
    );
}
