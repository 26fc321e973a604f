//! The background loop under both engines (database snapshots and file
//! replication): it waits for work, does what is due, and at the stop runs
//! one final pass before a deadline. A loop that panics is a bug, but not a
//! silent one: [`Worker::died`] turns it into a storage failure the
//! supervisor acts on, instead of uploads stopping unnoticed.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{FlushError, StorageFailure};

/// What a worker runs.
pub trait Engine: Send + 'static {
    /// What the final pass could not save.
    type Unsaved: Into<FlushError> + Send + 'static;
    /// Waits until there may be work. Cancel-safe: the stop cancels it.
    fn wait(&mut self) -> impl Future<Output = ()> + Send;
    /// Does what is due. Never cancelled: the stop waits for it.
    fn act(&mut self) -> impl Future<Output = ()> + Send;
    /// Raised by the stop while `act` may still run, so a long step in
    /// it gives up and leaves the budget to `finish`; cleared before
    /// `finish` runs. `None`: nothing in `act` looks.
    fn interrupt(&self) -> Option<Arc<Interrupt>> {
        None
    }

    /// Saves everything not saved yet, before `deadline`.
    fn finish(
        &mut self,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), Self::Unsaved>> + Send;
}

/// The stop's flag for a long step in `act`: blocking code reads
/// [`Interrupt::flag`], async code awaits [`Interrupt::raised`].
#[derive(Debug, Default)]
pub struct Interrupt {
    flag: AtomicBool,
    notify: Notify,
}

impl Interrupt {
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    pub fn is_raised(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves once the flag is raised (at once if it is).
    pub async fn raised(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.is_raised() {
            notified.await;
        }
    }

    fn set(&self, raised: bool) {
        self.flag.store(raised, Ordering::SeqCst);
        if raised {
            self.notify.notify_waiters();
        }
    }
}

struct Final {
    deadline: Instant,
    reply: oneshot::Sender<Result<(), FlushError>>,
}

/// A running engine loop.
pub struct Worker {
    what: &'static str,
    tx: mpsc::Sender<Final>,
    /// `None` once [`Worker::died`] has reported its end.
    task: Option<JoinHandle<()>>,
    interrupt: Option<Arc<Interrupt>>,
}

impl Worker {
    /// Runs `engine` until [`Worker::final_pass`]; `what` names it in errors.
    pub fn spawn<E: Engine>(what: &'static str, mut engine: E) -> Worker {
        let (tx, mut rx) = mpsc::channel::<Final>(1);
        let interrupt = engine.interrupt();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    cmd = rx.recv() => {
                        if let Some(Final { deadline, reply }) = cmd {
                            if let Some(i) = engine.interrupt() {
                                i.set(false);
                            }
                            let r = engine.finish(deadline).await.map_err(Into::into);
                            let _ = reply.send(r);
                        }
                        return;
                    }
                    () = engine.wait() => {}
                }
                engine.act().await;
            }
        });
        Worker {
            what,
            tx,
            task: Some(task),
            interrupt,
        }
    }

    /// Resolves when the loop has ended on its own, which only a panic
    /// does; pending otherwise, and after it has resolved once. Cancel-safe.
    pub async fn died(&mut self) -> StorageFailure {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let end = task.await;
        self.task = None;
        let detail = match end {
            Ok(()) => "it returned".to_owned(),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned())
            }
            Err(e) => e.to_string(),
        };
        StorageFailure::WorkerDied {
            what: self.what,
            detail,
        }
    }

    /// Runs the final pass before `deadline`, then ends the loop.
    pub async fn final_pass(self, deadline: Instant) -> Result<(), FlushError> {
        let gone = || FlushError::WorkerGone(self.what);
        let (reply, rx) = oneshot::channel();
        if let Some(i) = &self.interrupt {
            i.set(true);
        }
        let result = match self.tx.send(Final { deadline, reply }).await {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(gone())),
            Err(_) => Err(gone()),
        };
        if let Some(task) = self.task {
            task.abort();
        }
        result
    }
}

/// [`Worker::final_pass`] of a worker that may not be running: nothing to
/// save when none is.
pub async fn final_pass(worker: Option<Worker>, deadline: Instant) -> Result<(), FlushError> {
    match worker {
        Some(w) => w.final_pass(deadline).await,
        None => Ok(()),
    }
}

/// [`Worker::died`] of a worker that may not be running: pending when none is.
pub async fn died(worker: &mut Option<Worker>) -> StorageFailure {
    match worker {
        Some(w) => w.died().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    struct Counting {
        acts: Arc<AtomicU32>,
        panic_at: u32,
    }

    impl Engine for Counting {
        type Unsaved = FlushError;
        async fn wait(&mut self) {
            tokio::task::yield_now().await;
        }
        async fn act(&mut self) {
            let n = self.acts.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(n != self.panic_at, "engine bug at act {n}");
        }
        async fn finish(&mut self, _: Instant) -> Result<(), FlushError> {
            Err(FlushError::WorkerGone("finish ran"))
        }
    }

    #[tokio::test]
    async fn a_panicking_loop_is_a_failure_and_its_final_pass_says_so() {
        let acts = Arc::new(AtomicU32::new(0));
        let mut w = Worker::spawn(
            "test engine",
            Counting {
                acts: acts.clone(),
                panic_at: 3,
            },
        );
        let StorageFailure::WorkerDied { what, detail } = w.died().await else {
            panic!("not a worker failure")
        };
        assert_eq!(
            (what, detail.as_str()),
            ("test engine", "engine bug at act 3")
        );
        let r = w.final_pass(Instant::now()).await;
        assert!(
            matches!(r, Err(FlushError::WorkerGone("test engine"))),
            "{r:?}"
        );
    }

    /// An `act` that runs until the stop's flag is set, as a long save does.
    struct Long {
        flag: Arc<Interrupt>,
        started: Arc<tokio::sync::Notify>,
    }

    impl Engine for Long {
        type Unsaved = FlushError;
        async fn wait(&mut self) {}
        async fn act(&mut self) {
            self.started.notify_one();
            self.flag.raised().await;
        }
        fn interrupt(&self) -> Option<Arc<Interrupt>> {
            Some(self.flag.clone())
        }
        async fn finish(&mut self, _: Instant) -> Result<(), FlushError> {
            // Cleared first, so the final pass's own saves run to the end.
            assert!(!self.flag.is_raised());
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_stop_interrupts_a_long_act_and_clears_the_flag_for_finish() {
        let started = Arc::new(tokio::sync::Notify::new());
        let w = Worker::spawn(
            "test engine",
            Long {
                flag: Arc::default(),
                started: started.clone(),
            },
        );
        started.notified().await;
        w.final_pass(Instant::now()).await.unwrap();
    }

    #[tokio::test]
    async fn the_final_pass_runs_the_engines_finish() {
        let acts = Arc::new(AtomicU32::new(0));
        let w = Worker::spawn(
            "test engine",
            Counting {
                acts: acts.clone(),
                panic_at: 0,
            },
        );
        let r = w.final_pass(Instant::now()).await;
        assert!(
            matches!(r, Err(FlushError::WorkerGone("finish ran"))),
            "{r:?}"
        );
    }
}
