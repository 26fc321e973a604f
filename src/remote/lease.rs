//! One writer per bucket prefix: a lease object, `.cvm/lease` in the crypt
//! remote, held by the running instance, renewed in the background and
//! released at a graceful stop. Every upload is fenced by it ([`Fence`]).
//!
//! The protocol, with `TTL` = `CVM_LEASE_TTL`:
//! - the holder rewrites the object every `TTL/3` (each write changes its
//!   ETag) and uploads only while its last successful renewal *started*
//!   less than `2/3 TTL` ago by its own boot clock ([`clock`], which runs
//!   while the process is stopped or the machine suspended);
//! - a waiting instance takes over a lease that is released, its own (same
//!   `CVM_LOCAL_DIR`), named by `CVM_LEASE_TAKEOVER`, or whose ETag it has
//!   seen unchanged for a whole `TTL` by its own clock. No wall clocks are
//!   compared: only clock *rates* and the `TTL/3` margin are assumed.
//! - Where S3 honours conditional writes ([`Mode::Conditional`]: AWS, R2,
//!   MinIO), taking is `If-None-Match: *` or `If-Match: <ETag seen>` and
//!   renewing is `If-Match: <own ETag>`: of two writers exactly one wins,
//!   and a holder whose lease was taken learns it at its next renewal.
//! - Where it does not ([`Mode::Timed`]: Garage 2.5), a writer writes, waits
//!   [`settle`] and reads the object back; it holds the lease only if the
//!   object is still its own. That is safe while no writer takes longer
//!   than the settle time between reading the lease and writing it.
//! - While idle (`CVM_LEASE_WHILE_IDLE=pause`, the replicate layout's
//!   default), renewals pause once no upload has asked for the fence for a
//!   `TTL` ([`step`]), so an idle instance makes no S3 request. The next
//!   upload wakes the keeper ([`Fence::permit`]), which verifies the lease is
//!   still its own before writing it, as after an outage. Meanwhile the lease
//!   lapses: a waiting instance takes it over, and this one learns it then.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::sleep;

use crate::config::{LeaseConfig, WhileIdle};
use crate::rclone::rc::{self, RcError};
use crate::rclone::CRYPT_REMOTE;
use crate::remote::bucket::{CAS_PROBE, LEASE_FILE, META_DIR};
use crate::sys::sdnotify;

/// How often a waiting instance looks at the lease.
const POLL: Duration = Duration::from_secs(1);
/// How often a failed renewal is retried.
const RETRY: Duration = Duration::from_secs(1);

/// Time on the boot clock (`CLOCK_BOOTTIME`): it runs while this process is
/// stopped and while the machine is suspended, so a lease never looks
/// younger than it is. A clock that cannot be read reads as the end of
/// time: every lease then looks expired, which closes the fence.
pub fn clock() -> Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(t) => Duration::new(t.tv_sec().unsigned_abs(), t.tv_nsec().unsigned_abs() as u32),
        Err(_) => Duration::MAX,
    }
}

/// Renewal period.
fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// How long a renewal that started at `t` lets the holder upload: the TTL
/// less a third, the margin for clock rates and uploads in flight.
fn valid_for(ttl: Duration) -> Duration {
    ttl * 2 / 3
}

/// How long a writer waits before reading back a lease it wrote without a
/// conditional write.
pub fn settle(ttl: Duration) -> Duration {
    (ttl / 6).min(Duration::from_secs(2))
}

/// What the lease object holds (JSON, encrypted by the crypt remote).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The holder's instance id (`CVM_LOCAL_DIR/instance-id`).
    pub instance: String,
    pub host: String,
    /// When this holder took the lease, Unix milliseconds (for people only).
    pub since_ms: u64,
    /// Writes by this holder: every renewal changes the object.
    pub counter: u64,
    pub ttl_ms: u64,
    /// Given up at a graceful stop: the next instance takes over at once.
    pub released: bool,
}

impl Record {
    /// A lease object cvm-init cannot read (written by something else):
    /// held by nobody known, so it is taken over once unchanged for a TTL.
    fn unknown() -> Record {
        Record {
            instance: "unknown".into(),
            host: "unknown".into(),
            since_ms: 0,
            counter: 0,
            ttl_ms: 0,
            released: false,
        }
    }

    /// "instance 1f2e… on host-a since 2026-11-29T10:00:00Z".
    pub fn describe(&self) -> String {
        format!(
            "instance {} on {} (holding since {} s ago)",
            self.instance,
            self.host,
            unix_ms().saturating_sub(self.since_ms) / 1000
        )
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether the bucket honours conditional writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `If-None-Match` / `If-Match` on PUT: exactly one writer wins.
    Conditional,
    /// Ignored (Garage 2.5): write, settle, read back.
    Timed,
}

impl Mode {
    pub fn describe(self) -> &'static str {
        match self {
            Mode::Conditional => {
                "conditional writes (compare-and-swap): one writer at a time, guaranteed by S3"
            }
            Mode::Timed => {
                "no conditional writes: one writer at a time while clocks run at the same rate and \
                            no lease write takes longer than the settle time"
            }
        }
    }
}

