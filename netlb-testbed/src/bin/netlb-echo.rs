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
//! `netlb-echo connect-rate --connect IP:PORT [--threads N] [--duration-s S]
//!  [--count N] [--rate R] [--source IP]... [--close rst|fin|mixed]`:
//! new connections (at most R a second, until N of them or S seconds), one
//! HTTP request each, from the source addresses in turn. `rst` (default):
//! `Connection: close`, then the client ends with RST, so no 4-tuple
//! lingers; `fin`: keep-alive, the client reads the whole response and
//! closes first (FIN), so only the client side keeps TIME_WAIT; `mixed`:
//! every other connection each way. Prints `connections=N failures=F
//! seconds=S rate=R`.
//!
//! `netlb-echo udp-client --connect IP:PORT [--interval-ms N] [--duration-s S]`:
//! one connected UDP socket (one tuple) sending a DNS query every interval;
//! prints `MS ANSWER` for every answer (ms since start, the answering
//! backend's `--dns-answer`) and `MS error ...` for every failure.
//!
//! `netlb-echo udp-query --connect IP:PORT [--timeout-ms N] [--unconnected]`:
//! one query on a connected UDP socket; exit 0 with the answer, 3 when
//! refused (ICMP port unreachable reached the socket), 4 on timeout. With
//! `--unconnected`: `sendto` and `recvfrom` on an unconnected socket,
//! printing `ANSWER from SOURCE`.

use netlb_testbed::load::Close;
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

