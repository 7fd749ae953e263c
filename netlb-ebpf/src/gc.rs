//! The in-kernel conntrack collector: the datapath reclaims expired
//! connections itself, so a node keeps accepting new connections while the
//! agent is stopped, crashed or being replaced (kube-proxy's node keeps
//! forwarding for days without kube-proxy because the kernel's conntrack
//! ages its own entries; this is netlb's equivalent).
//!
//! A BPF timer in `CT_GC` (armed by the agent through `ct_gc_arm`) fires
//! every `interval_ms`. While the agent's collector sweeps (it writes its
//! heartbeat, `agent_sweep_s`), the timer does nothing. When the agent has
//! not swept for two periods, or an insert found the table full
//! ([`kick`]), the timer sweeps the whole table with
//! `bpf_for_each_map_elem` and deletes what is dead by the rules every
//! user of the table shares:
//! - a connection past its lifetime, with the links it still owns;
//! - a host-flow record past its lifetime.
//!
//! Live entries are never touched: a connection is only deleted once its
//! own lifetime has passed, and a link only with it. The agent's collector
//! keeps what only userspace knows (stale UDP backends, early drop, the ids
//! live connections use, orphaned links) and the metrics.
//!
//! Cost: nothing per packet. A sweep visits every bucket of the table in
//! softirq context, once per period and only while the agent is away; a run
//! stops after [`DELETE_BUDGET`] deletions and the rest follows 10 ms later
//! (`cargo xtask bench datapath` measures both at 500,000 entries).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_timer as kernel_timer,
    helpers::{bpf_for_each_map_elem, bpf_timer_init, bpf_timer_set_callback, bpf_timer_start},
    macros::classifier,
    programs::TcContext,
};
use netlb_common::{
    CtEntry4, CtGc, CtKey4, ct_kind, ct_link_key, ct_link_kinds, ct_link_owner, stat,
};

use crate::{conntrack, maps};

/// `CLOCK_MONOTONIC`, the clock of `bpf_timer_init`'s flags.
const CLOCK_MONOTONIC: u64 = 1;
const NS_PER_MS: u64 = 1_000_000;
/// How soon a sweep asked for by a full table runs when the last one was
/// less than a second ago.
const RETRY_NS: u64 = 1_000_000_000;

/// The datapath's slot (the timer; see `CtGc`).
#[inline(always)]
fn slot() -> Option<*mut CtGc> {
    maps::CT_GC.get_ptr_mut(CtGc::KERNEL)
}

/// The agent's slot, copied.
#[inline(always)]
fn agent() -> CtGc {
    maps::CT_GC.get(CtGc::AGENT).copied().unwrap_or_default()
}

/// The timer of a slot, as the helpers take it (`netlb_common::bpf_timer`
/// has the kernel type's name, size and alignment; the helpers are declared
/// with aya's binding of it).
#[inline(always)]
fn timer(gc: *mut CtGc) -> *mut kernel_timer {
    // SAFETY: only the field's address is taken.
    unsafe { (&raw mut (*gc).timer).cast() }
}

/// Arms the timer (run once per agent start with `BPF_PROG_TEST_RUN`, never
/// attached): initialises it if this is a new map, points its callback at
/// this program (a restarted or upgraded agent's program replaces the old
/// one's), and starts it. The agent writes its slot first.
#[classifier]
pub fn ct_gc_arm(_ctx: TcContext) -> i32 {
    let Some(gc) = slot() else {
        return 1;
    };
    // SAFETY: `gc` points to the live value of CT_GC's only slot; the
    // helpers take its timer and the map it lives in, as the verifier
    // checks.
    unsafe {
        let interval_ms = u64::from(CtGc::period_ms(&agent()));
        // -EBUSY: already initialised by an earlier agent; it keeps going
        // with the callback set below.
        let _ = bpf_timer_init(
            timer(gc),
            core::ptr::from_ref(&maps::CT_GC)
                .cast_mut()
                .cast::<c_void>(),
            CLOCK_MONOTONIC,
        );
        if bpf_timer_set_callback(timer(gc), on_timer as *mut c_void) != 0 {
            return 2;
        }
        if bpf_timer_start(timer(gc), interval_ms * NS_PER_MS, 0) != 0 {
            return 3;
        }
    }
    0
}

/// Asks for a sweep now: an insert found the table full. Only the first
/// asker starts the timer early; the sweep clears the request.
#[inline(always)]
pub fn kick() {
    let Some(gc) = slot() else {
        return;
    };
    // SAFETY: `gc` points to the live slot; plain stores of a flag that
    // racing CPUs set to the same value.
    unsafe {
        if (*gc).force == 0 {
            (*gc).force = 1;
            let _ = bpf_timer_start(timer(gc), 0, 0);
        }
    }
}

/// State shared with [`visit`] over one sweep.
#[repr(C)]
struct Sweep {
    now: u32,
    deleted: u32,
}

/// Deletions per timer run: a walk stops once it deleted this many (a
/// softirq should not run for long; deleting a quarter of a million entries
/// at once took 155 ms here) and the timer comes back after
/// [`CONTINUE_NS`] for the rest. The walk starts over from the first
/// bucket, through entries that are all live by then.
const DELETE_BUDGET: u32 = 16_384;
const CONTINUE_NS: u64 = 10_000_000;

