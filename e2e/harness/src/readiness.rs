//! Polling until a component answers, while watching that it is still running.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::process::{Process, log_tail};

const INTERVAL: Duration = Duration::from_millis(100);

/// Polls `check` until it returns `Ok(true)` or `timeout` passes.
///
/// Every process in `watched` must stay up meanwhile; if one exits the error
/// carries its log tail. On timeout the log tail of `watched[blame]` is shown,
/// the component the wait is about. `check` errors are treated as "not yet"
/// (the server is still coming up) but the last one is reported on timeout.
pub async fn wait_for<F, Fut>(
    what: &str,
    timeout: Duration,
    watched: &mut [Process],
    blame: usize,
    mut check: F,
) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<bool, String>>,
{
    let start = Instant::now();
    let mut last_error = String::new();
    loop {
        for p in watched.iter_mut() {
            p.check_running()?;
        }
        match check().await {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) => last_error = e,
        }
        if start.elapsed() >= timeout {
            let log = watched
                .get(blame)
                .map(|p| p.log().to_owned())
                .unwrap_or_default();
            let mut tail = log_tail(&log, 40);
            if !last_error.is_empty() {
                tail = format!("{tail}\n  last probe error: {last_error}");
            }
            return Err(Error::Timeout {
                what: what.to_owned(),
                seconds: timeout.as_secs(),
                log,
                tail,
            });
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// GET `http://127.0.0.1:<port><path>` with a bare HTTP/1.0 request; returns
/// status code and body. Enough for etcd's plain-HTTP `/health`, without
/// pulling an HTTP client into the harness.
pub async fn http_get(port: u16, path: &str) -> std::result::Result<(u16, String), String> {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path).await
}

/// [`http_get`] of `http://<address><path>`.
pub async fn http_get_at(
    address: std::net::SocketAddr,
    path: &str,
) -> std::result::Result<(u16, String), String> {
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .map_err(|_| format!("GET {path}: timed out"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {path}: malformed response {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// GET `path` through a kube client, `Ok(true)` on a 2xx answer.
pub async fn kube_get_ok(client: &kube::Client, path: &str) -> std::result::Result<bool, String> {
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match client.request_text(request).await {
        Ok(_) => Ok(true),
        Err(e) => Err(e.to_string()),
    }
}
