//! Program entry points. Each entry point only maps its `try_` function's
//! result; verdicts for errors come from [`crate::verdict`].

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use netlb_common::stat;

use crate::{
    conntrack,
    lb::{self, Choice},
    maps, nat, nodeport, parse,
};

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

#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    match try_from_netdev(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    }
}

#[classifier]
pub fn to_netdev(ctx: TcContext) -> i32 {
    match try_to_netdev(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    }
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, i32> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    let loopback_be = maps::config().service_loopback_be;
    if loopback_be != 0 && pkt.daddr_be == loopback_be {
        // A backend answering a hairpinned flow: translate it back here,
        // since the reply is addressed to the client's own pod, and send it
        // straight back (see `nat::bounce`).
        if nat::reverse(ctx, &pkt)? {
            return Ok(nat::bounce(ctx)?);
        }
        return Ok(TC_ACT_OK);
    }
    let Some(fe) = lb::lookup_frontend(&pkt, true) else {
        return Ok(TC_ACT_OK);
    };
    let sel = match lb::choose(ctx, &pkt, &fe)? {
        Choice::Verdict(v) => return Ok(v),
        Choice::Backend(sel) => sel,
    };
    let backend = sel.backend;

    // Hairpin: the client is its own backend. Without SNAT the backend would
    // answer itself directly and the client socket would see a pod address.
    let hairpin = loopback_be != 0 && backend.address_be == pkt.saddr_be;
    if sel.new_flow {
        conntrack::create(
            &pkt,
            sel.id,
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
    maps::count_backend(sel.id, sel.new_flow);
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

#[inline(always)]
fn try_from_netdev(ctx: &TcContext) -> Result<i32, i32> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    let snat_addr_be = maps::config().snat_addr_be;
    // Only packets to the node's SNAT address can be replies of source-NATed
    // flows; checking the address first spares every other packet a lookup.
    if snat_addr_be != 0 && pkt.daddr_be == snat_addr_be && nodeport::restore_reply(ctx, &pkt)? {
        return Ok(TC_ACT_OK);
    }
    // The external view: a Local traffic policy applies here.
    let Some(fe) = lb::lookup_frontend(&pkt, false) else {
        return Ok(TC_ACT_OK);
    };
    let sel = match lb::choose(ctx, &pkt, &fe)? {
        Choice::Verdict(v) => return Ok(v),
        Choice::Backend(sel) => sel,
    };
    if sel.new_flow {
        nodeport::create_flow(&pkt, &fe, &sel, snat_addr_be)?;
        maps::count(stat::NEW_FLOW);
    }
    nat::dnat(ctx, &pkt, sel.backend.address_be, sel.backend.port_be)?;
    maps::count(stat::FORWARD_NAT);
    maps::count_backend(sel.id, sel.new_flow);
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn try_to_netdev(ctx: &TcContext) -> Result<i32, i32> {
    let Some(pkt) = parse::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    nodeport::egress(ctx, &pkt)?;
    Ok(TC_ACT_OK)
}
