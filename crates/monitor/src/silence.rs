//! Silences, in Alertmanager's API v2 shapes (Alertmanager `api/v2/openapi.yaml`:
//! `postableSilence`, `gettableSilence`, `matcher`): a silence has matchers (`name`,
//! `value`, `isRegex`, `isEqual`), `startsAt`, `endsAt`, `createdBy` and `comment`; while
//! it is active (`startsAt <= now < endsAt`) the notifications of every alert whose labels
//! satisfy all its matchers are suppressed (the alert itself still fires and shows).
//! Regexes are anchored, as in Alertmanager.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

/// The most silences kept (expired ones included); adding beyond it first forgets the
/// expired silence that ended earliest, and fails when none has expired.
pub const MAX_SILENCES: usize = 1_000;

/// One matcher as posted and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Matcher {
    /// Label name.
    pub name: String,
    /// Value, or a regex when `is_regex`.
    pub value: String,
    /// Whether `value` is a regex.
    pub is_regex: bool,
    /// `true`: the label must match; `false`: it must not (Alertmanager 0.22+). Default true.
    #[serde(default = "yes")]
    pub is_equal: bool,
}

fn yes() -> bool {
    true
}

/// A silence as posted (`POST /api/v2/silences`); with an `id` it replaces that silence.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostableSilence {
    /// The silence to update, if any.
    #[serde(default)]
    pub id: Option<String>,
    /// At least one matcher.
    pub matchers: Vec<Matcher>,
    /// RFC 3339.
    pub starts_at: String,
    /// RFC 3339, after `starts_at`.
    pub ends_at: String,
    /// Who made it.
    pub created_by: String,
    /// Why.
    pub comment: String,
}

#[derive(Debug, Clone)]
struct Entry {
    post: PostableSilence,
    regexes: Vec<Option<regex::Regex>>,
    starts: f64,
    ends: f64,
    updated: f64,
}

/// The silences.
#[derive(Debug, Default)]
pub struct Silences {
    entries: BTreeMap<String, Entry>,
    next: u64,
}

impl Silences {
    /// Adds (or, with an existing `id`, replaces) a silence at `now`; returns its id.
    ///
    /// Errors: no matcher, an empty matcher name, a regex that does not compile, times
    /// that are not RFC 3339, `endsAt` not after `startsAt` or already past, an unknown
    /// `id`, or [`MAX_SILENCES`] silences none of which has expired.
    pub fn add(&mut self, p: PostableSilence, now: f64) -> Result<String, String> {
        if p.matchers.is_empty() {
            return Err("a silence needs at least one matcher".into());
        }
        let regexes = p
            .matchers
            .iter()
            .map(compile)
            .collect::<Result<Vec<_>, _>>()?;
        let starts = crate::promapi::parse_time(&p.starts_at)
            .ok_or_else(|| format!("startsAt {:?} is not an RFC 3339 time", p.starts_at))?;
        let ends = crate::promapi::parse_time(&p.ends_at)
            .ok_or_else(|| format!("endsAt {:?} is not an RFC 3339 time", p.ends_at))?;
        if ends <= starts {
            return Err("endsAt must be after startsAt".into());
        }
        if ends <= now {
            return Err("endsAt is in the past".into());
        }
        let id = match &p.id {
            Some(id) if !self.entries.contains_key(id) => {
                return Err(format!("silence {id} not found"))
            }
            Some(id) => id.clone(),
            None => {
                if self.entries.len() >= MAX_SILENCES {
                    let oldest = self
                        .entries
                        .iter()
                        .filter(|(_, e)| e.ends <= now)
                        .min_by(|a, b| a.1.ends.total_cmp(&b.1.ends))
                        .map(|(k, _)| k.clone())
                        .ok_or_else(|| format!("{MAX_SILENCES} silences are active or pending"))?;
                    self.entries.remove(&oldest);
                }
                self.next += 1;
                // unique per process and start: time-derived prefix plus a counter
                format!("{:x}-{:04x}", (now * 1000.0) as u64, self.next)
            }
        };
        self.entries.insert(
            id.clone(),
            Entry {
                post: PostableSilence {
                    id: Some(id.clone()),
                    ..p
                },
                regexes,
                starts,
                ends,
                updated: now,
            },
        );
        Ok(id)
    }

    /// Ends silence `id` now (`DELETE /api/v2/silence/{id}`). `false` when unknown.
    pub fn expire(&mut self, id: &str, now: f64) -> bool {
        match self.entries.get_mut(id) {
            Some(e) => {
                if e.ends > now {
                    e.ends = now;
                    if e.starts > now {
                        e.starts = now;
                    }
                }
                e.updated = now;
                true
            }
            None => false,
        }
    }

