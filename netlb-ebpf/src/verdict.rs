//! The one place where errors become TC verdicts.
//!
//! Every `Err` a program returns is a [`Reason`]; converting it to the
//! program's return value counts it in the per-CPU `STATS` map under the same
//! index the agent exports as a metric label (`netlb_common::stat::NAMES`).

use aya_ebpf::bindings::{TC_ACT_SHOT, tcx_action_base::TCX_NEXT};
use netlb_common::stat;

use crate::maps;

/// Why a packet is dropped. The discriminant is the `STATS` index.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    MalformedL3 = stat::DROP_MALFORMED_L3,
    TruncatedL4 = stat::DROP_TRUNCATED_L4,
    NoBackendEntry = stat::DROP_NO_BACKEND_ENTRY,
    CtFull = stat::DROP_CT_FULL,
    Rewrite = stat::DROP_REWRITE,
    RejectFailed = stat::DROP_REJECT_FAILED,
    NoLocalEndpoints = stat::DROP_NO_LOCAL_ENDPOINTS,
    NatPorts = stat::DROP_NAT_PORTS,
    CtInvalid = stat::DROP_CT_INVALID,
    SpoofedSource = stat::DROP_SPOOFED_SOURCE,
    SourceRange = stat::DROP_SOURCE_RANGE,
    UnallocatedServiceIp = stat::DROP_UNALLOCATED_SERVICE_IP,
    TupleCollision = stat::DROP_TUPLE_COLLISION,
    CtOutOfWindow = stat::DROP_CT_OUT_OF_WINDOW,
    CtWrongSide = stat::DROP_CT_WRONG_SIDE,
}

impl From<Reason> for i32 {
    /// Counts the drop and returns `TC_ACT_SHOT`.
    #[inline(always)]
    fn from(reason: Reason) -> i32 {
        maps::count(reason as u32);
        TC_ACT_SHOT
    }
}

/// Hand the packet on to the next program on the hook (`TCX_NEXT`). Under
/// TCX, `TC_ACT_OK` means `TCX_PASS`, which ends the chain: the programs a
/// CNI or the bandwidth plugin attached after netlb would never run. On a
/// classic clsact hook the same value is `TC_ACT_UNSPEC`, which also runs
/// the next filter.
pub const NEXT: i32 = TCX_NEXT;