/// The timer's callback: re-arms, then sweeps when the kernel's turn has
/// come (see `CtGc::kernel_sweeps`).
extern "C" fn on_timer(_map: *mut c_void, _key: *mut u32, gc: *mut CtGc) -> i32 {
    let now = conntrack::now_s();
    // SAFETY: the kernel passes the live value that holds the timer.
    unsafe {
        let gc_value = *gc;
        let agent = agent();
        let interval_ms = u64::from(CtGc::period_ms(&agent));
        if !CtGc::kernel_sweeps(&gc_value, &agent, now) {
            // A forced sweep waits for the next second, not a full period.
            let next = if gc_value.force != 0 {
                RETRY_NS
            } else {
                interval_ms * NS_PER_MS
            };
            let _ = bpf_timer_start(timer(gc), next, 0);
            return 0;
        }
        (*gc).kernel_sweep_s = now;
        (*gc).force = 0;
        let _ = bpf_timer_start(timer(gc), interval_ms * NS_PER_MS, 0);
    }
    // Verifier workaround: the callback of `bpf_for_each_map_elem` is
    // verified like a loop, until its states repeat. Started from a known
    // 0, the count would be a new constant on every pass and the walk's
    // states would never converge ("the sequence of 8193 jumps is too
    // complex"); started from a value the verifier cannot know (the
    // request flag just cleared above: 0, or 1 if a CPU has set it since),
    // every pass is within the first.
    // SAFETY: `gc` is the live value that holds the timer.
    let unknown_zero = unsafe { core::ptr::read_volatile(&raw const (*gc).force) };
    let mut sweep = Sweep {
        now,
        deleted: unknown_zero,
    };
    // SAFETY: helper without preconditions.
    let started = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: the map is the conntrack map, the callback has the signature
    // `bpf_for_each_map_elem` calls, and `sweep` lives on this stack for
    // the call.
    unsafe {
        let _ = bpf_for_each_map_elem(
            core::ptr::from_ref(&maps::CONNTRACK)
                .cast_mut()
                .cast::<c_void>(),
            visit as *mut c_void,
            (&raw mut sweep).cast::<c_void>(),
            0,
        );
    }
    // SAFETY: as above.
    let took = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }.wrapping_sub(started);
    maps::count(stat::CT_GC_KERNEL_SWEEPS);
    maps::add(stat::CT_GC_KERNEL_NS, took);
    maps::add(
        stat::CT_GC_KERNEL_DELETED,
        u64::from(sweep.deleted.wrapping_sub(unknown_zero)),
    );
    if sweep.deleted >= DELETE_BUDGET {
        // More to reclaim: the rest in a moment, not a period later (the
        // next run sweeps too: the request flag is set, and the
        // once-a-second rest is waived).
        // SAFETY: `gc` is the live value that holds the timer.
        unsafe {
            (*gc).force = 1;
            (*gc).kernel_sweep_s = now.wrapping_sub(1);
            let _ = bpf_timer_start(timer(gc), CONTINUE_NS, 0);
        }
    }
    0
}

/// One entry of a sweep (`bpf_for_each_map_elem`'s callback; 0 goes on).
/// Deleting entries while the kernel walks the table is allowed: a deleted
/// element is skipped, and an element the walk misses is met next time.
extern "C" fn visit(
    _map: *mut c_void,
    key: *const CtKey4,
    value: *const CtEntry4,
    sweep: *mut Sweep,
) -> i64 {
    // SAFETY: the kernel passes the element's key and value, and the
    // context pointer given to `bpf_for_each_map_elem` (on the caller's
    // stack); all are copied out.
    let (key, entry, now) = unsafe { (*key, *value, (*sweep).now) };
    let deleted = match key.kind {
        ct_kind::SERVICE => {
            if conntrack::alive(&entry, now) {
                0
            } else {
                // Its links first (those it still owns), then itself.
                let mut n = 0;
                for kind in ct_link_kinds(&entry).into_iter().flatten() {
                    let link = ct_link_key(&key, &entry, kind);
                    if owned_by(&link, &key) && conntrack::delete(&link) {
                        n += 1;
                    }
                }
                n + u32::from(conntrack::delete(&key))
            }
        }
        ct_kind::HOST => {
            if conntrack::alive(&entry, now) {
                0
            } else {
                u32::from(conntrack::delete(&key))
            }
        }
        // Links go with their connections (above). The datapath never
        // leaves one without its connection (it deletes a replaced
        // connection's links, and takes a failed creation's back), so the
        // walk does not look their owners up: most entries of a busy table
        // are links, and a lookup each made a walk four times as long.
        // The agent's collector deletes any orphan it finds.
        _ => 0,
    };
    // SAFETY: as above.
    unsafe {
        (*sweep).deleted += deleted;
        // 1 stops the walk: the budget of this run is spent.
        i64::from((*sweep).deleted >= DELETE_BUDGET)
    }
}

/// Whether the link `link_key` (as stored now) belongs to `conn_key`.
#[inline(always)]
fn owned_by(link_key: &CtKey4, conn_key: &CtKey4) -> bool {
    // SAFETY: the value is copied out at once.
    match unsafe { maps::CONNTRACK.get(link_key) }.copied() {
        Some(link) => ct_link_owner(link_key, &link) == *conn_key,
        None => false,
    }
}
