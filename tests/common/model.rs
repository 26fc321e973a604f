//! A small OpenAI-compatible model server, so the real gateway can run real
//! agent turns with nothing from outside: `POST /v1/chat/completions`
//! (streamed as server-sent events when the request asks, else one JSON
//! answer) and `GET /v1/models`. Every reply acknowledges the newest
//! `cvm-turn-…` marker among the user's messages; every request is kept, so a
//! test can see the history the gateway sent with a turn.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// The model id the gateway is configured with.
pub const MODEL: &str = "echo";
/// The prefix of the markers tests put in their turns.
pub const MARKER: &str = "cvm-turn-";

pub struct ModelServer {
    pub port: u16,
    requests: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
}

impl ModelServer {
    pub fn start() -> ModelServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (reqs, halt) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let reqs = reqs.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &reqs);
                });
            }
        });
        ModelServer {
            port,
            requests,
            stop,
        }
    }

    /// The provider block for the gateway's `models.providers`.
    pub fn provider(&self) -> Value {
        json!({
            "baseUrl": format!("http://127.0.0.1:{}/v1", self.port),
            "apiKey": "sk-test",
            "api": "openai-completions",
            "models": [{
                "id": MODEL, "name": "Echo", "reasoning": false, "input": ["text"],
                "cost": { "input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0 },
                "contextWindow": 64000, "maxTokens": 1024,
            }],
        })
    }

    /// The text of every chat request so far whose newest marker is `marker`.
    pub fn requests_for(&self, marker: &str) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(Value::to_string)
            .filter(|text| newest_marker(text).as_deref() == Some(marker))
            .collect()
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The last `cvm-turn-…` marker in `text`.
pub fn newest_marker(text: &str) -> Option<String> {
    let at = text.rfind(MARKER)?;
    let rest = &text[at..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

/// The user's text of a chat request: the content of its user messages.
fn user_text(req: &Value) -> String {
    let mut out = String::new();
    for m in req["messages"].as_array().into_iter().flatten() {
        if m["role"] != "user" {
            continue;
        }
        match &m["content"] {
            Value::String(s) => out.push_str(s),
            Value::Array(parts) => {
                for p in parts {
                    out.push_str(p["text"].as_str().unwrap_or_default());
                }
            }
            _ => {}
        }
        out.push('\n');
    }
    out
}

fn serve(conn: TcpStream, requests: &Mutex<Vec<Value>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let (method, path) = {
        let mut it = line.split_whitespace();
        (
            it.next().unwrap_or_default().to_owned(),
            it.next().unwrap_or_default().to_owned(),
        )
    };
    let (mut length, mut chunked) = (0usize, false);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let body = if chunked {
        read_chunked(&mut reader)?
    } else {
        let mut b = vec![0; length];
        reader.read_exact(&mut b)?;
        b
    };
    let mut out = conn;
    match (method.as_str(), path.as_str()) {
        ("GET", p) if p.ends_with("/models") => {
            let list = json!({ "object": "list", "data": [{ "id": MODEL, "object": "model" }] });
            respond_json(&mut out, &list)
        }
        ("POST", p) if p.ends_with("/chat/completions") => {
            let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            requests.lock().unwrap().push(req.clone());
            let text = match newest_marker(&user_text(&req)) {
                Some(m) => format!("ack {m}"),
                None => "ack".to_owned(),
            };
            if req["stream"] == true {
                stream(&mut out, &req, &text)
            } else {
                let answer = json!({
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": req["model"],
                    "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": "stop" }],
                    "usage": { "prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12 },
                });
                respond_json(&mut out, &answer)
            }
        }
        _ => out
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    }
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let n =
            usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        let mut chunk = vec![0; n + 2];
        reader.read_exact(&mut chunk)?;
        if n == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

fn respond_json(out: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let body = v.to_string();
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn stream(out: &mut TcpStream, req: &Value, text: &str) -> std::io::Result<()> {
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
    )?;
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": req["model"],
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        })
    };
    let (head, tail) = text.split_at(text.len() / 2);
    let mut events = vec![
        chunk(json!({ "role": "assistant", "content": "" }), Value::Null),
        chunk(json!({ "content": head }), Value::Null),
        chunk(json!({ "content": tail }), Value::Null),
        chunk(json!({}), json!("stop")),
    ];
    events.last_mut().unwrap()["usage"] =
        json!({ "prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12 });
    for e in events {
        write!(out, "data: {e}\n\n")?;
        out.flush()?;
    }
    out.write_all(b"data: [DONE]\n\n")?;
    out.flush()
}