    /// Whether an active silence matches `labels`.
    pub fn silenced(&self, labels: &[(String, String)], now: f64) -> bool {
        self.entries.values().any(|e| {
            e.starts <= now
                && now < e.ends
                && e.post.matchers.iter().zip(&e.regexes).all(|(m, re)| {
                    let v = labels
                        .iter()
                        .find(|(k, _)| *k == m.name)
                        .map_or("", |(_, v)| v.as_str());
                    let hit = match re {
                        Some(re) => re.is_match(v),
                        None => v == m.value,
                    };
                    hit == m.is_equal
                })
        })
    }

    /// Every silence as Alertmanager's `gettableSilence`, with `status.state` `active`,
    /// `pending` or `expired`.
    pub fn list(&self, now: f64) -> Vec<serde_json::Value> {
        self.entries
            .iter()
            .map(|(id, e)| {
                let state = if now < e.starts {
                    "pending"
                } else if now < e.ends {
                    "active"
                } else {
                    "expired"
                };
                json!({
                    "id": id,
                    "status": {"state": state},
                    "updatedAt": crate::notify::rfc3339(e.updated),
                    "matchers": e.post.matchers,
                    "startsAt": crate::notify::rfc3339(e.starts),
                    "endsAt": crate::notify::rfc3339(e.ends),
                    "createdBy": e.post.created_by,
                    "comment": e.post.comment,
                })
            })
            .collect()
    }
}

/// The first line of the silences file ([`Silences::encode`]).
pub const FILE_MAGIC: &str = "RAMPART-SILENCES 1";

impl Silences {
    /// Every silence (expired ones too) in the silences file's format: the line
    /// [`FILE_MAGIC`], then one JSON array of Alertmanager's `gettableSilence` objects as
    /// [`Silences::list`] gives them at `now`.
    pub fn encode(&self, now: f64) -> Vec<u8> {
        let mut out = format!("{FILE_MAGIC}\n").into_bytes();
        // Serialising JSON values to memory does not fail.
        out.extend(serde_json::to_vec_pretty(&self.list(now)).unwrap_or_default());
        out.push(b'\n');
        out
    }

    /// The silences [`Silences::encode`] wrote, with their ids, times and authors; at most
    /// [`MAX_SILENCES`] (the ones ending last are kept).
    ///
    /// Errors: not a silences file, JSON that does not parse, or a silence whose matchers,
    /// times or regexes are invalid; the message names the silence.
    pub fn decode(bytes: &[u8]) -> Result<Silences, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Stored {
            id: String,
            matchers: Vec<Matcher>,
            starts_at: String,
            ends_at: String,
            updated_at: String,
            created_by: String,
            comment: String,
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let body = text
            .strip_prefix(FILE_MAGIC)
            .and_then(|rest| rest.strip_prefix('\n'))
            .ok_or_else(|| format!("not a silences file (no {FILE_MAGIC:?} line)"))?;
        let mut stored: Vec<Stored> = serde_json::from_str(body).map_err(|e| e.to_string())?;
        let time = |id: &str, field: &str, v: &str| {
            crate::promapi::parse_time(v)
                .ok_or_else(|| format!("silence {id}: {field} {v:?} is not an RFC 3339 time"))
        };
        let mut out = Silences::default();
        stored.sort_by_cached_key(|s| std::cmp::Reverse(s.ends_at.clone()));
        for s in stored.into_iter().take(MAX_SILENCES) {
            let (starts, ends) = (
                time(&s.id, "startsAt", &s.starts_at)?,
                time(&s.id, "endsAt", &s.ends_at)?,
            );
            let updated = time(&s.id, "updatedAt", &s.updated_at)?;
            let regexes = s
                .matchers
                .iter()
                .map(|m| compile(m).map_err(|e| format!("silence {}: {e}", s.id)))
                .collect::<Result<Vec<_>, _>>()?;
            if s.matchers.is_empty() || ends < starts {
                return Err(format!(
                    "silence {}: no matcher or ends before it starts",
                    s.id
                ));
            }
            let entry = Entry {
                post: PostableSilence {
                    id: Some(s.id.clone()),
                    matchers: s.matchers,
                    starts_at: s.starts_at,
                    ends_at: s.ends_at,
                    created_by: s.created_by,
                    comment: s.comment,
                },
                regexes,
                starts,
                ends,
                updated,
            };
            out.entries.insert(s.id, entry);
        }
        Ok(out)
    }
}

