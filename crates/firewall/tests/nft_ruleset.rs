//! The nftables rulesets compiled from the policy: golden files of the default topology in
//! netns mode (set `UPDATE_GOLDEN=1` to rewrite them after a deliberate change), and, as
//! root with `nft`, loading them into a throwaway network namespace.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use firewall::nft::{self, Nft};
use topology::{Policy, Topology};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn netns_topology() -> Topology {
    let text = format!(
        "{}\n[[firewall.allow]]\nhost = \"mon-01\"\nport = 22\nsources = [\"192.168.10.0/24\", \"2001:db8::/64\"]\ncomment = \"SSH from the admin network\"\n",
        topology::DEFAULT_TOML
    );
    Topology::parse(&text, "golden").unwrap().in_netns()
}

#[test]
fn every_hosts_ruleset_matches_its_golden_file() {
    let t = netns_topology();
    let policy = Policy::compile(&t);
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for h in &t.hosts {
        let text = nft::ruleset(&policy, h, &t.firewall);
        let path = golden_dir().join(format!("{}.nft", h.name));
        if update {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(
            text,
            want,
            "{} differs from the compiled ruleset (UPDATE_GOLDEN=1 rewrites it)",
            path.display()
        );
    }
}

#[test]
fn only_the_edge_gets_rate_limit_and_blocklist() {
    let t = netns_topology();
    let p = Policy::compile(&t);
    let lb = nft::ruleset(&p, t.host("lb-01").unwrap(), &t.firewall);
    let web = nft::ruleset(&p, t.host("web-01").unwrap(), &t.firewall);
    assert!(lb.contains("@blocklist4") && lb.contains("limit rate over 200/second"));
    assert!(!web.contains("blocklist") && !web.contains("edge_rate"));
    // the web port only from the load balancer; the database port from the app and
    // database hosts and the failover controller (mon-01)
    assert!(
        web.contains("ip saddr { 10.80.0.10 } tcp dport 9443 accept"),
        "{web}"
    );
    assert!(
        web.contains("ip saddr { 10.80.0.12, 10.80.0.20 } tcp dport 3306 accept"),
        "{web}"
    );
    let mut no_limit = t.firewall.clone();
    no_limit.edge_new_connections_per_second = 0;
    let lb = nft::ruleset(&p, t.host("lb-01").unwrap(), &no_limit);
    assert!(!lb.contains("edge_rate"));
}

/// A network namespace for one test, deleted on drop.
struct Ns(String);

impl Ns {
    fn new(name: &str) -> Option<Ns> {
        if !test_support::is_root() || !nft::nft_available() || !test_support::have_binary("ip") {
            test_support::skip("needs root, nft and ip (apt-get install nftables iproute2)");
            return None;
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Some(Ns(name.to_string()))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn a_failing_load_leaves_the_ruleset_in_force_and_reapplying_is_idempotent() {
    let Some(ns) = Ns::new("rpt-nft-load") else {
        return;
    };
    let t = netns_topology();
    let p = Policy::compile(&t);
    let good = nft::ruleset(&p, t.host("web-01").unwrap(), &t.firewall);
    let n = Nft::in_netns(&ns.0);
    n.apply(&good).unwrap();
    let first = n.show().unwrap();
    n.apply(&good).unwrap();
    assert_eq!(n.show().unwrap(), first, "re-applying changes nothing");

    // The same ruleset with one rule that cannot load (a set that does not exist), at the end.
    let bad = good.replace(
        "\t\tcounter name \"dropped_policy\"",
        "\t\tip saddr @no_such_set drop\n\t\tcounter name \"dropped_policy\"",
    );
    let err = n.apply(&bad).unwrap_err().to_string();
    assert!(err.contains("no_such_set"), "{err}");
    // A load that skips the check fails in the kernel's transaction the same way.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "-f", "/dev/stdin"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(bad.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(!out.success());
    assert_eq!(
        n.show().unwrap(),
        first,
        "the previous ruleset stays in force"
    );
    let names: Vec<String> = n.counters().unwrap().into_iter().map(|c| c.name).collect();
    assert!(names.contains(&"dropped_policy".to_string()), "{names:?}");
}

#[test]
fn blocked_addresses_expire_and_can_be_unblocked() {
    let Some(ns) = Ns::new("rpt-nft-block") else {
        return;
    };
    let t = netns_topology();
    let p = Policy::compile(&t);
    let n = Nft::in_netns(&ns.0);
    n.apply(&nft::ruleset(&p, t.host("lb-01").unwrap(), &t.firewall))
        .unwrap();
    let a: IpAddr = "10.80.0.99".parse().unwrap();
    n.block(nft::host_net(a), Some(Duration::from_secs(2)))
        .unwrap();
    n.block("192.0.2.0/24".parse().unwrap(), None).unwrap();
    let shown = n.show().unwrap();
    assert!(shown.contains("10.80.0.99 timeout 2s"), "{shown}");
    assert!(shown.contains("192.0.2.0/24"), "{shown}");
    n.unblock("192.0.2.0/24".parse().unwrap()).unwrap();
    assert!(n.unblock("192.0.2.0/24".parse().unwrap()).is_err());
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.show().unwrap().contains("10.80.0.99") {
        assert!(Instant::now() < deadline, "the block did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_fence_survives_a_policy_reload_and_lifts_whole() {
    let Some(ns) = Ns::new("rpt-dp-fence") else {
        return;
    };
    let t = netns_topology();
    let p = Policy::compile(&t);
    let policy = nft::ruleset(&p, t.host("web-01").unwrap(), &t.firewall);
    let n = Nft::in_netns(&ns.0);
    n.apply(&policy).unwrap();
    assert!(!n.fenced());
    let controller = "10.80.0.20".parse().unwrap();
    n.fence(Some((controller, 3306)), "fenced \"at\" epoch 2")
        .unwrap();
    assert!(n.fenced());
    let listing = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "list", "table", "inet"])
        .arg(nft::FENCE_TABLE)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("ip saddr 10.80.0.20 tcp dport 3306 accept"),
        "{listing}"
    );
    assert!(
        listing.contains("ip daddr 10.80.0.20 tcp sport 3306 accept"),
        "{listing}"
    );
    assert_eq!(
        listing
            .matches("drop comment \"fenced at epoch 2\"")
            .count(),
        2
    );
    // Reloading the policy (a node's restart) leaves the fence in force; fencing again
    // replaces it.
    n.apply(&policy).unwrap();
    assert!(n.fenced());
    n.fence(None, "again").unwrap();
    assert!(n.fenced());
    n.unfence().unwrap();
    assert!(!n.fenced());
    n.unfence().unwrap();
    assert!(n.loaded(), "the policy's table is untouched");
}
