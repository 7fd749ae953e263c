//! Pod interface discovery: enumerates interfaces matching name patterns and
//! learns about new and removed ones from rtnetlink link notifications
//! (`RTMGRP_LINK`), without shelling out to `ip`.

use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::mpsc::Sender,
    thread::JoinHandle,
};

/// A shell-style pattern with `*` and `?` (e.g. `veth*`, `lxc*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamePattern(String);

impl NamePattern {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => {
            glob(rest, name) || (!name.is_empty() && glob(pattern, &name[1..]))
        }
        (Some((b'?', rest)), Some((_, name_rest))) => glob(rest, name_rest),
        (Some((p, rest)), Some((n, name_rest))) => p == n && glob(rest, name_rest),
        _ => false,
    }
}

/// Names of all interfaces of the current network namespace.
pub fn interface_names() -> io::Result<BTreeSet<String>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // freed below with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut names = BTreeSet::new();
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.insert(
                CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(names)
    }
}

/// Interfaces matching any of `patterns`.
pub fn matching_interfaces(patterns: &[NamePattern]) -> io::Result<BTreeSet<String>> {
    Ok(interface_names()?
        .into_iter()
        .filter(|name| patterns.iter().any(|p| p.matches(name)))
        .collect())
}

/// Opens an rtnetlink socket subscribed to link notifications. Open it on the
/// thread that is in the right network namespace.
pub fn link_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2)/bind(2) calls with a zeroed sockaddr_nl.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        if libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Reads link notifications from `socket` and sends `()` on `tx` for each
/// batch: the receiver re-enumerates interfaces, which also covers a buffer
/// overrun (ENOBUFS) that lost messages. Ends when the receiver is gone.
pub fn spawn_watcher(socket: OwnedFd, tx: Sender<()>) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("netlink-links".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // SAFETY: reading into a buffer we own.
                let n = unsafe {
                    libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n < 0 {
                    let err = io::Error::last_os_error();
                    match err.raw_os_error() {
                        Some(libc::EINTR) | Some(libc::ENOBUFS) => {}
                        _ => {
                            log::error!("netlink link watcher stopped: {err}");
                            return;
                        }
                    }
                }
                if tx.send(()).is_err() {
                    return;
                }
            }
        })
}

/// Enters the network namespace at `path` (e.g. `/run/netns/NAME`). Call it
/// before any thread is started: it only changes the calling thread, and
/// threads inherit it from their creator.
pub fn enter_netns(path: &std::path::Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    // SAFETY: setns on a namespace file descriptor we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        let cases = [
            ("veth*", "veth1234", true),
            ("veth*", "veth", true),
            ("veth*", "eth0", false),
            ("lxc*", "lxc_health", true),
            ("cali?", "cali1", true),
            ("cali?", "cali12", false),
            ("*", "anything", true),
            ("eth0", "eth0", true),
            ("eth0", "eth01", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(
                NamePattern::new(pattern).matches(name),
                want,
                "{pattern} vs {name}"
            );
        }
    }
}
