//! Configuration from the environment: read once, validated as a whole before
//! anything is touched, every problem reported at once.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::obscure;
use crate::secret::Secret;
use crate::sqlite::Patterns;

/// The environment as given; every field a string so that a bad value becomes
/// a reported problem instead of the first and only error from the parser.
#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(serde::Serialize))]
struct RawEnv {
    s3_bucket: Option<String>,
    s3_endpoint: Option<String>,
    aws_access_key_id: Option<String>,
    aws_secret_access_key: Option<String>,
    rclone_crypt_password: Option<String>,
    rclone_crypt_password2: Option<String>,
    master_key: Option<String>,
    s3_provider: Option<String>,
    s3_prefix: Option<String>,
    s3_region: Option<String>,
    openclaw_state_dir: Option<String>,
    cvm_local_dir: Option<String>,
    cvm_run_dir: Option<String>,
    cvm_gateway_cmd: Option<String>,
    rclone_bin: Option<String>,
    openclaw_gateway_restart_delay: Option<String>,
    openclaw_gateway_restart_max_delay: Option<String>,
    openclaw_gateway_reset_after: Option<String>,
    cvm_stop_timeout: Option<String>,
    cvm_mount_timeout: Option<String>,
    cvm_s3_wait: Option<String>,
    cvm_sqlite_paths: Option<String>,
    cvm_backup_debounce: Option<String>,
    cvm_backup_interval: Option<String>,
    cvm_sqlite_base_max_age: Option<String>,
    cvm_sqlite_span_segments: Option<String>,
    cvm_storage: Option<String>,
    cvm_exclude: Option<String>,
    cvm_trash_days: Option<String>,
    cvm_history_days: Option<String>,
    cvm_restore_at: Option<String>,
    cvm_gateway_max_failed_starts: Option<String>,
    cvm_lease_ttl: Option<String>,
    cvm_lease_wait: Option<String>,
    cvm_lease_takeover: Option<String>,
    cvm_lease_while_idle: Option<String>,
}

pub const DEFAULT_STATE_DIR: &str = "/data/openclaw";
pub const DEFAULT_LOCAL_DIR: &str = "/data/openclaw-local";
pub const DEFAULT_RUN_DIR: &str = "/run/cvm-init";
/// From bench/sqlite.md: at 1 s a busy database loses a median 0.6 s and at
/// worst 1.3 s of commits in a crash (Litestream's measured figure is 0.95 s);
/// 2 s doubles that and cuts snapshot bytes about 3x. Durability first: 1 s.
pub const DEFAULT_BACKUP_DEBOUNCE: Duration = Duration::from_secs(1);
/// The stock copy's bound: a changed database's whole copy is at most this
/// old. Bases are otherwise taken when a restore would read 1.5 times the
/// database (`sqlite::backup::base_due`), so a shorter bound only costs
/// whole copies.
pub const DEFAULT_BASE_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_GATEWAY_CMD: &str = "openclaw gateway run --bind lan --port 18789";

/// Everything cvm-init needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The directory the gateway sees; the FUSE mountpoint in S3 mode.
    pub state_dir: PathBuf,
    /// Local disk for what must not live on FUSE (rclone's VFS cache).
    pub local_dir: PathBuf,
    /// Rendered rclone config, rc socket, notify socket.
    pub run_dir: PathBuf,
    pub gateway_cmd: Vec<String>,
    pub rclone_bin: String,
    pub restart: RestartPolicy,
    /// The whole shutdown, gateway stop to unmount, fits in this.
    pub stop_timeout: Duration,
    /// How long the mount may take to become live at boot.
    pub mount_timeout: Duration,
    /// How long boot waits for an unreachable S3 endpoint; `None` waits forever.
    pub s3_wait: Option<Duration>,
    /// `None` is local mode: no rclone, no S3.
    pub s3: Option<S3Config>,
    pub sqlite: SqliteConfig,
    /// How the state dir is backed in S3 mode.
    pub layout: Layout,
    /// rclone filter patterns never replicated (replicate layout).
    pub exclude: Vec<String>,
    /// Days of history kept: hourly restore points of databases and files,
    /// and days of the remote trash.
    pub history_days: u32,
    /// `CVM_RESTORE_AT`: boot from the state as it was then (replicate
    /// layout, `storage::replicate::rollback`), as given.
    pub restore_at: Option<String>,
    /// The single-writer lease on the bucket prefix (S3 mode).
    pub lease: LeaseConfig,
}

/// The lease one running instance holds on its bucket prefix (`remote::lease`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a lease lasts unrenewed: a crashed holder's is taken over
    /// after this (`CVM_LEASE_TTL`).
    pub ttl: Duration,
    /// How long boot waits for another holder; `None` waits forever (`CVM_LEASE_WAIT`).
    pub wait: Option<Duration>,
    /// The instance id of a holder the operator knows is dead: its lease is
    /// taken at once (`CVM_LEASE_TAKEOVER`).
    pub takeover: Option<String>,
    /// Whether renewals pause while nothing uploads (`CVM_LEASE_WHILE_IDLE`).
    pub while_idle: WhileIdle,
}

/// What the lease does while nothing uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhileIdle {
    /// No S3 request while idle; the lease lapses and the next upload takes
    /// it again first (the replicate layout's default).
    Pause,
    /// Renewed every third of the TTL, idle or not: a second instance waits
    /// for a live holder however quiet (the mount layout, whose rclone
    /// uploads are not fenced one by one, always renews).
    Renew,
}

pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Below this a lease would be renewed several times a second.
const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// The storage layout in S3 mode (`CVM_STORAGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The state dir on local disk, replicated through the crypt remote.
    Replicate,
    /// The spec's layout: the crypt remote mounted at the state dir with FUSE.
    Mount,
}

/// OpenClaw's scratch space, caches and lock files: rebuilt by the gateway,
/// never worth S3. The `*.sqlite.*` names are the SQLite lease files and
/// temporary copies beside its databases, which OpenClaw's own backup skips
/// as transient (`SQLITE_MEMORY_TRANSIENT_PATH_PATTERN` in 2026.9.6).
pub const DEFAULT_EXCLUDE: &str = "/tmp/**,/cache/**,*.lock,\
    *.sqlite.generation-lock.sqlite*,*.sqlite.generation-writer.sqlite*,*.sqlite.reindex-lock.sqlite*,\
    *.sqlite.backup-*,*.sqlite.memory-reindex-*,*.sqlite.tmp-*";

/// Where databases are and how soon their snapshots go to S3.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    pub patterns: Patterns,
    /// A changed database is snapshotted this long after its first unsaved
    /// change, however busy it stays: the RPO knob.
    pub debounce: Duration,
    /// How often the replicate layout's full local scan runs (changes
    /// inotify missed).
    pub interval: Duration,
    /// A WAL database's whole snapshot (its base, what stock rclone restores)
    /// is taken again once it is this old and the database changed since.
    pub base_max_age: Duration,
    /// Uploaded segments merged into one span, which a restore downloads
    /// instead of them.
    pub span_segments: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub delay: Duration,
    pub max_delay: Duration,
    pub reset_after: Duration,
    /// Give up after this many starts in a row that each ended within
    /// [`crate::supervisor::policy::FAILED_START`]; 0 never gives up.
    pub max_failed_starts: u32,
}

#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    pub endpoint: String,
    pub provider: String,
    pub prefix: String,
    pub region: String,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub crypt: CryptKeys,
}

impl S3Config {
    /// The bucket prefix through the plain remote, `s3:<bucket>/<prefix>`:
    /// what the crypt remote wraps, and what the raw ciphertext is listed at.
    pub fn raw_remote(&self) -> String {
        format!("s3:{}/{}", self.bucket, self.prefix)
    }
}

/// Crypt passwords, already in rclone's obscured form.
#[derive(Debug, Clone)]
pub struct CryptKeys {
    pub password: Secret,
    pub password2: Option<Secret>,
    pub source: KeySource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `RCLONE_CRYPT_PASSWORD` (and maybe `RCLONE_CRYPT_PASSWORD2`) as given.
    Explicit,
    /// Derived from `MASTER_KEY` as the shell entrypoint did.
    MasterKey,
}

/// One thing wrong with one variable. The message never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub var: &'static str,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.message)
    }
}

/// Every problem found in the environment.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration ({} problem(s))",
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Non-fatal observations made while reading the environment, logged once
/// logging is up.
pub type Warnings = Vec<String>;

impl Config {
    pub fn from_env() -> Result<(Config, Warnings), ConfigError> {
        Self::from_vars(std::env::vars())
    }

    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Warnings), ConfigError> {
        // envy matches names case-insensitively; keep only the exact
        // upper-case spellings so `s3_bucket=x` cannot switch modes.
        let vars: HashMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.chars().all(|c| !c.is_ascii_lowercase()))
            .collect();
        let mut v = Validator::default();
        let mut unknown: Vec<&String> = vars
            .keys()
            .filter(|k| {
                k.starts_with("CVM_")
                    && !KNOWN_CVM_VARS.contains(&k.as_str())
                    && !READ_ELSEWHERE.contains(&k.as_str())
            })
            .collect();
        unknown.sort();
        for name in unknown {
            v.warnings.push(unknown_var_warning(name));
        }
        let raw: RawEnv = envy::from_iter(vars).unwrap_or_default();
        v.validate(raw)
    }
}

/// Every `CVM_*` variable `RawEnv` reads; any other is a misspelling to warn
/// about, not something to ignore in silence.
const KNOWN_CVM_VARS: [&str; 21] = [
    "CVM_LOCAL_DIR",
    "CVM_RUN_DIR",
    "CVM_GATEWAY_CMD",
    "CVM_STOP_TIMEOUT",
    "CVM_MOUNT_TIMEOUT",
    "CVM_S3_WAIT",
    "CVM_SQLITE_PATHS",
    "CVM_BACKUP_DEBOUNCE",
    "CVM_BACKUP_INTERVAL",
    "CVM_SQLITE_BASE_MAX_AGE",
    "CVM_SQLITE_SPAN_SEGMENTS",
    "CVM_STORAGE",
    "CVM_EXCLUDE",
    "CVM_TRASH_DAYS",
    "CVM_HISTORY_DAYS",
    "CVM_RESTORE_AT",
    "CVM_GATEWAY_MAX_FAILED_STARTS",
    "CVM_LEASE_TTL",
    "CVM_LEASE_WAIT",
    "CVM_LEASE_TAKEOVER",
    "CVM_LEASE_WHILE_IDLE",
];

/// `CVM_*` variables read outside the configuration: `logging` reads `CVM_LOG`
/// before anything else, so its own problems are logged.
const READ_ELSEWHERE: [&str; 1] = ["CVM_LOG"];

/// The warning for an unknown `CVM_*` variable, naming the known one it is
/// closest to when that is a likely typo.
fn unknown_var_warning(name: &str) -> String {
    let closest = KNOWN_CVM_VARS
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .min()
        .filter(|(d, _)| *d <= 2);
    match closest {
        Some((_, k)) => {
            format!("{name} is not a variable cvm-init knows and is ignored; did you mean {k}?")
        }
        None => format!(
            "{name} is not a variable cvm-init knows and is ignored (see README, Configuration)"
        ),
    }
}

