//! A minimal client for rclone's remote-control API over its unix socket.
//!
//! HTTP/1.0 with `Connection: close` keeps the exchange trivial: rclone's Go
//! server then answers without chunking and closes the connection, so the
//! body is simply everything after the header.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum RcError {
    #[error("rclone rc socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rclone rc {method} answered HTTP {status}: {body}")]
    Status {
        method: String,
        status: u16,
        body: String,
    },
    #[error("rclone rc {method} answered something that is not HTTP/JSON: {detail}")]
    Malformed { method: String, detail: String },
    /// Not sent: this instance may not upload now (see `remote::lease::Fence`).
    #[error("not uploaded: {0}")]
    Fenced(String),
}

impl RcError {
    /// The call could not reach S3 (or rclone itself), or S3 failed as a
    /// whole (5xx, throttling): nothing about the file at hand, so the next
    /// call would fail the same way.
    pub fn is_unreachable(&self) -> bool {
        match self {
            RcError::Io { .. } => true,
            RcError::Status { body, .. } => [
                "request send failed",
                "dial tcp",
                "connection refused",
                "connection reset",
                "i/o timeout",
                "no such host",
                "deadline exceeded",
                // S3 itself failing, not the file: 5xx and throttling.
                "StatusCode: 5",
                "ServiceUnavailable",
                "SlowDown",
                "InternalError",
            ]
            .iter()
            .any(|m| body.contains(m)),
            RcError::Malformed { .. } => false,
            // About every upload, not this one: wait as for an outage.
            RcError::Fenced(_) => true,
        }
    }
}

/// Calls `method` (e.g. `vfs/stats`) with `params` and returns the JSON answer.
pub async fn call(socket: &Path, method: &str, params: &Value) -> Result<Value, RcError> {
    let io = |source| RcError::Io {
        path: socket.to_owned(),
        source,
    };
    let body = params.to_string();
    let request = format!(
        "POST /{method} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = UnixStream::connect(socket).await.map_err(io)?;
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(io)?;
    parse_response(method, &response)
}

/// Reads the small object `remote` of the rclone fs `fs` (e.g. a manifest)
/// through the local directory `scratch`; `None` when there is no such
/// object.
pub async fn read_object(
    socket: &Path,
    fs: &str,
    remote: &str,
    scratch: &Path,
) -> Result<Option<Vec<u8>>, RcError> {
    static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("read-{}-{n}", std::process::id());
    let local = scratch.join(&name);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| RcError::Io { path, source }
    };
    std::fs::create_dir_all(scratch).map_err(io(scratch))?;
    let params = serde_json::json!({
        "srcFs": fs, "srcRemote": remote,
        "dstFs": scratch.to_string_lossy(), "dstRemote": name,
    });
    match call(socket, "operations/copyfile", &params).await {
        Ok(_) => {}
        Err(RcError::Status { status, body, .. })
            if status == 404 || body.contains("not found") || body.contains("doesn't exist") =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    }
    let bytes = std::fs::read(&local).map_err(io(&local));
    let _ = std::fs::remove_file(&local);
    bytes.map(Some)
}

/// rclone's listing item for `remote` in `fs` (with its hashes when
/// `hash`); `None` when there is no such object.
pub async fn stat(
    socket: &Path,
    fs: &str,
    remote: &str,
    hash: bool,
) -> Result<Option<Value>, RcError> {
    let params = serde_json::json!({ "fs": fs, "remote": remote, "opt": { "showHash": hash } });
    match call(socket, "operations/stat", &params).await {
        Ok(v) if v["item"].is_null() => Ok(None),
        Ok(mut v) => Ok(Some(v["item"].take())),
        Err(RcError::Status { body, .. }) if body.contains("not found") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The items of an `operations/list` with `params` (`fs`, `remote`, `opt`,
/// `_filter`); none when the directory does not exist (yet).
pub async fn list(socket: &Path, params: &Value) -> Result<Vec<Value>, RcError> {
    match call(socket, "operations/list", params).await {
        Ok(mut l) => Ok(match l["list"].take() {
            Value::Array(items) => items,
            _ => Vec::new(),
        }),
        Err(RcError::Status { body, .. }) if body.contains("directory not found") => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Starts `method` as an rc job (`_async`) and returns its id.
pub async fn start_job(socket: &Path, method: &str, mut params: Value) -> Result<i64, RcError> {
    params["_async"] = Value::Bool(true);
    let answer = call(socket, method, &params).await?;
    answer["jobid"].as_i64().ok_or_else(|| RcError::Malformed {
        method: method.to_owned(),
        detail: format!("no job id in {answer}"),
    })
}

/// How job `id` ended: `None` while it runs, else `Ok(())` or rclone's error.
pub async fn job_outcome(socket: &Path, id: i64) -> Result<Option<Result<(), String>>, RcError> {
    let st = call(socket, "job/status", &serde_json::json!({ "jobid": id })).await?;
    if st["finished"].as_bool() != Some(true) {
        return Ok(None);
    }
    Ok(Some(match st["success"].as_bool() {
        Some(true) => Ok(()),
        _ => Err(st["error"].as_str().unwrap_or("unknown error").to_owned()),
    }))
}

fn parse_response(method: &str, response: &[u8]) -> Result<Value, RcError> {
    let malformed = |detail: &str| RcError::Malformed {
        method: method.to_owned(),
        detail: detail.to_owned(),
    };
    let text = std::str::from_utf8(response).map_err(|_| malformed("not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| malformed("no header end"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("no status code"))?;
    if status != 200 {
        return Err(RcError::Status {
            method: method.to_owned(),
            status,
            body: body.trim().to_owned(),
        });
    }
    serde_json::from_str(body).map_err(|e| malformed(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_failing_as_a_whole_is_told_from_a_file_failing() {
        let status = |body: &str| RcError::Status {
            method: "operations/copyfile".into(),
            status: 500,
            body: body.into(),
        };
        for body in [
            "request send failed, Put \"http://127.0.0.1:1/b/x\": dial tcp 127.0.0.1:1: connect: connection refused",
            "operation error S3: PutObject, https response error StatusCode: 503, api error SlowDown",
        ] {
            assert!(status(body).is_unreachable(), "{body}");
        }
        assert!(!status("object not found").is_unreachable());
        assert!(!status("source file is being updated").is_unreachable());
    }

    #[test]
    fn parses_ok_and_error_answers() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":1}\n";
        assert_eq!(parse_response("x", ok).unwrap()["a"], 1);
        let err = b"HTTP/1.0 500 Internal Server Error\r\n\r\n{\"error\":\"boom\"}";
        match parse_response("vfs/x", err) {
            Err(RcError::Status {
                status: 500, body, ..
            }) => assert!(body.contains("boom")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_response("x", b"garbage"),
            Err(RcError::Malformed { .. })
        ));
    }
}
