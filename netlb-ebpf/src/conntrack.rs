//! Connection tracking (Cilium's `bpf/lib/conntrack.h`, reduced to what a
//! Service load balancer needs).
//!
//! One connection is one SERVICE entry keyed by the client's tuple before
//! DNAT: it holds the backend, the NAT, the TCP state and the lifetime. The
//! packets of the other direction, and those the uplink's egress sees, find
//! it through *link* entries (REPLY, EGRESS, NAT_IN; see
//! `netlb_common::ct_kind`) that carry a copy of the translation they apply.
//! A link is trusted on its own for at most `LINK_REFRESH_S`; after that, and
//! for every TCP SYN, FIN or RST, it is checked against its connection,
//! which also records the packet in the connection's state and lifetime.
//! A link whose connection is gone (or belongs to another connection now)
//! is deleted and the packet passes untranslated.
//!
//! The map is a plain hash, not an LRU: the kernel never evicts one entry of
//! a connection behind the others' back. Entries die when the datapath
//! replaces a closed connection, or when the agent's garbage collector finds
//! them expired (it deletes a connection with all its links and so frees its
//! NAT port). A full table refuses new connections (`drop_ct_full`) and
//! never touches live ones.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use netlb_common::{
    CtEntry4, CtKey4, CtState, CtTuple, DatapathConfig, TcpWin, ct_flags, ct_kind, ct_timeouts,
    proto,
};

use crate::{
    maps,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    verdict::Reason,
};

/// `BPF_NOEXIST`: insert only if the key is free.
const BPF_NOEXIST: u64 = 1;

