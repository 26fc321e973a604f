//! What both benchmarks share: knobs from the environment, summary
//! statistics, and writing the result table where the README says.

use std::fs;
use std::path::Path;
use std::time::Duration;

/// A duration in whole seconds from `var`, else `default`.
pub fn secs(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// (min, median, max); NaN for no samples.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    match (v.first(), v.last()) {
        (Some(&min), Some(&max)) => (min, v[v.len() / 2], max),
        _ => (f64::NAN, f64::NAN, f64::NAN),
    }
}

/// Prints the Markdown report and writes it to `bench/<name>.md`.
pub fn write_report(name: &str, md: &str) {
    print!("{md}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join(format!("{name}.md"));
    fs::write(&path, md).unwrap();
    eprintln!("bench: wrote {}", path.display());
}
