//! netlb-echo: the test servers and a long-lived client, std only.
//!
//! `netlb-echo serve --name NAME [--http PORT]... [--udp-dns PORT]...
//!  [--dns-answer IP] [--tcp-echo PORT]...`
//! - HTTP/1.1 (keep-alive): every request gets `200` and `NAME PEER_IP:PEER_PORT\n`.
//! - DNS over UDP: every query gets one A record, `--dns-answer` (default
//!   127.0.0.1), so `dig +short` shows which backend answered.
//! - TCP echo: writes `NAME\n`, then echoes every line.
//!
//! `netlb-echo tcp-client --connect IP:PORT --interval-ms N --duration-s S`:
//! one connection; prints the greeting, sends a numbered line every interval
//! and checks its echo (2 s each); exits 0 only if every line came back.
//!
//! `netlb-echo connect-rate --connect IP:PORT [--threads N] [--duration-s S]`:
//! new connections as fast as possible, one HTTP request each (`Connection:
//! close`; the client ends each with RST so no 4-tuple lingers); prints
//! `connections=N failures=F seconds=S rate=R`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

fn usage() -> ExitCode {
    eprintln!(
        "usage: netlb-echo serve --name NAME [--http PORT]... [--udp-dns PORT]... [--dns-answer IP] [--tcp-echo PORT]...\n       netlb-echo tcp-client --connect IP:PORT [--interval-ms N] [--duration-s S]\n       netlb-echo connect-rate --connect IP:PORT [--threads N] [--duration-s S]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("tcp-client") => tcp_client(&args[1..]),
        Some("connect-rate") => connect_rate(&args[1..]),
        _ => usage(),
    }
}

fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

fn serve(args: &[String]) -> ExitCode {
    let Some(name) = values(args, "--name").first().map(|s| s.to_string()) else {
        return usage();
    };
    let answer: Ipv4Addr = values(args, "--dns-answer")
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or(Ipv4Addr::LOCALHOST);
    let mut threads = Vec::new();
    for port in values(args, "--http") {
        let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("http {port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || http_connection(stream, &name));
            }
        }));
    }
    for port in values(args, "--tcp-echo") {
        let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tcp-echo {port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || echo_connection(stream, &name));
            }
        }));
    }
    for port in values(args, "--udp-dns") {
        let socket = match UdpSocket::bind(format!("0.0.0.0:{port}")) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("udp-dns {port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        threads.push(std::thread::spawn(move || dns_loop(socket, answer)));
    }
    if threads.is_empty() {
        return usage();
    }
    eprintln!("{name}: serving");
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn http_connection(stream: TcpStream, name: &str) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(&stream);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut close = request_line.contains("HTTP/1.0");
        let mut content_length = 0usize;
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        if content_length > 0 {
            let mut body = vec![0u8; content_length.min(1 << 20)];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
        }
        let body = format!("{name} {peer}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if (&stream).write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

fn echo_connection(stream: TcpStream, name: &str) {
    let mut out = &stream;
    if writeln!(out, "{name}").is_err() {
        return;
    }
    let reader = BufReader::new(&stream);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if writeln!(out, "{line}").is_err() {
            return;
        }
    }
}

/// Answers every DNS query with one A record.
fn dns_loop(socket: UdpSocket, answer: Ipv4Addr) {
    let mut buf = [0u8; 512];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = dns_reply(&buf[..len], answer) {
            let _ = socket.send_to(&reply, peer);
        }
    }
}

fn dns_reply(query: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // Question: name labels up to the zero byte, then type and class.
    let mut i = 12;
    while i < query.len() && query[i] != 0 {
        i += 1 + query[i] as usize;
    }
    let end = i + 5;
    if end > query.len() {
        return None;
    }
    let mut reply = Vec::with_capacity(end + 16);
    reply.extend_from_slice(&query[0..2]); // id
    reply.extend_from_slice(&[0x81, 0x80]); // response, RD, RA, no error
    reply.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]); // 1 question, 1 answer
    reply.extend_from_slice(&query[12..end]);
    reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
    reply.extend_from_slice(&answer.octets());
    Some(reply)
}

fn tcp_client(args: &[String]) -> ExitCode {
    let Some(addr) = values(args, "--connect")
        .first()
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        return usage();
    };
    let interval = Duration::from_millis(
        values(args, "--interval-ms")
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100),
    );
    let duration = Duration::from_secs(
        values(args, "--duration-s")
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    );
    let stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => {
            println!("connect {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reader = BufReader::new(&stream);
    let mut greeting = String::new();
    if reader.read_line(&mut greeting).is_err() || greeting.is_empty() {
        println!("no greeting");
        return ExitCode::FAILURE;
    }
    println!("connected to {}", greeting.trim());
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        sent += 1;
        let line = format!("line {sent}");
        if writeln!(&stream, "{line}").is_err() {
            println!("send {sent} failed after {:?}", started.elapsed());
            return ExitCode::FAILURE;
        }
        let mut echo = String::new();
        match reader.read_line(&mut echo) {
            Ok(n) if n > 0 && echo.trim() == line => {}
            other => {
                println!(
                    "echo {sent} failed after {:?}: {other:?} {echo:?}",
                    started.elapsed()
                );
                return ExitCode::FAILURE;
            }
        }
        std::thread::sleep(interval);
    }
    println!("ok: {sent} lines echoed");
    ExitCode::SUCCESS
}

/// One connection with one request; whether a 200 came back.
fn one_request(addr: &SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: netlb\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = Vec::new();
    // The server closes after the response: read to EOF.
    let ok = stream.read_to_end(&mut response).is_ok() && response.starts_with(b"HTTP/1.1 200");
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
    ok
}

fn connect_rate(args: &[String]) -> ExitCode {
    let Some(addr) = values(args, "--connect")
        .first()
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        return usage();
    };
    let threads: usize = values(args, "--threads")
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let duration = Duration::from_secs(
        values(args, "--duration-s")
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    );
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while started.elapsed() < duration {
                    if one_request(&addr) {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    for worker in workers {
        let (o, f) = worker.join().unwrap_or((0, 0));
        ok += o;
        failed += f;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "connections={ok} failures={failed} seconds={seconds:.2} rate={:.0}",
        ok as f64 / seconds
    );
    if ok == 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
