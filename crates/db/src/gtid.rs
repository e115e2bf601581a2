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

    /// Whether the binary log state `state` (`@@gtid_binlog_state`: the last GTID of each
    /// domain **and server**, e.g. `0-1-480,0-2-520`) holds every transaction of the
    /// binary log state `other`: for each `(domain, server)` of `other`, `state` has that
    /// server's transactions in that domain up to at least the same sequence number.
    /// Positions alone cannot tell this: a new primary's `0-2-520` "contains" `0-1-500`
    /// by sequence although the old primary's 481..500 are on no other server. `None` when
    /// either text does not parse.
    pub fn state_contains(state: &str, other: &str) -> Option<bool> {
        let parse = |text: &str| -> Option<BTreeMap<(u32, u32), u64>> {
            let mut map = BTreeMap::new();
            for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let g = GtidPos::parse(part)?.0.into_values().next()?;
                let e = map.entry((g.domain, g.server)).or_insert(g.seq);
                *e = (*e).max(g.seq);
            }
            Some(map)
        };
        let (mine, theirs) = (parse(state)?, parse(other)?);
        Some(
            theirs
                .iter()
                .all(|(k, seq)| mine.get(k).is_some_and(|s| s >= seq)),
        )
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
    fn binlog_state_containment_sees_a_diverged_old_primary() {
        // The new primary (server 2) went on from 480; the old one (server 1) wrote 481..500
        // alone: contained by position, not by state.
        assert!(GtidPos::parse("0-2-520")
            .unwrap()
            .contains(&GtidPos::parse("0-1-500").unwrap()));
        assert_eq!(
            GtidPos::state_contains("0-1-480,0-2-520", "0-1-500"),
            Some(false)
        );
        assert_eq!(
            GtidPos::state_contains("0-1-480,0-2-520", "0-1-480"),
            Some(true)
        );
        assert_eq!(GtidPos::state_contains("0-1-480", ""), Some(true));
        assert_eq!(GtidPos::state_contains("0-1-480", "x"), None);
    }
}
