//! A minimal HTTP/1.1 server for `/healthz`, `/livez` and `/metrics`
//! (kube-proxy serves health on :10256 and metrics on :10249). One request
//! per connection, bounded reads, std threads only.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    time::Duration,
};

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
#[error("failed to listen on {addr}")]
pub struct ListenError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Serves `/healthz`, `/livez` and `/metrics` on `addr` from a background
/// thread. Returns the bound address (port 0 picks a free one).
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr, ListenError> {
    let listener = TcpListener::bind(addr).map_err(|source| ListenError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ListenError { addr, source })?;
    std::thread::Builder::new()
        .name(format!("http-{}", local.port()))
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let metrics = Arc::clone(&metrics);
                // Short-lived: answer one request and close.
                let _ = std::thread::Builder::new()
                    .name("http-conn".into())
                    .spawn(move || handle(stream, &metrics));
            }
        })
        .map_err(|source| ListenError { addr, source })?;
    Ok(local)
}

fn handle(stream: TcpStream, metrics: &Metrics) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() || request_line.len() > 8192 {
        return;
    }
    // Skip headers (bounded).
    for _ in 0..100 {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let (status, content_type, body) = match path {
        "/healthz" | "/livez" => {
            let health = metrics.health(path == "/livez");
            let status = if health.healthy {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "application/json", health.body)
        }
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "404 page not found\n".to_owned(),
        ),
    };
    let mut stream = &stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