/// The lease as a waiting instance has seen it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub record: Record,
    pub etag: String,
    /// [`clock`] when this ETag was first seen.
    pub since: Duration,
}

/// Why a lease may be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Free,
    Released,
    Own,
    TakeOver,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Take(Why),
    Wait { expires_in: Duration },
}

/// Whether instance `me` may take the lease it has `seen`, at `now`.
pub fn verdict(
    seen: Option<&Seen>,
    me: &str,
    takeover: Option<&str>,
    ttl: Duration,
    now: Duration,
) -> Verdict {
    let Some(s) = seen else {
        return Verdict::Take(Why::Free);
    };
    let age = now.saturating_sub(s.since);
    if s.record.released {
        Verdict::Take(Why::Released)
    } else if s.record.instance == me {
        Verdict::Take(Why::Own)
    } else if takeover == Some(s.record.instance.as_str()) {
        Verdict::Take(Why::TakeOver)
    } else if age >= ttl {
        Verdict::Take(Why::Expired)
    } else {
        Verdict::Wait {
            expires_in: ttl - age,
        }
    }
}

/// What the keeper does when a renewal is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Renew,
    /// Nothing has uploaded for `pause_after`: let the lease lapse until
    /// the next upload asks for it.
    Pause,
}

/// Whether to renew or pause, given `pause_after` (`None`: always renew),
/// the uploads under way and when the fence was last used.
fn step(
    pause_after: Option<Duration>,
    in_flight: usize,
    last_use: Duration,
    now: Duration,
) -> Step {
    match pause_after {
        Some(after) if in_flight == 0 && now.saturating_sub(last_use) >= after => Step::Pause,
        _ => Step::Renew,
    }
}

/// Whether uploads may go out now: the lease is held with margin.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<FenceState>,
    /// Wakes a keeper whose renewals are paused (it listens before it
    /// pauses, so nothing is stored for a keeper not listening).
    wake: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct FenceState {
    /// [`clock`] time until which uploads may start.
    valid_until: Duration,
    /// Set once the lease is known to be someone else's.
    lost: Option<String>,
    /// How often the keeper renews ([`renew_every`]).
    period: Duration,
    /// Uploads under way: [`Permit`]s alive.
    in_flight: usize,
    /// [`clock`] when an upload last asked for the fence or ended.
    last_use: Duration,
    /// Renewals paused while idle ([`Step::Pause`]).
    paused: bool,
}

/// What [`Fence::permit`] does now.
enum Admit {
    Go,
    /// Paused while idle: wake the keeper and wait for its renewal.
    Wake,
    No(String),
}

impl FenceState {
    fn admit(&self, now: Duration) -> Admit {
        if let Some(by) = &self.lost {
            Admit::No(format!(
                "this instance lost the bucket prefix's lease to {by}"
            ))
        } else if now < self.valid_until {
            Admit::Go
        } else if self.paused {
            Admit::Wake
        } else {
            Admit::No(
                "this instance's lease on the bucket prefix is not confirmed (S3 unreachable, or the \
                 process was stopped); uploads wait until it is"
                    .into(),
            )
        }
    }
}

/// One upload allowed to start; while it lives the keeper keeps renewing.
#[derive(Debug)]
pub struct Permit {
    _busy: Busy,
}

/// Work that ends in an upload is under way; while it lives the keeper
/// keeps renewing, as for a [`Permit`], but it lets nothing go out.
#[derive(Debug)]
pub struct Busy(Fence);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        st.last_use = clock();
    }
}

