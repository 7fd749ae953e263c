//! The comparison harness of `cargo xtask bench`, on its quick profile:
//! every mode (direct, netlb, kube-proxy's iptables and nftables rules)
//! programs and serves every client, and every output file is written.
//! Numbers are not asserted; a mode that fails to serve fails the run.
//! Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

use netlb_testbed::compare::{self, Mode, Profile, report};

#[test]
fn the_quick_profile_serves_every_mode_and_writes_every_file() {
    let out = std::env::temp_dir().join(format!("nlb-compare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _guard = Remove(out.clone());
    let profile = Profile::quick();
    let mut log = |line: &str| eprintln!("{line}");
    let results = match compare::run(&profile, &out, &mut log) {
        Ok(r) => r,
        Err(e) => panic!("the comparison failed: {e}"),
    };
    for file in report::FILES {
        let path = out.join(file);
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{file} missing or empty");
    }
    // Every mode at every scale in every round, each with traffic served.
    for &services in &profile.scales {
        for mode in Mode::ALL {
            let samples: Vec<_> = results
                .samples
                .iter()
                .filter(|s| s.services == services && s.mode == mode)
                .collect();
            assert_eq!(samples.len(), profile.rounds, "{mode:?} at {services}");
            for s in samples {
                assert!(
                    s.pod_crr.requests > 0 && s.nodeport_crr.requests > 0 && s.pod_rr.requests > 0
                );
                assert!(s.iperf_gbps > 0.0, "{mode:?} at {services}: iperf3");
                if mode != Mode::Direct {
                    assert_eq!(s.programming_latency_ms.len(), profile.changes, "{mode:?}");
                    // Programmed from nothing once per scale, before round 1.
                    assert_eq!(s.program_seconds.is_some(), s.round == 0);
                    assert_eq!(s.proxy_rss_kib.is_some(), s.round == 0);
                }
            }
        }
    }
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.contains("| netlb |") && md.contains("| iptables |") && md.contains("| nftables |"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out.join("pod-crr-rate.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("netlb"),
        "{}",
        &svg[..svg.len().min(300)]
    );
}
