//! The lab: brings a whole topology up on one machine, one `rampart node` process per host,
//! and takes it down again; reports what runs where.
//!
//! This crate owns the state directory layout ([`StateDir`]), the node process
//! ([`node::run`]: one per host, holding that host's roles), `up`, `down` and `status`. It
//! never implements a role itself (those are the `lb`, `web`, `db` and `monitor` crates) and
//! never touches processes, files or ports it did not start or create: everything it
//! manages is found through pid files under the state directory.
//!
//! Isolation: loopback mode only for now. Every host gets its own 127.x.y.z address and the
//! firewall policy is enforced in user space at every listener (see the `firewall` crate).

#![forbid(unsafe_code)]

mod down;
mod error;
pub mod node;
mod paths;
pub mod plan;
mod ports;
mod status;
mod up;

pub use down::down;
pub use error::LabError;
pub use paths::StateDir;
pub use status::{status, DbNodeView, DbView, Endpoints, HostView, Status};
pub use up::{up, UpOptions, UpReport};

/// How hosts are isolated from each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every host is a 127.x.y.z address; firewalls enforced in user space.
    Loopback,
    /// Every host a network namespace with a real nftables ruleset (not available yet).
    Netns,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Loopback => "loopback",
            Mode::Netns => "netns",
        })
    }
}
