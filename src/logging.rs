//! Logs go to journald when its socket exists, else to stderr. `CVM_LOG`
//! takes a tracing filter (default `info`, with the notify crate's chatter about
//! vanished inotify watches kept to warnings).

use std::path::Path;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// The appliance's default filter: `CVM_LOG` overrides it.
pub const DEFAULT: &str = "info,notify=warn";

pub fn init(default: &str) {
    // A filter that does not parse is said, not silently replaced.
    let (filter, bad) = match std::env::var("CVM_LOG") {
        Ok(given) if !given.is_empty() => match EnvFilter::try_new(&given) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(default), Some((given, e))),
        },
        _ => (EnvFilter::new(default), None),
    };
    install(filter);
    if let Some((given, e)) = bad {
        tracing::warn!("CVM_LOG={given:?} is not a log filter ({e}); logging with {default:?}");
    }
}

fn install(filter: EnvFilter) {
    let registry = tracing_subscriber::registry().with(filter);
    if Path::new(JOURNALD_SOCKET).exists() {
        if let Ok(journald) = tracing_journald::layer() {
            registry
                .with(journald.with_syslog_identifier("cvm-init".into()))
                .init();
            return;
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_target(false),
        )
        .init();
}
