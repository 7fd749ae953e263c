//! Program entry points. Each entry point only maps its `try_` function's
//! result; verdicts for errors come from [`crate::verdict`].

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use netlb_common::{stat, svc_flags};

use crate::{conntrack, lb, maps, nat, parse, reject, verdict::Reason};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    }
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    match try_to_pod(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    }
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, i32> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    let loopback_be = maps::service_loopback_be();
    if loopback_be != 0 && pkt.daddr_be == loopback_be {
        // A backend answering a hairpinned flow: translate it back here,
        // since the reply is addressed to the client's own pod.
        nat::reverse(ctx, &pkt)?;
        return Ok(TC_ACT_OK);
    }
    let Some(fe) = lb::lookup_frontend(&pkt, true) else {
        return Ok(TC_ACT_OK);
    };
    if fe.value.count == 0 {
        if fe.value.flags & svc_flags::DROP != 0 {
            return Err(Reason::NoLocalEndpoints.into());
        }
        return Ok(reject::port_unreachable(ctx, &pkt)?);
    }

    let tracked = conntrack::lookup(&conntrack::key(&pkt, netlb_common::ct_dir::SERVICE));
    let tracked_backend = match tracked {
        Some(entry) => match lb::backend(entry.backend_id) {
            Some(backend) => Some((entry.backend_id, backend)),
            None => {
                // The backend was removed: pick a new one, as Cilium does for
                // stale entries.
                maps::count(stat::CT_RESELECT);
                None
            }
        },
        None => None,
    };
    let (backend_id, backend, new_flow) = match tracked_backend {
        Some((id, backend)) => (id, backend, false),
        None => {
            let (id, backend) = lb::select_backend(&fe, lb::flow_hash(&pkt))?;
            (id, backend, true)
        }
    };

    // Hairpin: the client is its own backend. Without SNAT the backend would
    // answer itself directly and the client socket would see a pod address.
    let hairpin = loopback_be != 0 && backend.address_be == pkt.saddr_be;
    if new_flow {
        conntrack::create(
            &pkt,
            backend_id,
            backend.address_be,
            backend.port_be,
            fe.value.rev_nat_index,
            if hairpin { Some(loopback_be) } else { None },
        )?;
        maps::count(stat::NEW_FLOW);
    }
    nat::dnat(ctx, &pkt, backend.address_be, backend.port_be)?;
    if hairpin {
        nat::snat_addr(ctx, &pkt, loopback_be)?;
        maps::count(stat::HAIRPIN);
    }
    maps::count(stat::FORWARD_NAT);
    maps::count_backend(backend_id, new_flow);
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<i32, i32> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    nat::reverse(ctx, &pkt)?;
    Ok(TC_ACT_OK)
}
