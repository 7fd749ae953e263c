//! kube-proxy's nftables mode as of v1.36 (`pkg/proxy/nftables/
//! proxier.go`: no per-endpoint chains without affinity, the
//! `hairpin-connections` set, masquerading marked in `services`): the
//! `nft -f` transaction of a first full sync, in the order knftables
//! renders it, and of a partial sync after one Service's endpoints
//! changed. Every endpoint of the benchmark is on the proxier's node.
//!
//! Chain names are kube-proxy's `hashAndTruncate`: the first 8 characters
//! of base32(SHA-256(name)), `-`, the name (`ns/svc/proto/port`).

use std::collections::BTreeSet;

use super::{ProxierParams, sorted_endpoints};
use crate::compare::model::ServicePort;

const T: &str = "ip kube-proxy";

fn hash_and_truncate(name: &str) -> String {
    let full = format!("{}-{name}", &super::hash16(name)[..8]);
    if full.len() <= 240 {
        full
    } else {
        format!("{}...", &full[..237])
    }
}

fn base_name(port: &ServicePort) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        port.namespace,
        port.name,
        port.protocol.to_ascii_lowercase(),
        port.port_name
    ))
}

/// The static part of a full sync (`setupNFTables`), `first_sync`
/// including the create-then-delete of the base chains kube-proxy does
/// once per process.
fn setup(out: &mut Vec<String>, params: &ProxierParams, mark: &str, first_sync: bool) {
    out.push(format!(
        "add table {T} {{ comment \"rules for kube-proxy\" ; }}"
    ));
    let base = [
        ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
        ("filter-output-pre-dnat", "filter", "output", -110),
        ("filter-input", "filter", "input", 0),
        ("filter-forward", "filter", "forward", 0),
        ("filter-output", "filter", "output", 0),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ];
    if first_sync {
        for (name, ..) in base {
            out.push(format!("add chain {T} {name}"));
            out.push(format!("delete chain {T} {name}"));
        }
    }
    for (name, kind, hook, prio) in base {
        out.push(format!(
            "add chain {T} {name} {{ type {kind} hook {hook} priority {prio} ; }}"
        ));
        out.push(format!("flush chain {T} {name}"));
    }
    let jumps = [
        ("filter-input", "ct state new ", "nodeport-endpoints-check"),
        ("filter-input", "ct state new ", "service-endpoints-check"),
        ("filter-forward", "ct state new ", "service-endpoints-check"),
        ("filter-output", "ct state new ", "service-endpoints-check"),
        (
            "filter-prerouting-pre-dnat",
            "ct state new ",
            "firewall-check",
        ),
        ("filter-output-pre-dnat", "ct state new ", "firewall-check"),
        ("nat-output", "", "services"),
        ("nat-prerouting", "", "services"),
        ("nat-postrouting", "", "masquerading"),
        ("filter-forward", "ct state new ", "cluster-ips-check"),
        ("filter-output", "ct state new ", "cluster-ips-check"),
    ];
    let mut made = BTreeSet::new();
    for (src, extra, dst) in jumps {
        if made.insert(dst) {
            out.push(format!("add chain {T} {dst}"));
            out.push(format!("flush chain {T} {dst}"));
        }
        out.push(format!("add rule {T} {src} {extra}jump {dst}"));
    }
    out.push(format!("add set {T} hairpin-connections {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service ; comment \"service hairpin connections\" ; }}"));
    out.push(format!("add rule {T} masquerading mark and {mark} != 0 mark set mark xor {mark} masquerade fully-random"));
    out.push(format!("add rule {T} masquerading ct status dnat ip saddr . ip daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random"));
    out.push(format!(
        "add set {T} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    ));
    out.push(format!("add rule {T} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""));
    if !params.service_cidrs.is_empty() {
        out.push(format!(
            "add rule {T} cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
            params.service_cidrs.join(",")
        ));
    }
    out.push(format!("add set {T} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"));
    out.push(format!("flush set {T} nodeport-ips"));
    for ip in &params.node_ips {
        out.push(format!("add element {T} nodeport-ips {{ {ip} }}"));
    }
    out.push(format!("add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"));
    out.push(format!("add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"));
    out.push(format!("add chain {T} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"));
    out.push(format!("flush chain {T} reject-chain"));
    out.push(format!("add rule {T} reject-chain reject"));
    out.push(format!("add rule {T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"));
    out.push(format!("add rule {T} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"));
    out.push(format!("add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"));
    out.push(format!(
        "add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    ));
    out.push(format!("add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"));
    out.push(format!("add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"));
    out.push(format!(
        "add rule {T} services ip daddr @cluster-ips ip saddr != {} mark set mark or {mark} comment \"masquerade clusterIP traffic from outside cluster\"",
        params.cluster_cidr
    ));
    out.push(format!(
        "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    ));
    out.push(format!("add rule {T} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"));
}

/// One Service port's operations, in the proxier's order. `hairpins`
/// holds the endpoints already added to `hairpin-connections`.
fn service_port(
    out: &mut Vec<String>,
    port: &ServicePort,
    mark: &str,
    hairpins: &mut BTreeSet<String>,
) {
    let p = port.protocol.to_ascii_lowercase();
    let base = base_name(port);
    let eps = sorted_endpoints(port);
    // Every endpoint is on this node: each is a hairpin candidate.
    for ep in &eps {
        let (ip, tp) = ep.rsplit_once(':').unwrap_or((ep, ""));
        if hairpins.insert(ep.clone()) {
            out.push(format!(
                "add element {T} hairpin-connections {{ {ip} . {ip} . {p} . {tp} }}"
            ));
        }
    }
    let svc_chain = format!("service-{base}");
    let ext_chain = format!("external-{base}");
    let external = port.node_port.is_some();
    if !eps.is_empty() {
        out.push(format!("add chain {T} {svc_chain}"));
        out.push(format!("flush chain {T} {svc_chain}"));
        if external {
            out.push(format!("add chain {T} {ext_chain}"));
            out.push(format!("flush chain {T} {ext_chain}"));
        }
    }
    out.push(format!(
        "add element {T} cluster-ips {{ {} }}",
        port.cluster_ip
    ));
    let spn = port.service_port_name();
    if eps.is_empty() {
        out.push(format!(
            "add element {T} no-endpoint-services {{ {} . {p} . {} comment \"{spn}\" : goto reject-chain }}",
            port.cluster_ip, port.port
        ));
        if let Some(np) = port.node_port {
            out.push(format!(
                "add element {T} no-endpoint-nodeports {{ {p} . {np} comment \"{spn}\" : goto reject-chain }}"
            ));
        }
        return;
    }
    out.push(format!(
        "add element {T} service-ips {{ {} . {p} . {} : goto {svc_chain} }}",
        port.cluster_ip, port.port
    ));
    if let Some(np) = port.node_port {
        out.push(format!(
            "add element {T} service-nodeports {{ {p} . {np} : goto {ext_chain} }}"
        ));
        out.push(format!(
            "add rule {T} {ext_chain} mark set mark or {mark} comment \"masquerade\""
        ));
        out.push(format!("add rule {T} {ext_chain} goto {svc_chain}"));
    }
    let map: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(i, ep)| {
            let (ip, tp) = ep.rsplit_once(':').unwrap_or((ep, ""));
            format!("{i} : {ip} . {tp}")
        })
        .collect();
    out.push(format!(
        "add rule {T} {svc_chain} meta l4proto {p} dnat ip addr . port to numgen random mod {} map {{ {} }}",
        eps.len(),
        map.join(" , ")
    ));
}

/// The transaction of a full sync with mark `mark`.
pub fn transaction(
    ports: &[ServicePort],
    params: &ProxierParams,
    mark: &str,
    first_sync: bool,
) -> String {
    let mut out = Vec::with_capacity(16 + ports.len() * 8);
    setup(&mut out, params, mark, first_sync);
    let mut hairpins = BTreeSet::new();
    for port in ports {
        service_port(&mut out, port, mark, &mut hairpins);
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

/// The daemon's mark: `%#08x` of bit 14.
const NODE_MARK: &str = "0x00004000";

/// What the benchmark loads into an empty node with `nft -f`: the
/// process's first full sync.
pub fn full_ruleset(ports: &[ServicePort], params: &ProxierParams) -> String {
    transaction(ports, params, NODE_MARK, true)
}

/// A partial sync after `old`'s endpoints became `new`'s: its chains
/// rewritten, its elements re-added, hairpin elements no Service uses any
/// more deleted.
pub fn endpoints_changed(all: &[ServicePort], old: &ServicePort, new: &ServicePort) -> String {
    let mut out = Vec::new();
    let mut hairpins = BTreeSet::new();
    service_port(&mut out, new, NODE_MARK, &mut hairpins);
    let still: BTreeSet<String> = all
        .iter()
        .filter(|p| *p != old)
        .flat_map(sorted_endpoints)
        .chain(sorted_endpoints(new))
        .collect();
    let p = old.protocol.to_ascii_lowercase();
    for ep in sorted_endpoints(old) {
        if !still.contains(&ep) {
            let (ip, tp) = ep.rsplit_once(':').unwrap_or((&ep, ""));
            out.push(format!(
                "delete element {T} hairpin-connections {{ {ip} . {ip} . {p} . {tp} }}"
            ));
        }
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    //! Expected texts are kube-proxy's own (`pkg/proxy/nftables/
    //! proxier_test.go`, v1.36), compared as its tests compare: the
    //! transaction applied (as knftables' fake does) and both sides
    //! sorted by `sortNFTablesTransaction`.

    use super::*;
    use crate::compare::kube_proxy::fixtures::{params, port};

    /// Applies `add`/`flush`/`delete` lines as knftables' fake does and
    /// returns the remaining `add` lines (its `Dump`, unordered).
    fn apply(tx: &str) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        let name = |l: &str| l.split_whitespace().nth(4).unwrap_or("").to_owned();
        let kind = |l: &str| l.split_whitespace().nth(1).unwrap_or("").to_owned();
        for line in tx.lines().filter(|l| !l.trim().is_empty()) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match (words[0], words[1]) {
                ("add", "chain" | "set" | "map" | "table") => {
                    let exists = lines
                        .iter()
                        .any(|l| kind(l) == words[1] && name(l) == name(line));
                    if !exists {
                        lines.push(line.to_owned());
                    }
                }
                ("add", _) => {
                    if !lines.iter().any(|l| l == line) {
                        lines.push(line.to_owned());
                    }
                }
                ("flush", "chain") => {
                    lines.retain(|l| !(kind(l) == "rule" && name(l) == name(line)))
                }
                ("flush", "set" | "map") => {
                    lines.retain(|l| !(kind(l) == "element" && name(l) == name(line)))
                }
                ("delete", "chain" | "set" | "map") => lines.retain(|l| name(l) != name(line)),
                ("delete", "element") => {
                    let added = line.replacen("delete", "add", 1);
                    lines.retain(|l| *l != added);
                }
                other => panic!("unexpected operation {other:?}"),
            }
        }
        lines
    }

    /// kube-proxy's `sortNFTablesTransaction`: blank and `#` lines
    /// dropped; ordered by object type (table, chain, rule, set, map,
    /// element), then by name; rules keep their order within a chain,
    /// other lines of one type and name are ordered by text.
    fn sort_transaction(lines: &[String]) -> Vec<String> {
        let rank = |kind: &str| {
            ["table", "chain", "rule", "set", "map", "element"]
                .iter()
                .position(|k| *k == kind)
                .unwrap_or(9)
        };
        let mut v: Vec<(usize, String, usize, String)> = lines
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .enumerate()
            .map(|(i, l)| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let r = rank(w.get(1).copied().unwrap_or(""));
                let order = if w.get(1) == Some(&"rule") { i } else { 0 };
                (
                    r,
                    w.get(4).copied().unwrap_or("").to_owned(),
                    order,
                    l.to_owned(),
                )
            })
            .collect();
        v.sort_by(|a, b| {
            (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)).then_with(|| {
                if a.0 == rank("rule") {
                    std::cmp::Ordering::Equal
                } else {
                    a.3.cmp(&b.3)
                }
            })
        });
        v.into_iter().map(|e| e.3).collect()
    }

    /// `baseRules` of kube-proxy's nftables tests, verbatim.
    const BASE_RULES: &str = r#"
add table ip kube-proxy { comment "rules for kube-proxy" ; }

add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add set ip kube-proxy hairpin-connections { type ipv4_addr . ipv4_addr . inet_proto . inet_service ; comment "service hairpin connections" ; }

add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }

add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check

add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy masquerading mark and 0x4000 != 0 mark set mark xor 0x4000 masquerade fully-random
add rule ip kube-proxy masquerading ct status dnat ip saddr . ip daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr @cluster-ips ip saddr != 10.0.0.0/8 mark set mark or 0x4000 comment "masquerade clusterIP traffic from outside cluster"
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports

add element ip kube-proxy nodeport-ips { 192.168.0.2 }
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"#;

    fn assert_matches(ports: &[ServicePort], expected_services: &str) {
        let got = sort_transaction(&apply(&transaction(ports, &params(), "0x4000", true)));
        let expected: Vec<String> = (BASE_RULES.to_owned() + expected_services)
            .lines()
            .map(str::to_owned)
            .collect();
        let expected = sort_transaction(&expected);
        assert_eq!(got, expected, "\n--- got ---\n{}", got.join("\n"));
    }

    /// TestOverallNFTablesRules: its ClusterIP Service (svc1), its NodePort
    /// Service (svc3) and its Service without endpoints (svc6).
    #[test]
    fn cluster_ip_node_port_and_no_endpoint_services_match_test_overall_nftables_rules() {
        let ports = [
            port(
                "ns1",
                "svc1",
                "p80",
                [172, 30, 0, 41],
                80,
                None,
                &[[10, 180, 0, 1]],
            ),
            port(
                "ns3",
                "svc3",
                "p80",
                [172, 30, 0, 43],
                80,
                Some(3003),
                &[[10, 180, 0, 3]],
            ),
            port("ns6", "svc6", "p80", [172, 30, 0, 46], 80, None, &[]),
        ];
        assert_matches(
            &ports,
            r#"
# svc1
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.180.0.1 . 80 }

add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy hairpin-connections { 10.180.0.1 . 10.180.0.1 . tcp . 80 }

# svc3
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.180.0.3 . 80 }
add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 mark set mark or 0x4000 comment "masquerade"
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80

add element ip kube-proxy cluster-ips { 172.30.0.43 }
add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy hairpin-connections { 10.180.0.3 . 10.180.0.3 . tcp . 80 }

# svc6
add element ip kube-proxy cluster-ips { 172.30.0.46 }
add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
"#,
        );
    }

    /// TestSyncProxyRulesRepeated, the first sync: two ClusterIP Services.
    #[test]
    fn two_cluster_ip_services_match_test_sync_proxy_rules_repeated() {
        let ports = [
            port(
                "ns1",
                "svc1",
                "p80",
                [172, 30, 0, 41],
                80,
                None,
                &[[10, 0, 1, 1]],
            ),
            port(
                "ns2",
                "svc2",
                "p8080",
                [172, 30, 0, 42],
                8080,
                None,
                &[[10, 0, 2, 1]],
            ),
        ];
        assert_matches(
            &ports,
            r#"
add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy cluster-ips { 172.30.0.42 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy service-ips { 172.30.0.42 . tcp . 8080 : goto service-MHHHYRWA-ns2/svc2/tcp/p8080 }
add element ip kube-proxy hairpin-connections { 10.0.1.1 . 10.0.1.1 . tcp . 80 }
add element ip kube-proxy hairpin-connections { 10.0.2.1 . 10.0.2.1 . tcp . 8080 }

add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.0.1.1 . 80 }

add chain ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080
add rule ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080 meta l4proto tcp dnat ip addr . port to numgen random mod 1 map { 0 : 10.0.2.1 . 8080 }
"#,
        );
    }

    #[test]
    fn endpoints_sort_as_strings_and_index_the_numgen_map() {
        let p = port(
            "ns4",
            "svc4",
            "p80",
            [172, 30, 0, 44],
            80,
            None,
            &[[10, 180, 0, 5], [10, 180, 0, 10], [10, 180, 0, 4]],
        );
        let tx = transaction(&[p], &params(), "0x4000", false);
        assert!(
            tx.contains("numgen random mod 3 map { 0 : 10.180.0.10 . 80 , 1 : 10.180.0.4 . 80 , 2 : 10.180.0.5 . 80 }"),
            "{tx}"
        );
    }
}
