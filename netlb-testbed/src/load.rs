//! The HTTP client side of the load generators (`netlb-echo connect-rate`,
//! `netlb-load`): one request per new connection (netperf's TCP_CRR shape)
//! or requests on kept-alive connections, with per-request latency.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// How a load-generator connection ends.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// `Connection: close`; the client resets once the server closed.
    Rst,
    /// Keep-alive; the client reads the response and closes first.
    Fin,
}

/// One connection from `source` (any address when `None`) with one
/// request; whether a 200 came back.
pub fn one_request(addr: &SocketAddr, source: Option<Ipv4Addr>, close: Close) -> bool {
    let socket = match socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    ) {
        Ok(s) => s,
        Err(_) => return false,
    };
    if let Some(ip) = source
        && socket.bind(&SocketAddr::from((ip, 0)).into()).is_err()
    {
        return false;
    }
    if socket
        .connect_timeout(&(*addr).into(), Duration::from_secs(5))
        .is_err()
    {
        return false;
    }
    let mut stream: TcpStream = socket.into();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request: &[u8] = match close {
        Close::Rst => b"GET / HTTP/1.1\r\nHost: netlb\r\nConnection: close\r\n\r\n",
        Close::Fin => b"GET / HTTP/1.1\r\nHost: netlb\r\n\r\n",
    };
    if stream.write_all(request).is_err() {
        return false;
    }
    let ok = match close {
        // The server closes after the response: read to EOF.
        Close::Rst => {
            let mut response = Vec::new();
            stream.read_to_end(&mut response).is_ok() && response.starts_with(b"HTTP/1.1 200")
        }
        Close::Fin => read_one_response(&stream),
    };
    if close == Close::Rst {
        // Close with RST (SO_LINGER 0): neither side keeps the 4-tuple in
        // TIME_WAIT, so the client's ports can be reused at once, as a load
        // generator needs at thousands of connections per second.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a socket we own, with a correctly sized value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&stream),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            );
        }
    }
    ok
}

/// Reads one HTTP/1.1 response with a Content-Length; whether it was a 200.
pub fn read_one_response(stream: &TcpStream) -> bool {
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    if reader.read_line(&mut status).is_err() || !status.starts_with("HTTP/1.1 200") {
        return false;
    }
    let mut length = 0u64;
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        if header == "\r\n" {
            break;
        }
        if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    matches!(std::io::copy(&mut reader.take(length), &mut std::io::sink()), Ok(n) if n == length)
}

/// A new TCP connection and one HTTP request to a `netlb-echo` server:
/// the answering backend's name (the first word of the body).
pub fn backend_name(addr: SocketAddr, connect_timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, connect_timeout).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split("\r\n\r\n")
        .nth(1)?
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

/// What a load run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// A new TCP connection per request, to a target picked at random for
    /// each connection (TCP_CRR).
    ConnectRequestClose,
    /// One kept-alive connection per worker, to a target picked at random
    /// when the worker starts, requests back to back (TCP_RR).
    KeepAlive,
}

/// A bounded load: `concurrency` workers for `duration`.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub mode: LoadMode,
    pub targets: Vec<SocketAddr>,
    pub concurrency: usize,
    pub duration: Duration,
    /// Seeds the target choice (each worker derives its own).
    pub seed: u64,
}

/// What a load run measured.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub requests: u64,
    pub failures: u64,
    pub seconds: f64,
    /// Successful requests per second.
    pub rate: f64,
    /// Latency of successful requests (connect to response for
    /// [`LoadMode::ConnectRequestClose`]), microseconds.
    pub p50_us: u64,
    pub p99_us: u64,
}

/// xorshift64*: enough to spread targets, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// The value at quantile `q` of sorted samples (nearest rank).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One request on a kept-alive connection; whether a 200 came back.
fn keep_alive_request(stream: &mut TcpStream) -> bool {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: netlb\r\n\r\n")
        .is_ok()
        && read_one_response(stream)
}

fn keep_alive_connection(addr: &SocketAddr) -> Option<TcpStream> {
    let stream = TcpStream::connect_timeout(addr, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.set_nodelay(true).ok()?;
    Some(stream)
}

/// Runs the load and returns its figures. Targets are never empty here:
/// an empty list yields a report of zero requests.
pub fn run(spec: &LoadSpec) -> LoadReport {
    if spec.targets.is_empty() || spec.concurrency == 0 {
        return LoadReport::default();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let results: Vec<(Vec<u64>, u64)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..spec.concurrency)
            .map(|w| {
                let stop = Arc::clone(&stop);
                s.spawn(move || {
                    let mut rng = Rng::new(spec.seed ^ ((w as u64 + 1) << 32));
                    let mut latencies = Vec::with_capacity(4096);
                    let mut failures = 0u64;
                    let mut kept: Option<TcpStream> = None;
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < spec.duration {
                        let t0 = Instant::now();
                        let ok = match spec.mode {
                            LoadMode::ConnectRequestClose => {
                                let target = spec.targets[rng.below(spec.targets.len())];
                                one_request(&target, None, Close::Rst)
                            }
                            LoadMode::KeepAlive => {
                                if kept.is_none() {
                                    let target = spec.targets[rng.below(spec.targets.len())];
                                    kept = keep_alive_connection(&target);
                                }
                                match kept.as_mut() {
                                    Some(stream) => {
                                        let ok = keep_alive_request(stream);
                                        if !ok {
                                            kept = None;
                                        }
                                        ok
                                    }
                                    None => false,
                                }
                            }
                        };
                        if ok {
                            latencies.push(t0.elapsed().as_micros() as u64);
                        } else {
                            failures += 1;
                            // A refused or timed-out attempt must not spin.
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    (latencies, failures)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let failures = results.iter().map(|(_, f)| f).sum();
    let mut all: Vec<u64> = results.into_iter().flat_map(|(l, _)| l).collect();
    all.sort_unstable();
    LoadReport {
        requests: all.len() as u64,
        failures,
        seconds,
        rate: all.len() as f64 / seconds,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn targets_are_spread() {
        let mut rng = Rng::new(1);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10)] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn a_local_server_is_loaded_in_both_modes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut stream = stream;
                    loop {
                        let mut line = String::new();
                        let mut close = false;
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line.eq_ignore_ascii_case("connection: close\r\n") {
                                close = true;
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let _ =
                            stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        for mode in [LoadMode::ConnectRequestClose, LoadMode::KeepAlive] {
            let report = run(&LoadSpec {
                mode,
                targets: vec![addr],
                concurrency: 2,
                duration: Duration::from_millis(300),
                seed: 7,
            });
            assert!(report.requests > 10, "{mode:?}: {report:?}");
            assert_eq!(report.failures, 0, "{mode:?}: {report:?}");
            assert!(report.p50_us > 0 && report.p99_us >= report.p50_us);
        }
    }
}
