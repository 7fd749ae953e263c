//! kube-proxy's iptables mode: the `iptables-restore` input of a full sync
//! and of a partial sync after one Service's endpoints changed
//! (`syncProxyRules` and `writeServiceToEndpointRules` in
//! `pkg/proxy/iptables/proxier.go`), for an IPv4 proxier with
//! detect-local-mode ClusterCIDR, masqueradeAll off, localhost node ports
//! on and `--nodeport-addresses` unset.
//!
//! Emission follows the proxier: filter table, then nat; the static chains
//! first; per Service port its `KUBE-SERVICES` rule, node-port rules, the
//! `KUBE-SVC-` chain's masquerade rule, the `KUBE-EXT-` chain, then the
//! endpoint chains; the node-ports jump last in `KUBE-SERVICES`.

use super::{ProxierParams, hash16, sorted_endpoints};
use crate::compare::model::ServicePort;

/// What differs between kube-proxy's unit tests and a real node.
#[derive(Debug, Clone)]
pub struct Flavour {
    /// The masquerade mark: the daemon writes `%#08x` of bit 14,
    /// `0x00004000`; the unit tests use `0x4000`.
    pub mark: String,
    /// nfacct counters present (the tests' fake has them; a node needs
    /// `nfnetlink_acct` objects the harness does not create).
    pub nfacct: bool,
    /// `MASQUERADE --random-fully` (iptables >= 1.6.2; the tests' fake
    /// has not).
    pub random_fully: bool,
}

impl Flavour {
    /// What kube-proxy writes on this machine.
    pub fn node() -> Self {
        Self {
            mark: "0x00004000".into(),
            nfacct: false,
            random_fully: true,
        }
    }
}

struct Names {
    /// `ns/name:port`.
    spn: String,
    proto: String,
    svc: String,
    ext: String,
    /// (`ip:port`, chain) in kube-proxy's order.
    endpoints: Vec<(String, String)>,
}

fn names(port: &ServicePort) -> Names {
    let spn = port.service_port_name();
    let proto = port.protocol.to_ascii_lowercase();
    let h = hash16(&format!("{spn}{proto}"));
    let endpoints = sorted_endpoints(port)
        .into_iter()
        .map(|ep| {
            let chain = format!("KUBE-SEP-{}", hash16(&format!("{spn}{proto}{ep}")));
            (ep, chain)
        })
        .collect();
    Names {
        spn,
        proto,
        svc: format!("KUBE-SVC-{h}"),
        ext: format!("KUBE-EXT-{h}"),
        endpoints,
    }
}

/// The rules and chains of one Service port: (filter rules, nat chain
/// names, nat rules of KUBE-SERVICES / KUBE-NODEPORTS, nat rules of its own
/// chains).
struct PortRules {
    filter: Vec<String>,
    chains: Vec<String>,
    top: Vec<String>,
    own: Vec<String>,
}

fn port_rules(port: &ServicePort, params: &ProxierParams, flavour: &Flavour) -> PortRules {
    let n = names(port);
    let (spn, p) = (&n.spn, &n.proto);
    let mut r = PortRules {
        filter: Vec::new(),
        chains: Vec::new(),
        top: Vec::new(),
        own: Vec::new(),
    };
    if n.endpoints.is_empty() {
        r.filter.push(format!(
            "-A KUBE-SERVICES -m comment --comment \"{spn} has no endpoints\" -m {p} -p {p} -d {} --dport {} -j REJECT",
            port.cluster_ip, port.port
        ));
        if let Some(np) = port.node_port {
            r.filter.push(format!(
                "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} has no endpoints\" -m addrtype --dst-type LOCAL -m {p} -p {p} --dport {np} -j REJECT"
            ));
        }
        return r;
    }
    if port.node_port.is_some() {
        r.chains.push(n.ext.clone());
    }
    r.chains.push(n.svc.clone());
    r.chains.extend(n.endpoints.iter().map(|(_, c)| c.clone()));
    r.top.push(format!(
        "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" -m {p} -p {p} -d {} --dport {} -j {}",
        port.cluster_ip, port.port, n.svc
    ));
    if let Some(np) = port.node_port {
        if flavour.nfacct {
            r.top.push(format!(
                "-A KUBE-NODEPORTS -m comment --comment {spn} -m {p} -p {p} -d 127.0.0.0/8 --dport {np} -m nfacct --nfacct-name localhost_nps_accepted_pkts -j {}",
                n.ext
            ));
        }
        r.top.push(format!(
            "-A KUBE-NODEPORTS -m comment --comment {spn} -m {p} -p {p} --dport {np} -j {}",
            n.ext
        ));
    }
    r.own.push(format!(
        "-A {} -m comment --comment \"{spn} cluster IP\" -m {p} -p {p} -d {} --dport {} ! -s {} -j KUBE-MARK-MASQ",
        n.svc, port.cluster_ip, port.port, params.cluster_cidr
    ));
    if port.node_port.is_some() {
        r.own.push(format!(
            "-A {} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j KUBE-MARK-MASQ",
            n.ext
        ));
        r.own.push(format!("-A {} -j {}", n.ext, n.svc));
    }
    let count = n.endpoints.len();
    for (i, (ep, chain)) in n.endpoints.iter().enumerate() {
        if i + 1 < count {
            r.own.push(format!(
                "-A {} -m comment --comment \"{spn} -> {ep}\" -m statistic --mode random --probability {:.10} -j {chain}",
                n.svc,
                1.0 / (count - i) as f64
            ));
        } else {
            r.own.push(format!(
                "-A {} -m comment --comment \"{spn} -> {ep}\" -j {chain}",
                n.svc
            ));
        }
    }
    for (ep, chain) in &n.endpoints {
        let ip = ep.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(ep);
        r.own.push(format!(
            "-A {chain} -m comment --comment {spn} -s {ip} -j KUBE-MARK-MASQ"
        ));
        r.own.push(format!(
            "-A {chain} -m comment --comment {spn} -m {p} -p {p} -j DNAT --to-destination {ep}"
        ));
    }
    r
}