/// Levenshtein distance between two short ASCII names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
    warnings: Warnings,
}

/// Empty values count as unset: compose files often pass `VAR=` for unset vars.
fn given(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

impl Validator {
    /// `CVM_HISTORY_DAYS`, or the deprecated `CVM_TRASH_DAYS` it replaced
    /// (the trash was the only history then).
    fn history_days(&mut self, history: Option<String>, trash: Option<String>) -> u32 {
        let mut days = |var: &'static str, v: String| {
            v.parse().unwrap_or_else(|_| {
                self.problem(var, format!("{v:?} is not a whole number of days"));
                7
            })
        };
        match (given(history), given(trash)) {
            (None, None) => 7,
            (Some(h), None) => days("CVM_HISTORY_DAYS", h),
            (None, Some(t)) => {
                let d = days("CVM_TRASH_DAYS", t);
                self.warnings.push(format!(
                    "CVM_TRASH_DAYS is deprecated: CVM_HISTORY_DAYS replaces it (days of history: database \
                     restore points and old file versions); using {d} days"
                ));
                d
            }
            (Some(h), Some(t)) => {
                let d = days("CVM_HISTORY_DAYS", h);
                if t.parse::<u32>().ok() != Some(d) {
                    self.problem(
                        "CVM_TRASH_DAYS",
                        format!(
                            "{t:?} disagrees with CVM_HISTORY_DAYS={d}, which replaced it; unset CVM_TRASH_DAYS"
                        ),
                    );
                }
                d
            }
        }
    }

    fn problem(&mut self, var: &'static str, message: impl Into<String>) {
        self.problems.push(Problem {
            var,
            message: message.into(),
        });
    }

    fn abs_dir(&mut self, var: &'static str, v: Option<String>, default: &str) -> PathBuf {
        let v = given(v).unwrap_or_else(|| default.to_owned());
        let p = PathBuf::from(&v);
        if !p.is_absolute() {
            self.problem(
                var,
                format!("{v:?} is not an absolute path; give a path starting with /"),
            );
        } else if p.components().any(|c| c == std::path::Component::ParentDir) {
            self.problem(
                var,
                format!("{v:?} contains '..'; give a plain absolute path"),
            );
        }
        p
    }

    fn duration(&mut self, var: &'static str, v: Option<String>, default: Duration) -> Duration {
        match given(v) {
            None => default,
            Some(s) => match parse_duration(&s) {
                Some(d) => d,
                None => {
                    self.problem(
                        var,
                        format!("{s:?} is not a duration; use seconds (\"5\") or a unit (\"500ms\", \"5s\", \"2m\")"),
                    );
                    default
                }
            },
        }
    }

    /// A value that goes into the rclone config file: one line, no control characters.
    fn config_line(&mut self, var: &'static str, v: &str, secret: bool) {
        if v.chars().any(char::is_control) || v.trim() != v {
            let what = if secret { "the value" } else { v };
            self.problem(
                var,
                format!("{what:?} contains control characters or surrounding spaces; rclone's config cannot hold it"),
            );
        }
    }

    fn required(&mut self, var: &'static str, v: Option<String>, hint: &str) -> String {
        match given(v) {
            Some(v) => v,
            None => {
                self.problem(
                    var,
                    format!("required in S3 mode (S3_BUCKET is set); {hint}"),
                );
                String::new()
            }
        }
    }

    fn validate(mut self, raw: RawEnv) -> Result<(Config, Warnings), ConfigError> {
        let state_dir = self.abs_dir(
            "OPENCLAW_STATE_DIR",
            raw.openclaw_state_dir,
            DEFAULT_STATE_DIR,
        );
        let local_dir = self.abs_dir("CVM_LOCAL_DIR", raw.cvm_local_dir, DEFAULT_LOCAL_DIR);
        let run_dir = self.abs_dir("CVM_RUN_DIR", raw.cvm_run_dir, DEFAULT_RUN_DIR);
        for (var, dir) in [("CVM_LOCAL_DIR", &local_dir), ("CVM_RUN_DIR", &run_dir)] {
            if dir.starts_with(&state_dir) || state_dir.starts_with(dir) {
                self.problem(
                    var,
                    format!(
                        "{} overlaps OPENCLAW_STATE_DIR {}; they must be separate directories",
                        dir.display(),
                        state_dir.display()
                    ),
                );
            }
        }

        let cmd = given(raw.cvm_gateway_cmd).unwrap_or_else(|| DEFAULT_GATEWAY_CMD.to_owned());
        let gateway_cmd = match shell_words::split(&cmd) {
            Ok(words) if words.is_empty() => {
                self.problem(
                    "CVM_GATEWAY_CMD",
                    "is empty; give the command that runs the app",
                );
                words
            }
            Ok(words) => words,
            Err(e) => {
                self.problem(
                    "CVM_GATEWAY_CMD",
                    format!("{cmd:?} cannot be split into words: {e}"),
                );
                Vec::new()
            }
        };
        let rclone_bin = given(raw.rclone_bin).unwrap_or_else(|| "rclone".to_owned());

        let restart = RestartPolicy {
            delay: self.duration(
                "OPENCLAW_GATEWAY_RESTART_DELAY",
                raw.openclaw_gateway_restart_delay,
                Duration::from_secs(5),
            ),
            max_delay: self.duration(
                "OPENCLAW_GATEWAY_RESTART_MAX_DELAY",
                raw.openclaw_gateway_restart_max_delay,
                Duration::from_secs(60),
            ),
            reset_after: self.duration(
                "OPENCLAW_GATEWAY_RESET_AFTER",
                raw.openclaw_gateway_reset_after,
                Duration::from_secs(600),
            ),
            max_failed_starts: match given(raw.cvm_gateway_max_failed_starts) {
                None => 5,
                Some(n) => n.parse().unwrap_or_else(|_| {
                    self.problem(
                        "CVM_GATEWAY_MAX_FAILED_STARTS",
                        format!("{n:?} is not a whole number (0 = never give up)"),
                    );
                    5
                }),
            },
        };
        if restart.max_delay < restart.delay {
            self.problem(
                "OPENCLAW_GATEWAY_RESTART_MAX_DELAY",
                format!(
                    "{:?} is shorter than OPENCLAW_GATEWAY_RESTART_DELAY {:?}",
                    restart.max_delay, restart.delay
                ),
            );
        }
        let stop_timeout = self.duration(
            "CVM_STOP_TIMEOUT",
            raw.cvm_stop_timeout,
            Duration::from_secs(9),
        );
        if stop_timeout.is_zero() {
            self.problem(
                "CVM_STOP_TIMEOUT",
                "must be more than zero: a stop needs time to flush",
            );
        }
        let mount_timeout = self.duration(
            "CVM_MOUNT_TIMEOUT",
            raw.cvm_mount_timeout,
            Duration::from_secs(30),
        );
        if mount_timeout.is_zero() {
            self.problem("CVM_MOUNT_TIMEOUT", "must be more than zero");
        }
        let s3_wait = match given(raw.cvm_s3_wait) {
            Some(s) if s.trim() == "forever" => None,
            Some(s) => Some(self.duration("CVM_S3_WAIT", Some(s), Duration::ZERO)),
            None => None,
        };
        let ttl = self.duration("CVM_LEASE_TTL", raw.cvm_lease_ttl, DEFAULT_LEASE_TTL);
        if ttl < MIN_LEASE_TTL {
            self.problem(
                "CVM_LEASE_TTL",
                format!("{ttl:?} is too short; give at least {MIN_LEASE_TTL:?} (the default is {DEFAULT_LEASE_TTL:?})"),
            );
        }
        let mut lease = LeaseConfig {
            ttl,
            wait: match given(raw.cvm_lease_wait) {
                Some(s) if s.trim() == "forever" => None,
                Some(s) => Some(self.duration("CVM_LEASE_WAIT", Some(s), Duration::ZERO)),
                None => None,
            },
            takeover: given(raw.cvm_lease_takeover).map(|t| t.trim().to_owned()),
            while_idle: WhileIdle::Renew,
        };

        let patterns = match given(raw.cvm_sqlite_paths) {
            None => Patterns::default(),
            Some(p) => Patterns::parse(&p).unwrap_or_else(|e| {
                self.problem(
                    "CVM_SQLITE_PATHS",
                    format!("{e}; give comma-separated globs like state/*.sqlite"),
                );
                Patterns::default()
            }),
        };
        let debounce = self.duration(
            "CVM_BACKUP_DEBOUNCE",
            raw.cvm_backup_debounce,
            DEFAULT_BACKUP_DEBOUNCE,
        );
        let interval = self.duration(
            "CVM_BACKUP_INTERVAL",
            raw.cvm_backup_interval,
            Duration::from_secs(60),
        );
        if interval.is_zero() {
            self.problem("CVM_BACKUP_INTERVAL", "must be more than zero");
        }
        if debounce > interval {
            self.problem(
                "CVM_BACKUP_DEBOUNCE",
                format!("{debounce:?} is longer than CVM_BACKUP_INTERVAL {interval:?}, which bounds how late a change is saved"),
            );
        }
        let base_max_age = self.duration(
            "CVM_SQLITE_BASE_MAX_AGE",
            raw.cvm_sqlite_base_max_age,
            DEFAULT_BASE_MAX_AGE,
        );
        if base_max_age.is_zero() {
            self.problem("CVM_SQLITE_BASE_MAX_AGE", "must be more than zero");
        }
        let span_segments = match given(raw.cvm_sqlite_span_segments) {
            None => 64,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= 2 => n,
                _ => {
                    self.problem(
                        "CVM_SQLITE_SPAN_SEGMENTS",
                        format!("{v:?} is not a whole number of segments, 2 or more"),
                    );
                    64
                }
            },
        };
        let mut sqlite = SqliteConfig {
            patterns,
            debounce,
            interval,
            base_max_age,
            span_segments,
        };

        let layout = match given(raw.cvm_storage).as_deref() {
            None | Some("replicate") => Layout::Replicate,
            Some("mount") => Layout::Mount,
            Some(other) => {
                self.problem(
                    "CVM_STORAGE",
                    format!("{other:?} is not a layout; use replicate (the default) or mount"),
                );
                Layout::Replicate
            }
        };
        lease.while_idle = match (
            given(raw.cvm_lease_while_idle).as_deref().map(str::trim),
            layout,
        ) {
            (None, Layout::Replicate) | (Some("pause"), Layout::Replicate) => WhileIdle::Pause,
            (None, Layout::Mount) | (Some("renew"), _) => WhileIdle::Renew,
            (Some("pause"), Layout::Mount) => {
                self.problem(
                    "CVM_LEASE_WHILE_IDLE",
                    "pause needs the replicate layout: the mount layout's rclone uploads are not \
                     fenced one by one, so its lease is renewed while idle; use renew or leave it unset",
                );
                WhileIdle::Renew
            }
            (Some(other), _) => {
                self.problem(
                    "CVM_LEASE_WHILE_IDLE",
                    format!("{other:?} is neither pause (no S3 request while idle; the replicate layout's default) nor renew"),
                );
                WhileIdle::Renew
            }
        };
        let restore_at = given(raw.cvm_restore_at);
        if let Some(at) = &restore_at {
            if let Err(e) = crate::timepoint::parse(at, crate::timepoint::now_ms()) {
                self.problem("CVM_RESTORE_AT", e);
            } else if layout == Layout::Mount {
                self.problem(
                    "CVM_RESTORE_AT",
                    "a rollback boot needs the replicate layout (the mount layout keeps no file history); \
                     restore with `cvm-init restore --at` instead",
                );
            } else if raw.s3_bucket.as_deref().is_none_or(str::is_empty) {
                self.problem("CVM_RESTORE_AT", "there is no history without S3_BUCKET");
            }
        }
        let exclude_text = given(raw.cvm_exclude).unwrap_or_else(|| DEFAULT_EXCLUDE.to_owned());
        let exclude: Vec<String> = exclude_text
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        for p in &exclude {
            if p.chars().any(char::is_control) || p.contains("..") {
                self.problem(
                    "CVM_EXCLUDE",
                    format!("{p:?} is not a usable rclone filter pattern"),
                );
            } else if let Err(e) = crate::filter::glob(p) {
                self.problem(
                    "CVM_EXCLUDE",
                    format!("{p:?} is not a usable rclone filter pattern: {}", e.kind()),
                );
            }
        }
        // An unusable pattern is a problem reported above.
        if let Ok(patterns) = sqlite.patterns.clone().except(&exclude) {
            sqlite.patterns = patterns;
        }
        let history_days = self.history_days(raw.cvm_history_days, raw.cvm_trash_days);

        let s3 = match raw.s3_bucket.as_deref() {
            None => None,
            Some("") => {
                self.warnings.push(
                    "S3_BUCKET is set but empty: running in local mode, state is NOT stored on S3"
                        .to_owned(),
                );
                None
            }
            Some(_) => Some(self.s3(RawS3 {
                bucket: raw.s3_bucket.unwrap_or_default(),
                endpoint: raw.s3_endpoint,
                access_key_id: raw.aws_access_key_id,
                secret_access_key: raw.aws_secret_access_key,
                password: raw.rclone_crypt_password,
                password2: raw.rclone_crypt_password2,
                master_key: raw.master_key,
                provider: raw.s3_provider,
                prefix: raw.s3_prefix,
                region: raw.s3_region,
            })),
        };

        if self.problems.is_empty() {
            Ok((
                Config {
                    state_dir,
                    local_dir,
                    run_dir,
                    gateway_cmd,
                    rclone_bin,
                    restart,
                    stop_timeout,
                    mount_timeout,
                    s3_wait,
                    s3,
                    sqlite,
                    layout,
                    exclude,
                    history_days,
                    restore_at,
                    lease,
                },
                self.warnings,
            ))
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        }
    }

    fn s3(&mut self, raw: RawS3) -> S3Config {
        let bucket = raw.bucket;
        if bucket.contains('/') || bucket.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.problem(
                "S3_BUCKET",
                format!("{bucket:?} is not a bucket name (no '/', spaces or control characters)"),
            );
        }

        let endpoint = self.required("S3_ENDPOINT", raw.endpoint, "set it to the provider's endpoint URL, e.g. https://<account>.r2.cloudflarestorage.com");
        if !endpoint.is_empty() {
            match url::Url::parse(&endpoint) {
                Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {}
                _ => self.problem(
                    "S3_ENDPOINT",
                    format!("{endpoint:?} is not an http(s) URL; give e.g. https://s3.example.com"),
                ),
            }
            self.config_line("S3_ENDPOINT", &endpoint, false);
        }

        let access_key_id = self.required(
            "AWS_ACCESS_KEY_ID",
            raw.access_key_id,
            "set it to the S3 access key",
        );
        self.config_line("AWS_ACCESS_KEY_ID", &access_key_id, true);
        let secret_access_key = self.required(
            "AWS_SECRET_ACCESS_KEY",
            raw.secret_access_key,
            "set it to the S3 secret key",
        );
        self.config_line("AWS_SECRET_ACCESS_KEY", &secret_access_key, true);

        let crypt = self.crypt(raw.password, raw.password2, raw.master_key);

        let provider = given(raw.provider).unwrap_or_else(|| "Other".to_owned());
        self.config_line("S3_PROVIDER", &provider, false);
        let region = given(raw.region).unwrap_or_else(|| "us-east-1".to_owned());
        self.config_line("S3_REGION", &region, false);
        let prefix = given(raw.prefix).unwrap_or_else(|| "openclaw-state".to_owned());
        let prefix = prefix.trim_matches('/').to_owned();
        if prefix.is_empty()
            || prefix.contains("//")
            || prefix.split('/').any(|s| s == "." || s == "..")
        {
            self.problem(
                "S3_PREFIX",
                format!("{prefix:?} is not a usable key prefix; give e.g. openclaw-state"),
            );
        }
        self.config_line("S3_PREFIX", &prefix, false);

        S3Config {
            bucket,
            endpoint,
            provider,
            prefix,
            region,
            access_key_id: Secret::new(access_key_id),
            secret_access_key: Secret::new(secret_access_key),
            crypt,
        }
    }

    fn obscured(&mut self, var: &'static str, v: &str) {
        if let Err(e) = obscure::reveal(v) {
            self.problem(
                var,
                format!("the value {e}; pass the output of `rclone obscure <password>`, not the password itself"),
            );
        }
    }

    fn crypt(
        &mut self,
        password: Option<String>,
        password2: Option<String>,
        master_key: Option<String>,
    ) -> CryptKeys {
        let (password, password2, master_key) =
            (given(password), given(password2), given(master_key));
        match (password, master_key) {
            (Some(password), master_key) => {
                if master_key.is_some() {
                    self.warnings
                        .push("both RCLONE_CRYPT_PASSWORD and MASTER_KEY are set: RCLONE_CRYPT_PASSWORD wins, MASTER_KEY is ignored".to_owned());
                }
                self.obscured("RCLONE_CRYPT_PASSWORD", &password);
                if let Some(p2) = &password2 {
                    self.obscured("RCLONE_CRYPT_PASSWORD2", p2);
                }
                CryptKeys {
                    password: Secret::new(password),
                    password2: password2.map(Secret::new),
                    source: KeySource::Explicit,
                }
            }
            (None, Some(master_key)) => {
                if password2.is_some() {
                    self.problem(
                        "RCLONE_CRYPT_PASSWORD2",
                        "is set while the keys come from MASTER_KEY (RCLONE_CRYPT_PASSWORD is unset); \
                         MASTER_KEY derives both, so unset RCLONE_CRYPT_PASSWORD2 or set RCLONE_CRYPT_PASSWORD too",
                    );
                }
                CryptKeys {
                    password: Secret::new(obscure::obscure(&obscure::derive_from_master_key(
                        &master_key,
                        obscure::INFO_PASSWORD,
                    ))),
                    password2: Some(Secret::new(obscure::obscure(
                        &obscure::derive_from_master_key(&master_key, obscure::INFO_SALT),
                    ))),
                    source: KeySource::MasterKey,
                }
            }
            (None, None) => {
                self.problem(
                    "RCLONE_CRYPT_PASSWORD",
                    "required in S3 mode (S3_BUCKET is set); set it to the output of `rclone obscure <password>`, or set MASTER_KEY",
                );
                CryptKeys {
                    password: Secret::new(""),
                    password2: None,
                    source: KeySource::Explicit,
                }
            }
        }
    }
}

