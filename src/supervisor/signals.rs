//! What each signal means to PID 1. The kernel gives PID 1 no default
//! signal actions (docs/facts.md §4): everything it obeys is listed here.

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, Signal as SignalStream, SignalKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// Stop everything, in data-safe order.
    Shutdown(Signal),
    /// Pass it on to the gateway's process group.
    Forward(Signal),
}

const SIGNALS: [SignalAction; 6] = [
    SignalAction::Shutdown(Signal::SIGTERM),
    SignalAction::Shutdown(Signal::SIGINT),
    SignalAction::Shutdown(Signal::SIGQUIT),
    SignalAction::Forward(Signal::SIGHUP),
    SignalAction::Forward(Signal::SIGUSR1),
    SignalAction::Forward(Signal::SIGUSR2),
];

pub struct Signals {
    streams: Vec<(SignalAction, SignalStream)>,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        let streams = SIGNALS
            .iter()
            .map(|&a| {
                let (SignalAction::Shutdown(s) | SignalAction::Forward(s)) = a;
                signal(SignalKind::from_raw(s as i32)).map(|st| (a, st))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { streams })
    }

    /// The next signal received. Cancel-safe.
    pub async fn recv(&mut self) -> SignalAction {
        std::future::poll_fn(|cx| {
            for (action, stream) in &mut self.streams {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*action);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