/// Seconds of `CLOCK_MONOTONIC`, the clock of every lifetime. The coarse
/// clock (v5.11) is enough for second granularity and cheaper than
/// `bpf_ktime_get_ns`; the agent compares with `CLOCK_MONOTONIC`.
#[inline(always)]
pub fn now_s() -> u32 {
    // SAFETY: helper without preconditions.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// A conntrack key from its parts.
#[inline(always)]
pub fn tuple(saddr: u32, sport_be: u16, daddr: u32, dport_be: u16, proto: u8, kind: u8) -> CtKey4 {
    CtTuple {
        saddr,
        daddr,
        sport_be,
        dport_be,
        proto,
        kind,
        pad: [0; 2],
    }
}

/// The key of a packet's own tuple.
#[inline(always)]
pub fn key(pkt: &Packet, kind: u8) -> CtKey4 {
    tuple(
        pkt.saddr_be,
        pkt.sport_be,
        pkt.daddr_be,
        pkt.dport_be,
        pkt.proto,
        kind,
    )
}

/// Whether a packet may open a connection: any UDP datagram, a TCP SYN
/// without ACK. Anything else to a Service address with no tracked
/// connection is not the start of one.
#[inline(always)]
pub fn can_open(pkt: &Packet) -> bool {
    // A later fragment only follows its first fragment's connection.
    !pkt.no_l4
        && (pkt.proto != proto::TCP || pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN)
}

/// A TCP packet that changes a connection's state (SYN, FIN or RST).
#[inline(always)]
pub fn is_control(pkt: &Packet) -> bool {
    pkt.proto == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
}

/// The key a connection's link of `kind` has (shared with the agent's
/// garbage collector).
#[inline(always)]
pub fn link_key(conn_key: &CtKey4, conn: &CtEntry4, kind: u8) -> CtKey4 {
    netlb_common::ct_link_key(conn_key, conn, kind)
}

/// Whether a SERVICE entry is alive at `now`.
#[inline(always)]
pub fn alive(conn: &CtEntry4, now: u32) -> bool {
    now <= conn.lifetime_s
}

/// Records a packet of direction `reply` in a live connection: TCP flags
/// and the lifetime its (new) state gives it. The lifetime is rewritten at
/// most once a second unless the state changes, so an established flow does
/// not write its entry's cache line on every packet.
///
/// # Safety
/// `conn` points to a live value of the conntrack map. The stores are plain:
/// CPUs racing on one connection store the same bits or similar lifetimes.
#[inline(always)]
pub unsafe fn touch(
    conn: *mut CtEntry4,
    pkt: &Packet,
    reply: bool,
    cfg: &DatapathConfig,
    now: u32,
) {
    // SAFETY: per the function's contract.
    unsafe {
        let old = (*conn).flags;
        let mut flags = old;
        if reply {
            flags |= ct_flags::SEEN_REPLY;
        }
        if pkt.proto == proto::TCP {
            if pkt.tcp_flags & TCP_FIN != 0 {
                flags |= if reply {
                    ct_flags::FIN_REV
                } else {
                    ct_flags::FIN_FWD
                };
            }
            if pkt.tcp_flags & TCP_RST != 0 {
                flags |= ct_flags::RST;
            }
        }
        let lifetime = now.wrapping_add(cfg.timeout_s(pkt.proto, CtState::of(pkt.proto, flags)));
        if flags != old {
            (*conn).flags = flags;
            (*conn).lifetime_s = lifetime;
        } else if lifetime > (*conn).lifetime_s {
            (*conn).lifetime_s = lifetime;
        }
    }
}

/// What the conntrack knows about a packet sent to a frontend.
pub enum Found {
    /// A live connection of this frontend, already updated with the packet.
    Live(CtEntry4),
    /// An entry that must not be used for this packet (expired, closed and
    /// reopened by a SYN, or made for another frontend that had this
    /// address): a new connection replaces it.
    Stale(CtEntry4),
    Missing,
    /// A RST or FIN outside the window the backend accepts: dropped, the
    /// connection left as it is.
    OutOfWindow,
    /// A live connection opened at the other kind of hook (an outside
    /// client's tuple from a pod, or a pod's from outside): a forged
    /// source, dropped.
    WrongSide,
}

/// A TCP RST or FIN: the segments that change a connection's state and are
/// checked against the window.
#[inline(always)]
fn closes(pkt: &Packet) -> bool {
    pkt.proto == proto::TCP && pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// The client's side of a new connection opened by `pkt` (its SYN: window
/// scale and window).
#[inline(always)]
pub fn client_side(pkt: &Packet) -> TcpWin {
    if pkt.proto == proto::TCP {
        TcpWin::from_syn(pkt.wscale, pkt.win)
    } else {
        TcpWin::default()
    }
}

/// Records what a TCP packet tells about its sender in the sender's side
/// `side` (acknowledgment, window, a SYN's scale); stores only a change.
///
/// # Safety
/// `side` points into a live value of the conntrack map.
#[inline(always)]
unsafe fn record_sender(side: *mut TcpWin, pkt: &Packet) {
    if pkt.proto != proto::TCP {
        return;
    }
    // SAFETY: per the function's contract; plain stores (CPUs racing on
    // one connection store values that only ever move forward).
    unsafe {
        let mut w = *side;
        let syn = pkt.tcp_flags & TCP_SYN != 0;
        let mut changed = false;
        if syn && w.scale != pkt.wscale {
            w.scale = pkt.wscale;
            changed = true;
        }
        if w.record(syn, pkt.tcp_flags & TCP_ACK != 0, pkt.ack, pkt.win) || changed {
            *side = w;
        }
    }
}

/// The reply link's kind of a connection: where the backend's side lives.
#[inline(always)]
fn reply_kind(conn: &CtEntry4) -> u8 {
    if conn.flags & ct_flags::NORTH_SOUTH != 0 {
        ct_kind::EGRESS
    } else {
        ct_kind::REPLY
    }
}

/// Looks up the connection of a packet the client sent to a frontend with
/// rev-NAT index `rev_nat_index`, at a hook of kind `north_south`. A
/// connection is only used for the frontend it was made for (a deleted and
/// re-created frontend has a new index, as in Cilium), only while alive,
/// only from the kind of hook that opened it, and a TCP SYN (without ACK)
/// on a closing connection starts a new one on the reused tuple. A RST or
/// FIN must lie within the backend's window to count.
#[inline(always)]
pub fn find(
    conn_key: &CtKey4,
    pkt: &Packet,
    rev_nat_index: u32,
    cfg: &DatapathConfig,
    north_south: bool,
) -> Found {
    let Some(conn) = maps::CONNTRACK.get_ptr_mut(conn_key) else {
        return Found::Missing;
    };
    let now = now_s();
    // SAFETY: pointer to a live map value, copied out.
    let value = unsafe { *conn };
    let reopen = pkt.proto == proto::TCP
        && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && CtState::of(pkt.proto, value.flags) == CtState::Closing;
    if !alive(&value, now) || reopen || value.rev_nat_index != rev_nat_index {
        return Found::Stale(value);
    }
    if (value.flags & ct_flags::NORTH_SOUTH != 0) != north_south {
        return Found::WrongSide;
    }
    if closes(pkt) {
        let link = link_key(conn_key, &value, reply_kind(&value));
        // SAFETY: the value is copied out at once.
        if let Some(backend) = unsafe { maps::CONNTRACK.get(link) }.copied()
            && !backend.win.admits(pkt.seq)
        {
            return Found::OutOfWindow;
        }
    }
    // SAFETY: as above.
    unsafe {
        record_sender(&raw mut (*conn).win, pkt);
        touch(conn, pkt, false, cfg, now);
    }
    Found::Live(value)
}

/// Deletes `key` if its entry is the link of `conn_key`: a link that was
/// taken over by a newer connection (a NAT port handed on, a REPLY tuple
/// reused) is left to its new owner.
#[inline(always)]
fn delete_owned(key: &CtKey4, conn_key: &CtKey4) {
    let Some(link) = maps::CONNTRACK.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: pointer to a live map value, copied out.
    let link = unsafe { *link };
    if netlb_common::ct_link_owner(key, &link) == *conn_key {
        let _ = maps::CONNTRACK.remove(key);
    }
}

/// Deletes the links of a connection (not the connection itself: the
/// caller replaces it).
#[inline(always)]
pub fn delete_links(conn_key: &CtKey4, conn: &CtEntry4) {
    for kind in netlb_common::ct_link_kinds(conn).into_iter().flatten() {
        delete_owned(&link_key(conn_key, conn, kind), conn_key);
    }
}

/// Inserts or replaces an entry; a failure means the table is full, and
/// asks the in-kernel collector for a sweep (expired entries may be what
/// fills it while the agent is away).
#[inline(always)]
pub fn put(key: &CtKey4, value: &CtEntry4) -> Result<(), Reason> {
    maps::CONNTRACK.insert(key, value, 0).map_err(|_| {
        crate::gc::kick();
        Reason::CtFull
    })
}

/// Inserts an entry only if its key is free (an atomic reservation).
#[inline(always)]
pub fn put_new(key: &CtKey4, value: &CtEntry4) -> bool {
    maps::CONNTRACK.insert(key, value, BPF_NOEXIST).is_ok()
}

/// Removes an entry (best effort).
#[inline(always)]
pub fn remove(key: &CtKey4) {
    let _ = maps::CONNTRACK.remove(key);
}

/// Removes an entry; whether it was there.
#[inline(always)]
pub fn delete(key: &CtKey4) -> bool {
    maps::CONNTRACK.remove(key).is_ok()
}

/// A link entry derived from its connection: same translation data, trusted
/// for `LINK_REFRESH_S`; the backend's side starts unknown (its SYN-ACK
/// brings its window scale).
#[inline(always)]
pub fn link_value(conn: &CtEntry4, flags: u16, now: u32) -> CtEntry4 {
    CtEntry4 {
        flags,
        lifetime_s: now.wrapping_add(ct_timeouts::LINK_REFRESH_S),
        win: TcpWin {
            scale: TcpWin::SCALE_UNKNOWN,
            ..TcpWin::default()
        },
        ..*conn
    }
}

/// Whether the new connection `conn_key` with backend `addr:port` would
/// share its link of `kind` (REPLY, or EGRESS normalised) with another
/// live, not closing connection. Two connections of one client tuple to
/// different frontends (a client's kernel picks source ports per
/// destination) DNATed to the same backend have one reply tuple: the
/// second would take the first's link over, the backend would answer the
/// second SYN from the first's socket (a challenge ACK), and the client's
/// RST would kill the first. kube-proxy's conntrack remaps the source port
/// then; here the caller picks another backend or drops the SYN.
#[inline(always)]
pub fn tuple_taken(conn_key: &CtKey4, addr_be: u32, port_be: u16, kind: u8) -> bool {
    let mut key = tuple(
        addr_be,
        port_be,
        conn_key.saddr,
        conn_key.sport_be,
        conn_key.proto,
        kind,
    );
    if kind == netlb_common::ct_kind::EGRESS {
        netlb_common::ct_normalize(&mut key);
    }
    // SAFETY: the value is copied out at once.
    let Some(link) = (unsafe { maps::CONNTRACK.get(key) }).copied() else {
        return false;
    };
    let owner = netlb_common::ct_link_owner(&key, &link);
    if owner == *conn_key {
        // This connection's own link (a replaced connection).
        return false;
    }
    match peek_conn(&owner) {
        Some(other) => {
            CtState::of(owner.proto, other.flags) != CtState::Closing
                && link_key(&owner, &other, kind) == key
        }
        None => false,
    }
}

/// Writes a new connection: its links first (so that no reply can arrive
/// before its translation exists), the SERVICE entry last. If the SERVICE
/// entry cannot be written (the table is full), the links go again.
#[inline(always)]
pub fn create(
    conn_key: &CtKey4,
    conn: &CtEntry4,
    links: &[(CtKey4, CtEntry4)],
) -> Result<(), Reason> {
    for (key, value) in links {
        put(key, value)?;
    }
    if let Err(e) = put(conn_key, conn) {
        for (key, _) in links {
            remove(key);
        }
        return Err(e);
    }
    Ok(())
}

/// What following a link gives a packet.
pub enum Followed {
    /// The link's translation applies.
    Translate(CtEntry4),
    /// No live connection has this link: the packet passes as it is.
    Pass,
    /// A RST or FIN outside the window the receiving side accepts: dropped,
    /// the connection left as it is.
    OutOfWindow,
}

/// Follows a link for a packet: returns the link's translation when it may
/// be applied. `reply`: whether the packet travels in the connection's reply
/// direction (decided from the link, see EGRESS).
///
/// The link alone is enough while it is fresh and the packet is not a TCP
/// control packet. Otherwise its connection is looked up: when the
/// connection is alive and still has this very link, the packet is recorded
/// in it and the link is trusted for another `LINK_REFRESH_S`; when not, the
/// link is stale, so it is deleted and the packet passes as it is. A RST or
/// FIN must lie within the receiver's window: the client's (in the
/// connection) for a reply, the backend's (in the EGRESS link itself) for a
/// forward packet.
///
/// The backend's side is recorded in the link that holds it (REPLY, or
/// EGRESS for a reply); a NAT_IN link only translates.
#[inline(always)]
pub fn follow(
    link_key_: &CtKey4,
    pkt: &Packet,
    cfg: &DatapathConfig,
    reply: impl FnOnce(&CtEntry4) -> bool,
) -> Followed {
    let Some(link) = maps::CONNTRACK.get_ptr_mut(link_key_) else {
        return Followed::Pass;
    };
    // The clock is read only once a packet is known to be tracked: most
    // packets on these hooks are not, and pay for one lookup only.
    let now = now_s();
    // SAFETY: pointer to a live map value, copied out.
    let value = unsafe { *link };
    let is_reply = reply(&value);
    let holds_sender = is_reply && link_key_.kind != ct_kind::NAT_IN;
    if now < value.lifetime_s && !is_control(pkt) {
        if holds_sender {
            // SAFETY: pointer to a live map value.
            unsafe { record_sender(&raw mut (*link).win, pkt) };
        }
        return Followed::Translate(value);
    }
    let conn_key = netlb_common::ct_link_owner(link_key_, &value);
    if let Some(conn) = maps::CONNTRACK.get_ptr_mut(conn_key) {
        // SAFETY: pointer to a live map value.
        let conn_value = unsafe { *conn };
        // A SYN on the tuple of a closed connection belongs to a new one
        // that did not come through the frontend (a client reusing its port
        // to reach the pod directly): the link must not translate it. A new
        // connection through the frontend replaces the closed one (and its
        // links) before its SYN gets here.
        let reused = pkt.proto == proto::TCP
            && pkt.tcp_flags & TCP_SYN != 0
            && CtState::of(pkt.proto, conn_value.flags) == CtState::Closing;
        if alive(&conn_value, now)
            && !reused
            && link_key(&conn_key, &conn_value, link_key_.kind) == *link_key_
        {
            if closes(pkt) {
                let receiver = if is_reply { conn_value.win } else { value.win };
                if !receiver.admits(pkt.seq) {
                    return Followed::OutOfWindow;
                }
            }
            // SAFETY: both pointers are live map values; plain stores.
            unsafe {
                if holds_sender {
                    record_sender(&raw mut (*link).win, pkt);
                }
                touch(conn, pkt, is_reply, cfg, now);
                (*link).lifetime_s = now.wrapping_add(ct_timeouts::LINK_REFRESH_S);
            }
            return Followed::Translate(value);
        }
    }
    remove(link_key_);
    maps::count(netlb_common::stat::CT_STALE_LINK);
    Followed::Pass
}

/// Looks up a link without recording anything (ICMP errors): returns it if
/// its connection is alive and still owns it.
#[inline(always)]
pub fn peek_link(link_key_: &CtKey4) -> Option<CtEntry4> {
    // SAFETY: values are copied out at once.
    let value = *unsafe { maps::CONNTRACK.get(link_key_) }?;
    let now = now_s();
    let conn_key = netlb_common::ct_link_owner(link_key_, &value);
    let conn = *unsafe { maps::CONNTRACK.get(conn_key) }?;
    (alive(&conn, now) && link_key(&conn_key, &conn, link_key_.kind) == *link_key_).then_some(value)
}

/// Looks up a live connection without recording anything (ICMP errors).
#[inline(always)]
pub fn peek_conn(conn_key: &CtKey4) -> Option<CtEntry4> {
    // SAFETY: the value is copied out at once.
    let conn = *unsafe { maps::CONNTRACK.get(conn_key) }?;
    let now = now_s();
    alive(&conn, now).then_some(conn)
}
