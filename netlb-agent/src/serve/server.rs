//! The agent's HTTP servers (`/healthz`, `/livez`, `/metrics`,
//! `/proxyMode`, and every health-check node port) on the agent's one
//! tokio runtime, with hyper: tasks, not threads, per listener and per
//! connection. A listener takes at most `max_connections` at once (more
//! are accepted and closed at once), a client has `header_read_timeout` to
//! send its request head (at most `max_header_bytes`) and a connection
//! lives at most `max_lifetime`. Request bodies are never read.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{runtime::Handle, sync::Semaphore, task::JoinHandle};

/// Bounds on what one listener spends on its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_lifetime: Duration::from_secs(120),
        }
    }
}

/// Answers a request from its head (method, path, headers).
pub type Handler = Arc<dyn Fn(&http::request::Parts) -> Response<Full<Bytes>> + Send + Sync>;

/// A listener being served. Dropping it stops accepting and closes the
/// listening socket before it returns (so the port can be bound again at
/// once); connections already accepted finish within their limits. Drop it
/// outside the runtime's worker threads (the agent's sync loop does).
pub struct Server {
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        // The runtime drops the aborted task, and with it the socket, on
        // its next poll: wait for that.
        let _ = futures::executor::block_on(&mut self.task);
    }
}

/// Serves `listener` (bound by the caller, so that bind errors are the
/// caller's to report) with `handler` on `runtime`.
pub fn spawn(
    runtime: &Handle,
    listener: std::net::TcpListener,
    limits: Limits,
    handler: Handler,
) -> std::io::Result<Server> {
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let task = runtime.spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // E.g. EMFILE: the connection stays queued; back off
                    // instead of spinning.
                    log::warn!("{local}: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                // Over the bound: closed at once (the client sees a reset or
                // EOF and retries), nothing queued in memory.
                drop(stream);
                continue;
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let (parts, _body) = request.into_parts();
                    let response = handler(&parts);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .max_buf_size(limits.max_header_bytes.max(8192))
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(limits.max_lifetime, connection).await;
                drop(permit);
            });
        }
    });
    Ok(Server { local, task })
}

/// A response with `status`, `content_type` and `body`, and `nosniff`.
pub fn response(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("X-Content-Type-Options", "nosniff");
    if status == 404 {
        builder = builder.header("Connection", "close");
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Threads of this process whose name starts with `prefix` (tests run
    /// in parallel threads of one process).
    fn threads(prefix: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
            })
            .count()
    }

    #[test]
    fn many_idle_connections_take_no_thread_and_block_no_request() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("idle-test")
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = spawn(
            runtime.handle(),
            listener,
            Limits::default(),
            Arc::new(|parts| response(200, "text/plain", format!("{}\n", parts.uri.path()))),
        )
        .unwrap();
        let addr = server.local_addr();
        assert!(get(addr, "/x").ends_with("/x\n"));
        let before = threads("idle-test");
        let idle: Vec<_> = (0..500)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let started = std::time::Instant::now();
        assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200"));
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            threads("idle-test"),
            before,
            "threads grew with idle connections"
        );
        drop(idle);
        drop(server);
        // Closed when the drop returns: the port can be bound again.
        assert!(std::net::TcpListener::bind(addr).is_ok(), "still listening");
    }

    #[test]
    fn connections_over_the_bound_are_closed_and_the_rest_served() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let limits = Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let server = spawn(
            runtime.handle(),
            listener,
            limits,
            Arc::new(|_| response(200, "text/plain", "ok\n".into())),
        )
        .unwrap();
        let addr = server.local_addr();
        let a = std::net::TcpStream::connect(addr).unwrap();
        let b = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // The third is over the bound: closed without an answer.
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
        assert!(buf.is_empty());
        // The silent two time out (header read timeout), freeing permits.
        std::thread::sleep(Duration::from_millis(600));
        assert!(get(addr, "/").starts_with("HTTP/1.1 200"));
        drop((a, b));
    }
}