fn filter_table(filter_rules: &[String], flavour: &Flavour) -> String {
    let mut out = String::from("*filter\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    out.push_str("-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n");
    for rule in filter_rules {
        out.push_str(rule);
        out.push('\n');
    }
    let m = &flavour.mark;
    if flavour.nfacct {
        out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP\n");
    } else {
        out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    }
    out.push_str(&format!("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {m}/{m} -j ACCEPT\n"));
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n");
    out
}

/// The nat table: the four static chains, the chains of `full` ports
/// (all their rules), the KUBE-SERVICES / KUBE-NODEPORTS rules of every
/// port in `all`, and `-X` for `stale` chains.
fn nat_table(
    all: &[PortRules],
    full: &[&PortRules],
    stale: &[String],
    flavour: &Flavour,
) -> String {
    let mut out = String::from("*nat\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for r in full {
        for chain in &r.chains {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
    }
    for chain in stale {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    let m = &flavour.mark;
    out.push_str(&format!(
        "-A KUBE-POSTROUTING -m mark ! --mark {m}/{m} -j RETURN\n"
    ));
    out.push_str(&format!("-A KUBE-POSTROUTING -j MARK --xor-mark {m}\n"));
    out.push_str(&format!(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{}\n",
        if flavour.random_fully { " --random-fully" } else { "" }
    ));
    out.push_str(&format!("-A KUBE-MARK-MASQ -j MARK --or-mark {m}\n"));
    for r in all {
        for rule in &r.top {
            out.push_str(rule);
            out.push('\n');
        }
    }
    for r in full {
        for rule in &r.own {
            out.push_str(rule);
            out.push('\n');
        }
    }
    for chain in stale {
        out.push_str(&format!("-X {chain}\n"));
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    out.push_str("COMMIT\n");
    out
}

/// The restore data of a full sync (what kube-proxy passes to
/// `iptables-restore --noflush --counters`).
pub fn sync_data(ports: &[ServicePort], params: &ProxierParams, flavour: &Flavour) -> String {
    let rules: Vec<PortRules> = ports
        .iter()
        .map(|p| port_rules(p, params, flavour))
        .collect();
    let filter: Vec<String> = rules.iter().flat_map(|r| r.filter.clone()).collect();
    let full: Vec<&PortRules> = rules.iter().collect();
    filter_table(&filter, flavour) + &nat_table(&rules, &full, &[], flavour)
}

/// The jumps from the built-in chains kube-proxy ensures on a full sync
/// (`iptablesJumpChains`, each prepended, so listed here in the order
/// `iptables-save` shows them): (table, rule).
const JUMPS: [(&str, &str); 14] = [
    ("filter", "-A INPUT -j KUBE-FIREWALL"),
    (
        "filter",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
    ),
    (
        "filter",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
    ),
    (
        "filter",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "filter",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    ),
    ("filter", "-A OUTPUT -j KUBE-FIREWALL"),
    (
        "filter",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    ),
];

/// What the benchmark loads into an empty node with
/// `iptables-restore --noflush --counters`: the full sync's data with the
/// built-in chains' jumps (which kube-proxy adds with `iptables -I` around
/// the restore) at the end of each table's section, in one transaction per
/// table (iptables-nft does not see a chain made by an earlier section).
pub fn full_restore(ports: &[ServicePort], params: &ProxierParams) -> String {
    let data = sync_data(ports, params, &Flavour::node());
    let mut out = String::with_capacity(data.len() + 2048);
    let mut table = "";
    for line in data.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = if t == "filter" { "filter" } else { "nat" };
        }
        if line == "COMMIT" {
            for (_, rule) in JUMPS.iter().filter(|(t, _)| *t == table) {
                out.push_str(rule);
                out.push('\n');
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A partial sync after `old`'s endpoints became `new`'s: the whole filter
/// table, the static nat chains with every port's KUBE-SERVICES and
/// KUBE-NODEPORTS rules (`all`, with `old` replaced by `new`), the changed
/// port's own chains, and the deletion of endpoint chains it no longer
/// has.
pub fn partial_restore(
    all: &[ServicePort],
    old: &ServicePort,
    new: &ServicePort,
    params: &ProxierParams,
) -> String {
    let flavour = Flavour::node();
    let rules: Vec<PortRules> = all
        .iter()
        .map(|p| {
            if p == old {
                port_rules(new, params, &flavour)
            } else {
                port_rules(p, params, &flavour)
            }
        })
        .collect();
    let changed = port_rules(new, params, &flavour);
    let before = port_rules(old, params, &flavour);
    let stale: Vec<String> = before
        .chains
        .into_iter()
        .filter(|c| !changed.chains.contains(c))
        .collect();
    let filter: Vec<String> = rules.iter().flat_map(|r| r.filter.clone()).collect();
    filter_table(&filter, &flavour) + &nat_table(&rules, &[&changed], &stale, &flavour)
}

#[cfg(test)]
mod tests {
    //! Expected texts are kube-proxy's own (`pkg/proxy/iptables/
    //! proxier_test.go`), compared as its tests compare: after
    //! `sortIPTablesRules`.
    use std::net::Ipv4Addr;

    use super::*;
    use crate::compare::kube_proxy::fixtures::{params, port};

    /// kube-proxy's `sortIPTablesRules`: tables by name; in each, chain
    /// lines and rule groups ordered KUBE-NODEPORTS, KUBE-SERVICES, other
    /// KUBE-* by name, then the rest; KUBE-NODEPORTS and KUBE-SERVICES
    /// rules stable-sorted by Service name (the node-ports jump last);
    /// `-X` lines before COMMIT.
    fn sort_rules(data: &str) -> String {
        let mut tables: Vec<(String, Vec<String>)> = Vec::new();
        for line in data.lines() {
            if let Some(t) = line.strip_prefix('*') {
                tables.push((t.to_owned(), Vec::new()));
            } else if line != "COMMIT" {
                tables.last_mut().expect("table").1.push(line.to_owned());
            }
        }
        tables.sort_by(|a, b| a.0.cmp(&b.0));
        let rank = |chain: &str| match chain {
            "KUBE-NODEPORTS" => (0, String::new()),
            "KUBE-SERVICES" => (1, String::new()),
            c if c.starts_with("KUBE-") => (2, c.to_owned()),
            c => (3, c.to_owned()),
        };
        let service_of = |rule: &str| -> String {
            rule.split_once("--comment ")
                .map(|(_, c)| c.trim_start_matches('"'))
                .map(|c| c.split([' ', ':']).next().unwrap_or("").to_owned())
                .unwrap_or_default()
        };
        let mut out = String::new();
        for (table, lines) in tables {
            out.push_str(&format!("*{table}\n"));
            let mut chains: Vec<&String> = lines.iter().filter(|l| l.starts_with(':')).collect();
            chains.sort_by_key(|l| rank(l[1..].split(' ').next().unwrap_or("")));
            for c in &chains {
                out.push_str(c);
                out.push('\n');
            }
            let mut groups: Vec<(String, Vec<String>)> = Vec::new();
            for rule in lines.iter().filter(|l| l.starts_with("-A ")) {
                let chain = rule[3..].split(' ').next().unwrap_or("").to_owned();
                match groups.iter_mut().find(|g| g.0 == chain) {
                    Some(g) => g.1.push(rule.clone()),
                    None => groups.push((chain, vec![rule.clone()])),
                }
            }
            groups.sort_by_key(|g| rank(&g.0));
            for (chain, mut rules) in groups {
                if chain == "KUBE-NODEPORTS" || chain == "KUBE-SERVICES" {
                    let last = rules
                        .iter()
                        .position(|r| r.contains("must be the last rule"))
                        .map(|i| rules.remove(i));
                    rules.sort_by_key(|r| service_of(r));
                    rules.extend(last);
                }
                for r in rules {
                    out.push_str(&r);
                    out.push('\n');
                }
            }
            for x in lines.iter().filter(|l| l.starts_with("-X ")) {
                out.push_str(x);
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    fn test_flavour() -> Flavour {
        Flavour {
            mark: "0x4000".into(),
            nfacct: true,
            random_fully: false,
        }
    }

    const STATIC_FILTER: &str = "*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
";

    /// TestSyncProxyRulesRepeated, the first (full) sync: two ClusterIP
    /// Services of one endpoint each.
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
        let expected = STATIC_FILTER.to_owned()
            + r#"-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-SNQ3ZNILQDEJNDQO - [0:0]
:KUBE-SEP-UHEGFW77JX3KXTOV - [0:0]
:KUBE-SVC-2VJB64SDSIJUP5T6 - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p8080 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 8080 -j KUBE-SVC-2VJB64SDSIJUP5T6
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -s 10.0.1.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.1.1:80
-A KUBE-SEP-UHEGFW77JX3KXTOV -m comment --comment ns2/svc2:p8080 -s 10.0.2.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-UHEGFW77JX3KXTOV -m comment --comment ns2/svc2:p8080 -m tcp -p tcp -j DNAT --to-destination 10.0.2.1:8080
-A KUBE-SVC-2VJB64SDSIJUP5T6 -m comment --comment "ns2/svc2:p8080 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 8080 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-2VJB64SDSIJUP5T6 -m comment --comment "ns2/svc2:p8080 -> 10.0.2.1:8080" -j KUBE-SEP-UHEGFW77JX3KXTOV
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.0.1.1:80" -j KUBE-SEP-SNQ3ZNILQDEJNDQO
COMMIT
"#;
        let got = sort_rules(&sync_data(&ports, &params(), &test_flavour()));
        assert_eq!(got, expected, "\n--- got ---\n{got}");
    }

    /// TestOverallIPTablesRules, the lines of its ClusterIP Service (svc1),
    /// its NodePort Service with externalTrafficPolicy Cluster (svc3), a
    /// two-endpoint Service (svc4, without its external IP) and its
    /// Service without endpoints (svc6); the fixture's other Services use
    /// features the benchmark's objects have not (LoadBalancer, Local
    /// policy, affinity, source ranges).
    #[test]
    fn node_port_and_multi_endpoint_services_match_test_overall_iptables_rules() {
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
            port(
                "ns4",
                "svc4",
                "p80",
                [172, 30, 0, 44],
                80,
                None,
                &[[10, 180, 0, 5], [10, 180, 0, 4]],
            ),
            port("ns6", "svc6", "p80", [172, 30, 0, 46], 80, None, &[]),
        ];
        let expected = STATIC_FILTER.to_owned()
            + r#"-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3003 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
COMMIT
"#;
        let got = sort_rules(&sync_data(&ports, &params(), &test_flavour()));
        assert_eq!(got, expected, "\n--- got ---\n{got}");
    }

    /// A partial sync rewrites the changed port's chains only and deletes
    /// the endpoint chain it lost (TestSyncProxyRulesRepeated's later
    /// syncs: `:KUBE-SEP-… - [0:0]` then `-X KUBE-SEP-…`).
    #[test]
    fn a_partial_sync_rewrites_one_service_and_deletes_its_stale_endpoint_chain() {
        let a = port(
            "ns1",
            "svc1",
            "p80",
            [172, 30, 0, 41],
            80,
            None,
            &[[10, 180, 0, 1]],
        );
        let b = port(
            "ns2",
            "svc2",
            "p80",
            [172, 30, 0, 42],
            80,
            Some(30080),
            &[[10, 180, 1, 1]],
        );
        let mut moved = a.clone();
        moved.endpoints = vec![Ipv4Addr::new(10, 180, 0, 2)];
        let text = partial_restore(&[a.clone(), b], &a, &moved, &params());
        assert!(text.contains(":KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]\n"));
        assert!(text.contains("-X KUBE-SEP-SXIVWICOYRO3J4NJ\n"));
        assert!(text.contains("--to-destination 10.180.0.2:80\n"));
        // svc2's KUBE-SERVICES and KUBE-NODEPORTS rules are rewritten, its
        // own chains are not.
        assert!(text.contains("-d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT"));
        assert!(text.contains("--dport 30080 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT"));
        assert!(!text.contains(":KUBE-SVC-GNZBNJ2PO5MGZ6GT"));
        assert!(!text.contains("-A KUBE-EXT-GNZBNJ2PO5MGZ6GT"));
    }
}