fn usage() -> ExitCode {
    eprintln!(
        "usage: netlb-echo serve --name NAME [--http PORT]... [--udp-dns PORT]... [--dns-answer IP] [--tcp-echo PORT]... [--udp-echo PORT]...\n       netlb-echo tcp-client --connect IP:PORT [--interval-ms N] [--duration-s S]\n       netlb-echo connect-rate --connect IP:PORT [--threads N] [--duration-s S] [--count N] [--rate R] [--source IP]... [--close rst|fin|mixed]\n       netlb-echo udp-client --connect IP:PORT [--interval-ms N] [--duration-s S]\n       netlb-echo udp-query --connect IP:PORT [--timeout-ms N]\n       netlb-echo udp-echo --connect IP:PORT --size BYTES"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("tcp-client") => tcp_client(&args[1..]),
        Some("connect-rate") => connect_rate(&args[1..]),
        Some("udp-client") => udp_client(&args[1..]),
        Some("udp-query") => udp_query(&args[1..]),
        Some("udp-echo") => udp_echo_client(&args[1..]),
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
    for port in values(args, "--udp-echo") {
        let socket = match UdpSocket::bind(format!("0.0.0.0:{port}")) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("udp-echo {port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let name = name.clone();
        threads.push(std::thread::spawn(move || udp_echo_loop(socket, &name)));
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
        let received = match std::io::copy(
            &mut (&mut reader).take(content_length as u64),
            &mut std::io::sink(),
        ) {
            Ok(n) if n == content_length as u64 => n,
            _ => return,
        };
        // `GET /bytes/N`: a body of N bytes (large responses).
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let body = match path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => {
                let mut b = vec![b'x'; n.min(64 << 20)];
                if let Some(last) = b.last_mut() {
                    *last = b'\n';
                }
                String::from_utf8(b).unwrap_or_default()
            }
            None if received > 0 => format!("{name} {peer} received={received}\n"),
            None => format!("{name} {peer}\n"),
        };
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
    // The peer as the application sees it (getpeername).
    if let Ok(peer) = stream.peer_addr() {
        println!("peer {peer}");
    }
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

fn connect_rate(args: &[String]) -> ExitCode {
    let Some(addr) = values(args, "--connect")
        .first()
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        return usage();
    };
    let number = |flag: &str, default: u64| {
        values(args, flag)
            .first()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let threads = number("--threads", 4) as usize;
    let duration = Duration::from_secs(number("--duration-s", 5));
    let count = number("--count", u64::MAX);
    let rate = number("--rate", 0);
    let sources: Vec<Option<Ipv4Addr>> = {
        let listed: Vec<Option<Ipv4Addr>> = values(args, "--source")
            .iter()
            .filter_map(|s| s.parse().ok().map(Some))
            .collect();
        if listed.is_empty() {
            vec![None]
        } else {
            listed
        }
    };
    let mode = values(args, "--close").first().copied().unwrap_or("rst");
    let started = Instant::now();
    let issued = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sources = std::sync::Arc::new(sources);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let issued = std::sync::Arc::clone(&issued);
            let sources = std::sync::Arc::clone(&sources);
            let mode = mode.to_owned();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                loop {
                    let n = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= count || started.elapsed() >= duration {
                        return (ok, failed);
                    }
                    if rate > 0 {
                        // Pace: connection n starts no earlier than n / rate s.
                        let due = Duration::from_secs_f64(n as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                    let close = match mode.as_str() {
                        "fin" => Close::Fin,
                        "mixed" if n % 2 == 1 => Close::Fin,
                        _ => Close::Rst,
                    };
                    let source = sources[(n % sources.len() as u64) as usize];
                    if netlb_testbed::load::one_request(&addr, source, close) {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
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

/// A DNS query for `netlb.test` with id `id`.
fn dns_query(id: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["netlb", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The A record of a reply to `dns_query`.
fn dns_answer(reply: &[u8]) -> Option<Ipv4Addr> {
    let a = reply.get(reply.len().checked_sub(4)?..)?;
    Some(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
}

fn connected_udp(args: &[String]) -> Option<UdpSocket> {
    let addr = values(args, "--connect")
        .first()
        .and_then(|a| a.parse::<SocketAddr>().ok())?;
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect(addr).ok()?;
    Some(socket)
}

fn udp_client(args: &[String]) -> ExitCode {
    let Some(socket) = connected_udp(args) else {
        return usage();
    };
    let number = |flag: &str, default: u64| {
        values(args, flag)
            .first()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let interval = Duration::from_millis(number("--interval-ms", 100));
    let duration = Duration::from_secs(number("--duration-s", 5));
    let _ = socket.set_read_timeout(Some(interval));
    let started = Instant::now();
    let mut id = 0u16;
    let mut buf = [0u8; 512];
    while started.elapsed() < duration {
        id = id.wrapping_add(1);
        let sent_at = Instant::now();
        let ms = started.elapsed().as_millis();
        if let Err(e) = socket.send(&dns_query(id)) {
            println!("{ms} error send: {e}");
        } else {
            match socket.recv(&mut buf) {
                Ok(n) => match dns_answer(&buf[..n]) {
                    Some(ip) => println!("{ms} {ip}"),
                    None => println!("{ms} error short reply"),
                },
                Err(e) => println!("{ms} error recv: {e}"),
            }
        }
        if let Some(rest) = interval.checked_sub(sent_at.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    ExitCode::SUCCESS
}

/// Answers each datagram with the server's name, a space, and the
/// datagram itself (of any size up to 64 KiB: large ones arrive and leave
/// fragmented).
fn udp_echo_loop(socket: UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let mut answer = format!("{name} ").into_bytes();
        answer.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&answer, peer);
    }
}

/// Sends one datagram of `--size` bytes to a `--udp-echo` server and checks
/// that it comes back whole; prints `NAME BYTES` (the server's name and the
/// bytes echoed) or what went wrong.
fn udp_echo_client(args: &[String]) -> ExitCode {
    let Some(socket) = connected_udp(args) else {
        return usage();
    };
    let size: usize = values(args, "--size")
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    let message: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    if let Err(e) = socket.send(&message) {
        println!("send: {e}");
        return ExitCode::FAILURE;
    }
    let mut buf = vec![0u8; 65_536];
    match socket.recv(&mut buf) {
        Ok(n) => {
            let answer = &buf[..n];
            let Some(space) = answer.iter().position(|b| *b == b' ') else {
                println!("malformed answer");
                return ExitCode::FAILURE;
            };
            let (name, echoed) = (&answer[..space], &answer[space + 1..]);
            if echoed != message.as_slice() {
                println!("corrupted: {} bytes back", echoed.len());
                return ExitCode::FAILURE;
            }
            println!("{} {}", String::from_utf8_lossy(name), echoed.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            ExitCode::from(4)
        }
    }
}

fn udp_query(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--unconnected") {
        return udp_query_unconnected(args);
    }
    let Some(socket) = connected_udp(args) else {
        return usage();
    };
    let timeout = values(args, "--timeout-ms")
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000u64);
    let _ = socket.set_read_timeout(Some(Duration::from_millis(timeout)));
    if let Err(e) = socket.send(&dns_query(1)) {
        println!("send: {e}");
        return ExitCode::FAILURE;
    }
    let mut buf = [0u8; 512];
    match socket.recv(&mut buf) {
        Ok(n) => {
            println!(
                "{}",
                dns_answer(&buf[..n])
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            println!("refused");
            ExitCode::from(3)
        }
        Err(e) => {
            println!("{e}");
            ExitCode::from(4)
        }
    }
}

fn udp_query_unconnected(args: &[String]) -> ExitCode {
    let Some(addr) = values(args, "--connect")
        .first()
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        return usage();
    };
    let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
        return ExitCode::FAILURE;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    if let Err(e) = socket.send_to(&dns_query(1), addr) {
        println!("send: {e}");
        return ExitCode::FAILURE;
    }
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => {
            let answer = dns_answer(&buf[..n])
                .map(|a| a.to_string())
                .unwrap_or_default();
            println!("{answer} from {from}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            ExitCode::from(4)
        }
    }
}