impl Fence {
    fn lock(&self) -> std::sync::MutexGuard<'_, FenceState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets one upload start while the lease is held with margin; else
    /// says why not. A lease paused while idle is first verified and
    /// renewed by the keeper, waited for up to two renewal periods.
    pub async fn permit(&self) -> Result<Permit, String> {
        let started = clock();
        loop {
            let (admit, bound) = {
                let mut st = self.lock();
                st.last_use = clock();
                let admit = st.admit(clock());
                if matches!(admit, Admit::Go) {
                    st.in_flight += 1;
                }
                (admit, (st.period * 2).max(Duration::from_secs(1)))
            };
            match admit {
                Admit::Go => {
                    return Ok(Permit {
                        _busy: Busy(self.clone()),
                    })
                }
                Admit::No(why) => return Err(why),
                Admit::Wake if clock().saturating_sub(started) >= bound => {
                    return Err(format!(
                        "this instance's lease on the bucket prefix, paused while idle, was not \
                         renewed within {bound:?} (S3 slow or unreachable); uploads wait until it is"
                    ))
                }
                Admit::Wake => {
                    self.0.wake.notify_waiters();
                    sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Work that ends in an upload starts (a snapshot of a big database
    /// can take longer than the pause after the last upload): the keeper
    /// does not pause until it ends, so its upload finds the lease renewed
    /// instead of waiting for it to be verified again.
    pub fn busy(&self) -> Busy {
        let mut st = self.lock();
        st.in_flight += 1;
        st.last_use = clock();
        Busy(self.clone())
    }

    /// An upload is coming (a change was seen): a keeper paused while idle
    /// starts verifying the lease now, so the upload, a debounce later,
    /// waits less for it.
    pub fn wake(&self) {
        let paused = {
            let mut st = self.lock();
            st.last_use = clock();
            st.paused
        };
        if paused {
            self.0.wake.notify_waiters();
        }
    }

    /// Waits until the lease is confirmed for at least one more renewal
    /// period (so a pass that starts now does not run into the margin while
    /// the keeper is still retrying after an outage or an rclone restart),
    /// the lease is lost or paused while idle (an upload wakes it), or
    /// `deadline`.
    pub async fn opened(&self, deadline: tokio::time::Instant) {
        loop {
            {
                let st = self.lock();
                if st.lost.is_some()
                    || st.paused
                    || clock().saturating_add(st.period) < st.valid_until
                {
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    fn extend(&self, until: Duration) {
        let mut st = self.lock();
        if st.lost.is_none() {
            st.valid_until = st.valid_until.max(until);
        }
    }

    fn close(&self, lost: Option<String>) {
        let mut st = self.lock();
        st.valid_until = Duration::ZERO;
        if lost.is_some() {
            st.lost = lost;
        }
    }

    fn valid_at(&self, t: Duration) -> bool {
        let st = self.lock();
        st.lost.is_none() && t < st.valid_until
    }

    fn step(&self, pause_after: Option<Duration>) -> Step {
        let st = self.lock();
        step(pause_after, st.in_flight, st.last_use, clock())
    }

    fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "another instance holds the lease on this bucket prefix: {holder}. Gave up waiting after {waited:?} \
         (CVM_LEASE_WAIT); nothing was restored or written. Stop the other instance, or, if it is known to be \
         dead, set CVM_LEASE_TAKEOVER={instance}"
    )]
    Busy {
        holder: String,
        instance: String,
        waited: Duration,
    },
    #[error("the lease on the bucket prefix: {0}")]
    Rc(#[from] RcError),
    #[error("the lease on the bucket prefix: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

enum Cond {
    Create,
    Match(String),
    Blind,
}

enum WriteError {
    /// The condition failed: someone else wrote.
    Conflict,
    Rc(RcError),
}

/// Reads and writes the lease object through the rclone rc server.
#[derive(Debug, Clone)]
pub struct Io {
    socket: PathBuf,
    scratch: PathBuf,
    /// `s3:<bucket>/<prefix>`.
    raw: String,
    /// The lease object's encrypted path below `raw`.
    encoded: String,
    /// The conditional-write probe's encrypted path below `raw`.
    encoded_probe: String,
}

impl Io {
    /// Finds the encrypted names of the lease and the probe objects.
    pub async fn open(socket: &Path, scratch: &Path, raw: &str) -> Result<Io, LeaseError> {
        let names = [
            format!("{META_DIR}/{LEASE_FILE}"),
            format!("{META_DIR}/{CAS_PROBE}"),
        ];
        let answer = rc::call(
            socket,
            "backend/command",
            &json!({ "command": "encode", "fs": format!("{CRYPT_REMOTE}:"), "arg": names }),
        )
        .await?;
        let encoded = |i: usize| {
            answer["result"][i]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| RcError::Malformed {
                    method: "backend/command encode".into(),
                    detail: answer.to_string(),
                })
        };
        let (encoded, encoded_probe) = (encoded(0)?, encoded(1)?);
        std::fs::create_dir_all(scratch).map_err(|source| LeaseError::Io {
            path: scratch.to_owned(),
            source,
        })?;
        Ok(Io {
            socket: socket.to_owned(),
            scratch: scratch.to_owned(),
            raw: raw.to_owned(),
            encoded,
            encoded_probe,
        })
    }

    async fn rc(&self, method: &str, params: Value) -> Result<Value, RcError> {
        rc::call(&self.socket, method, &params).await
    }

    /// The object's ETag (its MD5: it is always one small PUT), if it exists.
    async fn etag(&self) -> Result<Option<String>, RcError> {
        let item = rc::stat(&self.socket, &self.raw, &self.encoded, true).await?;
        Ok(item.and_then(|i| i["Hashes"]["md5"].as_str().map(str::to_owned)))
    }

    /// The lease as it is, with its ETag; `None` when there is none.
    pub async fn read(&self) -> Result<Option<(Record, String)>, LeaseError> {
        let target = self.scratch.join("lease.read");
        loop {
            let Some(before) = self.etag().await? else {
                return Ok(None);
            };
            let _ = std::fs::remove_file(&target);
            let copied = self
                .rc(
                    "operations/copyfile",
                    json!({
                        "srcFs": format!("{CRYPT_REMOTE}:{META_DIR}"), "srcRemote": LEASE_FILE,
                        "dstFs": self.scratch.to_string_lossy(), "dstRemote": "lease.read",
                    }),
                )
                .await;
            match copied {
                Ok(_) => {}
                // Released and removed between the two calls: look again.
                Err(RcError::Status { body, .. }) if body.contains("not found") => continue,
                Err(e) => return Err(e.into()),
            }
            let record = std::fs::read(&target)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_else(Record::unknown);
            // Changed while it was read: the content may not be this ETag's.
            if self.etag().await?.as_deref() == Some(before.as_str()) {
                return Ok(Some((record, before)));
            }
        }
    }

    async fn write(&self, record: &Record, cond: Cond) -> Result<(), WriteError> {
        let path = self.scratch.join("lease.json");
        let bytes = serde_json::to_vec(record).expect("a record serializes");
        if let Err(source) = std::fs::write(&path, bytes) {
            return Err(WriteError::Rc(RcError::Io { path, source }));
        }
        let headers = match cond {
            Cond::Create => IF_NONE_MATCH.clone(),
            Cond::Match(etag) => json!([{ "Key": "If-Match", "Value": format!("\"{etag}\"") }]),
            Cond::Blind => json!([]),
        };
        let r = self
            .rc(
                "operations/copyfile",
                json!({
                    "srcFs": self.scratch.to_string_lossy(), "srcRemote": "lease.json",
                    "dstFs": format!("{CRYPT_REMOTE}:{META_DIR}"), "dstRemote": LEASE_FILE,
                    "_config": { "NoCheckDest": true, "UploadHeaders": headers },
                }),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Err(WriteError::Conflict),
            Err(e) => Err(WriteError::Rc(e)),
        }
    }

    /// [`Io::mode`] without changing the bucket: known only once a boot
    /// has made the probe object (`cvm-init check`).
    pub async fn mode_if_probed(&self) -> Result<Option<Mode>, RcError> {
        match self.rewrite_probe().await {
            Err(RcError::Status { body, .. }) if body.contains("not found") => Ok(None),
            r => r.map(Some),
        }
    }

    /// Whether S3 honours conditional writes: a create-only write of an
    /// object that exists must fail. The probe object is made through the
    /// crypt remote if missing; the write that must fail puts its own
    /// encrypted bytes back, so where it goes through, not a byte changes
    /// (and two instances probing at once write the same bytes).
    pub async fn mode(&self) -> Result<Mode, RcError> {
        let path = self.scratch.join(CAS_PROBE);
        std::fs::write(&path, "cvm-init conditional-write probe\n").map_err(|source| {
            RcError::Io {
                path: path.clone(),
                source,
            }
        })?;
        // Made once per bucket prefix: later boots only probe it.
        let meta = format!("{CRYPT_REMOTE}:{META_DIR}");
        if rc::stat(&self.socket, &meta, CAS_PROBE, false)
            .await?
            .is_none()
        {
            let created = self
                .rc(
                    "operations/copyfile",
                    json!({
                        "srcFs": self.scratch.to_string_lossy(), "srcRemote": CAS_PROBE,
                        "dstFs": format!("{CRYPT_REMOTE}:{META_DIR}"), "dstRemote": CAS_PROBE,
                        "_config": { "NoCheckDest": true, "UploadHeaders": IF_NONE_MATCH.clone() },
                    }),
                )
                .await;
            match created {
                Err(e) if is_precondition_failed(&e) => return Ok(Mode::Conditional),
                // Two instances making it at once where conditions are ignored.
                Err(e) if is_conflict(&e) => {}
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        self.rewrite_probe().await
    }

    /// Puts the probe object's encrypted bytes back with `If-None-Match: *`.
    async fn rewrite_probe(&self) -> Result<Mode, RcError> {
        let copy = "cas-probe.raw";
        self.rc(
            "operations/copyfile",
            json!({
                "srcFs": self.raw, "srcRemote": self.encoded_probe,
                "dstFs": self.scratch.to_string_lossy(), "dstRemote": copy,
            }),
        )
        .await?;
        let put = self
            .rc(
                "operations/copyfile",
                json!({
                    "srcFs": self.scratch.to_string_lossy(), "srcRemote": copy,
                    "dstFs": self.raw, "dstRemote": self.encoded_probe,
                    "_config": { "NoCheckDest": true, "UploadHeaders": IF_NONE_MATCH.clone() },
                }),
            )
            .await;
        let _ = std::fs::remove_file(self.scratch.join(copy));
        match put {
            Ok(_) => Ok(Mode::Timed),
            Err(e) if is_precondition_failed(&e) => Ok(Mode::Conditional),
            Err(e) => Err(e),
        }
    }
}

static IF_NONE_MATCH: std::sync::LazyLock<Value> =
    std::sync::LazyLock::new(|| json!([{ "Key": "If-None-Match", "Value": "*" }]));

fn is_precondition_failed(e: &RcError) -> bool {
    matches!(e, RcError::Status { body, .. }
        if body.contains("StatusCode: 412") || body.contains("PreconditionFailed"))
}

/// A write refused by its condition (HTTP 412), or one rclone saw
/// overwritten by another writer as it finished (it compares the MD5 it
/// sent with what S3 then holds): either way, someone else wrote.
fn is_conflict(e: &RcError) -> bool {
    is_precondition_failed(e)
        || matches!(e, RcError::Status { body, .. } if body.contains("corrupted on transfer"))
}

/// The lease this instance holds.
pub struct Held {
    io: Io,
    mode: Mode,
    record: Record,
    /// The object's ETag after this instance's last write (conditional mode).
    etag: Option<String>,
    ttl: Duration,
    fence: Fence,
    /// [`clock`] when the last successful write started.
    last: Duration,
    /// Idle this long, renewals pause (`None`: never).
    pause_after: Option<Duration>,
    /// Why it could be taken.
    why: Why,
}

/// Takes the lease for `me` once it may (see [`verdict`]), reporting the
/// holder while it waits; gives up after `cfg.wait`.
pub async fn acquire(
    io: Io,
    mode: Mode,
    me: Record,
    cfg: &LeaseConfig,
    fence: Fence,
) -> Result<Held, LeaseError> {
    let started = clock();
    let mut seen: Option<Seen> = None;
    let mut reported: Option<String> = None;
    loop {
        let now = clock();
        // The clock starts again whenever the object changes.
        let before = seen.take();
        seen = io.read().await?.map(|(record, etag)| match before {
            Some(s) if s.etag == etag => s,
            _ => Seen {
                record,
                etag,
                since: now,
            },
        });
        match verdict(
            seen.as_ref(),
            &me.instance,
            cfg.takeover.as_deref(),
            cfg.ttl,
            now,
        ) {
            Verdict::Wait { expires_in } => {
                let holder = seen.as_ref().expect("a holder to wait for").record.clone();
                let waited = now.saturating_sub(started);
                if cfg.wait.is_some_and(|w| waited >= w) {
                    return Err(LeaseError::Busy {
                        holder: holder.describe(),
                        instance: holder.instance,
                        waited,
                    });
                }
                let line = format!(
                    "waiting for the lease on the bucket prefix: held by {}; it expires in {}s unless renewed",
                    holder.describe(),
                    expires_in.as_secs()
                );
                if reported.as_deref() != Some(holder.instance.as_str()) {
                    tracing::warn!("{line}. Nothing is restored, written or started meanwhile");
                    reported = Some(holder.instance.clone());
                }
                sdnotify::status(&line);
                sleep(POLL.min(cfg.ttl / 3)).await;
            }
            Verdict::Take(why) => {
                let mut record = me.clone();
                record.since_ms = unix_ms();
                record.counter = seen.as_ref().map_or(0, |s| s.record.counter + 1);
                let cond = match (mode, &seen) {
                    (Mode::Timed, _) => Cond::Blind,
                    (Mode::Conditional, None) => Cond::Create,
                    (Mode::Conditional, Some(s)) => Cond::Match(s.etag.clone()),
                };
                let start = clock();
                match io.write(&record, cond).await {
                    Ok(()) => {}
                    Err(WriteError::Conflict) => {
                        tracing::info!("lease: another instance wrote it first; looking again");
                        continue;
                    }
                    Err(WriteError::Rc(e)) => return Err(e.into()),
                }
                if mode == Mode::Timed {
                    sleep(settle(cfg.ttl)).await;
                    match io.read().await? {
                        Some((r, _)) if r == record => {}
                        other => {
                            tracing::info!(holder = ?other.map(|(r, _)| r.instance), "lease: another instance took it at the same moment; waiting");
                            continue;
                        }
                    }
                }
                let etag = match mode {
                    Mode::Conditional => io.etag().await?,
                    Mode::Timed => None,
                };
                {
                    let mut st = fence.lock();
                    st.period = renew_every(cfg.ttl);
                    st.last_use = clock();
                }
                fence.extend(start + valid_for(cfg.ttl));
                if why == Why::TakeOver || why == Why::Expired {
                    let from = seen
                        .as_ref()
                        .map(|s| s.record.describe())
                        .unwrap_or_default();
                    tracing::warn!(?why, "lease: took over the bucket prefix from {from}");
                }
                tracing::info!(instance = %record.instance, ?why, mode = ?mode, "lease: held");
                return Ok(Held {
                    io,
                    mode,
                    record,
                    etag,
                    ttl: cfg.ttl,
                    fence,
                    last: start,
                    pause_after: match cfg.while_idle {
                        WhileIdle::Pause => Some(cfg.ttl),
                        WhileIdle::Renew => None,
                    },
                    why,
                });
            }
        }
    }
}

/// What reading the lease says about this instance's hold on it.
enum Whose {
    Ours,
    /// Someone else's (described), or nobody's.
    Theirs(String),
    /// S3 did not answer.
    Unknown(LeaseError),
}

/// A running lease keeper: renews until stopped, and says when the lease was lost.
pub struct Keeper {
    task: JoinHandle<Held>,
    stop: Option<oneshot::Sender<()>>,
    lost: Option<oneshot::Receiver<String>>,
}

impl Held {
    /// Why the lease could be taken.
    pub fn why(&self) -> Why {
        self.why
    }

    /// Renews in the background until [`Keeper::release`].
    pub fn keep(self) -> Keeper {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (lost_tx, lost_rx) = oneshot::channel();
        let task = tokio::spawn(self.renew_loop(stop_rx, lost_tx));
        Keeper {
            task,
            stop: Some(stop_tx),
            lost: Some(lost_rx),
        }
    }

    async fn renew_loop(
        mut self,
        mut stop: oneshot::Receiver<()>,
        lost: oneshot::Sender<String>,
    ) -> Held {
        let mut next = self.last + renew_every(self.ttl);
        loop {
            let wait = next.saturating_sub(clock());
            tokio::select! {
                _ = &mut stop => return self,
                () = sleep(wait) => {}
            }
            if self.fence.step(self.pause_after) == Step::Pause {
                let fence = self.fence.clone();
                let woken = fence.0.wake.notified();
                tokio::pin!(woken);
                // Listening before the pause shows: a wake-up that sees it
                // is never missed, and none is stored for a later pause.
                woken.as_mut().enable();
                self.fence.set_paused(true);
                tracing::info!(
                    "lease: idle, renewals paused until the next upload (no S3 request meanwhile; \
                     another instance may take the lease over once it lapses)"
                );
                tokio::select! {
                    _ = &mut stop => return self,
                    () = woken => {}
                }
            }
            // A renewal that hangs (rclone wedged) must not hold the loop:
            // the fence closes on its own, and the next try reads first.
            // Bounded by the margin: past it the fence is closed anyway.
            let renewed = tokio::time::timeout(valid_for(self.ttl), self.renew()).await;
            // Renewed or not, uploads now see the outcome, not the pause.
            self.fence.set_paused(false);
            if renewed.is_err() {
                tracing::warn!(
                    "lease: cannot renew it: no answer within {:?} (S3 or rclone not answering); retrying",
                    valid_for(self.ttl)
                );
                // Whether its write landed is unknown: read before the next one.
                self.etag = None;
            }
            match renewed.unwrap_or(Err(None)) {
                Ok(()) => next = self.last + renew_every(self.ttl),
                Err(Some(by)) => {
                    self.fence.close(Some(by.clone()));
                    tracing::error!("lease: lost to {by}; uploading nothing more");
                    let _ = lost.send(by);
                    // Nothing to renew: wait for the stop.
                    let _ = stop.await;
                    return self;
                }
                Err(None) => next = clock() + RETRY,
            }
        }
    }

    /// Reads the lease; while it is still this instance's, keeps its ETag.
    async fn verify_own(&mut self) -> Whose {
        match self.io.read().await {
            Ok(Some((r, etag))) if r.instance == self.record.instance && !r.released => {
                self.etag = Some(etag);
                Whose::Ours
            }
            Ok(Some((r, _))) => Whose::Theirs(r.describe()),
            Ok(None) => Whose::Theirs("nobody (the lease object is gone)".into()),
            Err(e) => Whose::Unknown(e),
        }
    }

    /// One renewal. `Err(Some(holder))`: the lease is someone else's now;
    /// `Err(None)`: S3 did not answer, try again.
    async fn renew(&mut self) -> Result<(), Option<String>> {
        let start = clock();
        let mut record = self.record.clone();
        record.counter += 1;
        let was_valid = self.fence.valid_at(start);
        // Past the margin (S3 was unreachable, or this process stopped), a
        // waiting instance may have taken over meanwhile; without conditional
        // writes that is only seen by reading; and a conditional renewal needs
        // the object's ETag. Only a lease that is still this instance's is
        // written again.
        if !was_valid || self.mode == Mode::Timed || self.etag.is_none() {
            match self.verify_own().await {
                Whose::Ours => {}
                Whose::Theirs(by) => return Err(Some(by)),
                Whose::Unknown(e) => {
                    tracing::warn!("lease: cannot verify it ({e}); uploads wait");
                    return Err(None);
                }
            }
        }
        let cond = match (self.mode, &self.etag) {
            (Mode::Conditional, Some(e)) => Cond::Match(e.clone()),
            _ => Cond::Blind,
        };
        match self.io.write(&record, cond).await {
            Ok(()) => {}
            Err(WriteError::Conflict) => {
                return match self.verify_own().await {
                    // An earlier write of this instance landed after all.
                    Whose::Ours | Whose::Unknown(_) => Err(None),
                    Whose::Theirs(by) => Err(Some(by)),
                };
            }
            Err(WriteError::Rc(e)) => {
                tracing::warn!("lease: cannot renew it ({e}); retrying");
                return Err(None);
            }
        }
        if self.mode == Mode::Timed && !was_valid {
            sleep(settle(self.ttl)).await;
            match self.io.read().await {
                Ok(Some((r, _))) if r == record => {}
                Ok(Some((r, _))) => return Err(Some(r.describe())),
                _ => return Err(None),
            }
        }
        if self.mode == Mode::Conditional {
            // Unknown if S3 does not answer: the next renewal reads it first.
            self.etag = self.io.etag().await.ok().flatten();
        }
        self.record = record;
        self.last = start;
        self.fence.extend(start + valid_for(self.ttl));
        if !was_valid {
            tracing::info!("lease: verified again and renewed; uploads resume");
        }
        Ok(())
    }
}

impl Keeper {
    /// Resolves once, when the lease is someone else's; then pending. Cancel-safe.
    pub async fn lost(&mut self) -> String {
        match self.lost.as_mut() {
            Some(rx) => match rx.await {
                Ok(by) => {
                    self.lost = None;
                    by
                }
                Err(_) => {
                    self.lost = None;
                    std::future::pending().await
                }
            },
            None => std::future::pending().await,
        }
    }

    /// Stops renewing and gives the lease up, so a waiting instance takes
    /// over at once; after this nothing may upload. Not when it was lost.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Ok(mut held) = (&mut self.task).await else {
            return;
        };
        if held.fence.lock().lost.is_some() {
            return;
        }
        held.fence.close(None);
        let mut record = held.record.clone();
        record.counter += 1;
        record.released = true;
        // As before a renewal: a lease that may have changed hands is read
        // first, and only this instance's own is released.
        if held.mode == Mode::Timed || held.etag.is_none() {
            match held.verify_own().await {
                Whose::Ours => {}
                Whose::Theirs(_) => {
                    tracing::warn!("lease: not released: it is no longer this instance's");
                    return;
                }
                Whose::Unknown(e) => {
                    tracing::warn!("lease: cannot release it ({e}); the next instance takes over once it expires");
                    return;
                }
            }
        }
        let cond = match (held.mode, held.etag.take()) {
            (Mode::Conditional, Some(e)) => Cond::Match(e),
            _ => Cond::Blind,
        };
        match held.io.write(&record, cond).await {
            Ok(()) => tracing::info!("lease: released"),
            Err(WriteError::Conflict) => {
                tracing::warn!("lease: not released: another instance holds it")
            }
            Err(WriteError::Rc(e)) => {
                tracing::warn!(
                    "lease: cannot release it ({e}); the next instance takes over once it expires"
                )
            }
        }
    }
}

/// This instance's id: random, kept in `local_dir` so a container that
/// restarts on its own volume is the same instance.
pub fn instance_id(local_dir: &Path) -> std::io::Result<String> {
    let path = local_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
    std::fs::create_dir_all(local_dir)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// This machine's host name, for the people reading who holds a lease.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The record this instance writes.
pub fn record_for(instance: &str, ttl: Duration) -> Record {
    Record {
        instance: instance.to_owned(),
        host: host_name(),
        since_ms: unix_ms(),
        counter: 0,
        ttl_ms: ttl.as_millis() as u64,
        released: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(instance: &str, released: bool, since: u64) -> Seen {
        Seen {
            record: Record {
                released,
                ..record_for(instance, Duration::from_secs(30))
            },
            etag: "e".into(),
            since: Duration::from_secs(since),
        }
    }

    #[test]
    fn a_lease_is_taken_only_when_free_released_own_named_or_unchanged_for_a_ttl() {
        let ttl = Duration::from_secs(30);
        let s = Duration::from_secs;
        let table = [
            (None, None, 100, Verdict::Take(Why::Free)),
            (
                Some(seen("other", true, 100)),
                None,
                100,
                Verdict::Take(Why::Released),
            ),
            (
                Some(seen("me", false, 100)),
                None,
                100,
                Verdict::Take(Why::Own),
            ),
            (
                Some(seen("other", false, 100)),
                Some("other"),
                100,
                Verdict::Take(Why::TakeOver),
            ),
            (
                Some(seen("other", false, 100)),
                Some("someone-else"),
                100,
                Verdict::Wait { expires_in: s(30) },
            ),
            (
                Some(seen("other", false, 100)),
                None,
                129,
                Verdict::Wait { expires_in: s(1) },
            ),
            (
                Some(seen("other", false, 100)),
                None,
                130,
                Verdict::Take(Why::Expired),
            ),
        ];
        for (seen, takeover, now, want) in table {
            assert_eq!(
                verdict(seen.as_ref(), "me", takeover, ttl, s(now)),
                want,
                "{seen:?} takeover {takeover:?} at {now}"
            );
        }
    }

    #[tokio::test]
    async fn the_fence_opens_for_two_thirds_of_a_ttl_after_a_renewal_started_and_a_loss_closes_it_for_good(
    ) {
        let f = Fence::default();
        assert!(f.permit().await.is_err(), "closed until the lease is held");
        let busy = f.busy();
        assert_eq!(
            f.lock().in_flight,
            1,
            "work under way keeps the lease renewed"
        );
        assert!(f.permit().await.is_err(), "and lets nothing out");
        drop(busy);
        assert_eq!(f.lock().in_flight, 0);
        let ttl = Duration::from_secs(30);
        f.extend(clock() + valid_for(ttl));
        let p = f.permit().await.unwrap();
        assert_eq!(f.lock().in_flight, 1);
        drop(p);
        assert_eq!(f.lock().in_flight, 0);
        assert!(!f.valid_at(clock() + Duration::from_secs(21)));
        f.close(Some("instance x".into()));
        f.extend(clock() + valid_for(ttl));
        assert!(f
            .permit()
            .await
            .unwrap_err()
            .contains("lost the bucket prefix's lease to instance x"));
        assert_eq!(renew_every(ttl), Duration::from_secs(10));
        assert_eq!(settle(ttl), Duration::from_secs(2));
        assert_eq!(settle(Duration::from_secs(3)), Duration::from_millis(500));
    }

    #[test]
    fn renewals_pause_only_when_allowed_nothing_uploads_and_nothing_did_for_a_ttl() {
        let s = Duration::from_secs;
        let ttl = Some(s(30));
        let table = [
            // (pause_after, in flight, last use, now, step)
            (None, 0, 0, 1_000, Step::Renew),
            (ttl, 0, 100, 129, Step::Renew),
            (ttl, 0, 100, 130, Step::Pause),
            (ttl, 1, 0, 1_000, Step::Renew),
            (ttl, 0, 200, 100, Step::Renew),
        ];
        for (after, in_flight, last, now, want) in table {
            assert_eq!(
                step(after, in_flight, s(last), s(now)),
                want,
                "{after:?} {in_flight} {last} {now}"
            );
        }
    }

    #[tokio::test]
    async fn a_paused_fence_wakes_the_keeper_and_opens_when_it_renews() {
        let f = Fence::default();
        f.lock().period = Duration::from_secs(10);
        f.set_paused(true);
        let keeper = {
            let f = f.clone();
            tokio::spawn(async move {
                f.0.wake.notified().await;
                f.extend(clock() + Duration::from_secs(20));
                f.set_paused(false);
            })
        };
        let p = f.permit().await.expect("opened by the keeper's renewal");
        keeper.await.unwrap();
        drop(p);
        // A renewal that fails leaves the fence closed: said, not waited for.
        f.close(None);
        assert!(f.permit().await.unwrap_err().contains("not confirmed"));
    }

    #[test]
    fn the_instance_id_is_kept_in_the_local_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = instance_id(dir.path()).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(instance_id(dir.path()).unwrap(), a);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(instance_id(other.path()).unwrap(), a);
    }
}
