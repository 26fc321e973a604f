//! `cvm-init attest`: what a user checks before trusting a Phala/dstack CVM
//! with their bucket. dstack measures an app by the compose hash: SHA-256 of
//! the exact bytes of `app-compose.json`, extended into RTMR3 (docs/facts.md §5).
//! Env values are not measured, so the image must be pinned by digest, and
//! that digest must be the one a reproducible build produced.

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttestError {
    #[error("{0:?} is not an image digest; give sha256:<64 hex digits> (the config digest of `nix build .#image`, or the registry digest you deploy)")]
    BadDigest(String),
    #[error("app-compose.json is not JSON: {0}")]
    NotJson(String),
    #[error("app-compose.json has no docker_compose_file string; is this the file dstack shows for the CVM?")]
    NoCompose,
}

/// One `image:` line of the compose file.
#[derive(Debug, PartialEq, Eq)]
pub struct Image {
    pub reference: String,
    /// `sha256:<hex>` when pinned by digest.
    pub digest: Option<String>,
}

#[derive(Debug)]
pub struct Report {
    pub compose_hash: String,
    pub images: Vec<Image>,
    pub ours: Option<String>,
    /// Env names cvm-init reads in S3 mode that `allowed_envs` does not let through.
    pub missing_envs: Vec<&'static str>,
}

impl Report {
    /// Every image pinned and ours among them.
    pub fn ok(&self) -> bool {
        !self.images.is_empty()
            && self.images.iter().all(|i| i.digest.is_some())
            && self.ours.is_some()
    }
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

const S3_ENVS: [&str; 4] = [
    "S3_BUCKET",
    "S3_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
];

/// The `image:` values of a compose file. Compose images are plain scalars,
/// so a line scan is enough and needs no YAML parser.
pub fn images(compose: &str) -> Vec<Image> {
    compose
        .lines()
        .filter_map(|line| {
            line.trim_start()
                .trim_start_matches("- ")
                .strip_prefix("image:")
        })
        .map(|v| {
            let v = v
                .split(" #")
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches(['"', '\''])
                .to_owned();
            let digest = v
                .rsplit_once('@')
                .map(|(_, d)| d.to_owned())
                .filter(|d| is_digest(d));
            Image {
                reference: v,
                digest,
            }
        })
        .collect()
}

pub fn attest(app_compose: &[u8], expected: &str) -> Result<Report, AttestError> {
    if !is_digest(expected) {
        return Err(AttestError::BadDigest(expected.to_owned()));
    }
    let compose_hash = Sha256::digest(app_compose)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let json: serde_json::Value =
        serde_json::from_slice(app_compose).map_err(|e| AttestError::NotJson(e.to_string()))?;
    let compose = json["docker_compose_file"]
        .as_str()
        .ok_or(AttestError::NoCompose)?;
    let images = images(compose);
    let ours = images
        .iter()
        .find(|i| i.digest.as_deref() == Some(expected))
        .map(|i| i.reference.clone());
    let allowed: Vec<&str> = json["allowed_envs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    let mut missing_envs: Vec<&'static str> = S3_ENVS
        .into_iter()
        .filter(|e| !allowed.contains(e))
        .collect();
    if !allowed.contains(&"RCLONE_CRYPT_PASSWORD") && !allowed.contains(&"MASTER_KEY") {
        missing_envs.push("RCLONE_CRYPT_PASSWORD or MASTER_KEY");
    }
    Ok(Report {
        compose_hash,
        images,
        ours,
        missing_envs,
    })
}

/// Prints the report, one line per check.
pub fn print(report: &Report, expected: &str) {
    println!("compose-hash: {}", report.compose_hash);
    for i in &report.images {
        match &i.digest {
            Some(_) => println!("ok: image {} is pinned by digest", i.reference),
            None => println!(
                "problem: image {} is not pinned by digest; use repo@sha256:<digest>",
                i.reference
            ),
        }
    }
    if report.images.is_empty() {
        println!("problem: docker_compose_file names no image");
    }
    match &report.ours {
        Some(r) => println!("ok: {expected} is deployed ({r})"),
        None => println!(
            "problem: no image is pinned to {expected}; this CVM does not run the image you built"
        ),
    }
    for e in &report.missing_envs {
        println!("note: allowed_envs lacks {e}: without it cvm-init runs in local mode or refuses to start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn images_are_read_from_compose_lines() {
        let compose = "services:\n  app:\n    image: \"ghcr.io/x/cvm@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"\n  side:\n    image: redis:7 # cache\n";
        let imgs = images(compose);
        assert_eq!(imgs.len(), 2);
        assert_eq!(imgs[0].digest.as_deref(), Some(OURS));
        assert_eq!(
            imgs[1],
            Image {
                reference: "redis:7".into(),
                digest: None
            }
        );
    }

    #[test]
    fn bad_inputs() {
        assert!(matches!(
            attest(b"{}", "sha256:abc"),
            Err(AttestError::BadDigest(_))
        ));
        assert!(matches!(
            attest(b"not json", OURS),
            Err(AttestError::NotJson(_))
        ));
        assert_eq!(
            attest(b"{\"name\":\"x\"}", OURS).unwrap_err(),
            AttestError::NoCompose
        );
    }
}
