//! MariaDB GTID positions (`domain-server-sequence` lists such as `@@gtid_binlog_pos`) and
//! the comparisons failover needs (MariaDB KB: "Global Transaction ID").

use std::collections::BTreeMap;
use std::fmt;

/// One GTID: replication domain, originating `server_id`, sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gtid {
    /// `gtid_domain_id`.
    pub domain: u32,
    /// `server_id` of the server that first wrote the transaction.
    pub server: u32,
    /// Sequence number, increasing within the domain (strictly, under `gtid_strict_mode`).
    pub seq: u64,
}

/// A GTID position: the last GTID of each domain, as MariaDB prints it
/// (`0-1-42,1-3-7`; empty for no transaction at all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GtidPos(BTreeMap<u32, Gtid>);

impl GtidPos {
    /// Parses MariaDB's comma-separated list. Returns `None` for anything else (a field
    /// that is not a number, a missing part).
    pub fn parse(text: &str) -> Option<GtidPos> {
        let mut map = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut it = part.split('-');
            let g = Gtid {
                domain: it.next()?.parse().ok()?,
                server: it.next()?.parse().ok()?,
                seq: it.next()?.parse().ok()?,
            };
            if it.next().is_some() {
                return None;
            }
            map.insert(g.domain, g);
        }
        Some(GtidPos(map))
    }

    /// Whether every transaction up to `other` is also in `self`'s history: in each of
    /// `other`'s domains `self` has a higher sequence number, or the same one from the same
    /// server. (A same sequence from another server is a diverged history, not contained.)
    pub fn contains(&self, other: &GtidPos) -> bool {
        other.0.values().all(|o| match self.0.get(&o.domain) {
            Some(s) => s.seq > o.seq || (s.seq == o.seq && s.server == o.server),
            None => false,
        })
    }

    /// Total of the sequence numbers over domains: a rough measure of how far a server has
    /// got, used to pick the most advanced replica among servers of one history.
    pub fn progress(&self) -> u64 {
        self.0.values().map(|g| g.seq).sum()
    }

    /// Whether the position names no transaction.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A binary log's GTID state (`@@gtid_binlog_state`): the last GTID for **every**
/// combination of domain and originating server, not only the last of each domain (MariaDB
/// KB: "gtid_binlog_state"). A transaction a server wrote on its own keeps an entry under
/// its `server_id` however far the primary's sequence numbers move on, which
/// [`GtidPos`] (one GTID per domain) loses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GtidState(BTreeMap<(u32, u32), Gtid>);

impl GtidState {
    /// Parses MariaDB's comma-separated list; `None` as for [`GtidPos::parse`].
    pub fn parse(text: &str) -> Option<GtidState> {
        let mut map = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let pos = GtidPos::parse(part)?;
            for g in pos.0.into_values() {
                map.insert((g.domain, g.server), g);
            }
        }
        Some(GtidState(map))
    }

    /// The transactions of `self`'s binary log that `primary`'s does not hold: for each
    /// (domain, originating server) of `self` other than `primary_server_id`, the last
    /// GTID when `primary` has none from that server in that domain or an older one.
    /// GTIDs first written by the primary itself are left out: a replica only has them
    /// from the primary, and comparing them would race with the primary's newest writes.
    pub fn not_in(&self, primary: &GtidState, primary_server_id: u32) -> Vec<Gtid> {
        self.0
            .values()
            .filter(|g| g.server != primary_server_id)
            .filter(|g| {
                primary
                    .0
                    .get(&(g.domain, g.server))
                    .is_none_or(|p| p.seq < g.seq)
            })
            .copied()
            .collect()
    }
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

impl fmt::Display for GtidPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .values()
            .map(|g| format!("{}-{}-{}", g.domain, g.server, g.seq))
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parse_print_and_contain() {
        let a = GtidPos::parse("0-1-42,1-3-7").unwrap();
        assert_eq!(a.to_string(), "0-1-42,1-3-7");
        assert!(GtidPos::parse("").unwrap().is_empty());
        assert!(GtidPos::parse("0-1").is_none());
        assert!(GtidPos::parse("0-1-x").is_none());
        let behind = GtidPos::parse("0-1-40").unwrap();
        assert!(a.contains(&behind));
        assert!(!behind.contains(&a));
        assert!(a.contains(&GtidPos::default()));
        // The same sequence number written by another server is a different transaction.
        let diverged = GtidPos::parse("0-2-42").unwrap();
        assert!(!a.contains(&diverged));
        assert!(a.contains(&GtidPos::parse("0-1-42").unwrap()));
        assert_eq!(a.progress(), 49);
    }

    #[test]
    fn errant_transactions_survive_the_primary_moving_on() {
        // Primary server 2 after taking over from server 1; replica server 3 wrote 0-3-43
        // on its own, and the primary has since moved to 0-2-90.
        let primary = GtidState::parse("0-1-40,0-2-90").unwrap();
        let replica = GtidState::parse("0-1-40,0-2-88,0-3-43").unwrap();
        let errant = replica.not_in(&primary, 2);
        assert_eq!(errant.len(), 1);
        assert_eq!(errant[0].to_string(), "0-3-43");
        // Ahead of the primary on the primary's own GTIDs: a race, not errant.
        let ahead = GtidState::parse("0-1-40,0-2-91").unwrap();
        assert!(ahead.not_in(&primary, 2).is_empty());
        // A former primary whose writes the new primary has: not errant.
        let former = GtidState::parse("0-1-40").unwrap();
        assert!(former.not_in(&primary, 2).is_empty());
        // One the new primary never received: errant.
        let lost = GtidState::parse("0-1-41").unwrap();
        assert_eq!(lost.not_in(&primary, 2)[0].to_string(), "0-1-41");
        assert!(GtidState::parse("0-1").is_none());
    }
}
