//! The one retry schedule: the first delay, doubling with each failure in a
//! row, capped. S3 probes, storage recovery, database snapshots, the
//! replication pass and a single failing file all wait by it.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Waiting for S3 or for rclone: an outage of minutes is retried at
    /// least twice a minute.
    pub const S3: Backoff = Backoff {
        first: Duration::from_secs(1),
        max: Duration::from_secs(30),
    };
    /// One file that fails for a reason of its own: it must not hold the
    /// others back, and is tried at least once a minute.
    pub const FILE: Backoff = Backoff {
        first: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    /// The delay after the `failures`-th failure in a row (1 is the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }

    /// [`Backoff::delay`] within ±20 %, so a fleet rebooting together does
    /// not hit a recovering endpoint in lockstep; `unit` in [0, 1) picks
    /// where in the band (see [`jitter_unit`]).
    pub fn jittered(&self, failures: u32, unit: f64) -> Duration {
        self.delay(failures)
            .mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
    }
}

/// A number in [0, 1) for jitter; a fixed one if the kernel will not give randomness.
pub fn jitter_unit() -> f64 {
    let mut b = [0u8; 4];
    match getrandom::getrandom(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_its_cap_within_the_jitter_band() {
        let ms = |b: Backoff, n: u32| b.delay(n).as_millis() as u64;
        let s3: Vec<u64> = (1..=8).map(|n| ms(Backoff::S3, n)).collect();
        assert_eq!(s3, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert_eq!(ms(Backoff::FILE, 7), 60_000);
        assert_eq!(
            ms(Backoff::S3, 0),
            1000,
            "no failure yet counts as the first"
        );
        assert_eq!(ms(Backoff::S3, u32::MAX), 30_000, "never overflows");
        assert_eq!(Backoff::S3.jittered(1, 0.0), Duration::from_millis(800));
        assert_eq!(Backoff::S3.jittered(2, 1.0), Duration::from_millis(2400));
        let u = jitter_unit();
        assert!((0.0..1.0).contains(&u));
    }
}
