//! The lab: brings a whole topology up on one machine, one `rampart node` process per host,
//! and takes it down again; reports what runs where.
//!
//! This crate owns the state directory layout ([`StateDir`]), the node process
//! ([`node::run`]: one per host, holding that host's roles), `up`, `down` and `status`. It
//! never implements a role itself (those are the `lb`, `web`, `db` and `monitor` crates) and
//! never touches processes, files or ports it did not start or create: everything it
//! manages is found through pid files under the state directory.
//!
//! Isolation: in netns mode ([`netns`]) every host is a network namespace with its own
//! nftables ruleset; in loopback mode (development) every host gets its own 127.x.y.z
//! address and the policy is enforced in user space only, at every listener (see the
//! `firewall` crate). The user-space filter runs in both modes.

#![forbid(unsafe_code)]

mod down;
mod error;
pub mod fw;
pub mod netns;
pub mod node;
mod paths;
pub mod plan;
mod ports;
pub mod reload;
mod status;
mod up;

pub use down::down;
pub use error::LabError;
pub use ipnet::IpNet;
pub use paths::StateDir;
pub use status::{status, DbNodeView, DbView, Endpoints, HostView, Status};
pub use up::{up, UpOptions, UpReport};

/// How hosts are isolated from each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every host is a 127.x.y.z address; firewalls enforced in user space.
    Loopback,
    /// Every host a network namespace with its own nftables ruleset, joined by a bridge.
    Netns,
}

impl Mode {
    /// The mode `up` picks when none is asked for, and why: netns when running as root with
    /// `ip` and `nft` installed, otherwise loopback.
    pub fn auto() -> (Mode, String) {
        match netns::available() {
            Ok(()) => (
                Mode::Netns,
                "running as root with ip and nft: every host gets its own network namespace and nftables ruleset".into(),
            ),
            Err(why) => (
                Mode::Loopback,
                format!("{why}, so netns mode is not available; loopback mode is a development mode: its firewall is in user space and a local process can pass it"),
            ),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Loopback => "loopback",
            Mode::Netns => "netns",
        })
    }
}
