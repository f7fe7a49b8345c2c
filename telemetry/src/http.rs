//! The HTTP endpoint every blockvol binary serves for Prometheus and the kubelet:
//! `GET /metrics` (the OpenMetrics exposition, with its content type), `GET /healthz`
//! (liveness) and `GET /readyz` (readiness). What they answer comes from the binary's
//! [`Probes`]; this module only serves them.
//!
//! # Guarantees
//! - A request head larger than [`REQUEST_BYTES_MAX`] is refused (431) and one not read
//!   within [`REQUEST_TIMEOUT_MS`] closes the connection, so slow or large clients cannot
//!   pile up work here.
//! - One request per connection: every answer says `connection: close` and the
//!   connection ends after it, so a client may read until EOF.
//! - A path the binary does not serve answers 404; a method other than GET answers 405
//!   (with `allow: GET`). A failed check answers 503 with its reason as the body.
//! - Accept errors (out of file descriptors and the like) are logged and retried after
//!   [`ACCEPT_BACKOFF_MS`]; the endpoint keeps serving until its task is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Content type of `/metrics`: the exposition is OpenMetrics text (it ends in `# EOF`).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of every other answer.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";
/// Largest HTTP request head read, in bytes (the smallest buffer hyper accepts).
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// How long a client may take to send its request head, in milliseconds.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Pause after a failed accept before the next one, in milliseconds.
pub const ACCEPT_BACKOFF_MS: u64 = 100;

/// What a binary answers on its endpoint. Every method has the answer of a process
/// that serves nothing there, so a binary states only what it serves.
pub trait Probes: Send + Sync + 'static {
    /// `/metrics`: the OpenMetrics exposition; `None` when this process serves none
    /// (404).
    fn metrics(&self) -> impl Future<Output = Option<String>> + Send {
        async { None }
    }

    /// `/healthz`: `Err(reason)` answers 503 with the reason. By default the process is
    /// healthy whenever it can answer at all.
    fn healthz(&self) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    /// `/readyz`: `None` when this process serves no readiness (404), `Err(reason)`
    /// answers 503 with the reason.
    fn readyz(&self) -> impl Future<Output = Option<Result<(), String>>> + Send {
        async { None }
    }
}

/// Serves `probes` on `listener` until the task is dropped.
pub async fn serve<P: Probes>(listener: TcpListener, probes: Arc<P>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "telemetry endpoint accept");
                tokio::time::sleep(Duration::from_millis(ACCEPT_BACKOFF_MS)).await;
                continue;
            }
        };
        let probes = probes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let probes = probes.clone();
                async move { Ok::<_, Infallible>(answer(&*probes, &req).await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
                .max_buf_size(REQUEST_BYTES_MAX)
                .keep_alive(false)
                .serve_connection(TokioIo::new(conn), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "telemetry request not served");
            }
        });
    }
}

/// The answer to one request.
async fn answer<P: Probes, B>(probes: &P, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return r;
    }
    let not_found = || text(StatusCode::NOT_FOUND, "not found\n".into());
    match req.uri().path() {
        "/metrics" => match probes.metrics().await {
            Some(body) => respond(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, body),
            None => not_found(),
        },
        "/healthz" => check(probes.healthz().await),
        "/readyz" => match probes.readyz().await {
            Some(r) => check(r),
            None => not_found(),
        },
        _ => not_found(),
    }
}

fn check(result: Result<(), String>) -> Response<Full<Bytes>> {
    match result {
        Ok(()) => text(StatusCode::OK, "ok\n".into()),
        Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, TEXT_CONTENT_TYPE, body)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Default)]
    struct Fake {
        unready: AtomicBool,
    }

    impl Probes for Fake {
        async fn metrics(&self) -> Option<String> {
            Some("# EOF\n".into())
        }
        async fn readyz(&self) -> Option<Result<(), String>> {
            Some(match self.unready.load(Ordering::SeqCst) {
                true => Err("the data port is not bound".into()),
                false => Ok(()),
            })
        }
    }

    /// Serves nothing but the default liveness.
    struct Bare;
    impl Probes for Bare {}

    async fn start<P: Probes>(p: Arc<P>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (addr, tokio::spawn(serve(l, p)))
    }

    async fn raw(addr: SocketAddr, request: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        raw(addr, &format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n")).await
    }

    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        let (head, _) = response.split_once("\r\n\r\n")?;
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn serves_metrics_as_openmetrics_and_checks_as_text() {
        let fake = Arc::new(Fake::default());
        let (addr, server) = start(fake.clone()).await;
        let m = get(addr, "/metrics?x=1").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert_eq!(header(&m, "content-type"), Some(OPENMETRICS_CONTENT_TYPE));
        assert_eq!(header(&m, "connection"), Some("close"));
        assert!(m.ends_with("\r\n\r\n# EOF\n"), "{m}");
        let h = get(addr, "/healthz").await;
        assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("ok\n"), "{h}");
        assert_eq!(header(&h, "content-type"), Some(TEXT_CONTENT_TYPE));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        fake.unready.store(true, Ordering::SeqCst);
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("the data port is not bound\n"),
            "{r}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn unknown_paths_404_and_other_methods_405() {
        let (addr, server) = start(Arc::new(Fake::default())).await;
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        let post = raw(
            addr,
            "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert_eq!(header(&post, "allow"), Some("GET"));
        server.abort();
    }

    #[tokio::test]
    async fn what_a_process_does_not_serve_is_404() {
        let (addr, server) = start(Arc::new(Bare)).await;
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        server.abort();
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused() {
        let (addr, server) = start(Arc::new(Fake::default())).await;
        let big = format!(
            "GET /metrics HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n",
            "a".repeat(REQUEST_BYTES_MAX * 2)
        );
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may close before the whole head is written.
        let _ = c.write_all(big.as_bytes()).await;
        let mut out = String::new();
        let _ = c.read_to_string(&mut out).await;
        assert!(
            out.is_empty() || out.starts_with("HTTP/1.1 431"),
            "an oversized head gets no metrics: {out}"
        );
        server.abort();
    }
}