struct RawS3 {
    bucket: String,
    endpoint: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    password: Option<String>,
    password2: Option<String>,
    master_key: Option<String>,
    provider: Option<String>,
    prefix: Option<String>,
    region: Option<String>,
}

/// Seconds (`"5"`, `"0.5"`) or a number with a unit: `ms`, `s`, `m`, `h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_cvm_variables_are_warned_about_by_name() {
        let read: Vec<String> = serde_json::to_value(RawEnv::default())
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with("cvm_"))
            .map(|k| k.to_uppercase())
            .collect();
        let mut known = KNOWN_CVM_VARS.map(str::to_owned).to_vec();
        known.sort();
        let mut read = read;
        read.sort();
        assert_eq!(read, known, "KNOWN_CVM_VARS must list what RawEnv reads");

        let (_, warnings) = Config::from_vars(env(&[
            ("CVM_STOP_TIMOUT", "5s"),
            ("CVM_FROBNICATE", "1"),
            ("CVM_STOP_TIMEOUT", "5s"),
            ("CVM_LOG", "debug"),
        ]))
        .unwrap();
        assert_eq!(
            warnings,
            [
                "CVM_FROBNICATE is not a variable cvm-init knows and is ignored (see README, Configuration)",
                "CVM_STOP_TIMOUT is not a variable cvm-init knows and is ignored; did you mean CVM_STOP_TIMEOUT?",
            ]
        );
    }

    #[test]
    fn the_lease_takes_a_ttl_a_wait_and_an_explicit_takeover() {
        let (c, _) = Config::from_vars(env(&[])).unwrap();
        assert_eq!(
            c.lease,
            LeaseConfig {
                ttl: Duration::from_secs(30),
                wait: None,
                takeover: None,
                while_idle: WhileIdle::Pause,
            }
        );
        let (c, _) = Config::from_vars(env(&[
            ("CVM_LEASE_TTL", "5s"),
            ("CVM_LEASE_WAIT", "2m"),
            ("CVM_LEASE_TAKEOVER", " 1f2e3d4c5b6a7988 "),
        ]))
        .unwrap();
        assert_eq!(c.lease.ttl, Duration::from_secs(5));
        assert_eq!(c.lease.wait, Some(Duration::from_secs(120)));
        assert_eq!(c.lease.takeover.as_deref(), Some("1f2e3d4c5b6a7988"));
        // Paused while idle by default in the replicate layout only.
        for (given, want) in [
            (vec![("CVM_STORAGE", "mount")], Some(WhileIdle::Renew)),
            (
                vec![("CVM_LEASE_WHILE_IDLE", "renew")],
                Some(WhileIdle::Renew),
            ),
            (
                vec![("CVM_LEASE_WHILE_IDLE", "pause")],
                Some(WhileIdle::Pause),
            ),
            (
                vec![("CVM_STORAGE", "mount"), ("CVM_LEASE_WHILE_IDLE", "pause")],
                None,
            ),
            (vec![("CVM_LEASE_WHILE_IDLE", "sleep")], None),
        ] {
            let got = Config::from_vars(env(&given));
            match want {
                Some(w) => assert_eq!(got.unwrap().0.lease.while_idle, w, "{given:?}"),
                None => assert!(
                    got.unwrap_err().problems[0]
                        .to_string()
                        .starts_with("CVM_LEASE_WHILE_IDLE: "),
                    "{given:?}"
                ),
            }
        }
        let e = Config::from_vars(env(&[("CVM_LEASE_TTL", "500ms")])).unwrap_err();
        assert!(
            e.problems[0]
                .to_string()
                .starts_with("CVM_LEASE_TTL: 500ms is too short"),
            "{e}"
        );
    }

    #[test]
    fn history_days_replace_trash_days() {
        for (given, days, warned) in [
            (vec![], 7, false),
            (vec![("CVM_HISTORY_DAYS", "30")], 30, false),
            (vec![("CVM_TRASH_DAYS", "3")], 3, true),
            (
                vec![("CVM_HISTORY_DAYS", "3"), ("CVM_TRASH_DAYS", "3")],
                3,
                false,
            ),
        ] {
            let (c, w) = Config::from_vars(env(&given)).unwrap();
            assert_eq!(c.history_days, days, "{given:?}");
            assert_eq!(
                w.iter()
                    .any(|w| w
                        .contains("CVM_TRASH_DAYS is deprecated: CVM_HISTORY_DAYS replaces it")),
                warned,
                "{given:?}: {w:?}"
            );
        }
        let e = Config::from_vars(env(&[("CVM_HISTORY_DAYS", "3"), ("CVM_TRASH_DAYS", "9")]))
            .unwrap_err();
        assert!(e.to_string().contains("unset CVM_TRASH_DAYS"), "{e}");
        let e = Config::from_vars(env(&[("CVM_HISTORY_DAYS", "a week")])).unwrap_err();
        assert!(
            e.to_string()
                .contains("CVM_HISTORY_DAYS: \"a week\" is not a whole number of days"),
            "{e}"
        );
    }

    #[test]
    fn a_rollback_time_is_checked_with_its_layout() {
        let s3: [(&str, &str); 5] = [
            ("S3_BUCKET", "b"),
            ("S3_ENDPOINT", "https://s3.example.com"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("RCLONE_CRYPT_PASSWORD", PW),
        ];
        let (c, _) =
            Config::from_vars(env(&[s3.as_slice(), &[("CVM_RESTORE_AT", "-15m")]].concat()))
                .unwrap();
        assert_eq!(c.restore_at.as_deref(), Some("-15m"));
        for (extra, says) in [
            (vec![("CVM_RESTORE_AT", "yesterday")], "RFC 3339"),
            (
                vec![("CVM_RESTORE_AT", "-15m"), ("CVM_STORAGE", "mount")],
                "replicate layout",
            ),
        ] {
            let e = Config::from_vars(env(&[s3.as_slice(), &extra].concat())).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        let e = Config::from_vars(env(&[("CVM_RESTORE_AT", "-15m")])).unwrap_err();
        assert!(e.to_string().contains("without S3_BUCKET"), "{e}");
    }

    #[test]
    fn an_exclude_pattern_globset_cannot_build_is_rejected() {
        let e = Config::from_vars(env(&[("CVM_EXCLUDE", "/tmp/**,/cache/[a")])).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.problems[0]
                .to_string()
                .starts_with("CVM_EXCLUDE: \"/cache/[a\" is not a usable"),
            "{e}"
        );
    }

    const PW: &str = "ubtafWYbU0c8NpC9CUBaxEr8xvy76Q"; // rclone obscure potato

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn s3_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("S3_BUCKET", "b"),
            ("S3_ENDPOINT", "http://127.0.0.1:3900"),
            ("AWS_ACCESS_KEY_ID", "GKabc"),
            ("AWS_SECRET_ACCESS_KEY", "topsecretvalue"),
            ("RCLONE_CRYPT_PASSWORD", PW),
        ]
    }

    fn problems(pairs: &[(&str, &str)]) -> Vec<Problem> {
        Config::from_vars(env(pairs))
            .expect_err("config should be rejected")
            .problems
    }

    #[test]
    fn defaults_are_the_spec_defaults() {
        let (c, w) = Config::from_vars(env(&[])).unwrap();
        assert!(w.is_empty());
        assert!(c.s3.is_none());
        assert_eq!(c.state_dir, PathBuf::from("/data/openclaw"));
        assert_eq!(c.local_dir, PathBuf::from("/data/openclaw-local"));
        assert_eq!(c.run_dir, PathBuf::from("/run/cvm-init"));
        assert_eq!(
            c.gateway_cmd,
            ["openclaw", "gateway", "run", "--bind", "lan", "--port", "18789"]
        );
        assert_eq!(c.stop_timeout, Duration::from_secs(9));
        assert_eq!(c.s3_wait, None, "boot waits for S3 forever by default");
        assert_eq!(c.sqlite.span_segments, 64);
        assert_eq!(
            c.restart,
            RestartPolicy {
                delay: Duration::from_secs(5),
                max_delay: Duration::from_secs(60),
                reset_after: Duration::from_secs(600),
                max_failed_starts: 5,
            }
        );

        let (c, _) = Config::from_vars(env(&s3_env())).unwrap();
        let s3 = c.s3.unwrap();
        assert_eq!(
            (s3.provider.as_str(), s3.prefix.as_str(), s3.region.as_str()),
            ("Other", "openclaw-state", "us-east-1")
        );
        assert_eq!(s3.crypt.source, KeySource::Explicit);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let p = problems(&[
            ("S3_BUCKET", "b"),
            ("S3_ENDPOINT", "not a url"),
            ("OPENCLAW_STATE_DIR", "relative/dir"),
            ("CVM_GATEWAY_CMD", "   "),
            ("CVM_STOP_TIMEOUT", "soon"),
            ("CVM_SQLITE_SPAN_SEGMENTS", "1"),
        ]);
        let vars: Vec<_> = p.iter().map(|p| p.var).collect();
        for v in [
            "OPENCLAW_STATE_DIR",
            "CVM_GATEWAY_CMD",
            "CVM_STOP_TIMEOUT",
            "CVM_SQLITE_SPAN_SEGMENTS",
            "S3_ENDPOINT",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "RCLONE_CRYPT_PASSWORD",
        ] {
            assert!(vars.contains(&v), "{v} missing from {p:?}");
        }
    }

    #[test]
    fn plaintext_crypt_password_is_rejected_without_echoing_it() {
        let mut e = s3_env();
        e.retain(|(k, _)| *k != "RCLONE_CRYPT_PASSWORD");
        e.push(("RCLONE_CRYPT_PASSWORD", "my plain password"));
        e.push(("RCLONE_CRYPT_PASSWORD2", "anotherPlainOne123456789"));
        let p = problems(&e);
        assert_eq!(p.len(), 2, "{p:?}");
        let text = format!("{}", ConfigError { problems: p });
        assert!(!text.contains("my plain password"));
        assert!(!text.contains("anotherPlainOne"));
        assert!(text.contains("rclone obscure"));
    }

    #[test]
    fn secrets_never_appear_in_problems_or_debug() {
        let mut e = s3_env();
        e.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
        e.push(("AWS_SECRET_ACCESS_KEY", "bad\nsecret"));
        let p = problems(&e);
        assert!(!format!("{p:?}").contains("secret"), "{p:?}");
        let (c, _) = Config::from_vars(env(&s3_env())).unwrap();
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("topsecretvalue") && !dbg.contains(PW) && !dbg.contains("GKabc"),
            "{dbg}"
        );
    }

    #[test]
    fn master_key_derives_both_passwords_and_explicit_wins() {
        let mut e = s3_env();
        e.retain(|(k, _)| *k != "RCLONE_CRYPT_PASSWORD");
        e.push(("MASTER_KEY", "correct horse battery staple"));
        let (c, _) = Config::from_vars(env(&e)).unwrap();
        let k = c.s3.unwrap().crypt;
        assert_eq!(k.source, KeySource::MasterKey);
        assert_eq!(
            obscure::reveal(k.password.expose()).unwrap(),
            "fWxyhzuLSQizHmoLLNCIFuPKNGAgWm3D5LziNPZ2UdM="
        );
        assert_eq!(
            obscure::reveal(k.password2.unwrap().expose()).unwrap(),
            "H4BgUUYEIHkdwOCdLFt/MPbFWIl/8cxJmZmD5D/fVwU="
        );

        e.push(("RCLONE_CRYPT_PASSWORD", PW));
        let (c, w) = Config::from_vars(env(&e)).unwrap();
        assert_eq!(c.s3.unwrap().crypt.source, KeySource::Explicit);
        assert_eq!(w.len(), 1);

        let mut e2: Vec<_> = e
            .into_iter()
            .filter(|(k, _)| *k != "RCLONE_CRYPT_PASSWORD")
            .collect();
        e2.push(("RCLONE_CRYPT_PASSWORD2", PW));
        assert_eq!(problems(&e2)[0].var, "RCLONE_CRYPT_PASSWORD2");
    }

    #[test]
    fn empty_means_unset() {
        let (c, w) =
            Config::from_vars(env(&[("S3_BUCKET", ""), ("CVM_STOP_TIMEOUT", "")])).unwrap();
        assert!(c.s3.is_none());
        assert_eq!(w.len(), 1, "an empty S3_BUCKET must be called out");
        assert_eq!(c.stop_timeout, Duration::from_secs(9));
    }

    #[test]
    fn lower_case_names_are_ignored() {
        let (c, _) = Config::from_vars(env(&[("s3_bucket", "b")])).unwrap();
        assert!(c.s3.is_none());
    }

    #[test]
    fn overlapping_dirs_are_rejected() {
        let p = problems(&[
            ("OPENCLAW_STATE_DIR", "/data"),
            ("CVM_LOCAL_DIR", "/data/local"),
        ]);
        assert_eq!(p[0].var, "CVM_LOCAL_DIR");
    }

    #[test]
    fn gateway_cmd_is_split_like_a_shell_without_one() {
        let (c, _) =
            Config::from_vars(env(&[("CVM_GATEWAY_CMD", "sh -c 'echo hi; exit 3'")])).unwrap();
        assert_eq!(c.gateway_cmd, ["sh", "-c", "echo hi; exit 3"]);
        assert_eq!(
            problems(&[("CVM_GATEWAY_CMD", "sh -c 'unterminated")])[0].var,
            "CVM_GATEWAY_CMD"
        );
    }

    #[test]
    fn s3_wait_takes_a_duration_or_forever() {
        for (v, want) in [("forever", None), ("90s", Some(90)), ("2m", Some(120))] {
            let (c, _) = Config::from_vars(env(&[("CVM_S3_WAIT", v)])).unwrap();
            assert_eq!(c.s3_wait, want.map(Duration::from_secs), "{v}");
        }
        let e = Config::from_vars(env(&[("CVM_S3_WAIT", "soon")])).unwrap_err();
        assert_eq!(e.problems[0].var, "CVM_S3_WAIT");
    }

    #[test]
    fn durations() {
        let table = [
            ("5", Some(5000)),
            ("0.5", Some(500)),
            ("250ms", Some(250)),
            ("2s", Some(2000)),
            ("1m", Some(60_000)),
            ("1h", Some(3_600_000)),
            ("", None),
            ("5 days", None),
            ("-1", None),
            ("s", None),
        ];
        for (s, want) in table {
            assert_eq!(
                parse_duration(s).map(|d| d.as_millis() as u64),
                want,
                "{s:?}"
            );
        }
    }
}
