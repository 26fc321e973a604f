//! `cvm-init attest` against app-compose.json files built by hand, with the
//! compose hash computed independently by `sha256sum`.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::BIN;

const DIGEST: &str = "sha256:5b0c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f80";
const TEMPLATE: &str = include_str!("../deploy/docker-compose.yml");
const PLACEHOLDER: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn app_compose(dir: &Path, compose: &str, allowed: &[&str]) -> std::path::PathBuf {
    // Field names as dstack's app-compose.json has them; serialised once, so
    // the hash below is over exactly these bytes.
    let json = serde_json::json!({
        "manifest_version": 2,
        "name": "openclaw",
        "runner": "docker-compose",
        "docker_compose_file": compose,
        "allowed_envs": allowed,
        "kms_enabled": true,
        "public_logs": false,
    });
    let path = dir.join("app-compose.json");
    fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    path
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn attest(path: &Path, digest: &str) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["attest".as_ref(), path.as_os_str(), digest.as_ref()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap(), text)
}

const ALL_ENVS: [&str; 9] = [
    "S3_BUCKET",
    "S3_ENDPOINT",
    "S3_PROVIDER",
    "S3_REGION",
    "S3_PREFIX",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MASTER_KEY",
    "OPENCLAW_GATEWAY_TOKEN",
];

#[test]
fn the_shipped_template_pinned_to_our_digest_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let compose = TEMPLATE.replace(PLACEHOLDER, DIGEST);
    let path = app_compose(tmp.path(), &compose, &ALL_ENVS);
    let (code, out) = attest(&path, DIGEST);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("compose-hash: {}\n", sha256sum(&path))),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "ok: {DIGEST} is deployed (ghcr.io/OWNER/cvm-init@{DIGEST})"
        )),
        "{out}"
    );
    assert!(!out.contains("note:"), "{out}");
}

#[test]
fn an_unpinned_or_foreign_image_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let compose = TEMPLATE.replace(PLACEHOLDER, DIGEST) + "  sidecar:\n    image: redis:7\n";
    let path = app_compose(tmp.path(), &compose, &["S3_BUCKET"]);
    let (code, out) = attest(&path, DIGEST);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("problem: image redis:7 is not pinned by digest"),
        "{out}"
    );
    assert!(
        out.contains("note: allowed_envs lacks S3_ENDPOINT"),
        "{out}"
    );

    // The template as shipped pins a placeholder, not the image we built.
    let path = app_compose(tmp.path(), TEMPLATE, &ALL_ENVS);
    let (code, out) = attest(&path, DIGEST);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("problem: no image is pinned to {DIGEST}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("compose-hash: {}", sha256sum(&path))),
        "{out}"
    );
}

#[test]
fn bad_arguments_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = app_compose(tmp.path(), TEMPLATE, &ALL_ENVS);
    let (code, out) = attest(&path, "sha256:1234");
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("is not an image digest"), "{out}");
    let (code, out) = attest(&tmp.path().join("missing.json"), DIGEST);
    assert_eq!(code, 64, "{out}");
    fs::write(tmp.path().join("x.json"), "{\"name\":1}").unwrap();
    let (code, out) = attest(&tmp.path().join("x.json"), DIGEST);
    assert_eq!(code, 64);
    assert!(out.contains("no docker_compose_file"), "{out}");
}
