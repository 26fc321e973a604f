//! Test harness: a real Garage S3 server per test, the real cvm-init binary,
//! real rclone and FUSE. Everything a test starts is killed and unmounted
//! when its guard drops, also when the test fails.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod load;
pub mod model;
pub mod replica;

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

pub const BIN: &str = env!("CARGO_BIN_EXE_cvm-init");
/// `rclone obscure potato`: a valid crypt password for tests.
pub const PASSWORD: &str = "ubtafWYbU0c8NpC9CUBaxEr8xvy76Q";

/// Polls `cond` until it holds or `timeout` passes; panics with `what` then.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port free now and never handed out before in this process: the
/// kernel can give the same ephemeral port to two binds in a row once the
/// first listener is closed (seen: Garage's RPC and admin ports the same,
/// and a metrics read that hung on the RPC listener).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn find_program(name: &str, env: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return p.into();
    }
    let home_cargo = Path::new(&std::env::var("HOME").unwrap_or_default())
        .join(".cargo/bin")
        .join(name);
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain([home_cargo])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found on PATH or in ~/.cargo/bin (set {env}); .ci/run installs it")
        })
}

pub fn rclone_bin() -> PathBuf {
    find_program("rclone", "RCLONE_BIN")
}

pub fn hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A single-node Garage with one bucket and one key, on its own ports and directory.
pub struct Garage {
    pub dir: PathBuf,
    pub bin: PathBuf,
    config: PathBuf,
    server: Option<Child>,
    pub endpoint: String,
    admin_port: u16,
    rpc_secret: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

pub const REGION: &str = "garage";
/// `CVM_LEASE_TTL` in tests.
pub const LEASE_TTL: &str = "3s";

impl Garage {
    pub fn start(dir: &Path) -> Garage {
        let dir = dir.join("garage");
        fs::create_dir_all(&dir).unwrap();
        let mut g = Garage {
            bin: find_program("garage", "GARAGE_BIN"),
            config: dir.join("garage.toml"),
            dir,
            server: None,
            endpoint: String::new(),
            admin_port: 0,
            rpc_secret: hex(32),
            bucket: "cvm-test".into(),
            key_id: format!("GK{}", hex(12)),
            secret: hex(32),
        };
        // A port picked free can be taken before Garage binds it (tests run in
        // parallel and every client connection uses an ephemeral port): retry
        // with new ports when the server dies at start.
        let started = (0..5).any(|_| {
            g.write_config();
            g.run_server()
        });
        assert!(
            started,
            "garage did not start; its log:\n{}",
            fs::read_to_string(g.dir.join("server.log")).unwrap_or_default()
        );
        let out = g.cli(&["node", "id", "-q"]);
        let node = out.split('@').next().unwrap().trim().to_owned();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["bucket", "create", &g.bucket.clone()]);
        g.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "test",
            &g.key_id.clone(),
            &g.secret.clone(),
        ]);
        g.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &g.bucket.clone(),
            "--key",
            &g.key_id.clone(),
        ]);
        // Garage answers 400 for a moment after the layout is applied: wait
        // until it serves the bucket to the key, as a client will see it.
        let conf = g.dir.join("ready-rclone.conf");
        fs::write(
            &conf,
            format!(
                "[s3]\ntype = s3\nprovider = Other\naccess_key_id = {}\nsecret_access_key = {}\n\
                 endpoint = {}\nregion = {REGION}\n",
                g.key_id, g.secret, g.endpoint
            ),
        )
        .unwrap();
        wait_until(
            Duration::from_secs(20),
            "garage to serve the bucket",
            || {
                Command::new(rclone_bin())
                    .arg("--config")
                    .arg(&conf)
                    .args([
                        "lsf",
                        "--low-level-retries",
                        "1",
                        &format!("s3:{}", g.bucket),
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
        g
    }

    /// Picks fresh ports and writes the config for them.
    fn write_config(&mut self) {
        let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
        fs::write(
            &self.config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\ncompression_level = \"none\"\nrpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin_port}\"\n",
                d = self.dir.display(),
                secret = self.rpc_secret
            ),
        )
        .unwrap();
        self.endpoint = format!("http://127.0.0.1:{s3_port}");
        self.admin_port = admin_port;
    }

    /// Starts the server on the configured ports; false if it died or never answered.
    fn run_server(&mut self) -> bool {
        let log = fs::File::create(self.dir.join("server.log")).unwrap();
        let child = Command::new(&self.bin)
            .args(["-c".as_ref(), self.config.as_os_str(), "server".as_ref()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start garage");
        self.server = Some(child);
        let port = self.endpoint.rsplit(':').next().unwrap().to_owned();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.server.as_mut().unwrap().try_wait().unwrap().is_some() {
                self.server = None;
                return false;
            }
            if self.try_cli(&["status"]).is_ok()
                && std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("garage {args:?}: {e}"))
    }

    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text
    }

    /// S3 requests Garage has served, by API endpoint (`PutObject`, `ListObjects`, …),
    /// read from its metrics: the server's own count of what clients asked.
    pub fn s3_requests(&self) -> std::collections::BTreeMap<String, u64> {
        self.metrics()
            .lines()
            .filter_map(|l| l.strip_prefix("api_s3_request_counter{api_endpoint=\""))
            .filter_map(|l| {
                let (name, rest) = l.split_once("\"}")?;
                Some((name.to_owned(), rest.trim().parse().ok()?))
            })
            .collect()
    }

    /// Object bytes Garage has written to its block store (compression is
    /// off, so this is what clients uploaded, less deduplicated blocks).
    pub fn bytes_written(&self) -> u64 {
        self.metrics()
            .lines()
            .filter_map(|l| l.strip_prefix("block_bytes_written"))
            .filter_map(|rest| rest.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    }

    /// Stops the server (S3 becomes unreachable); data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Leaves the server running past this handle (a bench's bucket kept
    /// to work on by hand); returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.server.take().map(|c| c.id())
    }

    /// Restarts on the same ports (clients keep their endpoint).
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.run_server(),
            "garage did not restart; its log:\n{}",
            fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }

    /// The env that puts cvm-init in S3 mode against this Garage.
    pub fn s3_env(&self) -> Vec<(String, String)> {
        [
            ("S3_BUCKET", self.bucket.as_str()),
            ("S3_ENDPOINT", self.endpoint.as_str()),
            ("S3_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", self.key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.as_str()),
            // A crashed instance's lease is taken over after this: short, so
            // a test's "new container after a crash" boots within seconds.
            ("CVM_LEASE_TTL", LEASE_TTL),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// An rclone config for stock rclone: the plain remote `s3`, and `crypt`
    /// over `s3:<bucket>/<prefix>` with the given (already obscured) passwords.
    pub fn rclone_config(
        &self,
        dir: &Path,
        prefix: &str,
        password: &str,
        password2: Option<&str>,
    ) -> PathBuf {
        let path = dir.join("stock-rclone.conf");
        let mut text = format!(
            "[s3]\ntype = s3\nprovider = Other\naccess_key_id = {}\nsecret_access_key = {}\n\
             endpoint = {}\nregion = {REGION}\nno_check_bucket = true\n\n\
             [crypt]\ntype = crypt\nremote = s3:{}/{prefix}\nfilename_encryption = standard\n\
             directory_name_encryption = true\npassword = {password}\n",
            self.key_id, self.secret, self.endpoint, self.bucket
        );
        if let Some(p2) = password2 {
            text.push_str(&format!("password2 = {p2}\n"));
        }
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A stock rclone config for `g`'s bucket with the test password at the default prefix.
pub fn stock_config(g: &Garage, dir: &Path) -> PathBuf {
    g.rclone_config(dir, "openclaw-state", PASSWORD, None)
}

/// Runs stock rclone with `config`; returns stdout or panics with stderr.
pub fn rclone(config: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(rclone_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rclone {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Every raw object of the bucket with its hash, sorted: what "byte-identical" means here.
/// The lease (rewritten by every boot that takes it) is left out: it is
/// cvm-init's, not state.
pub fn raw_state(g: &Garage, dir: &Path) -> String {
    let conf = stock_config(g, dir);
    let out = String::from_utf8(rclone(&conf, &["md5sum", &format!("s3:{}", g.bucket)])).unwrap();
    let lease = String::from_utf8(rclone(
        &conf,
        &["cryptdecode", "--reverse", "crypt:", ".cvm/lease"],
    ))
    .unwrap();
    let lease = lease
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned();
    // rclone lists in whatever order its checkers finish.
    let mut lines: Vec<&str> = out
        .lines()
        .filter(|l| !l.ends_with(&format!("/{lease}")))
        .collect();
    lines.sort_unstable();
    lines.join("\n")
}

pub fn obscure(plain: &str) -> String {
    let out = Command::new(rclone_bin())
        .args(["obscure", plain])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// One run of the real cvm-init binary with its own directories.
pub struct Appliance {
    child: Option<Child>,
    pid: i32,
    pub log: PathBuf,
    notify: UnixDatagram,
    /// Every sd-notify line received so far.
    notified: Vec<String>,
    pub state_dir: PathBuf,
    pub local_dir: PathBuf,
    pub run_dir: PathBuf,
    status: Option<ExitStatus>,
}

/// Fresh per-boot directories under `root`, as a new container would have.
pub struct Dirs {
    pub state: PathBuf,
    pub local: PathBuf,
    pub run: PathBuf,
}

impl Dirs {
    pub fn new(root: &Path, name: &str) -> Dirs {
        let base = root.join(name);
        fs::create_dir_all(&base).unwrap();
        Dirs {
            state: base.join("state"),
            local: base.join("local"),
            run: base.join("run"),
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "OPENCLAW_STATE_DIR".into(),
                self.state.display().to_string(),
            ),
            ("CVM_LOCAL_DIR".into(), self.local.display().to_string()),
            ("CVM_RUN_DIR".into(), self.run.display().to_string()),
            ("RCLONE_BIN".into(), rclone_bin().display().to_string()),
        ]
    }
}

/// An XFS file system with reflinks, on a loop device over a sparse file
/// below `root`, mounted at `root/xfs` until the guard drops (declare it
/// before the appliances that use it: they drop, and unmount, first).
pub struct Xfs {
    pub dir: PathBuf,
}

impl Xfs {
    pub fn mount(root: &Path, bytes: u64) -> Xfs {
        let image = root.join("xfs.img");
        let dir = root.join("xfs");
        fs::create_dir_all(&dir).unwrap();
        fs::File::create(&image).unwrap().set_len(bytes).unwrap();
        let run = |c: &mut Command| {
            let out = c
                .output()
                .unwrap_or_else(|e| panic!("{c:?}: {e} (scripts/setup installs xfsprogs)"));
            assert!(
                out.status.success(),
                "{c:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&dir));
        Xfs { dir }
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        unmount_below(&self.dir);
    }
}

/// Writes an executable shell script to stand in for the gateway.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = fs::File::create(&path).unwrap();
    writeln!(f, "#!/bin/sh\n{body}").unwrap();
    drop(f);
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

impl Appliance {
    /// Starts cvm-init with exactly `env` (plus PATH and HOME), logging to `dirs`' parent.
    pub fn start(dirs: &Dirs, env: &[(String, String)]) -> Appliance {
        Self::start_wrapped(dirs, env, &[])
    }

    /// Like [`Appliance::start`], through `wrapper` (e.g. `unshare …`); cvm-init
    /// is then exec'd by the wrapper, the binary path being its last argument.
    pub fn start_wrapped(dirs: &Dirs, env: &[(String, String)], wrapper: &[&str]) -> Appliance {
        let parent = dirs.state.parent().unwrap();
        let log = parent.join("cvm-init.log");
        let notify_path = parent.join("notify.sock");
        let _ = fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut cmd = match wrapper {
            [] => Command::new(BIN),
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("NOTIFY_SOCKET", &notify_path)
            .env("CVM_LOG", "debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(fs::File::create(parent.join("cvm-init.stdout")).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .process_group(0);
        let child = cmd.spawn().unwrap();
        Appliance {
            pid: child.id() as i32,
            child: Some(child),
            log,
            notify,
            notified: Vec::new(),
            state_dir: dirs.state.clone(),
            local_dir: dirs.local.clone(),
            run_dir: dirs.run.clone(),
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Receives one sd-notify message (waiting up to the socket's read timeout).
    fn recv_notify(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        match self.notify.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.notified.extend(msg.lines().map(str::to_owned));
                true
            }
            Err(_) => false,
        }
    }

    /// Every sd-notify line cvm-init has sent so far.
    pub fn notified(&mut self) -> &[String] {
        while self.recv_notify() {}
        &self.notified
    }

    /// Waits for sd-notify READY=1 (the gateway runs on live storage).
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.recv_notify() && self.notified.iter().any(|l| l == "READY=1") {
                return;
            }
            if let Some(st) = self.try_status() {
                panic!(
                    "cvm-init exited ({st}) before READY=1; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no READY=1 within {timeout:?}; log:\n{}",
                self.log_text()
            );
        }
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.as_mut().unwrap().try_wait().unwrap();
        }
        self.status
    }

    /// Waits for cvm-init to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        wait_until(timeout, "cvm-init to exit", || self.try_status().is_some());
        let st = self.status.unwrap();
        st.code()
            .unwrap_or_else(|| panic!("cvm-init died by a signal: {st}; log:\n{}", self.log_text()))
    }

    /// The pid (in our namespace) of the cvm-init process itself, which a
    /// wrapper may have started as its child.
    pub fn init_pid(&self) -> i32 {
        let is_init =
            |p: i32| fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == Path::new(BIN));
        if is_init(self.pid) {
            return self.pid;
        }
        descendants(self.pid)
            .into_iter()
            .find(|&p| is_init(p))
            .expect("cvm-init is running")
    }

    /// SIGKILLs cvm-init and everything under it at once, as a crash or an
    /// OOM kill of the container would, and waits for cvm-init to be gone.
    pub fn kill_all(&mut self) {
        let mut all = descendants(self.pid);
        all.push(self.pid);
        for p in all {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        wait_until(Duration::from_secs(10), "cvm-init to die", || {
            self.try_status().is_some()
        });
    }

    /// SIGTERM, then the exit code.
    pub fn stop(&mut self, timeout: Duration) -> i32 {
        self.signal(Signal::SIGTERM);
        self.wait_exit(timeout)
    }
}

/// Every live process whose parent chain leads to `root` (not `root` itself).
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parent = std::collections::HashMap::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some((ppid, _)) = proc_stat(pid) {
            parent.insert(pid, ppid);
        }
    }
    let mut out = Vec::new();
    for &pid in parent.keys() {
        let mut p = pid;
        while let Some(&pp) = parent.get(&p) {
            if pp == root {
                out.push(pid);
                break;
            }
            p = pp;
        }
    }
    out
}

/// The process under `app` whose command line (arguments NUL-separated)
/// contains `needle`.
pub fn descendant_with(app: &Appliance, needle: &str) -> i32 {
    descendants(app.pid())
        .into_iter()
        .find(|p| {
            fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .contains(needle)
        })
        .unwrap_or_else(|| panic!("no process with {needle:?} in its command line under cvm-init"))
}

/// The lines of a file a test's stand-in gateway appends to; none if it is not there yet.
pub fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// (ppid, state) of `pid` from /proc/<pid>/stat.
pub fn proc_stat(pid: i32) -> Option<(i32, char)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Lazily unmounts every mount at or below `root`.
pub fn unmount_below(root: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in info.lines() {
        if let Some(mp) = line.split(' ').nth(4) {
            if Path::new(mp).starts_with(root) {
                let _ = Command::new("umount").args(["-l", mp]).status();
            }
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            for pid in descendants(self.pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = self.child.as_mut().unwrap().wait();
        }
        unmount_below(self.state_dir.parent().unwrap());
        if std::thread::panicking() {
            eprintln!(
                "--- cvm-init log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// An S3 server that honours conditional writes (`If-None-Match`,
/// `If-Match`), which Garage ignores: moto's, from PyPI.
pub struct Moto {
    server: Child,
    pub endpoint: String,
    pub bucket: String,
}

impl Moto {
    pub fn start(dir: &Path) -> Moto {
        let port = free_port();
        let server = Command::new(find_program("moto_server", "MOTO_SERVER"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(fs::File::create(dir.join("moto.log")).unwrap())
            .stderr(fs::File::create(dir.join("moto.err")).unwrap())
            .spawn()
            .unwrap();
        let m = Moto {
            server,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: "cvm-cas".into(),
        };
        // Bucket creation needs no signature on moto.
        wait_until(Duration::from_secs(30), "moto to create the bucket", || {
            use std::io::{Read, Write as _};
            let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                return false;
            };
            let req = format!(
                "PUT /{} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                m.bucket
            );
            let mut answer = String::new();
            c.write_all(req.as_bytes()).is_ok()
                && c.read_to_string(&mut answer).is_ok()
                && answer.starts_with("HTTP/1.1 200")
        });
        m
    }

    pub fn s3_env(&self) -> Vec<(String, String)> {
        [
            ("S3_BUCKET", self.bucket.as_str()),
            ("S3_ENDPOINT", self.endpoint.as_str()),
            ("S3_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("CVM_LEASE_TTL", LEASE_TTL),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
