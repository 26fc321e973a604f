//! The key check: a small marker written through the crypt remote on first
//! use of a bucket prefix and read back on every boot, before anything is
//! written. A wrong password (or MASTER_KEY) makes the marker unreadable, and
//! cvm-init refuses to start rather than mix data under two keys or let a
//! gateway start on what looks like an empty state.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::rclone::rc::{self, RcError};
use crate::rclone::CRYPT_REMOTE;
use crate::remote::bucket::{KEY_MARKER, META_DIR};

const CONTENT: &str = "cvm-init key check v1\n";

#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    #[error(
        "the crypt password (RCLONE_CRYPT_PASSWORD, or the keys derived from MASTER_KEY) does not match the data \
         in {raw}: it holds objects, but neither the key-check marker nor any name there decrypts with this key. \
         Refusing to start; nothing was written. Give the password this bucket prefix was written with, or use \
         another S3_PREFIX"
    )]
    WrongKey { raw: String },
    #[error("cannot check the crypt key against {raw}: {source}")]
    Rc { raw: String, source: RcError },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The prefix was empty; the marker is written.
    FirstUse,
    /// The marker decrypted.
    Matched,
    /// Data from before the marker existed (e.g. the shell entrypoint)
    /// decrypts, names and a file's content; the marker is written.
    Adopted,
}

fn not_found(e: &RcError) -> bool {
    matches!(e, RcError::Status { body, .. } if body.contains("not found"))
}

/// Lists `remote` of `fs` one level deep; a missing directory is empty.
async fn count(socket: &Path, fs: &str) -> Result<usize, RcError> {
    match rc::call(
        socket,
        "operations/list",
        &json!({ "fs": fs, "remote": "" }),
    )
    .await
    {
        Ok(v) => Ok(v["list"].as_array().map_or(0, Vec::len)),
        Err(e) if not_found(&e) => Ok(0),
        Err(e) => Err(e),
    }
}

pub async fn write_marker(socket: &Path, scratch: &Path) -> Result<(), KeyCheckError> {
    let io = |source| KeyCheckError::Io {
        path: scratch.join(KEY_MARKER),
        source,
    };
    fs::create_dir_all(scratch).map_err(io)?;
    fs::write(scratch.join(KEY_MARKER), CONTENT).map_err(io)?;
    let params = json!({
        "srcFs": scratch.to_string_lossy(), "srcRemote": KEY_MARKER,
        "dstFs": format!("{CRYPT_REMOTE}:{META_DIR}"), "dstRemote": KEY_MARKER,
    });
    rc::call(socket, "operations/copyfile", &params)
        .await
        .map(drop)
        .map_err(|source| KeyCheckError::Rc {
            raw: "the crypt remote".into(),
            source,
        })
}

/// Checks the configured key against the bucket prefix `raw` (`s3:<bucket>/<prefix>`),
/// through the rclone rc server at `socket`. Writes only the marker, and only
/// when the key is known to be right (or the prefix empty).
pub async fn check(socket: &Path, raw: &str, scratch: &Path) -> Result<Outcome, KeyCheckError> {
    let outcome = inspect(socket, raw, scratch).await?;
    if outcome != Outcome::Matched {
        write_marker(socket, scratch).await?;
    }
    Ok(outcome)
}

/// What [`check`] would find, writing nothing to S3 (for `cvm-init check`):
/// `FirstUse` and `Adopted` mean the marker is still to be written.
pub async fn inspect(socket: &Path, raw: &str, scratch: &Path) -> Result<Outcome, KeyCheckError> {
    let rc_err = |source| KeyCheckError::Rc {
        raw: raw.to_owned(),
        source,
    };
    let raw_names = count(socket, raw).await.map_err(rc_err)?;
    if raw_names == 0 {
        return Ok(Outcome::FirstUse);
    }
    let io = |source| KeyCheckError::Io {
        path: scratch.to_owned(),
        source,
    };
    fs::create_dir_all(scratch).map_err(io)?;
    let fetched = scratch.join("key-check.read");
    let _ = fs::remove_file(&fetched);
    let params = json!({
        "srcFs": format!("{CRYPT_REMOTE}:{META_DIR}"), "srcRemote": KEY_MARKER,
        "dstFs": scratch.to_string_lossy(), "dstRemote": "key-check.read",
    });
    let read = rc::call(socket, "operations/copyfile", &params).await;
    let content = fs::read_to_string(&fetched);
    let _ = fs::remove_file(&fetched);
    match read {
        Ok(_) if content.is_ok_and(|c| c == CONTENT) => return Ok(Outcome::Matched),
        Ok(_) => {
            return Err(KeyCheckError::WrongKey {
                raw: raw.to_owned(),
            })
        }
        Err(e) if not_found(&e) => {}
        Err(e) => return Err(rc_err(e)),
    }
    // No readable marker (with directory name encryption, a wrong key looks
    // for it under another name, so it is simply not found). The data may
    // predate the marker, or the key is wrong. A wrong key still decrypts
    // about one name in 256 by chance (PKCS#7 padding that happens to be
    // valid), so names alone do not decide: most top-level names must decrypt
    // AND a file's content must, which no wrong key passes.
    let names = count(socket, &format!("{CRYPT_REMOTE}:"))
        .await
        .map_err(rc_err)?;
    let wrong = || KeyCheckError::WrongKey {
        raw: raw.to_owned(),
    };
    if names * 2 <= raw_names {
        return Err(wrong());
    }
    match smallest_file(socket).await.map_err(rc_err)? {
        Some(file) => {
            let probe = scratch.join("key-check.probe");
            let params = json!({
                "srcFs": format!("{CRYPT_REMOTE}:"), "srcRemote": file,
                "dstFs": scratch.to_string_lossy(), "dstRemote": "key-check.probe",
            });
            let read = rc::call(socket, "operations/copyfile", &params).await;
            let _ = fs::remove_file(&probe);
            match read {
                Ok(_) => Ok(Outcome::Adopted),
                Err(e) if e.to_string().contains("authenticate") => Err(wrong()),
                Err(e) => Err(rc_err(e)),
            }
        }
        None => Err(wrong()),
    }
}

/// The smallest non-empty file the crypt remote shows, if any.
async fn smallest_file(socket: &Path) -> Result<Option<String>, RcError> {
    let listing = rc::call(
        socket,
        "operations/list",
        &json!({
            "fs": format!("{CRYPT_REMOTE}:"), "remote": "",
            "opt": { "recurse": true, "filesOnly": true, "noMimeType": true, "noModTime": true },
        }),
    )
    .await?;
    Ok(listing["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i["Size"].as_i64()?, i["Path"].as_str()?)))
        // An empty file is a bare header with no authenticated block: it
        // "decrypts" under any key. -1 is an object rclone cannot size.
        .filter(|&(size, _)| size > 0)
        .min()
        .map(|(_, p)| p.to_owned()))
}