/// A matcher's anchored regex (`None` for an equality matcher).
fn compile(m: &Matcher) -> Result<Option<regex::Regex>, String> {
    if m.name.is_empty() {
        return Err("a matcher has an empty name".into());
    }
    if !m.is_regex {
        return Ok(None);
    }
    regex::Regex::new(&format!("^(?:{})$", m.value))
        .map(Some)
        .map_err(|e| format!("matcher {}: {e}", m.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(matchers: Vec<Matcher>, from: &str, to: &str) -> PostableSilence {
        PostableSilence {
            id: None,
            matchers,
            starts_at: from.into(),
            ends_at: to.into(),
            created_by: "ops".into(),
            comment: "maintenance".into(),
        }
    }

    fn m(name: &str, value: &str, is_regex: bool, is_equal: bool) -> Matcher {
        Matcher {
            name: name.into(),
            value: value.into(),
            is_regex,
            is_equal,
        }
    }

    fn labels(host: &str, alert: &str) -> Vec<(String, String)> {
        vec![
            ("alertname".into(), alert.into()),
            ("host".into(), host.into()),
        ]
    }

    #[test]
    fn matchers_time_windows_and_expiry() {
        let mut s = Silences::default();
        let now = 1_700_000_000.0;
        let id = s
            .add(
                post(
                    vec![
                        m("host", "web-0[12]", true, true),
                        m("alertname", "HostDown", false, false),
                    ],
                    "2023-11-14T22:13:20Z",
                    "2023-11-14T23:13:20Z",
                ),
                now,
            )
            .unwrap();
        assert!(s.silenced(&labels("web-01", "BackendDown"), now));
        assert!(
            !s.silenced(&labels("web-01", "HostDown"), now),
            "isEqual false"
        );
        assert!(
            !s.silenced(&labels("web-011", "BackendDown"), now),
            "anchored"
        );
        assert!(!s.silenced(&labels("lb-01", "BackendDown"), now));
        assert!(
            !s.silenced(&labels("web-01", "BackendDown"), now + 3_600.0),
            "ended"
        );
        assert_eq!(s.list(now)[0]["status"]["state"], "active");
        assert_eq!(s.list(now)[0]["matchers"][0]["isRegex"], true);
        assert!(s.expire(&id, now + 10.0));
        assert!(!s.silenced(&labels("web-01", "BackendDown"), now + 11.0));
        assert_eq!(s.list(now + 11.0)[0]["status"]["state"], "expired");
        assert!(!s.expire("nope", now));
        // a future silence is pending
        s.add(
            post(
                vec![m("host", "lb-01", false, true)],
                "2023-11-15T00:00:00Z",
                "2023-11-15T01:00:00Z",
            ),
            now,
        )
        .unwrap();
        assert!(s
            .list(now)
            .iter()
            .any(|x| x["status"]["state"] == "pending"));
    }

    #[test]
    fn silences_survive_an_encode_and_decode() {
        let mut s = Silences::default();
        let now = 1_700_000_000.0;
        let active = s
            .add(
                post(
                    vec![
                        m("host", "web-0[12]", true, true),
                        m("alertname", "HostDown", false, false),
                    ],
                    "2023-11-14T22:13:20Z",
                    "2023-11-14T23:13:20Z",
                ),
                now,
            )
            .unwrap();
        let ended = s
            .add(
                post(
                    vec![m("host", "lb-01", false, true)],
                    "2023-11-14T22:13:20Z",
                    "2023-11-14T23:13:20Z",
                ),
                now,
            )
            .unwrap();
        assert!(s.expire(&ended, now + 5.0));
        let bytes = s.encode(now + 6.0);
        assert!(bytes.starts_with(FILE_MAGIC.as_bytes()));
        let back = Silences::decode(&bytes).unwrap();
        assert_eq!(back.list(now + 6.0), s.list(now + 6.0));
        assert!(back.silenced(&labels("web-02", "BackendDown"), now + 6.0));
        assert!(!back.silenced(&labels("web-02", "HostDown"), now + 6.0));
        assert!(!back.silenced(&labels("lb-01", "BackendDown"), now + 6.0));
        // the restored silence can still be expired by its id
        let mut back = back;
        assert!(back.expire(&active, now + 7.0));
        assert!(!back.silenced(&labels("web-02", "BackendDown"), now + 8.0));
        // damaged files are refused, naming why
        assert!(Silences::decode(b"[]")
            .unwrap_err()
            .contains("not a silences file"));
        let torn = &bytes[..bytes.len() / 2];
        assert!(Silences::decode(torn).is_err());
        let bad = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("web-0[12]", "web-0[12");
        assert!(Silences::decode(bad.as_bytes())
            .unwrap_err()
            .contains(&active));
    }

    #[test]
    fn invalid_silences_are_refused() {
        let mut s = Silences::default();
        let now = 1_700_000_000.0;
        let ok = |v| vec![m("host", v, true, true)];
        for (p, needle) in [
            (
                post(vec![], "2023-11-14T22:13:20Z", "2023-11-14T23:13:20Z"),
                "at least one",
            ),
            (
                post(ok("("), "2023-11-14T22:13:20Z", "2023-11-14T23:13:20Z"),
                "matcher host",
            ),
            (post(ok("a"), "soon", "2023-11-14T23:13:20Z"), "startsAt"),
            (
                post(ok("a"), "2023-11-14T23:13:20Z", "2023-11-14T22:13:20Z"),
                "after",
            ),
            (
                post(ok("a"), "2023-11-14T20:00:00Z", "2023-11-14T21:00:00Z"),
                "past",
            ),
        ] {
            let e = s.add(p, now).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
